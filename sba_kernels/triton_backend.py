"""The ``"triton"`` backend: launch wrappers, ``torch.library`` ops and their autograd.

Layers, top to bottom:

1. ``intra_attention`` / ``inter_attention`` / ``segment_mean``: the backend's entry points
   (already-checked arguments from `sba_kernels.ops`). They pick block sizes, fetch cached
   work lists, and call the ops below.
2. ``sba::attention_fwd`` / ``sba::attention_bwd`` / ``sba::segment_mean_fwd`` /
   ``sba::segment_mean_bwd``: ``torch.library.custom_op``s with fake (shape-only)
   implementations and registered autograd, so ``torch.compile(fullgraph=True)`` traces
   forward and backward through them without graph breaks.
3. ``_launch_*``: the kernel launches, in `triton_kernels`.

Inter attention is intra attention over one subgraph holding all P tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import triton_kernels as kern
from .partition import Partition

LOG2E = 1.4426950408889634

# Tests set this to True: outputs start as NaN, so an element no program writes shows up.
POISON = os.environ.get("SBA_POISON", "0") == "1"


def _new(shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Blocks:
    """Tile sizes: BLOCK_M query rows x BLOCK_N key rows x BLOCK_D head-dim columns."""

    m: int
    n: int
    d: int
    num_warps: int = 4
    num_stages: int = 2


def blocks_for(max_len: int, head_dim: int, dtype: torch.dtype) -> Blocks:
    """Tiles no wider than the widest subgraph needs (tl.dot wants >= 16 per side)."""
    d = max(16, triton.next_power_of_2(head_dim))
    fit = max(16, triton.next_power_of_2(max_len))
    n_cap = 32 if (d >= 128 and dtype == torch.float32) else 64
    return Blocks(m=min(fit, 64), n=min(fit, n_cap), d=d)


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots: IEEE unless the user enabled TF32 for matmuls (torch's own switch)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _bias_strides(bias: Optional[torch.Tensor]) -> tuple[int, int, int]:
    """(head, part, row) strides of a contiguous ``[P, M, M]`` / ``[H, P, M, M]`` bias."""
    if bias is None:
        return 0, 0, 0
    head = bias.stride(0) if bias.dim() == 4 else 0
    return head, bias.stride(-3), bias.stride(-2)


def _bhn_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


# ----------------------------------------------------------------------------- launches
def _launch_fwd(q, k, v, index, lengths, bias, scale, blk: Blocks):
    B, N, H, d = q.shape
    P, M = index.shape
    o = _new((B, N, H, d), q.dtype, q.device)
    lse = _new((B, H, N), torch.float32, q.device)
    q_tiles = triton.cdiv(M, blk.m)
    kern.attention_fwd[(P * q_tiles, B * H)](
        q, k, v, o, lse, bias if bias is not None else q, index, lengths, q_tiles,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(o),
        *_bias_strides(bias), H, N, index.shape[1], scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=blk.d, BLOCK_M=blk.m, BLOCK_N=blk.n, HAS_BIAS=bias is not None,
        PRECISION=_precision(q.dtype), num_warps=blk.num_warps, num_stages=blk.num_stages,
    )
    return o, lse


def _launch_bwd(do, q, k, v, o, lse, index, lengths, bias, scale, blk: Blocks, need_dbias: bool):
    B, N, H, d = q.shape
    P, M = index.shape
    q_tiles, k_tiles = triton.cdiv(M, blk.m), triton.cdiv(M, blk.n)
    delta = _new((B, H, N), torch.float32, q.device)
    rows = 64
    kern.attention_bwd_delta[(triton.cdiv(N, rows), B * H)](
        o, do, delta, *_bhn_strides(o), *_bhn_strides(do), H, N,
        HEAD_DIM=d, BLOCK_D=blk.d, BLOCK_R=rows,
    )
    dq, dk, dv = (_new((B, N, H, d), q.dtype, q.device) for _ in range(3))
    bias_arg = bias if bias is not None else q
    common = (*_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(do))
    meta = dict(HEAD_DIM=d, BLOCK_D=blk.d, BLOCK_M=blk.m, BLOCK_N=blk.n, PRECISION=_precision(q.dtype),
                num_warps=blk.num_warps, num_stages=blk.num_stages)
    kern.attention_bwd_dq[(P * q_tiles, B * H)](
        q, k, v, do, lse, delta, dq, bias_arg, index, lengths, q_tiles, *common, *_bhn_strides(dq),
        *_bias_strides(bias), H, N, M, scale * LOG2E, scale, HAS_BIAS=bias is not None, **meta,
    )
    kern.attention_bwd_dkdv[(P * k_tiles, B * H)](
        q, k, v, do, lse, delta, dk, dv, bias_arg, index, lengths, k_tiles, *common, *_bhn_strides(dk),
        *_bias_strides(bias), H, N, M, scale * LOG2E, scale, HAS_BIAS=bias is not None, **meta,
    )
    if not need_dbias:
        return dq, dk, dv, q.new_empty(0)
    # Padding entries never reach the scores: their gradient is 0, and no tile covers them.
    dbias = torch.zeros_like(bias)
    shared = bias.dim() == 3
    kern.attention_bwd_dbias[(P * q_tiles * k_tiles, 1 if shared else H)](
        q, k, v, do, lse, delta, dbias, bias, index, lengths, q_tiles, k_tiles, *common,
        *_bias_strides(bias), B, H, N, M, scale * LOG2E, SHARED_BIAS=shared, **meta,
    )
    return dq, dk, dv, dbias


# ----------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("sba::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor,
                  bias: Optional[torch.Tensor], scale: float, block_m: int, block_n: int,
                  block_d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Subgraph attention forward: returns ``(o [B, N, H, d], lse [B, H, N] fp32, log2 units)``."""
    return _launch_fwd(q, k, v, index, lengths, bias, scale, Blocks(block_m, block_n, block_d))


@attention_fwd.register_fake
def _(q, k, v, index, lengths, bias, scale, block_m, block_n, block_d):
    B, N, H, d = q.shape
    return q.new_empty((B, N, H, d)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("sba::attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor, bias: Optional[torch.Tensor],
                  scale: float, block_m: int, block_n: int, block_d: int,
                  need_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Subgraph attention backward: ``(dq, dk, dv, dbias)``; dbias is empty unless asked for."""
    return _launch_bwd(do, q, k, v, o, lse, index, lengths, bias, scale, Blocks(block_m, block_n, block_d),
                       need_dbias)


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, index, lengths, bias, scale, block_m, block_n, block_d, need_dbias):
    grads = [q.new_empty(q.shape) for _ in range(3)]
    return (*grads, bias.new_empty(bias.shape) if need_dbias else q.new_empty(0))


def _attention_setup(ctx, inputs, output):
    q, k, v, index, lengths, bias, scale, bm, bn, bd = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], index, lengths, bias)
    ctx.scale, ctx.blocks = scale, (bm, bn, bd)


def _attention_backward(ctx, do, _dlse):
    q, k, v, o, lse, index, lengths, bias = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[5]
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq, dk, dv, dbias = attention_bwd(do, q, k, v, o, lse, index, lengths, bias, ctx.scale, *ctx.blocks,
                                      need_dbias)
    return dq, dk, dv, None, None, dbias if need_dbias else None, None, None, None, None


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


@torch.library.custom_op("sba::segment_mean_fwd", mutates_args=())
def segment_mean_fwd(x: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor,
                     assignment: torch.Tensor) -> torch.Tensor:
    """``[B, N, C] -> [B, P, C]`` subgraph means (``assignment`` rides along for backward)."""
    B, _, C = x.shape
    P, M = index.shape
    z = _new((B, P, C), x.dtype, x.device)
    block_c = min(128, max(16, triton.next_power_of_2(C)))
    kern.segment_mean_fwd[(P, B, triton.cdiv(C, block_c))](
        x, z, index, lengths, x.stride(0), x.stride(1), z.stride(0), z.stride(1), C, M,
        BLOCK_R=32, BLOCK_C=block_c,
    )
    return z


@segment_mean_fwd.register_fake
def _(x, index, lengths, assignment):
    return x.new_empty((x.shape[0], index.shape[0], x.shape[2]))


@torch.library.custom_op("sba::segment_mean_bwd", mutates_args=())
def segment_mean_bwd(dz: torch.Tensor, assignment: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Gradient of `segment_mean_fwd`: ``dx[b, i] = dz[b, part(i)] / n_part(i)``."""
    B, _, C = dz.shape
    N = assignment.shape[0]
    dx = _new((B, N, C), dz.dtype, dz.device)
    rows, block_c = 32, min(128, max(16, triton.next_power_of_2(C)))
    kern.segment_mean_bwd[(triton.cdiv(N, rows), B, triton.cdiv(C, block_c))](
        dz, dx, assignment, lengths, dz.stride(0), dz.stride(1), dx.stride(0), dx.stride(1), N, C,
        BLOCK_R=rows, BLOCK_C=block_c,
    )
    return dx


@segment_mean_bwd.register_fake
def _(dz, assignment, lengths):
    return dz.new_empty((dz.shape[0], assignment.shape[0], dz.shape[2]))


def _segment_mean_setup(ctx, inputs, output):
    _, _, lengths, assignment = inputs
    ctx.save_for_backward(assignment, lengths)


def _segment_mean_backward(ctx, dz):
    assignment, lengths = ctx.saved_tensors
    if dz.stride(-1) != 1:
        dz = dz.contiguous()
    return segment_mean_bwd(dz, assignment, lengths), None, None, None


segment_mean_fwd.register_autograd(_segment_mean_backward, setup_context=_segment_mean_setup)


# ----------------------------------------------------------------------------- backend entry points
def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _attention(q, k, v, index, lengths, bias: Optional[torch.Tensor], scale: float):
    blk = blocks_for(index.shape[1], q.shape[-1], q.dtype)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    o, _ = attention_fwd(q, k, v, index, lengths, None if bias is None else bias.contiguous(), scale,
                         blk.m, blk.n, blk.d)
    return o


def intra_attention(q, k, v, partition: Partition, bias: Optional[torch.Tensor], scale: float):
    """See `sba_kernels.intra_attention`. q, k, v ``[B, N, H, d]`` -> ``[B, N, H, d]``."""
    return _attention(q, k, v, partition.index, partition.lengths, bias, scale)


def inter_attention(q, k, v, bias: Optional[torch.Tensor], scale: float):
    """See `sba_kernels.inter_attention`. q, k, v ``[B, P, H, d]`` -> ``[B, P, H, d]``."""
    P = q.shape[1]
    index = torch.arange(P, dtype=torch.int32, device=q.device).unsqueeze(0)   # one subgraph: all tokens
    lengths = torch.full((1,), P, dtype=torch.int32, device=q.device)
    if bias is not None:       # [P, P] -> [1, P, P];  [H, P, P] -> [H, 1, P, P]
        bias = bias.unsqueeze(-3)
    return _attention(q, k, v, index, lengths, bias, scale)


def segment_mean(x, partition: Partition):
    """See `sba_kernels.segment_mean`. x ``[B, N, C]`` -> ``[B, P, C]``."""
    return segment_mean_fwd(_last_dim_contiguous(x), partition.index, partition.lengths, partition.assignment)
