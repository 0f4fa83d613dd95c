"""How each registered backend runs in this test session, for the conformance suite.

Without a GPU: triton runs in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``), and
the cuda backend's C++ (``csrc/`` kernels and ``bindings.cpp``) is built against the CUDA
runtime stand-in in ``tests/cuda_emulator`` and runs on CPU threads. With a GPU both run on the
device. Any backend needs no entry here unless it needs such a setup: a backend added to the
registry later runs the whole suite as it is.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from pathlib import Path

import pytest
import torch

from sba_kernels import cuda_backend, triton_backend

EMULATOR = Path(__file__).resolve().parent / "cuda_emulator"
WORK = Path(tempfile.gettempdir()) / "sba_cuda_emulated"
GPU = torch.cuda.is_available()

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


@contextlib.contextmanager
def emulated_cuda():
    """The cuda backend with its extension built for CPU emulation: it then takes CPU tensors."""
    from torch.utils import cpp_extension

    sources = emulation_sources(cuda_backend.CSRC, WORK / "src")
    (WORK / "build").mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load(
        name="sba_cuda_emulated", sources=[str(s) for s in sources], build_directory=str(WORK / "build"),
        extra_include_paths=[str(EMULATOR)], extra_cflags=["-O2", "-DSBA_CPU_EMULATION"], verbose=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_backend, "_load", lambda: (module, ""))
        patch.setattr(cuda_backend, "KERNEL_DEVICE", "cpu")
        yield cuda_backend


@contextlib.contextmanager
def poisoned_triton():
    """Triton outputs start as NaN, so an element no program writes fails the comparison."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_backend, "POISON", True)
        yield


@contextlib.contextmanager
def running(name: str):
    """Whatever backend ``name`` needs to run here."""
    if name == "triton":
        with poisoned_triton():
            yield
    elif name == "cuda" and not GPU:
        with emulated_cuda():
            yield
    else:
        yield
