"""Autotuned against default launch configurations of the triton backend, on a GPU.

    python bench/autotune.py --n 100000 1000000 --out bench/results/autotune.md

For each N and bias kind: the forward and forward+backward timed with the default
configurations (`triton_tuning`'s rule, from compiles alone), then tuned (`triton_tuning`:
every candidate that passes the compile check for this GPU, timed on these inputs) and timed
again. Every point is tuned afresh (`triton_tuning.forget`): a key does not hold N, so a
program would reuse the configuration tuned at the first N it ran. Below the table, what each
key tried at each point: milliseconds, or why it was not timed.

Workload: bf16, B = 1, H = 8, d = 64, nodes cut into consecutive runs of the target size
(`workload.build_runs_layout`: the shapes METIS gives with a size cap, in the model's contiguous
node order, without pymetis); a bias ``[P, M, M]`` shared by the heads, N(0, 1), requiring grad
as `SBAttention`'s graph bias does. Times are medians of
`triton.testing.do_bench` (L2 flushed between calls).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import GPU_LAUNCH_BENCH, Config, build_runs_layout, intra_passes, make_bias, make_inputs  # noqa: E402

from sba_kernels import triton_tuning  # noqa: E402


def median_ms(fn) -> float:
    """``triton.testing.do_bench``'s median milliseconds per call of ``fn`` (L2 flushed between)."""
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


def time_point(n: int, subgraph_size: int, bias_kind: str, cfg: Config,
               bench=median_ms) -> tuple[list[str], list[str]]:
    """Table rows ``| N | M | bias | pass | default ms | tuned ms | default / tuned |``, and
    what each key tuned at this point tried (`describe_trials`). ``bench(fn) -> ms`` times a pass."""
    partition = build_runs_layout(n, subgraph_size)[0].to(cfg.device)
    M = partition.max_size
    q, k, v = make_inputs(n, cfg, requires_grad=True)
    bias = make_bias(partition, cfg, bias_kind, requires_grad=True)
    passes = intra_passes(q, k, v, partition, bias, torch.randn_like(q))
    triton_tuning.forget()
    rows = []
    for name, fn in passes.items():
        with triton_tuning.autotuning(False):
            default = bench(fn)
        with triton_tuning.autotuning(True):
            fn()                                   # tunes this pass's keys
            tuned = bench(fn)
        rows.append(f"| {n:,} | {M} | {bias_kind} | {name} | {default:.3f} | {tuned:.3f} | {default / tuned:.2f} |")
    return rows, describe_trials(f"N = {n:,}, M = {M}, bias {bias_kind}")


def describe_trials(point: str) -> list[str]:
    """One block per key tuned since the last `triton_tuning.forget`: each configuration
    tried, its ms or why it was not timed."""
    lines = []
    trials, kept = triton_tuning.trials(), triton_tuning.chosen()
    for key in sorted(trials, key=repr):
        lines += ["", f"{point}, `{key}`: kept {kept[key] or 'the default'}", "",
                  "| configuration | ms | pruned / failed |", "| --- | ---: | --- |"]
        for choice, ms, why in trials[key]:
            lines.append(f"| {choice or 'default'} | {'' if ms is None else f'{ms:.3f}'} | {why or ''} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--subgraph-size", type=int, nargs="+", default=[64])
    p.add_argument("--bias", nargs="+", choices=["none", "shared"], default=["none", "shared"])
    p.add_argument("--out", type=Path, default=None, help="also write the tables here (markdown)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    import triton

    cfg = GPU_LAUNCH_BENCH
    head = [f"# Autotuned vs default launch configurations: {torch.cuda.get_device_name()}, "
            f"torch {torch.__version__}, triton {triton.__version__}", "",
            "bf16, B = 1, H = 8, d = 64, contiguous METIS-sized runs; median ms (`do_bench`).", "",
            "| N | M | bias | pass | default ms | tuned ms | default / tuned |",
            "| ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    rows, trials = [], []
    for n in args.n:
        for m in args.subgraph_size:
            for kind in args.bias:
                new_rows, new_trials = time_point(n, m, kind, cfg)
                rows += new_rows
                trials += new_trials
                print("\n".join(new_rows), flush=True)
                if args.out:                              # rewritten after every point: a killed run keeps them
                    args.out.write_text("\n".join(head + rows + trials) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
