"""A map of each sensor's test error, with the subgraph seams drawn, for a trained run:

    python -m sba_model.forecast.error_map --run runs/los_loop-sba --out bench/results/los_loop_error_map.png

The run is rebuilt from its folder (`train.load_run`: ``config.json``, the same data split,
``best.pt``'s weights). Its test windows are predicted and each sensor's MAE is taken over the
run's reported horizons (observed targets only), so the sensors' mean is the run's test MAE
when nothing is missing. Each sensor is drawn at its coordinates (the data's ``coords``:
longitude across, latitude up) in the colour of its MAE. Data without coordinates are drawn
at a 2-D spectral layout of the graph instead (its first two non-trivial Laplacian
eigenvectors, `laplacian_pe`), and the title says so.

The subgraphs are those of the model's finest partition (the first layer's; one subgraph for
full attention). Models without a partition (the baselines) are shown with the one ``sba``
would use: METIS with the run's first ``--parts`` and its seed. Graph edges inside a subgraph
are drawn light, edges between two subgraphs (the seams) dark. The seam sensors (those with an
edge into another subgraph) and the interior ones are summed up apart: their count and mean
MAE, printed and written in the figure, to show whether errors gather at the seams. On a dense
graph most sensors touch a seam (193 of los_loop's 207 with 16 subgraphs), so the summary also
gives the rank correlation of a sensor's MAE with the share of its edge weight that crosses
into other subgraphs (`cut_share`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ..graph.adjacency import to_csr
from ..graph.partitioning import partition_graph
from ..graph.pe import laplacian_pe
from ..nn.model import SBATransformer
from . import train

__all__ = ["sensor_mae", "cut_edges", "cut_share", "seam_sensors", "seam_summary", "finest_assignment", "layout",
           "error_map", "main"]


# ----------------------------------------------------------------------------- the numbers
def sensor_mae(batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               horizons: Optional[Sequence[int]] = None) -> np.ndarray:
    """Each sensor's mean absolute error over the observed targets of all ``batches``.

    Args:
        batches: ``(pred, target, mask)`` triples, each ``[B, T_out, N, C]`` (mask bool, True
            where the target was observed), with the same N and T_out throughout.
        horizons: the steps ahead (1-based) to count; default all ``T_out``.

    Returns:
        float64 ``[N]``: summed ``|pred - target|`` over windows, the horizons and channels
        where observed, divided by the number of those targets; NaN for a sensor never observed.
    """
    total = count = None
    for pred, target, mask in batches:
        if not pred.shape == target.shape == mask.shape or pred.dim() != 4:
            raise ValueError(f"batches: pred, target and mask must be one [B, T_out, N, C] shape, got "
                             f"{tuple(pred.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}")
        steps = pred.shape[1]
        chosen = list(range(1, steps + 1)) if horizons is None else list(horizons)
        if not chosen or min(chosen) < 1 or max(chosen) > steps:
            raise ValueError(f"horizons must be steps ahead in 1..{steps}, got {horizons}")
        rows = [h - 1 for h in chosen]
        observed = mask[:, rows].bool()
        err = torch.where(observed, (pred[:, rows] - target[:, rows]).abs().double(), 0.0)
        sums, counts = err.sum((0, 1, 3)).cpu(), observed.double().sum((0, 1, 3)).cpu()
        total, count = (sums, counts) if total is None else (total + sums, count + counts)
    if total is None:
        raise ValueError("batches: no batch given")
    return torch.where(count > 0, total / count.clamp_min(1), float("nan")).numpy()


def _edges(csr) -> np.ndarray:
    """int64 ``[E, 2]``: every edge of a symmetric CSR graph once, as ``(i, j)`` with ``i < j``."""
    rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
    upper = rows < csr.indices
    return np.stack([rows[upper], csr.indices[upper]], axis=1).astype(np.int64)


def _is_cut(edges: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """bool ``[E]``: True for an edge ``[E, 2]`` whose ends lie in two subgraphs."""
    return assignment[edges[:, 0]] != assignment[edges[:, 1]]


def cut_edges(adjacency, assignment) -> np.ndarray:
    """The graph's edges between two subgraphs: int64 ``[E, 2]``, each ``(i, j)`` with ``i < j``.

    Args:
        adjacency: the graph, ``[N, N]`` (any form `to_csr` accepts; symmetric).
        assignment: ints ``[N]``, the subgraph of every node.
    """
    csr = to_csr(adjacency)
    part = np.asarray(assignment)
    if part.shape != (csr.shape[0],):
        raise ValueError(f"assignment must be [N] = [{csr.shape[0]}], got shape {part.shape}")
    edges = _edges(csr)
    return edges[_is_cut(edges, part)]


def cut_share(adjacency, assignment) -> np.ndarray:
    """float64 ``[N]``: the share of each node's edge weight that goes into other subgraphs (0
    for a node without edges). ``adjacency`` ``[N, N]`` as in `cut_edges`, ``assignment`` ``[N]``."""
    csr = to_csr(adjacency)
    n = csr.shape[0]
    part = np.asarray(assignment)
    if part.shape != (n,):
        raise ValueError(f"assignment must be [N] = [{n}], got shape {part.shape}")
    rows = np.repeat(np.arange(n), np.diff(csr.indptr))
    weight = np.abs(csr.data)
    total = np.bincount(rows, weights=weight, minlength=n)
    across = np.bincount(rows, weights=weight * (part[rows] != part[csr.indices]), minlength=n)
    return np.divide(across, total, out=np.zeros(n), where=total > 0)


def seam_sensors(adjacency, assignment) -> np.ndarray:
    """bool ``[N]``: True for a node with an edge into another subgraph (see `cut_edges`)."""
    edges = cut_edges(adjacency, assignment)
    seam = np.zeros(len(np.asarray(assignment)), dtype=bool)
    seam[edges.ravel()] = True
    return seam


def seam_summary(mae: np.ndarray, seam: np.ndarray, share: np.ndarray) -> dict:
    """Count and mean MAE of the seam sensors and of the interior ones, and the Spearman rank
    correlation of MAE with the share of edge weight across subgraphs (`cut_share`), over the
    sensors with a MAE (not NaN). ``mae``, ``share`` float ``[N]``, ``seam`` bool ``[N]``. A
    group with no sensor has mean NaN; so has the correlation when either side is constant."""
    from scipy.stats import spearmanr

    mae, seam, share = np.asarray(mae, dtype=np.float64), np.asarray(seam, dtype=bool), np.asarray(share, float)
    if not mae.shape == seam.shape == share.shape or mae.ndim != 1:
        raise ValueError(f"mae, seam and share must all be [N], got {mae.shape}, {seam.shape} and {share.shape}")
    known = ~np.isnan(mae)
    out = {}
    for name, group in (("seam", seam & known), ("interior", ~seam & known)):
        n = int(group.sum())
        out[name] = {"sensors": n, "mean_mae": float(mae[group].mean()) if n else float("nan")}
    varied = known.sum() > 1 and np.ptp(mae[known]) > 0 and np.ptp(share[known]) > 0
    out["spearman_mae_cut_share"] = float(spearmanr(mae[known], share[known])[0]) if varied else float("nan")
    return out


def finest_assignment(model: torch.nn.Module, adjacency, parts: Sequence[int], seed: int) -> np.ndarray:
    """int64 ``[N]``: each sensor's subgraph (in the caller's node order) in the model's first
    layer when it is an `SBATransformer`; for other models, in the partition ``sba`` would
    use (METIS, ``min(parts[0], N)`` parts, ``seed``)."""
    if not parts:
        raise ValueError("parts must list at least one subgraph count")
    if isinstance(model, SBATransformer):
        internal = model.blocks[0].partition.assignment.cpu().numpy()
        if model.perm is None:
            return internal.astype(np.int64)
        user = np.empty_like(internal, dtype=np.int64)
        user[model.perm.cpu().numpy()] = internal              # perm[internal] = user node id
        return user
    csr = to_csr(adjacency)
    return partition_graph(csr, min(parts[0], csr.shape[0]), seed=seed).assignment.numpy().astype(np.int64)


def layout(coords: Optional[np.ndarray], adjacency) -> tuple[np.ndarray, bool]:
    """Where to draw the sensors: ``(xy [N, 2], geographic)``. With coordinates ``[N, 2]``
    (lat, lon), ``xy`` is (lon, lat) and ``geographic`` True; without, the first two
    non-trivial Laplacian eigenvectors of the graph and False."""
    if coords is not None:
        return np.asarray(coords, dtype=np.float64)[:, ::-1].copy(), True
    return laplacian_pe(adjacency, 2).double().numpy(), False


# ----------------------------------------------------------------------------- the figure
def _draw(xy: np.ndarray, mae: np.ndarray, adjacency, assignment: np.ndarray, geographic: bool, title: str,
          note: str, path: Path) -> None:
    """The map: light intra-subgraph edges, dark cut edges, sensors at ``xy`` ``[N, 2]``
    coloured by ``mae`` ``[N]``."""
    from matplotlib.collections import LineCollection

    edges = _edges(to_csr(adjacency))
    cut = _is_cut(edges, assignment)
    fig, ax = train.pyplot().subplots(figsize=(8, 7))
    ax.add_collection(LineCollection(xy[edges[~cut]], colors="0.8", linewidths=0.5, zorder=1))
    ax.add_collection(LineCollection(xy[edges[cut]], colors="0.1", linewidths=1.2, zorder=2,
                                     label="edge between two subgraphs"))
    size = float(np.clip(8000 / len(xy), 2, 40))
    dots = ax.scatter(xy[:, 0], xy[:, 1], c=mae, s=size, cmap="viridis", zorder=3)
    fig.colorbar(dots, ax=ax, label="test MAE (data units)", shrink=0.8)
    across, up = ("longitude", "latitude") if geographic else ("Laplacian eigenvector 1", "Laplacian eigenvector 2")
    ax.set_xlabel(f"{across}\n\n{note}")                     # the summary under the map
    ax.set_ylabel(up)
    if geographic:
        ax.set_aspect(1 / np.cos(np.radians(np.nanmean(xy[:, 1]))))
    ax.autoscale_view()
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    train.save_figure(fig, path)


def _summary_lines(summary: dict) -> list[str]:
    return [f"{name} sensors: {summary[name]['sensors']}, mean test MAE {summary[name]['mean_mae']:.4f}"
            for name in ("seam", "interior")] + [
        f"MAE against share of edge weight across subgraphs: Spearman {summary['spearman_mae_cut_share']:.3f}"]


@torch.no_grad()
def error_map(run_dir, out, *, device: str = "cpu", batch_size: Optional[int] = None) -> dict:
    """Draw the map of run ``run_dir`` into the PNG ``out`` (see the module doc).

    Returns ``mae`` float64 ``[N]`` (per-sensor test MAE), ``assignment`` int64 ``[N]``,
    ``seam`` bool ``[N]``, ``cut_share`` float64 ``[N]``, ``summary`` (`seam_summary`),
    ``geographic`` (coordinates or the spectral layout) and ``horizons``."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg, setup = train.load_run(run_dir, device)
    dev = train.device_of(device)
    size = 2 * cfg.batch_size if batch_size is None else batch_size
    batches = ((train.predict(setup.model, b, setup.scaler, dev), b["y"].to(dev), b["y_mask"].to(dev))
               for b in setup.windows["test"].batches(size, shuffle=False))
    mae = sensor_mae(batches, setup.horizons)
    series = setup.series
    assignment = finest_assignment(setup.model, series.adjacency, cfg.parts, cfg.seed)
    seam = seam_sensors(series.adjacency, assignment)
    share = cut_share(series.adjacency, assignment)
    summary = seam_summary(mae, seam, share)
    xy, geographic = layout(series.coords, series.adjacency)
    whose = "finest partition" if isinstance(setup.model, SBATransformer) else "sba's finest partition"
    title = (f"{Path(cfg.data).stem}, {cfg.model}: per-sensor test MAE over horizons {setup.horizons} (steps)\n"
             f"{int(assignment.max()) + 1} subgraphs ({whose}); "
             + ("sensors at their coordinates" if geographic else "spectral layout: the data have no coordinates"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _draw(xy, mae, series.adjacency, assignment, geographic, title, "\n".join(_summary_lines(summary)), out)
    return {"mae": mae, "assignment": assignment, "seam": seam, "cut_share": share, "summary": summary,
            "geographic": geographic, "horizons": setup.horizons}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sba_model.forecast.error_map", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="a run folder written by sba_model.forecast.train "
                                                          "(config.json and, for learned models, best.pt)")
    p.add_argument("--out", type=Path, default=None, help="the PNG to write (default RUN/error_map.png)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto, ...")
    p.add_argument("--batch-size", type=int, default=None, help="test windows per forward (default: twice the run's)")
    a = p.parse_args(argv)
    out = a.out or a.run / "error_map.png"
    if out.is_dir():                      # said now, not after the model ran over the test windows
        p.error(f"--out must be a file, {out} is a folder")
    if a.batch_size is not None and a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    result = error_map(a.run, out, device=a.device, batch_size=a.batch_size)
    for line in _summary_lines(result["summary"]):
        print(line)
    print(f"wrote {out} ({'coordinates' if result['geographic'] else 'spectral layout: no coordinates'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
