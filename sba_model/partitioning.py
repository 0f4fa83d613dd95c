"""METIS partitions of the sensor graph: one level, or nested levels for the multiscale model."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from sba_kernels import Partition

from .adjacency import to_csr

__all__ = ["partition_graph", "multiscale_partitions", "metis_assignment"]

# METIS wants integer edge weights; float weights are scaled into 1.._WEIGHT_LEVELS.
_WEIGHT_LEVELS = 1000


def metis_assignment(adjacency: sp.csr_matrix, num_parts: int, *, seed: int = 0, vweights=None) -> np.ndarray:
    """Per-node part id in ``0..num_parts-1`` (some ids may go unused) for a symmetric CSR graph.

    Handles the cases METIS does not: one part, as many parts as nodes, no edges at all.
    """
    import pymetis

    n = adjacency.shape[0]
    if num_parts == 1:
        return np.zeros(n, dtype=np.int64)
    if num_parts >= n:
        return np.arange(n, dtype=np.int64)
    if adjacency.nnz == 0:   # nothing to cut: contiguous, balanced chunks
        return np.arange(n, dtype=np.int64) * num_parts // n
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


def _check_num_parts(num_parts, name: str) -> int:
    if isinstance(num_parts, bool) or not isinstance(num_parts, (int, np.integer)) or num_parts < 1:
        raise ValueError(f"{name} must be a positive int, got {num_parts!r}")
    return int(num_parts)


def partition_graph(adjacency, num_parts: int, *, seed: int = 0) -> Partition:
    """Split the graph into ``num_parts`` balanced subgraphs with METIS (k-way, min edge cut).

    Args:
        adjacency: any form `sba_model.adjacency.to_csr` accepts (scipy.sparse, dense
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
    """Graph among parts: weight(p, q) = total edge weight between their nodes."""
    n = csr.shape[0]
    member = sp.csr_matrix((np.ones(n), (np.arange(n), assignment)), shape=(n, num_parts))
    q = (member.T @ csr @ member).tocsr()
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


def _compact(assignment: np.ndarray) -> np.ndarray:
    """Renumber part ids 0.. by first appearance, dropping unused ids."""
    _, first, inverse = np.unique(assignment, return_index=True, return_inverse=True)
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse]
