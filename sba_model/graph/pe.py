"""Laplacian eigenvector positional encodings."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from .adjacency import to_csr
from .partitioning import positive_int

__all__ = ["laplacian_pe", "normalized_laplacian"]

# Below this many nodes a dense eigendecomposition is faster and exact.
_DENSE_MAX_NODES = 2000

# Shift-invert shift: the solver factors L + _SHIFT * I. The wanted eigenvalues of a sensor
# graph's normalised Laplacian are tiny (about 1e-5 at N = 1e5, 1e-6 at N = 1e6 on a planar
# k-NN graph) and crowd together; Lanczos separates 1 / (lambda + shift), which only stays
# spread out when the shift is no larger than they are (1e-3 took 2.6x the iterations at 1e5).
_SHIFT = 1e-8


def normalized_laplacian(adjacency) -> sp.csr_matrix:
    """``L = I - D^{-1/2} A D^{-1/2}`` (isolated nodes get a 1 on the diagonal)."""
    a = to_csr(adjacency)
    deg = np.asarray(a.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(deg)
    inv_sqrt[deg > 0] = deg[deg > 0] ** -0.5
    rows = np.repeat(np.arange(a.shape[0]), np.diff(a.indptr))
    scaled = sp.csr_matrix((a.data * inv_sqrt[rows] * inv_sqrt[a.indices], a.indices, a.indptr), shape=a.shape)
    return (sp.identity(a.shape[0], format="csr") - scaled).tocsr()   # no sparse products: O(E)


def _shift_invert(lap: sp.csr_matrix, shift: float) -> spla.LinearOperator:
    """``(L + shift I)^-1`` through one sparse LU in METIS nested-dissection order.

    ``L + shift I`` is symmetric positive definite, so the LU needs no pivoting and keeps the
    fill-reducing order (SuperLU's symmetric mode); nested dissection gives a planar graph's
    factor O(N log N) entries, where SuperLU's default column order (COLAMD) made the N = 1e6
    k-NN factorisation the bulk of a 155 s `laplacian_pe`.
    """
    import pymetis

    n = lap.shape[0]
    graph = lap.tocsr(copy=True)
    graph.setdiag(0)
    graph.eliminate_zeros()
    order, _ = pymetis.nested_dissection(pymetis.CSRAdjacency(graph.indptr.astype(np.int64),
                                                             graph.indices.astype(np.int64)))
    order = np.asarray(order, dtype=np.int64)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(n)
    shifted = (lap + shift * sp.identity(n, format="csr")).tocsr()[order][:, order].tocsc()
    lu = spla.splu(shifted, permc_spec="NATURAL", diag_pivot_thresh=0.0, options=dict(SymmetricMode=True))

    def solve(x: np.ndarray) -> np.ndarray:
        return lu.solve(np.ascontiguousarray(x.reshape(n, -1)[order]))[inverse].reshape(x.shape)

    return spla.LinearOperator((n, n), matvec=solve, matmat=solve, dtype=np.float64)


def laplacian_pe(adjacency, k: int) -> torch.Tensor:
    """The ``k`` eigenvectors of the normalised Laplacian with the smallest eigenvalues after
    the first (trivial) one.

    Large graphs use shift-invert Lanczos: one sparse LU of ``L + eps I`` in nested-dissection
    order (see `_shift_invert`), then ARPACK, to ``tol=1e-8``: the same eigenvectors as a dense
    solver up to sign, and rotation inside (near-)degenerate eigenspaces.

    Args:
        adjacency: the graph (any form `sba_model.graph.adjacency.to_csr` accepts).
        k: number of encodings.

    Returns:
        float32 ``[N, k]`` with orthonormal columns; each column's sign is fixed so that its
        largest-magnitude entry is positive (training flips signs at random). When ``N <= k``
        the missing columns are zero.
    """
    k = positive_int(k, "k")
    lap = normalized_laplacian(adjacency)
    n = lap.shape[0]
    want = min(k + 1, n)
    if n <= _DENSE_MAX_NODES:
        vals, vecs = np.linalg.eigh(lap.toarray())
        vals, vecs = vals[:want], vecs[:, :want]
    else:
        # L is PSD: shifting by -eps makes L + eps I positive definite, so the LU never meets a
        # singular pivot, also on disconnected graphs (several zero eigenvalues).
        vals, vecs = spla.eigsh(lap, k=want, sigma=-_SHIFT, which="LM", OPinv=_shift_invert(lap, _SHIFT), tol=1e-8)
        order = np.argsort(vals)
        vals, vecs = vals[order], vecs[:, order]
    vecs = vecs[:, 1:]
    peak = np.abs(vecs).argmax(axis=0)
    vecs = vecs * np.sign(vecs[peak, np.arange(vecs.shape[1])])
    out = np.zeros((n, k), dtype=np.float32)
    out[:, : vecs.shape[1]] = vecs
    return torch.from_numpy(out)
