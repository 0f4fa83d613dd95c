"""How a one-tile kernel can load a contiguous subgraph's rows, compiled for sm_80 and sm_90
(compiler facts, not timings).

    python bench/load_forms.py        # -> bench/results/static/load_forms.md

When a partition is contiguous (`Partition.starts`), the one-tile kernels address a subgraph's
rows as ``first + slot`` and mask the slots past its length (`triton_kernels._tile_rows`,
`_load_tile`): no gather. Issue 13 asked whether loading the tile as a block does better:
block pointers (``tl.make_block_ptr``) or tensor descriptors (``tl.make_tensor_descriptor``),
which sm_90 runs as TMA copies. Each form below copies one ``[BLOCK, d]`` tile of a (batch,
head) slice of a ``[B, N, H, d]`` bf16 tensor, starting at a subgraph's first row and clipped
at its length (rows past it are zeros when read and untouched when written; a descriptor has to
be made per subgraph for that, in the kernel), and writes it back doubled. Each is compiled
with Triton's own compiler for both architectures; the table counts its SASS instructions
(``cuobjdump -sass``) by kind.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections import Counter
from pathlib import Path

import torch
import triton
import triton.language as tl

from sba_kernels import triton_aot

ROOT = Path(__file__).resolve().parents[1]
BLOCK, WARPS = 64, 4


@triton.jit
def tile_by_pointers(X, Y, Starts, Lengths, s_n, s_h, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """The kernels' own form: one address per element, a mask at the subgraph's length."""
    part, h = tl.program_id(0), tl.program_id(1)
    first, length = tl.load(Starts + part).to(tl.int64), tl.load(Lengths + part)
    slots, cols = tl.arange(0, BLOCK), tl.arange(0, HEAD_DIM)
    offsets = (first + slots)[:, None] * s_n + h * s_h + cols[None, :]
    mask = (slots < length)[:, None]
    tl.store(Y + offsets, tl.load(X + offsets, mask=mask, other=0.0) * 2, mask=mask)


@triton.jit
def tile_by_descriptor(X, Y, Starts, Lengths, s_n, s_h, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """A tensor descriptor per subgraph, of shape ``[length, d]``: the copy clips at its end."""
    part, h = tl.program_id(0), tl.program_id(1)
    first, length = tl.load(Starts + part).to(tl.int64), tl.load(Lengths + part)
    base = first * s_n + h * s_h
    x = tl.make_tensor_descriptor(X + base, shape=[length, HEAD_DIM], strides=[s_n, 1], block_shape=[BLOCK, HEAD_DIM])
    y = tl.make_tensor_descriptor(Y + base, shape=[length, HEAD_DIM], strides=[s_n, 1], block_shape=[BLOCK, HEAD_DIM])
    y.store([0, 0], x.load([0, 0]) * 2)


@triton.jit
def tile_by_block_pointer(X, Y, Starts, Lengths, s_n, s_h, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """A block pointer over the subgraph's rows, bounds-checked at its length."""
    part, h = tl.program_id(0), tl.program_id(1)
    first, length = tl.load(Starts + part).to(tl.int64), tl.load(Lengths + part)
    base = first * s_n + h * s_h
    x = tl.make_block_ptr(X + base, shape=(length, HEAD_DIM), strides=(s_n, 1), offsets=(0, 0),
                          block_shape=(BLOCK, HEAD_DIM), order=(1, 0))
    y = tl.make_block_ptr(Y + base, shape=(length, HEAD_DIM), strides=(s_n, 1), offsets=(0, 0),
                          block_shape=(BLOCK, HEAD_DIM), order=(1, 0))
    tl.store(y, tl.load(x, boundary_check=(0,), padding_option="zero") * 2, boundary_check=(0,))


FORMS = (tile_by_pointers, tile_by_descriptor, tile_by_block_pointer)
# SASS opcodes that move data, by kind: global loads/stores, TMA, shared memory
KINDS = {"global": r"(LDG|STG)\S*", "TMA": r"UTMA\S*|UBLKCP\S*", "shared memory": r"(LDS|STS)\S*"}


def compile_form(kernel, head_dim: int, arch: int) -> dict:
    """Registers, shared bytes and SASS instruction counts of ``kernel`` for ``sm_<arch>``, or
    the compiler's error."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"X": "*bf16", "Y": "*bf16", "Starts": "*i32", "Lengths": "*i32", "s_n": "i32", "s_h": "i32",
                 "HEAD_DIM": "constexpr", "BLOCK": "constexpr"}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(6)}   # as the launcher sees [B, N, H, d] at d % 8 == 0
    source = ASTSource(kernel, signature, constexprs={"HEAD_DIM": head_dim, "BLOCK": BLOCK}, attrs=aligned)
    try:
        with triton_aot.cold_cache():
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": WARPS})
    except Exception as err:      # noqa: BLE001 -- the error is the finding
        return {"error": str(err).strip().splitlines()[-1][:200]}
    sass = triton_aot.cuobjdump(compiled.asm["cubin"], "-sass")
    opcodes = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
    moves = {kind: Counter(op for op in opcodes if re.fullmatch(pattern, op)) for kind, pattern in KINDS.items()}
    return {"registers": triton_aot.resource_usage(compiled.asm["cubin"]).get("REG", 0),
            "shared": int(compiled.metadata.shared), "scratch": int(getattr(compiled.metadata, "global_scratch_size", 0)),
            "instructions": len(opcodes), **moves}


def _counts(counter: Counter) -> str:
    return ", ".join(f"{n} {op}" for op, n in sorted(counter.items())) or "none"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "static" / "load_forms.md")
    args = p.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = ["# Loading a contiguous subgraph's tile: three forms compiled (compiler facts, not timings)", "",
             f"`python bench/load_forms.py` at {commit or 'an unknown commit'}, triton {triton.__version__}, torch "
             f"{torch.__version__}. One [{BLOCK}, d] bf16 tile per program, {WARPS} warps.", "",
             __doc__.split("\n\n")[2].replace("\n", " "), "",
             "| form | arch | d | registers | shared bytes | global scratch bytes | SASS instructions | "
             "global loads/stores | TMA | shared loads/stores |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for kernel in FORMS:
        for arch in (90, 80):
            for head_dim in (16, 64):
                r = compile_form(kernel, head_dim, arch)
                name = f"`{kernel.fn.__name__}`"
                if "error" in r:
                    lines.append(f"| {name} | sm_{arch} | {head_dim} | does not compile: {r['error']} | | | | | | |")
                else:
                    lines.append(f"| {name} | sm_{arch} | {head_dim} | {r['registers']} | {r['shared']} | {r['scratch']} | "
                                 f"{r['instructions']} | {_counts(r['global'])} | {_counts(r['TMA'])} | "
                                 f"{_counts(r['shared memory'])} |")
                print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
