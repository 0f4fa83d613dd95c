"""The ``"sdpa"`` backend: the ops over scaled-dot-product attention on padded subgraphs.

The CPU fast path, and the last fast resort on a GPU without Triton or the CUDA extension.
Subgraphs are gathered into a padded batch and run through SDPA's fused kernel, which computes
the softmax in fp32 and holds one tile of scores at a time:

* ``partition.index`` flattened names the node read into each of the ``P*M`` slots; one
  ``index_select`` over the node dim lays out ``[B, P*M, H, d]`` slot rows, and the
  ``[B*P, H, M, d]`` operand SDPA takes is a *view* of them (SDPA reads any strides), so nothing
  is transposed. When the partition is the identity cut into equal runs
  (``index == arange(N).view(P, M)``) even the gather is a view.
* keys in padding slots get ``-inf`` through a float ``attn_mask`` that also carries the bias,
  so the bias costs no pass of its own over the scores.
* SDPA writes its output as slot rows, so one ``index_select`` (the slot of each node) puts it
  back in node order, and the pooled op averages the slot rows before that, in one matmul.

`_SubgraphAttention` is the autograd function: the backward gathers the output gradient into
slot rows (zero on padding rows) and the input gradients back to node order, each one pass
with no zero-filled scatter target. On CPU tensors it calls the fused CPU kernel and its
backward (``aten::_scaled_dot_product_flash_attention_for_cpu``), which keep the log-sum-exp
between them; on other devices, the public SDPA, recomputed in the backward. SDPA's fused
kernels return no gradient for the mask, so the bias gradient is recomputed here from the
saved inputs, in chunks of bounded size.

Memory is O(B*H*N*M) at most (the padded batch, the bias gradient's chunks), never N x N.
Inputs: float32, bfloat16 and float16; float64 stays on the torch reference (`supports`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import refuse_double_backward
from .backends import Backend
from .partition import Partition
from .reference import segment_mean  # one index_add pass over x, its backward one gather: nothing to gain here

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The bias gradient recomputes scores in chunks of at most this many fp32 elements (64 MiB),
# so its working set is bounded whatever B, H, P and M are.
_SCORE_CHUNK = 1 << 24


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Layout:
    """Where each node sits in a padded ``[P, M]`` grid of slots."""

    num_parts: int
    width: int
    identity: bool                           # node i is slot i (no padding): pad and unpad are views
    slot_node: Optional[torch.Tensor] = None  # [P*M] long: node read into each slot (padding: node 0)
    node_slot: Optional[torch.Tensor] = None  # [N] long: slot of each node
    pad_slots: Optional[torch.Tensor] = None  # [P*M - N] long: the padding slots


def _layout(partition: Partition) -> _Layout:
    def build():
        index = partition.index.long()
        P, M = index.shape
        flat = index.reshape(-1)
        if P * M == partition.num_nodes and torch.equal(flat, torch.arange(P * M, device=flat.device)):
            return _Layout(P, M, identity=True)
        real = flat >= 0
        node_slot = torch.empty(partition.num_nodes, dtype=torch.long, device=flat.device)
        node_slot[flat[real]] = torch.nonzero(real).squeeze(1)
        return _Layout(P, M, False, flat.clamp_min(0), node_slot, torch.nonzero(~real).squeeze(1))

    return partition.cached("sdpa_layout", build)


def _bhmd(rows: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """Slot rows ``[B, P*M, H, d]`` -> SDPA's ``[B*P, H, M, d]``, a view unless the rows' strides
    forbid one."""
    B, _, H, d = rows.shape
    return rows.reshape(B * lay.num_parts, lay.width, H, d).transpose(1, 2)


def _rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """SDPA's ``[B*P, H, M, d]`` -> slot rows ``[B, P*M, H, d]`` (a view when ``t`` is laid out
    as rows, as the CPU kernel writes its outputs and gradients)."""
    G, H, M, d = t.shape
    return t.transpose(1, 2).reshape(batch, G // batch * M, H, d)


def _pad(t: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """Node order ``[B, N, H, d]`` -> ``[B*P, H, M, d]``."""
    B, N, H, d = t.shape
    return _bhmd(t.reshape(B, N, H, d) if lay.identity else t.index_select(1, lay.slot_node), lay)


def _packed_rows(q, k, v) -> Optional[torch.Tensor]:
    """``[B, N, 3*H*d]``: the rows q, k and v are consecutive slices of, when they are (a fused
    projection's output viewed ``[B, N, 3, H, d]`` and unbound); else None."""
    if torch.compiler.is_compiling():   # data pointers are not there to compare while tracing
        return None
    B, N, H, d = q.shape
    width = H * d
    if not q.stride() == k.stride() == v.stride() == (q.stride(0), 3 * width, d, 1):
        return None
    if not q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr():
        return None
    step = width * q.element_size()
    if k.data_ptr() - q.data_ptr() != step or v.data_ptr() - k.data_ptr() != step:
        return None
    return q.as_strided((B, N, 3 * width), (q.stride(0), 3 * width, 1))


def _pad_qkv(q, k, v, lay: _Layout) -> list[torch.Tensor]:
    """q, k, v in SDPA's ``[B*P, H, M, d]`` layout. When they are slices of one packed tensor,
    one gather of its rows serves all three: each strided slice alone would be copied
    contiguous before its gather."""
    packed = None if lay.identity else _packed_rows(q, k, v)
    if packed is None:
        return [_pad(t, lay) for t in (q, k, v)]
    B, _, H, d = q.shape
    rows = packed.index_select(1, lay.slot_node).view(B, -1, 3, H, d)
    return [_bhmd(rows[:, :, i], lay) for i in range(3)]


def _unpad(t: torch.Tensor, lay: _Layout, batch: int) -> torch.Tensor:
    """``[B*P, H, M, d]`` -> node order ``[B, N, H, d]``."""
    rows = _rows(t, batch)
    return rows if lay.identity else rows.index_select(1, lay.node_slot)


# ----------------------------------------------------------------------------- masks
def _mask_dtype(bias: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype SDPA takes a float mask in: on CUDA only the inputs' dtype ``dtype`` (its
    kernels refuse any other; `SdpaBackend.supports` turns away a bias that would round in it),
    on the CPU float32 or the inputs' dtype, other bias dtypes converting to float32."""
    if bias.is_cuda:
        return dtype
    return bias.dtype if bias.dtype in (torch.float32, dtype) else torch.float32


def _key_mask(partition: Partition, dtype: torch.dtype) -> torch.Tensor:
    """``[P, 1, 1, M]``: 0 on real keys, ``-inf`` on padding keys."""

    def build():
        pad = partition.index < 0
        mask = torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill_(pad, float("-inf"))
        return mask.view(partition.num_parts, 1, 1, partition.max_size)

    return partition.cached(("sdpa_key_mask", dtype), build)


def _real_pairs(partition: Partition) -> torch.Tensor:
    """``[P, 1, M, M]`` bool: both slots real, the bias entries that count."""

    def build():
        real = partition.index >= 0
        return (real.unsqueeze(2) & real.unsqueeze(1)).unsqueeze(1)

    return partition.cached("sdpa_real_pairs", build)


def _intra_mask(partition: Partition, lay: _Layout, bias: Optional[torch.Tensor], batch: int,
                dtype: torch.dtype) -> Optional[torch.Tensor]:
    """SDPA's ``attn_mask`` for the padded batch, ``[B*P, 1 or H, M or 1, M]`` or None: the bias
    on real pairs, ``-inf`` on padding keys, 0 on the rest of padding query rows (their outputs
    are dropped; a finite row keeps them from turning into NaN in the backward)."""
    if bias is None:
        if lay.identity:
            return None
        mask = _key_mask(partition, dtype)
    else:
        b = bias.to(_mask_dtype(bias, dtype))
        mask = b.unsqueeze(1) if b.dim() == 3 else b.transpose(0, 1)          # [P, 1 or H, M, M]
        if not lay.identity:
            # where, not +: a NaN or inf bias entry in a padding slot must not reach the softmax.
            mask = torch.where(_real_pairs(partition), mask, _key_mask(partition, mask.dtype))
    if batch == 1:
        return mask
    return mask.expand(batch, *mask.shape).reshape(batch * mask.shape[0], *mask.shape[1:])


# ----------------------------------------------------------------------------- kernels
def _fused_cpu_forward(q, k, v, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)


def _fused_cpu_backward(do, q, k, v, o, lse, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, o, lse, 0.0, False, attn_mask=mask, scale=scale)


def _sdpa_forward(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None


def _sdpa_backward(do, q, k, v, o, lse, mask, scale):
    """Any device: SDPA's own backward, after recomputing its forward (the public op keeps no
    log-sum-exp for us)."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*inputs, attn_mask=mask, scale=scale)
        return torch.autograd.grad(out, inputs, do)


def _kernels(device: torch.device):
    """(forward, backward): ``forward(q, k, v, mask, scale) -> (o, lse or None)`` and
    ``backward(do, q, k, v, o, lse, mask, scale) -> (dq, dk, dv)``, on ``[G, H, L, d]``."""
    if device.type == "cpu":
        return _fused_cpu_forward, _fused_cpu_backward
    return _sdpa_forward, _sdpa_backward


# ----------------------------------------------------------------------------- autograd
def _attend(q, k, v, mask, scale: float, lay: _Layout, weights: Optional[torch.Tensor], keep: bool):
    """The forward: o ``[B, N, H, d]`` in node order; z ``[B, P, H, d]`` the means of o when
    ``weights`` is given, else None; and, with ``keep``, what the backward needs (padded q, k, v,
    SDPA's output and lse). Without ``keep``, the padded inputs are freed before o is gathered, so
    a forward without autograd peaks no higher than the SDPA call itself."""
    B = q.shape[0]
    padded = _pad_qkv(q, k, v, lay)
    kernel_forward, _ = _kernels(q.device)
    op, lse = kernel_forward(*padded, mask, scale)
    saved = (*padded, op, lse) if keep else None
    del padded
    o = _unpad(op, lay, B)
    return o, None if weights is None else _pool(_rows(op, B), weights), saved


class _SubgraphAttention(torch.autograd.Function):
    """``[B, N, H, d]`` node order in, node order out, attention within each run of a `_Layout`;
    with ``weights``, also the mean output of each subgraph ``[B, P, H, d]``."""

    @staticmethod
    def forward(ctx, q, k, v, mask, weights, scale: float, lay: _Layout):
        o, z, saved = _attend(q, k, v, mask, scale, lay, weights, keep=True)
        ctx.save_for_backward(*saved, mask, weights)
        ctx.scale, ctx.lay, ctx.batch = scale, lay, q.shape[0]
        ctx.set_materialize_grads(False)
        return o if z is None else (o, z)

    @staticmethod
    def backward(ctx, do, dz=None):
        refuse_double_backward("sdpa")
        qp, kp, vp, op, lse, mask, weights = ctx.saved_tensors
        lay, B = ctx.lay, ctx.batch
        do_p = _bhmd(_slot_rows_gradient(do, dz, weights, lay, op, B), lay)
        dmask = None
        if ctx.needs_input_grad[3]:
            *grads, dmask = _backward_with_mask_gradient(do_p, op, qp, kp, vp, mask, ctx.scale)
        else:
            _, kernel_backward = _kernels(qp.device)
            grads = list(kernel_backward(do_p, qp, kp, vp, op, lse, mask, ctx.scale))
        # Back to node order one gradient at a time, each padded one freed as its gather lands,
        # so that this phase needs less memory than the kernel's.
        del do_p
        for i in range(3):
            grads[i] = _unpad(grads[i], lay, B)
        return (*grads, dmask, None, None, None)


def _apply(q, k, v, mask, scale: float, lay: _Layout, weights: Optional[torch.Tensor] = None):
    """`_SubgraphAttention` where autograd needs it; the bare, leaner forward where it does not."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask)):
        return _SubgraphAttention.apply(q, k, v, mask, weights, scale, lay)
    o, z, _ = _attend(q, k, v, mask, scale, lay, weights, keep=False)
    return o if z is None else (o, z)


def _slot_rows_gradient(do, dz, weights, lay: _Layout, op, batch: int) -> torch.Tensor:
    """The output's gradient as slot rows ``[B, P*M, H, d]``: ``do`` gathered, 0 on padding rows
    (their outputs were dropped; a nonzero gradient there would leak into dk and dv through the
    padded queries' probabilities), plus the means' share ``weights[slot] * dz[part]``."""
    G, H, M, d = op.shape
    if do is None:
        rows = op.new_zeros(batch, G // batch * M, H, d)
    elif lay.identity:
        rows = do.reshape(batch, -1, H, d)
        # dense rows for the kernel; our own copy when the means' share is added in place (do
        # may be shared with other nodes of the autograd graph)
        rows = rows.clone(memory_format=torch.contiguous_format) if dz is not None else rows.contiguous()
    else:
        rows = do.index_select(1, lay.slot_node).index_fill_(1, lay.pad_slots, 0)
    if dz is not None:
        rows.view(batch, lay.num_parts, M, H * d).addcmul_(weights.unsqueeze(-1),
                                                           dz.reshape(batch, lay.num_parts, 1, H * d))
    return rows


def _pool(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Slot rows ``[B, P*M, H, d]`` -> subgraph means ``[B, P, H, d]`` (one batched matmul)."""
    B, _, H, d = rows.shape
    P, M = weights.shape
    return torch.matmul(weights.unsqueeze(1), rows.reshape(B, P, M, H * d)).view(B, P, H, d)


def _slot_weights(partition: Partition, dtype: torch.dtype) -> torch.Tensor:
    """``[P, M]``: ``1/n_p`` on real slots, 0 on padding; pools slot rows into means."""

    def build():
        real = (partition.index >= 0).to(dtype)
        return real / partition.lengths.to(dtype).unsqueeze(1)

    return partition.cached(("sdpa_slot_weights", dtype), build)


def _backward_with_mask_gradient(do, o, q, k, v, mask, scale):
    """dq, dk, dv ``[G, H, L, d]`` and the gradient of ``mask`` (4-D, broadcastable to the
    ``[G, H, L, L]`` scores) for ``o = softmax(scale * q k^T + mask) v``, from one recomputation
    of the probabilities ``P`` in fp32 chunks of at most ``_SCORE_CHUNK`` scores::

        dS = P * (dO v^T - rowsum(dO * o)),  dq = scale dS k,  dk = scale dS^T q,  dv = P^T dO

    and the mask's gradient is dS summed over the mask's broadcast dims. The fused kernels give
    no mask gradient, and their backward would recompute P a second time."""
    G, H, L, d = q.shape

    def rows_like(zero: bool) -> torch.Tensor:    # laid out as slot rows, as the fused kernel's are
        make = torch.zeros if zero else torch.empty
        return make(G, L, H, d, dtype=q.dtype, device=q.device).transpose(1, 2)

    per_g = H * L * L
    g_step = max(1, _SCORE_CHUNK // per_g)
    r_step = L if per_g <= _SCORE_CHUNK else max(1, _SCORE_CHUNK // (H * L))
    dq, dk, dv = rows_like(False), rows_like(r_step < L), rows_like(r_step < L)
    dmask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for g0 in range(0, G, g_step):
        gs = slice(g0, g0 + g_step)
        mg = gs if mask.shape[0] > 1 else slice(None)
        kc, vc = k[gs].float(), v[gs].float()
        for r0 in range(0, L, r_step):
            rs = slice(r0, r0 + r_step)
            mr = rs if mask.shape[2] > 1 else slice(None)
            qc, oc, doc = q[gs, :, rs].float(), o[gs, :, rs].float(), do[gs, :, rs].float()
            probs = torch.softmax(torch.matmul(qc, kc.transpose(-1, -2)) * scale + mask[mg, :, mr], dim=-1)
            ds = probs * (torch.matmul(doc, vc.transpose(-1, -2)) - (doc * oc).sum(-1, keepdim=True))
            dmask[mg, :, mr] += ds.sum_to_size(dmask[mg, :, mr].shape)
            dq[gs, :, rs] = torch.matmul(ds, kc).mul_(scale)
            if r_step == L:
                dk[gs] = torch.matmul(ds.transpose(-1, -2), qc).mul_(scale)
                dv[gs] = torch.matmul(probs.transpose(-1, -2), doc)
            else:
                dk[gs] += torch.matmul(ds.transpose(-1, -2), qc).mul_(scale)
                dv[gs] += torch.matmul(probs.transpose(-1, -2), doc)
    return dq, dk, dv, dmask.to(mask.dtype)


# ----------------------------------------------------------------------------- ops
def intra_attention(q, k, v, partition: Partition, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Attention inside each subgraph. q, k, v ``[B, N, H, d]``; bias ``[P, M, M]``,
    ``[H, P, M, M]`` or None. Returns ``[B, N, H, d]`` in node order."""
    lay = _layout(partition)
    mask = _intra_mask(partition, lay, bias, q.shape[0], q.dtype)
    return _apply(q, k, v, mask, scale, lay)


def intra_attention_pooled(q, k, v, partition: Partition, bias: Optional[torch.Tensor],
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`intra_attention` and the subgraph means of its output: ``[B, N, H, d]``, ``[B, P, H, d]``.
    The means are taken from the padded output, before it goes back to node order."""
    lay = _layout(partition)
    mask = _intra_mask(partition, lay, bias, q.shape[0], q.dtype)
    return _apply(q, k, v, mask, scale, lay, _slot_weights(partition, q.dtype))


def inter_attention(q, k, v, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Dense attention among pooled tokens. q, k, v ``[B, P, H, d]``; bias ``[P, P]``,
    ``[H, P, P]`` or None. Returns ``[B, P, H, d]``."""
    mask = None
    if bias is not None:   # 4-D: the CPU kernel takes 2-D or 4-D masks
        mask = bias.to(_mask_dtype(bias, q.dtype)).reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    return _apply(q, k, v, mask, scale, _Layout(1, q.shape[1], identity=True))


class SdpaBackend(Backend):
    """SDPA on padded subgraphs: any device SDPA runs on; fp32, bf16, fp16 inputs (float64 stays
    on the torch reference). Picked by ``"auto"`` for CPU tensors, and on a GPU after triton and
    cuda."""

    name = "sdpa"
    auto_devices = ("cpu", "cuda")
    intra_attention = staticmethod(intra_attention)
    intra_attention_pooled = staticmethod(intra_attention_pooled)
    segment_mean = staticmethod(segment_mean)
    inter_attention = staticmethod(inter_attention)

    def supports(self, x, bias=None):
        """Any bias dtype on the CPU (SDPA adds a float32 mask to the scores of any input dtype);
        on CUDA SDPA adds the mask in the inputs' dtype, so a bias must convert to it exactly
        (its own dtype, or any with float32 inputs): the bias is read in its own precision."""
        if x.dtype not in DTYPES:
            return (f"the sdpa backend takes float32, bfloat16 or float16 inputs, not {x.dtype} "
                    "(float64 runs on the torch reference)")
        exact = bias is None or bias.dtype == x.dtype or (x.dtype == torch.float32 and bias.dtype in DTYPES)
        if x.is_cuda and not exact:
            return (f"the sdpa backend on CUDA adds the bias in the inputs' dtype ({x.dtype}), where a "
                    f"{bias.dtype} bias would be rounded: pass a {x.dtype} bias or use the triton backend")
        return None


BACKEND = SdpaBackend()
