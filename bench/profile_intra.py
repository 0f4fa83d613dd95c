"""Where the time of one intra-attention forward+backward goes on a GPU: each kernel's device
time (torch.profiler) next to the host time the call takes to issue them.

    python bench/profile_intra.py --n 100000 1000000 --backend triton --out bench/results/profile.md

When the host time per call exceeds the device time, the op is bound by launches and Python,
not by memory: the ``fwd+bwd`` times `scaling.py` reports at small N then measure the host.
``--host-profile`` adds where that host time goes: the Python functions with the most own
time over the same steps (cProfile; it slows the host, so read shares, not absolute times).
Same workload as `scaling.py` (k-NN graph, METIS, subgraphs capped at --subgraph-size).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import Config, build_layout, make_inputs  # noqa: E402

import sba_kernels as sk  # noqa: E402


def host_profile(step, iters: int, top: int = 15) -> list[str]:
    """Markdown lines: the ``top`` functions by own time over ``iters`` calls of ``step``."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return ["", f"Host functions by own time over {iters} calls (cProfile):", "", "```",
            *text.getvalue().strip().splitlines()[-top - 1:], "```"]


def profile_point(n: int, cfg: Config, backend: str, iters: int, python_profile: bool = False) -> str:
    partition = build_layout(n, cfg.subgraph_size, seed=cfg.seed, max_size=cfg.subgraph_size)[0].to("cuda")
    q, k, v = make_inputs(n, cfg, requires_grad=True)
    grad = torch.randn_like(q)

    def step():
        for t in (q, k, v):
            t.grad = None
        sk.intra_attention(q, k, v, partition, backend=backend).backward(grad)

    for _ in range(3):                       # compile and warm up outside the measurement
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    host_ms = 1e3 * (time.perf_counter() - start) / iters       # issue time: no sync inside
    torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - start) / iters
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    rows.sort(key=lambda e: -e.self_device_time_total)
    device_ms = sum(e.self_device_time_total for e in rows) / 1e3 / iters
    lines = [f"### N = {n:,}, {partition.num_parts:,} subgraphs of at most {partition.max_size}",
             "", f"per call: host {host_ms:.3f} ms to issue, {wall_ms:.3f} ms to finish, "
             f"{device_ms:.3f} ms of kernels", "", "| kernel | calls per step | device ms per step |",
             "| --- | ---: | ---: |"]
    for e in rows[:12]:
        lines.append(f"| `{e.key[:70]}` | {e.count / iters:g} | {e.self_device_time_total / 1e3 / iters:.4f} |")
    if python_profile:
        lines += host_profile(step, iters)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--backend", default="triton")
    p.add_argument("--subgraph-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--host-profile", action="store_true", help="also profile the host code (cProfile)")
    p.add_argument("--out", type=Path, default=None, help="also write the tables here (markdown)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    cfg = Config(batch=1, heads=8, head_dim=64, subgraph_size=args.subgraph_size, dtype="bf16", device="cuda",
                 backward=True)
    head = (f"# intra_attention[{args.backend}] forward+backward, bf16, B = 1, H = 8, d = 64\n\n"
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n\n")
    text = head + "\n".join(profile_point(n, cfg, args.backend, args.iters, args.host_profile) for n in args.n)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
