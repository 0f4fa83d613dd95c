"""The ``"cuda"`` backend: the CUDA C++ kernels in ``csrc/`` behind the shared ``sba::`` ops of
`custom_ops` (``attention_forward`` -> ``attention_forward`` in ``csrc/bindings.cpp`` ->
the kernels in ``csrc/attention.cu``).

The extension is found, in order, as ``sba_kernels._C`` (built by the top-level
``CMakeLists.txt``) or built on first use from ``csrc/`` with ``torch.utils.cpp_extension``
(needs a CUDA build of torch and a CUDA toolkit; torch caches the build). ``is_available()``
says whether it loads; ``unavailable_reason()`` says in one line why not.

Supported: fp32, fp16 and bf16 inputs, head dim up to 128, CUDA tensors; `CudaBackend.supports`
says so before any launch.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import torch

from .custom_ops import KernelBackend

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = ("bindings.cpp", "attention.cu", "segment_mean.cu")
# Where the extension's kernels run: "cpu" only for the test build that emulates CUDA on CPU
# threads (tests/cuda_emulator), which swaps in its own module for `_load`.
KERNEL_DEVICE = "cuda"


class BuildError(RuntimeError):
    """The CUDA extension could not be built or loaded."""


@lru_cache(maxsize=None)
def _load():
    """(module or None, reason). Never raises; builds at most once per process."""
    if not torch.cuda.is_available():
        return None, "no CUDA device visible to torch"
    try:
        from . import _C
        return _C, ""
    except ImportError:
        pass
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return None, "sba_kernels._C is not built and no CUDA toolkit (nvcc) was found to build it"
    if not all((CSRC / s).is_file() for s in SOURCES):
        return None, f"sba_kernels._C is not built and the sources are not in {CSRC}"
    try:
        module = cpp_extension.load(name="sba_cuda_ext", sources=[str(CSRC / s) for s in SOURCES],
                                    extra_cflags=["-O3"],
                                    extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as err:   # compiler or linker failure: report it, don't crash the caller
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return None, f"building the CUDA extension failed: {first}"
    return module, ""


def is_available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1] or "available"


def _ext():
    module, reason = _load()
    if module is None:
        raise BuildError(reason)
    return module


def _bias_4d(bias):
    """``[P, M, M]`` -> ``[1, P, M, M]``, contiguous fp32: the kernels read the bias as fp32,
    which holds an fp16/bf16/fp32 bias exactly (SPEC 4: the bias is read in its own dtype)."""
    if bias is None:
        return None
    return (bias.unsqueeze(0) if bias.dim() == 3 else bias).float().contiguous()


# The CUDA kernels always gather rows through ``index``: the launches below take ``starts``
# (`custom_ops`' protocol) and do not read it.
def attention_forward(q, k, v, index, lengths, bias, scale, pool: bool, starts=None):
    """o, lse and, with ``pool``, the subgraph means of o (a segment-mean kernel over o)."""
    o, lse = _ext().attention_forward(q, k, v, index, lengths, _bias_4d(bias), scale)
    if not pool:
        return o, lse, q.new_empty(0)
    B, N, H, d = o.shape
    return o, lse, segment_mean_forward(o.view(B, N, H * d), index, lengths).view(B, -1, H, d)


def attention_backward(do, q, k, v, o, lse, index, lengths, bias, scale, need_dbias, starts=None):
    """dq, dk, dv and dbias (accumulated in fp32, returned in the bias's dtype) or empty."""
    dq, dk, dv, dbias = _ext().attention_backward(do.to(q.dtype), q, k, v, o, lse, index, lengths, _bias_4d(bias),
                                                  scale, need_dbias)
    if need_dbias:
        dbias = dbias.view(bias.shape).to(bias.dtype)
    return dq, dk, dv, dbias


def segment_mean_forward(x, index, lengths, starts=None):
    return _ext().segment_mean_forward(x, index, lengths)


def segment_mean_backward(dz, assignment, lengths):
    return _ext().segment_mean_backward(dz, assignment, lengths)


class CudaBackend(KernelBackend):
    """The CUDA C++ kernels of ``csrc/``: CUDA tensors, fp16/bf16/fp32, head dim up to 128."""

    name = "cuda"
    auto_devices = ("cuda",)

    def unavailable(self, device):
        if device.type != KERNEL_DEVICE:
            return f"the cuda backend needs CUDA tensors, got {device}"
        module, reason = _load()
        return None if module is not None else reason


BACKEND = CudaBackend(sys.modules[__name__])
