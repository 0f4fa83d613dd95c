"""Autotuning of the ``"triton"`` backend: the fastest launch configuration per shape key, timed
on the GPU that runs it.

**Off (the default)**, every launch runs `triton_backend.default_choice`: the configuration a
GPU timing chose where one was made (`triton_backend.timed_choice`, with the measurements beside
it), else the one the compiles favour, from the table `triton_picks.PICKS` (keyed by
`pick_key`), else the blocks of `triton_backend.one_tile_blocks` / `blocks_for`. The rule for
choosing without a GPU, from compiles alone (compiler facts): among the candidates below that
compile for sm_80 and sm_90 with no spill, no shared memory over the limit and no ptxas
performance-loss line, take

1. the widest query tile (each query tile of a subgraph reads all its keys and values again);
2. then the most warps resident per SM on sm_90 (programs per SM x warps, the least over the
   launches of a backward; latency hiding);
3. then the most programs per SM; then the blocks of `triton_backend.one_tile_blocks` /
   `blocks_for` (a tie changes nothing); then the first listed.

`bench/tuning_report.py` compiles every candidate of every launch the model makes, per dtype and
head dim, at tiles of 16 to 128 rows, applies the rule (`bench/results/static/tuning/`) and
writes the table. The table covers the dtypes and head dims the report has been run for
(`triton_picks.SOURCES`); any other launch runs the blocks as they are.

**On** (``SBA_AUTOTUNE=1`` in the environment, or inside ``with autotuning():``), on a CUDA
device, the first launch of each `key`:

1. lists its candidates (`candidates`) and the default;
2. prunes them by the compile check: each candidate's launches are recorded (not run) and
   compiled for this GPU's architecture by `triton_aot.compile_launch`; a candidate goes when
   one of them fails to compile, spills or asks for more shared memory than a program may
   have (`triton_aot.SM_LIMITS`);
3. times the rest with `TIMER` (``triton.testing.do_bench``) on the call's own tensors, and
   keeps the fastest; the default is always timed (first: a tie goes to it), so a tuned key is
   never slower than the default by the timer's own measure.

Later launches with that key run the kept configuration; `trials` shows what was tried. A
configuration is a dict of `triton_backend.Blocks` fields (``m``, ``n``, ``num_warps``,
``num_stages``, ``maxnreg``) that replace the default's; ``None`` is the default itself.
Tuning compiles every candidate (about a second each) before timing it, and the JIT compiles
it again when it first runs: the first call of a key takes seconds (tens of seconds for a tiled
backward), the rest none.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from .triton_tiles import dot_precision, tile_side

Choice = Optional[dict]


class Plan(NamedTuple):
    """One attention launch, everything decided but its configuration: ``run(choice)`` launches
    it with a configuration (None: the default) and returns its outputs; ``kind``,
    ``max_len``, ``q``, ``bias`` and ``flags`` make its `key` (`triton_backend.forward_plan`,
    `backward_plan`). A named tuple: it is built on every launch, and costs less host time so."""

    run: Callable[[Choice], object]
    kind: str
    max_len: int
    q: torch.Tensor
    bias: Optional[torch.Tensor]
    flags: dict

    def key(self) -> tuple:
        return key(self.kind, self.max_len, self.q, self.bias, **self.flags)

    def candidates(self) -> list[dict]:
        return candidates(self.kind, self.max_len)

    def pick_key(self) -> tuple:
        """Its key in `triton_picks.PICKS` (`pick_key`); fp32 dot precision as torch's switch
        stands when called."""
        return pick_key(self.kind, self.max_len, self.q, self.bias, self.flags.get("bias_grad", False))

ENABLED = os.environ.get("SBA_AUTOTUNE", "0") not in ("", "0")


def _gpu_time(fn: Callable[[], object]) -> float:
    """Milliseconds per call of ``fn`` on the GPU: the median over about 50 ms of calls (L2
    flushed between them), so that one slow call does not decide."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


# How a candidate is timed: ``TIMER(fn) -> milliseconds``. A test swaps in its own.
TIMER: Callable[[Callable[[], object]], float] = _gpu_time

# key -> the configuration kept; key -> [(configuration, milliseconds, or why it was not timed)]
_CHOSEN: dict[tuple, Choice] = {}
_TRIALS: dict[tuple, list[tuple[Choice, Optional[float], Optional[str]]]] = {}


@contextlib.contextmanager
def autotuning(on: bool = True) -> Iterator[None]:
    """Autotune inside the block (or, with ``on=False``, run the defaults there)."""
    global ENABLED
    saved, ENABLED = ENABLED, on
    try:
        yield
    finally:
        ENABLED = saved


def trials() -> dict[tuple, list[tuple[Choice, Optional[float], Optional[str]]]]:
    """For each key tuned so far: every configuration tried as ``(configuration, milliseconds,
    None)``, or ``(configuration, None, why)`` when the compile check pruned it or it failed;
    the kept one is the fastest."""
    return {key: list(rows) for key, rows in _TRIALS.items()}


def chosen() -> dict[tuple, Choice]:
    """The configuration kept for each key tuned so far (``None``: the default)."""
    return dict(_CHOSEN)


def forget() -> None:
    """Drop every tuned key: the next launch of each is timed again. (The compile reports stay:
    they depend on nothing but the launch.)"""
    _CHOSEN.clear()
    _TRIALS.clear()


# ----------------------------------------------------------------------------- the launches
# The kinds of launch a configuration is chosen for, the first field of every key (and of
# `triton_picks`' keys, which spell them out): the one-tile kernels (a subgraph per tile;
# the forward's bias loop is its own kernel configuration) and the tiled ones.
FORWARD_ONE_TILE = "forward one tile"
FORWARD_BIAS_LOOP = "forward one tile, bias loop"
FORWARD_TILED = "forward tiled"
BACKWARD_ONE_TILE = "backward one tile"
BACKWARD_TILED = "backward tiled"
KINDS = (FORWARD_ONE_TILE, FORWARD_BIAS_LOOP, FORWARD_TILED, BACKWARD_ONE_TILE, BACKWARD_TILED)
TILED_KINDS = (FORWARD_TILED, BACKWARD_TILED)


# ----------------------------------------------------------------------------- what is tried
def candidates(kind: str, max_len: int) -> list[dict]:
    """What is tried for a launch ``kind`` (one of `KINDS`)."""
    if kind in TILED_KINDS:
        return tiled_candidates(max_len, backward=kind == BACKWARD_TILED)
    return one_tile_candidates()


def one_tile_candidates() -> list[dict]:
    """The one-tile kernels' tile is the subgraph's own (`triton_backend.one_tile_blocks`);
    tried: 2, 4 or 8 warps, registers left to ptxas (255) or capped at 168 (three programs of
    128 threads per SM on sm_80/sm_90)."""
    return [dict(num_warps=w, maxnreg=r) for w in (2, 4, 8) for r in (255, 168)]


def tiled_candidates(max_len: int, *, backward: bool) -> list[dict]:
    """The tiled kernels: query x key tiles no wider than the subgraphs need (and at least 16,
    for tl.dot), 4 or 8 warps, 1 or 2 pipeline stages. The forward tries 32-128 query rows
    against 32-64 key rows; the backward, which keeps dK and dV accumulators too, square
    tiles of 16-64 rows."""
    fit = tile_side(max_len)
    if backward:
        tiles = {(min(t, fit),) * 2 for t in (16, 32, 64)}
    else:
        tiles = {(min(m, fit), min(n, fit)) for m in (32, 64, 128) for n in (32, 64) if n <= m}
    return [dict(m=m, n=n, num_warps=w, num_stages=s)
            for m, n in sorted(tiles) for w in (4, 8) for s in (1, 2)]


def key(kind: str, max_len: int, q: torch.Tensor, bias: Optional[torch.Tensor], **flags) -> tuple:
    """What a tuned configuration is kept for: the launch (``kind``, one of `KINDS`), the tile
    the subgraphs need (``max_len`` rounded up to a power of two), head dim, dtype and fp32 dot
    precision, the bias (none, or shared ``[P, M, M]`` / per head, and its dtype) and ``flags``
    (pooled, contiguous, bias gradient). Not the sizes N, P or B: a key tuned at one N is
    reused at another."""
    bias_form = None if bias is None else (bias.dim(), bias.dtype)
    return _key(kind, tile_side(max_len), q.shape[3], q.dtype, dot_precision(q.dtype), bias_form,
                tuple(sorted(flags.items())))


@functools.lru_cache(maxsize=None)      # every launch asks (`triton_backend.default_choice`): names once
def _key(kind: str, tile: int, head_dim: int, dtype: torch.dtype, precision: str, bias_form, flags: tuple) -> tuple:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    bias_kind = None if bias_form is None else ("shared" if bias_form[0] == 3 else "per_head", _name(bias_form[1]))
    return (kind, tile, head_dim, _name(dtype), precision, bias_kind, *flags)


def pick_key(kind: str, max_len: int, q: torch.Tensor, bias: Optional[torch.Tensor], bias_grad: bool) -> tuple:
    """The key of `triton_picks.PICKS`: `key` without ``contiguous`` and ``pool``, and with every
    tiled launch from 128 rows up as one (no tile is wider, so the candidates and their
    compiles are the same). ``contiguous`` and the forward's ``pool`` are runtime arguments the
    kernels do not specialise on; the one-tile backward's ``pool`` compiles a variant that
    loads z's gradient, one row per (batch, head), into dv and dp, and runs the plain
    variant's pick (`bench/kernel_report.py` compiles it at that pick: no spill)."""
    rows = min(max_len, 128) if kind in TILED_KINDS else max_len
    return key(kind, rows, q, bias, bias_grad=bias_grad)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- the tuning
def launch(plan: Plan):
    """Run ``plan``: with the default configuration unless autotuning is on and its tensors are
    on a GPU; then with the configuration kept for its key and this GPU, tuned first if none
    is yet."""
    if not ENABLED:                # the common case first: no work added to the launch path
        return plan.run(None)
    from . import triton_backend

    gpu = None if triton_backend.recording_here() else _gpu(plan.q.device)
    if gpu is None:
        return plan.run(None)
    name, arch = gpu
    gpu_key = (*plan.key(), name)
    if gpu_key not in _CHOSEN:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():   # timing would sync a CUDA graph
            return plan.run(None)
        _CHOSEN[gpu_key] = _tune(plan.run, gpu_key, plan.candidates(), arch)
    return plan.run(_CHOSEN[gpu_key])


def _gpu(device: torch.device) -> Optional[tuple[str, int]]:
    """(name, sm architecture as 90 for sm_90) of a CUDA ``device``; None for any other."""
    if device.type != "cuda":
        return None
    return _cuda_facts(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)      # asked on every launch while tuning is on
def _cuda_facts(index: int) -> tuple[str, int]:
    from .triton_aot import SM_LIMITS

    major, minor = torch.cuda.get_device_capability(index)
    arch = 10 * major + minor
    if arch not in SM_LIMITS:
        raise RuntimeError(f"autotuning knows the limits of sm_{', sm_'.join(map(str, sorted(SM_LIMITS)))}; "
                           f"this GPU is sm_{arch}: unset SBA_AUTOTUNE to run the default configurations")
    return torch.cuda.get_device_name(index), arch


def _tune(run: Callable[[Choice], object], gpu_key: tuple, candidates: list[dict], arch: int) -> Choice:
    """Time the default and every candidate that passes `compile_check`; the fastest."""
    rows = []
    for choice in [None, *(c for i, c in enumerate(candidates) if c not in candidates[:i])]:
        try:
            why = None if choice is None else compile_check(run, choice, arch)
        except Exception as err:      # noqa: BLE001 -- a check that cannot run keeps the candidate out
            why = f"compile check failed: {type(err).__name__}: {err}"[:500]
        if why is not None:
            rows.append((choice, None, why))
            continue
        try:
            rows.append((choice, float(TIMER(lambda: run(choice))), None))
        except Exception as err:       # noqa: BLE001 -- the default raises again below, with its own traceback
            rows.append((choice, None, f"failed: {type(err).__name__}: {err}"[:500]))
    _TRIALS[gpu_key] = rows
    timed = [(ms, i) for i, (_, ms, _) in enumerate(rows) if ms is not None]
    return rows[min(timed)[1]][0] if timed else None


def compile_check(run: Callable[[Choice], object], choice: dict, arch: int) -> Optional[str]:
    """Why ``run(choice)`` must not run on ``sm_<arch>``, or None: its launches, recorded
    rather than run, each compiled ahead of time (`triton_aot.compile_launch`)."""
    from . import triton_aot

    with triton_aot.recording() as launches:
        run(choice)
    for kernel, _grid, args, meta in launches:
        report = _compiled(triton_aot.Launch.recorded(kernel, args, meta), arch)
        why = report.unusable
        if why:
            return f"{report.kernel} {why}"
    return None


_REPORTS: dict[str, object] = {}


def _compiled(launch, arch: int):
    """`triton_aot.compile_launch` once per configuration (`triton_aot.config_key`: a launch at
    another N reuses it), in a cold cache (ptxas's log)."""
    from . import triton_aot

    config = triton_aot.config_key(launch, arch)
    if config not in _REPORTS:
        with triton_aot.cold_cache():
            _REPORTS[config] = triton_aot.compile_launch(launch, arch)
    return _REPORTS[config]
