"""The SBA ops: one checked, documented entry point each, over every backend.

Each op checks its arguments, asks `backends.choose` which backend runs them (``"auto"``: the
first in the registry's order that supports the input; see `sba_kernels.backends`), and calls
that backend's method of the same name: `reference.TorchBackend`, `sdpa_backend.SdpaBackend`,
`triton_backend.TritonBackend` or `cuda_backend.CudaBackend`, the last two through the ``sba::``
custom ops of `custom_ops`.

Shapes follow the flash-attn convention: node tensors are ``[B, N, H, d]`` (batch, node, head,
head dim) so a Linear projection reshapes into them without a transpose.

Precision contract (every backend): q, k, v and the outputs in the input dtype; scores, softmax
and accumulation in fp32 (float64 inputs, which only the torch reference takes, stay float64);
the bias is read in its own dtype (an fp16/bf16 bias is exact in fp32) and joins the fp32
scores; its gradient is accumulated in fp32 and returned in the bias's dtype.

Gradients: every backend differentiates once. Second order (a backward with
``create_graph=True`` through the attention: gradient penalties, meta-learning) only on the
torch backend; the fused backwards of sdpa, triton and cuda raise NotImplementedError there.
segment_mean, being linear, differentiates twice on every backend.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks
from .backends import choose
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
        backend: ``"auto"`` or a registered backend (``"torch"``, ``"triton"``, ``"cuda"``, ...);
            a named backend that cannot run the input raises a ValueError saying why.

    Returns:
        ``[B, N, H, d]`` in node order, dtype of q.
    """
    scale = _check_intra(q, k, v, partition, bias, scale)
    return choose(backend, q, bias).intra_attention(q, k, v, partition, bias, scale)


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
    return choose(backend, q, bias).intra_attention_pooled(q, k, v, partition, bias, scale)


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
    return choose(backend, x).segment_mean(x, partition)


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
        backend: ``"auto"`` or a registered backend (``"torch"``, ``"triton"``, ``"cuda"``, ...);
            a named backend that cannot run the input raises a ValueError saying why.

    Returns:
        ``[B, P, H, d]``, dtype of q.
    """
    _checks.check_qkv(q, k, v, "[B, P, H, d]")
    P, H = q.shape[1], q.shape[2]
    _checks.check_bias(bias, q, {"[P, P]": (P, P), "[H, P, P]": (H, P, P)})
    scale = _checks.resolve_scale(scale, q.shape[3])
    return choose(backend, q, bias).inter_attention(q, k, v, bias, scale)
