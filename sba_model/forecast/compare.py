"""Run every model on one dataset, same split and settings, and write one markdown table.

    python -m sba_model.forecast.compare --data los_loop --out bench/results/los_loop.md

Each model trains in its own run folder under ``--runs``; the table lists test MAE / RMSE /
MAPE per reported horizon and averaged, with the exact command at the top.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import train, zoo


def table(results: list[dict]) -> str:
    """Markdown: one row per model, MAE/RMSE/MAPE per horizon then averaged."""
    labels = list(results[0]["test"]["horizons"])
    head = "| model | " + " | ".join(f"{h} MAE / RMSE / MAPE" for h in labels) + " | avg MAE | avg RMSE | avg MAPE | epochs | train s |"
    rule = "|" + " --- |" * (len(labels) + 6)
    best = min(r["test"]["average"]["MAE"] for r in results)
    rows = []
    for r in results:
        t = r["test"]
        cells = [f"{t['horizons'][h]['MAE']:.3f} / {t['horizons'][h]['RMSE']:.3f} / {t['horizons'][h]['MAPE']:.2f}%"
                 for h in labels]
        avg = t["average"]
        mae = f"**{avg['MAE']:.3f}**" if avg["MAE"] == best else f"{avg['MAE']:.3f}"
        rows.append(f"| {r['model']} | " + " | ".join(cells) +
                    f" | {mae} | {avg['RMSE']:.3f} | {avg['MAPE']:.2f}% | {r['epochs_run']} | {r['train_seconds']:.0f} |")
    return "\n".join([head, rule, *rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sba-compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="synthetic")
    p.add_argument("--models", nargs="+", default=list(zoo.MODELS), choices=zoo.MODELS)
    p.add_argument("--out", type=Path, default=None, help="markdown file (default runs/<data>/compare.md)")
    p.add_argument("--runs", type=Path, default=None, help="parent of the run folders (default runs/<data>)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--parts", type=int, nargs="+", default=[16, 4])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=False,
                   help="learned models predict the change from the last input step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    stem = Path(a.data).stem
    runs = a.runs or Path("runs") / stem
    out = a.out or runs / "compare.md"
    base = train.TrainConfig(data=a.data, epochs=a.epochs, patience=a.patience, parts=a.parts, dim=a.dim, lr=a.lr,
                             batch_size=a.batch_size, seed=a.seed, device=a.device, residual=a.residual, quiet=True)
    started = time.perf_counter()
    results = []
    for name in a.models:
        print(f"[{time.perf_counter() - started:6.0f}s] {name}", flush=True)
        results.append(train.run(replace(base, model=name, run_dir=str(runs / name))))
        avg = results[-1]["test"]["average"]
        print(f"          test avg MAE {avg['MAE']:.4f}  RMSE {avg['RMSE']:.4f}  MAPE {avg['MAPE']:.2f}%", flush=True)
    command = "python -m sba_model.forecast.compare " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    text = (f"# {stem}: SBATransformer, ablations and baselines\n\n"
            f"Command: `{command}`\n\n"
            f"Test split: last {int(100 * base.test_fraction)}% of the series (chronological); validation: the "
            f"{int(100 * base.val_fraction)}% before it; inputs {base.in_steps} steps. Lower is better; best "
            f"averaged MAE in bold. Total wall time {time.perf_counter() - started:.0f} s.\n\n{table(results)}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
