"""One process against two spatial ranks on a dataset, same seed and settings: validation MAE
per epoch of both, written to a markdown table.

    python bench/parallel_compare.py --data los_loop --epochs 10 --out bench/results/los_loop_parallel.md

Runs ``python -m sba_model.forecast.train`` once, then the same under
``torchrun --standalone --nproc_per_node 2 ... --parallel spatial`` (gloo on a CPU), each in its
own run folder under ``--runs``, and compares their ``last.pt`` histories.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def _train(args: list[str], ranks: int) -> float:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = (launcher if ranks > 1 else [sys.executable]) + ["-m", "sba_model.forecast.train", *args]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="los_loop")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--runs", default="runs/parallel_compare")
    p.add_argument("--out", required=True)
    p.add_argument("train_args", nargs="*", help="more sba_model.forecast.train arguments, after --")
    a = p.parse_args(argv)
    common = ["--data", a.data, "--epochs", str(a.epochs), "--quiet", "--overwrite", *a.train_args]   # scratch runs
    rows, seconds = {}, {}
    for name, ranks, extra in (("1 process", 1, []), ("2 ranks, spatial", 2, ["--parallel", "spatial"])):
        run_dir = Path(a.runs) / name.split(",")[0].replace(" ", "_")
        seconds[name] = _train(common + ["--run-dir", str(run_dir), *extra], ranks)
        rows[name] = torch.load(run_dir / "last.pt", weights_only=False)["history"]
    one, two = rows.values()
    lines = [f"# {a.data}: one process against two spatial ranks (gloo, CPU)", "",
             f"Command: `python bench/parallel_compare.py {' '.join(argv or sys.argv[1:])}`", "",
             f"Both runs: `python -m sba_model.forecast.train {' '.join(common)}`, the second under "
             "`torchrun --standalone --nproc_per_node 2 ... --parallel spatial`. Same seed; dropout masks are "
             "drawn per rank, so with dropout the runs differ by their random draws only.", "",
             "| epoch | val MAE, 1 process | val MAE, 2 ranks | relative difference |", "| --- | --- | --- | --- |"]
    for h1, h2 in zip(one, two):
        rel = abs(h2["val_mae"] - h1["val_mae"]) / h1["val_mae"]
        lines.append(f"| {h1['epoch']} | {h1['val_mae']:.4f} | {h2['val_mae']:.4f} | {100 * rel:.3f}% |")
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
              + f" (torch {torch.__version__}, {os.cpu_count()} CPU cores shared with other jobs, so not a speed "
              "comparison)."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
