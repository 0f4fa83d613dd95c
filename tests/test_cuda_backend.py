"""The cuda backend's host side, anywhere: what it says it supports, and why it is unavailable.
(The kernels run in test_conformance.py: on the GPU, or on the CPU emulator without one; nvcc
and the real binding are compiled in test_gpu_compile.py.)"""

import pytest
import torch

import sba_kernels as sk
from sba_kernels import cuda_backend


@pytest.mark.parametrize("make, match", [
    (lambda: torch.randn(1, 4, 2, 16, dtype=torch.float64), "takes float16, bfloat16, float32 inputs"),
    (lambda: torch.randn(1, 4, 2, 136), "head dims up to 128"),
    (lambda: torch.randn(1, 4, 2, 16, device="meta"), "needs CUDA tensors"),
])
def test_supports_names_what_the_kernels_cannot_take(make, match):
    assert match in cuda_backend.BACKEND.supports(make())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the no-GPU path")
def test_unavailable_backend_says_why():
    assert "cuda" not in sk.available_backends()
    assert cuda_backend.unavailable_reason() == "no CUDA device visible to torch"
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="backend='cuda' cannot run this input: the cuda backend needs CUDA"):
        sk.intra_attention(q, q, q, sk.Partition.from_assignment([0, 0, 1, 1]), backend="cuda")
