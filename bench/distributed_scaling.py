"""Spatial sharding on the CPU with gloo: peak memory per rank, time per training step, and bytes
exchanged per step against the node-feature bytes a rank holds, for 1 and 2 ranks.

    python bench/distributed_scaling.py                     # N = 65,536 and 262,144
    python bench/distributed_scaling.py --nodes 65536 --out /tmp/x

Each (N, ranks) point runs in fresh processes (``torchrun --standalone``; one rank is the plain
single-process model, two ranks are `SpatialShard`s). Every rank builds the same graph (N
random points in the unit square, 8 nearest neighbours), the same nested METIS partitions
(subgraphs of about 128 nodes, then about 256) and the same SBATransformer (graph bias on,
no PE), then trains on random windows: forward, masked-MAE backward, gradient all-reduce, AdamW.

* peak memory: the process's peak resident set (``VmHWM``) over the timed steps, reset through
  ``/proc/self/clear_refs`` once the model is built and one step has run (after ``malloc_trim``,
  so memory that building the full graph and its partitions freed is not counted; glibc maps
  every allocation over 1 MiB on its own, ``MALLOC_MMAP_THRESHOLD_``, so freed tensors leave the
  resident set at once); it includes everything the process holds
  (torch, the model, the optimizer state), not only the step's working memory, which is also
  reported (peak minus the resident set before the steps);
* time per step: median wall time of the timed steps, after one untimed step;
* bytes exchanged per step by one rank, counted from the plan: per layer, the all-gather of
  the pooled tokens (the rank receives ``(W-1) * max P_r * B * D`` numbers) and its backward
  reduce-scatter (as many), plus the ring all-reduce of the gradients (``2 (W-1)/W`` of the
  parameter bytes, the graph-bias weights' N numbers per layer included); against the bytes of
  one ``[B, n_r, D]`` node-feature tensor of the rank.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
CONFIG = dict(batch=2, in_steps=12, out_steps=12, dim=32, heads=1, mlp_ratio=2.0, node_group=(128, 256), knn=8,
              steps=3, seed=0)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(n: int, out: Path) -> None:
    import torch.distributed as dist

    from sba_model import SBATransformer, knn_adjacency
    from sba_model.nn import distributed as sd
    from sba_model.forecast.train import masked_mae

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    c = CONFIG
    points = np.random.default_rng(c["seed"]).random((n, 2))
    start = time.perf_counter()
    torch.manual_seed(c["seed"])
    model = SBATransformer.from_graph(knn_adjacency(points, c["knn"]), [n // g for g in c["node_group"]],
                                      in_steps=c["in_steps"], in_channels=1, out_steps=c["out_steps"],
                                      out_channels=1, dim=c["dim"], num_heads=c["heads"], mlp_ratio=c["mlp_ratio"],
                                      pe_dim=0, backend="torch")
    plan = sd.plan_spatial([b.partition for b in model.blocks], world)
    net = sd.SpatialShard(model, plan, rank) if world > 1 else model
    n_r = plan.nodes(rank).stop - plan.nodes(rank).start
    build_s = time.perf_counter() - start
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(c["batch"], c["in_steps"], n_r, 1, generator=g)
    y = torch.randn(c["batch"], c["out_steps"], n_r, 1, generator=g)
    mask = torch.ones_like(y, dtype=torch.bool)

    def step():
        count = sd.all_reduce_sum(mask.sum().float()) if world > 1 else mask.sum().float()
        loss = masked_mae(net(x), y, mask, count)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            sd.allreduce_gradients(model.parameters())
        opt.step()

    step()                                              # optimizer state and autograd threads exist now
    dist.barrier()
    ctypes.CDLL("libc.so.6").malloc_trim(0)             # return what building the model freed to the OS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before_kb = _rss_kb("VmRSS")
    times = []
    for _ in range(c["steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_kb = _rss_kb("VmHWM")

    B, D, elt = c["batch"], c["dim"], 4
    token_bytes = sum(2 * (world - 1) * max(plan.counts(level)) * B * D * elt
                      for level, block in enumerate(model.blocks) if block.has_inter)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = int(2 * (world - 1) / world * param_bytes)
    result = dict(rank=rank, world=world, nodes=n, rank_nodes=n_r, parts=[b.partition.num_parts for b in model.blocks],
                  rank_parts=[plan.counts(level)[rank] for level in range(len(model.blocks))],
                  build_s=build_s, step_s=statistics.median(times), step_times_s=times,
                  peak_rss_bytes=peak_kb * 1024, step_rss_bytes=(peak_kb - before_kb) * 1024,
                  token_bytes_per_step=token_bytes, grad_allreduce_bytes_per_step=grad_bytes,
                  node_feature_bytes=B * n_r * D * elt, parameter_bytes=param_bytes)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


def _point(n: int, world: int, tmp: Path) -> list[dict]:
    folder = tmp / f"n{n}-w{world}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(Path(__file__).resolve()), "--worker", "--nodes", str(n), "--out", str(folder)]
    # Tensors over 1 MiB get their own mmap and go back to the OS when freed: the resident set
    # then follows what the process holds, not how glibc's heaps happened to fragment.
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="1048576"))
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


def _mb(b: float) -> str:
    return f"{b / 2 ** 20:.1f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[65536, 262144])
    p.add_argument("--out", default=str(ROOT / "results" / "distributed-cpu"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.worker:
        return worker(a.nodes[0], out)
    points = {f"{n}x{w}": _point(n, w, out / "ranks") for n in a.nodes for w in (1, 2)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    meta = dict(device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared), "
                       "gloo, one thread per rank", torch=torch.__version__, commit=commit, config=CONFIG)
    (out / "results.json").write_text(json.dumps(dict(meta, points=points), indent=1))
    lines = ["# Spatial sharding on the CPU (gloo)", "",
             f"Command: `python bench/distributed_scaling.py`. Device: {meta['device']}; torch {meta['torch']}; "
             f"commit {commit}. Config: {json.dumps(CONFIG)}. Raw numbers: `results.json`.", "",
             "| N | ranks | nodes per rank | peak RSS per rank (MiB) | step RSS growth (MiB) | peak vs 1 rank | "
             "time per step (s) | exchanged per step per rank: tokens (KiB) + gradients (MiB) | node-feature bytes "
             "per rank (MiB, one [B, n_r, D]) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in a.nodes:
        base = max(r["peak_rss_bytes"] for r in points[f"{n}x1"])
        for w in (1, 2):
            ranks = points[f"{n}x{w}"]
            peak = max(r["peak_rss_bytes"] for r in ranks)
            r0 = ranks[0]
            lines.append(
                f"| {n:,} | {w} | {' / '.join(str(r['rank_nodes']) for r in ranks)} | "
                f"{' / '.join(_mb(r['peak_rss_bytes']) for r in ranks)} | "
                f"{' / '.join(_mb(r['step_rss_bytes']) for r in ranks)} | {peak / base:.3f}x | "
                f"{max(r['step_s'] for r in ranks):.2f} | "
                f"{r0['token_bytes_per_step'] / 1024:.1f} + {_mb(r0['grad_allreduce_bytes_per_step'])} | "
                f"{_mb(r0['node_feature_bytes'])} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
