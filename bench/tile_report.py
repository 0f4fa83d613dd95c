"""How the triton backend tiles METIS partitions: subgraph sizes, and the query-tile programs
each subgraph gets in every attention launch (no GPU needed: the launches are recorded, not run).

    python bench/tile_report.py                       # N = 1e5 and 1e6, writes bench/results/static/tiles.md
    python bench/tile_report.py --n 20000 --targets 64 --out /tmp/tiles.md

For each N, a k-NN graph (k = 8) on random points in the unit square, as `bench/from_graph.py`
builds it, and for each target size T two partitions: the plain ``partition_graph(adj,
ceil(N / T))`` and the capped ``partition_graph(adj, max_size=T)``. For each, the size
distribution and the edge weight cut; then the backend's own launch grids, recorded through
`sba_kernels.triton_aot.recording` from ``attention_forward`` and
``attention_backward`` (with a shared bias, so that the dBias launch is there too) on dummy
tensors of the right shape (B = 1, H = 1, fp16; bf16 gets the same tiles). For each launch: its
tile rows, the programs each subgraph gets per (batch, head), the share of launched programs
whose tile starts inside its subgraph (the others return at once), and the share of launched
tile rows that hold a node.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scaling import environment, write_atomic  # noqa: E402

from sba_kernels import Partition, triton_aot, triton_backend  # noqa: E402
from sba_model import knn_adjacency, partition_graph, to_csr  # noqa: E402

# The subgraph-tiled kernels: the launch argument holding the tiles per subgraph, and the meta
# argument holding the rows of the tile a program starts at ``(program % tiles) * rows``.
TILED = {"attention_fwd": ("TILES_PER_PART", "BLOCK_M"), "attention_bwd_dq": ("TILES_PER_PART", "BLOCK_M"),
         "attention_bwd_dkdv": ("TILES_PER_PART", "BLOCK_N")}
# The one-tile kernels: one program per subgraph (and per (batch, head), or per bias tile),
# holding the whole subgraph in one tile of BLOCK rows.
ONE_TILE = ("attention_fwd_one_tile", "attention_bwd_one_tile")
LAUNCH_LABELS = {"attention_fwd": "tiled forward", "attention_bwd_delta": "delta", "attention_bwd_dq": "dQ",
                 "attention_bwd_dkdv": "dK/dV", "attention_bwd_dbias": "dBias",
                 "attention_fwd_one_tile": "one-tile forward", "attention_bwd_one_tile": "one-tile backward"}


@dataclass
class LaunchTiles:
    """One recorded launch, per (batch, head): ``programs`` = P x ``per_subgraph`` (rows of N for
    the delta kernel), of which ``with_work`` start inside their subgraph; ``filled`` = the share
    of launched tile rows (dBias: tile entries) that hold a node."""

    kernel: str
    tile: str
    per_subgraph: int | None
    programs: int
    with_work: int
    filled: float


def record_launches(partition: Partition, head_dim: int) -> list[tuple]:
    """(kernel, grid, args by name) of the forward and backward launches of ``partition``."""
    n, (parts, width) = partition.num_nodes, partition.index.shape
    # Nothing launches, so one stored row per tensor serves (zero strides over nodes).
    node = torch.zeros(1, 1, 1, head_dim, dtype=torch.float16).expand(1, n, 1, head_dim)
    bias = torch.zeros((), dtype=torch.float16).expand(parts, width, width)
    with triton_aot.recording() as launches:
        o, lse, _ = triton_backend.attention_forward(node, node, node, partition.index, partition.lengths, bias,
                                                     head_dim ** -0.5, False)
        triton_backend.attention_backward(node, node, node, node, o, lse, partition.index, partition.lengths, bias,
                                          head_dim ** -0.5, need_dbias=True)
    return [(kernel.fn.__name__, grid, dict(zip(kernel.arg_names, args)) | meta)
            for kernel, grid, args, meta in launches]


def tiles_used(lengths: np.ndarray, tiles: int, rows: int) -> np.ndarray:
    """Per subgraph, how many of its ``tiles`` tiles of ``rows`` start inside it (the kernels
    return at once where ``start >= length``)."""
    return np.minimum(tiles, -(-lengths // rows))


def launch_tiles(kernel: str, grid: tuple, args: dict, lengths: np.ndarray) -> LaunchTiles:
    parts, nodes = lengths.size, int(lengths.sum())
    if kernel in TILED:
        tiles_name, rows_name = TILED[kernel]
        tiles, rows = args[tiles_name], args[rows_name]
        assert grid[0] == parts * tiles, (kernel, grid, parts, tiles)
        return LaunchTiles(kernel, f"{rows} rows", tiles, grid[0], int(tiles_used(lengths, tiles, rows).sum()),
                           nodes / (grid[0] * rows))
    if kernel in ONE_TILE:
        rows = args["BLOCK"]
        assert grid[0] == parts, (kernel, grid, parts)
        return LaunchTiles(kernel, f"{rows} rows", 1, grid[0], parts, nodes / (parts * rows))
    if kernel == "attention_bwd_dbias":       # one program per (query tile, key tile) pair
        q_tiles, k_tiles, rows, cols = args["Q_TILES"], args["K_TILES"], args["BLOCK_M"], args["BLOCK_N"]
        assert grid[0] == parts * q_tiles * k_tiles, (kernel, grid, parts)
        pairs = tiles_used(lengths, q_tiles, rows) * tiles_used(lengths, k_tiles, cols)
        return LaunchTiles(kernel, f"{rows} x {cols}", q_tiles * k_tiles, grid[0], int(pairs.sum()),
                           float(np.square(lengths.astype(np.float64)).sum()) / (grid[0] * rows * cols))
    if kernel == "attention_bwd_delta":       # rows of N in order, whatever the subgraphs
        rows = args["BLOCK_R"]
        return LaunchTiles(kernel, f"{rows} rows of N", None, grid[0], math.ceil(nodes / rows),
                           nodes / (grid[0] * rows))
    raise ValueError(f"unknown attention launch {kernel}")


def edge_cut_share(csr, assignment: np.ndarray) -> float:
    """The share of the graph's edge weight between different subgraphs."""
    coo = csr.tocoo()
    return float(coo.data[assignment[coo.row] != assignment[coo.col]].sum() / coo.data.sum())


def size_summary(lengths: np.ndarray, target: int) -> dict:
    sizes, counts = np.unique(lengths, return_counts=True)
    top = [f"{s}: {100 * c / lengths.size:.1f}" for s, c in zip(sizes[::-1][:3], counts[::-1][:3])]
    return {"parts": lengths.size, "min": int(sizes[0]), "median": float(np.median(lengths)), "max": int(sizes[-1]),
            "top": ", ".join(top), "fill": lengths.mean() / target}


def measure(adjacency, target: int, capped: bool, head_dim: int, seed: int) -> dict:
    start = time.perf_counter()
    if capped:
        partition = partition_graph(adjacency, max_size=target, seed=seed)
    else:
        partition = partition_graph(adjacency, math.ceil(adjacency.shape[0] / target), seed=seed)
    metis_s = time.perf_counter() - start
    lengths = partition.lengths.numpy().astype(np.int64)
    launches = [launch_tiles(kernel, grid, args, lengths)
                for kernel, grid, args in record_launches(partition, head_dim)]
    return {"target": target, "partition": f"max_size = {target}" if capped else f"ceil(N / {target}) parts",
            "metis_s": metis_s, "cut": edge_cut_share(adjacency, partition.assignment.numpy()),
            **size_summary(lengths, target), "launches": launches}


def size_table(rows: list[dict]) -> list[str]:
    out = ["| N | partition | METIS s | P | min / median / max | largest sizes: % of parts | mean size / target "
           "| edge weight cut |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['n']:,} | {r['partition']} | {r['metis_s']:.1f} | {r['parts']:,} | "
                   f"{r['min']} / {r['median']:g} / {r['max']} | {r['top']} | {100 * r['fill']:.1f} % | "
                   f"{100 * r['cut']:.2f} % |")
    return out


def launch_table(rows: list[dict]) -> list[str]:
    """One row per partition; per pass, each launch as ``label: tiles per subgraph x tile rows:
    % of programs with work / % of tile rows filled``. Partitions that fit one tile take other
    kernels than the rest, so launches are listed in cells rather than as columns."""
    out = ["| N | partition | forward | backward |", "|---|---|---|---|"]
    for r in rows:
        cells = {"forward": [], "backward": []}
        for launch in r["launches"]:
            tiles = launch.tile if launch.per_subgraph is None else f"{launch.per_subgraph} x {launch.tile}"
            cell = (f"{LAUNCH_LABELS[launch.kernel]}: {tiles}: {100 * launch.with_work / launch.programs:.1f} / "
                    f"{100 * launch.filled:.0f}")
            cells["forward" if launch.kernel.startswith("attention_fwd") else "backward"].append(cell)
        out.append(f"| {r['n']:,} | {r['partition']} | " + "; ".join(cells["forward"]) + " | "
                   + "; ".join(cells["backward"]) + " |")
    return out


def report(rows: list[dict], args, argv: list[str], env: dict, knn_s: dict) -> str:
    command = "python bench/tile_report.py" + "".join(f" {shlex.quote(a)}" for a in argv)
    commit = (env["commit"] or "unknown")[:12] + (" (with uncommitted changes)" if env.get("commit_dirty") else "")
    lines = [
        "# Subgraph sizes and query tiles of the triton backend (launch grids, not timings)", "",
        f"Generated by `{command}` on a CPU (no kernel runs: the launches are recorded), commit {commit}, "
        f"torch {env['torch']}, triton {env['triton']}, torch threads {env['cpu_threads']}. k-NN graph, "
        f"k = {args.k}, on uniform random points in the unit square (seed {args.seed}; built in "
        + ", ".join(f"{s:.1f} s at N = {n:,}" for n, s in knn_s.items()) + f"); METIS seed {args.seed}. "
        "METIS s: the `partition_graph` call, wall time. The plain partition is METIS with its default "
        "tolerance (a part may be 1.03 x the average); `max_size = T` asks it for ceil(1.02 N / T) parts with "
        "a tolerance that keeps them within T, and re-cuts any part it leaves over T "
        "(`sba_model.graph.partitioning`).", "",
        "## Subgraph sizes", "",
        *size_table(rows), "",
        f"## Programs per launch (fp16 or bf16, head dim {args.head_dim}, one shared bias)", "",
        "Each launch of a pass: its kernel, the programs each subgraph gets per (batch, head) x the tile "
        "of one program, then `% of launched programs with work / % of launched tile rows holding a "
        "node`. A program has work when its tile starts inside its subgraph; the others return at once. "
        "Subgraphs that all fit one tile take the one-tile kernels (one forward and one fused backward "
        "launch, `triton_backend.one_tile_blocks`); the rest take the tiled ones. dBias: one program per "
        "(query tile, key tile) pair, filled = tile entries holding a pair of nodes. The delta launch "
        "runs over rows of N, not subgraphs.", "",
        *launch_table(rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000], help="graph sizes")
    p.add_argument("--targets", type=int, nargs="+", default=[32, 64, 128], help="target subgraph sizes")
    p.add_argument("--k", type=int, default=8, help="neighbours per node of the k-NN graph")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the points and of METIS")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "static" / "tiles.md")
    args = p.parse_args(argv)
    if min(args.targets) < 1 or args.head_dim < 1 or args.k < 1 or min(args.n) <= max(args.k, max(args.targets)):
        p.error("--targets, --head-dim and --k must be >= 1, and every --n above --k and the largest target")

    rows, knn_s = [], {}
    for n in args.n:
        start = time.perf_counter()
        adjacency = to_csr(knn_adjacency(np.random.default_rng(args.seed).random((n, 2)), args.k))
        knn_s[n] = time.perf_counter() - start
        for target in args.targets:
            for capped in (False, True):
                rows.append(dict(measure(adjacency, target, capped, args.head_dim, args.seed), n=n))
                print(f"N = {n:,}: {rows[-1]['partition']}: {rows[-1]['metis_s']:.1f} s", flush=True)
    text = report(rows, args, argv, environment("cpu"), knn_s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, lambda f: f.write_text(text))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
