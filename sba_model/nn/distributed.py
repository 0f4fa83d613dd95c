"""Beyond one device: spatial sharding of `SBATransformer` over ``torch.distributed``, and the
gradient and metric reductions that data parallelism and sharding share.

Spatial sharding. ``W`` ranks split the sensors: rank r owns a run of whole subgraphs of the
coarsest level of the nested multiscale partition, so at every layer each subgraph lies on one
rank and the intra attention needs nothing from the others. After `multiscale_partitions`
every subgraph of every level is a contiguous run of internal node ids, so rank r owns the
internal nodes ``plan.nodes(r)`` (a slice; user ids ``model.perm[plan.nodes(r)]``) and, at
layer l, the subgraphs ``plan.parts(l, r)``. What crosses ranks, per layer with an inter
attention:

* forward: the pooled tokens ``[B, P_r, D]`` of each rank, all-gathered so every rank runs the
  inter attention over all P tokens (`TokenGather`, an autograd-aware all-gather: torch's
  ``all_gather_single_autograd``, whose backward reduce-scatters, i.e. returns to each rank the
  sum over ranks of the gradient for its tokens);
* after backward: the parameter gradients, summed over ranks (`allreduce_gradients`), since
  each rank's loss covers only its own nodes.

The loss of the whole graph is the sum of the ranks' losses (a masked mean divides by the
count over all ranks, `all_reduce_sum`), so the summed gradient is exactly the single-process
gradient, and every rank takes the same optimizer step with the same parameters.

Every parameter is replicated (the per-node graph-bias weights too: N numbers per layer, so
the checkpoint of a shard is the single-process checkpoint); node features, attention
activations and the graph-bias blocks are held only for the rank's own nodes.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from sba_kernels import Partition

from ..graph.partitioning import positive_int
from .model import SBATransformer

__all__ = ["SpatialPlan", "plan_spatial", "balanced_bounds", "local_partition", "TokenGather", "SpatialShard",
           "allreduce_gradients", "all_reduce_sum"]


def balanced_bounds(sizes: Sequence[int], world_size: int) -> list[int]:
    """Split items of the given sizes, in order, into ``world_size`` non-empty contiguous groups
    so that the largest group's total is as small as possible.

    Returns ``world_size + 1`` boundaries ``b``: group r holds items ``b[r]:b[r+1]``. Binary
    search on the largest total; for a candidate, greedy filling tells whether it fits.
    """
    sizes = [int(s) for s in sizes]
    world_size = positive_int(world_size, "world_size")
    if len(sizes) < world_size:
        raise ValueError(f"world_size={world_size} ranks need at least as many coarsest-level subgraphs, "
                         f"got {len(sizes)}")

    def groups_needed(cap: int) -> int:
        count, load = 1, 0
        for s in sizes:
            if load + s > cap:
                count, load = count + 1, 0
            load += s
        return count

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if groups_needed(mid) <= world_size else (mid + 1, hi)
    # Greedy with the optimal cap, but leave at least one item for each rank still to fill.
    bounds, load = [0], 0
    for i, s in enumerate(sizes):
        left_items, left_groups = len(sizes) - i, world_size - len(bounds)
        if i > bounds[-1] and (load + s > lo or left_items == left_groups):
            bounds.append(i)
            load = 0
        load += s
    bounds.append(len(sizes))
    return bounds


@dataclass(frozen=True)
class SpatialPlan:
    """Which internal nodes and which subgraphs of each level every rank owns.

    ``node_bounds`` ``[W + 1]``: rank r owns internal nodes ``node_bounds[r]:node_bounds[r+1]``.
    ``part_bounds``: per level, ``[W + 1]`` boundaries of the subgraph ids rank r owns.
    """

    node_bounds: tuple[int, ...]
    part_bounds: tuple[tuple[int, ...], ...]

    @property
    def world_size(self) -> int:
        return len(self.node_bounds) - 1

    def nodes(self, rank: int) -> slice:
        """Rank ``rank``'s internal nodes."""
        return slice(self.node_bounds[rank], self.node_bounds[rank + 1])

    def parts(self, level: int, rank: int) -> slice:
        """Rank ``rank``'s subgraph ids at ``level``."""
        b = self.part_bounds[level]
        return slice(b[rank], b[rank + 1])

    def counts(self, level: int) -> list[int]:
        """Subgraphs per rank at ``level``."""
        b = self.part_bounds[level]
        return [hi - lo for lo, hi in zip(b, b[1:])]


def _runs(partition: Partition) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last node id of each subgraph ``[P]``, ValueError unless every
    subgraph is a contiguous run and the runs are in subgraph order."""
    first = partition.starts                       # None unless every subgraph is a run of ids
    if first is not None:
        first = first.long().cpu()
        end = first + partition.lengths.long().cpu()
    if first is None or int(first[0]) != 0 or not torch.equal(first[1:], end[:-1]):
        raise ValueError("partitions must be nested multiscale partitions in their internal node order "
                         "(sba_model.multiscale_partitions): every subgraph a contiguous run of ids, in order")
    return first, end


def plan_spatial(partitions: Sequence[Partition], world_size: int) -> SpatialPlan:
    """Split the nodes among ``world_size`` ranks along the coarsest level of ``partitions``.

    Args:
        partitions: one `Partition` per layer, finest first, as `multiscale_partitions` returns
            them (every subgraph a contiguous run of internal node ids, each level nested in
            the next); the last one is the coarsest.
        world_size: W ranks; at most the number of coarsest subgraphs.

    Returns:
        a `SpatialPlan`: rank r owns a contiguous run of whole coarsest subgraphs, chosen so the
        largest rank's node count is as small as possible (`balanced_bounds`), and at each level
        the subgraphs inside its nodes.

    Raises:
        ValueError when a level is not contiguous, or a subgraph of some level would straddle
        two ranks (the levels are not nested).
    """
    partitions = list(partitions)
    if not partitions or not all(isinstance(p, Partition) for p in partitions):
        raise TypeError("partitions must be a non-empty sequence of sba_kernels.Partition")
    for i, p in enumerate(partitions):
        if p.num_nodes != partitions[0].num_nodes:
            raise ValueError(f"partitions[{i}] covers {p.num_nodes} nodes, partitions[0] {partitions[0].num_nodes}: "
                             f"the levels of one model cover the same nodes")
    first, stop = _runs(partitions[-1])
    groups = balanced_bounds((stop - first).tolist(), world_size)
    node_bounds = tuple(int(first[g]) for g in groups[:-1]) + (partitions[-1].num_nodes,)
    part_bounds = []
    for level, p in enumerate(partitions):
        starts, _ = _runs(p)
        b = torch.searchsorted(starts, torch.tensor(node_bounds)).tolist()
        b[-1] = p.num_parts
        if not all(i < p.num_parts and int(starts[i]) == n for i, n in zip(b[:-1], node_bounds)):
            raise ValueError(f"partitions[{level}] has a subgraph across two ranks: the levels must be nested")
        part_bounds.append(tuple(b))
    return SpatialPlan(node_bounds, tuple(part_bounds))


def local_partition(partition: Partition, plan: SpatialPlan, level: int, rank: int) -> Partition:
    """Rank ``rank``'s subgraphs of ``partition`` (level ``level`` of ``plan``) over its own
    nodes, renumbered from 0: ``index`` ``[P_r, M_r]``, M_r its own largest subgraph."""
    if not isinstance(plan, SpatialPlan):
        raise TypeError(f"plan must be a SpatialPlan, got {type(plan).__name__}")
    if not (isinstance(level, numbers.Integral) and 0 <= level < len(plan.part_bounds)):
        raise ValueError(f"level must be in 0..{len(plan.part_bounds) - 1}, got {level!r}")
    if not (isinstance(rank, numbers.Integral) and not isinstance(rank, bool) and 0 <= rank < plan.world_size):
        raise ValueError(f"rank must be in 0..{plan.world_size - 1}, got {rank!r}")
    if partition.num_nodes != plan.node_bounds[-1] or partition.num_parts != plan.part_bounds[level][-1]:
        raise ValueError(f"partition ({partition.num_nodes} nodes, {partition.num_parts} subgraphs) is not level "
                         f"{level} of plan ({plan.node_bounds[-1]} nodes, {plan.part_bounds[level][-1]} subgraphs)")
    parts, nodes = plan.parts(level, rank), plan.nodes(rank)
    lengths = partition.lengths[parts]
    index = partition.index[parts, : int(lengths.max())]
    index = torch.where(index >= 0, index - nodes.start, index)
    return Partition(index, lengths, num_nodes=nodes.stop - nodes.start)


class TokenGather:
    """The pooled-token exchange of one layer on one rank (see `sba_model.nn.layers.LocalTokens`).

    ``gather``: this rank's tokens ``[B, P_r, D]`` -> all P tokens ``[B, P, D]`` in global
    subgraph order. Ranks hold different ``P_r``, so each pads to ``max P_r`` and the padding
    is dropped after the all-gather, which runs along dim 0 of ``[max P_r, B, D]``.
    Differentiable: the backward of ``torch.distributed._functional_collectives.
    all_gather_single_autograd`` (torch's successor of ``torch.distributed.nn.functional.
    all_gather``) reduce-scatters, returning to each rank the sum over ranks of the gradient
    for its tokens.
    ``own``: ``[B, P, D]`` -> this rank's rows ``[B, P_r, D]``.
    """

    def __init__(self, counts: Sequence[int], rank: int, group=None):
        self.counts, self.rank, self.group = list(counts), rank, group or dist.group.WORLD
        self.start = sum(self.counts[:rank])

    def gather(self, z: torch.Tensor) -> torch.Tensor:
        mine = self.counts[self.rank]
        if z.dim() != 3 or z.shape[1] != mine:
            raise ValueError(f"z must be [B, P_r={mine}, D], got {tuple(z.shape)}")
        width = max(self.counts)
        padded = F.pad(z, (0, 0, 0, width - mine)).transpose(0, 1).contiguous()      # [max P_r, B, D]
        every = funcol.all_gather_single_autograd(padded, 0, self.group)             # [W * max P_r, B, D]
        return torch.cat([every[r * width: r * width + c] for r, c in enumerate(self.counts)]).transpose(0, 1)

    def own(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, self.start: self.start + self.counts[self.rank]]


class SpatialShard(nn.Module):
    """Rank ``rank``'s part of an `SBATransformer` split by ``plan``.

    The model is changed in place: each block keeps its parameters (shared, replicated on every
    rank) but holds the rank's subgraphs (`local_partition`), its rows of the graph-bias blocks,
    and a `TokenGather`. ``self.model.state_dict()`` is the single-process model's: its
    checkpoints load into either.

    ``forward(x [B, T_in, n_r, C], tod, dow) -> [B, T_out, n_r, C_out]`` for the rank's nodes,
    whose user ids are ``self.user_nodes`` (``x = full_x[:, :, shard.user_nodes]``), in that
    order (a CPU tensor). Every rank must call it with the same batch size, as the ranks exchange tokens.
    """

    def __init__(self, model: SBATransformer, plan: SpatialPlan, rank: int, group=None):
        super().__init__()
        if not isinstance(model, SBATransformer):
            raise TypeError(f"model must be an SBATransformer, got {type(model).__name__}")
        if not isinstance(plan, SpatialPlan) or len(plan.part_bounds) != len(model.blocks):
            raise ValueError(f"plan must be a SpatialPlan with one level per block ({len(model.blocks)})")
        if not (isinstance(rank, numbers.Integral) and not isinstance(rank, bool) and 0 <= rank < plan.world_size):
            raise ValueError(f"rank must be an int in 0..{plan.world_size - 1}, got {rank!r}")
        if plan.node_bounds[-1] != model.num_nodes:
            raise ValueError(f"plan covers {plan.node_bounds[-1]} nodes, the model {model.num_nodes}")
        self.model, self.plan, self.rank = model, plan, rank
        self.nodes = plan.nodes(rank)
        for level, block in enumerate(model.blocks):
            part = local_partition(block.partition, plan, level, rank).to(block.partition.device)
            block._hold(part)
            block.intra._hold(part)
            block.intra.first_node = self.nodes.start
            if block.intra.blocks is not None:
                m = part.max_size
                block.intra.blocks = block.intra.blocks[plan.parts(level, rank), :m, :m].contiguous()
            block.tokens = TokenGather(plan.counts(level), rank, group)
        ids = torch.arange(model.num_nodes) if model.perm is None else model.perm.cpu()
        self.user_nodes = ids[self.nodes]       # [n_r] long, on the CPU where batches are cut

    @property
    def num_nodes(self) -> int:
        """n_r, the rank's node count."""
        return self.nodes.stop - self.nodes.start

    def forward(self, x: torch.Tensor, tod: Optional[torch.Tensor] = None,
                dow: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = self.model
        if x.dim() != 4 or tuple(x.shape[1:]) != (m.in_steps, self.num_nodes, m.in_channels):
            raise ValueError(f"x must be [B, {m.in_steps}, n_r={self.num_nodes}, {m.in_channels}] "
                             f"(rank {self.rank}'s nodes), got {tuple(x.shape)}")
        return m.forward_nodes(x, tod, dow, nodes=self.nodes)


def allreduce_gradients(parameters: Iterable[nn.Parameter], group=None) -> None:
    """Sum every parameter's gradient over the ranks of ``group``, in place (one all-reduce per
    dtype and device; a missing gradient counts as zeros and is set)."""
    buckets: dict = {}
    for p in parameters:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            buckets.setdefault((p.dtype, p.device), []).append(p)
    for params in buckets.values():
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, group=group)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks (a new tensor, outside autograd)."""
    out = tensor.detach().clone()
    dist.all_reduce(out, group=group)
    return out
