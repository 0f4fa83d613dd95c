"""Spatiotemporal data: one on-disk format, converters for the bundled datasets, a synthetic
default, windows, chronological splits and a scaler fitted on training data only.

The format is one ``.npz`` file with

* ``values``  float ``[T, N, C]``: the series (T steps, N sensors, C channels);
* ``mask``    optional bool ``[T, N, C]``: True where a value was observed. Missing values are
  left out of the loss and the metrics. NaN in ``values`` is allowed only where ``mask`` is False;
* ``timestamps`` optional ``[T]`` datetime64 or int64 seconds since 1970, evenly spaced. They
  enable time-of-day and day-of-week features;
* the graph: ``adjacency`` ``[N, N]`` (weights) or ``distances`` ``[N, N]`` (thresholded
  Gaussian kernel, as in DCRNN);
* ``coords`` ``[N, 2]``: the sensors' latitude and longitude in degrees. Beside ``adjacency`` or
  ``distances`` they only place the sensors (for maps); alone they make the graph (haversine
  distances, then the same kernel). One of the three is required.

Write one with `save_npz` (or ``numpy.savez``) and train with
``python -m sba_model.forecast.train --data your_file.npz``. The bundled datasets ship in this format
(`sba_model.forecast.datasets`, written from the original files by ``python -m sba_model.forecast.datasets.convert``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import scipy.sparse as sp
import torch

from ..graph.adjacency import gaussian_kernel_adjacency, haversine_distances, knn_adjacency, to_csr
from .datasets import even_timestamps, read_original, shipped_file

__all__ = ["SeriesData", "load", "load_npz", "save_npz", "synthetic", "synthetic_large", "Scaler", "Windows",
           "split_windows", "BUILTIN"]

BUILTIN = ("synthetic", "synthetic_large", "los_loop", "sz_taxi", "charged_mel")
LARGE_NODES, LARGE_STEPS = 100_000, 672          # synthetic_large's defaults: 7 days of 15-minute steps


@dataclass
class SeriesData:
    """A dataset in memory: values ``[T, N, C]`` (missing entries hold 0), mask, graph, times."""

    name: str
    values: np.ndarray                     # float32 [T, N, C]
    mask: np.ndarray                       # bool    [T, N, C]
    adjacency: sp.csr_matrix               # [N, N]
    timestamps: Optional[np.ndarray] = None  # datetime64[s] [T]
    coords: Optional[np.ndarray] = None      # float64 [N, 2]: latitude, longitude in degrees

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.values.shape

    @property
    def step_minutes(self) -> Optional[float]:
        if self.timestamps is None or len(self.timestamps) < 2:
            return None
        return float((self.timestamps[1] - self.timestamps[0]) / np.timedelta64(1, "m"))

    @property
    def steps_per_day(self) -> Optional[int]:
        step = self.step_minutes
        if step is None or step <= 0 or (24 * 60) % step:
            return None
        return int(24 * 60 // step)

    def time_features(self) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """(time-of-day slot ``[T]`` in 0..steps_per_day-1, day of week ``[T]`` in 0..6, Monday 0)."""
        if self.steps_per_day is None:
            return None, None
        minutes = (self.timestamps - self.timestamps.astype("datetime64[D]")) / np.timedelta64(1, "m")
        tod = (minutes // self.step_minutes).astype(np.int64)
        dow = ((self.timestamps.astype("datetime64[D]").astype(np.int64) + 3) % 7).astype(np.int64)  # 1970-01-01 = Thu
        return tod, dow


# ----------------------------------------------------------------------------- the format
def _fail(key: str, why: str):
    raise ValueError(f"{key}: {why}")


def validate(arrays: dict, name: str = "data") -> SeriesData:
    """Check an in-memory version of the format and build a `SeriesData`; ValueError names the key."""
    if "values" not in arrays:
        _fail("values", "missing (the [T, N, C] series is required)")
    values = np.asarray(arrays["values"])
    if np.iscomplexobj(values) or not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
        _fail("values", f"must hold real numbers, got dtype {values.dtype}")
    values = values.astype(np.float64)
    if values.ndim == 2:
        values = values[:, :, None]
    if values.ndim != 3 or min(values.shape) < 1:
        _fail("values", f"must be [T, N, C], got shape {values.shape}")
    T, N, C = values.shape
    if "mask" in arrays:
        mask = np.asarray(arrays["mask"])
        if mask.shape != values.shape:
            _fail("mask", f"must have the shape of values {values.shape}, got {mask.shape}")
        mask = mask.astype(bool)
    else:
        mask = np.ones(values.shape, dtype=bool)
    bad = ~np.isfinite(values) & mask
    if bad.any():
        _fail("values", f"{int(bad.sum())} NaN/inf entries where mask says observed; set mask=False there")
    too_big = (np.abs(values) > np.finfo(np.float32).max) & mask      # they are kept as float32
    if too_big.any():
        _fail("values", f"{int(too_big.sum())} entries beyond float32's range (3.4e38); rescale them")
    values = np.where(mask, values, 0.0)

    timestamps = None
    if "timestamps" in arrays:
        ts = np.asarray(arrays["timestamps"])
        if ts.shape != (T,):
            _fail("timestamps", f"must be [T] = [{T}], got shape {ts.shape}")
        if np.issubdtype(ts.dtype, np.integer):
            ts = ts.astype("int64").astype("datetime64[s]")
        elif not np.issubdtype(ts.dtype, np.datetime64):
            _fail("timestamps", f"must be datetime64 or integer seconds since 1970, got dtype {ts.dtype}")
        steps = np.diff(ts.astype("datetime64[ns]")).astype(np.int64)        # checked before any rounding
        if T > 1 and (steps[0] <= 0 or np.any(steps != steps[0])):
            _fail("timestamps", "must be increasing and evenly spaced")
        if T > 1 and steps[0] % 10**9:
            _fail("timestamps", f"must be whole seconds apart (the format keeps seconds), got steps of {steps[0]} ns")
        timestamps = ts.astype("datetime64[s]")

    coords = None
    if "coords" in arrays:
        coords = np.asarray(arrays["coords"], dtype=np.float64)
        if coords.shape != (N, 2):
            _fail("coords", f"must be [N, 2] = [{N}, 2] (lat, lon), got {coords.shape}")
        if not np.isfinite(coords).all():
            _fail("coords", "must be finite")
    graphs = [k for k in ("adjacency", "distances") if k in arrays]
    if len(graphs) > 1 or (not graphs and coords is None):
        _fail("adjacency", f"give one of adjacency, distances (coords may go beside it) or coords alone; "
                           f"got {graphs or 'none'}")
    if graphs:
        key = graphs[0]
        g = np.asarray(arrays[key], dtype=np.float64)
        if g.shape != (N, N):
            _fail(key, f"must be [N, N] = [{N}, {N}], got {g.shape}")
        adjacency = gaussian_kernel_adjacency(g) if key == "distances" else to_csr(g)
    else:
        adjacency = gaussian_kernel_adjacency(haversine_distances(coords[:, 0], coords[:, 1]))
    return SeriesData(name, values.astype(np.float32), mask, adjacency, timestamps, coords)


def load_npz(path) -> SeriesData:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data: no such file {path}")
    with np.load(path, allow_pickle=False) as f:
        return validate({k: f[k] for k in f.files}, name=path.stem)


def save_npz(data: SeriesData, path) -> None:
    """Write ``data`` in the format (atomically: a temporary file, then a rename)."""
    path = Path(path)
    if path.suffix != ".npz":             # what `load` reads as a file, not a dataset name
        raise ValueError(f"path must end in .npz, got {path}")
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = dict(values=data.values, mask=data.mask, adjacency=data.adjacency.toarray())
    if data.timestamps is not None:
        arrays["timestamps"] = data.timestamps.astype("datetime64[s]").astype(np.int64)
    if data.coords is not None:
        arrays["coords"] = data.coords
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- bundled datasets
def synthetic(num_nodes: int = 120, steps: int = 2016, *, factors: int = 3, seed: int = 0) -> SeriesData:
    """A process on a random geometric graph that needs both local and global attention.

    Each step: ``x_t = 0.6 * diffuse(x_{t-1}) + 0.4 * L f_t + daily cycle + noise``, where
    ``diffuse`` averages each sensor with its graph neighbours (near sensors correlated) and
    ``f_t`` are a few shared AR(1) factors loaded onto random far-apart sensor groups (far
    sensors correlated). A local-only model misses the factors; a global-only model without
    the graph misses the diffusion. 5-minute steps from 2024-01-01.
    """
    rng = np.random.default_rng(seed)
    points = rng.random((num_nodes, 2))
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    adjacency = gaussian_kernel_adjacency(d, sigma=0.1, threshold=0.2)
    a = adjacency.toarray() + np.eye(num_nodes)
    diffuse = a / a.sum(1, keepdims=True)
    loadings = np.zeros((num_nodes, factors))
    for j in range(factors):
        group = rng.choice(num_nodes, size=max(2, num_nodes // (2 * factors)), replace=False)
        loadings[group, j] = rng.uniform(0.5, 1.5, size=group.size)
    phase = rng.uniform(0, 2 * np.pi, num_nodes)
    f = np.zeros(factors)
    x = np.zeros(num_nodes)
    out = np.empty((steps, num_nodes))
    for t in range(steps):
        f = 0.95 * f + rng.normal(0, 0.3, factors)
        daily = np.sin(2 * np.pi * t / 288 + phase)
        x = 0.6 * diffuse @ x + 0.4 * loadings @ f + 0.3 * daily + rng.normal(0, 0.1, num_nodes)
        out[t] = x
    return SeriesData("synthetic", out[:, :, None].astype(np.float32), np.ones((steps, num_nodes, 1), bool),
                      adjacency, even_timestamps("2024-01-01T00:00", steps, 5))


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def synthetic_large(num_nodes: int = LARGE_NODES, steps: int = LARGE_STEPS, *, k: int = 8, grid: int = 4,
                    factors: int = 4, seed: int = 0) -> SeriesData:
    """A spatial process on a k-NN graph with local and long-range structure, for graphs far past
    dense sizes (N = 100,000 by default).

    Sensors sit at random points of a 1 x 1 degree square (``coords``: latitude, longitude),
    joined by `knn_adjacency` (``k`` nearest, symmetric, Gaussian weights). 15-minute steps from
    2024-01-01 (96 a day; the default 672 steps are 7 days). Each step::

        s_t = D (0.9 s_{t-1} + e_t)                   the local field [N]
        g_t = sin(2 pi t / 96 + phi) + r_t            the factors [factors]; r_t = 0.95 r_{t-1} + 0.3 e'_t
        x_t = 2 s_t + C g_t + 0.1 e''_t               the series [N]

    with ``e`` standard normal noise and ``D`` the row-normalised ``A + I`` of the graph's
    edges: every shock spreads over graph neighbours, so the local field is smooth and near
    sensors are correlated, the more the nearer (local structure; without factors, at N = 2,000,
    the correlation is about 0.8 between graph neighbours and 0.02 between sensors 0.1 to 0.2
    degrees apart). The factors ``g_t`` are daily cycles plus slow AR(1) swings. The square is
    cut into ``grid x grid`` regions; factor 0 loads on every region, each other factor on a
    random quarter of them, scattered over the square, so regions far apart move together
    (long-range structure). ``C`` ``[N, factors]``
    is the loading of the sensor's region (uniform 0.5 to 1.5 where it loads) times a
    per-sensor uniform 0.8 to 1.2. ``factors=0`` leaves the local field alone.

    Memory: float32 values ``[T, N, 1]`` (4 T N bytes: 269 MB at the defaults), bool mask
    (T N bytes: 67 MB) and the graph (about 9.2 N nonzeros for k = 8: 11 MB at the defaults);
    the generation itself adds O(N) and takes about 5 s at the defaults on one CPU thread.
    """
    for name, value, low in (("k", k, 1), ("steps", steps, 1), ("grid", grid, 1), ("factors", factors, 0)):
        _check_int(name, value, low)
    _check_int("num_nodes", num_nodes, k + 1)
    rng = np.random.default_rng(seed)
    points = rng.random((num_nodes, 2))
    adjacency = knn_adjacency(points, k)
    linked = (adjacency != 0).astype(np.float32) + sp.identity(num_nodes, dtype=np.float32, format="csr")
    diffuse = sp.diags(1.0 / np.asarray(linked.sum(1), dtype=np.float32).ravel()) @ linked
    diffuse = diffuse.tocsr()
    region = np.minimum((points * grid).astype(np.int64), grid - 1) @ np.array([grid, 1])
    region_loadings = np.zeros((grid * grid, factors), np.float32)
    for j in range(factors):
        chosen = np.arange(grid * grid) if j == 0 else rng.choice(grid * grid, max(1, grid * grid // 4), replace=False)
        region_loadings[chosen, j] = rng.uniform(0.5, 1.5, chosen.size)
    loadings = region_loadings[region] * rng.uniform(0.8, 1.2, (num_nodes, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, factors)
    field, swing = np.zeros(num_nodes, np.float32), np.zeros(factors)
    out = np.empty((steps, num_nodes), np.float32)
    for t in range(steps):
        field = diffuse @ (0.9 * field + rng.standard_normal(num_nodes, dtype=np.float32))
        swing = 0.95 * swing + rng.normal(0, 0.3, factors)
        g = (np.sin(2 * np.pi * t / 96 + phase) + swing).astype(np.float32)
        out[t] = 2 * field + loadings @ g + 0.1 * rng.standard_normal(num_nodes, dtype=np.float32)
    return SeriesData("synthetic_large", out[:, :, None], np.ones((steps, num_nodes, 1), bool), adjacency,
                      even_timestamps("2024-01-01T00:00", steps, 15), coords=points[:, ::-1].copy())


def _synthetic_large_size(source: str) -> tuple[int, int]:
    """``(num_nodes, steps)`` of ``synthetic_large``, ``synthetic_large:N`` or ``synthetic_large:N:STEPS``."""
    given = source.split(":")[1:]
    if len(given) > 2 or not all(g.isdigit() for g in given):
        raise ValueError(f"data: write synthetic_large, synthetic_large:N or synthetic_large:N:STEPS, got {source!r}")
    num_nodes, steps = [int(g) for g in given] + [LARGE_NODES, LARGE_STEPS][len(given):]
    return num_nodes, steps


def load(source: str) -> SeriesData:
    """A bundled dataset by name (``synthetic``, ``los_loop``, ``sz_taxi``, ``charged_mel``), the
    large synthetic one (``synthetic_large``, ``synthetic_large:N`` or ``synthetic_large:N:STEPS``:
    `synthetic_large` with N sensors and STEPS steps, defaults 100,000 and 672) or a path to a
    ``.npz`` in the format.

    The bundled datasets are read from the converted copies shipped in `sba_model.forecast.datasets`;
    when ``$SBA_DATA_ROOT`` is set, they are converted on the fly from the original files in
    ``$SBA_DATA_ROOT/<name>/`` instead (the same numbers: the shipped copies come from there).
    """
    if source == "synthetic":
        return synthetic()
    if source.split(":")[0] == "synthetic_large":
        num_nodes, steps = _synthetic_large_size(source)
        return synthetic_large(num_nodes, steps)
    if source in BUILTIN:
        root = os.environ.get("SBA_DATA_ROOT")
        if root:
            if not (Path(root) / source).is_dir():
                raise ValueError(f"SBA_DATA_ROOT: {root} has no {source} folder of original files "
                                 "(unset it to read the copy shipped with the package)")
            return validate(read_original(source, root), name=source)
        return load_npz(shipped_file(source))
    if str(source).endswith(".npz"):
        return load_npz(source)
    raise ValueError(f"data must be one of {BUILTIN}, synthetic_large:N[:STEPS] or a path to a .npz file, "
                     f"got {source!r}")


# ----------------------------------------------------------------------------- windows and splits
@dataclass
class Scaler:
    """Per-channel z-score, fitted on observed training values only."""

    mean: np.ndarray   # [C]
    std: np.ndarray    # [C]

    @classmethod
    def fit(cls, values: np.ndarray, mask: np.ndarray) -> "Scaler":
        C = values.shape[-1]
        v, m = values.reshape(-1, C), mask.reshape(-1, C)
        mean = np.array([v[m[:, c], c].mean() if m[:, c].any() else 0.0 for c in range(C)])
        std = np.array([v[m[:, c], c].std() if m[:, c].any() else 1.0 for c in range(C)])
        return cls(mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32))

    def transform(self, x):
        return (x - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.as_tensor(self.std, device=x.device) + torch.as_tensor(self.mean, device=x.device)


class Windows:
    """Sliding windows over one contiguous time range ``[start, stop)``: sample i has inputs
    ``[start+i, start+i+in_steps)`` and targets right after, all inside the range."""

    def __init__(self, values: torch.Tensor, raw: torch.Tensor, mask: torch.Tensor, tod, dow,
                 start: int, stop: int, in_steps: int, out_steps: int):
        self.values, self.raw, self.mask, self.tod, self.dow = values, raw, mask, tod, dow
        self.in_steps, self.out_steps = in_steps, out_steps
        self.starts = torch.arange(start, stop - in_steps - out_steps + 1)
        self.range = (start, stop)

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, which: torch.Tensor) -> dict:
        """``x [b, T_in, N, C]`` (scaled, missing = 0), ``y`` / ``y_mask`` ``[b, T_out, N, C]``
        (raw units), ``tod`` / ``dow`` ``[b]`` of the last input step (or None)."""
        s = self.starts[which]
        t_in = s[:, None] + torch.arange(self.in_steps)
        t_out = s[:, None] + self.in_steps + torch.arange(self.out_steps)
        last = s + self.in_steps - 1
        return dict(x=self.values[t_in], y=self.raw[t_out], y_mask=self.mask[t_out],
                    tod=None if self.tod is None else self.tod[last],
                    dow=None if self.dow is None else self.dow[last])

    def batches(self, batch_size: int, *, shuffle: bool, generator: Optional[torch.Generator] = None) -> Iterator[dict]:
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            yield self.batch(order[i:i + batch_size])


def split_windows(data: SeriesData, in_steps: int, out_steps: int, *, test_fraction: float = 0.2,
                  val_fraction: float = 0.1) -> tuple[dict[str, Windows], Scaler]:
    """Chronological train / val / test ranges (val is the end of the training part, test the
    last ``test_fraction``, as in T-GCN's 80/20 protocol), windows inside each range, and a
    scaler fitted on the training range alone."""
    T = data.shape[0]
    t_test = int(round(T * (1 - test_fraction)))
    t_val = int(round(T * (1 - test_fraction - val_fraction)))
    bounds = {"train": (0, t_val), "val": (t_val, t_test), "test": (t_test, T)}
    for name, (a, b) in bounds.items():
        if b - a < in_steps + out_steps:
            raise ValueError(f"data: the {name} range has {b - a} steps, fewer than in+out = {in_steps + out_steps}")
    scaler = Scaler.fit(data.values[:t_val], data.mask[:t_val])
    scaled = torch.from_numpy(np.where(data.mask, scaler.transform(data.values), 0.0).astype(np.float32))
    raw, mask = torch.from_numpy(data.values), torch.from_numpy(data.mask)
    tod, dow = data.time_features()
    tod = None if tod is None else torch.from_numpy(tod)
    dow = None if dow is None else torch.from_numpy(dow)
    windows = {k: Windows(scaled, raw, mask, tod, dow, a, b, in_steps, out_steps) for k, (a, b) in bounds.items()}
    return windows, scaler
