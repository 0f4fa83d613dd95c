"""Backends: what one implements, which exist, and which one runs a call.

A backend is a `Backend`: a name, the devices ``"auto"`` may pick it for, `Backend.supports`
(asked before anything launches, never learned from an exception) and the four ops. The
registry holds them in order of preference:

=========  ==================================  =====================================
name       module (imported when registered)   ``"auto"`` picks it for
=========  ==================================  =====================================
triton     `sba_kernels.triton_backend`        CUDA tensors
cuda       `sba_kernels.cuda_backend`          CUDA tensors
sdpa       `sba_kernels.sdpa_backend`          CPU and CUDA tensors (not float64)
torch      `sba_kernels.reference`             anything (float64 only goes here)
=========  ==================================  =====================================

``"auto"`` runs the first backend, in this order, that is picked for the input's device and
supports the input. A backend named explicitly runs or raises a ValueError with its reason.
A backend whose module cannot be imported (Triton not installed, say) stays registered and says
why in `supports`. `register` adds one; the test suite's conformance checks run every backend in
the registry.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Optional, Union

import torch

from .partition import Partition

Tensor = torch.Tensor


class Backend(ABC):
    """The ops one backend implements. Shapes as in `sba_kernels.ops`, arguments already checked
    there; ``scale`` is resolved to a float.

    Attributes:
        name: what ``backend=`` names it by.
        auto_devices: device types (``"cpu"``, ``"cuda"``) for which ``"auto"`` may pick it.
    """

    name: str = ""
    auto_devices: tuple[str, ...] = ()

    def unavailable(self, device: torch.device) -> Optional[str]:
        """Why this backend cannot run on ``device`` in this process, or None if it can."""
        return None

    def supports(self, x: Tensor, bias: Optional[Tensor] = None) -> Optional[str]:
        """Why this backend cannot run an op on ``x`` (q ``[B, N, H, d]`` or x ``[B, N, C]``) with
        ``bias``, or None if it can. Asked before launch."""
        return self.unavailable(x.device)

    @abstractmethod
    def intra_attention(self, q: Tensor, k: Tensor, v: Tensor, partition: Partition, bias: Optional[Tensor],
                        scale: float) -> Tensor:
        """See `sba_kernels.ops.intra_attention`."""

    @abstractmethod
    def intra_attention_pooled(self, q: Tensor, k: Tensor, v: Tensor, partition: Partition,
                               bias: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
        """See `sba_kernels.ops.intra_attention_pooled`."""

    @abstractmethod
    def segment_mean(self, x: Tensor, partition: Partition) -> Tensor:
        """See `sba_kernels.ops.segment_mean`."""

    @abstractmethod
    def inter_attention(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> Tensor:
        """See `sba_kernels.ops.inter_attention`."""


class _Missing:
    """Stands for a registered backend whose module failed to import: it supports nothing, and
    says why (so ``"auto"`` passes it by and naming it gives the reason)."""

    auto_devices: tuple[str, ...] = ()

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def unavailable(self, device: torch.device) -> Optional[str]:
        return self.reason

    def supports(self, x: Tensor, bias: Optional[Tensor] = None) -> Optional[str]:
        return self.reason


# ----------------------------------------------------------------------------- the registry
_MODULES: dict[str, str] = {}          # name -> module defining BACKEND, in order of preference
_LOADED: dict[str, Union[Backend, _Missing]] = {}


def register(name: str, module: str, *, before: Optional[str] = None) -> None:
    """Add backend ``name``, found as ``BACKEND`` in ``module``, ahead of ``before`` in the order
    of preference (else last). The module is imported now: ``choose`` runs inside torch.compile
    traces, which cannot import."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"name must be a non-empty str other than 'auto', got {name!r}")
    if before is not None and before not in _MODULES:
        raise ValueError(f"before must name a registered backend {list(_MODULES)}, got {before!r}")
    items = [(n, m) for n, m in _MODULES.items() if n != name]
    at = len(items) if before is None else [n for n, _ in items].index(before)
    items.insert(at, (name, module))
    _MODULES.clear()
    _MODULES.update(items)
    try:
        _LOADED[name] = importlib.import_module(module).BACKEND
    except ImportError as err:    # e.g. triton not installed: registered, but runs nothing
        _LOADED[name] = _Missing(name, f"{module} could not be imported ({err})")


def unregister(name: str) -> None:
    """Remove backend ``name`` from the registry."""
    _MODULES.pop(name, None)
    _LOADED.pop(name, None)


def names() -> list[str]:
    """Registered backends, in order of preference."""
    return list(_MODULES)


def get(name: str) -> Union[Backend, _Missing]:
    """The backend registered as ``name``."""
    if name not in _MODULES:
        raise ValueError(f"backend must be 'auto' or one of {names()}, got {name!r}")
    return _LOADED[name]


def choose(backend: str, x: Tensor, bias: Optional[Tensor] = None) -> Backend:
    """The backend that runs an op on ``x`` with ``bias``: ``"auto"`` or a registered name."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto":
        chosen = get(backend)
        reason = chosen.supports(x, bias)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run this input: {reason}")
        return chosen
    for name in _MODULES:
        candidate = get(name)
        if x.device.type in candidate.auto_devices and candidate.supports(x, bias) is None:
            return candidate
    raise ValueError(f"no registered backend runs {x.dtype} tensors on {x.device}: " + "; ".join(
        f"{n}: {get(n).supports(x, bias) or f'auto picks it for {get(n).auto_devices} tensors only'}" for n in _MODULES))


def available_backends() -> list[str]:
    """Backends that can run on this process's default device (CUDA if there is one, else the
    CPU): ``"torch"`` always; ``"triton"`` with Triton and a CUDA device (or
    ``TRITON_INTERPRET=1``); ``"cuda"`` when the C++ extension builds and loads."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [n for n in _MODULES if get(n).unavailable(device) is None]


register("triton", "sba_kernels.triton_backend")
register("cuda", "sba_kernels.cuda_backend")
register("sdpa", "sba_kernels.sdpa_backend")
register("torch", "sba_kernels.reference")
