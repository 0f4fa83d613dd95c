"""Every model the training harness runs, built by name from a dataset's graph.

SBATransformer, its ablations (one part removed or replaced) and one extension (``sba_node_id``):
  ``sba``               multiscale METIS partitions, Laplacian PE, graph bias, inter attention
  ``sba_no_inter``      without inter-subgraph attention
  ``sba_no_multiscale`` the finest partition in every layer
  ``sba_no_pe``         without Laplacian PE
  ``sba_random_part``   a random partition with METIS's subgraph sizes instead of METIS's
  ``sba_node_id``       ``sba`` plus a learned identity per node (STID's spatial identity)
Baselines:
  ``historical_average``  mean of the input window, per node (T-GCN's HA)
  ``last_value``          the last observed input, repeated
  ``gru``                 one GRU shared by all nodes over each node's history
  ``stid``                STID: per-node history embedding + node, time-of-day and day-of-week
                          identity embeddings, then a residual MLP (Shao et al., CIKM 2022)
  ``full_attention``      the same transformer with one subgraph holding every node
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from sba_kernels import Partition

from ..nn.model import SBATransformer, time_embedding
from ..graph.partitioning import multiscale_partitions, partition_graph
from ..graph.pe import laplacian_pe

# Every model built as an SBATransformer over a METIS-sized partition.
SBA_VARIANTS = ("sba", "sba_no_inter", "sba_no_multiscale", "sba_no_pe", "sba_random_part", "sba_node_id")
# Those whose subgraphs nest, level in level, in the model's node order: what `--parallel spatial`
# can shard (the other two ablations keep the user's order, in which subgraphs are not runs).
SPATIAL_VARIANTS = ("sba", "sba_no_inter", "sba_no_pe", "sba_node_id")
BASELINES = ("historical_average", "last_value", "gru", "stid", "full_attention")
MODELS = SBA_VARIANTS + BASELINES


def fit_parts(parts: Sequence[int], num_nodes: int) -> list[int]:
    """``parts`` (subgraphs per layer, strictly decreasing, as given) capped for a graph of
    ``num_nodes``: layer ``i`` at ``N - i``, so the layers stay as many and strictly decreasing
    (the defaults 16 and 4 on 3 sensors: 3 and 2). Parts out of order are refused, not fixed."""
    parts = list(parts)
    if not parts or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in parts):
        raise ValueError(f"parts must be positive ints, one per layer, got {parts}")
    if any(a <= b for a, b in zip(parts, parts[1:])):
        raise ValueError(f"parts must be strictly decreasing (finest level first), got {parts}")
    if len(parts) > num_nodes:
        raise ValueError(f"parts: {len(parts)} layers need at least {len(parts)} sensors, the data have {num_nodes}")
    return [min(p, num_nodes - i) for i, p in enumerate(parts)]


@dataclass
class Shape:
    """What every model must fit: node count, steps and channels in and out, the calendar:
    ``steps_per_day`` turns the time-of-day embedding on, ``day_of_week`` the day-of-week one
    (only where training sees every weekday: `train.prepare`)."""

    num_nodes: int
    in_steps: int
    out_steps: int
    channels: int
    steps_per_day: int | None
    day_of_week: bool = False


class HistoricalAverage(nn.Module):
    """Predicts each node's mean over the (scaled) input window for every horizon."""

    def __init__(self, shape: Shape):
        super().__init__()
        self.out_steps = shape.out_steps

    def forward(self, x, tod=None, dow=None):
        return x.mean(1, keepdim=True).expand(-1, self.out_steps, -1, -1)


class LastValue(HistoricalAverage):
    """Repeats the last input step for every horizon."""

    def forward(self, x, tod=None, dow=None):
        return x[:, -1:].expand(-1, self.out_steps, -1, -1)


class NodeGRU(nn.Module):
    """A GRU over each node's own history (shared weights, no spatial mixing) + linear head;
    with ``last_value_residual`` it predicts the change from the last input step."""

    def __init__(self, shape: Shape, hidden: int = 64, last_value_residual: bool = False):
        super().__init__()
        self.shape, self.last_value_residual = shape, last_value_residual
        self.gru = nn.GRU(shape.channels, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, shape.out_steps * shape.channels)

    def forward(self, x, tod=None, dow=None):
        B, T, N, C = x.shape
        _, h = self.gru(x.permute(0, 2, 1, 3).reshape(B * N, T, C))
        y = self.head(h[-1]).view(B, N, self.shape.out_steps, C).permute(0, 2, 1, 3)
        return y + x[:, -1:] if self.last_value_residual else y


class ResidualMLP(nn.Module):
    """``x + Linear(Dropout(ReLU(Linear(x))))`` on ``[..., D]``, width D throughout."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim))

    def forward(self, x):
        return x + self.mlp(x)


class STID(nn.Module):
    """STID, Spatial-Temporal IDentity (Shao, Zhang, Wang, Wei and Xu, "Spatial-Temporal
    Identity: A Simple yet Effective Baseline for Multivariate Time Series Forecasting",
    CIKM 2022): no graph and no attention; nodes are told apart by learned identities.

    Each node's input window ``[T_in, C]`` is flattened and embedded (Linear -> ``dim``, the
    time series embedding) and concatenated with the node's own learnable embedding (``[N, dim]``,
    the spatial identity) and, when the data have a calendar (``shape.steps_per_day``), the
    time-of-day and day-of-week embeddings of the last input step (``dim`` each, the same for
    every node; the day of week only with ``shape.day_of_week``). ``layers`` residual MLPs
    (`ResidualMLP`) on the concatenation (``dim`` per part) and a Linear head to ``T_out * C``
    per node follow. The paper
    uses ``dim`` 32, 3 layers, dropout 0.15; `build` passes the harness's ``dim`` and dropout.

    forward: x ``[B, T_in, N, C]``, tod / dow ``[B]`` long (needed when the calendar is on)
    -> ``[B, T_out, N, C]``. With ``last_value_residual`` it predicts the change from the last
    input step."""

    def __init__(self, shape: Shape, dim: int = 32, layers: int = 3, dropout: float = 0.15,
                 last_value_residual: bool = False):
        super().__init__()
        self.shape, self.last_value_residual = shape, last_value_residual
        self.series = nn.Linear(shape.in_steps * shape.channels, dim)
        self.node = nn.Parameter(nn.init.xavier_uniform_(torch.empty(shape.num_nodes, dim)))
        self.tod = nn.Embedding(shape.steps_per_day, dim) if shape.steps_per_day is not None else None
        self.dow = nn.Embedding(7, dim) if shape.day_of_week else None
        width = dim * (2 + (self.tod is not None) + (self.dow is not None))
        self.mlp = nn.Sequential(*(ResidualMLP(width, dropout) for _ in range(layers)))
        self.head = nn.Linear(width, shape.out_steps * shape.channels)

    def forward(self, x, tod=None, dow=None):
        s = self.shape
        if x.dim() != 4 or tuple(x.shape[1:]) != (s.in_steps, s.num_nodes, s.channels):
            raise ValueError(f"x must be [B, {s.in_steps}, {s.num_nodes}, {s.channels}], got {tuple(x.shape)}")
        B, T, N, C = x.shape
        parts = [self.series(x.permute(0, 2, 1, 3).reshape(B, N, T * C)), self.node.expand(B, -1, -1)]
        parts += [time_embedding(name, table, ids, B).expand(-1, N, -1)
                  for name, table, ids in (("tod", self.tod, tod), ("dow", self.dow, dow)) if table is not None]
        y = self.head(self.mlp(torch.cat(parts, -1))).view(B, N, s.out_steps, C).permute(0, 2, 1, 3)
        return y + x[:, -1:] if self.last_value_residual else y


def _random_like(partition: Partition, seed: int) -> Partition:
    """Random node groups with the sizes of ``partition``'s subgraphs."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(partition.num_nodes))
    sizes = partition.lengths.tolist()
    starts = np.cumsum([0] + sizes[:-1])
    return Partition.from_parts([order[s:s + n].tolist() for s, n in zip(starts, sizes)], partition.num_nodes)


def build(name: str, adjacency, shape: Shape, *, parts, dim: int = 64, num_heads: int = 4, pe_dim: int = 8,
          dropout: float = 0.1, backend: str = "auto", seed: int = 0, last_value_residual: bool = False) -> nn.Module:
    """Model ``name`` (see module doc) for a graph and a data shape. ``last_value_residual``
    makes every learned model predict the change from the last input step."""
    if name == "historical_average":
        return HistoricalAverage(shape)
    if name == "last_value":
        return LastValue(shape)
    if name == "gru":
        return NodeGRU(shape, hidden=dim, last_value_residual=last_value_residual)
    if name == "stid":
        return STID(shape, dim=dim, dropout=dropout, last_value_residual=last_value_residual)
    if name not in SBA_VARIANTS + ("full_attention",):
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    common = dict(in_steps=shape.in_steps, in_channels=shape.channels, out_steps=shape.out_steps,
                  out_channels=shape.channels, dim=dim, num_heads=num_heads, dropout=dropout, backend=backend,
                  steps_per_day=shape.steps_per_day, day_of_week=shape.day_of_week,
                  last_value_residual=last_value_residual)
    parts = fit_parts(parts, shape.num_nodes)
    if name in ("sba", "sba_no_inter", "sba_no_pe", "sba_node_id"):
        return SBATransformer.from_graph(adjacency, parts, pe_dim=0 if name == "sba_no_pe" else pe_dim, seed=seed,
                                         inter=name != "sba_no_inter", node_embedding=name == "sba_node_id",
                                         **common)
    pe = laplacian_pe(adjacency, pe_dim)
    n = shape.num_nodes
    if name == "full_attention":
        whole = Partition.from_assignment(torch.zeros(n, dtype=torch.long))
        return SBATransformer(n, partitions=[whole] * len(parts), pe=pe, inter=False, **common)
    if name == "sba_random_part":
        partitions, _ = multiscale_partitions(adjacency, parts, seed=seed)
        partitions = [_random_like(p, seed + i) for i, p in enumerate(partitions)]
        return SBATransformer(n, partitions=partitions, pe=pe, adjacency=adjacency, **common)
    # sba_no_multiscale: the finest partition in every layer.
    fine = partition_graph(adjacency, parts[0], seed=seed)
    return SBATransformer(n, partitions=[fine] * len(parts), pe=pe, adjacency=adjacency, **common)
