"""Laplacian eigenvector positional encodings."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from .adjacency import to_csr

__all__ = ["laplacian_pe", "normalized_laplacian"]

# Below this many nodes a dense eigendecomposition is faster and exact.
_DENSE_MAX_NODES = 2000


def normalized_laplacian(adjacency) -> sp.csr_matrix:
    """``L = I - D^{-1/2} A D^{-1/2}`` (isolated nodes get a 1 on the diagonal)."""
    a = to_csr(adjacency)
    deg = np.asarray(a.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(deg)
    inv_sqrt[deg > 0] = deg[deg > 0] ** -0.5
    d = sp.diags(inv_sqrt)
    return (sp.identity(a.shape[0], format="csr") - d @ a @ d).tocsr()


def laplacian_pe(adjacency, k: int) -> torch.Tensor:
    """The ``k`` eigenvectors of the normalised Laplacian with the smallest eigenvalues after
    the first (trivial) one.

    Large graphs use shift-invert Lanczos (one sparse LU of ``L + eps I``), which converges in a
    few iterations even where the small eigenvalues crowd together.

    Args:
        adjacency: the graph (any form `sba_model.adjacency.to_csr` accepts).
        k: number of encodings.

    Returns:
        float32 ``[N, k]`` with orthonormal columns; each column's sign is fixed so that its
        largest-magnitude entry is positive (training flips signs at random). When ``N <= k``
        the missing columns are zero.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    lap = normalized_laplacian(adjacency)
    n = lap.shape[0]
    want = min(k + 1, n)
    if n <= _DENSE_MAX_NODES:
        vals, vecs = np.linalg.eigh(lap.toarray())
        vals, vecs = vals[:want], vecs[:, :want]
    else:
        # L is PSD: shifting by -eps makes L + eps I positive definite, so the LU never meets a
        # singular pivot, also on disconnected graphs (several zero eigenvalues).
        vals, vecs = spla.eigsh(lap.tocsc(), k=want, sigma=-1e-3, which="LM", tol=1e-8)
        order = np.argsort(vals)
        vals, vecs = vals[order], vecs[:, order]
    vecs = vecs[:, 1:]
    peak = np.abs(vecs).argmax(axis=0)
    vecs = vecs * np.sign(vecs[peak, np.arange(vecs.shape[1])])
    out = np.zeros((n, k), dtype=np.float32)
    out[:, : vecs.shape[1]] = vecs
    return torch.from_numpy(out)
