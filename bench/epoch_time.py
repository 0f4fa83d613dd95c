"""Seconds per training epoch of ``python -m sba_model.forecast.train`` under each kernel backend, in one run.

    python bench/epoch_time.py --data los_loop --backends torch auto --rounds 3

Every round trains one epoch (training plus the validation pass) per backend, with the same seed
and settings, alternating backends so that a change in machine load hits each alike. The
epoch's time is the one the training CLI records in its history. Prints a markdown table
(median and every round) and writes it to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from sba_model.forecast import train


def epoch(cfg: train.TrainConfig) -> dict:
    """Train one epoch with ``cfg``; the history entry of that epoch (seconds, train MAE, ...)."""
    train.run(cfg)
    return torch.load(Path(cfg.run_dir) / "last.pt", weights_only=False)["history"][0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="los_loop")
    p.add_argument("--backends", nargs="+", default=["torch", "auto"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    runs: dict[str, list[dict]] = {b: [] for b in args.backends}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for b in args.backends:
                cfg = train.TrainConfig(data=args.data, epochs=1, seed=args.seed, backend=b, device="cpu",
                                        run_dir=f"{tmp}/{b}-{r}", quiet=True)
                runs[b].append(epoch(cfg))
                print(f"round {r} {b}: {runs[b][-1]['seconds']:.2f} s", file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    base = statistics.median(h["seconds"] for h in runs[args.backends[0]])
    lines = [f"`python bench/epoch_time.py {' '.join(argv if argv is not None else sys.argv[1:])}`: one epoch of "
             f"`python -m sba_model.forecast.train --data {args.data}` (default settings, seed {args.seed}) per backend and "
             f"round, backends alternating. Commit {commit}, torch {torch.__version__}, {platform.machine()} CPU with "
             f"{torch.get_num_threads()} threads.",
             "",
             "| backend | median s/epoch | speed-up | every round (s) | train MAE |",
             "| --- | --- | --- | --- | --- |"]
    for b, hist in runs.items():
        seconds = [h["seconds"] for h in hist]
        med = statistics.median(seconds)
        every = ", ".join(f"{s:.2f}" for s in seconds)
        lines.append(f"| {b} | {med:.2f} | {base / med:.2f}x | {every} | {hist[0]['train_mae']:.4f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
