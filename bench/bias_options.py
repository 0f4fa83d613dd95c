"""Time the triton backend's one-tile launch choices with a graph bias, against each other on
the same inputs, on a GPU.

    python bench/bias_options.py --n 100000 1000000 --out bench/results/bias_options.md

The choices (`triton_backend.uses_bias_loop` and the options beside it) were first made from
compiles alone, whose register counts are compiler facts, not timings; this is what decided them:

* the forward: one program per (subgraph, batch, head), or one per bias tile looping over the
  pairs that read it (reads the bias once), and that loop's register cap;
* the backward that sums the bias gradient: its warps and register cap (8 warps, the choice
  from compiles when 4 took 247-255 registers; 4 warps, the choice the timing made; a cap of 168,
  which spilled then; 4 warps now take 163-164 registers, no spill, `triton_kernels._pair_grads`).
  The backward is timed as forward+backward, with the backend's forward.

Workload as `scaling.py`: bf16, B = 1, H = 8, d = 64, METIS subgraphs of at most 64 on a k-NN
graph, and a bias ``[P, M, M]`` (shared by heads) or ``[H, P, M, M]`` (per head) drawn from
N(0, 1), requiring grad as `SBAttention`'s graph bias does. Times are medians of
`triton.testing.do_bench` (L2 flushed between calls).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import GPU_LAUNCH_BENCH, Config, build_layout, intra_passes, make_bias, make_inputs  # noqa: E402

from sba_kernels import triton_backend  # noqa: E402

# name -> (whether the bias loop runs, BIAS_LOOP_FORWARD_OPTIONS)
FORWARD_CHOICES = {
    "one program per pair": (False, {}),
    "bias loop, maxnreg 255": (True, {"maxnreg": 255}),
    "bias loop, maxnreg 168": (True, {"maxnreg": 168}),
}
# name -> BIAS_GRAD_OPTIONS_64_ROWS
BACKWARD_CHOICES = {
    "8 warps, maxnreg 255": {"num_warps": 8},
    "8 warps, maxnreg 128": {"num_warps": 8, "maxnreg": 128},
    "4 warps, maxnreg 255": {"num_warps": 4},
    "4 warps, maxnreg 168": {"num_warps": 4, "maxnreg": 168},
}


def time_choices(n: int, bias_kind: str, cfg: Config) -> list[str]:
    """Markdown rows ``| N | bias | pass | choice | ms | x fastest |`` for one N and bias kind."""
    from triton.testing import do_bench

    partition = build_layout(n, cfg.subgraph_size, seed=cfg.seed, max_size=cfg.subgraph_size)[0].to("cuda")
    q, k, v = make_inputs(n, cfg, requires_grad=True)
    bias = make_bias(partition, cfg, bias_kind, requires_grad=True)
    passes = intra_passes(q, k, v, partition, bias, torch.randn_like(q))
    forward, forward_backward = passes["forward"], passes["forward+backward"]
    never = 2**62
    times: list[tuple[str, str, float]] = []
    for name, (loop, options) in FORWARD_CHOICES.items():
        with triton_backend.bias_tuning(min_parts=1 if loop else never, min_pairs=1 if loop else never,
                                        loop_forward_options=options):
            times.append(("forward", name, do_bench(forward, return_mode="median")))
    for name, options in BACKWARD_CHOICES.items():
        with triton_backend.bias_tuning(grad_options_64_rows=options):
            times.append(("forward+backward", name, do_bench(forward_backward, return_mode="median")))
    rows = []
    for what in ("forward", "forward+backward"):
        best = min(ms for w, _, ms in times if w == what)
        rows += [f"| {n:,} | {bias_kind} | {w} | {name} | {ms:.3f} | {ms / best:.2f} |"
                 for w, name, ms in times if w == what]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--bias", nargs="+", choices=["shared", "per_head"], default=["shared", "per_head"])
    p.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    cfg = GPU_LAUNCH_BENCH
    lines = [f"# One-tile launch choices with a graph bias: {torch.cuda.get_device_name()}, torch {torch.__version__}",
             "", "bf16, B = 1, H = 8, d = 64, METIS subgraphs of at most 64; median ms (`do_bench`).", "",
             "| N | bias | pass | choice | ms | x fastest |", "| ---: | --- | --- | --- | ---: | ---: |"]
    for n in args.n:
        for kind in args.bias:
            lines += time_choices(n, kind, cfg)
            print("\n".join(lines[-len(FORWARD_CHOICES) - len(BACKWARD_CHOICES):]), flush=True)
            if args.out:                                  # rewritten after every point: a killed run keeps them
                args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
