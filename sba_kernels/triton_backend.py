"""The ``"triton"`` backend: block sizes and the launches of the kernels in `triton_kernels`.

`TritonBackend` says what it supports; its ops run the launch functions here through the
``sba::`` custom ops of `custom_ops` (shared with the CUDA C++ backend):
``attention_forward`` -> ``_forward_one_tile`` (``triton_kernels.attention_fwd_one_tile``)
when every subgraph fits one tile (`one_tile_blocks`), else ``_forward_tiled``
(``attention_fwd``); ``attention_backward`` -> ``_backward_one_tile`` (one fused launch,
``attention_bwd_one_tile``) or ``_backward_tiled`` (the delta, dQ, dK/dV and dBias kernels);
``segment_mean_forward``/``_backward`` -> the segment-mean kernels. Each attention launch is
planned first (`forward_plan`, `backward_plan`): its tile from `one_tile_blocks` or
`blocks_for`, and its configuration from `default_choice` (a GPU timing's choice, else the
compile rule's pick in `triton_picks`, else those blocks as they are). Unless autotuning is on:
then `triton_tuning.launch` runs it with the configuration it timed fastest on this GPU (a
``choice`` passed to the launch function). The tiled backward tiles independently
of the forward (lse is saved per row, not per tile).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from dataclasses import dataclass, replace
from typing import Optional

import torch

from . import triton_kernels as kern
from . import triton_picks, triton_tuning
from .triton_tiles import ceil_div, dot_precision, tile_side
from .custom_ops import KernelBackend

LOG2E = kern.LOG2E.value        # scores go to exp2 scaled by scale * log2(e): the launches pass that
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")     # read once, as Triton does

# Tests set this to True: outputs start as NaN, so an element no program writes shows up.
POISON = os.environ.get("SBA_POISON", "0") == "1"


def _new(shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Blocks:
    """Tile sizes (BLOCK_M query rows x BLOCK_N key rows x BLOCK_D head-dim columns) and the
    launch options of one attention kernel."""

    m: int
    n: int
    d: int
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: int = 255

    def options(self) -> dict:
        """Launch options. ``maxnreg=255`` by default: left alone, ptxas caps some of these
        kernels at 128 or 168 registers per thread and spills a few bytes (seen in the compile
        report); the gathered loads already wait on memory, and a spill adds local-memory
        traffic to them."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=self.maxnreg)

    def chosen(self, choice: Optional[dict]) -> "Blocks":
        """These blocks with a configuration's fields (``m``, ``n``, ``num_warps``,
        ``num_stages``, ``maxnreg``) replaced; ``None`` keeps them all."""
        return self if not choice else replace(self, **choice)


def blocks_for(max_len: int, head_dim: int, dtype: torch.dtype, *, backward: bool = False) -> Blocks:
    """The tiles and warps of one tiled launch where `default_choice` has nothing else: the largest
    tile that compiles without a register spill on sm_80 and sm_90, never wider than the widest
    subgraph needs (tl.dot wants >= 16 a side).

    The caps come from ahead-of-time compiles of every configuration (`bench/kernel_report.py`,
    `bench/results/static/`; compiler facts, not timings); `tests/test_gpu_compile.py` fails if
    one of them spills:

    * fp32 without TF32 (3xTF32 dots: three MMAs per dot and split operands): 16-row tiles,
      except the forward at head dim <= 64, which fits 32;
    * the backward keeps dK and dV accumulators and recomputes the probabilities: 32-row tiles
      (16 for fp32 at head dim 128);
    * the forward takes 64-row tiles at head dim <= 64 with 8 warps (4 warps spill on sm_80),
      32 at head dim 128 and in fp32;
    * fp32 runs 8 warps and one pipeline stage everywhere (but the dQ and bias-gradient kernels,
      see `_backward_tiled`).
    """
    d, fit = tile_side(head_dim), tile_side(max_len)
    if dtype == torch.float32 and dot_precision(dtype) == "tf32x3":
        cap = 32 if (not backward and d <= 64) else 16
    elif backward:
        cap = 16 if (dtype == torch.float32 and d >= 128) else 32
    else:   # fp32 (TF32) with 64-row tiles and a bias spills on sm_80 even at 8 warps
        cap = 64 if (d <= 64 and dtype != torch.float32) else 32
    tile = min(fit, cap)
    if dtype == torch.float32:      # fp32 tiles hold twice the bytes: 8 warps, no software pipelining
        return Blocks(m=tile, n=tile, d=d, num_warps=8, num_stages=1)
    return Blocks(m=tile, n=tile, d=d, num_warps=8 if tile == 64 else 4)


# (dot kind, head dim) -> the widest tile of the one-tile kernels; absent: the tiled kernels.
# From ahead-of-time compiles of every pair for sm_80 and sm_90 (compiler facts): these are
# the widest tiles with no spill in either kernel, any bias. A head dim that is not a power of
# two pads its columns and needs more registers (24 spills at 64 rows); fp32 keeps twice the
# bytes per tile, and 3xTF32 splits every operand in two.
ONE_TILE_CAP = {
    **{("16bit", d): cap for d, cap in {16: 64, 24: 32, 32: 64, 64: 64, 128: 32}.items()},
    **{(kind, d): 16 for kind in ("tf32", "tf32x3") for d in (16, 24, 32, 64)},
}


def _dot_kind(dtype: torch.dtype) -> str:
    """What sizes a dot's registers: 2-byte operands, TF32, or 3xTF32 (split fp32 operands)."""
    if dtype != torch.float32:
        return "16bit"
    return dot_precision(dtype)


def _bias_strides(bias: Optional[torch.Tensor]) -> tuple[int, int, int]:
    """(head, part, row) strides of a contiguous ``[P, M, M]`` / ``[H, P, M, M]`` bias."""
    if bias is None:
        return 0, 0, 0
    head = bias.stride(0) if bias.dim() == 4 else 0
    return head, bias.stride(-3), bias.stride(-2)


def _bhn_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _node_ids(index: torch.Tensor, starts: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The kernels' ``Index`` and ``contiguous`` arguments: ``index`` ``[P, M]`` to gather
    through, or, for a partition whose every subgraph is a run of consecutive node ids,
    ``starts`` ``[P]`` (`Partition.starts`), each subgraph's first node."""
    return (index, 0) if starts is None else (starts, 1)


# ----------------------------------------------------------------------------- launches
# When a list, launches are appended to it as (kernel, grid, args, meta) instead of run:
# `triton_aot` records every configuration the backend launches this way, on any machine, and
# compiles each one for a GPU ahead of time.
# With RECORDING_THREAD set (`triton_aot.recording` sets it), only that thread's launches are
# recorded: autotuning records a candidate's launches while other threads may be running kernels.
LAUNCH_RECORDER: Optional[list] = None
RECORDING_THREAD: Optional[int] = None


def recording_here() -> bool:
    """Whether this thread's launches are being recorded (`LAUNCH_RECORDER`) rather than run."""
    return LAUNCH_RECORDER is not None and RECORDING_THREAD in (None, threading.get_ident())


def _launch(kernel, grid, *args, **meta) -> None:
    if recording_here():
        LAUNCH_RECORDER.append((kernel, grid, args, meta))
        return
    kernel[grid](*args, **meta)


def attention_forward(q, k, v, index, lengths, bias, scale, pool: bool, starts=None):
    """o ``[B, N, H, d]``, lse fp32 ``[B, H, N]`` (log2 units) and, with ``pool``, the
    subgraph means of o ``[B, P, H, d]`` from the kernel's epilogue (else an empty tensor):
    `_forward_one_tile` when every subgraph fits one tile, else `_forward_tiled`. With
    ``starts``, the one-tile kernels address rows from each subgraph's first node (`_node_ids`);
    the tiled kernels always gather through ``index``."""
    return triton_tuning.launch(forward_plan(q, k, v, index, lengths, bias, scale, pool, starts))


def forward_plan(q, k, v, index, lengths, bias, scale, pool: bool, starts=None) -> triton_tuning.Plan:
    """`attention_forward`'s launch, not yet run: `_forward_one_tile` or `_forward_tiled` with
    every argument but the configuration."""
    P, M = index.shape
    blk = one_tile_blocks(M, q.shape[3], q.dtype)
    if blk is not None:
        bias_loop = uses_bias_loop(P, _pairs_per_bias_tile(q, bias))
        kind = triton_tuning.FORWARD_BIAS_LOOP if bias_loop else triton_tuning.FORWARD_ONE_TILE
        blk = blk.chosen(default_choice(kind, M, q, bias))
        run = functools.partial(_forward_one_tile, blk, q, k, v, index, lengths, bias, scale, pool, starts, bias_loop)
    else:
        kind = triton_tuning.FORWARD_TILED
        blk = blocks_for(M, q.shape[3], q.dtype).chosen(default_choice(kind, M, q, bias))
        run = functools.partial(_forward_tiled, blk, q, k, v, index, lengths, bias, scale, pool)
    return triton_tuning.Plan(run, kind, M, q, bias, dict(pool=pool, contiguous=starts is not None))


def _pairs_per_bias_tile(q: torch.Tensor, bias: Optional[torch.Tensor]) -> int:
    """How many (batch, head) pairs read each bias tile: B x H for a shared ``[P, M, M]``
    bias, B for a per-head one, 0 without."""
    if bias is None:
        return 0
    return q.shape[0] * q.shape[2] if bias.dim() == 3 else q.shape[0]


# The one-tile kernels with a bias, timed on an H200 (`bench/bias_options.py`, bf16, H = 8,
# d = 64, 64-row tiles; `bench/results/gpu-h200/run5/` and `run6/bias_options.md`):
#
# * Forward: a bias loop (one program per bias tile, looping over the (batch, head) pairs that
#   read it) reads each bias tile once but runs fewer programs. With a shared bias (8 pairs per
#   tile) it ran 1.13-1.16x faster than one program per pair; with a per-head bias at B = 1 (one
#   pair per tile: nothing to share) 1.17x slower. So it runs from BIAS_LOOP_MIN_PAIRS pairs per
#   tile (4: between the two points measured, not timed itself), and from BIAS_LOOP_MIN_PARTS
#   subgraphs (1024, about 8 per SM of an H100: fewer programs would leave SMs idle; a guess).
#   Its loop is capped at 168 registers: at 255 ptxas took 193 with a shared bias and the loop
#   ran 1.23x slower; at 168 no configuration spills on sm_80 or sm_90 (compile report). (Since
#   LLVM may not hoist out of that loop, uncapped it would take 162-177: the cap stays.)
# * Backward summing the bias gradient: its loop keeps a [BLOCK, BLOCK] fp32 accumulator live.
#   At 64 rows and N = 1e6, forward+backward with 4 warps (249-255 registers; a shared bias
#   spills 8 bytes on sm_90) ran 1.43-1.44x faster than with 8 warps (238-244 registers, no
#   spill, one program per SM; the choice before the timings) and 1.06-1.16x faster than with
#   4 warps capped at 168 (200-330 bytes of spills). At N = 1e5 with a shared bias the cap of
#   168 was 1.14x faster instead; the larger N decided, where the kernels, not the host, take
#   the time. BIAS_GRAD_OPTIONS_64_ROWS names the choice (it equals `one_tile_blocks`' own 4
#   warps) so that `bench/bias_options.py` can time the others against it. Since those timings
#   the loop's body and launch changed (`triton_kernels._pair_grads`: no hoisting out of the
#   loop, no FMA contraction, dq before dk): 163-165 registers at 4 warps, no spill, three
#   programs per SM on sm_90 with Triton 3.9 (compiler facts; not timed).
BIAS_LOOP_MIN_PARTS = 1024
BIAS_LOOP_MIN_PAIRS = 4
BIAS_LOOP_FORWARD_OPTIONS = {"num_warps": 4, "maxnreg": 168}
BIAS_GRAD_OPTIONS_64_ROWS = {"num_warps": 4, "maxnreg": 255}


def default_choice(kind: str, max_len: int, q: torch.Tensor, bias: Optional[torch.Tensor],
                   bias_grad: bool = False) -> Optional[dict]:
    """The configuration a launch runs when it is not autotuned, in place of the blocks of
    `one_tile_blocks` / `blocks_for`: the choice a GPU timing made where one was made
    (`timed_choice`), else the one the compile rule favours (`triton_picks.PICKS`, written by
    `bench/tuning_report.py` from ahead-of-time compiles; the rule: `triton_tuning`), else None
    (those blocks as they are: a launch the report has not compiled)."""
    timed = timed_choice(kind, max_len, q, bias_grad)
    if timed is not None:
        return timed
    return triton_picks.PICKS.get(triton_tuning.pick_key(kind, max_len, q, bias, bias_grad))


# Where the H200 timings above stand for the rule's picks: their head dim and tile rows, in bf16
# as timed and in fp16, which moves the same bytes through the same 16-bit dots (the byte
# account's stand-in for bf16 too).
TIMED_SHAPE = dict(dtypes=(torch.bfloat16, torch.float16), head_dim=64, rows=64)


def timed_choice(kind: str, max_len: int, q: torch.Tensor, bias_grad: bool) -> Optional[dict]:
    """At the shape the H200 timed (`TIMED_SHAPE`): `BIAS_LOOP_FORWARD_OPTIONS` for the bias
    loop, `BIAS_GRAD_OPTIONS_64_ROWS` for the one-tile backward summing a bias gradient; None
    for every other launch and shape."""
    if (q.dtype not in TIMED_SHAPE["dtypes"]
            or (q.shape[3], tile_side(max_len)) != (TIMED_SHAPE["head_dim"], TIMED_SHAPE["rows"])):
        return None
    if kind == triton_tuning.FORWARD_BIAS_LOOP:
        return BIAS_LOOP_FORWARD_OPTIONS
    if kind == triton_tuning.BACKWARD_ONE_TILE and bias_grad:
        return BIAS_GRAD_OPTIONS_64_ROWS
    return None


def uses_bias_loop(num_parts: int, pairs_per_tile: int) -> bool:
    """Whether the one-tile forward runs one program per bias tile: ``num_parts`` subgraphs,
    ``pairs_per_tile`` (batch, head) pairs reading each bias tile (0 without a bias)."""
    return num_parts >= BIAS_LOOP_MIN_PARTS and pairs_per_tile >= max(1, BIAS_LOOP_MIN_PAIRS)


@contextlib.contextmanager
def bias_tuning(min_parts: Optional[int] = None, min_pairs: Optional[int] = None,
                loop_forward_options: Optional[dict] = None, grad_options_64_rows: Optional[dict] = None):
    """Set, inside the block, the bias choices given (the others keep their values):
    `BIAS_LOOP_MIN_PARTS`, `BIAS_LOOP_MIN_PAIRS`, `BIAS_LOOP_FORWARD_OPTIONS`,
    `BIAS_GRAD_OPTIONS_64_ROWS`. How the compile check, the byte count and the tests reach both
    forms of the forward, and how `bench/bias_options.py` times the alternatives."""
    global BIAS_LOOP_MIN_PARTS, BIAS_LOOP_MIN_PAIRS, BIAS_LOOP_FORWARD_OPTIONS, BIAS_GRAD_OPTIONS_64_ROWS
    saved = BIAS_LOOP_MIN_PARTS, BIAS_LOOP_MIN_PAIRS, BIAS_LOOP_FORWARD_OPTIONS, BIAS_GRAD_OPTIONS_64_ROWS
    given = (min_parts, min_pairs, loop_forward_options, grad_options_64_rows)
    (BIAS_LOOP_MIN_PARTS, BIAS_LOOP_MIN_PAIRS, BIAS_LOOP_FORWARD_OPTIONS,
     BIAS_GRAD_OPTIONS_64_ROWS) = (old if new is None else new for old, new in zip(saved, given))
    try:
        yield
    finally:
        BIAS_LOOP_MIN_PARTS, BIAS_LOOP_MIN_PAIRS, BIAS_LOOP_FORWARD_OPTIONS, BIAS_GRAD_OPTIONS_64_ROWS = saved


def _forward_one_tile(blk, q, k, v, index, lengths, bias, scale, pool: bool, starts, bias_loop: bool, choice=None):
    """One program per subgraph and (batch, head), or, with ``bias_loop`` (`uses_bias_loop`, as
    `forward_plan` decided it), per bias tile: `triton_kernels.attention_fwd_one_tile`.
    ``choice``: an autotuned configuration (`triton_tuning`) in place of the default options."""
    B, N, H, d = q.shape
    P, M = index.shape
    o = _new((B, N, H, d), q.dtype, q.device)
    lse = _new((B, H, N), torch.float32, q.device)
    pooled = _new((B, P, H, d), torch.float32, q.device) if pool else lse
    # SHARED_BIAS shapes only the loop over pairs: set without it, it would compile a twin.
    shared = bias is not None and bias.dim() == 3 and bias_loop
    blk = blk.chosen(choice)
    ids, contiguous = _node_ids(index, starts)
    _launch(kern.attention_fwd_one_tile, (P, (1 if shared else H) if bias_loop else B * H),
        q, k, v, o, lse, pooled, bias if bias is not None else q, ids, lengths,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(o),
        *_bias_strides(bias), B, H, N, M, contiguous, P, int(pool), 0, scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=blk.d, BLOCK=blk.m, HAS_BIAS=bias is not None, BIAS_LOOP=bias_loop,
        SHARED_BIAS=shared, PRECISION=dot_precision(q.dtype), **blk.options(),
    )
    return o, lse, pooled.to(q.dtype) if pool else q.new_empty(0)


def _forward_tiled(blk, q, k, v, index, lengths, bias, scale, pool: bool, choice=None):
    """Subgraphs of any size: online softmax over key tiles (`triton_kernels.attention_fwd`).
    ``blk`` as `forward_plan` made it, or with an autotuned ``choice`` in place."""
    B, N, H, d = q.shape
    P, M = index.shape
    blk = blk.chosen(choice)
    o = _new((B, N, H, d), q.dtype, q.device)
    lse = _new((B, H, N), torch.float32, q.device)
    q_tiles = ceil_div(M, blk.m)
    shares = None
    if pool:       # per-tile shares of each mean; tiles past a subgraph's end leave their zeros
        shape = (B, P, q_tiles, H, d)
        shares = _new(shape, torch.float32, q.device) if q_tiles == 1 else torch.zeros(shape, device=q.device)
    _launch(kern.attention_fwd, (P * q_tiles, B * H),
        q, k, v, o, lse, shares if pool else lse, bias if bias is not None else q, index, lengths, q_tiles,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(o),
        *_bias_strides(bias), H, N, M, int(pool), scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=blk.d, BLOCK_M=blk.m, BLOCK_N=blk.n, HAS_BIAS=bias is not None,
        PRECISION=dot_precision(q.dtype), **blk.options(),
    )
    return o, lse, shares.sum(2).to(q.dtype) if pool else q.new_empty(0)


def one_tile_blocks(max_len: int, head_dim: int, dtype: torch.dtype) -> Optional[Blocks]:
    """The tile of the one-tile kernels (`attention_fwd_one_tile`, `attention_bwd_one_tile`)
    when every subgraph fits it, else None (the tiled kernels run). `ONE_TILE_CAP` gives the
    widest tile per dtype and head dim that compiles without a spill on sm_80 and sm_90.
    One stage: there is no loop over key tiles to pipeline; 4 warps where `default_choice` has
    nothing else."""
    d, tile = tile_side(head_dim), tile_side(max_len)
    cap = ONE_TILE_CAP.get((_dot_kind(dtype), head_dim), 0)
    if tile > cap:
        return None
    return Blocks(m=tile, n=tile, d=d, num_warps=4, num_stages=1)


def attention_backward(do, q, k, v, o, lse, index, lengths, bias, scale, need_dbias: bool, starts=None, dz=None):
    """dq, dk, dv (contiguous) and dbias (or an empty tensor): `_backward_one_tile` when every
    subgraph fits one tile, else `_backward_tiled`. ``starts`` as in `attention_forward`.
    ``dz``: the gradient ``[B, P, H, d]`` of the pooled forward's subgraph means, taken into
    dO's rows inside the one-tile kernel; only where `takes_pooled_gradient` says so."""
    return triton_tuning.launch(backward_plan(do, q, k, v, o, lse, index, lengths, bias, scale, need_dbias, starts,
                                              dz))


def takes_pooled_gradient(max_len: int, q: torch.Tensor, need_dbias: bool) -> bool:
    """Whether `attention_backward` takes ``dz`` for subgraphs of at most ``max_len`` nodes:
    where the one-tile backward runs (one program holds a subgraph's rows and its mean's
    gradient) without the bias-gradient loop (registers: `triton_kernels.attention_bwd_one_tile`).
    The others take dO with z's share already added."""
    return not need_dbias and one_tile_blocks(max_len, q.shape[3], q.dtype) is not None


def backward_plan(do, q, k, v, o, lse, index, lengths, bias, scale, need_dbias: bool, starts=None,
                  dz=None) -> triton_tuning.Plan:
    """`attention_backward`'s launches, not yet run: `_backward_one_tile` or `_backward_tiled`."""
    M = index.shape[1]
    if dz is not None and not takes_pooled_gradient(M, q, need_dbias):
        raise ValueError(f"dz: this backward (subgraphs of {M} nodes, head dim {q.shape[3]}, {q.dtype}, bias "
                         f"gradient {need_dbias}) takes dO with z's share added (see takes_pooled_gradient)")
    blk = one_tile_blocks(M, q.shape[3], q.dtype)
    if blk is not None:
        kind = triton_tuning.BACKWARD_ONE_TILE
        blk = blk.chosen(default_choice(kind, M, q, bias, need_dbias))
        run = functools.partial(_backward_one_tile, blk, do, q, k, v, lse, index, lengths, bias, scale,
                                need_dbias, starts, dz)
    else:
        kind = triton_tuning.BACKWARD_TILED
        blk = blocks_for(M, q.shape[3], q.dtype, backward=True).chosen(default_choice(kind, M, q, bias, need_dbias))
        run = functools.partial(_backward_tiled, blk, do, q, k, v, o, lse, index, lengths, bias, scale, need_dbias)
    flags = dict(bias_grad=need_dbias, contiguous=starts is not None, pool=dz is not None)
    return triton_tuning.Plan(run, kind, M, q, bias, flags)


def _backward_one_tile(blk, do, q, k, v, lse, index, lengths, bias, scale, need_dbias: bool, starts, dz,
                       choice=None):
    """One launch: each program does whole subgraphs (`triton_kernels.attention_bwd_one_tile`).
    ``choice`` as in `_forward_one_tile`."""
    B, N, H, d = q.shape
    P, M = index.shape
    dq, dk, dv = (_new((B, N, H, d), q.dtype, q.device) for _ in range(3))
    shared = bias is not None and bias.dim() == 3 and need_dbias     # as in `_forward_one_tile`
    # With dbias, one program per bias tile sums it over the batch (and heads, for a shared bias)
    # and writes the whole tile: no zero fill first.
    grid = (P, (1 if shared else H) if need_dbias else B * H)
    dbias = _new(bias.shape, bias.dtype, bias.device) if need_dbias else dq
    blk = blk.chosen(choice)
    ids, contiguous = _node_ids(index, starts)
    _launch(kern.attention_bwd_one_tile, grid,
        q, k, v, do, dz.contiguous() if dz is not None else q, lse, dq, dk, dv, dbias,
        bias if bias is not None else q, ids, lengths,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(do), *_bhn_strides(dq),
        *_bias_strides(bias), B, H, N, M, P, contiguous, 0, scale * LOG2E, scale,
        HEAD_DIM=d, BLOCK_D=blk.d, BLOCK=blk.m, HAS_BIAS=bias is not None, BIAS_GRAD=need_dbias,
        SHARED_BIAS=shared, POOLED=dz is not None, PRECISION=dot_precision(q.dtype), **blk.options(),
        # no FMA contraction in the bias-gradient loop (its registers: `triton_kernels._pair_grads`)
        **({"enable_fp_fusion": False} if need_dbias else {}),
    )
    return dq, dk, dv, dbias if need_dbias else q.new_empty(0)


def _backward_tiled(blk, do, q, k, v, o, lse, index, lengths, bias, scale, need_dbias: bool, choice=None):
    """Subgraphs of any size: delta = rowsum(dO * O), then dQ, dK/dV and dBias, each tiled.
    ``blk`` as `backward_plan` made it, or with an autotuned ``choice`` in place."""
    B, N, H, d = q.shape
    P, M = index.shape
    blk = blk.chosen(choice)
    q_tiles, k_tiles = ceil_div(M, blk.m), ceil_div(M, blk.n)
    delta = _new((B, H, N), torch.float32, q.device)
    rows = 64
    _launch(kern.attention_bwd_delta, (ceil_div(N, rows), B * H),
        o, do, delta, *_bhn_strides(o), *_bhn_strides(do), H, N,
        HEAD_DIM=d, BLOCK_D=blk.d, BLOCK_R=rows,
    )
    dq, dk, dv = (_new((B, N, H, d), q.dtype, q.device) for _ in range(3))
    bias_arg = bias if bias is not None else q
    common = (*_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(do))
    meta = dict(HEAD_DIM=d, BLOCK_D=blk.d, BLOCK_M=blk.m, BLOCK_N=blk.n, PRECISION=dot_precision(q.dtype))
    # fp32 dQ at head dim 128 spills on sm_80 with 8 warps and one stage, not with 4 (compile report)
    dq_options = blk.options() | dict(num_warps=4) if q.dtype == torch.float32 else blk.options()
    _launch(kern.attention_bwd_dq, (P * q_tiles, B * H),
        q, k, v, do, lse, delta, dq, bias_arg, index, lengths, q_tiles, *common, *_bhn_strides(dq),
        *_bias_strides(bias), H, N, M, scale * LOG2E, scale, HAS_BIAS=bias is not None, **meta, **dq_options,
    )
    _launch(kern.attention_bwd_dkdv, (P * k_tiles, B * H),
        q, k, v, do, lse, delta, dk, dv, bias_arg, index, lengths, k_tiles, *common, *_bhn_strides(dk),
        *_bias_strides(bias), H, N, M, scale * LOG2E, scale, HAS_BIAS=bias is not None, **meta, **blk.options(),
    )
    if not need_dbias:
        return dq, dk, dv, q.new_empty(0)
    # Padding entries never reach the scores: their gradient is 0, and no tile covers them.
    dbias = torch.zeros_like(bias)
    shared = bias.dim() == 3
    # Its loop reloads q, k, v, dO per (batch, head): one stage. In fp32, 3xTF32 dots spill here at
    # every warp count, and so do rounded TF32 dots at head dim 128, while IEEE (FMA) dots with
    # 4 warps do not (compile report): fp32 bias gradients take IEEE dots whatever the mode.
    dbias_meta = meta | blk.options() | dict(num_stages=1)
    if q.dtype == torch.float32:
        dbias_meta |= dict(num_warps=4, PRECISION="ieee")
    _launch(kern.attention_bwd_dbias, (P * q_tiles * k_tiles, 1 if shared else H),
        q, k, v, do, lse, delta, dbias, bias, index, lengths, q_tiles, k_tiles, *common,
        *_bias_strides(bias), B, H, N, M, H if shared else 1, scale * LOG2E, **dbias_meta,
    )
    return dq, dk, dv, dbias


def segment_mean_forward(x, index, lengths, starts=None):
    """``[B, N, C] -> [B, P, C]`` subgraph means; ``starts`` as in `attention_forward`."""
    B, _, C = x.shape
    P, M = index.shape
    z = _new((B, P, C), x.dtype, x.device)
    block_c = min(128, tile_side(C))
    ids, contiguous = _node_ids(index, starts)
    _launch(kern.segment_mean_fwd, (P, B, ceil_div(C, block_c)),
        x, z, ids, lengths, x.stride(0), x.stride(1), z.stride(0), z.stride(1), C, M, contiguous,
        BLOCK_R=32, BLOCK_C=block_c,
    )
    return z


def segment_mean_backward(dz, assignment, lengths):
    """``dx[b, i] = dz[b, part(i)] / n_part(i)``."""
    B, _, C = dz.shape
    N = assignment.shape[0]
    dx = _new((B, N, C), dz.dtype, dz.device)
    rows, block_c = 32, min(128, tile_side(C))
    _launch(kern.segment_mean_bwd, (ceil_div(N, rows), B, ceil_div(C, block_c)),
        dz, dx, assignment, lengths, dz.stride(0), dz.stride(1), dx.stride(0), dx.stride(1), N, C,
        BLOCK_R=rows, BLOCK_C=block_c,
    )
    return dx


# ----------------------------------------------------------------------------- the backend
class TritonBackend(KernelBackend):
    """The Triton kernels: CUDA tensors, or CPU tensors in Triton's interpreter
    (``TRITON_INTERPRET=1``); fp16, bf16, fp32; head dim up to 128."""

    name = "triton"
    auto_devices = ("cuda",)

    def unavailable(self, device):
        if device.type == "cuda" or (device.type == "cpu" and INTERPRET):
            return None
        return f"triton runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"

    def supports(self, x, bias=None):
        if x.device.type == "cpu" and torch.bfloat16 in (x.dtype, getattr(bias, "dtype", None)):
            return "Triton's interpreter multiplies bf16 tl.dot operands as raw bits (triton 3.9): bf16 needs a GPU"
        return super().supports(x, bias)


BACKEND = TritonBackend(sys.modules[__name__])
