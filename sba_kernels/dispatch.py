"""Which backends exist here, and which one runs a call.

``"auto"`` picks, for CUDA tensors, triton, then cuda, then sdpa, then torch; for CPU tensors,
sdpa. A backend is skipped when it does not support the input (sdpa takes no float64: that runs
on the torch reference), asked before launch.
A backend that fails to compile at first use under ``"auto"`` is reported once with a warning
and skipped from then on, so a broken toolchain costs one warning, not a crash.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

BACKENDS = ("torch", "triton", "cuda", "sdpa")
_AUTO_ORDER_CUDA = ("triton", "cuda", "sdpa", "torch")
_AUTO_ORDER_CPU = ("sdpa", "torch")
_failed: dict[str, str] = {}     # backend -> one-line reason it was dropped from "auto"


def triton_interpret() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # any import failure (missing, broken install) means "not here"
        return False
    return True


# Probed once at import: dispatch runs inside torch.compile traces, which should see constants.
_TRITON = _probe_triton()


def _cuda_extension_ready() -> bool:
    from . import cuda_backend

    return cuda_backend.is_available()


def backend_supports(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on tensors of ``device`` in this process."""
    if name in ("torch", "sdpa"):
        return True
    if name == "triton":
        if not _TRITON:
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    if name == "cuda":
        return device.type == "cuda" and _cuda_extension_ready()
    return False


def available_backends() -> list[str]:
    """Backends usable in this process: ``"torch"`` and ``"sdpa"`` always; ``"triton"`` with Triton
    and a CUDA device (or ``TRITON_INTERPRET=1``); ``"cuda"`` when the C++ extension is built and
    loads."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return [b for b in BACKENDS if backend_supports(b, dev)]


def module_for(name: str):
    """The module implementing backend ``name`` (imported on first use)."""
    if name == "torch":
        from . import reference as module
    elif name == "sdpa":
        from . import sdpa_backend as module
    elif name == "triton":
        from . import triton_backend as module
    else:
        from . import cuda_backend as module
    return module


def refusal(name: str, q: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[str]:
    """Why backend ``name`` does not take these inputs (one line), or None. Asked before launch."""
    if name == "sdpa":
        return module_for(name).supports(q, bias)
    return None


def choose(backend: str, q: torch.Tensor, bias: Optional[torch.Tensor] = None) -> list[str]:
    """Backends to try, in order, for a call with ``backend`` on inputs like ``q`` and ``bias``.

    An explicit backend gives a one-item list or a ValueError saying why it cannot run.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    device = q.device
    if backend == "auto":
        order = _AUTO_ORDER_CUDA if device.type == "cuda" else _AUTO_ORDER_CPU
        return [b for b in order
                if b not in _failed and backend_supports(b, device) and refusal(b, q, bias) is None]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if not backend_supports(backend, device):
        raise ValueError(f"backend={backend!r} cannot run on {device} here: {why_unavailable(backend, device)}")
    reason = refusal(backend, q, bias)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run these inputs: {reason}")
    return [backend]


def why_unavailable(name: str, device: torch.device) -> str:
    if name == "triton":
        if not _TRITON:
            return "triton is not installed (pip install triton)"
        return "triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
    if name == "cuda":
        if device.type != "cuda":
            return "the cuda backend needs CUDA tensors"
        from . import cuda_backend

        return cuda_backend.unavailable_reason()
    return "unknown backend"


def run(op: str, backend: str, inputs: tuple, *args):
    """Call ``op`` of the first backend in ``choose(backend, *inputs)`` that works; ``inputs`` is
    ``(q, bias)`` (the tensors a backend's support depends on), ``args`` the op's arguments."""
    *fallible, last = choose(backend, *inputs)
    for name in fallible:          # only under "auto": an explicit backend is a one-item list
        try:
            return getattr(module_for(name), op)(*args)
        except _compile_errors() as err:  # only toolchain failures fall through, never bad input
            first_line = str(err).splitlines()[0] if str(err) else ""
            _failed[name] = f"{type(err).__name__}: {first_line}"
            warnings.warn(f"sba: backend {name!r} failed to compile ({_failed[name]}); using the next one")
    return getattr(module_for(last), op)(*args)


def _compile_errors() -> tuple:
    from . import cuda_backend

    errors: list = [cuda_backend.BuildError]
    if _TRITON:
        from triton.compiler.errors import CompilationError

        errors.append(CompilationError)
    return tuple(errors)
