"""One set of ``torch.library`` ops, autograd and entry points for every kernel backend.

A kernel backend (Triton, CUDA C++) supplies four launch functions:

* ``attention_forward(q, k, v, index, lengths, bias, scale) -> (o, lse)``: q, k, v, o
  ``[B, N, H, d]``; lse fp32 ``[B, H, N]`` in whatever log base the backend's backward uses;
* ``attention_backward(do, q, k, v, o, lse, index, lengths, bias, scale, need_dbias)
  -> (dq, dk, dv, dbias)``: dbias has the bias's shape, or is empty when not needed;
* ``segment_mean_forward(x, index, lengths) -> z`` and
  ``segment_mean_backward(dz, assignment, lengths) -> dx``;
* optionally ``attention_forward_pooled(q, k, v, index, lengths, bias, scale) -> (o, lse, z)``
  with z ``[B, P, H, d]`` the subgraph means of o, computed in the forward's epilogue. Without
  it, ``intra_attention_pooled`` runs the forward, then the segment mean over o.

`KernelBackend` registers them as ``sba::<name>_*`` custom ops, with shape-only fake versions
and autograd, so ``torch.compile(fullgraph=True)`` traces through any backend, and exposes the
entry points `sba_kernels.dispatch` calls. Inter attention is intra attention over one
subgraph holding all P tokens.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .partition import Partition

Tensor = torch.Tensor


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class KernelBackend:
    """The ops and entry points of one kernel backend (see the module doc for the launches)."""

    def __init__(self, name: str, attention_forward: Callable, attention_backward: Callable,
                 segment_mean_forward: Callable, segment_mean_backward: Callable, *,
                 attention_forward_pooled: Optional[Callable] = None):
        self.name = name

        @torch.library.custom_op(f"sba::{name}_attention_fwd", mutates_args=())
        def attention_fwd(q: Tensor, k: Tensor, v: Tensor, index: Tensor, lengths: Tensor, bias: Optional[Tensor],
                          scale: float) -> tuple[Tensor, Tensor]:
            return attention_forward(q, k, v, index, lengths, bias, scale)

        @attention_fwd.register_fake
        def _(q, k, v, index, lengths, bias, scale):
            B, N, H, d = q.shape
            return q.new_empty((B, N, H, d)), q.new_empty((B, H, N), dtype=torch.float32)

        @torch.library.custom_op(f"sba::{name}_attention_bwd", mutates_args=())
        def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, index: Tensor,
                          lengths: Tensor, bias: Optional[Tensor], scale: float,
                          need_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            return attention_backward(do, q, k, v, o, lse, index, lengths, bias, scale, need_dbias)

        @attention_bwd.register_fake
        def _(do, q, k, v, o, lse, index, lengths, bias, scale, need_dbias):
            grads = [q.new_empty(q.shape) for _ in range(3)]
            return (*grads, bias.new_empty(bias.shape) if need_dbias else q.new_empty(0))

        def attention_grads(ctx, do, q, k, v, o, lse, index, lengths, bias, bias_input: int):
            """dq, dk, dv, and dbias or None when input ``bias_input`` (the bias) needs none, from
            o's whole gradient ``do``."""
            need_dbias = bias is not None and ctx.needs_input_grad[bias_input]
            dq, dk, dv, dbias = attention_bwd(_last_dim_contiguous(do), q, k, v, o, lse, index, lengths, bias,
                                              ctx.scale, need_dbias)
            return dq, dk, dv, dbias if need_dbias else None

        def setup(ctx, inputs, output):
            q, k, v, index, lengths, bias, scale = inputs
            ctx.save_for_backward(q, k, v, output[0], output[1], index, lengths, bias)
            ctx.scale = scale

        def backward(ctx, do, _dlse):
            dq, dk, dv, dbias = attention_grads(ctx, do, *ctx.saved_tensors, bias_input=5)
            return dq, dk, dv, None, None, dbias, None

        attention_fwd.register_autograd(backward, setup_context=setup)

        @torch.library.custom_op(f"sba::{name}_segment_mean_fwd", mutates_args=())
        def segment_mean_fwd(x: Tensor, index: Tensor, lengths: Tensor, assignment: Tensor) -> Tensor:
            return segment_mean_forward(x, index, lengths)

        @segment_mean_fwd.register_fake
        def _(x, index, lengths, assignment):
            return x.new_empty((x.shape[0], index.shape[0], x.shape[2]))

        @torch.library.custom_op(f"sba::{name}_segment_mean_bwd", mutates_args=())
        def segment_mean_bwd(dz: Tensor, assignment: Tensor, lengths: Tensor) -> Tensor:
            return segment_mean_backward(dz, assignment, lengths)

        @segment_mean_bwd.register_fake
        def _(dz, assignment, lengths):
            return dz.new_empty((dz.shape[0], assignment.shape[0], dz.shape[2]))

        def mean_setup(ctx, inputs, output):
            _, _, lengths, assignment = inputs
            ctx.save_for_backward(assignment, lengths)

        def mean_backward(ctx, dz):
            assignment, lengths = ctx.saved_tensors
            return segment_mean_bwd(_last_dim_contiguous(dz), assignment, lengths), None, None, None

        segment_mean_fwd.register_autograd(mean_backward, setup_context=mean_setup)
        self._attention_fwd, self._segment_mean_fwd = attention_fwd, segment_mean_fwd
        self._attention_pooled_fwd = None
        if attention_forward_pooled is None:
            return

        @torch.library.custom_op(f"sba::{name}_attention_pooled_fwd", mutates_args=())
        def attention_pooled_fwd(q: Tensor, k: Tensor, v: Tensor, index: Tensor, lengths: Tensor,
                                 assignment: Tensor, bias: Optional[Tensor],
                                 scale: float) -> tuple[Tensor, Tensor, Tensor]:
            return attention_forward_pooled(q, k, v, index, lengths, bias, scale)

        @attention_pooled_fwd.register_fake
        def _(q, k, v, index, lengths, assignment, bias, scale):
            B, N, H, d = q.shape
            return (q.new_empty((B, N, H, d)), q.new_empty((B, H, N), dtype=torch.float32),
                    q.new_empty((B, index.shape[0], H, d)))

        def pooled_setup(ctx, inputs, output):
            q, k, v, index, lengths, assignment, bias, scale = inputs
            ctx.save_for_backward(q, k, v, output[0], output[1], index, lengths, assignment, bias)
            ctx.scale = scale

        def pooled_backward(ctx, do, _dlse, dz):
            # z = segment mean of o, so o's whole gradient is do + dz[part(i)] / n_part(i).
            q, k, v, o, lse, index, lengths, assignment, bias = ctx.saved_tensors
            B, N, H, d = q.shape
            dz_rows = segment_mean_bwd(dz.reshape(B, -1, H * d).contiguous(), assignment, lengths)
            dq, dk, dv, dbias = attention_grads(ctx, do + dz_rows.view(B, N, H, d), q, k, v, o, lse, index,
                                                lengths, bias, bias_input=6)
            return dq, dk, dv, None, None, None, dbias, None

        attention_pooled_fwd.register_autograd(pooled_backward, setup_context=pooled_setup)
        self._attention_pooled_fwd = attention_pooled_fwd

    # ------------------------------------------------------------------------- entry points
    def _attention(self, q, k, v, index, lengths, bias: Optional[Tensor], scale: float) -> Tensor:
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, _ = self._attention_fwd(q, k, v, index, lengths, None if bias is None else bias.contiguous(), scale)
        return o

    def intra_attention(self, q, k, v, partition: Partition, bias: Optional[Tensor], scale: float) -> Tensor:
        """See `sba_kernels.intra_attention`. q, k, v ``[B, N, H, d]`` -> ``[B, N, H, d]``."""
        return self._attention(q, k, v, partition.index, partition.lengths, bias, scale)

    def intra_attention_pooled(self, q, k, v, partition: Partition, bias: Optional[Tensor],
                               scale: float) -> tuple[Tensor, Tensor]:
        """See `sba_kernels.intra_attention_pooled`: o ``[B, N, H, d]`` and z ``[B, P, H, d]``."""
        if self._attention_pooled_fwd is None:
            o = self.intra_attention(q, k, v, partition, bias, scale)
            B, N, H, d = o.shape
            return o, self.segment_mean(o.view(B, N, H * d), partition).view(B, -1, H, d)
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, _, z = self._attention_pooled_fwd(q, k, v, partition.index, partition.lengths, partition.assignment,
                                             None if bias is None else bias.contiguous(), scale)
        return o, z

    def inter_attention(self, q, k, v, bias: Optional[Tensor], scale: float) -> Tensor:
        """See `sba_kernels.inter_attention`. q, k, v ``[B, P, H, d]`` -> ``[B, P, H, d]``."""
        P = q.shape[1]
        index = torch.arange(P, dtype=torch.int32, device=q.device).unsqueeze(0)   # one subgraph: all tokens
        lengths = torch.full((1,), P, dtype=torch.int32, device=q.device)
        if bias is not None:       # [P, P] -> [1, P, P];  [H, P, P] -> [H, 1, P, P]
            bias = bias.unsqueeze(-3)
        return self._attention(q, k, v, index, lengths, bias, scale)

    def segment_mean(self, x, partition: Partition) -> Tensor:
        """See `sba_kernels.segment_mean`. x ``[B, N, C]`` -> ``[B, P, C]``."""
        return self._segment_mean_fwd(_last_dim_contiguous(x), partition.index, partition.lengths,
                                      partition.assignment)
