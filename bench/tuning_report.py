"""Compiler facts for every autotuning candidate, the configuration they favour, and the table
of those picks the launches run by default, on a machine without a GPU.

    python bench/tuning_report.py --dtype bf16 fp16 --head-dim 16 24 32 64 128 --write-picks \
        --veto-python /path/to/venv-with-triton-3.6/bin/python

For each dtype and head dim given, each attention launch the model makes, at every tile bucket
(16, 32, 64 and 128 rows: the one-tile kernels where a subgraph fits their tile, else the tiled
ones, which take every subgraph from 128 rows up the same way), forward and backward, bias none /
shared / per head, the bias loop, with and without the bias gradient, is planned by the backend
itself (`triton_backend.forward_plan`, `backward_plan`), and the blocks it ran before any pick
and every candidate of `triton_tuning.candidates` are recorded and compiled for sm_90 and sm_80
(`triton_aot.compile_launch`). Registers, spills, programs per SM and ptxas's performance-loss
lines are compiler facts, not timings. One report per (dtype, head dim):
``bench/results/static/tuning/<dtype>-d<head dim>.md``; with ``--write-picks`` its picks replace
that (dtype, head dim)'s rows of `sba_kernels/triton_picks.py`.

The rule a machine without a GPU can apply (`triton_tuning`'s default): among candidates that
compile on both architectures with no spill, no shared memory over the limit and no
performance-loss line, the widest query tile (each query tile of a subgraph reads all its keys
and values again: the bytes), then the most warps resident per SM on sm_90 (programs per SM x
warps, the least over the launches of a backward: latency hiding), then the most programs per
SM, then the blocks before the picks (what `one_tile_blocks` / `blocks_for` give), then the
first listed. With ``--veto-python``, the favoured candidate is compiled again by that Python's
Triton (the lent GPU's version, which allocates registers differently), and one it cannot
compile that way is ruled out too: the next favoured is taken. A GPU timing overrides the rule
where one was made (`triton_backend.timed_choice`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import pickle
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from sba_kernels import triton_aot, triton_backend as tb, triton_picks, triton_tuning

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "static" / "tuning"
PICKS_FILE = ROOT / "sba_kernels" / "triton_picks.py"
ARCHS = (90, 80)
# name -> (dtype, TF32 dots for fp32: torch.backends.cuda.matmul.allow_tf32)
DTYPES = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False),
          "tf32": (torch.float32, True), "fp32": (torch.float32, False)}
ROWS = (16, 32, 64, 128)
H, B = 8, 1


def _tensors(m: int, bias_kind, dtype: torch.dtype, head_dim: int):
    """q and a [1, m] one-subgraph index, lengths, lse and a bias of ``bias_kind`` (CPU; nothing runs)."""
    q = torch.zeros(B, m, H, head_dim, dtype=dtype)
    index, lengths = torch.arange(m, dtype=torch.int32).view(1, m), torch.tensor([m], dtype=torch.int32)
    bias = None if bias_kind is None else torch.zeros(((H,) if bias_kind == "per_head" else ()) + (1, m, m), dtype=dtype)
    return q, index, lengths, torch.zeros(B, H, m), bias


@contextlib.contextmanager
def no_picks():
    """Plan as if `triton_picks` were empty: the blocks `one_tile_blocks` / `blocks_for` give
    (and the timed choices), which is what the rule's candidates are compared with."""
    saved, triton_picks.PICKS = triton_picks.PICKS, {}
    try:
        yield
    finally:
        triton_picks.PICKS = saved


def cases(dtype: torch.dtype, head_dim: int) -> list[tuple[str, triton_tuning.Plan]]:
    """(label, plan) for every launch the report covers (planned with `no_picks`)."""
    rows = []
    for m in ROWS:
        one_tile = tb.one_tile_blocks(m, head_dim, dtype) is not None
        for bias_kind in (None, "shared", "per_head"):
            q, index, lengths, lse, bias = _tensors(m, bias_kind, dtype, head_dim)
            loops = (False, True) if (bias is not None and one_tile) else (False,)
            for loop in loops:         # the one-tile forward's two forms, the loop forced on one subgraph
                with tb.bias_tuning(min_parts=1, min_pairs=1) if loop else contextlib.nullcontext(), no_picks():
                    plan = tb.forward_plan(q, q, q, index, lengths, bias, 0.125, False)
                rows.append((f"M={m} {plan.kind}, bias {bias_kind}", plan))
            for grad in ((False, True) if bias is not None else (False,)):
                with no_picks():
                    plan = tb.backward_plan(q, q, q, q, q, lse, index, lengths, bias, 0.125, grad)
                rows.append((f"M={m} {plan.kind}, bias {bias_kind}{', bias gradient' if grad else ''}", plan))
    return rows


def launches_of(plan: triton_tuning.Plan, choice) -> list[triton_aot.Launch]:
    with triton_aot.recording() as recorded:
        plan.run(choice)
    return [triton_aot.Launch.recorded(kernel, args, meta) for kernel, _grid, args, meta in recorded]


def _compile(job):
    launch, arch = job
    with triton_aot.cold_cache():
        return triton_aot.compile_launch(launch, arch)


def compile_all(jobs: list, workers: int, cache: Optional[Path] = None) -> dict:
    """(launch, arch) -> CompileReport, over ``workers`` processes. With ``cache``, a folder,
    reports found there (same launch, architecture, Triton and kernel source) are read rather
    than compiled again, and new ones are added to it."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # the default, said out loud (triton 3.9 warns)
    found = {}
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for job in jobs:
            path = cache / f"{_cache_name(*job)}.json"
            if path.exists():
                found[job] = triton_aot.CompileReport(**json.loads(path.read_text()))
    todo = [job for job in jobs if job not in found]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for job, compiled in zip(todo, pool.map(_compile, todo, chunksize=4)):
            found[job] = compiled
            if cache is not None:
                (cache / f"{_cache_name(*job)}.json").write_text(json.dumps(dataclasses.asdict(compiled)))
    return {job: found[job] for job in jobs}


def compile_with(python: str, jobs: list, workers: int, cache: Optional[Path] = None) -> tuple[str, dict]:
    """`compile_all` run by another Python (its own Triton; this project from this checkout):
    that Triton's version and (launch, arch) -> CompileReport."""
    with tempfile.TemporaryDirectory() as tmp:
        given, got = Path(tmp) / "jobs.pkl", Path(tmp) / "reports.pkl"
        given.write_bytes(pickle.dumps(jobs))
        cmd = [python, __file__, "--compile-jobs", str(given), str(got), "--workers", str(workers)]
        subprocess.run(cmd + (["--cache", str(cache)] if cache is not None else []), check=True,
                       env=triton_aot.compiler_env())
        version, reports = pickle.loads(got.read_bytes())
    return version, dict(zip(jobs, reports))


def _compile_jobs(given: Path, got: Path, workers: int, cache: Optional[Path]) -> None:
    """The other end of `compile_with`: compile the pickled jobs here, pickle the reports."""
    import triton

    jobs = pickle.loads(given.read_bytes())
    reports = compile_all(jobs, workers, cache)
    got.write_bytes(pickle.dumps((triton.__version__, [reports[job] for job in jobs])))


def veto(entries: list, python: str, workers: int, cache: Optional[Path]) -> tuple[str, int]:
    """Compile each entry's favoured candidate with ``python``'s Triton (`compile_with`); one
    unusable there gets its reason in ``why`` and the rule favours again, until every favoured
    candidate compiled there too or none is left. ``entries``: ``(rows, before, launches per
    row)`` as `report` builds them; rows are changed in place. Returns that Triton's version and
    how many candidates it ruled out."""
    checked, version, ruled_out = set(), "", 0
    while True:
        pending = {}
        for i, (rows, before, launches) in enumerate(entries):
            best = favoured(rows, before)
            if best is not None and (i, best) not in checked:
                pending[i, best] = launches[best]
        if not pending:
            return version, ruled_out
        jobs = list(dict.fromkeys((launch, arch) for ls in pending.values() for launch in ls for arch in ARCHS))
        print(f"  {len(pending)} favoured candidates: {len(jobs)} compiles with {python}", flush=True)
        version, reports = compile_with(python, jobs, workers, cache)
        for (i, best), ls in pending.items():
            checked.add((i, best))
            why = facts([reports[launch, arch] for launch in ls for arch in ARCHS])["why"]
            if why:
                entries[i][0][best][1]["why"] = f"triton {version}: {why}"
                ruled_out += 1


def _cache_name(launch: triton_aot.Launch, arch: int) -> str:
    described = repr((launch, arch, *_compiler_and_sources()))
    return hashlib.sha256(described.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=None)      # read once a run, not once per launch (thousands)
def _compiler_and_sources() -> tuple:
    """What a compile report depends on besides its launch and architecture: the Triton
    version and the kernels' and the compile's own source."""
    import triton

    sources = [(ROOT / "sba_kernels" / name).read_bytes() for name in ("triton_kernels.py", "triton_aot.py")]
    return triton.__version__, [hashlib.sha256(s).hexdigest() for s in sources]


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


def favoured(rows: list[tuple[object, dict]], before: Optional[int] = None):
    """The index of the row the rule of the module docstring picks among ``(choice, facts)``
    rows of candidates, or None when none is usable; ``before``: the row of the blocks before
    the picks, which a tie keeps."""
    usable = [(i, f) for i, (_, f) in enumerate(rows) if not f["why"]]
    if not usable:
        return None
    return max(usable, key=lambda t: (t[1]["rows"], t[1]["warps"], t[1]["programs"], t[0] == before, -t[0]))[0]


def describe(choice: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in choice.items())


@contextlib.contextmanager
def dot_precision(tf32: bool):
    """fp32 dots as TF32 (True) or 3xTF32 inside the block: the backend reads it at each launch."""
    saved, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def report(name: str, head_dim: int, workers: int, commit: str, cache: Optional[Path],
           veto_python: Optional[str] = None) -> tuple[list[str], dict]:
    """One (dtype, head dim): the report's lines and its picks (`triton_tuning.pick_key` ->
    configuration); with ``veto_python``, picks that Python's Triton compiles too (`veto`)."""
    import triton

    dtype, tf32 = DTYPES[name]
    table = []               # (label, plan, its pick key, launches before any pick, [(candidate, launches)])
    with dot_precision(tf32):          # the launches and the key both read the fp32 dot precision
        for label, plan in cases(dtype, head_dim):
            table.append((label, plan, plan.pick_key(), launches_of(plan, None),
                          [(choice, launches_of(plan, choice)) for choice in plan.candidates()]))
    jobs = list(dict.fromkeys((launch, arch) for *_, base, configs in table
                              for ls in [base, *(ls for _, ls in configs)] for launch in ls for arch in ARCHS))
    print(f"{name}, d = {head_dim}: {len(jobs)} compiles", flush=True)
    reports = compile_all(jobs, workers, cache)

    entries = []             # per launch: (candidate rows, the row before the picks, each row's launches)
    for label, plan, key, base, configs in table:
        rows = [(choice, facts([reports[launch, arch] for launch in ls for arch in ARCHS])) for choice, ls in configs]
        entries.append((rows, next((i for i, (_, ls) in enumerate(configs) if ls == base), None),
                        [ls for _, ls in configs]))
    vetoed, command = "", f"python bench/tuning_report.py --dtype {name} --head-dim {head_dim}"
    if veto_python:
        version, ruled_out = veto(entries, veto_python, workers, cache)
        command += f" --veto-python <a Python with triton {version or 'another version'}>"
        vetoed = (f" Each favoured candidate compiled again with triton {version} (`--veto-python`): "
                  f"{ruled_out} ruled out there." if version else " No candidate was usable: nothing to veto.")

    summary = ["| launch | before the picks | favoured by the compiles | runs by default |", "| --- | --- | --- | --- |"]
    details, picks = [], {}
    for (label, plan, key, base, configs), (rows, before, _) in zip(table, entries):
        best = favoured(rows, before)
        was = "not a candidate" if before is None else describe(configs[before][0])
        timed = tb.timed_choice(plan.kind, plan.max_len, plan.q, plan.flags.get("bias_grad", False))
        if best is not None:
            picks[key] = rows[best][0]
        runs = (f"{describe(timed)} (timed)" if timed is not None else
                "the blocks before the picks" if best is None else "the favoured")
        summary.append(f"| {label} | {was} | {'none usable' if best is None else describe(rows[best][0])} | {runs} |")
        details += ["", f"### {label}", "",
                    "| candidate | query rows | sm_90 registers | sm_90 programs / SM | sm_90 warps / SM | "
                    "sm_80 registers | ruled out |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for i, (choice, f) in enumerate(rows):
            mark = " **(favoured)**" if i == best else ""
            details.append(f"| {describe(choice)}{mark} | {f['rows']} | {f['regs']} | {f['programs']} | {f['warps']} | "
                           f"{f['regs80']} | {f['why']} |")
    lines = [f"# Autotuning candidates compiled (compiler facts, not timings): {name}, d = {head_dim}, H = {H}",
             "", f"`{command}` at {commit}, triton "
             f"{triton.__version__}, torch {torch.__version__}; {len(jobs)} compiles for sm_90 and sm_80.{vetoed}", "",
             __doc__.split("\n\n")[3].replace("\n", " "), "",
             "`before the picks`: the candidate that launches exactly the kernels of `one_tile_blocks` / "
             "`blocks_for` (and the timed choices). `runs by default`: with `sba_kernels/triton_picks.py` "
             "written from this report, what `triton_backend.default_choice` launches.", "", *summary, *details]
    return lines, picks


def _group(key: tuple) -> tuple:
    """(dtype, precision, head dim) of a `triton_tuning.pick_key`."""
    kind, rows, head_dim, dtype, precision, *_ = key
    return dtype, precision, head_dim


def write_picks(picks: dict, source: str) -> None:
    """Put ``picks`` (one dtype, precision and head dim) in `triton_picks` in place of that
    group's rows, in this process and in its file."""
    groups = {_group(k) for k in picks}
    triton_picks.PICKS = {**{k: v for k, v in triton_picks.PICKS.items() if _group(k) not in groups}, **picks}
    triton_picks.SOURCES = {**triton_picks.SOURCES, **dict.fromkeys(groups, source)}
    text = PICKS_FILE.read_text()
    head = text[:text.index("# (dtype, fp32 dot precision, head dim)")]
    body = ["# (dtype, fp32 dot precision, head dim) -> the report its picks come from", "SOURCES = {"]
    body += [f"    {k!r}: {v!r}," for k, v in sorted(triton_picks.SOURCES.items(), key=repr)]
    body += ["}", "", "# pick_key -> configuration (fields of triton_backend.Blocks)", "PICKS = {"]
    body += [f"    {k!r}: {v!r}," for k, v in sorted(triton_picks.PICKS.items(), key=repr)]
    PICKS_FILE.write_text(head + "\n".join(body) + "\n}\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    p.add_argument("--head-dim", nargs="+", type=int, default=[64], choices=sorted({d for _, d in tb.ONE_TILE_CAP}))
    p.add_argument("--out", type=Path, default=OUT, help="folder of the reports")
    p.add_argument("--write-picks", action="store_true", help=f"update {PICKS_FILE.relative_to(ROOT)}")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", type=Path, help="a folder to keep compile reports in, for the next run")
    p.add_argument("--veto-python", help="another Python whose Triton must compile each pick too (no spill, no "
                                         "shared memory over the limit, no performance-loss line)")
    p.add_argument("--compile-jobs", nargs=2, type=Path, help=argparse.SUPPRESS)     # `compile_with`'s other end
    args = p.parse_args(argv)
    if args.compile_jobs:
        _compile_jobs(*args.compile_jobs, args.workers, args.cache)
        return 0

    commit = _git("rev-parse", "--short", "HEAD") or "an unknown commit"
    if _git("status", "--porcelain", "--", "sba_kernels", ":!sba_kernels/triton_picks.py"):
        commit += " with uncommitted changes"
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    for name in args.dtype:
        for head_dim in args.head_dim:
            lines, picks = report(name, head_dim, args.workers, commit, args.cache, args.veto_python)
            path = args.out / f"{name}-d{head_dim}.md"
            path.write_text("\n".join(lines) + "\n")
            print(f"wrote {path}", flush=True)
            if args.write_picks:
                shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                write_picks(picks, f"{shown} (triton {triton.__version__}, {commit})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
