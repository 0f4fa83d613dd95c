"""METIS partitions of the sensor graph: one level, or nested levels for the multiscale model."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from sba_kernels import Partition

from .adjacency import to_csr

__all__ = ["partition_graph", "multiscale_partitions", "metis_assignment", "token_levels", "nested_levels",
           "hierarchy_parts", "model_partitions", "INTER_THRESHOLD", "INTER_GROUP_SIZE"]

# METIS wants integer edge weights; float weights are scaled into 1.._WEIGHT_LEVELS.
_WEIGHT_LEVELS = 1000

# Hierarchical inter attention (see `sba_model.nn.layers.InterAttention`): above INTER_THRESHOLD
# pooled tokens, tokens are grouped about INTER_GROUP_SIZE at a time, level after level. The
# dense top level then costs at most INTER_THRESHOLD^2 and each level below it O(tokens * group).
INTER_THRESHOLD = 2048
INTER_GROUP_SIZE = 64


# METIS k-way stops coarsening while its graph still has a few dozen vertices per part, so one
# call's cost grows with the number of parts: 15,625 parts of a 1e6-node k-NN graph took 26 s on
# two cores, most of it spent partitioning a coarsest graph of hundreds of thousands of vertices.
# Above _KWAY_MAX_PARTS parts the graph is cut in two stages instead: METIS into regions of about
# _REGION_PARTS parts each, then every region into its share of the parts.
_KWAY_MAX_PARTS = 2048
_REGION_PARTS = 64


def metis_assignment(adjacency: sp.csr_matrix, num_parts: int, *, seed: int = 0, vweights=None) -> np.ndarray:
    """Per-node part id in ``0..num_parts-1`` (some ids may go unused) for a symmetric CSR graph.

    Handles the cases METIS does not: one part, as many parts as nodes, no edges at all. More
    than ``_KWAY_MAX_PARTS`` parts are cut in two stages (`_two_stage_assignment`).
    """
    num_parts = _check_num_parts(num_parts, "num_parts")
    n = adjacency.shape[0]
    if num_parts == 1:
        return np.zeros(n, dtype=np.int64)
    if num_parts >= n:
        return np.arange(n, dtype=np.int64)
    if adjacency.nnz == 0:   # nothing to cut: contiguous, balanced chunks
        return np.arange(n, dtype=np.int64) * num_parts // n
    if num_parts > _KWAY_MAX_PARTS:
        return _two_stage_assignment(adjacency, num_parts, seed=seed, vweights=vweights)
    return _kway_assignment(adjacency, num_parts, seed=seed, vweights=vweights)


def _kway_assignment(adjacency: sp.csr_matrix, num_parts: int, *, seed: int, vweights) -> np.ndarray:
    """One METIS k-way call (min edge cut, balanced by vertex weight)."""
    import pymetis

    w = adjacency.data
    eweights = np.maximum(1, np.rint(_WEIGHT_LEVELS * w / w.max())).astype(np.int64)
    _, membership = pymetis.part_graph(
        num_parts,
        pymetis.CSRAdjacency(adjacency.indptr.astype(np.int64), adjacency.indices.astype(np.int64)),
        eweights=eweights,
        vweights=None if vweights is None else np.asarray(vweights, dtype=np.int64),
        options=pymetis.Options(seed=seed),
    )
    return np.asarray(membership, dtype=np.int64)


def _two_stage_assignment(adjacency: sp.csr_matrix, num_parts: int, *, seed: int, vweights) -> np.ndarray:
    """METIS into ``ceil(num_parts / _REGION_PARTS)`` regions, then each region (its induced
    subgraph) into a number of parts proportional to its vertex weight, at least one.

    The regions are made contiguous by one permutation, so each region's subgraph is a
    contiguous diagonal block: a slice, not a fancy index over all N columns.
    """
    n = adjacency.shape[0]
    weight = np.ones(n, dtype=np.int64) if vweights is None else np.asarray(vweights, dtype=np.int64)
    regions = _compact(metis_assignment(adjacency, -(-num_parts // _REGION_PARTS), seed=seed, vweights=vweights))
    num_regions = int(regions.max()) + 1
    shares = _proportional_shares(np.bincount(regions, weights=weight, minlength=num_regions), num_parts)
    order = np.argsort(regions, kind="stable")
    ordered = adjacency[order][:, order].tocsr()
    bounds = np.concatenate([[0], np.cumsum(np.bincount(regions, minlength=num_regions))])
    first_part = np.concatenate([[0], np.cumsum(shares)])
    out = np.empty(n, dtype=np.int64)
    for r in range(num_regions):
        lo, hi = bounds[r], bounds[r + 1]
        local = metis_assignment(ordered[lo:hi, lo:hi], int(shares[r]), seed=seed, vweights=weight[order[lo:hi]])
        out[order[lo:hi]] = first_part[r] + local
    return out


def _proportional_shares(weights: np.ndarray, total: int) -> np.ndarray:
    """``total`` split over ``len(weights)`` bins in proportion to ``weights``, at least 1 each
    (largest remainders get the rounding); needs ``total >= len(weights)``."""
    exact = 1 + (total - len(weights)) * weights / weights.sum()
    shares = np.floor(exact).astype(np.int64)
    shares[np.argsort(shares - exact)[: total - shares.sum()]] += 1
    return shares


def _check_num_parts(num_parts, name: str) -> int:
    if isinstance(num_parts, bool) or not isinstance(num_parts, (int, np.integer)) or num_parts < 1:
        raise ValueError(f"{name} must be a positive int, got {num_parts!r}")
    return int(num_parts)


def partition_graph(adjacency, num_parts: int, *, seed: int = 0) -> Partition:
    """Split the graph into ``num_parts`` balanced subgraphs with METIS (k-way, min edge cut).

    Args:
        adjacency: any form `sba_model.graph.adjacency.to_csr` accepts (scipy.sparse, dense
            ``[N, N]``, ``edge_index [2, E]``); weights steer the cut.
        num_parts: P wanted. ``P >= N`` gives singletons. METIS can leave parts empty when P
            is large; those are dropped, so the result may have fewer than P subgraphs.
        seed: METIS's random seed (same seed, same graph -> same partition).

    Returns:
        a `Partition` on the CPU.
    """
    num_parts = _check_num_parts(num_parts, "num_parts")
    csr = to_csr(adjacency)
    return Partition.from_assignment(metis_assignment(csr, num_parts, seed=seed), num_parts)


def _quotient_graph(csr: sp.csr_matrix, assignment: np.ndarray, num_parts: int) -> sp.csr_matrix:
    """Graph among parts: weight(p, q) = total edge weight between their nodes (one COO sum of
    the edges relabelled by part, not two sparse products)."""
    coo = csr.tocoo()
    q = sp.csr_matrix((coo.data, (assignment[coo.row], assignment[coo.col])), shape=(num_parts, num_parts))
    q.setdiag(0)
    q.eliminate_zeros()
    return q


def multiscale_partitions(adjacency, parts: Sequence[int], *, seed: int = 0) -> tuple[list[Partition], torch.Tensor]:
    """Nested partitions, finest first, in a node order where every subgraph is contiguous.

    Level 0 is METIS on the graph; level ``l`` partitions the graph *between* level ``l-1``'s
    subgraphs (weighted by their sizes and cut weights), so each coarse subgraph is a union of
    finer ones.

    Args:
        adjacency: the sensor graph (any form `to_csr` accepts).
        parts: ``[P_1, P_2, ...]``, strictly decreasing.
        seed: METIS seed.

    Returns:
        ``(partitions, perm)``: ``perm`` ``[N]`` long with ``perm[new] = old`` node id (reorder
        node tensors with ``x[:, perm]``), and one `Partition` per level over the *reordered*
        node ids, in which every subgraph is a contiguous ascending run of ids.
    """
    parts = [_check_num_parts(p, "parts[i]") for p in parts]
    if not parts:
        raise ValueError("parts must list at least one level")
    if any(a <= b for a, b in zip(parts, parts[1:])):
        raise ValueError(f"parts must be strictly decreasing (finest level first), got {parts}")
    csr = to_csr(adjacency)
    n = csr.shape[0]

    levels = [_compact(metis_assignment(csr, parts[0], seed=seed))]
    for p in parts[1:]:
        fine = levels[-1]
        n_fine = int(fine.max()) + 1
        sizes = np.bincount(fine, minlength=n_fine)
        coarse_of_fine = metis_assignment(_quotient_graph(csr, fine, n_fine), p, seed=seed, vweights=sizes)
        levels.append(_compact(coarse_of_fine[fine]))

    # Coarsest level is the primary sort key, node id the last: np.lexsort sorts by its last key.
    perm = np.lexsort((np.arange(n),) + tuple(levels))
    partitions = [Partition.from_assignment(_compact(a[perm])) for a in levels]
    return partitions, torch.from_numpy(perm).long()


def _check_hierarchy_args(threshold, group_size) -> tuple[int, int]:
    threshold = _check_num_parts(threshold, "inter_threshold")
    group_size = _check_num_parts(group_size, "group_size")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (groups of one never shrink the level), got {group_size}")
    return threshold, group_size


def hierarchy_parts(num_tokens: int, threshold: int = INTER_THRESHOLD, group_size: int = INTER_GROUP_SIZE) -> list[int]:
    """The group counts of the levels above ``num_tokens`` pooled tokens: ``ceil(T / g)``,
    ``ceil(T / g^2)``, ... until one is at most ``threshold``; empty when ``T <= threshold``."""
    threshold, group_size = _check_hierarchy_args(threshold, group_size)
    counts = [_check_num_parts(num_tokens, "num_tokens")]
    while counts[-1] > threshold:
        counts.append(-(-counts[-1] // group_size))
    return counts[1:]


def token_levels(adjacency, partition: Partition, *, threshold: int = INTER_THRESHOLD,
                 group_size: int = INTER_GROUP_SIZE, seed: int = 0) -> list[Partition]:
    """Levels of the hierarchical inter attention for any node partition: the graph between
    ``partition``'s subgraphs (the quotient graph, weighted by cut weights, vertices by subgraph
    size) split by METIS into groups of about ``group_size`` tokens, then the graph between
    those groups, and so on until at most ``threshold`` remain.

    Args:
        adjacency: the graph ``partition`` partitions (any form `to_csr` accepts).
        partition: the node partition; its ``P`` subgraphs are the level-0 tokens.
        threshold: the largest token count attended densely. group_size: tokens per group (>= 2).
        seed: METIS seed.

    Returns:
        ``levels``: level ``i`` is a `Partition` of level ``i``'s tokens (``levels[0].num_nodes == P``)
        into ``levels[i].num_parts`` groups, which are level ``i + 1``'s tokens; empty when
        ``P <= threshold``. Groups are not contiguous runs of token ids (the partition's order
        is kept); `model_partitions` gives contiguous ones.
    """
    threshold, group_size = _check_hierarchy_args(threshold, group_size)
    if not isinstance(partition, Partition):
        raise TypeError(f"partition must be a sba_kernels.Partition, got {type(partition).__name__}")
    csr = to_csr(adjacency)
    if csr.shape[0] != partition.num_nodes:
        raise ValueError(f"adjacency has {csr.shape[0]} nodes but partition has num_nodes={partition.num_nodes}")
    graph = _quotient_graph(csr, partition.assignment.cpu().numpy(), partition.num_parts)
    sizes = partition.lengths.cpu().numpy().astype(np.int64)
    levels = []
    while graph.shape[0] > threshold:
        groups = _compact(metis_assignment(graph, -(-graph.shape[0] // group_size), seed=seed, vweights=sizes))
        levels.append(Partition.from_assignment(groups))
        graph = _quotient_graph(graph, groups, levels[-1].num_parts)
        sizes = np.bincount(groups, weights=sizes).astype(np.int64)
    return levels


def nested_levels(partitions: Sequence[Partition]) -> list[Partition]:
    """Token levels from nested partitions of one node set, finest first: level ``i`` groups
    the subgraphs of ``partitions[i]`` (its tokens) by the subgraph of ``partitions[i + 1]``
    that holds them. Raises ValueError if the partitions are not nested."""
    levels = []
    for i, (fine, coarse) in enumerate(zip(partitions, partitions[1:])):
        if fine.num_nodes != coarse.num_nodes:
            raise ValueError(f"partitions[{i}] and partitions[{i + 1}] must partition the same nodes")
        real = fine.index >= 0
        group = coarse.assignment[fine.index[:, 0].long()]                 # via each subgraph's first node
        row = torch.arange(fine.num_parts, device=fine.device).unsqueeze(1).expand_as(fine.index)
        if not torch.equal(coarse.assignment[fine.index[real].long()], group[row[real]]):
            raise ValueError(f"partitions must be nested: a subgraph of partitions[{i}] straddles two of "
                             f"partitions[{i + 1}]")
        levels.append(Partition.from_assignment(group, coarse.num_parts))
    return levels


def model_partitions(adjacency, parts: Sequence[int], *, threshold: int = INTER_THRESHOLD,
                     group_size: int = INTER_GROUP_SIZE, seed: int = 0):
    """Everything a multiscale model needs from its graph: one node partition per layer, the
    inter-attention levels of each layer, and the node order.

    The node levels ``parts`` are extended with coarser ones (`hierarchy_parts` of the last)
    and all are computed by `multiscale_partitions`, so they nest. Layer ``l`` with more than
    ``threshold`` subgraphs groups its tokens by the next levels of that chain until one has at
    most ``threshold``: every group is then a contiguous run of token ids, and every node level
    a contiguous run of node ids.

    Returns:
        ``(partitions, inter_levels, perm)``: ``len(parts)`` node `Partition`s (finest first),
        one list of token-level `Partition`s per layer (empty where ``P_l <= threshold``), and
        ``perm`` as in `multiscale_partitions`.
    """
    threshold, group_size = _check_hierarchy_args(threshold, group_size)
    parts = list(parts)
    extra = hierarchy_parts(parts[-1], threshold, group_size) if parts else []
    chain, perm = multiscale_partitions(adjacency, parts + extra, seed=seed)
    inter_levels = []
    for layer in range(len(parts)):
        top = layer
        while chain[top].num_parts > threshold:     # the chain ends at or below the threshold
            top += 1
        inter_levels.append(nested_levels(chain[layer: top + 1]))
    return chain[: len(parts)], inter_levels, perm


def _compact(assignment: np.ndarray) -> np.ndarray:
    """Renumber part ids 0.. by first appearance, dropping unused ids."""
    _, first, inverse = np.unique(assignment, return_index=True, return_inverse=True)
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse]
