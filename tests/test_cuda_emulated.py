"""What only the CUDA emulation checks: races inside a block, the binding's own guards, and the
emulator itself.

The emulation build (tests/backend_setup.py) runs csrc/ kernels and bindings.cpp on CPU
threads; test_conformance.py runs the whole SPEC 5 suite on it like on every backend. This is
to the CUDA C++ what TRITON_INTERPRET=1 is to the Triton kernels. Outputs start as NaN (the
emulation build's allocation), so an element no kernel writes fails a check, and running the
threads of each block in two orders checks for races inside a block. What it cannot see (warps,
the memory model, races between blocks) is left to a GPU and compute-sanitizer.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

import sba_kernels as sk
from backend_setup import EMULATOR, WORK, emulated_cuda, emulation_sources
from helpers import random_partition


@pytest.fixture(scope="module")
def emulated():
    """The cuda backend running its emulation build on CPU tensors."""
    with emulated_cuda() as backend:
        yield backend


def _every_kernel(generator):
    """Outputs and gradients of one call of every kernel: intra attention with a per-head bias
    (forward, delta, dQ, dK/dV, dBias), the pooled op and inter attention (segment mean)."""
    part = random_partition(70, max_size=9, giant=40, generator=generator)
    ins = [torch.randn(2, 70, 2, 16, generator=generator).requires_grad_() for _ in range(3)]
    bias = torch.randn(2, part.num_parts, part.max_size, part.max_size, generator=generator).requires_grad_()
    o, z = sk.intra_attention_pooled(*ins, part, bias=bias, scale=0.3, backend="cuda")
    g = sk.inter_attention(z, z, z, scale=0.3, backend="cuda")
    (o.square().sum() + g.sum()).backward()
    return [o, z, g] + [t.grad for t in ins + [bias]]


def test_kernels_are_race_free(emulated, monkeypatch):
    """The emulator's racecheck: threads of a block run in order, first to last or last to
    first, between barriers. A shared-memory race gives different bits under the two orders."""
    first = _every_kernel(torch.Generator().manual_seed(26))
    monkeypatch.setenv("SBA_EMU_SCHEDULE", "reverse")
    reversed_ = _every_kernel(torch.Generator().manual_seed(26))
    for i, (a, b) in enumerate(zip(first, reversed_)):
        assert torch.equal(a, b), f"result {i} depends on the order of the threads"


def test_binding_guards_callers_that_come_straight_to_cpp(emulated):
    part = random_partition(10, max_size=4, generator=torch.Generator().manual_seed(25))
    q = torch.randn(1, 10, 1, 16)
    with pytest.raises(RuntimeError, match="index must be a contiguous"):
        emulated._ext().attention_forward(q, q, q, part.index.long(), part.lengths, None, 0.1)
    bias = torch.zeros(1, part.num_parts, part.max_size, part.max_size, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32"):
        emulated._ext().attention_forward(q, q, q, part.index, part.lengths, bias, 0.1)


# ----------------------------------------------------------------------------- the emulator itself
@pytest.fixture(scope="module")
def planted():
    """tests/cuda_emulator/planted_faults.cu built as a plain shared library (no torch)."""
    compiler = shutil.which("g++")
    assert compiler, "g++ is needed to build the CUDA emulation"
    src = emulation_sources(EMULATOR / "planted", WORK / "planted")
    lib = WORK / "planted" / "libplanted.so"
    cmd = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", f"-I{EMULATOR}", "-DSBA_CPU_EMULATION",
           *map(str, src), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    dll = ctypes.CDLL(str(lib))
    dll.run_case.restype = ctypes.c_char_p
    return dll


@pytest.mark.parametrize("case, message", [
    ("clean", "ok"),
    ("shared_overflow", "a write past the end of the block's dynamic shared memory"),
    ("divergent_barrier", "__syncthreads reached after another thread of the block returned"),
    ("too_much_shared", "dynamic shared memory over the kernel's limit"),
    ("too_many_threads", "invalid launch configuration"),
    ("uninitialized_shared", "nan"),
    ("race", "schedules disagree"),
])
def test_emulator_reports_planted_faults(planted, case, message):
    assert message in planted.run_case(case.encode()).decode()
