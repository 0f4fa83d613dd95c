"""The ``"cuda"`` backend: the CUDA C++ kernels in ``csrc/`` behind the shared ops of
`library.KernelBackend`.

The extension is found, in order, as ``sba_kernels._C`` (built by the top-level
``CMakeLists.txt``) or built on first use from ``csrc/`` with ``torch.utils.cpp_extension``
(needs a CUDA build of torch and a CUDA toolkit; torch caches the build). ``is_available()``
says whether it loads; ``unavailable_reason()`` says in one line why not.

Supported: fp32, fp16 and bf16 inputs, head dim up to 128, CUDA tensors. `check_supported`
says so before any launch, with a ValueError naming the argument.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from .library import KernelBackend

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = ("bindings.cpp", "attention.cu", "segment_mean.cu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
# Where the extension's kernels run: "cpu" only for the test build that emulates CUDA on CPU
# threads (tests/cuda_emulator), which swaps in its own module for `_ext`.
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


def check_supported(x: torch.Tensor, name: str = "q") -> None:
    """What the CUDA kernels accept beyond the ops' own checks; ValueError naming ``name``."""
    if x.device.type != KERNEL_DEVICE:
        raise ValueError(f"{name} must be a CUDA tensor for the cuda backend, got {x.device}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16 for the cuda backend, got {x.dtype}")
    if x.dim() == 4 and x.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"{name} head dim must be <= {MAX_HEAD_DIM} for the cuda backend, got {x.shape[-1]}")


def _bias_4d(bias, dtype):
    """``[P, M, M]`` -> ``[1, P, M, M]``; contiguous, in the inputs' dtype (the kernels read one)."""
    if bias is None:
        return None
    return (bias.unsqueeze(0) if bias.dim() == 3 else bias).to(dtype).contiguous()


def attention_forward(q, k, v, index, lengths, bias, scale):
    check_supported(q)
    o, lse = _ext().attention_forward(q, k, v, index, lengths, _bias_4d(bias, q.dtype), scale)
    return o, lse


def attention_backward(do, q, k, v, o, lse, index, lengths, bias, scale, need_dbias):
    dq, dk, dv, dbias = _ext().attention_backward(do.to(q.dtype), q, k, v, o, lse, index, lengths,
                                                  _bias_4d(bias, q.dtype), scale, need_dbias)
    if need_dbias:
        dbias = dbias.view(bias.shape).to(bias.dtype)
    return dq, dk, dv, dbias


def segment_mean_forward(x, index, lengths):
    check_supported(x, "x")
    return _ext().segment_mean_forward(x, index, lengths)


def segment_mean_backward(dz, assignment, lengths):
    return _ext().segment_mean_backward(dz, assignment, lengths)


_BACKEND = KernelBackend("cuda", attention_forward, attention_backward, segment_mean_forward, segment_mean_backward)
intra_attention = _BACKEND.intra_attention
intra_attention_pooled = _BACKEND.intra_attention_pooled
inter_attention = _BACKEND.inter_attention
segment_mean = _BACKEND.segment_mean
