"""The byte counter (`bench/byte_account.py`) against hand-counted bytes.

Runs Triton kernels in the interpreter (conftest sets ``TRITON_INTERPRET=1``); on a GPU machine
nothing here applies, the counter needs the interpreter.
"""

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

from byte_account import ByteCounter  # noqa: E402


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
