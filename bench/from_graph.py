"""Preprocessing cost of `SBATransformer.from_graph` at large N, split by step.

    python bench/from_graph.py                                   # N = 1e6, parts 15625 976
    python bench/from_graph.py --n 100000 --parts 1563 98 --out /tmp/fg

The graph is a k-NN graph (k = 8) on random points in the unit square, built first and timed
on its own (it is from_graph's input, not its work). Then one call of ``from_graph``, timed end
to end, with each step it calls timed inside that same call (the functions are wrapped in
`sba_model.nn.model` / `sba_model.nn.layers`, so nothing runs twice and the steps add up to the
call): ``to_csr``, ``model_partitions`` (METIS chain, node order, the inter attention's levels),
``laplacian_pe``, ``subgraph_blocks`` (graph-bias blocks, one call per layer), and the rest
(reordering the graph, building the modules). Writes ``from_graph.json`` and ``from_graph.md``
under ``--out`` with the machine, versions, commit, load average and peak resident memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import environment, write_atomic  # noqa: E402

import sba_model.nn.layers  # noqa: E402
import sba_model.nn.model  # noqa: E402
from sba_model import SBATransformer, knn_adjacency  # noqa: E402

STEPS = {"to_csr": sba_model.nn.model, "model_partitions": sba_model.nn.model, "permute_graph": sba_model.nn.model,
         "laplacian_pe": sba_model.nn.model,
         "subgraph_blocks": sba_model.nn.layers}


def timed_steps() -> dict[str, float]:
    """Wrap each step's function where from_graph looks it up; returns the seconds per step,
    filled in as they run."""
    seconds = dict.fromkeys(STEPS, 0.0)
    for name, module in STEPS.items():
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapper(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_name] += time.perf_counter() - start

        setattr(module, name, wrapper)
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--parts", type=int, nargs="+", default=[15625, 976])
    p.add_argument("--k", type=int, default=8, help="neighbours per node of the k-NN graph")
    p.add_argument("--pe-dim", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "from-graph-cpu")
    args = p.parse_args(argv)
    if args.k < 1 or args.n <= args.k or args.pe_dim < 0 or min(args.parts) < 1:
        p.error("--n must exceed --k >= 1, --pe-dim must be >= 0 and --parts >= 1")

    load_before = os.getloadavg()
    start = time.perf_counter()
    adjacency = knn_adjacency(np.random.default_rng(args.seed).random((args.n, 2)), args.k)
    knn_s = time.perf_counter() - start

    seconds = timed_steps()
    start = time.perf_counter()
    model = SBATransformer.from_graph(adjacency, args.parts, in_steps=12, in_channels=1, out_steps=12,
                                      out_channels=1, pe_dim=args.pe_dim, graph_bias=True, seed=args.seed)
    total_s = time.perf_counter() - start
    steps = dict(seconds, other=total_s - sum(seconds.values()))

    doc = {
        "environment": dict(environment("cpu"), load_average_before=load_before, load_average_after=os.getloadavg()),
        "config": {"n": args.n, "k": args.k, "parts": args.parts, "pe_dim": args.pe_dim, "seed": args.seed,
                   "graph_bias": True, "torch_threads": torch.get_num_threads()},
        "knn_adjacency_s": knn_s,
        "from_graph_s": total_s,
        "steps_s": steps,
        "layers": [{"num_parts": b.partition.num_parts, "max_size": b.partition.max_size,
                    "inter_levels": [lv.num_parts for lv in b.inter.levels]} for b in model.blocks],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "python": platform.python_version(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "from_graph.json", lambda f: f.write_text(json.dumps(doc, indent=1)))
    lines = [f"# `SBATransformer.from_graph` at N = {args.n:,}", "",
             f"k-NN graph (k = {args.k}) on random points, parts {args.parts}, pe_dim {args.pe_dim}, graph bias on; "
             f"commit {doc['environment']['commit']}, torch {doc['environment']['torch']}, "
             f"{doc['environment']['cpu_threads']} threads, load average before "
             f"{load_before[0]:.2f} / after {doc['environment']['load_average_after'][0]:.2f} (1 min).", "",
             "| step | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {s:.1f} |" for name, s in steps.items()]
    lines += [f"| **from_graph, end to end** | **{total_s:.1f}** |", "",
              f"Building the k-NN graph itself (the input): {knn_s:.1f} s. Peak resident memory "
              f"{doc['peak_rss_bytes'] / 2**30:.1f} GiB.", "",
              "Layers: " + "; ".join(f"P = {l['num_parts']} (M = {l['max_size']}), inter levels {l['inter_levels']}"
                                     for l in doc["layers"])]
    write_atomic(args.out / "from_graph.md", lambda f: f.write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
