"""The bundled datasets: readers for the original files and the converted copies the package ships.

Each dataset lives in its own folder here, ``<name>/<name>.npz`` in the `sba_model.forecast.data` format,
with a ``README.md`` (origin, license, citation) and the upstream license files beside it. The
copies are written by ``python -m sba_model.forecast.datasets.convert`` from the original files, which
`read_original` reads; ``sba_model.forecast.data.load(name)`` reads the shipped copy, or converts from
the originals on the fly when ``$SBA_DATA_ROOT`` points at them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["NAMES", "FOLDER", "shipped_file", "read_original", "even_timestamps"]

NAMES = ("los_loop", "sz_taxi", "charged_mel")
FOLDER = Path(__file__).resolve().parent


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")


def shipped_file(name: str, folder: Path = FOLDER) -> Path:
    """Where the converted copy of dataset ``name`` lives under ``folder`` (default: the package's)."""
    _check_name(name)
    return Path(folder) / name / f"{name}.npz"


def even_timestamps(start: str, steps: int, minutes: int) -> np.ndarray:
    """``steps`` datetime64[s] stamps from ``start``, ``minutes`` apart."""
    return np.datetime64(start, "s") + np.arange(steps) * np.timedelta64(minutes * 60, "s")


def _los_loop(folder: Path) -> dict:
    with open(folder / "los_speed.csv") as f:
        sensor_ids = f.readline().strip().split(",")
    speed = np.loadtxt(folder / "los_speed.csv", delimiter=",", skiprows=1)
    adj = np.loadtxt(folder / "los_adj.csv", delimiter=",")
    # DCRNN's METR-LA locations (index, sensor_id, latitude, longitude), matched by sensor id.
    locations = np.loadtxt(folder / "metr_la_graph_sensor_locations.csv", delimiter=",", skiprows=1)
    row_of = {str(int(sensor)): row for row, sensor in enumerate(locations[:, 1])}
    missing = [s for s in sensor_ids if s not in row_of]
    if missing:
        raise ValueError(f"root: metr_la_graph_sensor_locations.csv has no location for sensors {missing[:5]}")
    coords = locations[[row_of[s] for s in sensor_ids]][:, 2:4]
    # T-GCN's Los-loop: March 1-7, 2012, 5-minute steps.
    return dict(values=speed, adjacency=adj, coords=coords,
                timestamps=even_timestamps("2012-03-01T00:00", len(speed), 5))


def _sz_taxi(folder: Path) -> dict:
    with np.load(folder / "SZ_taxi.npz") as f:
        values = f["data"]
    adj = np.loadtxt(folder / "sz_adj.csv", delimiter=",")
    # Zeros are genuine in SZ-taxi (no traffic), so everything counts as observed.
    return dict(values=values, adjacency=adj, timestamps=even_timestamps("2015-01-01T00:00", len(values), 15))


def _charged_mel(folder: Path) -> dict:
    with open(folder / "volume.csv") as f:
        header = f.readline().strip().split(",")[1:]
    order = np.argsort([int(h) for h in header])          # the file lists sites as 0, 1, 10, 11, ...
    stamps = np.loadtxt(folder / "volume.csv", delimiter=",", skiprows=1, usecols=0, dtype=str)
    volume = np.loadtxt(folder / "volume.csv", delimiter=",", skiprows=1, usecols=range(1, len(header) + 1))
    dist = np.loadtxt(folder / "distance.csv", delimiter=",", skiprows=1)[:, 1:]   # rows and columns 0..62
    return dict(values=volume[:, order], distances=dist, timestamps=stamps.astype("datetime64[s]"))


_READERS = {"los_loop": _los_loop, "sz_taxi": _sz_taxi, "charged_mel": _charged_mel}


def read_original(name: str, root) -> dict:
    """The arrays of dataset ``name`` read from its original files in ``root/<name>/``, as a dict
    in the `sba_model.forecast.data` format (before `sba_model.forecast.data.validate`)."""
    _check_name(name)
    folder = Path(root) / name
    if not folder.is_dir():
        raise ValueError(f"root: no folder {folder} with the original {name} files")
    return _READERS[name](folder)
