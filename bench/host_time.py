"""Host time of one intra-attention call through the triton backend, kernels not launched.

    python bench/host_time.py --out bench/results/host_time_cpu.md

What Python, autograd and the dispatch cost before a kernel runs: when it exceeds the kernels'
own time (small N on a fast GPU; `bench/results/gpu-h200/run3/profile.md`), it is the time.
Measured on any machine: the launches are stubbed out (`triton_backend._launch`), so the CPU
runs exactly the host code a GPU call runs, through the eager path (`custom_ops._EagerAttention`)
and, for comparison, through the ``sba::`` custom ops that torch.compile traces.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")     # the backend's host code runs on the CPU
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sba_kernels as sk  # noqa: E402
from sba_kernels import custom_ops, triton_backend  # noqa: E402
from workload import build_layout  # noqa: E402


def median_us(fn, calls: int) -> float:
    """Median over 5 rounds of the mean microseconds per call."""
    for _ in range(5):
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append(1e6 * (time.perf_counter() - start) / calls)
    return statistics.median(rounds)


def measure(n: int, calls: int) -> dict[str, float]:
    part = build_layout(n, 64, max_size=64)[0]                     # one tile per subgraph
    q, k, v = (torch.randn(1, n, 8, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            sk.intra_attention(q, k, v, part, backend="triton")

    def forward_backward():
        for t in (q, k, v):
            t.grad = None
        sk.intra_attention(q, k, v, part, backend="triton").backward(grad)

    def launches_only():
        o, lse, _ = triton_backend.attention_forward(q, k, v, part.index, part.lengths, None, 0.125, False)
        triton_backend.attention_backward(grad, q, k, v, o, lse, part.index, part.lengths, None, 0.125, False)

    row = {"eager fwd": median_us(forward, calls), "eager fwd+bwd": median_us(forward_backward, calls)}
    eager = custom_ops._eager
    custom_ops._eager = lambda *tensors: False
    try:
        row["custom op fwd"] = median_us(forward, calls)
        row["custom op fwd+bwd"] = median_us(forward_backward, calls)
    finally:
        custom_ops._eager = eager
    row["launch functions fwd+bwd"] = median_us(launches_only, calls)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8600, help="nodes (subgraphs of at most 64; default %(default)s)")
    p.add_argument("--calls", type=int, default=100, help="calls per round (default %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = p.parse_args(argv)
    if args.n < 130 or args.calls < 1:           # 130: two subgraphs of 64 and a k-NN graph of k < N
        p.error(f"--n must be >= 130 and --calls >= 1, got {args.n} and {args.calls}")
    triton_backend._launch = lambda kernel, grid, *a, **meta: None
    row = measure(args.n, args.calls)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    lines = ["# Host time per intra_attention call, triton backend, launches stubbed (not a GPU timing)", "",
             f"`python bench/host_time.py --n {args.n} --calls {args.calls}`: fp16, B = 1, H = 8, d = 64, N = {args.n:,}; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"commit {commit}; median of 5 rounds.", "", "| path | microseconds per call |", "| --- | ---: |"]
    lines += [f"| {name} | {us:.0f} |" for name, us in row.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
