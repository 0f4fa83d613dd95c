"""Compiler facts for every autotuning candidate, and the configuration they favour, on a
machine without a GPU.

    python bench/tuning_report.py --out bench/results/static/tuning.md
    python bench/tuning_report.py --dtype fp16 --head-dim 32 --out bench/results/static/tuning-fp16-d32.md

For bf16 at head dim 64 (the sweep's shape; others by option), each attention launch the model
makes (the one-tile kernels at their widest tile, forward and backward, bias none / shared / per
head, the bias loop, the bias gradient; the tiled kernels at 128 rows, as the inter attention
runs them) is planned by the backend itself
(`triton_backend.forward_plan`, `backward_plan`), and its default configuration and every
candidate of `triton_tuning.candidates` are recorded and compiled for sm_90 and sm_80
(`triton_aot.compile_launch`). Registers, spills, programs per SM and ptxas's
performance-loss lines are compiler facts, not timings.

The rule a machine without a GPU can apply (`triton_tuning`'s default), checked here: among
configurations that compile on both architectures with no spill, no shared memory over the
limit and no performance-loss line, the widest query tile (each query tile of a subgraph reads all its keys and values again: the
bytes), then the most warps resident per SM on sm_90 (programs per SM x warps, the least over
the launches of a backward: latency hiding), then the most programs per SM, then the first
listed (the default first). A GPU timing overrides it where one was made
(`triton_backend.BIAS_LOOP_FORWARD_OPTIONS`, `BIAS_GRAD_OPTIONS_64_ROWS`).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from sba_kernels import triton_aot, triton_backend as tb, triton_tuning

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (90, 80)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
H, B = 8, 1


def _tensors(m: int, bias_kind, dtype: torch.dtype, head_dim: int):
    """q and a [1, m] one-subgraph index, lengths, lse and a bias of ``bias_kind`` (CPU; nothing runs)."""
    q = torch.zeros(B, m, H, head_dim, dtype=dtype)
    index, lengths = torch.arange(m, dtype=torch.int32).view(1, m), torch.tensor([m], dtype=torch.int32)
    bias = None if bias_kind is None else torch.zeros(((H,) if bias_kind == "per_head" else ()) + (1, m, m), dtype=dtype)
    return q, index, lengths, torch.zeros(B, H, m), bias


def cases(dtype: torch.dtype, head_dim: int) -> list[tuple[str, triton_tuning.Plan]]:
    """(label, plan) for every launch the report covers."""
    widest_one_tile = tb.ONE_TILE_CAP.get(("16bit", head_dim), 0)
    rows = []
    for m in sorted({widest_one_tile, 128} - {0}):
        one_tile = tb.one_tile_blocks(m, head_dim, dtype) is not None
        for bias_kind in (None, "shared", "per_head"):
            q, index, lengths, lse, bias = _tensors(m, bias_kind, dtype, head_dim)
            loops = (False, True) if (bias is not None and one_tile) else (False,)
            for loop in loops:         # the one-tile forward's two forms, the loop forced on one subgraph
                with tb.bias_tuning(min_parts=1, min_pairs=1) if loop else contextlib.nullcontext():
                    plan = tb.forward_plan(q, q, q, index, lengths, bias, 0.125, False)
                rows.append((f"M={m} forward, bias {bias_kind}{', bias loop' if loop else ''}", plan))
            for grad in ((False, True) if bias is not None else (False,)):
                if not one_tile and bias is not None and not grad:
                    continue           # the tiled backward with a frozen bias: its dQ/dKdV as with a trained one
                plan = tb.backward_plan(q, q, q, q, q, lse, index, lengths, bias, 0.125, grad)
                rows.append((f"M={m} backward, bias {bias_kind}{', bias gradient' if grad else ''}", plan))
    return rows


def launches_of(plan: triton_tuning.Plan, choice) -> list[triton_aot.Launch]:
    with triton_aot.recording() as recorded:
        plan.run(choice)
    return [triton_aot.Launch.recorded(kernel, args, meta) for kernel, _grid, args, meta in recorded]


def _compile(job):
    launch, arch = job
    with triton_aot.cold_cache():
        return triton_aot.compile_launch(launch, arch)


def compile_all(jobs: list, workers: int) -> dict:
    """(launch, arch) -> CompileReport, over ``workers`` processes."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # the default, said out loud (triton 3.9 warns)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(jobs, pool.map(_compile, jobs, chunksize=4)))


def facts(reports: list) -> dict:
    """A configuration's launches summed up: usable or why not, and its sm_90 occupancy."""
    why = ""
    for r in reports:         # the first reason found: what the tuning's compile check says, or a ptxas line
        problem = r.unusable or (r.ok and r.ptxas_warnings and "ptxas: performance loss")
        why = why or (f"sm_{r.arch} {problem} ({r.kernel})" if problem else "")
    on90 = [r for r in reports if r.arch == 90 and r.ok]
    return dict(
        why=why,
        rows=max(r.meta.get("BLOCK_M", r.meta.get("BLOCK", 0)) for r in reports),
        regs=max((r.registers for r in on90), default=0),
        programs=min((r.programs_per_sm for r in on90), default=0),
        warps=min((r.programs_per_sm * r.threads // 32 for r in on90), default=0),
        regs80=max((r.registers for r in reports if r.arch == 80 and r.ok), default=0),
    )


def favoured(rows: list[tuple[object, dict]]):
    """The rule of the module docstring over ``(choice, facts)`` rows (the default first)."""
    usable = [(i, f) for i, (_, f) in enumerate(rows) if not f["why"]]
    if not usable:
        return None
    return max(usable, key=lambda t: (t[1]["rows"], t[1]["warps"], t[1]["programs"], -t[0]))[0]


def describe(choice) -> str:
    return "default" if choice is None else ", ".join(f"{k}={v}" for k, v in choice.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "static" / "tuning.md")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--head-dim", type=int, default=64, choices=sorted(d for kind, d in tb.ONE_TILE_CAP if kind == "16bit"))
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    table = []               # (label, [(choice, [launches])])
    for label, plan in cases(DTYPES[args.dtype], args.head_dim):
        table.append((label, [(choice, launches_of(plan, choice)) for choice in [None, *plan.candidates()]]))
    jobs = list(dict.fromkeys((launch, arch) for _, configs in table for _, ls in configs for launch in ls
                              for arch in ARCHS))
    print(f"{len(jobs)} compiles", flush=True)
    reports = compile_all(jobs, args.workers)

    import triton

    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if git("status", "--porcelain", "--", "sba_kernels") else "")
    summary = ["| launch | default | favoured by the compiles | same |", "| --- | --- | --- | --- |"]
    details = []
    for label, configs in table:
        rows = [(choice, facts([reports[launch, arch] for launch in ls for arch in ARCHS])) for choice, ls in configs]
        best = favoured(rows)
        default_launches = configs[0][1]
        same = best is not None and configs[best][1] == default_launches
        summary.append(f"| {label} | {describe(None) if not rows[0][1]['why'] else 'default: ' + rows[0][1]['why']} | "
                       f"{'none usable' if best is None else describe(rows[best][0])} | {'yes' if same else 'no'} |")
        details += ["", f"### {label}", "",
                    "| configuration | query rows | sm_90 registers | sm_90 programs / SM | sm_90 warps / SM | "
                    "sm_80 registers | ruled out |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for i, (choice, f) in enumerate(rows):
            mark = " **(favoured)**" if i == best else ""
            details.append(f"| {describe(choice)}{mark} | {f['rows']} | {f['regs']} | {f['programs']} | {f['warps']} | "
                           f"{f['regs80']} | {f['why']} |")
    lines = [f"# Autotuning candidates compiled (compiler facts, not timings): {args.dtype}, d = {args.head_dim}, H = {H}",
             "", f"`python bench/tuning_report.py` at {commit or 'an unknown commit'}, triton {triton.__version__}, "
             f"torch {torch.__version__}; {len(jobs)} compiles for sm_90 and sm_80.", "",
             __doc__.split("\n\n")[3].replace("\n", " "), "",
             "`same`: the favoured configuration launches exactly the default's kernels. The default's "
             "`maxnreg` is 255, but where `BIAS_LOOP_FORWARD_OPTIONS` caps it at 168.", "", *summary, *details]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
