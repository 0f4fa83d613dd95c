"""The plain-integer arithmetic of a Triton launch and the precision its fp32 dots run at:
what the launches (`triton_backend`) and their tuning keys (`triton_tuning`) both ask, on every
launch, so they import it from here rather than from each other."""

from __future__ import annotations

import torch


def tile_side(n: int) -> int:
    """The side a tile needs for ``n`` rows (or columns): the next power of two, at least 16
    (tl.dot's least). In plain integers: `triton.next_power_of_2` is a constexpr function in
    Triton 3.9 and costs microseconds a call, and every launch asks several times."""
    return max(16, 1 << (n - 1).bit_length()) if n > 1 else 16


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for grids, in plain integers (`triton.cdiv` is a constexpr function:
    microseconds a call, as `tile_side` says)."""
    return -(-a // b)


def dot_precision(dtype: torch.dtype) -> str:
    """How fp32 dots run (the kernels' ``PRECISION``): TF32 when the user enabled it for
    matmuls (torch's own switch), else 3xTF32, which splits each operand into two TF32 halves
    for close to fp32 accuracy on tensor cores. Not "ieee": Triton expands an IEEE dot into
    FMAs, and the dK/dV kernel then spills kilobytes per thread at every tile size (seen in the
    compile report). fp16/bf16 dots ignore this."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"
