"""Autotuning (`sba_kernels.triton_tuning`): what it tries, what it prunes, what it keeps.

No GPU here, so the tests stand in for the two things only a GPU has: the device (its name and
architecture) and the timer. Everything else is the package's own path: the public op, the
backend's dispatch, each candidate run by the interpreter, compared with the float64 dense
reference. The compile check itself is tested for real, compiling for sm_90 ahead of time.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sba_kernels as sk
from sba_kernels import triton_backend, triton_tuning
from helpers import dense_masked_attention, random_partition, rel_err

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tuning(monkeypatch):
    """Autotuning on for CPU tensors: a stand-in GPU (sm_90), outputs poisoned with NaN, every
    launch's meta recorded in ``launched``, and a timer that runs the candidate once, keeps
    (kernel, launch options, output) in ``timed`` and answers ``speed(kernel, meta)``
    milliseconds: of the candidate's attention kernel (the tiled backward's first, dQ)."""
    state = {"launched": [], "timed": [], "speed": None, "pruned": lambda choice: None}
    real_launch = triton_backend._launch

    def spy(kernel, grid, *args, **meta):
        state["launched"].append((kernel.fn.__name__, meta))
        real_launch(kernel, grid, *args, **meta)

    def timer(fn):
        start = len(state["launched"])
        out = fn()
        name, meta = next((n, m) for n, m in state["launched"][start:] if n != "attention_bwd_delta")
        state["timed"].append((name, meta, out))
        return state["speed"](name, meta)

    monkeypatch.setattr(triton_backend, "_launch", spy)
    monkeypatch.setattr(triton_backend, "POISON", True)
    monkeypatch.setattr(triton_tuning, "_gpu", lambda device: ("stand-in GPU", 90))
    monkeypatch.setattr(triton_tuning, "TIMER", timer)
    monkeypatch.setattr(triton_tuning, "compile_check", lambda run, choice, arch: state["pruned"](choice))
    triton_tuning.forget()
    with triton_tuning.autotuning():
        yield state
    triton_tuning.forget()


def _options(meta: dict) -> tuple:
    return tuple(meta.get(k) for k in ("BLOCK", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg"))


def _inputs(num_nodes: int, max_size: int, giant: int, seed: int, heads: int = 2):
    gen = torch.Generator().manual_seed(seed)
    part = random_partition(num_nodes, max_size=max_size, giant=giant, generator=gen)
    q, k, v, grad = (torch.randn(1, num_nodes, heads, 16, generator=gen, dtype=torch.float64) for _ in range(4))
    return part, q, k, v, grad


@pytest.mark.parametrize("giant", [0, 40], ids=["one-tile", "tiled"])
def test_tuning_keeps_the_fastest_candidate_and_every_candidate_is_correct(tuning, giant):
    """Forward and backward each tuned once: every candidate timed computes the reference's
    numbers, the kept one is the fastest the timer saw (a tie goes to the default), and later
    calls run it untimed."""
    part, q, k, v, grad = _inputs(64, 11, giant, seed=giant, heads=1)
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref = dense_masked_attention(q64, k64, v64, part)
    ref.backward(grad)

    # A made-up speed that no default wins: more warps and smaller tiles are faster, and a cap
    # of 168 registers is pruned as if it spilled.
    tuning["speed"] = lambda name, meta: 10.0 / meta["num_warps"] + (meta.get("BLOCK_M") or 0) / 64 + meta["num_stages"]
    tuning["pruned"] = lambda choice: "spills" if choice and choice.get("maxnreg") == 168 else None

    ours = [t.float().requires_grad_() for t in (q, k, v)]
    out = sk.intra_attention(*ours, part, backend="triton")
    out.backward(grad.float())
    assert rel_err(out, ref) < 1e-5
    for mine, theirs in zip(ours, (q64, k64, v64)):
        assert rel_err(mine.grad, theirs.grad) < 1e-4

    timed = tuning["timed"]
    forward = [(n, m, o) for n, m, o in timed if n.startswith("attention_fwd")]
    backward = [(n, m, o) for n, m, o in timed if not n.startswith("attention_fwd")]
    assert forward and backward and len(forward) + len(backward) == len(timed)
    assert not any(m["maxnreg"] == 168 for _, m, _ in timed), "a pruned candidate was timed"
    tiles = {(m.get("BLOCK_M"), m.get("BLOCK_N")) for _, m, _ in forward}
    assert len(tiles) == (1 if giant == 0 else 3)       # tiled, 64-row fit: 32x32, 64x32, 64x64
    for _, _, (o, _lse, _) in forward:
        assert rel_err(o, ref) < 1e-5
    for _, _, (dq, dk, dv, _) in backward:
        for mine, theirs in zip((dq, dk, dv), (q64, k64, v64)):
            assert rel_err(mine, theirs.grad) < 1e-4

    # The call after tuning ran each pass's fastest candidate, and no timer.
    n_timed = len(timed)
    tuning["launched"].clear()
    sk.intra_attention(*ours, part, backend="triton").backward(grad.float())
    assert len(timed) == n_timed
    for group in (forward, backward):
        fastest = min(group, key=lambda t: tuning["speed"](t[0], t[1]))
        ran = [meta for name, meta in tuning["launched"] if name == fastest[0]]
        assert ran and _options(ran[0]) == _options(fastest[1])
    kept = triton_tuning.chosen()
    assert len(kept) == 2 and all(key[-1] == "stand-in GPU" for key in kept)


def test_the_default_is_kept_when_it_is_fastest(tuning):
    part, q, k, v, _ = _inputs(60, 11, 0, seed=3)
    default_warps = triton_backend.one_tile_blocks(11, 16, torch.float32).num_warps
    tuning["speed"] = lambda name, meta: 1.0 if meta["num_warps"] == default_warps and meta["maxnreg"] == 255 else 2.0
    with torch.no_grad():
        sk.intra_attention(q.float(), k.float(), v.float(), part, backend="triton")
    (key, choice), = triton_tuning.chosen().items()
    rows = triton_tuning.trials()[key]
    assert rows[0][0] is None and rows[0][1] == 1.0
    assert choice is None or choice == {"num_warps": default_warps, "maxnreg": 255}
    assert len(rows) == 1 + len(triton_tuning.one_tile_candidates())


def test_off_or_on_a_cpu_runs_the_default_untimed(monkeypatch):
    """Off: no tuning anywhere. On, with a CPU tensor and no stand-in: the default too."""
    monkeypatch.setattr(triton_tuning, "TIMER", lambda fn: pytest.fail("timed"))
    triton_tuning.forget()
    part, q, k, v, _ = _inputs(40, 11, 0, seed=4)
    for on in (False, True):
        with triton_tuning.autotuning(on), torch.no_grad():
            out = sk.intra_attention(q.float(), k.float(), v.float(), part, backend="triton")
        assert rel_err(out, dense_masked_attention(q, k, v, part)) < 1e-5
    assert triton_tuning.chosen() == {}


def test_candidates_reach_the_launch():
    """Each configuration's fields land in the launch that runs it: tiles, warps, stages and
    the register cap (recorded, not run)."""
    from sba_kernels import triton_aot

    part, q, k, v, _ = _inputs(100, 11, 40, seed=5)
    q, k, v = (t.half() for t in (q, k, v))
    blk = triton_backend.blocks_for(part.index.shape[1], 16, torch.float16)
    for choice in triton_tuning.tiled_candidates(part.index.shape[1], backward=False):
        with triton_aot.recording() as launches:
            triton_backend._forward_tiled(blk, q, k, v, part.index, part.lengths, None, 0.25, True, choice=choice)
        (_kernel, grid, _args, meta), = launches
        assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"], meta["num_stages"]) == (
            choice["m"], choice["n"], choice["num_warps"], choice["num_stages"])
        assert grid[0] == part.index.shape[0] * -(-part.index.shape[1] // choice["m"])
    part = _inputs(100, 11, 0, seed=6)[0]
    one = triton_backend.one_tile_blocks(part.index.shape[1], 16, torch.float16)
    for choice in triton_tuning.one_tile_candidates():
        with triton_aot.recording() as launches:
            triton_backend._backward_one_tile(one, q, q, k, v, q.new_zeros(1, 2, 100).float(), part.index,
                                              part.lengths, None, 0.25, False, None, choice=choice)
        (_kernel, _grid, _args, meta), = launches
        assert (meta["num_warps"], meta["maxnreg"], meta["BLOCK"]) == (choice["num_warps"], choice["maxnreg"], 16)


def test_candidate_lists():
    tiled = triton_tuning.candidates("forward tiled", 100)
    assert {(c["m"], c["n"]) for c in tiled} == {(32, 32), (64, 32), (64, 64), (128, 32), (128, 64)}
    narrow = triton_tuning.candidates("backward tiled", 20)
    assert {(c["m"], c["n"]) for c in narrow} == {(16, 16), (32, 32)}        # never wider than 32 rows
    assert len(narrow) == len({tuple(sorted(c.items())) for c in narrow}) == 8
    one = triton_tuning.candidates("backward one tile", 64)
    assert {(c["num_warps"], c["maxnreg"]) for c in one} == {(w, r) for w in (2, 4, 8) for r in (255, 168)}


# The compile check, compiled for sm_90 ahead of time. In a child process without the
# interpreter: compiling needs real @triton.jit kernels. The bias-gradient backward at 64 rows
# capped at 168 registers spills 200-330 bytes on sm_90 (bench/RESULTS.md); without the bias it
# fits in 116-120 registers.
_COMPILE_CHECK = """
import functools, torch
from sba_kernels import triton_backend as tb, triton_tuning
B, N, H, d, M = 1, 64, 8, 64, 64
q = torch.zeros(B, N, H, d, dtype=torch.bfloat16)
index, lengths = torch.arange(M, dtype=torch.int32).view(1, M), torch.tensor([M], dtype=torch.int32)
bias = torch.zeros(1, M, M, dtype=torch.bfloat16)
lse = torch.zeros(B, H, N)
blk = tb.one_tile_blocks(M, d, q.dtype)
for need_dbias in (True, False):
    run = functools.partial(tb._backward_one_tile, blk, q, q, q, q, lse, index, lengths,
                            bias if need_dbias else None, 0.125, need_dbias, None)
    print(need_dbias, triton_tuning.compile_check(run, {"num_warps": 4, "maxnreg": 168}, 90))
"""


@pytest.mark.slow
def test_compile_check_prunes_a_spill_for_sm_90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with_grad, without = out.stdout.strip().splitlines()
    assert with_grad.startswith("True attention_bwd_one_tile spills"), with_grad
    assert without == "False None"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="tunes on a GPU: times and compiles for this device")
def test_tuning_on_the_gpu():
    """On a real GPU: bf16 with a trainable shared bias, tuned forward and backward give the
    float64 reference's numbers, and each tuned key kept its fastest timed configuration."""
    gen = torch.Generator().manual_seed(7)
    part = random_partition(1000, max_size=64, generator=gen, contiguous=True)
    q, k, v, grad = (torch.randn(2, 1000, 2, 64, generator=gen, dtype=torch.float64) for _ in range(4))
    bias = torch.randn(part.num_parts, part.index.shape[1], part.index.shape[1], generator=gen, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    ref = dense_masked_attention(*ref_in[:3], part, bias=ref_in[3])
    ref.backward(grad)
    ours = [t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v, bias)]
    triton_tuning.forget()
    try:
        with triton_tuning.autotuning():
            out = sk.intra_attention(*ours[:3], part.to("cuda"), bias=ours[3], backend="triton")
            out.backward(grad.to("cuda", torch.bfloat16))
        assert rel_err(out.cpu(), ref) < 1e-2
        for mine, theirs in zip(ours, ref_in):
            assert rel_err(mine.grad.cpu(), theirs.grad) < 2e-2
        trials, kept = triton_tuning.trials(), triton_tuning.chosen()
        assert len(kept) == 2
        for key, rows in trials.items():
            timed = [(ms, choice) for choice, ms, _ in rows if ms is not None]
            assert timed[0][1] is None and kept[key] == min(timed, key=lambda t: t[0])[1]
    finally:
        triton_tuning.forget()
