"""Time the pooled intra attention's backward two ways, against each other on the same inputs, on
a GPU: z's gradient taken inside the one-tile backward kernel, or summed into dO's rows first.

    python bench/pooled_options.py --n 100000 1000000 --out bench/results/pooled_options.md

`SBAttention` calls `intra_attention_pooled`, whose outputs o ``[B, N, H, d]`` and z (the
subgraph means of o, ``[B, P, H, d]``) both get a gradient. o's whole gradient is then
``dO[i] + dz[part(i)] / n_part(i)``. Where the one-tile backward runs without a bias gradient
(`triton_backend.takes_pooled_gradient`), the kernel reads dz and adds its terms to dv and dp
itself (``POOLED``); elsewhere a segment-mean backward writes dz's share of every row and a
torch addition adds it to dO before the kernel reads them (`custom_ops._attention_backward`).
The fused form was chosen from the byte account (`bench/results/static/bytes.md`: one pass over
``[B, N, H, d]`` fewer) and the compile report (its registers), not from a timing: this is
the timing.

Workload as `scaling.py`: bf16, B = 1, H = 8, d = 64, METIS subgraphs of at most 64 on a k-NN
graph; without a bias, and with a frozen one (``[P, M, M]`` shared by heads, or ``[H, P, M, M]``)
that takes no gradient. Each call is forward+backward with a gradient into o and z. Times are
medians of `triton.testing.do_bench` (L2 flushed between calls).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import GPU_LAUNCH_BENCH, Config, build_layout, make_bias, make_inputs  # noqa: E402

import sba_kernels as sk  # noqa: E402
from sba_kernels import Partition, custom_ops  # noqa: E402

CHOICES = ("in the kernel", "separate pass")


@contextlib.contextmanager
def separate_pass() -> Iterator[None]:
    """Inside the block, the pooled backward sums z's gradient into dO's rows before the
    attention backward, as it does where the kernel cannot take it."""
    fused = custom_ops._fuses_pooled_gradient
    custom_ops._fuses_pooled_gradient = lambda *args: False
    try:
        yield
    finally:
        custom_ops._fuses_pooled_gradient = fused


def pooled_step(q, k, v, partition: Partition, bias: Optional[torch.Tensor], backend: str = "triton") -> Callable:
    """A zero-argument forward+backward of `intra_attention_pooled`, with a fixed random
    gradient into o and into z; it clears the gradients of q, k and v first and leaves theirs
    (``step.inputs`` holds q, k, v)."""
    B, _, H, d = q.shape
    g = torch.Generator(device=q.device).manual_seed(1)
    grad_o = torch.randn(q.shape, generator=g, device=q.device, dtype=q.dtype)
    grad_z = torch.randn((B, partition.num_parts, H, d), generator=g, device=q.device, dtype=q.dtype)

    def step():
        for t in (q, k, v):
            t.grad = None
        o, z = sk.intra_attention_pooled(q, k, v, partition, bias=bias, backend=backend)
        torch.autograd.backward((o, z), (grad_o, grad_z))

    step.inputs = (q, k, v)
    return step


def time_choices(n: int, bias_kinds: list[str], cfg: Config, bench: Callable[[Callable], float]) -> Iterator[list[str]]:
    """For each bias kind, markdown rows ``| N | bias | choice | ms | x fastest |`` at ``n``
    nodes (the graph and its partition built once: at N = 1e6 they take longer than the timing)."""
    partition = build_layout(n, cfg.subgraph_size, seed=cfg.seed, max_size=cfg.subgraph_size)[0].to(cfg.device)
    q, k, v = make_inputs(n, cfg, requires_grad=True)
    for bias_kind in bias_kinds:
        bias = make_bias(partition, cfg, bias_kind, requires_grad=False)          # frozen: no gradient
        step = pooled_step(q, k, v, partition, bias)
        times = {CHOICES[0]: bench(step)}
        with separate_pass():
            times[CHOICES[1]] = bench(step)
        best = min(times.values())
        yield [f"| {n:,} | {bias_kind} | {name} | {ms:.3f} | {ms / best:.2f} |" for name, ms in times.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--bias", nargs="+", choices=["none", "shared", "per_head"], default=["none", "shared", "per_head"])
    p.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    from triton.testing import do_bench

    cfg = GPU_LAUNCH_BENCH
    lines = [f"# The pooled backward: z's gradient in the kernel or in a pass before it: {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}", "",
             "bf16, B = 1, H = 8, d = 64, METIS subgraphs of at most 64, forward+backward of "
             "`intra_attention_pooled` with a gradient into o and z; median ms (`do_bench`).", "",
             "| N | bias | choice | ms | x fastest |", "| ---: | --- | --- | ---: | ---: |"]
    for n in args.n:
        for rows in time_choices(n, args.bias, cfg, lambda fn: do_bench(fn, return_mode="median")):
            lines += rows
            print("\n".join(rows), flush=True)
            if args.out:                                  # rewritten after every point: a killed run keeps them
                args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
