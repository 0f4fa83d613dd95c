"""The benchmark's workload: a sensor-like graph of N nodes, its METIS partition, and inputs.

Nodes are random points in the unit square joined to their 8 nearest neighbours (a road
network's degree); METIS splits them into ``ceil(N / subgraph_size)`` parts, and nodes are
renumbered so each part is a contiguous run, as `SBATransformer` does. That order is what
the peers see too, so FlexAttention's block mask is as sparse as it can be. Above
``INTER_THRESHOLD`` parts, the SBA layer's hierarchical inter attention gets its token levels
from the same nested chain (`sba_model.model_partitions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from sba_kernels import Partition
from sba_model import knn_adjacency, model_partitions
from sba_model.graph.partitioning import INTER_GROUP_SIZE, INTER_THRESHOLD, nested_levels


@dataclass(frozen=True)
class Config:
    """One sweep's fixed settings."""

    batch: int
    heads: int
    head_dim: int
    subgraph_size: int
    dtype: str
    device: str
    backward: bool
    seed: int = 0
    cuda_graph: bool = False     # time replays of each call captured in a CUDA graph (GPU only)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]


# The launch benchmarks' workload on a GPU (`bias_options.py`, `pooled_options.py`,
# `autotune.py`): bf16, B = 1, H = 8, d = 64, subgraphs of at most 64 nodes.
GPU_LAUNCH_BENCH = Config(batch=1, heads=8, head_dim=64, subgraph_size=64, dtype="bf16", device="cuda", backward=True)


def build_layout(num_nodes: int, subgraph_size: int, seed: int = 0,
                 max_size: int | None = None) -> tuple[Partition, list[Partition]]:
    """METIS partition of a k-NN graph on random points, nodes renumbered so parts are contiguous,
    and the inter attention's token levels over its parts (empty up to ``INTER_THRESHOLD`` parts).
    ``max_size``: no subgraph larger (`partition_graph`); None leaves METIS's imbalance."""
    points = np.random.default_rng(seed).random((num_nodes, 2))
    adjacency = knn_adjacency(points, k=min(8, num_nodes - 1))
    parts, levels, _ = model_partitions(adjacency, [max(1, math.ceil(num_nodes / subgraph_size))],
                                       max_size=max_size, seed=seed)
    return parts[0], levels[0]


def build_runs_layout(num_nodes: int, subgraph_size: int) -> tuple[Partition, list[Partition]]:
    """The layout without a graph: consecutive runs of ``subgraph_size`` nodes (the last one
    shorter), and inter levels that group consecutive runs of ``INTER_GROUP_SIZE`` tokens.

    It is what ordering sensors along a space-filling curve and cutting every ``subgraph_size``
    gives, and the kernels see the same shapes as under METIS with a size cap, but it takes
    seconds at N = 1e7, where the k-NN graph and METIS take many minutes."""
    if num_nodes < 1 or subgraph_size < 1:
        raise ValueError(f"num_nodes and subgraph_size must be >= 1, got {num_nodes} and {subgraph_size}")
    chain, size = [], subgraph_size
    while True:
        chain.append(_consecutive_runs(num_nodes, size))
        if chain[-1].num_parts <= INTER_THRESHOLD:
            break
        size *= INTER_GROUP_SIZE
    return chain[0], nested_levels(chain) if len(chain) > 1 else []


def _consecutive_runs(num_nodes: int, size: int) -> Partition:
    """Nodes ``0..N-1`` cut into runs of ``size``: subgraph ``p`` holds ``p*size ..``."""
    return Partition.from_assignment(torch.arange(num_nodes) // size)


def build_partition(num_nodes: int, subgraph_size: int, seed: int = 0) -> Partition:
    """The node partition of `build_layout`."""
    return build_layout(num_nodes, subgraph_size, seed)[0]


def make_bias(partition: Partition, cfg: Config, kind: Optional[str], *, requires_grad: bool) -> Optional[torch.Tensor]:
    """A graph bias drawn from N(0, 1), as `SBAttention` holds one: ``[P, M, M]`` for ``kind``
    "shared" (by the heads), ``[H, P, M, M]`` for "per_head"; None for None or "none"."""
    if kind in (None, "none"):
        return None
    if kind not in ("shared", "per_head"):
        raise ValueError(f"kind: 'shared', 'per_head', 'none' or None, got {kind!r}")
    P, M = partition.index.shape
    shape = (P, M, M) if kind == "shared" else (cfg.heads, P, M, M)
    return torch.randn(shape, device=cfg.device, dtype=cfg.torch_dtype, requires_grad=requires_grad)


def make_inputs(num_nodes: int, cfg: Config, *, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v ``[B, N, H, d]`` drawn from N(0, 1) (never zeros: zeros time faster than data)."""
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    shape = (cfg.batch, num_nodes, cfg.heads, cfg.head_dim)
    return tuple(
        torch.randn(shape, generator=g, device=cfg.device, dtype=cfg.torch_dtype).requires_grad_(requires_grad)
        for _ in range(3)
    )


def intra_passes(q, k, v, partition: Partition, bias, grad, backend: str = "triton") -> dict:
    """``{"forward": fn, "forward+backward": fn}``: zero-argument calls of `intra_attention`
    on these inputs, the second clearing the gradients of q, k, v and bias first, for timing."""
    import sba_kernels as sk

    def forward():
        with torch.no_grad():
            sk.intra_attention(q, k, v, partition, bias=bias, backend=backend)

    def forward_backward():
        for t in (q, k, v, bias):
            if t is not None:
                t.grad = None
        sk.intra_attention(q, k, v, partition, bias=bias, backend=backend).backward(grad)

    return {"forward": forward, "forward+backward": forward_backward}
