"""Training on a large graph on the CPU: SBATransformer at N = 100,000 sensors, full attention
at the largest N it can run.

    python bench/large_graph.py                       # SBA at N = 100,000, 2 epochs; full attention 8,192 down
    python bench/large_graph.py --n 3000 --epochs 1 --steps 200 --full-attention-n 1000 500 --out /tmp/large_graph.md

Both models train with the training CLI's own loop (`sba_model.forecast.train.run`) on
``synthetic_large:N:STEPS`` (`sba_model.forecast.data.synthetic_large`: sensors on a k-NN graph
with local and long-range structure, 15-minute steps; ``--steps`` of them, 3 days by default,
where the dataset's own default is 7), with the same settings: ``--epochs`` epochs (no early
stop), ``--batch-size``, ``--dim``, ``--heads``, 12 input steps, 4 output steps, and as many
layers as ``--parts`` has levels. SBA's partition is ``--parts``, by default subgraphs of about
32 sensors (``ceil(N / 32)``) in the first layer and of about 128 (``ceil(N / 128)``) in the
second. Full attention is the zoo's ``full_attention``: the same transformer with one subgraph
holding every sensor. It is tried at each ``--full-attention-n``, largest first, until one
finishes: that is the largest N it runs. An attempt that runs out of memory
(``--memory-cap-gb``, an address-space cap above what the imports mapped, or killed by the
system) or time (``--timeout`` seconds) is recorded as such, and the next N is tried.

Every run is a fresh process, so an out-of-memory run cannot take the benchmark down and
each peak resident memory (``ru_maxrss``) is the run's own: data generation, model building
and training. Per run: seconds per epoch (training plus the validation pass, from the run's
history; the mean over epochs), setup seconds (data, graph, partitions, PE: the process's
time after its imports and before the first epoch), peak resident memory and the test MAE.
``--out`` (default ``bench/results/large_graph_cpu.md``) gets the command, commit, versions
and a table, rewritten after every run so that a killed benchmark keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import proc_status_kb  # noqa: E402
from scaling import environment, write_atomic  # noqa: E402

from sba_model.forecast import train  # noqa: E402
from sba_model.forecast.data import LARGE_NODES, LARGE_STEPS  # noqa: E402

OUT = Path(__file__).parent / "results" / "large_graph_cpu.md"
FULL_ATTENTION_NS = [8192, 4096, 2048, 1024]
STEPS = 288                                      # 3 days of 15-minute steps: 187 training windows
OOM_SIGNS = ("MemoryError", "can't allocate memory", "not enough memory", "std::bad_alloc")


def default_parts(n: int) -> list[int]:
    """``[ceil(n / 32), ceil(n / 128)]``: subgraphs of about 32 sensors, then of about 128 (at
    least 2 and 1, so that the levels still decrease for small n). A layer's intra attention
    costs about its subgraph size per sensor: at N = 3,000 (one thread, batch 8), parts
    ``[47, 3]`` (coarse subgraphs of about 1,000 sensors) took 3.9x the time of a training step
    with ``[94, 24]``."""
    return [max(2, math.ceil(n / 32)), max(1, math.ceil(n / 128))]


# ----------------------------------------------------------------------------- one run, in its own process
def _child(spec: str) -> None:
    """Run one training job (``spec``: JSON of the job) and print its row as JSON on the last line."""
    started = time.perf_counter()
    job = json.loads(spec)
    if job["memory_cap_bytes"]:
        cap = proc_status_kb("VmSize") * 1024 + job["memory_cap_bytes"]      # above what the imports mapped
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    torch.set_num_threads(job["threads"])
    cfg = train.TrainConfig(data=f"synthetic_large:{job['n']}:{job['steps']}", model=job["model"],
                            epochs=job["epochs"], patience=job["epochs"] + 1, batch_size=job["batch_size"],
                            parts=job["parts"], dim=job["dim"], heads=job["heads"], out_steps=4, horizons=[1, 2, 3, 4],
                            seed=job["seed"], device="cpu", run_dir=job["run_dir"], quiet=True)
    metrics = train.run(cfg)
    ends = [h["seconds"] for h in metrics["history"]]
    epochs = [b - a for a, b in zip([0.0] + ends, ends)]
    print(json.dumps({"status": "ok", "epochs": len(epochs), "seconds_per_epoch": sum(epochs) / len(epochs),
                      "epoch_seconds": epochs,
                      "setup_s": time.perf_counter() - started - metrics["train_seconds"],
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "test_mae": metrics["test"]["average"]["MAE"]}))


def failure_status(done: subprocess.CompletedProcess) -> str:
    """"oom", "crashed (signal N)" or "error: <last line>" for a run that failed. SIGKILL is
    how the kernel's OOM killer ends a process, so it counts as "oom"; other signals do not."""
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    if done.returncode == -signal.SIGKILL:
        return "oom (killed by signal 9)"
    if done.returncode < 0:
        return f"crashed (signal {-done.returncode})"
    if any(sign in done.stderr for sign in OOM_SIGNS):
        return "oom"
    return f"error: {tail[:200]}"


def run_in_child(model: str, n: int, parts: list[int], args, run_dir: str) -> dict:
    """Train ``model`` at ``n`` sensors in a fresh process; its row (``status`` "ok", "oom",
    "timeout: ..." or "error: ...", and the measurements when ok)."""
    job = {"model": model, "n": n, "parts": parts, "steps": args.steps, "epochs": args.epochs,
           "batch_size": args.batch_size, "dim": args.dim, "heads": args.heads, "seed": args.seed,
           "threads": args.threads, "memory_cap_bytes": int(args.memory_cap_gb * 2**30), "run_dir": run_dir}
    row = {"model": model, "n": n, "parts": parts}
    try:
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(row, status=f"timeout: over {args.timeout:g} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return dict(row, status=failure_status(done))
    return dict(row, **json.loads(lines[-1]))


# ----------------------------------------------------------------------------- the table
def table(rows: list[dict], args, env: dict, command: str) -> str:
    """The markdown file: how it was run, then one row per run."""
    dirty = " (with uncommitted changes)" if env.get("commit_dirty") else ""
    lines = ["# Training on a large graph on the CPU: SBATransformer and full attention", "",
             f"`{command}`", "",
             f"Commit {env.get('commit')}{dirty}, torch {env['torch']}, Python {env['python']}, {env['platform']}, "
             f"{args.threads} torch threads; every run a fresh process with an address-space cap of "
             f"{args.memory_cap_gb:g} GiB and {args.timeout:g} s.", "",
             f"Data `synthetic_large:N:{args.steps}` ({args.steps} 15-minute steps, 8-NN graph); "
             f"{args.epochs} epoch(s) each (training and the validation pass), batch size {args.batch_size}, "
             f"dim {args.dim}, {args.heads} heads, 12 steps in, 4 out, seed {args.seed}.", "",
             "| model | N | parts (SBA) / layers | status | s / epoch | epochs | setup s | peak RSS (GiB) | test MAE |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        layout = ", ".join(f"{p:,}" for p in r["parts"]) if r["model"] == "sba" else f"{len(r['parts'])} layers"
        if r["status"] == "ok":
            lines.append(f"| {r['model']} | {r['n']:,} | {layout} | ok | {r['seconds_per_epoch']:.1f} | {r['epochs']} "
                         f"| {r['setup_s']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['test_mae']:.4f} |")
        else:
            lines.append(f"| {r['model']} | {r['n']:,} | {layout} | {r['status']} | – | – | – | – | – |")
    largest = [r["n"] for r in rows if r["model"] == "full_attention" and r["status"] == "ok"]
    tried = [r for r in rows if r["model"] == "full_attention"]
    if tried:
        lines += ["", f"Largest N full attention ran: {max(largest):,}." if largest
                  else "Full attention ran at none of the N tried."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=LARGE_NODES, help="sensors for SBA (default %(default)s)")
    p.add_argument("--parts", type=int, nargs="+", default=None,
                   help="SBA's subgraphs per layer, finest first (default ceil(N/32), ceil(N/128)); full attention "
                        "gets as many layers")
    p.add_argument("--full-attention-n", type=int, nargs="*", default=FULL_ATTENTION_NS,
                   help="sensor counts to try full attention at, largest first, until one finishes "
                        "(default %(default)s; none: SBA only)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (default %(default)s)")
    p.add_argument("--steps", type=int, default=STEPS,
                   help="time steps of the synthetic data (default %(default)s = 3 days of 15 minutes; the "
                        f"dataset's own default is {LARGE_STEPS}); at least 160, for 16 in the validation range")
    p.add_argument("--batch-size", type=int, default=4,
                   help="windows per step (default %(default)s: at N = 100,000 with the default parts one window "
                        "took 1.9 GB for the backward pass above the 0.8 GB of data and model, so about 8 GB)")
    p.add_argument("--dim", type=int, default=64, help="model width (default %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data, partition and training seed (default %(default)s)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads per run (default: this machine's, %(default)s)")
    p.add_argument("--memory-cap-gb", type=float, default=22.0,
                   help="address-space cap per run in GiB, above what its imports mapped; 0 for none "
                        "(default %(default)s, for the CI machine's 24 GB)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is stopped (default %(default)s)")
    p.add_argument("--out", type=Path, default=OUT, help="the markdown file to write (default %(default)s)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    if min([args.n, *args.full_attention_n]) < 10:
        p.error("--n and --full-attention-n: sensor counts must be >= 10 (the k-NN graph needs more than 8)")
    if min(args.epochs, args.batch_size, args.dim, args.heads, args.threads) < 1 or args.timeout <= 0:
        p.error("--epochs, --batch-size, --dim, --heads, --threads and --timeout must be positive")
    if args.memory_cap_gb < 0:
        p.error("--memory-cap-gb must be >= 0 (0: no cap)")
    if args.steps < 160:
        p.error("--steps must be >= 160 (the validation range, 10%, needs 16 steps: 12 in, 4 out)")
    args.parts = args.parts or default_parts(args.n)
    args.full_attention_n = sorted(args.full_attention_n, reverse=True)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    command = "python bench/large_graph.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    env = environment("cpu")
    rows: list[dict] = []

    def record(row: dict) -> dict:
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, lambda f: f.write_text(table(rows, args, env, command)))
        print(f"{row['model']} N={row['n']:,}: {row['status']}"
              + (f", {row['seconds_per_epoch']:.1f} s/epoch, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB"
                 if row["status"] == "ok" else ""), file=sys.stderr)
        return row

    with tempfile.TemporaryDirectory() as tmp:
        record(run_in_child("sba", args.n, args.parts, args, os.path.join(tmp, "sba")))
        for n in args.full_attention_n:
            row = record(run_in_child("full_attention", n, args.parts, args, os.path.join(tmp, f"full-{n}")))
            if row["status"] == "ok":
                break
    print(table(rows, args, env, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
