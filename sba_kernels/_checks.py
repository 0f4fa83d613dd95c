"""Argument checks shared by every op and backend: one place, one wording.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong
shape/device/value) with the argument's name first, so a user sees which input is off.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .partition import Partition


def refuse_double_backward(backend: str) -> None:
    """Called first in an attention backward, which is not itself differentiable. Run with grad
    mode on (a backward under ``create_graph=True``), its gradients would carry no graph and
    autograd would drop every second-order term through them without a word: refuse instead.
    (torch.compile traces backwards its own way and refuses double backward itself.)"""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise NotImplementedError(
            f"the {backend} backend's attention has no double backward (a backward with create_graph=True "
            f"went through it, as gradient penalties and meta-learning do); backend='torch' differentiates twice")


def check_float_tensor(x, name: str, rank: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")


def check_qkv(q, k, v, layout: str) -> None:
    """q, k, v: ``[B, L, H, d]`` each, one dtype, one device, same shape."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(t, name, 4)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)} ({layout}), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    if min(q.shape) == 0:
        raise ValueError(f"q must have no empty dimension ({layout}), got {tuple(q.shape)}")


def check_partition(partition, num_nodes: int, device: torch.device) -> None:
    if not isinstance(partition, Partition):
        raise TypeError(f"partition must be a sba_kernels.Partition, got {type(partition).__name__}")
    if partition.num_nodes != num_nodes:
        raise ValueError(f"partition covers {partition.num_nodes} nodes but the input has N={num_nodes}")
    if partition.device != device:
        raise ValueError(
            f"partition is on {partition.device} but the input is on {device}; call partition.to(device)"
        )


def check_bias(bias, ref: torch.Tensor, shapes: dict[str, tuple]) -> None:
    """bias: None or one of ``shapes`` (name -> shape), on ``ref``'s device, floating."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
        raise TypeError(f"bias must be a floating-point torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) not in shapes.values():
        allowed = " or ".join(f"{n} {tuple(s)}" for n, s in shapes.items())
        raise ValueError(f"bias must have shape {allowed}, got {tuple(bias.shape)}")
    if bias.device != ref.device:
        raise ValueError(f"bias must be on the device of q ({ref.device}), got {bias.device}")


def resolve_scale(scale: Optional[float], head_dim: int) -> float:
    """``scale`` as a float, defaulting to ``1/sqrt(head_dim)``."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):      # numpy scalars too
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)
