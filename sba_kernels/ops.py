"""The three SBA ops: one checked, documented entry point each, over every backend.

Shapes follow the flash-attn convention: node tensors are ``[B, N, H, d]`` (batch, node, head,
head dim) so a Linear projection reshapes into them without a transpose.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, dispatch
from .partition import Partition

__all__ = ["intra_attention", "intra_attention_pooled", "segment_mean", "inter_attention"]


def _check_intra(q, k, v, partition, bias, scale) -> float:
    """The checks shared by the intra ops; returns the resolved scale."""
    _checks.check_qkv(q, k, v, "[B, N, H, d]")
    _checks.check_partition(partition, q.shape[1], q.device)
    P, M, H = partition.num_parts, partition.max_size, q.shape[2]
    _checks.check_bias(bias, q, {"[P, M, M]": (P, M, M), "[H, P, M, M]": (H, P, M, M)})
    return _checks.resolve_scale(scale, q.shape[3])


def intra_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    partition: Partition,
    *,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention restricted to each subgraph of ``partition``.

    For node ``i`` in subgraph ``p``:
    ``o_i = sum_{j in S_p} softmax_j(scale * q_i . k_j + bias[h, p, slot(i), slot(j)]) v_j``.

    Args:
        q, k, v: ``[B, N, H, d]``, one float dtype and device. Last dim contiguous is fastest;
            other strides are free.
        partition: a `Partition` of the N nodes, on the device of q.
        bias: optional additive score bias ``[P, M, M]`` (shared by heads) or ``[H, P, M, M]``,
            indexed by slot within the subgraph (``partition.index`` order); entries in padding
            slots are ignored. Broadcast over the batch; differentiable.
        scale: score scale; default ``1/sqrt(d)``.
        backend: ``"auto"``, ``"torch"``, ``"sdpa"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``[B, N, H, d]`` in node order, dtype of q.
    """
    scale = _check_intra(q, k, v, partition, bias, scale)
    return dispatch.run("intra_attention", backend, (q, bias), q, k, v, partition, bias, scale)


def intra_attention_pooled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    partition: Partition,
    *,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`intra_attention` and each subgraph's mean output, in one call.

    ``z[:, p] = mean_{i in S_p} o[:, i]``. The triton backend computes z in the attention
    kernel's epilogue, from the fp32 accumulator, so o is never read back. A layer that pools
    a projection of o can pool o instead and project z: for a Linear ``W``, the mean of
    ``W o_i + b`` is ``W z + b``.

    Args: as `intra_attention`.

    Returns:
        o ``[B, N, H, d]`` in node order and z ``[B, P, H, d]``, both of q's dtype; both
        differentiable.
    """
    scale = _check_intra(q, k, v, partition, bias, scale)
    return dispatch.run("intra_attention_pooled", backend, (q, bias), q, k, v, partition, bias, scale)


def segment_mean(x: torch.Tensor, partition: Partition, *, backend: str = "auto") -> torch.Tensor:
    """Mean of ``x`` over the real nodes of each subgraph (padding never counts).

    Args:
        x: ``[B, N, C]`` float.
        partition: a `Partition` of the N nodes, on the device of x.

    Returns:
        ``[B, P, C]``: ``out[:, p] = mean_{i in S_p} x[:, i]``.
    """
    _checks.check_float_tensor(x, "x", 3)
    _checks.check_partition(partition, x.shape[1], x.device)
    return dispatch.run("segment_mean", backend, (x, None), x, partition)


def inter_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense softmax attention among the P pooled subgraph tokens.

    Args:
        q, k, v: ``[B, P, H, d]``, one float dtype and device.
        bias: optional additive score bias ``[P, P]`` or ``[H, P, P]`` (e.g. from the coarse
            graph between subgraphs), broadcast over the batch; differentiable.
        scale: score scale; default ``1/sqrt(d)``.
        backend: ``"auto"``, ``"torch"``, ``"sdpa"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``[B, P, H, d]``, dtype of q.
    """
    _checks.check_qkv(q, k, v, "[B, P, H, d]")
    P, H = q.shape[1], q.shape[2]
    _checks.check_bias(bias, q, {"[P, P]": (P, P), "[H, P, P]": (H, P, P)})
    scale = _checks.resolve_scale(scale, q.shape[3])
    return dispatch.run("inter_attention", backend, (q, bias), q, k, v, bias, scale)
