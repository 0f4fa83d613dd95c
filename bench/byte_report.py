"""Bytes every Triton launch of SBA's intra attention reads and writes at full size, next to the floor.

    python bench/byte_report.py                    # N = 1e6, H = 8, d = 64, fp16, METIS max_size 64
    python bench/byte_report.py --n 4096 --lengths-from uniform:64 --bias none --out /tmp/bytes

Writes ``bytes.md`` and ``bytes.csv`` under ``--out`` (default ``bench/results/static/``). These are
counted bytes: what the kernels load and store by construction, counted element by element in
Triton's CPU interpreter (`byte_account`). They are not timings, and not DRAM traffic.

Why no full-size run is needed: a program of an attention kernel touches only its own subgraph
(its rows, its bias block) for each (batch, head) it covers, so its traffic depends on that
subgraph's size n (and on B, H, d, dtype and the bias kind), and kernels over node rows (the
delta pass, the segment-mean backward) are additive over rows. A partition with ``c(n)``
subgraphs of size n therefore moves ``sum_n c(n) x bytes(one subgraph of n)``: `extrapolate`
runs one one-subgraph problem per distinct n, padded to the partition's largest size M so that
every launch picks the tiles and kernels it picks at full size. ``tests/test_byte_account.py``
checks that sum against a direct count of whole ragged problems, kernel by kernel. Program
counts are not additive for row kernels, so they come from the full-size grids, read with
launches switched off (``ByteCounter(run=False)``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")     # before triton is imported: kernels run on CPU tensors

import argparse  # noqa: E402
import csv  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from byte_account import ByteCounter, Launch, by_kernel  # noqa: E402
from scaling import environment, write_atomic  # noqa: E402

import sba_kernels as sk  # noqa: E402
from sba_kernels import Partition, triton_backend  # noqa: E402

BIAS_KINDS = ("none", "shared", "per-head")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
FORWARD_TARGET, TOTAL_TARGET = 1.15, 1.3          # issue 13: forward, forward + backward, over their floors


@dataclass(frozen=True)
class Problem:
    """An intra-attention problem apart from its partition. The bias, when there is one, has
    q's dtype (`SBAttention` casts its graph bias to it) and is ``[P, M, M]`` (shared by the
    heads) or ``[H, P, M, M]`` (per head). ``contiguous``: every subgraph is a consecutive
    ascending run of node ids, the order `SBATransformer` puts nodes in; else a gather."""

    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: torch.dtype = torch.float16
    bias: str = "none"
    contiguous: bool = True

    @property
    def bias_heads(self) -> int:
        return {"none": 0, "shared": 1, "per-head": self.heads}[self.bias]

    @property
    def element_bytes(self) -> int:
        return torch.finfo(self.dtype).bits // 8


# ----------------------------------------------------------------------------- counting
def partition_of(lengths: Sequence[int], width: int, contiguous: bool) -> Partition:
    """Subgraph p holds ``lengths[p]`` nodes, padded to ``width`` slots. Node ids run consecutively,
    ascending when ``contiguous``, else descending (a gather no contiguity test takes for a run)."""
    sizes = torch.tensor(lengths, dtype=torch.long)
    n = int(sizes.sum())
    part = torch.repeat_interleave(torch.arange(len(lengths)), sizes)
    slot = torch.arange(n) - (torch.cumsum(sizes, 0) - sizes)[part]
    ids = torch.arange(n, dtype=torch.int32)
    index = torch.full((len(lengths), width), -1, dtype=torch.int32)
    index[part, slot] = ids if contiguous else ids.flip(0)
    return Partition(index, sizes.to(torch.int32), num_nodes=n)


def _inputs(partition: Partition, problem: Problem, fill: bool, generator: torch.Generator):
    """q, k, v ``[B, N, H, d]`` and the bias (or None): random when ``fill``, else uninitialised
    (launches that do not run read no values)."""
    def tensor(*shape):
        if fill:
            return torch.randn(shape, generator=generator).to(problem.dtype)
        return torch.empty(shape, dtype=problem.dtype)

    B, H, d = problem.batch, problem.heads, problem.head_dim
    q, k, v = (tensor(B, partition.num_nodes, H, d) for _ in range(3))
    blocks = (partition.num_parts, partition.max_size, partition.max_size)
    bias = {"none": None, "shared": lambda: tensor(*blocks), "per-head": lambda: tensor(H, *blocks)}[problem.bias]
    return q, k, v, bias() if bias else None


def count_passes(partition: Partition, problem: Problem, *, pool: bool, need_dbias: bool, backward: bool = True,
                 run: bool = True, seed: int = 0) -> tuple[list[Launch], list[Launch]]:
    """The Triton launches of one forward and of its backward (``[]`` unless ``backward``), each
    counted on its own. The forward is `sk.intra_attention`, or with ``pool``
    `sk.intra_attention_pooled` as `SBAttention` calls it; the backward takes the gradients of
    q, k, v and, with ``need_dbias``, of the bias. ``run=False`` launches nothing (programs only)."""
    if need_dbias and problem.bias == "none":
        raise ValueError("need_dbias needs a bias")
    q, k, v, bias = _inputs(partition, problem, run, torch.Generator().manual_seed(seed))
    wrt = (q, k, v) + ((bias,) if need_dbias else ())
    for t in wrt:
        t.requires_grad_(backward)
    op = sk.intra_attention_pooled if pool else sk.intra_attention
    with ByteCounter(run) as forward:
        outputs = op(q, k, v, partition, bias=bias, backend="triton")
    if not backward:
        return forward.launches, []
    outputs = outputs if pool else (outputs,)
    grads = tuple(torch.randn_like(o) if run else torch.empty_like(o) for o in outputs)
    with ByteCounter(run) as back:
        torch.autograd.grad(outputs, wrt, grads)
    return forward.launches, back.launches


def extrapolate(histogram: dict[int, int], problem: Problem, *, pool: bool, need_dbias: bool,
                backward: bool = True) -> tuple[dict[str, Launch], dict[str, Launch]]:
    """Per-kernel bytes of the forward and backward of a partition with ``histogram``
    (``{subgraph size: subgraphs}``): ``count x`` one one-subgraph problem per size, padded to
    the largest size. Programs are summed the same way, which is exact only for kernels whose
    grid runs over subgraphs; `full_programs` gives the real ones."""
    width = max(histogram)
    forward: list[Launch] = []
    back: list[Launch] = []
    with _bias_loop_as_for(sum(histogram.values())):
        for n, count in sorted(histogram.items()):
            fwd, bwd = count_passes(partition_of([n], width, problem.contiguous), problem, pool=pool,
                                    need_dbias=need_dbias, backward=backward)
            forward += [launch * count for launch in fwd]
            back += [launch * count for launch in bwd]
    return by_kernel(forward), by_kernel(back)


def _bias_loop_as_for(num_parts: int):
    """The one-tile forward's choice between one program per (batch, head) and one per bias
    tile depends on the number of subgraphs (`triton_backend.uses_bias_loop`): a one-subgraph
    problem makes the choice ``num_parts`` subgraphs make (the pairs per tile are the same)."""
    enough = num_parts >= triton_backend.BIAS_LOOP_MIN_PARTS
    return triton_backend.bias_tuning(min_parts=1 if enough else sys.maxsize)


def full_partition(histogram: dict[int, int], contiguous: bool) -> Partition:
    """A partition with ``histogram``'s sizes (subgraphs in increasing size; order moves no bytes)."""
    lengths = [n for n, count in sorted(histogram.items()) for _ in range(count)]
    return partition_of(lengths, max(histogram), contiguous)


def full_programs(histogram: dict[int, int], problem: Problem, *, pool: bool, need_dbias: bool,
                  backward: bool = True) -> tuple[dict[str, int], dict[str, int]]:
    """Programs per kernel of the full-size forward and backward, from their grids (no launch runs;
    the inputs are allocated, uninitialised)."""
    fwd, bwd = count_passes(full_partition(histogram, problem.contiguous), problem, pool=pool,
                            need_dbias=need_dbias, backward=backward, run=False)
    return ({k: launch.programs for k, launch in by_kernel(fwd).items()},
            {k: launch.programs for k, launch in by_kernel(bwd).items()})


# ----------------------------------------------------------------------------- the floor
def floors(histogram: dict[int, int], problem: Problem, *, pool: bool, need_dbias: bool) -> tuple[int, int]:
    """(forward, backward) floor in bytes: what must cross memory once.

    Forward: read q, k, v; read the bias entries the subgraphs use (``n_p^2`` per subgraph per
    bias head, never the padding); write o and lse (fp32); with ``pool``, write z ``[B, P, H, d]``.
    Backward: read dO, q, k, v, lse and the bias entries (and dz with ``pool``); write dq, dk, dv
    and, with ``need_dbias``, the bias gradient. Not o: ``delta_i = rowsum(dO_i * o_i)`` equals
    ``sum_j p_ij dp_ij``, which a program holding the whole subgraph computes from its own tile
    (issue 13's fused backward), so o need not be read; a kernel that reads it pays for it here.
    """
    nodes = sum(n * c for n, c in histogram.items())
    parts = sum(histogram.values())
    row = problem.batch * problem.heads * problem.head_dim * problem.element_bytes   # one node of q (or k, ...)
    lse = problem.batch * problem.heads * 4
    bias = problem.bias_heads * sum(n * n * c for n, c in histogram.items()) * problem.element_bytes
    pooled = parts * row if pool else 0
    forward = nodes * (3 * row + row + lse) + bias + pooled
    backward = nodes * (4 * row + lse + 3 * row) + bias * (1 + need_dbias) + pooled
    return forward, backward


# ----------------------------------------------------------------------------- partitions
def lengths_histogram(spec: str, num_nodes: int, *, seed: int = 0, k: int = 8) -> tuple[dict[int, int], str]:
    """``{subgraph size: count}`` and how it was made, from ``spec``:

    * ``uniform:S``: ``N // S`` subgraphs of S nodes and one of the remainder;
    * ``metis:S``: METIS (`sba_model.partition_graph`) into ``ceil(N / S)`` parts of a k-NN graph
      (k neighbours) on N random points of the unit square;
    * ``metis-max:S``: the same graph through ``partition_graph(..., max_size=S)``: no subgraph
      over S nodes, so every one fits one tile of S rows.
    """
    kind, _, size = spec.partition(":")
    if kind not in ("uniform", "metis", "metis-max") or not size.isdigit() or int(size) < 1 or num_nodes < int(size):
        raise ValueError(f"--lengths-from takes uniform:S, metis:S or metis-max:S with 1 <= S <= --n = {num_nodes}, "
                         f"got {spec!r}")
    size = int(size)
    if kind == "uniform":
        hist = {size: num_nodes // size} | ({num_nodes % size: 1} if num_nodes % size else {})
        return {n: c for n, c in hist.items() if c}, f"uniform: {num_nodes // size} subgraphs of {size}"
    from sba_model import knn_adjacency, partition_graph

    # metis:S asks for ceil(N / S) parts; metis-max:S for parts of at most S nodes, as many as
    # partition_graph chooses (a little more than N / S, so METIS has room to cut well).
    args = dict(num_parts=math.ceil(num_nodes / size)) if kind == "metis" else dict(max_size=size)
    adjacency = knn_adjacency(np.random.default_rng(seed).random((num_nodes, 2)), k)
    partition = partition_graph(adjacency, seed=seed, **args)
    counts = torch.bincount(partition.lengths.long()).tolist()
    call = ", ".join(f"{key}={value}" for key, value in args.items())
    how = (f"METIS (`partition_graph(adjacency, {call}, seed={seed})`: {partition.num_parts:,} subgraphs) "
           f"of a k-NN graph (k = {k}) on {num_nodes:,} random points")
    return {n: c for n, c in enumerate(counts) if c}, how


# ----------------------------------------------------------------------------- the report
PASSES = (("forward (intra_attention)", False), ("forward (pooled, as SBAttention)", True))


@dataclass
class Row:
    """One launch of a pass at full size, or the pass's total (``launch == "total"``)."""

    bias: str
    pass_name: str
    launch: str
    programs: int
    read: Counter               # kernel argument -> bytes
    written: Counter
    pass_floor: int

    @property
    def ratio(self) -> float:
        """Bytes moved over the whole pass's floor: a pass's launches add up to its total."""
        return (sum(self.read.values()) + sum(self.written.values())) / self.pass_floor


def _pass_rows(bias: str, name: str, launches: dict[str, Launch], programs: dict[str, int], floor: int) -> list[Row]:
    """One row per kernel of the pass and a total row."""
    if set(launches) != set(programs):
        raise RuntimeError(f"{name}: kernels of the one-subgraph runs {sorted(launches)} differ from the "
                           f"full-size launch {sorted(programs)}: the extrapolation misses a launch")
    rows = [Row(bias, name, kernel, programs[kernel], l.read, l.written, floor) for kernel, l in launches.items()]
    total = Row(bias, name, "total", sum(programs.values()), sum((r.read for r in rows), Counter()),
                sum((r.written for r in rows), Counter()), floor)
    return rows + [total]


def account(histogram: dict[int, int], problem: Problem) -> list[Row]:
    """Report rows of one bias kind: both forwards and the pooled forward's backward (with the
    bias gradient when there is a bias: `SBAttention`'s graph bias is learnable)."""
    need_dbias = problem.bias != "none"
    rows = []
    for name, pool in PASSES:
        fwd, bwd = extrapolate(histogram, problem, pool=pool, need_dbias=need_dbias, backward=pool)
        fwd_programs, bwd_programs = full_programs(histogram, problem, pool=pool, need_dbias=need_dbias, backward=pool)
        fwd_floor, bwd_floor = floors(histogram, problem, pool=pool, need_dbias=need_dbias)
        rows += _pass_rows(problem.bias, name, fwd, fwd_programs, fwd_floor)
        if pool:
            rows += _pass_rows(problem.bias, "backward", bwd, bwd_programs, bwd_floor)
    return rows


def targets(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Per bias kind: the ratios of both forwards and of the pooled forward + backward."""
    out = {}
    for bias in dict.fromkeys(r.bias for r in rows):
        total = {r.pass_name: r for r in rows if r.bias == bias and r.launch == "total"}
        plain, pooled, back = (total[name] for name in (PASSES[0][0], PASSES[1][0], "backward"))
        moved = sum(sum(r.read.values()) + sum(r.written.values()) for r in (pooled, back))
        out[bias] = {"forward": plain.ratio, "forward_pooled": pooled.ratio,
                     "forward_backward": moved / (pooled.pass_floor + back.pass_floor)}
    return out


def _targets_table(rows: list[Row]) -> list[str]:
    lines = [f"| bias | forward (intra_attention) | forward (pooled) | forward <= {FORWARD_TARGET}x | "
             f"forward + backward (pooled) | forward + backward <= {TOTAL_TARGET}x |", "|---|---|---|---|---|---|"]
    for bias, r in targets(rows).items():
        forward_ok = max(r["forward"], r["forward_pooled"]) <= FORWARD_TARGET
        lines.append(f"| {bias} | {r['forward']:.3f}x | {r['forward_pooled']:.3f}x | {'yes' if forward_ok else 'NO'} | "
                     f"{r['forward_backward']:.3f}x | {'yes' if r['forward_backward'] <= TOTAL_TARGET else 'NO'} |")
    return lines


def _megabytes(tally: Counter) -> str:
    return "; ".join(f"{name} {b / 1e6:,.1f}" for name, b in tally.most_common())


def _launch_table(rows: list[Row]) -> list[str]:
    lines = ["| bias | pass | launch | programs | read (MB) | written (MB) | floor (MB) | ratio | "
             "read by argument (MB) | written by argument (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        total = r.launch == "total"
        bold = (lambda text: f"**{text}**") if total else (lambda text: text)
        cells = [r.bias, r.pass_name, bold(r.launch), f"{r.programs:,}", f"{sum(r.read.values()) / 1e6:,.1f}",
                 f"{sum(r.written.values()) / 1e6:,.1f}", f"{r.pass_floor / 1e6:,.1f}" if total else "",
                 bold(f"{r.ratio:.3f}x"), "" if total else _megabytes(r.read), "" if total else _megabytes(r.written)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _write_csv(path: Path, rows: list[Row]) -> None:
    """Exact bytes; ``*_by_argument`` as ``name=bytes`` pairs; ``pass_floor`` on every row."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["bias", "pass", "launch", "programs", "bytes_read", "bytes_written", "pass_floor", "ratio",
                         "read_by_argument", "written_by_argument"])
        for r in rows:
            writer.writerow([r.bias, r.pass_name, r.launch, r.programs, sum(r.read.values()), sum(r.written.values()),
                             r.pass_floor, f"{r.ratio:.6f}", ";".join(f"{k}={v}" for k, v in r.read.most_common()),
                             ";".join(f"{k}={v}" for k, v in r.written.most_common())])


def write_report(rows: list[Row], out: Path, *, command: str, problem: Problem, dtype_name: str,
                 histogram: dict[int, int], how: str) -> None:
    env = environment("cpu")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "bytes.csv", lambda path: _write_csv(path, rows))
    nodes, parts = sum(n * c for n, c in histogram.items()), sum(histogram.values())
    tensor_bytes = problem.batch * nodes * problem.heads * problem.head_dim * problem.dtype.itemsize
    commit = (env["commit"] or "unknown")[:12] + (" (with uncommitted changes)" if env.get("commit_dirty") else "")
    stand_in = " (standing in for bf16: the same 2 bytes per element; the interpreter's bf16 dots are wrong, " \
               "its byte counts would be the same)" if dtype_name == "fp16" else ""
    order = "contiguous (as SBATransformer orders nodes)" if problem.contiguous else "gathered"
    lines = [
        "# Bytes the Triton attention kernels move: counted, not timed",
        "",
        "Counted bytes: what each kernel loads and stores by construction, element by element (masked-off "
        "elements excluded), in Triton's CPU interpreter (`bench/byte_account.py`). Not timings and not DRAM "
        "traffic: a GPU moves 32-byte sectors and may serve re-reads from L2.",
        "",
        f"Command: `{command}`; commit {commit}, triton {triton.__version__}, torch {torch.__version__}.",
        "",
        f"Problem: N = {nodes:,}, B = {problem.batch}, H = {problem.heads}, d = {problem.head_dim}, "
        f"{dtype_name}{stand_in}; node order {order}. "
        f"Partition: {how}: P = {parts:,}, sizes {min(histogram)}..{max(histogram)} (M = {max(histogram)}); "
        "size x subgraphs: " + ", ".join(f"{n} x {c:,}" for n, c in sorted(histogram.items())) + ".",
        "",
        "Method: bytes come from one one-subgraph problem per distinct size, padded to M, times the number of "
        "subgraphs of that size (exact: `tests/test_byte_account.py` checks it against whole ragged problems, kernel "
        "by kernel); programs come from the full-size grids. Bias kinds: none, shared `[P, M, M]`, per head "
        "`[H, P, M, M]`, in q's dtype; with a bias the backward also computes its gradient.",
        "",
        "Floor: forward = read q, k, v and the bias entries the subgraphs use (n_p^2 per subgraph per bias head), "
        "write o and lse (fp32) and, pooled, z `[B, P, H, d]`. Backward = read dO, q, k, v, lse, the bias entries "
        "(and dz, pooled), write dq, dk, dv and the bias gradient. Not o: delta = rowsum(dO * o) = rowsum(P * dP) "
        "comes from the tile when one program holds the subgraph. Ratio = (read + written) / floor; a launch's "
        "ratio is over its whole pass's floor, so the launches of a pass add up to its total.",
        "",
        "Only Triton launches are counted. Without a bias gradient the pooled backward has no torch operation "
        "between them: z's gradient is taken in by the one-tile backward itself. With one, dz's share reaches "
        "dO through a segment-mean backward (counted) and a torch addition (not counted: it reads two "
        f"`[B, N, H, d]` tensors and writes one, 3 x {tensor_bytes / 1e6:,.1f} MB here). "
        "The layer's own projections are not in these numbers either.",
        "",
        "## Issue 13's targets",
        "",
        *_targets_table(rows),
        "",
        "## Every launch",
        "",
        *_launch_table(rows),
    ]
    write_atomic(out / "bytes.md", lambda path: path.write_text("\n".join(lines) + "\n"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="nodes")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--bias", nargs="+", choices=BIAS_KINDS, default=list(BIAS_KINDS))
    p.add_argument("--lengths-from", default="metis-max:64", help="uniform:S, metis:S or metis-max:S")
    p.add_argument("--knn", type=int, default=8, help="neighbours per node of the k-NN graph METIS cuts")
    p.add_argument("--gather", action="store_true", help="subgraphs not contiguous in node order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "static")
    args = p.parse_args(argv)
    if min(args.n, args.batch, args.heads, args.head_dim, args.knn) < 1:
        p.error("--n, --batch, --heads, --head-dim and --knn must be >= 1")
    try:
        histogram, how = lengths_histogram(args.lengths_from, args.n, seed=args.seed, k=args.knn)
    except ValueError as err:             # a spec or graph size that cannot be: said as the CLI's
        p.error(str(err))
    problem = Problem(args.batch, args.heads, args.head_dim, DTYPES[args.dtype], contiguous=not args.gather)
    rows = [row for bias in args.bias for row in account(histogram, replace(problem, bias=bias))]
    command = "python bench/byte_report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_report(rows, args.out, command=command.strip(), problem=problem, dtype_name=args.dtype,
                 histogram=histogram, how=how)
    print("\n".join(_targets_table(rows)))
    print(f"wrote {args.out}/bytes.md and bytes.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
