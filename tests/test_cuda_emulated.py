"""The cuda backend's C++ run on the CPU: csrc/ kernels and bindings.cpp, built against the
CUDA runtime stand-in in tests/cuda_emulator, behind the same Python glue and autograd as on a
GPU, checked against the float64 dense reference (SPEC section 5).

This is to the CUDA C++ what TRITON_INTERPRET=1 is to the Triton kernels: it executes every
line of the kernels (indexing, tiling, online softmax, masking, barriers, shared memory sizes)
without a GPU. Outputs start as NaN (the emulation build's allocation), so an element no
kernel writes fails the check, and running the threads of each block in two orders checks
for races inside a block. What it cannot see (warps, the memory model, races between blocks)
is left to the GPU test in test_cuda_backend.py and compute-sanitizer.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from sba_kernels import cuda_backend
from helpers import (compare_forward_backward, dense_attention, dense_masked_attention, loop_segment_mean,
                     random_partition, rel_err)

EMULATOR = Path(__file__).resolve().parent / "cuda_emulator"
WORK = Path(tempfile.gettempdir()) / "sba_cuda_emulated"
F64 = torch.float64
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# `kernel<T><<<grid, block, bytes, stream>>>(` -> `::sba_emu::Launch(grid, block, bytes, stream).run(kernel<T>, `
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[\w:]+>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def emulation_sources(src_dir: Path, dest: Path) -> list[Path]:
    """Copies of ``src_dir`` for the emulation build, .cu files as .cpp with launches rewritten.
    Files are rewritten only when their text changes, so torch reuses an earlier build."""
    dest.mkdir(parents=True, exist_ok=True)
    sources = []
    for src in sorted(src_dir.iterdir()):
        text = src.read_text()
        out = dest / src.name
        if src.suffix == ".cu":
            text, launches = LAUNCH.subn(r"::sba_emu::Launch(\2).run(\1, ", text)
            assert launches and "<<<" not in text, f"{src.name}: a launch the rewrite did not catch"
            out = dest / f"{src.stem}_cu.cpp"
        if not out.exists() or out.read_text() != text:
            out.write_text(text)
        if out.suffix == ".cpp":
            sources.append(out)
    return sources


@pytest.fixture(scope="module")
def emulated():
    """The extension built for CPU emulation, swapped in for the cuda backend's own."""
    from torch.utils import cpp_extension

    sources = emulation_sources(cuda_backend.CSRC, WORK / "src")
    (WORK / "build").mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load(
        name="sba_cuda_emulated", sources=[str(s) for s in sources], build_directory=str(WORK / "build"),
        extra_include_paths=[str(EMULATOR)], extra_cflags=["-O2", "-DSBA_CPU_EMULATION"],
        verbose=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_backend, "_ext", lambda: module)
        patch.setattr(cuda_backend, "KERNEL_DEVICE", "cpu")
        yield cuda_backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias_kind", [None, "shared", "per_head"])
def test_intra_matches_reference(emulated, dtype, bias_kind):
    g = torch.Generator().manual_seed(20)
    part = random_partition(100, max_size=9, giant=70, generator=g)     # the giant spans 3 tiles of 32
    B, H, d = 2, 2, 16
    inputs = [torch.randn(B, 100, H, d, generator=g, dtype=F64) for _ in range(3)]
    if bias_kind:
        shape = (part.num_parts, part.max_size, part.max_size)
        inputs.append(torch.randn(((H,) if bias_kind == "per_head" else ()) + shape, generator=g, dtype=F64))

    def ours(q, k, v, *bias):
        return emulated.intra_attention(q, k, v, part, bias[0] if bias else None, 0.7)

    def ref(q, k, v, *bias):
        return dense_masked_attention(q, k, v, part, bias[0] if bias else None, scale=0.7)

    compare_forward_backward(ours, ref, inputs, dtype=dtype, tol=TOLERANCE[dtype], generator=g)


@pytest.mark.parametrize("head_dim", [24, 64, 128])
def test_head_dims_and_shared_memory_opt_in(emulated, head_dim):
    """d = 128 needs over 48 KB of shared memory: the launch must raise the kernel's limit."""
    g = torch.Generator().manual_seed(head_dim)
    part = random_partition(40, max_size=9, giant=33, generator=g)
    inputs = [torch.randn(1, 40, 1, head_dim, generator=g, dtype=F64) for _ in range(3)]
    compare_forward_backward(lambda q, k, v: emulated.intra_attention(q, k, v, part, None, head_dim ** -0.5),
                             lambda q, k, v: dense_masked_attention(q, k, v, part), inputs,
                             dtype=torch.float32, tol=TOLERANCE[torch.float32], generator=g)


def test_noncontiguous_inputs(emulated):
    g = torch.Generator().manual_seed(21)
    part = random_partition(50, max_size=7, generator=g)
    qkv = torch.randn(2, 50, 3, 2, 16, generator=g, dtype=F64)
    q, k, v = qkv.float().unbind(2)
    assert not q.is_contiguous()
    out = emulated.intra_attention(q, k, v, part, None, 0.25)
    assert rel_err(out, dense_masked_attention(*qkv.unbind(2), part, scale=0.25)) <= 1e-5


def test_inter_matches_reference(emulated):
    g = torch.Generator().manual_seed(22)
    B, P, H, d = 1, 100, 2, 16                     # 4 query tiles and 4 key tiles
    inputs = [torch.randn(B, P, H, d, generator=g, dtype=F64) for _ in range(3)]
    inputs.append(torch.randn(H, P, P, generator=g, dtype=F64))
    compare_forward_backward(lambda q, k, v, b: emulated.inter_attention(q, k, v, b, 0.25),
                             lambda q, k, v, b: dense_attention(q, k, v, b, scale=0.25), inputs,
                             dtype=torch.float32, tol=TOLERANCE[torch.float32], generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_segment_mean_and_pooled_attention(emulated, dtype):
    g = torch.Generator().manual_seed(23)
    part = random_partition(80, max_size=9, giant=40, generator=g)
    x = torch.randn(2, 80, 150, generator=g, dtype=F64)       # C > the 128 threads of a block
    compare_forward_backward(lambda x: emulated.segment_mean(x, part), lambda x: loop_segment_mean(x, part), [x],
                             dtype=dtype, tol=TOLERANCE[dtype], generator=g)
    inputs = [torch.randn(2, 80, 2, 16, generator=g, dtype=F64) for _ in range(3)]

    def ours(q, k, v):
        o, z = emulated.intra_attention_pooled(q, k, v, part, None, 0.25)
        return torch.cat([o.reshape(-1), z.reshape(-1)])

    def ref(q, k, v):
        o = dense_masked_attention(q, k, v, part, scale=0.25)
        return torch.cat([o.reshape(-1), loop_segment_mean(o.reshape(2, 80, 32), part).reshape(-1)])

    compare_forward_backward(ours, ref, inputs, dtype=dtype, tol=TOLERANCE[dtype], generator=g)


def test_backward_is_deterministic(emulated):
    g = torch.Generator().manual_seed(24)
    part = random_partition(60, max_size=9, giant=40, generator=g)
    base = [torch.randn(2, 60, 2, 16, generator=g) for _ in range(3)]
    bias = torch.randn(part.num_parts, part.max_size, part.max_size, generator=g)
    grads = []
    for _ in range(2):
        ins = [t.clone().requires_grad_() for t in base + [bias]]
        emulated.intra_attention(*ins[:3], part, ins[3], 0.25).sum().backward()
        grads.append([t.grad for t in ins])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _every_kernel(backend, generator):
    """Outputs and gradients of one call of every kernel: intra attention with a per-head bias
    (forward, delta, dQ, dK/dV, dBias), the pooled op and inter attention (segment mean)."""
    part = random_partition(70, max_size=9, giant=40, generator=generator)
    ins = [torch.randn(2, 70, 2, 16, generator=generator).requires_grad_() for _ in range(3)]
    bias = torch.randn(2, part.num_parts, part.max_size, part.max_size, generator=generator).requires_grad_()
    o, z = backend.intra_attention_pooled(*ins, part, bias, 0.3)
    g = backend.inter_attention(z, z, z, None, 0.3)
    (o.square().sum() + g.sum()).backward()
    return [o, z, g] + [t.grad for t in ins + [bias]]


def test_kernels_are_race_free(emulated, monkeypatch):
    """The emulator's racecheck: threads of a block run in order, first to last or last to
    first, between barriers. A shared-memory race gives different bits under the two orders."""
    first = _every_kernel(emulated, torch.Generator().manual_seed(26))
    monkeypatch.setenv("SBA_EMU_SCHEDULE", "reverse")
    reversed_ = _every_kernel(emulated, torch.Generator().manual_seed(26))
    for i, (a, b) in enumerate(zip(first, reversed_)):
        assert torch.equal(a, b), f"result {i} depends on the order of the threads"


def test_binding_rejects_what_the_kernels_cannot_take(emulated):
    part = random_partition(10, max_size=4, generator=torch.Generator().manual_seed(25))
    q = torch.randn(1, 10, 1, 16)
    with pytest.raises(ValueError, match="head dim must be <= 128"):
        emulated.intra_attention(*(torch.randn(1, 10, 1, 136),) * 3, part, None, 0.1)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        emulated.intra_attention(q.double(), q.double(), q.double(), part, None, 0.1)
    with pytest.raises(RuntimeError, match="index must be a contiguous"):   # the C++ guard itself
        emulated._ext().attention_forward(q, q, q, part.index.long(), part.lengths, None, 0.1)


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
