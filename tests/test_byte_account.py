"""The byte account (`bench/byte_account.py`, `bench/byte_report.py`): the interpreter's counter
against hand-counted bytes, and the per-size extrapolation against whole problems counted directly.

Runs Triton kernels in the interpreter (conftest sets ``TRITON_INTERPRET=1``); on a GPU machine
nothing here applies, the counter needs the interpreter.
"""

import csv
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter
from triton.tools.tensor_descriptor import TensorDescriptor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

if not triton.knobs.runtime.interpret:
    pytest.skip("the byte counter needs Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

import byte_report  # noqa: E402
from byte_account import ByteCounter, by_kernel  # noqa: E402
from byte_report import Problem, count_passes, extrapolate, floors, full_programs, partition_of  # noqa: E402


@triton.jit
def _masked_copy(Src, Dst, Flag, Count, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One [BLOCK_R, BLOCK_C] tile of an fp16 [R, C] matrix into an fp32 one, masked to the matrix;
    one unmasked scalar load; one masked atomic add per row of the tile."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    tile = tl.load(Src + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
    scale = tl.load(Flag)
    tl.store(Dst + rows[:, None] * C + cols[None, :], tile.to(tl.float32) * scale, mask=mask)
    tl.atomic_add(Count + rows * 0, 1, mask=rows < R)


@triton.jit
def _descriptor_copy(src_desc, Dst, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A host tensor descriptor's tile into a device-made descriptor's: the tail tile hangs off."""
    start = tl.program_id(0) * BLOCK_R
    dst = tl.make_tensor_descriptor(Dst, shape=[R, C], strides=[C, 1], block_shape=[BLOCK_R, BLOCK_C])
    dst.store([start, 0], src_desc.load([start, 0]))


def test_counter_matches_hand_count_of_masked_loads_stores_and_atomics():
    R, C = 37, 20                       # 3 tiles of 16 x 32: the last 11 rows and 12 columns masked off
    src = torch.randn(R, C, dtype=torch.float16)
    dst = torch.zeros(R, C)
    flag = torch.ones(1)
    count = torch.zeros(1, dtype=torch.int32)
    with ByteCounter() as counted:
        _masked_copy[(3,)](src, dst, flag, count, R, C, BLOCK_R=16, BLOCK_C=32)
    (launch,) = counted.launches
    assert launch.kernel == "_masked_copy" and launch.programs == 3
    assert torch.equal(dst, src.float()) and int(count) == R
    assert launch.read == Counter(Src=R * C * 2, Flag=3 * 4, Count=R * 4)      # an atomic reads and writes
    assert launch.written == Counter(Dst=R * C * 4, Count=R * 4)


def test_counter_counts_only_the_in_bounds_part_of_descriptor_tiles():
    R, C = 20, 16
    src = torch.randn(R, C, dtype=torch.float16)
    dst = torch.zeros_like(src)
    with ByteCounter() as counted:
        _descriptor_copy[(2,)](TensorDescriptor.from_tensor(src, [16, 16]), dst, R, C, BLOCK_R=16, BLOCK_C=16)
    assert torch.equal(dst, src)
    assert counted.launches[0].read == Counter(src_desc=R * C * 2)
    assert counted.launches[0].written == Counter(Dst=R * C * 2)


def test_counter_restores_the_interpreter_and_records_grids_without_running():
    src, dst = torch.randn(4, 4, dtype=torch.float16), torch.zeros(4, 4)
    with ByteCounter(run=False) as counted:
        _masked_copy[(5,)](src, dst, torch.ones(1), torch.zeros(1, dtype=torch.int32), 4, 4, BLOCK_R=16, BLOCK_C=16)
    assert counted.launches[0].programs == 5 and not counted.launches[0].read and not dst.any()
    assert not any(name in vars(interpreter.interpreter_builder) for name in ByteCounter.HOOKS)
    with ByteCounter() as counted:     # a second counter installs its hooks again: the first left none behind
        _masked_copy[(1,)](src, dst, torch.ones(1), torch.zeros(1, dtype=torch.int32), 4, 4, BLOCK_R=16, BLOCK_C=16)
    assert counted.launches[0].written == Counter(Dst=64, Count=16)


@pytest.mark.parametrize("bias", ["none", "per-head"])
def test_one_subgraph_forward_reads_q_k_v_and_writes_o_lse_once_and_the_floor_is_the_tensors(bias):
    n, problem = 23, Problem(batch=2, heads=3, head_dim=16, dtype=torch.float16, bias=bias)
    (launch,), _ = count_passes(partition_of([n], n, True), problem, pool=False, need_dbias=False, backward=False)
    rows = problem.batch * problem.heads * n * problem.head_dim * 2           # bytes of q (or k, v, o)
    assert all(launch.read[name] >= rows for name in "QKV")      # every row of q, k, v at least once
    assert launch.written == Counter(O=rows, LSE=problem.batch * problem.heads * n * 4)
    # With n = M the bias has no padding: the floor is exactly the tensors read and written.
    lse, bias_bytes = problem.batch * problem.heads * n * 4, problem.bias_heads * n * n * 2
    assert floors({n: 1}, problem, pool=False, need_dbias=False)[0] == 4 * rows + lse + bias_bytes
    assert launch.read["Bias"] >= bias_bytes


# Every kernel path of the backend, on a ragged partition with a singleton, tiles split in two
# (65 > the forward's 64-row tiles; > the backward's 32), and fp32 (16-row tiles, many per subgraph).
CASES = [
    (torch.float16, "none", False, False, True),
    (torch.float16, "shared", True, True, True),
    (torch.float16, "per-head", False, True, True),
    (torch.float16, "per-head", True, False, True),
    (torch.float16, "none", True, False, False),
    (torch.float16, "shared", False, False, False),
    (torch.float32, "per-head", True, True, True),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype, bias, pool, need_dbias, contiguous", CASES)
def test_extrapolation_from_one_subgraph_per_size_equals_the_whole_problem(dtype, bias, pool, need_dbias, contiguous):
    lengths = [65, 1, 33, 7, 33]
    problem = Problem(batch=2, heads=2, head_dim=16, dtype=dtype, bias=bias, contiguous=contiguous)
    whole = partition_of(lengths, max(lengths), contiguous)
    fwd, bwd = count_passes(whole, problem, pool=pool, need_dbias=need_dbias)
    histogram = dict(Counter(lengths))
    fwd_x, bwd_x = extrapolate(histogram, problem, pool=pool, need_dbias=need_dbias)
    for direct, extrapolated in ((by_kernel(fwd), fwd_x), (by_kernel(bwd), bwd_x)):
        assert list(direct) == list(extrapolated)
        for kernel, launch in direct.items():
            assert launch.read == extrapolated[kernel].read, kernel
            assert launch.written == extrapolated[kernel].written, kernel
    # The program counts of a dry run at full size are those of the run.
    fwd_p, bwd_p = full_programs(histogram, problem, pool=pool, need_dbias=need_dbias)
    assert fwd_p == {k: launch.programs for k, launch in by_kernel(fwd).items()}
    assert bwd_p == {k: launch.programs for k, launch in by_kernel(bwd).items()}


def test_report_writes_bytes_md_and_csv_from_a_synthetic_histogram(tmp_path):
    byte_report.main(["--n", "130", "--lengths-from", "uniform:64", "--heads", "1", "--head-dim", "16",
                      "--bias", "none", "shared", "--out", str(tmp_path)])
    md = (tmp_path / "bytes.md").read_text()
    assert "counted, not timed" in md and "N = 130" in md and "64 x 2" in md and "2 x 1" in md
    assert md.count("forward <= 1.15x") == 1 and "| shared |" in md
    with open(tmp_path / "bytes.csv", newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    assert header[:8] == ["bias", "pass", "launch", "programs", "bytes_read", "bytes_written", "pass_floor", "ratio"]
    for (bias, name) in {(r["bias"], r["pass"]) for r in rows}:
        group = [r for r in rows if (r["bias"], r["pass"]) == (bias, name)]
        total = group[-1]
        assert total["launch"] == "total"
        for column in ("bytes_read", "bytes_written", "programs"):
            assert sum(int(r[column]) for r in group[:-1]) == int(total[column])
