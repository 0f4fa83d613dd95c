"""Autotuning (`sba_kernels.triton_tuning`): what it tries, what it prunes, what it keeps.

No GPU here, so the tests stand in for the two things only a GPU has: the device (its name and
architecture) and the timer. Everything else is the package's own path: the public op, the
backend's dispatch, each candidate run by the interpreter, compared with the float64 dense
reference. The compile check itself is tested for real, compiling for sm_90 ahead of time.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sba_kernels as sk
from sba_kernels import triton_aot, triton_backend, triton_tiles, triton_tuning
from helpers import dense_masked_attention, random_partition, rel_err

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tuning(monkeypatch):
    """Autotuning on for CPU tensors: a stand-in GPU (sm_90), outputs poisoned with NaN, every
    launch's meta recorded in ``launched``, and a timer that runs the candidate once, keeps
    (kernel, launch options, output) in ``timed`` and answers ``speed(kernel, meta)``
    milliseconds, from the candidate's last launch (the tiled backward's dK/dV: its dQ runs 4
    warps in fp32 whatever the configuration)."""
    state = {"launched": [], "timed": [], "speed": None, "pruned": lambda choice: None}
    real_launch = triton_backend._launch

    def spy(kernel, grid, *args, **meta):
        state["launched"].append((kernel.fn.__name__, meta))
        real_launch(kernel, grid, *args, **meta)

    def timer(fn):
        out = fn()
        name, meta = state["launched"][-1]
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

    # A made-up speed that no default wins (fp32 defaults: one-tile 4 warps, one stage; tiled 8
    # warps, one stage): more warps, two stages and smaller tiles are faster, and a cap of 168
    # registers is pruned as if it spilled.
    tuning["speed"] = lambda name, meta: 10.0 / meta["num_warps"] + (meta.get("BLOCK_M") or 0) / 64 + 3 - meta["num_stages"]
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
    assert all(choice is not None for choice in kept.values()), "a default was kept that the timer put behind"


def test_the_default_is_kept_when_it_is_fastest(tuning):
    from sba_kernels import triton_aot

    part, q, k, v, _ = _inputs(60, 11, 0, seed=3)
    with triton_tuning.autotuning(False), triton_aot.recording() as launches:      # what runs untuned
        sk.intra_attention(q.float(), k.float(), v.float(), part, backend="triton")
    (_, _, _, default), = launches
    tuning["speed"] = lambda name, meta: (1.0 if (meta["num_warps"], meta["maxnreg"]) == (default["num_warps"],
                                                                                        default["maxnreg"]) else 2.0)
    with torch.no_grad():
        sk.intra_attention(q.float(), k.float(), v.float(), part, backend="triton")
    (key, choice), = triton_tuning.chosen().items()
    rows = triton_tuning.trials()[key]
    assert rows[0][0] is None and rows[0][1] == 1.0
    assert choice is None          # the candidate equal to the default ties with it: the default stays
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
    """Each configuration's fields land in every attention launch that runs it: tiles, warps,
    stages and the register cap (recorded, not run), in all four launch functions."""
    from sba_kernels import triton_aot

    def recorded(fn, *args, choice):
        with triton_aot.recording() as launches:
            fn(*args, choice=choice)
        return [(kernel.fn.__name__, grid, meta) for kernel, grid, _args, meta in launches]

    fp16 = torch.float16
    tiled, q, k, v, _ = _inputs(100, 11, 40, seed=5)
    q, k, v = (t.to(fp16) for t in (q, k, v))
    lse = torch.zeros(1, 2, 100)
    bias = torch.zeros(tiled.num_parts, tiled.index.shape[1], tiled.index.shape[1], dtype=fp16)
    P, M = tiled.index.shape
    for choice in triton_tuning.candidates("forward tiled", M):
        blk = triton_backend.blocks_for(M, 16, fp16)
        (_, grid, meta), = recorded(triton_backend._forward_tiled, blk, q, k, v, tiled.index, tiled.lengths, None,
                                    0.25, True, choice=choice)
        assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"], meta["num_stages"]) == (
            choice["m"], choice["n"], choice["num_warps"], choice["num_stages"])
        assert grid[0] == P * -(-M // choice["m"])
    for choice in triton_tuning.candidates("backward tiled", M):
        blk = triton_backend.blocks_for(M, 16, fp16, backward=True)
        launches = recorded(triton_backend._backward_tiled, blk, q, q, k, v, q, lse, tiled.index, tiled.lengths,
                            bias, 0.25, True, choice=choice)
        assert [name for name, _, _ in launches] == ["attention_bwd_delta", "attention_bwd_dq", "attention_bwd_dkdv",
                                                     "attention_bwd_dbias"]
        for name, grid, meta in launches[1:]:
            assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"]) == (choice["m"], choice["n"],
                                                                              choice["num_warps"]), name
        assert launches[2][2]["num_stages"] == choice["num_stages"]     # dBias runs one stage whatever
    small = _inputs(100, 11, 0, seed=6)[0]
    one = triton_backend.one_tile_blocks(small.index.shape[1], 16, fp16)
    for choice in triton_tuning.one_tile_candidates():
        for launches in (
            recorded(triton_backend._forward_one_tile, one, q, k, v, small.index, small.lengths, None, 0.25, False,
                     None, False, choice=choice),
            recorded(triton_backend._backward_one_tile, one, q, q, k, v, lse, small.index, small.lengths, None, 0.25,
                     False, None, None, choice=choice),
        ):
            (name, _, meta), = launches
            assert (meta["num_warps"], meta["maxnreg"], meta["BLOCK"]) == (choice["num_warps"], choice["maxnreg"], 16)


def test_keys_tell_apart_what_changes_the_kernel():
    """A tuned configuration is reused only for launches of the same key: anything that
    changes the compiled kernel or its grid changes the key; the subgraph size within one tile
    bucket, and the sizes N and B, do not."""
    def q_of(dtype=torch.float16, d=64, n=100, b=1):
        return torch.zeros(b, n, 2, d, dtype=dtype)

    def bias_of(dim=3, dtype=torch.float16):
        return torch.zeros((2,) * (dim - 3) + (4, 64, 64), dtype=dtype)

    base = triton_tuning.key("forward one tile", 64, q_of(), None, pool=False, contiguous=True)
    assert triton_tuning.key("forward one tile", 33, q_of(n=7, b=3), None, pool=False, contiguous=True) == base
    variants = [
        triton_tuning.key("forward one tile, bias loop", 64, q_of(), None, pool=False, contiguous=True),
        triton_tuning.key("forward one tile", 32, q_of(), None, pool=False, contiguous=True),
        triton_tuning.key("forward one tile", 64, q_of(d=32), None, pool=False, contiguous=True),
        triton_tuning.key("forward one tile", 64, q_of(torch.bfloat16), None, pool=False, contiguous=True),
        triton_tuning.key("forward one tile", 64, q_of(), bias_of(), pool=False, contiguous=True),
        triton_tuning.key("forward one tile", 64, q_of(), bias_of(4), pool=False, contiguous=True),
        triton_tuning.key("forward one tile", 64, q_of(), bias_of(dtype=torch.float32), pool=False, contiguous=True),
        triton_tuning.key("forward one tile", 64, q_of(), None, pool=True, contiguous=True),
        triton_tuning.key("forward one tile", 64, q_of(), None, pool=False, contiguous=False),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    fp32 = q_of(torch.float32)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = triton_tuning.key("backward tiled", 128, fp32, None, bias_grad=False, contiguous=False)
        torch.backends.cuda.matmul.allow_tf32 = True
        assert triton_tuning.key("backward tiled", 128, fp32, None, bias_grad=False, contiguous=False) != exact
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    with pytest.raises(ValueError, match="kind"):         # a misspelt kind would match no pick, silently
        triton_tuning.key("forward one-tile", 64, q_of(), None)


def test_compile_check_names_what_rules_a_candidate_out(monkeypatch):
    """Each reason the compile check gives, from the compiler's reports of the candidate's
    launches: a compile error, a spill, shared memory over the limit."""
    from sba_kernels.triton_aot import CompileReport, SM_LIMITS

    part, q, k, v, _ = _inputs(40, 11, 0, seed=8)
    blk = triton_backend.one_tile_blocks(part.index.shape[1], 16, torch.float32)
    run = functools.partial(triton_backend._forward_one_tile, blk, q.float(), k.float(), v.float(), part.index,
                            part.lengths, None, 0.25, False, None, False)
    limit = SM_LIMITS[90]["shared_per_program"]
    for fields, why in [
        (dict(ok=False, error="CompilationError: at 3:4\nmore"), "attention_fwd_one_tile does not compile: CompilationError: at 3:4"),
        (dict(spill_stores=24, spill_loads=24), "attention_fwd_one_tile spills 24 bytes"),
        (dict(shared_bytes=limit + 1), f"attention_fwd_one_tile needs {limit + 1} bytes of shared memory"),
        (dict(shared_bytes=limit), None),
    ]:
        report = CompileReport(**{"kernel": "attention_fwd_one_tile", "config": "", "arch": 90, "ok": True, **fields})
        monkeypatch.setattr(triton_tuning, "_compiled", lambda launch, arch: report)
        assert triton_tuning.compile_check(run, {"num_warps": 4}, 90) == why


def test_candidate_lists():
    tiled = triton_tuning.candidates("forward tiled", 100)
    assert {(c["m"], c["n"]) for c in tiled} == {(32, 32), (64, 32), (64, 64), (128, 32), (128, 64)}
    narrow = triton_tuning.candidates("backward tiled", 20)
    assert {(c["m"], c["n"]) for c in narrow} == {(16, 16), (32, 32)}        # never wider than 32 rows
    assert len(narrow) == len({tuple(sorted(c.items())) for c in narrow}) == 8
    one = triton_tuning.candidates("backward one tile", 64)
    assert {(c["num_warps"], c["maxnreg"]) for c in one} == {(w, r) for w in (2, 4, 8) for r in (255, 168)}


def _recorded_options(fn, *args) -> list[tuple]:
    """(kernel, BLOCK or BLOCK_M, num_warps, num_stages, maxnreg) of each launch ``fn(*args)``
    makes, recorded rather than run."""
    from sba_kernels import triton_aot

    with triton_aot.recording() as launches:
        fn(*args)
    return [(kernel.fn.__name__, meta.get("BLOCK", meta.get("BLOCK_M")), meta["num_warps"], meta["num_stages"],
             meta["maxnreg"]) for kernel, _grid, _args, meta in launches if "delta" not in kernel.fn.__name__]


def test_defaults_are_the_timed_choice_then_the_pick_then_the_blocks(monkeypatch):
    """`triton_backend.default_choice` in the launches: a pick of `triton_picks` replaces the
    blocks for its key only (dtype, tile bucket, bias, bias gradient, kernel form); tiled
    launches from 128 rows up share the 128-row pick. (Timed choices over picks: below.)"""
    from sba_kernels import triton_picks

    fp16, H, d = torch.float16, 2, 16
    q = torch.zeros(1, 2000, H, d, dtype=fp16)
    bias = torch.zeros(1, 32, 32, dtype=fp16)

    def one_subgraph(m):
        return torch.arange(m, dtype=torch.int32).view(1, m), torch.tensor([m], dtype=torch.int32)

    def forward(m, bias=None):
        return _recorded_options(triton_backend.attention_forward, q, q, q, *one_subgraph(m), bias, 0.25, False)

    def backward(m, bias=None, grad=False):
        return _recorded_options(triton_backend.attention_backward, q, q, q, q, q, q[0, :, :, 0].T[None].float(),
                                 *one_subgraph(m), bias, 0.25, grad)

    key = triton_tuning.pick_key
    picks = {
        key("forward one tile", 32, q, None, False): dict(num_warps=8, maxnreg=168),
        key("forward one tile", 32, q, bias, False): dict(num_warps=2, maxnreg=255),
        key("forward one tile, bias loop", 32, q, bias, False): dict(num_warps=8, maxnreg=255),
        key("backward one tile", 32, q, bias, True): dict(num_warps=2, maxnreg=168),
        key("forward tiled", 1000, q, None, False): dict(m=128, n=32, num_warps=8, num_stages=1),
    }
    monkeypatch.setattr(triton_picks, "PICKS", {})
    before = forward(32), backward(32, bias, True), forward(1000), forward(16)
    monkeypatch.setattr(triton_picks, "PICKS", picks)
    assert forward(32) == forward(17) == [("attention_fwd_one_tile", 32, 8, 1, 168)]    # one bucket
    assert forward(32, bias) == [("attention_fwd_one_tile", 32, 2, 1, 255)]
    assert backward(32) == [("attention_bwd_one_tile", 32, 4, 1, 255)]   # no pick for it: the blocks
    assert backward(32, bias, True) == [("attention_bwd_one_tile", 32, 2, 1, 168)]
    assert backward(32, bias, False) == [("attention_bwd_one_tile", 32, 4, 1, 255)]
    assert forward(1000) == forward(200) == [("attention_fwd", 128, 8, 1, 255)]
    assert forward(100) == [("attention_fwd", 128, 8, 1, 255)]
    with triton_backend.bias_tuning(min_parts=1, min_pairs=1):      # no timing at this shape: the loop's pick
        assert forward(32, bias) == [("attention_fwd_one_tile", 32, 8, 1, 255)]
    assert forward(16) == before[3] == [("attention_fwd_one_tile", 16, 4, 1, 255)]    # another bucket
    bf16 = q.to(torch.bfloat16)                                                     # another dtype
    assert _recorded_options(triton_backend.attention_forward, bf16, bf16, bf16, *one_subgraph(32), None, 0.25,
                             False) == _without_picks(monkeypatch, triton_backend.attention_forward, bf16, bf16, bf16,
                                                      *one_subgraph(32), None, 0.25, False)
    monkeypatch.setattr(triton_picks, "PICKS", {})
    assert (forward(32), backward(32, bias, True), forward(1000), forward(16)) == before
    assert before[:3] == ([("attention_fwd_one_tile", 32, 4, 1, 255)], [("attention_bwd_one_tile", 32, 4, 1, 255)],
                          [("attention_fwd", 64, 8, 2, 255)])


def _without_picks(monkeypatch, fn, *args) -> list[tuple]:
    from sba_kernels import triton_picks

    with monkeypatch.context() as patch:
        patch.setattr(triton_picks, "PICKS", {})
        return _recorded_options(fn, *args)


def test_timed_choices_stand_only_where_they_were_timed(monkeypatch):
    """The H200-timed options (`triton_backend.TIMED_SHAPE`: bf16 and fp16, head dim 64, 64-row
    tiles) beat the pick there, and only there."""
    from sba_kernels import triton_picks

    H = 8
    odd = dict(num_warps=2, maxnreg=168)          # a pick no timing chose
    for dtype, d, m in ((torch.bfloat16, 64, 64), (torch.float16, 64, 64), (torch.bfloat16, 32, 64),
                        (torch.float16, 64, 32), (torch.float32, 64, 16)):
        index, lengths = torch.arange(m, dtype=torch.int32).view(1, m), torch.tensor([m], dtype=torch.int32)
        q = torch.zeros(1, m, H, d, dtype=dtype)
        bias = torch.zeros(1, m, m, dtype=dtype)
        timed = (d, m) == (64, 64)
        keys = [triton_tuning.pick_key("forward one tile, bias loop", m, q, bias, False),
                triton_tuning.pick_key("backward one tile", m, q, bias, True)]
        monkeypatch.setattr(triton_picks, "PICKS", dict.fromkeys(keys, odd))
        with triton_backend.bias_tuning(min_parts=1, min_pairs=1):
            (fwd,) = _recorded_options(triton_backend.attention_forward, q, q, q, index, lengths, bias, 0.125, False)
        (bwd,) = _recorded_options(triton_backend.attention_backward, q, q, q, q, q, torch.zeros(1, H, m), index,
                                   lengths, bias, 0.125, True)
        want_fwd = triton_backend.BIAS_LOOP_FORWARD_OPTIONS if timed else odd
        want_bwd = triton_backend.BIAS_GRAD_OPTIONS_64_ROWS if timed else odd
        assert (fwd[2], fwd[4]) == (want_fwd["num_warps"], want_fwd["maxnreg"]), (dtype, d)
        assert (bwd[2], bwd[4]) == (want_bwd["num_warps"], want_bwd["maxnreg"]), (dtype, d)


@pytest.mark.parametrize("n", [0, 1, 2, 15, 16, 17, 33, 64, 65, 127, 128, 129, 1000, 4096, 4097, 10**6])
def test_launch_arithmetic_matches_tritons(n):
    """`tile_side` and `ceil_div`, the plain-integer stand-ins on the launch path."""
    import triton

    assert triton_tiles.tile_side(n) == max(16, triton.next_power_of_2(n))
    for b in (1, 16, 32, 64, 128):
        assert triton_tiles.ceil_div(n, b) == triton.cdiv(n, b)


def test_committed_picks_are_what_the_committed_reports_favour(monkeypatch):
    """`sba_kernels/triton_picks.py` against `bench/results/static/tuning/`: for every (dtype,
    head dim) it names a report for, the report exists, every launch the report covers has a
    pick, and the pick is a candidate of that launch and the one the report's table favours;
    a launch where the report found none usable has no pick (its blocks run)."""
    from sba_kernels import triton_picks

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import tuning_report

    names = {(str(dtype).removeprefix("torch."), tf32): name for name, (dtype, tf32) in tuning_report.DTYPES.items()}
    assert triton_picks.SOURCES, "no report has been turned into picks"
    covered = set()
    for (dtype, precision, head_dim), source in triton_picks.SOURCES.items():
        name = names[dtype, precision == "tf32" and dtype == "float32"]
        path = ROOT / source.split(" (")[0]
        assert path.name == f"{name}-d{head_dim}.md" and path.exists(), source
        favoured = {}
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 4 and cells[0].startswith("M="):
                favoured[cells[0]] = cells[2]
        with tuning_report.dot_precision(precision == "tf32"):
            launches = [(label, plan, plan.pick_key()) for label, plan in tuning_report.cases(getattr(torch, dtype),
                                                                                               head_dim)]
        assert set(favoured) == {label for label, _, _ in launches}, source
        for label, plan, pick_key in launches:
            assert pick_key[3:5] == (dtype, precision), (source, label)
            if favoured[label] == "none usable":
                assert pick_key not in triton_picks.PICKS, (source, label)
                continue
            assert pick_key in triton_picks.PICKS, (source, label)
            pick = triton_picks.PICKS[pick_key]
            assert pick in plan.candidates(), (source, label)
            assert tuning_report.describe(pick) == favoured[label], (source, label)
            covered.add(pick_key)
    assert covered == set(triton_picks.PICKS), "picks no report accounts for"


# The compile check, compiled for sm_90 ahead of time. In a child process without the
# interpreter: compiling needs real @triton.jit kernels. The bias-gradient backward at 64 rows
# with 2 warps capped at 168 registers spills on sm_90 (bench/results/static/tuning/bf16-d64.md);
# without the bias, 4 warps fit in 116-118 registers.
_COMPILE_CHECK = """
import functools, torch
from sba_kernels import triton_backend as tb, triton_tuning
B, N, H, d, M = 1, 64, 8, 64, 64
q = torch.zeros(B, N, H, d, dtype=torch.bfloat16)
index, lengths = torch.arange(M, dtype=torch.int32).view(1, M), torch.tensor([M], dtype=torch.int32)
bias = torch.zeros(1, M, M, dtype=torch.bfloat16)
lse = torch.zeros(B, H, N)
blk = tb.one_tile_blocks(M, d, q.dtype)
for need_dbias, warps in ((True, 2), (False, 4)):
    run = functools.partial(tb._backward_one_tile, blk, q, q, q, q, lse, index, lengths,
                            bias if need_dbias else None, 0.125, need_dbias, None, None)
    print(need_dbias, triton_tuning.compile_check(run, {"num_warps": warps, "maxnreg": 168}, 90))

from sba_kernels import triton_aot
def config_at(n, dtype=torch.bfloat16):      # the compile a launch at n nodes needs
    x = torch.zeros(B, n, H, d, dtype=dtype)
    with triton_aot.recording() as launches:
        tb._forward_one_tile(blk, x, x, x, index, lengths, None, 0.125, False, None, False)
    (kernel, _grid, args, meta), = launches
    return triton_aot.config_key(triton_aot.Launch.recorded(kernel, args, meta), 90)
print(config_at(64) == config_at(6400) == config_at(65), config_at(64) == config_at(64, torch.float16))
"""


@pytest.mark.slow
def test_compile_check_prunes_a_spill_for_sm_90():
    out = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=triton_aot.compiler_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with_grad, without, configs = out.stdout.strip().splitlines()
    assert with_grad.startswith("True attention_bwd_one_tile spills"), with_grad
    assert without == "False None"
    assert configs == "True False"        # sizes are do_not_specialize: one binary for any N; not any dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="tunes on a GPU: times and compiles for this device")
def test_tuning_on_the_gpu(monkeypatch):
    """On a real GPU: bf16 with a trainable shared bias, tuned forward and backward give the
    float64 reference's numbers, and each tuned key kept its fastest timed configuration. Three
    candidates per key, so that the check fits gpu_check's time limit (in the backward, 2 warps
    capped at 168 registers spill and are pruned)."""
    few = [dict(num_warps=8, maxnreg=255), dict(num_warps=2, maxnreg=168), dict(num_warps=4, maxnreg=168)]
    monkeypatch.setattr(triton_tuning, "candidates", lambda kind, max_len: few)
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
            assert not any(why and why.startswith(("failed", "compile check failed")) for _, _, why in rows), rows
            if key[0] == "backward one tile":      # summing the bias gradient: 2 warps at 168 spill kilobytes
                assert any(why for _, _, why in rows), "nothing pruned: the compile check did not run"
            timed = [(ms, choice) for choice, ms, _ in rows if ms is not None]
            assert timed[0][1] is None and kept[key] == min(timed, key=lambda t: t[0])[1]
    finally:
        triton_tuning.forget()


def test_recording_leaves_other_threads_launches_running():
    """While one thread records launches (as tuning does to compile-check a candidate), another
    thread's attention runs its kernels and returns the reference's numbers, and none of its
    launches lands in the recording."""
    import threading

    from sba_kernels import triton_aot

    part, q, k, v, _ = _inputs(60, 11, 0, seed=9)
    q, k, v = (t.float() for t in (q, k, v))
    result = {}
    with triton_aot.recording() as launches:
        other = threading.Thread(target=lambda: result.setdefault(
            "out", sk.intra_attention(q, k, v, part, backend="triton").detach()))
        other.start()
        other.join()
    assert launches == []
    assert rel_err(result["out"], dense_masked_attention(q.double(), k.double(), v.double(), part)) < 1e-5
