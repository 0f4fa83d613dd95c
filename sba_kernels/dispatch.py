"""Which backends exist here, and which one runs a call.

``"auto"`` picks, for CUDA tensors, triton, then cuda, then torch; for CPU tensors, torch.
A backend that fails to compile at first use under ``"auto"`` is reported once with a warning
and skipped from then on, so a broken toolchain costs one warning, not a crash.
"""

from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("torch", "triton", "cuda")
_AUTO_ORDER_CUDA = ("triton", "cuda", "torch")
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
    if name == "torch":
        return True
    if name == "triton":
        if not _TRITON:
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    if name == "cuda":
        return device.type == "cuda" and _cuda_extension_ready()
    return False


def available_backends() -> list[str]:
    """Backends usable in this process: ``"torch"`` always; ``"triton"`` with Triton and a CUDA
    device (or ``TRITON_INTERPRET=1``); ``"cuda"`` when the C++ extension is built and loads."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return [b for b in BACKENDS if backend_supports(b, dev)]


def module_for(name: str):
    """The module implementing backend ``name`` (imported on first use)."""
    if name == "torch":
        from . import reference as module
    elif name == "triton":
        from . import triton_backend as module
    else:
        from . import cuda_backend as module
    return module


def choose(backend: str, device: torch.device) -> list[str]:
    """Backends to try, in order, for a call with ``backend`` on ``device``.

    An explicit backend gives a one-item list or a ValueError saying why it cannot run.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        if device.type != "cuda":
            return ["torch"]
        return [b for b in _AUTO_ORDER_CUDA if b not in _failed and backend_supports(b, device)]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if not backend_supports(backend, device):
        raise ValueError(f"backend={backend!r} cannot run on {device} here: {why_unavailable(backend, device)}")
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


def run(op: str, backend: str, device: torch.device, *args):
    """Call ``op`` of the first backend in ``choose(backend, device)`` that works."""
    *fallible, last = choose(backend, device)
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
