"""Memory and time versus N: SBA against full attention and the block-diagonal peers.

    python bench/scaling.py                       # CPU or GPU, whichever is here
    python bench/scaling.py --device cuda --n 8600 1000000 --dtype bf16
    python bench/scaling.py --device cpu --large  # the SBA layer, forward, N = 65,536 .. 1,048,576

For every N and method (see methods.py) it records the median time and the peak memory of
a forward pass and of forward+backward. A method that runs out of memory or time at some N
is recorded as such there and not tried at larger N; nothing stops the sweep. Writes under
``--out``, rewritten after every point so that a killed run keeps what it measured:
``scaling.csv``, ``scaling.json`` (device, versions, commit, config, copy bandwidth,
every point, fitted slopes; on a CPU also each point's process CPU time, ``*_cpu_ms``, which
other users' load does not stretch) and log-log ``memory.png`` / ``time.png`` with the slope
of each method in the legend. Above ``INTER_THRESHOLD`` subgraphs the SBA layer's inter
attention is hierarchical; each row records its number of levels (``inter_levels``) and the
``layout`` (``--layout runs`` skips the graph and METIS for N = 1e7: see `workload.build_runs_layout`).
``--cuda-graph`` (GPU) times replays of each call captured in a CUDA graph: at small N an eager
call is bound by the host's Python, autograd and launches, not by the kernels.
``--large`` is the sweep that checks the layer stays linear past that point: ``sba_layer``
and its intra / inter split, forward only, N = 2^16 .. 2^20 (10 minutes on the shared 2-core
machine), written to ``scaling-<device>-large``. On a GPU, the ``intra[...]`` rows also carry
the achieved fraction of the bandwidth floor (SPEC 5b).

On a CPU each point runs in a fresh process (peak resident memory per point; an address-space
cap turns a runaway allocation into an "oom" row, not a dead machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402
import methods  # noqa: E402
from workload import Config, build_layout, build_runs_layout, make_inputs  # noqa: E402

from sba_kernels import Partition, backends  # noqa: E402

CPU_NS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
LARGE_NS = [65536, 131072, 262144, 524288, 1_048_576]
LARGE_METHODS = ["sba_layer[{b}]", "sba_layer.intra[{b}]", "sba_layer.inter[{b}]"]
GPU_NS = [1024, 4096, 8600, 16384, 65536, 262144, 1_000_000, 2_097_152, 4_194_304]


# ----------------------------------------------------------------------------- one point
def _failure(err: BaseException) -> str:
    """A status string for an exception: "oom", or "error: <first line>"."""
    text = str(err)
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text:
        return "oom"
    return f"error: {type(err).__name__}: {text.splitlines()[0][:200] if text else ''}"


def run_point(name: str, num_nodes: int, cfg: Config, partition: Partition, budget_s: float,
              levels: list[Partition]) -> dict:
    """Time and memory of method ``name`` at ``num_nodes`` (``levels``: the SBA layer's inter
    attention levels over ``partition``'s subgraphs). Forward and forward+backward each
    get a status ("ok", "oom", "error: ..."): a peer whose backward is unsupported on this
    device still reports its forward. Memory is measured before timing, on a fresh process's
    first calls (on the CPU). With ``cfg.cuda_graph`` the time is that of replaying each call
    captured in a CUDA graph (`measure.cuda_graph_replay`); memory stays the eager call's."""
    row = {"method": name, "n": num_nodes}
    q, k, v = make_inputs(num_nodes, cfg, requires_grad=cfg.backward)
    grad = torch.randn_like(q)
    fn = None

    def forward():
        with torch.no_grad():
            return fn(q.detach(), k.detach(), v.detach())

    def forward_backward():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(grad)

    phases = [("fwd", forward)] + ([("fwdbwd", forward_backward)] if cfg.backward else [])
    try:
        fn = methods.registry(cfg.device, levels)[name](q, k, v, partition)
    except Exception as err:   # a peer that cannot be set up here is a row, not a crash
        row["status"] = _failure(err)
        return row
    for key, call in phases:
        try:
            call()                 # warm-up, shared by both measurements
            row[f"{key}_peak_bytes"] = measure.peak_bytes(call, cfg.device)
            if cfg.device == "cuda":
                timed = measure.cuda_graph_replay(call) if cfg.cuda_graph else call
                row[f"{key}_ms"] = measure.median_ms(timed, cfg.device, budget_s)
            else:
                row[f"{key}_ms"], row[f"{key}_cpu_ms"] = measure.cpu_medians_ms(call, budget_s)
            row[f"{key}_status"] = "ok"
        except Exception as err:   # OOM, unsupported op, compile failure: recorded per phase
            row.pop(f"{key}_peak_bytes", None)
            row[f"{key}_status"] = _failure(err)
        finally:
            timed = None           # a captured graph (--cuda-graph) holds a memory pool: drop it before empty_cache
            if cfg.device == "cuda":
                torch.cuda.empty_cache()
    row["status"] = row["fwd_status"]
    return row


def _child_main(spec: str) -> None:
    """Entry point of a CPU point's fresh process: run one point, print its row as JSON."""
    job = json.loads(spec)
    cap = job.pop("memory_cap_bytes")
    if cap:
        virtual = measure.proc_status_kb("VmSize") * 1024        # what imports already mapped
        resource.setrlimit(resource.RLIMIT_AS, (virtual + cap, virtual + cap))
    torch.set_num_threads(job.pop("threads"))
    saved = torch.load(job.pop("partition_file"))
    partition = Partition(saved["index"], saved["lengths"])
    levels = [Partition(index, lengths) for index, lengths in saved["levels"]]
    cfg = Config(**job.pop("config"))
    print(json.dumps(run_point(job["method"], job["n"], cfg, partition, job["budget_s"], levels)))


def run_point_in_child(name, num_nodes, cfg, partition_file, args) -> dict:
    job = {"method": name, "n": num_nodes, "config": asdict(cfg), "partition_file": partition_file,
           "budget_s": args.budget, "memory_cap_bytes": int(args.memory_cap_gb * 2**30), "threads": args.threads}
    # Large allocations through mmap: freed memory leaves the resident set at once, so the peak
    # of each measured call is its own, not hidden by glibc's cache of an earlier call.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    try:
        done = subprocess.run([sys.executable, __file__, "--point", json.dumps(job)], capture_output=True,
                              text=True, timeout=args.point_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"method": name, "n": num_nodes, "status": f"timeout: over {args.point_timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        status = "oom" if "MemoryError" in tail or done.returncode < 0 else f"error: {tail[:200]}"
        return {"method": name, "n": num_nodes, "status": status}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- sweep
class _Progress:
    """tqdm's bar when tqdm is installed, else one printed line per point (the GPU image may
    lack it; the sweep must run there all the same)."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, unit="point") if tqdm else None
        self.total, self.done, self.what = total, 0, ""

    def set_description(self, what: str) -> None:
        if self.bar:
            self.bar.set_description(what)
        self.what = what

    def update(self) -> None:
        self.done += 1
        if self.bar:
            self.bar.update()
        else:
            print(f"[{self.done}/{self.total}] {self.what}", flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.close()


def sweep(args, cfg: Config, on_point=lambda rows: None) -> list[dict]:
    """Every (N, method) point; ``on_point(rows)`` after each, so a killed run keeps its points."""
    # The layer's intra / inter split runs when named (and in --large): the default sweep keeps its length.
    names = [m for m in methods.registry(cfg.device)
             if (m in args.methods if args.methods else not m.startswith("sba_layer."))]
    stopped: dict[str, str] = {}       # method -> why it is not tried at larger N
    rows = []
    with tempfile.TemporaryDirectory() as tmp, _Progress(len(args.n) * len(names)) as bar:
        for n in args.n:
            bar.set_description(f"N={n}: partitioning")
            if args.layout == "runs":
                partition, levels = build_runs_layout(n, args.subgraph_size)
            else:
                partition, levels = build_layout(n, args.subgraph_size, seed=cfg.seed, max_size=args.max_size or None)
            part_file = os.path.join(tmp, f"partition_{n}.pt")
            torch.save({"index": partition.index, "lengths": partition.lengths,
                        "levels": [(lv.index, lv.lengths) for lv in levels]}, part_file)
            for name in names:
                bar.set_description(f"N={n}: {name}")
                if name in stopped:
                    row = {"method": name, "n": n, "status": f"skipped: {stopped[name]}"}
                elif cfg.device == "cuda":
                    row = run_point(name, n, cfg, partition.to("cuda"), args.budget, [lv.to("cuda") for lv in levels])
                else:
                    row = run_point_in_child(name, n, cfg, part_file, args)
                row.update(num_parts=partition.num_parts, max_size=partition.max_size, inter_levels=len(levels),
                           layout=args.layout)
                if row["status"] == "ok" and max(row.get("fwd_ms", 0), row.get("fwdbwd_ms", 0)) > 1e3 * args.max_call_s:
                    stopped[name] = f"a call took over {args.max_call_s} s at N={n}"
                elif row["status"] != "ok" and not row["status"].startswith("skipped"):
                    stopped[name] = f"{row['status'].split(':')[0]} at N={n}"
                rows.append(row)
                on_point(rows)
                bar.update()
    return rows


def add_bandwidth_fractions(rows: list[dict], cfg: Config, bandwidth: float) -> None:
    """SPEC 5b: floor time = fewest bytes / measured copy bandwidth; fraction = floor / measured."""
    elem = torch.tensor([], dtype=cfg.torch_dtype).element_size()
    for row in rows:
        if not row["method"].startswith("intra["):
            continue
        for key, backward in (("fwd", False), ("fwdbwd", True)):
            if f"{key}_ms" in row:
                floor = measure.attention_floor_bytes(cfg.batch, row["n"], cfg.heads, cfg.head_dim, elem, backward)
                row[f"{key}_floor_ms"] = 1e3 * floor / bandwidth
                row[f"{key}_floor_fraction"] = row[f"{key}_floor_ms"] / row[f"{key}_ms"]


def fit_slopes(rows: list[dict], upper_half: bool = True) -> dict:
    """Least-squares slope of log(value) on log(N) per method and measure, over the upper half
    of the sizes where it ran (small sizes measure fixed overheads, not growth), or over all of
    them (``upper_half=False``: the large sweep, whose sizes are all past the overheads)."""
    slopes: dict = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        for key in ("fwd_ms", "fwdbwd_ms", "fwd_cpu_ms", "fwdbwd_cpu_ms", "fwd_peak_bytes", "fwdbwd_peak_bytes"):
            pts = [(r["n"], r[key]) for r in rows if r["method"] == name and r.get(key, 0) > 0]
            if upper_half and len(pts) >= 4:
                pts = pts[len(pts) // 2:]
            if len(pts) >= 2:
                x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
                slopes.setdefault(name, {})[key] = float(np.polyfit(x, y, 1)[0])
    return slopes


# ----------------------------------------------------------------------------- outputs
def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        info["commit_dirty"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    if os.environ.get("SBA_TREE"):
        # A copy of the working tree whose .git is not its own (a lent GPU machine's, synced
        # once per session) says through SBA_TREE which tree it really is.
        info["tree"] = os.environ["SBA_TREE"]
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            name = pynvml.nvmlDeviceGetName(handle)
            info["device"] = name.decode() if isinstance(name, bytes) else name
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
            info["memory_total_bytes"] = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        except Exception as err:   # nvidia-ml-py missing or NVML unreadable: torch's name stands
            info["nvml"] = f"unavailable ({type(err).__name__})"
    else:
        info["device"] = platform.processor() or platform.machine()
    return info


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file and rename, so a killed run never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def plot(rows: list[dict], slopes: dict, key_fwd: str, key_bwd: str, ylabel: str, title: str, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {path.name} not drawn (the numbers are in scaling.csv)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=False)
    for ax, key, label in ((axes[0], key_fwd, "forward"), (axes[1], key_bwd, "forward + backward")):
        for name in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["n"], r[key]) for r in rows if r["method"] == name and key in r]
            if not pts:
                continue
            slope = slopes.get(name, {}).get(key)
            legend = f"{name} (slope {slope:.2f})" if slope is not None else name
            scale = 2**20 if "bytes" in key else 1
            ax.loglog([p[0] for p in pts], [p[1] / scale for p in pts], marker="o", label=legend)
        ax.set_xlabel("N (nodes)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {label}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:                 # a forward-only sweep has nothing in the backward panel
            ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def write_outputs(out: Path, rows, slopes, cfg: Config, env: dict, bandwidth, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"environment": env, "config": asdict(cfg), "copy_bandwidth_bytes_per_s": bandwidth,
           "slopes": slopes, "points": rows}
    write_atomic(out / "scaling.json", lambda p: p.write_text(json.dumps(doc, indent=1)))
    fields = list(dict.fromkeys(k for r in rows for k in r))

    def write_csv(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    write_atomic(out / "scaling.csv", write_csv)
    if not plots:
        return
    plot(rows, slopes, "fwd_ms", "fwdbwd_ms", "median time (ms)", "Time", out / "time.png")
    plot(rows, slopes, "fwd_peak_bytes", "fwdbwd_peak_bytes", "peak memory above inputs (MiB)", "Memory",
         out / "memory.png")


def summary(rows, slopes, span: str) -> str:
    lines = [f"{'method':<24}{'N':>10}{'fwd ms':>11}{'f+b ms':>11}{'fwd MiB':>10}{'f+b MiB':>10}  status"]
    for r in rows:
        cells = [f"{r.get(k, float('nan')) / s:>{w}.{p}f}" for k, s, w, p in
                 (("fwd_ms", 1, 11, 2), ("fwdbwd_ms", 1, 11, 2), ("fwd_peak_bytes", 2**20, 10, 1),
                  ("fwdbwd_peak_bytes", 2**20, 10, 1))]
        status = r["status"] if r.get("fwdbwd_status", "ok") == "ok" else f"{r['status']}; backward {r['fwdbwd_status']}"
        lines.append(f"{r['method']:<24}{r['n']:>10}{''.join(cells)}  {status}")
    lines.append(f"slopes (log-log, {span}):")
    for name, s in slopes.items():
        lines.append(f"  {name:<24}" + "  ".join(f"{k}={v:.2f}" for k, v in s.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--n", type=int, nargs="+", help="node counts (default: a CPU or GPU sweep)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="default 4 on CPU, 8 on GPU")
    p.add_argument("--head-dim", type=int, default=None, help="default 32 on CPU, 64 on GPU")
    p.add_argument("--subgraph-size", type=int, default=64, help="target nodes per subgraph (P = ceil(N / this))")
    p.add_argument("--max-size", type=int, default=None,
                   help="no subgraph larger than this (default: --subgraph-size, so each fits one kernel tile; "
                        "0: METIS's own imbalance, about half the parts one or two over)")
    p.add_argument("--layout", choices=["metis", "runs"], default="metis",
                   help="metis: a k-NN graph cut by METIS (default); runs: consecutive runs of --subgraph-size "
                        "nodes, no graph (seconds at N = 1e7, where METIS takes many minutes; --max-size does "
                        "not apply: no run is longer than --subgraph-size)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default fp32 on CPU, bf16 on GPU")
    p.add_argument("--backward", action=argparse.BooleanOptionalAction, default=None,
                   help="also time forward+backward (default: yes, but not with --large)")
    p.add_argument("--methods", nargs="+", help="only these methods (names as in the output)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="GPU: time each call captured once in a CUDA graph and replayed (no host overhead); "
                        "a method that cannot be captured is an error row; default --out scaling-cuda-graph")
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/scaling-<device>)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed calls per measurement")
    p.add_argument("--max-call-s", type=float, default=None, help="stop a method after a call this slow")
    p.add_argument("--memory-cap-gb", type=float, default=12.0, help="CPU: address-space cap per point")
    p.add_argument("--point-timeout", type=float, default=None,
                   help="CPU: seconds before a point is killed (default 150, 900 with --large)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU: torch threads per point")
    p.add_argument("--large", action="store_true",
                   help="the large-N sweep of the SBA layer: defaults --n, --methods, --no-backward, --max-call-s, "
                        "--point-timeout and --out for it (each still overridable)")
    p.add_argument("--point", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.point:
        return args
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    gpu = device == "cuda"
    if args.cuda_graph and not gpu:
        p.error("--cuda-graph: CUDA graphs need --device cuda")
    args.device = device
    positive = {"--batch": args.batch, "--heads": args.heads, "--head-dim": args.head_dim,
                "--subgraph-size": args.subgraph_size, "--budget": args.budget, "--max-call-s": args.max_call_s,
                "--point-timeout": args.point_timeout, "--threads": args.threads}
    bad = [f"{flag} {value}" for flag, value in positive.items() if value is not None and not value > 0]
    if bad:                                # 0 read as "the default" before (`x or default`), or divided by
        p.error(f"must be > 0: {', '.join(bad)}")
    if args.methods:                       # a misspelt name was dropped without a word
        known = methods.registry(device)
        # A method of a registered backend that does not run here (the cuda extension unbuilt,
        # say) is left out with a note; any other name is a typo.
        elsewhere = [m for m in args.methods if m not in known and m.endswith("]")
                     and m[m.rfind("[") + 1:-1] in backends.names()]
        unknown = [m for m in args.methods if m not in known and m not in elsewhere]
        if unknown:
            p.error(f"--methods: {unknown} not among the methods on {device}: {sorted(known)}")
        if elsewhere:
            print(f"left out, their backends do not run here: {elsewhere}")
    if args.large:
        intra_methods = [b for b in methods.registry(device) if b.startswith("intra[")]
        args.n = args.n or LARGE_NS
        args.methods = args.methods or [m.format(b=b[len("intra["):-1]) for b in intra_methods for m in LARGE_METHODS]
        args.max_call_s = args.max_call_s or 60.0
        args.point_timeout = args.point_timeout or 900.0
        args.out = args.out or Path(__file__).parent / "results" / f"scaling-{device}-large"
    args.n = sorted(args.n or (GPU_NS if gpu else CPU_NS))
    args.backward = not args.large if args.backward is None else args.backward
    args.point_timeout = args.point_timeout or 150.0
    if min(args.n) < 2:
        p.error("--n: node counts must be >= 2")
    if args.max_size is None:
        args.max_size = args.subgraph_size
    elif args.max_size < 0:
        p.error("--max-size: must be >= 0 (0: no cap)")
    args.heads = args.heads or (8 if gpu else 4)
    args.head_dim = args.head_dim or (64 if gpu else 32)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.budget = args.budget or (0.2 if gpu else 0.3)
    args.max_call_s = args.max_call_s or (5.0 if gpu else 2.0)
    args.out = args.out or Path(__file__).parent / "results" / f"scaling-{device}{'-graph' if args.cuda_graph else ''}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.point:
        _child_main(args.point)
        return 0
    cfg = Config(batch=args.batch, heads=args.heads, head_dim=args.head_dim, subgraph_size=args.subgraph_size,
                 dtype=args.dtype, device=args.device, backward=args.backward, cuda_graph=args.cuda_graph)
    env = environment(cfg.device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env.get('commit')}")
    bandwidth = measure.copy_bandwidth("cuda") if cfg.device == "cuda" else None
    rows = sweep(args, cfg, on_point=lambda rows: write_outputs(args.out, rows, {}, cfg, env, bandwidth, plots=False))
    if bandwidth:
        add_bandwidth_fractions(rows, cfg, bandwidth)
    slopes = fit_slopes(rows, upper_half=not args.large)
    write_outputs(args.out, rows, slopes, cfg, env, bandwidth)
    print(summary(rows, slopes, "all sizes" if args.large else "upper half of sizes"))
    print(f"wrote {args.out}/scaling.csv, scaling.json, time.png, memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
