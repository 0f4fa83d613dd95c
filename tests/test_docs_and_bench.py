"""The README's code runs as written, CI runs the README's test command, and the main job
(bench/scaling.py) writes its files with slopes that follow the math."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("block", re.findall(r"```python\n(.*?)```", README, flags=re.S))
def test_readme_python_blocks_run(block, monkeypatch):
    monkeypatch.chdir(ROOT)
    exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert any("bench/scaling.py" in c for c in commands)


def test_scaling_script_writes_files_and_slopes_follow_the_math(tmp_path):
    """One sweep on one thread, the slopes fitted on each point's process CPU time: a shared
    2-core CI machine can stretch a whole child process's wall time (seen: 47 ms for a 25 ms
    point), and the fit uses the upper half of the sizes, so one such point would tilt it. On
    one thread the CPU time is the work alone, with no other thread to spin-wait on."""
    sys.path.insert(0, str(ROOT / "bench"))
    from scaling import fit_slopes

    out = tmp_path / "scaling"
    cmd = [sys.executable, str(ROOT / "bench" / "scaling.py"), "--device", "cpu", "--n", "512", "1024", "2048",
           "4096", "--methods", "intra[torch]", "sdpa_full", "sdpa_dense_mask", "--no-backward",
           "--budget", "0.15", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    for name in ("scaling.csv", "scaling.json", "time.png", "memory.png"):
        assert (out / name).stat().st_size > 0
    doc = json.loads((out / "scaling.json").read_text())
    assert doc["environment"]["torch"] and doc["config"]["device"] == "cpu"
    assert set(doc["slopes"]) == {"intra[torch]", "sdpa_full", "sdpa_dense_mask"}
    slopes = fit_slopes(doc["points"])
    assert slopes == doc["slopes"]
    assert slopes["intra[torch]"]["fwd_cpu_ms"] < 1.4             # linear in N
    assert slopes["intra[torch]"]["fwd_peak_bytes"] < 1.3
    assert slopes["sdpa_full"]["fwd_cpu_ms"] > 1.6                # quadratic in N
    assert slopes["sdpa_dense_mask"]["fwd_peak_bytes"] > 1.6      # the N x N mask and scores


@pytest.mark.parametrize("name", ["sdpa_dense_mask", "sdpa_padded", "sdpa_nested"])
def test_benchmark_peers_do_the_same_work(name):
    """The block-diagonal peers `scaling.py` times against SBA compute its intra attention:
    outputs and gradients of q, k, v equal the dense masked reference's (float64, a ragged
    partition of a random node order)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch

    import methods
    from helpers import dense_masked_attention, random_partition

    g = torch.Generator().manual_seed(41)
    part = random_partition(120, max_size=11, generator=g)
    q, k, v = (torch.randn(2, 120, 3, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = methods.registry("cpu")[name](q, k, v, part)(q, k, v)
    expected = dense_masked_attention(q, k, v, part)
    grad = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for ours, ref in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_scaling_cuda_graph_needs_a_gpu(capsys):
    """``--cuda-graph`` times replays of captured CUDA graphs (`measure.cuda_graph_replay`; run on
    a GPU by `tests/test_cuda_graph.py` and gpu_check's ``graph`` stage): asked for on the CPU it is
    refused by name, before any point runs."""
    sys.path.insert(0, str(ROOT / "bench"))
    from scaling import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--cuda-graph", "--n", "512"])
    assert "--cuda-graph: CUDA graphs need --device cuda" in capsys.readouterr().err
    assert parse_args(["--device", "cpu", "--n", "512"]).cuda_graph is False


def test_gpu_check_starts_no_stage_past_its_deadline(tmp_path):
    """A lease is one ~9.5-minute call: `gpu_check.sh` must not start a stage that cannot finish
    before DEADLINE_S (the device tool would kill the call and its logs with it). Here every
    ``python3`` is a stand-in that takes 3 s (a carried wheel's install none): device.txt ends at
    3 s, the first stage starts with 50 - 3 - 15 = 32 s left (45 needed: it runs; bash's SECONDS
    may read a second high), the second at 6 s or later with 29 s at most (not started)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/bin/sh\ncase "$*" in *"-m pip"*) exit 0 ;; esac\nsleep 3\n')
    (bin_dir / "python3").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path / "out"), "DEADLINE_S": "50", "HOME": str(tmp_path)}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "build", "profile"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert "[build] exit 0" in run.stdout, run.stdout
    assert re.search(r"\[profile\] not started: \d+ s left of DEADLINE_S=50, under the 45", run.stdout), run.stdout
    assert run.returncode == 1


def test_bench_scripts_refuse_bad_arguments_by_name(capsys):
    """scaling.py dropped a misspelt --methods name without a word (an empty sweep replaced the
    results), read 0 as "the default" and divided by a 0 subgraph size; host_time.py printed
    "-0" microseconds for --calls -2."""
    sys.path.insert(0, str(ROOT / "bench"))
    import host_time
    from scaling import parse_args

    for argv, says in ((["--methods", "intra[torch]", "bogus"], "--methods: ['bogus'] not among the methods on cpu"),
                       (["--heads", "0"], "must be > 0: --heads 0"),
                       (["--subgraph-size", "0", "--budget", "-1"], "must be > 0: --subgraph-size 0, --budget -1.0")):
        with pytest.raises(SystemExit):
            parse_args(["--device", "cpu", "--n", "512", *argv])
        assert says in capsys.readouterr().err
    # A registered backend that is never timed on the CPU (triton): left out with a note, not refused.
    assert parse_args(["--device", "cpu", "--n", "512", "--methods", "intra[torch]", "intra[triton]"]).methods
    assert "left out, their backends do not run here: ['intra[triton]']" in capsys.readouterr().out
    for argv in (["--calls", "0"], ["--calls", "-2"], ["--n", "1"]):
        with pytest.raises(SystemExit):
            host_time.main(argv)
        assert "--n must be >= 130 and --calls >= 1" in capsys.readouterr().err
    import byte_report
    import from_graph
    import tile_report

    for main, argv, says in (
            (byte_report.main, ["--n", "0"], "--n, --batch, --heads, --head-dim and --knn must be >= 1"),
            (byte_report.main, ["--n", "200", "--lengths-from", "uniform:0"], "with 1 <= S <= --n = 200"),
            (byte_report.main, ["--n", "200", "--lengths-from", "uniform:500"], "with 1 <= S <= --n = 200"),
            (byte_report.main, ["--n", "200", "--lengths-from", "bogus"], "--lengths-from takes uniform:S"),
            (tile_report.main, ["--targets", "0"], "--targets, --head-dim and --k must be >= 1"),
            (tile_report.main, ["--n", "4"], "every --n above --k and the largest target"),
            (from_graph.main, ["--n", "1"], "--n must exceed --k >= 1"),
            (from_graph.main, ["--n", "100", "--pe-dim", "-1"], "--pe-dim must be >= 0")):
        with pytest.raises(SystemExit):
            main(argv)
        assert says in capsys.readouterr().err, (argv, says)


def test_seed_summary_means_and_spreads(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from seed_summary import main

    head = "| model | 15min MAE | avg MAE | avg RMSE | epochs |\n| --- | --- | --- | --- | --- |\n"
    (tmp_path / "a.md").write_text("# t\n\n" + head + "| sba | 1 | **4.0** | 7.0 | 3 |\n| gru | 1 | 4.5 | 8.0 | 3 |\n")
    (tmp_path / "b.md").write_text(head + "| sba | 1 | 4.2 | 7.4 | 3 |\n")
    out = tmp_path / "seeds.md"
    assert main([str(tmp_path / "a.md"), str(tmp_path / "b.md"), "--out", str(out)]) == 0
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert "| 2 | 4.100 ± 0.141 | 7.200 ± 0.283 | 4.000, 4.200 |" in rows["sba"]
    assert "4.500 (one seed)" in rows["gru"] and "4.500, –" in rows["gru"]
    (tmp_path / "c.md").write_text("| model | MAE |\n| --- | --- |\n| sba | 1 |\n")
    with pytest.raises(ValueError, match="no column 'avg MAE'"):
        main([str(tmp_path / "c.md")])
    (tmp_path / "d.md").write_text(head + "| sba | 1 | **4.1 ± 0.1** | 7.2 ± 0.3 | 3, 3 |\n")
    with pytest.raises(ValueError, match="sba holds a mean over several seeds"):
        main([str(tmp_path / "d.md")])


def test_large_graph_bench_trains_and_writes_the_table(tmp_path):
    """SBA alone (every process imports torch: seconds each); full attention's attempts below."""
    out = tmp_path / "large.md"
    cmd = [sys.executable, str(ROOT / "bench" / "large_graph.py"), "--n", "100", "--steps", "160", "--epochs", "1",
           "--batch-size", "32", "--full-attention-n", "--dim", "16", "--heads", "2", "--threads", "1",
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| sba |"))
    assert "| 100 | 4, 1 | ok |" in row and float(row.split("|")[5]) > 0 and float(row.split("|")[8]) > 0.1  # s, GiB
    assert "python bench/large_graph.py --n 100 --steps 160" in text and "Commit " in text and "torch " in text
    assert "full_attention" not in text


def test_large_graph_bench_records_timeouts_and_out_of_memory(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from large_graph import failure_status

    out = tmp_path / "large.md"
    cmd = [sys.executable, str(ROOT / "bench" / "large_graph.py"), "--n", "200", "--steps", "160",
           "--full-attention-n", "100", "50", "--timeout", "0.5", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    text = out.read_text()
    assert text.count("| timeout: over 0.5 s |") == 3 and "Full attention ran at none of the N tried." in text
    killed = subprocess.CompletedProcess([], -9, "", "")
    allocator = subprocess.CompletedProcess([], 1, "", "RuntimeError: DefaultCPUAllocator: not enough memory")
    assert failure_status(killed) == "oom (killed by signal 9)" and failure_status(allocator) == "oom"
    assert failure_status(subprocess.CompletedProcess([], 1, "", "ValueError: parts")) == "error: ValueError: parts"
    assert failure_status(subprocess.CompletedProcess([], -11, "", "")) == "crashed (signal 11)"     # a segfault is no OOM


def test_tile_report_counts_programs_from_the_launch_grid():
    """Subgraphs of 65, 64, 1 and 130 nodes (M = 130): fp16 forward tiles of 128 rows (the compile
    rule's pick at d = 64, `sba_kernels/triton_picks.py`), so two per subgraph, of which
    1 + 1 + 1 + 2 start inside their subgraph; backward tiles of 32 rows."""
    sys.path.insert(0, str(ROOT / "bench"))
    from tile_report import launch_tiles, record_launches
    from sba_kernels import Partition

    sizes = [65, 64, 1, 130]
    partition = Partition.from_assignment([p for p, s in enumerate(sizes) for _ in range(s)])
    lengths = partition.lengths.numpy().astype("int64")
    got = {k: launch_tiles(k, grid, args, lengths) for k, grid, args in record_launches(partition, 64)}
    fwd, dq, dbias = got["attention_fwd"], got["attention_bwd_dq"], got["attention_bwd_dbias"]
    assert (fwd.tile, fwd.per_subgraph, fwd.programs, fwd.with_work) == ("128 rows", 2, 8, 5)
    assert fwd.filled == 260 / (8 * 128)
    assert (dq.tile, dq.per_subgraph, dq.with_work) == ("32 rows", 5, 3 + 2 + 1 + 5)
    assert got["attention_bwd_dkdv"].with_work == dq.with_work
    assert (dbias.per_subgraph, dbias.with_work) == (25, 9 + 4 + 1 + 25)
    assert got["attention_bwd_delta"].with_work == got["attention_bwd_delta"].programs == 5      # 260 rows / 64


def test_tile_report_counts_one_tile_programs():
    """Subgraphs of 64, 40 and 1 nodes (M = 64, fp16, head dim 64): one program per subgraph,
    forward and backward, each with work; 105 of 3 x 64 tile rows hold a node."""
    sys.path.insert(0, str(ROOT / "bench"))
    from tile_report import launch_tiles, record_launches
    from sba_kernels import Partition

    sizes = [64, 40, 1]
    partition = Partition.from_assignment([p for p, s in enumerate(sizes) for _ in range(s)])
    lengths = partition.lengths.numpy().astype("int64")
    got = {k: launch_tiles(k, grid, args, lengths) for k, grid, args in record_launches(partition, 64)}
    assert set(got) == {"attention_fwd_one_tile", "attention_bwd_one_tile"}
    for launch in got.values():
        assert (launch.tile, launch.per_subgraph, launch.programs, launch.with_work) == ("64 rows", 1, 3, 3)
        assert launch.filled == 105 / (3 * 64)


def test_tile_report_writes_the_table(tmp_path):
    out = tmp_path / "tiles.md"
    cmd = [sys.executable, str(ROOT / "bench" / "tile_report.py"), "--n", "3000", "--targets", "32", "64",
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    text = out.read_text()
    assert "python bench/tile_report.py --n 3000 --targets 32 64" in text and "commit " in text
    sizes = {line.split("|")[2].strip(): line.split("|") for line in text.split("## Programs")[0].splitlines()
             if line.startswith("| 3,000 |")}
    launches = {line.split("|")[2].strip(): line.split("|") for line in text.split("## Programs")[1].splitlines()
                if line.startswith("| 3,000 |")}
    assert set(sizes) == set(launches) == {"ceil(N / 32) parts", "max_size = 32", "ceil(N / 64) parts",
                                           "max_size = 64"}
    for target in (32, 64):
        largest = int(sizes[f"max_size = {target}"][5].split("/")[2])
        assert largest <= target
        # capped: every subgraph in one tile, one program each, forward and backward
        assert launches[f"max_size = {target}"][3].strip().startswith(f"one-tile forward: 1 x {target} rows: 100.0 /")
        assert launches[f"max_size = {target}"][4].strip().startswith(f"one-tile backward: 1 x {target} rows: 100.0 /")
        # plain: the largest subgraph sets the tile, one-tile kernels while it fits 64 rows (the cap at d = 64)
        plain_largest = int(sizes[f"ceil(N / {target}) parts"][5].split("/")[2])
        forward = launches[f"ceil(N / {target}) parts"][3].strip()
        if plain_largest <= 64:
            tile = 32 if plain_largest <= 32 else 64
            assert forward.startswith(f"one-tile forward: 1 x {tile} rows: 100.0 /")
        else:
            # past 64 rows the tiled forward, with the compile rule's 128-row tiles (triton_picks)
            assert forward.startswith(f"tiled forward: {-(-plain_largest // 128)} x 128 rows")


def test_reversed_runs_keep_the_work_and_drop_the_runs():
    """`intra_gathered[triton]` times the gather path on the contiguous layout's own work: the
    same subgraphs, each listed backwards, give the same attention output."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    import sba_kernels as sk
    from methods import reversed_runs
    from workload import build_runs_layout

    runs, _ = build_runs_layout(150, 16)
    assert runs.starts is not None
    backwards = reversed_runs(runs)
    assert backwards.starts is None and backwards.num_nodes == runs.num_nodes
    assert [list(reversed(p)) for p in runs.parts()] == backwards.parts()
    q, k, v = torch.randn(3, 1, 150, 2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(sk.intra_attention(q, k, v, runs, backend="torch"),
                          sk.intra_attention(q, k, v, backwards, backend="torch"), rtol=1e-12, atol=1e-12)


def test_flex_document_block_mask_from_block_ranges():
    """The benchmark's FlexAttention mask, built from block ranges in O(N / block), covers the
    same blocks as `create_block_mask` evaluating every pair, and a partition whose subgraphs
    are not contiguous falls back to the latter (None here)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    from methods import _document_block_mask
    from sba_kernels import Partition

    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 70, (40,), generator=g)
    doc = torch.repeat_interleave(torch.arange(40), sizes)
    n = doc.numel()
    for block in (16, 128):
        ours = _document_block_mask(Partition.from_assignment(doc), n, block)
        ref = create_block_mask(lambda b, h, q, k: doc[q] == doc[k], None, None, n, n, device="cpu", BLOCK_SIZE=block)
        assert torch.equal(ours.to_dense(), ref.to_dense())
    assert _document_block_mask(Partition.from_assignment(torch.tensor([0, 1, 0, 2])), 4, 16) is None


@pytest.mark.parametrize("n,size", [(1000, 64), (64, 64), (300_000, 64), (250_000, 100)])
def test_runs_layout_is_consecutive_runs_with_nested_levels(n, size):
    """`--layout runs`: node p*size + j is row j of subgraph p, every subgraph but the last is
    full, and above the inter threshold each token level groups 64 consecutive tokens."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from workload import build_runs_layout

    partition, levels = build_runs_layout(n, size)
    parts = -(-n // size)
    assert partition.num_parts == parts and partition.num_nodes == n
    assert partition.lengths[:-1].eq(size).all() and int(partition.lengths[-1]) == n - (parts - 1) * size
    assert torch.equal(partition.assignment, torch.arange(n) // size)
    tokens = parts
    for level in levels:
        assert torch.equal(level.assignment, torch.arange(tokens) // 64)
        tokens = level.num_parts
    assert tokens <= 2048 and (len(levels) > 0) == (parts > 2048)


def test_tuning_report_applies_the_written_rule(monkeypatch):
    """`bench/tuning_report.py`'s pick, on made-up compile reports: a configuration that spills,
    overflows shared memory or draws a performance-loss line is out; then the widest query
    tile, the most warps per SM on sm_90, the most programs, the blocks before the picks, the
    first."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import tuning_report
    from sba_kernels.triton_aot import SM_LIMITS, CompileReport

    def config(rows, programs, warps, **bad):
        reports = [CompileReport(**{"kernel": "attention_fwd", "config": "", "arch": arch, "ok": True,
                                    "meta": {"BLOCK_M": rows}, "programs_per_sm": programs, "threads": 32 * warps,
                                    **(bad if arch == 90 else {})}) for arch in (90, 80)]
        return tuning_report.facts(reports)

    pick = lambda *rows: tuning_report.favoured(list(enumerate(rows)))   # noqa: E731
    assert pick(config(32, 4, 4), config(64, 2, 4)) == 1                              # wider tile first
    assert pick(config(64, 2, 4), config(64, 2, 8)) == 1                              # then warps per SM
    assert pick(config(64, 4, 4), config(64, 2, 8)) == 0                              # 16 vs 16: more programs
    assert pick(config(64, 2, 8), config(64, 2, 8)) == 0                              # a tie: the first
    tie = [config(64, 2, 8), config(64, 2, 8), config(64, 1, 8)]
    assert tuning_report.favoured(list(enumerate(tie)), before=1) == 1                # ... or the blocks before
    assert tuning_report.favoured(list(enumerate(tie)), before=2) == 0                # a tie only
    limit = SM_LIMITS[90]["shared_per_program"]
    for bad in (dict(spill_stores=8), dict(shared_bytes=limit + 1), dict(ptxas_warnings="Potential Performance Loss"),
                dict(ok=False, error="x")):
        assert pick(config(64, 2, 8, **bad), config(32, 1, 4)) == 1, bad
    assert pick(config(64, 2, 8, ok=False, error="x")) is None


def test_tuning_report_veto_takes_the_next_favoured(monkeypatch):
    """``--veto-python``: a favoured candidate another Triton cannot compile without a spill is
    ruled out with that Triton's name and the rule favours again (here twice, for one launch),
    until a pick compiles there; a launch whose pick compiles there keeps it."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import tuning_report
    from sba_kernels.triton_aot import CompileReport

    def good(rows):
        return tuning_report.facts([CompileReport("attention_fwd", "", arch, True, {"BLOCK_M": rows},
                                                  programs_per_sm=2, threads=128) for arch in (90, 80)])

    # launch A: candidates of 128, 64 and 32 rows; launch B: 64 and 32. The other Triton spills
    # on sm_80 for A's 128- and 64-row launches, and for nothing of B's.
    entries = [([("a128", good(128)), ("a64", good(64)), ("a32", good(32))], None, [["A128"], ["A64"], ["A32"]]),
               ([("b64", good(64)), ("b32", good(32))], None, [["B64"], ["B32"]])]
    spilling = {"A128", "A64"}
    rounds = []

    def compile_with(python, jobs, workers, cache=None):
        rounds.append(sorted({launch for launch, _ in jobs}))
        return "3.6.0", {(launch, arch): CompileReport("attention_fwd", launch, arch, True, {"BLOCK_M": 64},
                                                       spill_stores=32 if launch in spilling and arch == 80 else 0)
                         for launch, arch in jobs}

    monkeypatch.setattr(tuning_report, "compile_with", compile_with)
    assert tuning_report.veto(entries, "python3.6", 1, None) == ("3.6.0", 2)
    assert rounds == [["A128", "B64"], ["A64"], ["A32"]]
    assert [tuning_report.favoured(rows, before) for rows, before, _ in entries] == [2, 0]
    assert entries[0][0][0][1]["why"] == "triton 3.6.0: sm_80 spills 32 bytes (attention_fwd)"


def test_tuning_report_compiles_with_another_python(tmp_path):
    """`tuning_report.compile_with` runs the compile in a child Python from this checkout (here
    this very Python) and brings its Triton's version and reports back."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    import triton

    import tuning_report
    from sba_kernels import triton_aot, triton_backend

    index, lengths = torch.arange(8, dtype=torch.int32).view(1, 8), torch.tensor([8], dtype=torch.int32)
    with triton_aot.recording() as recorded:
        triton_backend.segment_mean_forward(torch.zeros(1, 8, 16), index, lengths)
    (kernel, _grid, args, meta), = recorded
    job = (triton_aot.Launch.recorded(kernel, args, meta), 90)
    version, reports = tuning_report.compile_with(sys.executable, [job], 1, tmp_path / "cache")
    assert version == triton.__version__ and reports[job].ok and reports[job].registers > 0, reports[job]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1


def test_pooled_options_times_the_fused_and_the_separate_backward(monkeypatch):
    """bench/pooled_options.py's two choices reach the op: the fused backward runs no
    segment-mean backward, the separate pass one per step, and both give the same gradients."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from pooled_options import CHOICES, time_choices
    from sba_kernels import custom_ops
    from workload import Config

    mean_backwards = []
    for name in ("_segment_mean_bwd", "segment_mean_bwd"):
        original = getattr(custom_ops, name)
        monkeypatch.setattr(custom_ops, name, lambda *a, _f=original, **kw: mean_backwards.append(1) or _f(*a, **kw))
    calls = []

    def bench(step):
        before = len(mean_backwards)
        step()
        calls.append((len(mean_backwards) - before, [t.grad.clone() for t in step.inputs]))
        return float(len(calls))                  # 1.0 then 2.0 "ms": the table's ratios follow

    cfg = Config(batch=2, heads=2, head_dim=16, subgraph_size=16, dtype="fp32", device="cpu", backward=True)
    rows, = time_choices(200, ["per_head"], cfg, bench)
    assert [r.split(" | ")[2] for r in rows] == list(CHOICES)
    assert rows[1].endswith("| 2.000 | 2.00 |")
    (fused_means, fused), (separate_means, separate) = calls
    assert fused_means == 0 and separate_means == 1
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_autotune_times_each_pass_with_defaults_then_tuned():
    """bench/autotune.py's point (a GPU stage; its workload and table run here on the CPU, where
    tuning keeps the defaults): each pass timed once with autotuning off, then once on, in the
    table's columns."""
    sys.path.insert(0, str(ROOT / "bench"))
    from autotune import time_point
    from sba_kernels import triton_tuning
    from workload import Config

    timed = []

    def bench(fn):
        fn()
        timed.append(triton_tuning.ENABLED)
        return 2.0 if triton_tuning.ENABLED else 3.0

    cfg = Config(batch=1, heads=2, head_dim=16, subgraph_size=16, dtype="fp32", device="cpu", backward=True)
    rows, trials = time_point(100, 16, "shared", cfg, bench)
    assert timed == [False, True, False, True]
    assert rows == ["| 100 | 16 | shared | forward | 3.000 | 2.000 | 1.50 |",
                    "| 100 | 16 | shared | forward+backward | 3.000 | 2.000 | 1.50 |"]
    assert trials == []                   # nothing is tuned off a GPU
