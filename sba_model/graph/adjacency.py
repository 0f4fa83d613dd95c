"""Sensor graphs in the forms people have, converted in one place.

Every graph tool in `sba_model` takes ``adjacency`` as any of:

* a ``scipy.sparse`` matrix ``[N, N]``;
* a dense ``[N, N]`` float/bool numpy array or torch tensor;
* an ``edge_index`` ``[2, E]`` integer array or tensor (PyG convention; pass ``num_nodes``
  when the last nodes may be isolated).

and `to_csr` turns it into one symmetric, non-negative ``scipy.sparse.csr_matrix`` without
self loops: a *checked graph*. A checked graph is read-only (its arrays are not writeable) and
`to_csr` hands it back as is, so the public functions here and in `sba_model.nn` convert and
check a graph once, at the edge, and pass the checked graph on without doing it again
(`SBATransformer.from_graph` converts its input exactly once). `permute_graph` relabels a
checked graph and keeps it checked. Builders for the usual sensor graphs sit beside it: the thresholded Gaussian
kernel of DCRNN / LargeST over a distance matrix or coordinates, and a k-nearest-neighbour
graph for large N.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["to_csr", "permute_graph", "gaussian_kernel_adjacency", "haversine_distances", "knn_adjacency"]

EARTH_RADIUS_KM = 6371.0088


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()   # numpy has no bf16
    return np.asarray(x)


def to_csr(adjacency, num_nodes: Optional[int] = None) -> sp.csr_matrix:
    """Any accepted graph form -> checked graph: symmetric float64 CSR ``[N, N]``, zero
    diagonal, sorted indices, read-only arrays.

    Directed inputs are symmetrised with ``max(A, A^T)``; negative or non-finite weights are
    rejected. A checked graph (an earlier result of `to_csr` or `permute_graph`) is returned
    as is, in O(1).
    """
    if _is_checked(adjacency):
        if num_nodes is not None and adjacency.shape[0] != num_nodes:
            raise ValueError(f"adjacency has {adjacency.shape[0]} nodes but num_nodes={num_nodes}")
        return adjacency
    return _checked(_convert(adjacency, num_nodes))


# The attribute that marks a checked graph. Copies and results of arithmetic are new objects
# without it, so they are checked again when they come back.
_CHECKED = "_sba_checked_graph"


def _is_checked(adjacency) -> bool:
    """A `to_csr` result still as `to_csr` left it. A deep copy or an unpickled one keeps the
    mark but gets writeable arrays, so it is checked again."""
    return (type(adjacency) is sp.csr_matrix and getattr(adjacency, _CHECKED, False)
            and not any(a.flags.writeable for a in (adjacency.data, adjacency.indices, adjacency.indptr)))


def _checked(mat: sp.csr_matrix) -> sp.csr_matrix:
    """Mark a valid symmetric CSR as checked and freeze it: nothing can change it afterwards
    without making a new (unmarked) matrix."""
    mat.sort_indices()
    for array in (mat.data, mat.indices, mat.indptr):
        array.flags.writeable = False
    setattr(mat, _CHECKED, True)
    return mat


def _convert(adjacency, num_nodes: Optional[int]) -> sp.csr_matrix:
    """The conversion and checks behind `to_csr`, for a graph not yet checked."""
    if sp.issparse(adjacency):
        if np.iscomplexobj(adjacency.data):
            raise TypeError(f"adjacency must hold real weights, got dtype {adjacency.dtype}")
        mat = sp.csr_matrix(adjacency, dtype=np.float64)
    else:
        arr = _to_numpy(adjacency)
        if np.iscomplexobj(arr) or arr.dtype == object:
            raise TypeError(f"adjacency must hold real numbers, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise ValueError(f"adjacency must be [N, N] or an edge_index [2, E], got shape {arr.shape}")
        if np.issubdtype(arr.dtype, np.integer) and arr.shape == (2, 2) and num_nodes is None:
            raise ValueError("adjacency: a 2 x 2 integer array is both an edge_index of 2 edges and a dense "
                             "2-node matrix; convert it first: to_csr(edge_index, num_nodes=N), or pass the "
                             "dense matrix as floats")
        if np.issubdtype(arr.dtype, np.integer) and arr.shape[0] == 2 and (arr.shape[1] != 2 or num_nodes):
            mat = _edge_index_to_csr(arr, num_nodes)
        elif arr.shape[0] == arr.shape[1]:
            mat = sp.csr_matrix(arr.astype(np.float64))
        else:
            raise ValueError(
                f"adjacency must be square [N, N] or an integer edge_index [2, E], got shape {arr.shape}"
            )
    if mat.shape[0] != mat.shape[1]:
        raise ValueError(f"adjacency must be square, got shape {mat.shape}")
    if num_nodes is not None and mat.shape[0] != num_nodes:
        raise ValueError(f"adjacency has {mat.shape[0]} nodes but num_nodes={num_nodes}")
    if mat.nnz and (not np.all(np.isfinite(mat.data)) or mat.data.min() < 0):
        raise ValueError("adjacency weights must be finite and >= 0")
    mat = mat.maximum(mat.T).tocsr()
    mat.setdiag(0)
    mat.eliminate_zeros()
    return mat


def permute_graph(adjacency, perm) -> sp.csr_matrix:
    """Relabel nodes: ``out[i, j] = A[perm[i], perm[j]]``, a checked graph.

    Args:
        adjacency: any form `to_csr` accepts, ``[N, N]``.
        perm: ``[N]`` ints, ``perm[new] = old``, a permutation of ``range(N)``.
    """
    a = to_csr(adjacency)
    p = _to_numpy(perm)
    n = a.shape[0]
    if p.shape != (n,) or not np.issubdtype(p.dtype, np.integer) or not np.array_equal(np.sort(p), np.arange(n)):
        raise ValueError(f"perm must be a permutation of range({n}) as an int array, got shape {p.shape}, dtype {p.dtype}")
    # A permutation keeps symmetry, weights and the empty diagonal: no need to check again.
    return _checked(a[p][:, p].tocsr())


def _edge_index_to_csr(edge_index: np.ndarray, num_nodes: Optional[int]) -> sp.csr_matrix:
    src, dst = edge_index.astype(np.int64)
    if num_nodes is None and not edge_index.size:
        raise ValueError("adjacency: an edge_index with no edges needs num_nodes (to_csr(edge_index, num_nodes=N))")
    n = int(edge_index.max()) + 1 if num_nodes is None else num_nodes
    if edge_index.size and (edge_index.min() < 0 or edge_index.max() >= n):
        raise ValueError(f"edge_index holds a node id outside [0, {n})")
    return sp.csr_matrix((np.ones(src.size), (src, dst)), shape=(n, n))


def gaussian_kernel_adjacency(distances, sigma: Optional[float] = None, threshold: float = 0.1) -> sp.csr_matrix:
    """DCRNN's thresholded Gaussian kernel: ``w_ij = exp(-d_ij^2 / sigma^2)`` if ``>= threshold``.

    Args:
        distances: ``[N, N]`` dense distances (``inf`` or ``nan`` = unreachable).
        sigma: kernel width; default the standard deviation of the finite distances (1 where they
            do not spread: all equal, or none finite).
        threshold: weights below it are dropped (sparsifies the graph).

    Returns:
        symmetric CSR ``[N, N]`` with weights in ``[threshold, 1]`` and a zero diagonal.
    """
    d = _to_numpy(distances).astype(np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distances must be [N, N], got shape {d.shape}")
    finite = np.isfinite(d)
    if np.any(d[finite] < 0):
        raise ValueError("distances must be >= 0")
    if sigma is None:
        spread = float(d[finite].std()) if finite.any() else 0.0
        # All distances equal (one site, or one sensor) or none finite: no spread to scale by.
        sigma = spread if spread > 0 else 1.0
    elif not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    w = np.where(finite, np.exp(-np.square(np.where(finite, d, 0.0) / sigma)), 0.0)
    w[w < threshold] = 0.0
    return to_csr(w)


def haversine_distances(lat, lon) -> np.ndarray:
    """Great-circle distances in km between every pair of (lat, lon) degrees: ``[N, N]``."""
    lat, lon = np.radians(_to_numpy(lat).astype(np.float64)), np.radians(_to_numpy(lon).astype(np.float64))
    if lat.shape != lon.shape or lat.ndim != 1:
        raise ValueError(f"lat and lon must be 1-D of one length, got {lat.shape} and {lon.shape}")
    dlat = lat[:, None] - lat[None, :]
    dlon = lon[:, None] - lon[None, :]
    a = np.sin(dlat / 2) ** 2 + np.cos(lat)[:, None] * np.cos(lat)[None, :] * np.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def knn_adjacency(coords, k: int, sigma: Optional[float] = None) -> sp.csr_matrix:
    """Symmetric k-nearest-neighbour graph with Gaussian weights, for N far past dense sizes.

    Args:
        coords: ``[N, D]`` point coordinates (planar; project lat/lon first for large areas).
        k: neighbours per node (``1 <= k < N``).
        sigma: kernel width; default the mean k-NN distance.
    """
    from scipy.spatial import cKDTree

    x = _to_numpy(coords).astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"coords must be [N, D], got shape {x.shape}")
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k < n:
        raise ValueError(f"k must be an int in [1, N) = [1, {n}), got {k!r}")
    dist, nbr = cKDTree(x).query(x, k=k + 1)            # column 0 is the point itself
    dist, nbr = dist[:, 1:], nbr[:, 1:]
    if sigma is None:
        sigma = float(dist.mean()) or 1.0
    elif isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be a finite positive kernel width or None, got {sigma!r}")
    w = np.exp(-np.square(dist / sigma)) + 1e-12        # keep zero-distance twins as edges
    rows = np.repeat(np.arange(n), k)
    return to_csr(sp.csr_matrix((w.ravel(), (rows, nbr.ravel())), shape=(n, n)))
