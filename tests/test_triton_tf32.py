"""TF32 rounding in the triton kernels (`triton_kernels._round_to_tf32`, used by `_dot`).

Tensor cores truncate fp32 operands to TF32; the kernels round them to nearest first, which
an H200 showed is what keeps the "tf32" mode inside its 1e-3 tolerance. Checked here against
a rounding written from the definition (frexp), on values across magnitudes, exact TF32
values, halfway cases and signs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from sba_kernels import triton_backend
from sba_kernels.triton_kernels import _round_to_tf32

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu     # on a GPU, gpu_check.sh runs these on the device
TF32_BITS = 11                   # significant bits: the implicit one and 10 stored


@triton.jit
def _round_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, _round_to_tf32(tl.load(X + offs, mask=offs < n)), mask=offs < n)


def nearest_tf32(x: np.ndarray) -> np.ndarray:
    """x rounded to 11 significant bits, halfway cases away from zero, in float64."""
    mant, exp = np.frexp(x.astype(np.float64))                  # |mant| in [0.5, 1)
    scaled = np.abs(mant) * 2.0 ** TF32_BITS
    return np.sign(mant) * np.floor(scaled + 0.5) * 2.0 ** (exp - TF32_BITS)


def test_round_to_tf32_is_round_to_nearest():
    if triton_backend.BACKEND.unavailable(torch.device(DEVICE)):
        pytest.skip(triton_backend.BACKEND.unavailable(torch.device(DEVICE)))
    g = torch.Generator().manual_seed(4)
    random = torch.randn(4096, generator=g) * torch.logspace(-20, 20, 4096)
    exact = torch.tensor([1.0, -2.5, 1 + 2.0 ** -10, 0.0, 3.0 * 2.0 ** -60], dtype=torch.float32)
    # Halfway between two TF32 neighbours (bit 12 set, the rest of the dropped bits zero), and
    # one fp32 ulp either side of halfway: these separate rounding from truncation.
    half = (1 + torch.arange(1, 6) * 2.0 ** -10 + 2.0 ** -11).float()
    around = torch.cat([half, torch.nextafter(half, half * 2), torch.nextafter(half, half * 0)])
    x = torch.cat([random, exact, around, -around])
    y = torch.empty_like(x, device=DEVICE)
    _round_kernel[(triton.cdiv(x.numel(), 256),)](x.to(DEVICE), y, x.numel(), BLOCK=256)
    expect = nearest_tf32(x.numpy())
    np.testing.assert_array_equal(y.cpu().double().numpy(), expect)
    assert (y.cpu() != x).any()       # the rounding did round
