"""METIS partitions of the sensor graph: one level, or nested levels for the multiscale model."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

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

# Partitions with a size cap (``max_size``). METIS moves a node only into a part with room left,
# so when the parts must all be nearly max_size it can hardly refine the cut. k-NN graphs (k = 8)
# at N = 1e5, caps 64 / 128 (one METIS call), edge cut over that of the uncapped ceil(N / cap)
# partition: ceil(N / cap) capped parts 3.4 / 2.0x; 1 % more parts 1.16 / 1.06x; 2 % more parts
# 0.95-0.97 / 1.03-1.04x (two graphs), the subgraphs then 98 % full on average. At cap 32 (over
# 2048 parts: two stages) 2 % more parts cut 0.90-0.91x (bench/results/static/tiles.md for 1e6).
_CAP_HEADROOM = 0.02
_KWAY_DEFAULT_UFACTOR = 30     # METIS k-way: a part may be 1.03 x the average


def metis_assignment(adjacency: sp.csr_matrix, num_parts: int, *, seed: int = 0, vweights=None,
                     max_size: int | None = None) -> np.ndarray:
    """Per-node part id in ``0..num_parts-1`` (some ids may go unused) for a symmetric CSR graph.

    Handles the cases METIS does not: one part, as many parts as nodes, no edges at all. More
    than ``_KWAY_MAX_PARTS`` parts are cut in two stages (`_two_stage_assignment`).
    ``max_size`` (in vertex weight) sets METIS's imbalance tolerance so that its bound on a part
    stays within it (`_cap_ufactor`); METIS can still miss it, which `_capped_assignment` repairs.
    """
    num_parts = positive_int(num_parts, "num_parts")
    n = adjacency.shape[0]
    if num_parts == 1:
        return np.zeros(n, dtype=np.int64)
    if num_parts >= n:
        return np.arange(n, dtype=np.int64)
    if adjacency.nnz == 0:   # nothing to cut: contiguous, balanced chunks
        return np.arange(n, dtype=np.int64) * num_parts // n
    if num_parts > _KWAY_MAX_PARTS:
        return _two_stage_assignment(adjacency, num_parts, seed=seed, vweights=vweights, max_size=max_size)
    options = dict(seed=seed)
    if max_size is not None:
        total_weight = n if vweights is None else int(np.sum(vweights))
        options["ufactor"] = _cap_ufactor(total_weight, num_parts, max_size)
    return _kway_assignment(adjacency, num_parts, vweights=vweights, **options)


def _cap_ufactor(total_weight: int, num_parts: int, max_size: int) -> int:
    """METIS's imbalance tolerance (``ufactor``, in 1/1000 of the average part) whose bound on a
    part, ``(1 + ufactor / 1000) * total_weight / num_parts``, stays below ``max_size + 1`` (a
    0.1/1000 margin covers METIS's rounding); at least 1 (METIS refuses 0) and at most METIS k-way's
    default, so a generous ``num_parts`` still gets parts as balanced as without a cap."""
    room = (max_size + 1) * num_parts / total_weight - 1        # the excess over the average allowed
    return min(_KWAY_DEFAULT_UFACTOR, max(1, math.ceil(1000 * room - 0.1) - 1))


def _kway_assignment(adjacency: sp.csr_matrix, num_parts: int, *, seed: int, vweights,
                     ufactor: int | None = None) -> np.ndarray:
    """One METIS call (min edge cut, parts balanced by vertex weight within ``ufactor``, else
    METIS's default). pymetis bisects recursively up to 8 parts and runs k-way above."""
    import pymetis

    w = adjacency.data
    eweights = np.maximum(1, np.rint(_WEIGHT_LEVELS * w / w.max())).astype(np.int64)
    _, membership = pymetis.part_graph(
        num_parts,
        pymetis.CSRAdjacency(adjacency.indptr.astype(np.int64), adjacency.indices.astype(np.int64)),
        eweights=eweights,
        vweights=None if vweights is None else np.asarray(vweights, dtype=np.int64),
        options=pymetis.Options(seed=seed) if ufactor is None else pymetis.Options(seed=seed, ufactor=ufactor),
    )
    return np.asarray(membership, dtype=np.int64)


def _two_stage_assignment(adjacency: sp.csr_matrix, num_parts: int, *, seed: int, vweights,
                          max_size: int | None) -> np.ndarray:
    """METIS into ``ceil(num_parts / _REGION_PARTS)`` regions, then each region (its induced
    subgraph) into a number of parts proportional to its vertex weight, at least one. With
    ``max_size``, each region's share is rounded up, so that its parts average no more than the
    whole graph's and keep the headroom under the cap (up to one part per region more than
    ``num_parts`` in all), and its tolerance comes from its own weight and share.

    The regions are made contiguous by one permutation, so each region's subgraph is a
    contiguous diagonal block: a slice, not a fancy index over all N columns.
    """
    n = adjacency.shape[0]
    weight = np.ones(n, dtype=np.int64) if vweights is None else np.asarray(vweights, dtype=np.int64)
    regions = _compact(metis_assignment(adjacency, -(-num_parts // _REGION_PARTS), seed=seed, vweights=vweights))
    num_regions = int(regions.max()) + 1
    region_weights = np.bincount(regions, weights=weight, minlength=num_regions).astype(np.int64)
    if max_size is None:
        shares = _proportional_shares(region_weights, num_parts)
    else:
        shares = -(-num_parts * region_weights // region_weights.sum())
    order = np.argsort(regions, kind="stable")
    ordered = adjacency[order][:, order].tocsr()
    bounds = np.concatenate([[0], np.cumsum(np.bincount(regions, minlength=num_regions))])
    first_part = np.concatenate([[0], np.cumsum(shares)])
    out = np.empty(n, dtype=np.int64)
    for r in range(num_regions):
        lo, hi = bounds[r], bounds[r + 1]
        local = metis_assignment(ordered[lo:hi, lo:hi], int(shares[r]), seed=seed, vweights=weight[order[lo:hi]],
                                 max_size=max_size)
        out[order[lo:hi]] = first_part[r] + local
    return out


def _proportional_shares(weights: np.ndarray, total: int) -> np.ndarray:
    """``total`` split over ``len(weights)`` bins in proportion to ``weights``, at least 1 each
    (largest remainders get the rounding); needs ``total >= len(weights)``."""
    exact = 1 + (total - len(weights)) * weights / weights.sum()
    shares = np.floor(exact).astype(np.int64)
    shares[np.argsort(shares - exact)[: total - shares.sum()]] += 1
    return shares


def positive_int(value, name: str) -> int:
    """``value`` as an int (numpy's too), or ValueError naming ``name`` unless it is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_max_size(max_size) -> int:
    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)):
        raise TypeError(f"max_size must be an int, got {type(max_size).__name__}")
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    return int(max_size)


def _capped_num_parts(num_nodes: int, max_size: int, num_parts, name: str) -> int:
    """The part count METIS is asked for under a cap: ``num_parts`` if given (checked to leave
    room for every node), else one part if the graph fits it, else N / max_size plus
    `_CAP_HEADROOM`."""
    if num_parts is None:
        return 1 if num_nodes <= max_size else math.ceil(num_nodes * (1 + _CAP_HEADROOM) / max_size)
    num_parts = positive_int(num_parts, name)
    if num_parts * max_size < num_nodes:
        raise ValueError(f"{name} = {num_parts} parts of at most max_size = {max_size} nodes cannot hold "
                         f"{num_nodes} nodes: {name} must be >= {-(-num_nodes // max_size)}")
    return num_parts


def _capped_assignment(adjacency: sp.csr_matrix, max_size: int, num_parts: int, *, seed: int = 0) -> np.ndarray:
    """Per-node part id ``[N]`` (int64, ids may go unused) in which no part has more than
    ``max_size`` nodes, for a symmetric CSR graph.

    METIS cuts ``num_parts`` parts with its tolerance set to respect the cap. It can still miss
    (by a node where parts average close to the cap; by far on a star, all of whose leaves it
    leaves with the hub): each part over the cap is cut again by METIS into
    ``ceil(size * (1 + _CAP_HEADROOM) / max_size)`` pieces, and a piece METIS leaves over the cap is
    cut into equal runs of a breadth-first (Cuthill-McKee) order, which always fit. Pieces get
    new ids after ``num_parts``.
    """
    assignment = metis_assignment(adjacency, num_parts, seed=seed, max_size=max_size)

    def metis_pieces(sub: sp.csr_matrix) -> np.ndarray:
        pieces = math.ceil(sub.shape[0] * (1 + _CAP_HEADROOM) / max_size)
        return metis_assignment(sub, pieces, seed=seed, max_size=max_size)

    assignment = _split_oversized(adjacency, assignment, max_size, metis_pieces)
    return _split_oversized(adjacency, assignment, max_size, lambda sub: _order_runs(sub, max_size))


def _split_oversized(adjacency: sp.csr_matrix, assignment: np.ndarray, max_size: int,
                     split: Callable[[sp.csr_matrix], np.ndarray]) -> np.ndarray:
    """``assignment`` with every part over ``max_size`` nodes replaced by the pieces ``split``
    makes of its induced subgraph (piece 0 keeps the part's id, the others get new ids)."""
    sizes = np.bincount(assignment)
    oversized = np.flatnonzero(sizes > max_size)
    if oversized.size == 0:
        return assignment
    out = assignment.copy()
    next_id = sizes.size
    by_part = np.argsort(assignment, kind="stable")      # part p's nodes: by_part[starts[p]:starts[p + 1]]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for part in oversized:
        nodes = by_part[starts[part]:starts[part + 1]]
        pieces = _compact(split(adjacency[nodes][:, nodes]))
        moved = pieces > 0
        out[nodes[moved]] = next_id + pieces[moved] - 1
        next_id += int(pieces.max())
    return out


def _order_runs(adjacency: sp.csr_matrix, max_size: int) -> np.ndarray:
    """``ceil(n / max_size)`` near-equal pieces (sizes differ by at most one, so none exceeds
    ``max_size``), each a run of the reverse Cuthill-McKee order: a breadth-first order, so a run
    holds graph neighbours."""
    n = adjacency.shape[0]
    order = sp.csgraph.reverse_cuthill_mckee(adjacency.tocsr(), symmetric_mode=True)
    pieces = np.empty(n, dtype=np.int64)
    pieces[order] = np.arange(n) * math.ceil(n / max_size) // n
    return pieces


def partition_graph(adjacency, num_parts: int | None = None, *, max_size: int | None = None,
                    seed: int = 0) -> Partition:
    """Split the graph into balanced subgraphs with METIS (k-way, min edge cut).

    Args:
        adjacency: any form `sba_model.graph.adjacency.to_csr` accepts (scipy.sparse, dense
            ``[N, N]``, ``edge_index [2, E]``); weights steer the cut.
        num_parts: P wanted. ``P >= N`` gives singletons. METIS can leave parts empty when P
            is large; those are dropped, so the result may have fewer than P subgraphs.
            Needed unless ``max_size`` is given.
        max_size: the most nodes a subgraph may have, guaranteed (a kernel tile of that many
            rows then holds any subgraph). ``num_parts`` defaults to ``ceil(1.02 N / max_size)``
            (1 when ``N <= max_size``): the 2 % headroom lets METIS refine the cut (see
            `_CAP_HEADROOM`); a given ``num_parts`` must be >= ``N / max_size``. The result may
            have more subgraphs than asked: over 2048 parts, up to one per 64 (see
            `_two_stage_assignment`), and the parts METIS leaves over the cap are cut again
            (`_capped_assignment`).
        seed: METIS's random seed (same seed, same graph -> same partition).

    Returns:
        a `Partition` on the CPU: ``index`` ``[P, M]``, ``lengths`` ``[P]``, with
        ``M <= max_size`` when ``max_size`` is given.
    """
    if max_size is None:
        if num_parts is None:
            raise TypeError("partition_graph needs num_parts or max_size")
        num_parts = positive_int(num_parts, "num_parts")
        return Partition.from_assignment(metis_assignment(to_csr(adjacency), num_parts, seed=seed), num_parts)
    max_size = _check_max_size(max_size)
    csr = to_csr(adjacency)
    num_parts = _capped_num_parts(csr.shape[0], max_size, num_parts, "num_parts")
    return Partition.from_assignment(_capped_assignment(csr, max_size, num_parts, seed=seed))


def _quotient_graph(csr: sp.csr_matrix, assignment: np.ndarray, num_parts: int) -> sp.csr_matrix:
    """Graph among parts: weight(p, q) = total edge weight between their nodes (one COO sum of
    the edges relabelled by part, not two sparse products)."""
    coo = csr.tocoo()
    q = sp.csr_matrix((coo.data, (assignment[coo.row], assignment[coo.col])), shape=(num_parts, num_parts))
    q.setdiag(0)
    q.eliminate_zeros()
    return q


def multiscale_partitions(adjacency, parts: Sequence[int], *, max_size: int | None = None,
                          seed: int = 0) -> tuple[list[Partition], torch.Tensor]:
    """Nested partitions, finest first, in a node order where every subgraph is contiguous.

    Level 0 is METIS on the graph; level ``l`` partitions the graph *between* level ``l-1``'s
    subgraphs (weighted by their sizes and cut weights), so each coarse subgraph is a union of
    finer ones.

    Args:
        adjacency: the sensor graph (any form `to_csr` accepts).
        parts: ``[P_1, P_2, ...]``, strictly decreasing.
        max_size: caps the subgraphs of level 0 at this many nodes, as in `partition_graph`
            (``P_1`` must then be >= ``N / max_size``; the few subgraphs METIS leaves over the
            cap are cut again, so level 0 may have a few more than ``P_1``). Coarser levels
            group whole level-0 subgraphs, so they are not capped.
        seed: METIS seed.

    Returns:
        ``(partitions, perm)``: ``perm`` ``[N]`` long with ``perm[new] = old`` node id (reorder
        node tensors with ``x[:, perm]``), and one `Partition` per level over the *reordered*
        node ids, in which every subgraph is a contiguous ascending run of ids.
    """
    parts = [positive_int(p, "parts[i]") for p in parts]
    if not parts:
        raise ValueError("parts must list at least one level")
    if any(a <= b for a, b in zip(parts, parts[1:])):
        raise ValueError(f"parts must be strictly decreasing (finest level first), got {parts}")
    csr = to_csr(adjacency)
    n = csr.shape[0]

    if max_size is None:
        finest = metis_assignment(csr, parts[0], seed=seed)
    else:
        max_size = _check_max_size(max_size)
        finest = _capped_assignment(csr, max_size, _capped_num_parts(n, max_size, parts[0], "parts[0]"), seed=seed)
    levels = [_compact(finest)]
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
    threshold = positive_int(threshold, "inter_threshold")
    group_size = positive_int(group_size, "group_size")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (groups of one never shrink the level), got {group_size}")
    return threshold, group_size


def hierarchy_parts(num_tokens: int, threshold: int = INTER_THRESHOLD, group_size: int = INTER_GROUP_SIZE) -> list[int]:
    """The group counts of the levels above ``num_tokens`` pooled tokens: ``ceil(T / g)``,
    ``ceil(T / g^2)``, ... until one is at most ``threshold``; empty when ``T <= threshold``."""
    threshold, group_size = _check_hierarchy_args(threshold, group_size)
    counts = [positive_int(num_tokens, "num_tokens")]
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
                     group_size: int = INTER_GROUP_SIZE, max_size: int | None = None, seed: int = 0):
    """Everything a multiscale model needs from its graph: one node partition per layer, the
    inter-attention levels of each layer, and the node order.

    The node levels ``parts`` are extended with coarser ones (`hierarchy_parts` of the last,
    or of the count it came out with where ``max_size`` pushed it past ``threshold``) and all
    are computed by `multiscale_partitions`, so they nest. Layer ``l`` with more than
    ``threshold`` subgraphs groups its tokens by the next levels of that chain until one has at
    most ``threshold``: every group is then a contiguous run of token ids, and every node level
    a contiguous run of node ids. ``max_size`` caps the finest level's subgraphs, as in
    `multiscale_partitions` (a cap of the kernel's tile keeps every subgraph in one tile).

    Returns:
        ``(partitions, inter_levels, perm)``: ``len(parts)`` node `Partition`s (finest first),
        one list of token-level `Partition`s per layer (empty where ``P_l <= threshold``), and
        ``perm`` as in `multiscale_partitions`.
    """
    threshold, group_size = _check_hierarchy_args(threshold, group_size)
    parts = list(parts)
    extra = hierarchy_parts(parts[-1], threshold, group_size) if parts else []
    chain, perm = multiscale_partitions(adjacency, parts + extra, max_size=max_size, seed=seed)
    last = chain[len(parts) - 1].num_parts
    if not extra and last > threshold:
        # A single level at or below the threshold as asked, past it as made: ``max_size`` cut a
        # few subgraphs again. Group the count it has (levels come finest first, so level 0 is the
        # same again); levels must shrink, so group counts not under the one asked for drop out.
        extra = [c for c in hierarchy_parts(last, threshold, group_size) if c < parts[-1]]
        chain, perm = multiscale_partitions(adjacency, parts + (extra or [min(threshold, parts[-1] - 1)]),
                                            max_size=max_size, seed=seed)
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
