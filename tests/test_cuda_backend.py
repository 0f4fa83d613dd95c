"""The cuda backend: host checks run anywhere, and on a GPU the SPEC 5 comparison against the
float64 reference. (nvcc and the real binding are compiled in test_gpu_compile.py.)"""

import pytest
import torch

import sba_kernels as sk
from sba_kernels import cuda_backend
from helpers import dense_attention, dense_masked_attention, loop_segment_mean, random_partition, rel_err

@pytest.mark.parametrize("make, match", [
    (lambda: torch.randn(1, 4, 2, 16), "CUDA tensor"),
    (lambda: torch.randn(1, 4, 2, 16, dtype=torch.float64, device="meta"), "CUDA tensor"),
])
def test_host_checks_reject_what_the_kernels_cannot_take(make, match):
    with pytest.raises(ValueError, match=match):
        cuda_backend.check_supported(make())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the no-GPU path")
def test_unavailable_backend_says_why():
    assert "cuda" not in sk.available_backends()
    assert cuda_backend.unavailable_reason() == "no CUDA device visible to torch"
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="backend='cuda' cannot run on cpu"):
        sk.intra_attention(q, q, q, sk.Partition.from_assignment([0, 0, 1, 1]), backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it)")
def test_cuda_backend_matches_reference():
    assert cuda_backend.is_available(), cuda_backend.unavailable_reason()
    g = torch.Generator().manual_seed(0)
    part = random_partition(150, max_size=9, giant=70, generator=g)
    dpart = part.to("cuda")
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for bias_heads in (None, 1, 2):
            ins = [torch.randn(2, 150, 2, 32, generator=g, dtype=torch.float64) for _ in range(3)]
            if bias_heads:
                shape = (part.num_parts, part.max_size, part.max_size)
                ins.append(torch.randn(((2,) if bias_heads == 2 else ()) + shape, generator=g, dtype=torch.float64))
            ours = [t.to("cuda", dtype).requires_grad_() for t in ins]
            ref = [t.clone().requires_grad_() for t in ins]
            out = sk.intra_attention(*ours[:3], dpart, bias=ours[3] if bias_heads else None, backend="cuda")
            exp = dense_masked_attention(*ref[:3], part, ref[3] if bias_heads else None)
            grad = torch.randn(exp.shape, generator=g, dtype=torch.float64)
            out.backward(grad.to("cuda", dtype))
            exp.backward(grad)
            assert rel_err(out.cpu(), exp) <= tol
            for a, b in zip(ours, ref):
                assert rel_err(a.grad.cpu(), b.grad) <= 2 * tol
    q, k, v = (torch.randn(2, 100, 2, 32, generator=g, dtype=torch.float64) for _ in range(3))
    out = sk.inter_attention(*(t.cuda().float() for t in (q, k, v)), backend="cuda")
    assert rel_err(out.cpu(), dense_attention(q, k, v)) <= 1e-5
    x = torch.randn(2, 150, 40, generator=g, dtype=torch.float64)
    assert rel_err(sk.segment_mean(x.cuda().float(), dpart, backend="cuda").cpu(), loop_segment_mean(x, part)) <= 1e-5
