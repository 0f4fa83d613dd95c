"""Run every model on one dataset over several seeds, same split and settings; write one markdown
table and one learning-curve plot.

    python -m sba_model.forecast.compare --data los_loop --residual --out bench/results/los_loop.md

Each model trains once per seed (``--seeds``, default 0 1 2) in its own run folder,
``<runs>/<model>/seed<s>``. The table lists test MAE / RMSE / MAPE per reported horizon and
averaged, each the mean ± sample sd over the seeds, and how many seeds each model won (the
lowest averaged MAE); its header holds the exact command, the commit, this call's wall time and
the training time summed over every run in the table.
``<out stem>_curves.png`` beside it plots validation MAE per epoch, one line per learned model,
on the first seed.

``--resume`` makes a long comparison survive being stopped: a run whose folder already holds
``metrics.json`` from exactly these settings is read back instead of trained again, an
unfinished one with exactly these settings continues from its last checkpoint (`train`'s
``--resume``), and a run with other settings trains afresh (without ``--resume``, every run
does: its folder's earlier run is replaced). The table then says how many runs
it read back; its wall time is this call's, and the summed training time counts the runs read
back too (each run's ``train_seconds``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

from . import train, zoo


# ----------------------------------------------------------------------------- over seeds
def mean_sd(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (divisor n - 1) of ``values``; sd None for one value."""
    if len(values) == 0:
        raise ValueError("values must hold at least one number")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def spread(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± sd`` of ``values`` (`mean_sd`) with ``digits`` decimals; the bare mean for one value."""
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}" if sd is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def seeds_won(scores: dict[str, Sequence[float]]) -> dict[str, int]:
    """model -> on how many seeds it had the lowest score. ``scores``: model -> one score per
    seed (lower is better; the same seeds in the same order for every model). A tie counts as
    a win for every tied model."""
    counts = {len(v) for v in scores.values()}
    if len(counts) != 1:
        raise ValueError(f"scores must hold the same number of seeds for every model, got {sorted(counts)}")
    best = [min(column) for column in zip(*scores.values())]
    return {model: sum(v == b for v, b in zip(values, best)) for model, values in scores.items()}


def _metric_cell(metrics: list[dict]) -> str:
    """``MAE / RMSE / MAPE%`` of one horizon (or the average), each mean ± sd over the seeds'
    metric dicts ``{"MAE", "RMSE", "MAPE"}``."""
    return (f"{spread([m['MAE'] for m in metrics])} / {spread([m['RMSE'] for m in metrics])} / "
            f"{spread([m['MAPE'] for m in metrics], 2)}%")


def table(results: dict[str, list[dict]]) -> str:
    """Markdown, one row per model in ``results``' order: test MAE / RMSE / MAPE per horizon,
    then averaged over the horizons, each mean ± sd over the seeds; seeds won (`seeds_won` on
    the averaged MAE); the averaged MAE of each seed; epochs run per seed; mean training seconds
    of one run. The lowest mean averaged MAE is in bold.

    ``results``: model -> the `train.run` metrics of each seed, the same seeds in the same order
    for every model."""
    if not results or not all(results.values()):
        raise ValueError("results must hold at least one model, each with at least one seed's metrics")
    labels = list(next(iter(results.values()))[0]["test"]["horizons"])
    avg_mae = {m: [r["test"]["average"]["MAE"] for r in runs] for m, runs in results.items()}
    won = seeds_won(avg_mae)
    best = min(statistics.mean(v) for v in avg_mae.values())
    head = ("| model | " + " | ".join(f"{h} MAE / RMSE / MAPE" for h in labels) +
            " | avg MAE | avg RMSE | avg MAPE | seeds won | avg MAE per seed | epochs | train s |")
    rows = [head, "|" + " --- |" * (len(labels) + 8)]
    for model, runs in results.items():
        cells = [_metric_cell([r["test"]["horizons"][h] for r in runs]) for h in labels]
        mae = spread(avg_mae[model])
        mae = f"**{mae}**" if statistics.mean(avg_mae[model]) == best else mae
        rows.append(f"| {model} | " + " | ".join(cells) +
                    f" | {mae} | {spread([r['test']['average']['RMSE'] for r in runs])}"
                    f" | {spread([r['test']['average']['MAPE'] for r in runs], 2)}% | {won[model]}"
                    f" | {', '.join(f'{v:.3f}' for v in avg_mae[model])}"
                    f" | {', '.join(str(r['epochs_run']) for r in runs)}"
                    f" | {statistics.mean(r['train_seconds'] for r in runs):.0f} |")
    return "\n".join(rows)


def plot_curves(results: dict[str, list[dict]], path: Path, title: str) -> None:
    """Validation MAE per epoch of each model's first run in ``results`` (model -> `train.run`
    metrics per seed), one line per model, to the PNG ``path``. Models without weights have no
    epochs and no line."""
    fig, ax = train.pyplot().subplots(figsize=(7, 4.5))
    for model, runs in results.items():
        history = runs[0]["history"]
        if history:
            ax.plot([h["epoch"] for h in history], [h["val_mae"] for h in history], label=model)
    ax.xaxis.get_major_locator().set_params(integer=True)            # whole epochs
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MAE (data units)")
    ax.set_title(title)
    if ax.lines:
        ax.legend()
    ax.grid(alpha=0.3)
    train.save_figure(fig, path)


# ----------------------------------------------------------------------------- the command
def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader never sees half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def commit() -> str:
    """``git rev-parse HEAD`` of the checkout holding this file, marked when tracked files have
    uncommitted changes; ``unknown`` outside a git checkout."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head, changed = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes" if changed else "")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sba-compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="synthetic")
    p.add_argument("--models", nargs="+", default=list(zoo.MODELS), choices=zoo.MODELS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="every model trains once per seed")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file (default runs/<data>/compare.md); the plot goes beside it")
    p.add_argument("--runs", type=Path, default=None, help="parent of the run folders (default runs/<data>)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--parts", type=int, nargs="+", default=[16, 4])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=False,
                   help="learned models predict the change from the last input step")
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true",
                   help="read back runs finished with these settings; continue unfinished ones from last.pt; "
                        "train the rest afresh")
    a = p.parse_args(argv)
    for flag in ("models", "seeds"):
        values = getattr(a, flag)
        if len(set(values)) != len(values):
            p.error(f"--{flag} must not repeat a value, got {values}")
    if min(a.seeds) < 0:
        p.error(f"--seeds must be >= 0 (numpy's seeds are), got {a.seeds}")
    if min(a.epochs, a.patience, a.batch_size) < 1:
        p.error("--epochs, --patience and --batch-size must be >= 1")
    for target in [t for t in (a.out,) if t is not None]:      # checked before hours of training, not after
        if target.is_dir():
            p.error(f"--out must be a file, {target} is a folder")
        if any(parent.exists() and not parent.is_dir() for parent in target.parents):
            p.error(f"--out: a parent of {target} is a file")
    return a


def same_settings(cfg: train.TrainConfig) -> bool:
    """Whether ``cfg.run_dir`` holds a run (finished or not) of exactly ``cfg``: its
    ``config.json`` holds every setting of ``cfg`` but how it ran (`train.HOW_IT_RAN`) and
    those left None, which `train.run` resolves from the data and records resolved."""
    try:
        saved = json.loads((Path(cfg.run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    # Not run_dir: the folder read is the run's, however its path was spelled (train's own
    # resume check leaves it out too); a mismatch here retrains, over the finished run.
    wanted = json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in (*train.HOW_IT_RAN, "run_dir")}))
    return all(v is None or saved.get(k) == v for k, v in wanted.items())


def saved_metrics(run_dir) -> Optional[dict]:
    """The ``metrics.json`` of a finished run in ``run_dir``, else None. (`train.run` removes a
    folder's ``metrics.json`` when a new run starts in it, so an unfinished run has none.)"""
    try:
        return json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    stem = Path(a.data).stem
    runs = a.runs or Path("runs") / stem
    out = a.out or runs / "compare.md"
    base = train.TrainConfig(data=a.data, epochs=a.epochs, patience=a.patience, parts=a.parts, dim=a.dim, lr=a.lr,
                             batch_size=a.batch_size, device=a.device, residual=a.residual, quiet=True,
                             overwrite=True)          # a run not read back or continued trains afresh
    started = time.perf_counter()
    results = {name: [] for name in a.models}
    reused = 0
    for seed in a.seeds:
        for name in a.models:
            cfg = replace(base, model=name, seed=seed, run_dir=str(runs / name / f"seed{seed}"))
            # Read back or continue only a run of these very settings: with other epochs, its
            # learning-rate schedule would not be the one the command names. Anything else
            # trains afresh.
            same = a.resume and same_settings(cfg)
            done = saved_metrics(cfg.run_dir) if same else None
            cfg = replace(cfg, resume=same and done is None)
            print(f"[{time.perf_counter() - started:6.0f}s] {name} seed {seed}{' (read back)' if done else ''}",
                  flush=True)
            reused += done is not None
            results[name].append(done or train.run(cfg))
            avg = results[name][-1]["test"]["average"]
            print(f"          test avg MAE {avg['MAE']:.4f}  RMSE {avg['RMSE']:.4f}  MAPE {avg['MAPE']:.2f}%", flush=True)
    curves = out.with_name(out.stem + "_curves.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(results, curves, f"{stem}: validation MAE per epoch, seed {a.seeds[0]}")
    command = "python -m sba_model.forecast.compare " + " ".join(shlex.quote(x) for x in argv)
    text = (f"# {stem}: SBATransformer, ablations and baselines\n\n"
            f"Command: `{command}`\n\n"
            f"Commit: `{commit()}`. Seeds: {', '.join(map(str, a.seeds))}. "
            f"Total wall time {time.perf_counter() - started:.0f} s"
            f"{f' ({reused} of {len(a.seeds) * len(a.models)} runs read back from an earlier call, --resume)' if reused else ''}"
            f"; training time summed over all {len(a.seeds) * len(a.models)} runs "
            f"{sum(r['train_seconds'] for rs in results.values() for r in rs):.0f} s.\n\n"
            f"Test split: last {int(100 * base.test_fraction)}% of the series (chronological); validation: the "
            f"{int(100 * base.val_fraction)}% before it; inputs {base.in_steps} steps. Each cell is the mean ± "
            f"sample sd over the seeds (the bare value for one seed); lower is better; lowest mean averaged MAE in "
            f"bold. Seeds won: on how many seeds the model had the lowest averaged MAE (a tie counts for each). "
            f"Learning curves (validation MAE, seed {a.seeds[0]}): `{curves.name}`.\n\n{table(results)}\n")
    write_text_atomic(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
