"""The triton backend against the float64 dense reference (SPEC section 5).

Without a GPU these run in Triton's interpreter on CPU tensors in fp32 and fp16 (conftest
sets TRITON_INTERPRET=1). Not bf16 there: the interpreter's ``tl.dot`` multiplies bf16 operands
as their raw uint16 bits (triton 3.9 ``create_dot``), so only the GPU can check bf16. With a
GPU the same cases run on CUDA in fp32 (IEEE dots), tf32 and bf16.
Outputs start as NaN (POISON), so an element no program writes fails the check.
"""

import pytest
import torch

import sba_kernels as sk
from sba_kernels import triton_backend
from helpers import (compare_forward_backward, dense_attention, dense_masked_attention, loop_segment_mean,
                     random_partition, rel_err)

F64 = torch.float64
if torch.cuda.is_available():
    MODES = [("cuda", torch.float32, False, 1e-5), ("cuda", torch.float32, True, 1e-3),
             ("cuda", torch.bfloat16, False, 1e-2)]
else:
    MODES = [("cpu", torch.float32, False, 1e-5), ("cpu", torch.float16, False, 1e-2)]
MODE_IDS = [f"{dev}-{'tf32' if tf32 else str(dt).split('.')[1]}" for dev, dt, tf32, _ in MODES]
pytestmark = pytest.mark.gpu     # on a GPU, gpu_check.sh runs these on the device


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(triton_backend, "POISON", True)


@pytest.fixture(params=MODES, ids=MODE_IDS)
def mode(request):
    device, dtype, tf32, tol = request.param
    saved = torch.backends.cuda.matmul.allow_tf32       # a property: set and restore by hand
    torch.backends.cuda.matmul.allow_tf32 = tf32
    yield device, dtype, tol
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("bias_kind", [None, "shared", "per_head"])
def test_intra_matches_reference(mode, bias_kind):
    device, dtype, tol = mode
    g = torch.Generator().manual_seed(hash(bias_kind) % 1000)
    part = random_partition(170, max_size=11, giant=83, generator=g)     # giant > one 64-row tile
    assert part.max_size == 83 and 1 in part.lengths.tolist()
    B, H, d = 2, 2, 16
    inputs = [torch.randn(B, 170, H, d, generator=g) for _ in range(3)]
    if bias_kind:
        shape = (part.num_parts, part.max_size, part.max_size)
        inputs.append(torch.randn(((H,) if bias_kind == "per_head" else ()) + shape, generator=g))
    dpart = part.to(device)

    def ours(q, k, v, *bias):
        return sk.intra_attention(q, k, v, dpart, bias=bias[0] if bias else None, scale=0.5, backend="triton")

    def ref(q, k, v, *bias):
        return dense_masked_attention(q, k, v, part, bias[0] if bias else None, scale=0.5)

    compare_forward_backward(ours, ref, inputs, dtype=dtype, tol=tol, generator=g, device=device)


@pytest.mark.parametrize("bias_shape", [None, "PP", "HPP"])
def test_inter_matches_reference(mode, bias_shape):
    device, dtype, tol = mode
    g = torch.Generator().manual_seed(11)
    B, P, H, d = 2, 150, 2, 32                 # P spans several query and key tiles
    inputs = [torch.randn(B, P, H, d, generator=g) for _ in range(3)]
    if bias_shape:
        inputs.append(torch.randn(((H,) if bias_shape == "HPP" else ()) + (P, P), generator=g))

    def ours(q, k, v, *bias):
        return sk.inter_attention(q, k, v, bias=bias[0] if bias else None, backend="triton")

    def ref(q, k, v, *bias):
        return dense_attention(q, k, v, bias[0] if bias else None)

    compare_forward_backward(ours, ref, inputs, dtype=dtype, tol=tol, generator=g, device=device)


@pytest.mark.parametrize("giant, bias_kind", [(0, None), (83, "per_head")])
def test_intra_pooled_matches_reference(mode, giant, bias_kind):
    """o and the fused subgraph means z, with gradients flowing into both. giant=0: every
    subgraph fits one query tile; giant=83: one spans two, whose shares are summed."""
    device, dtype, tol = mode
    g = torch.Generator().manual_seed(16 + giant)
    part = random_partition(170, max_size=11, giant=giant, generator=g)
    B, H, d = 2, 2, 16
    inputs = [torch.randn(B, 170, H, d, generator=g) for _ in range(3)]
    if bias_kind:
        inputs.append(torch.randn(H, part.num_parts, part.max_size, part.max_size, generator=g))
    dpart = part.to(device)

    def ours(q, k, v, *bias):
        o, z = sk.intra_attention_pooled(q, k, v, dpart, bias=bias[0] if bias else None, backend="triton")
        assert z.shape == (B, part.num_parts, H, d)
        return torch.cat([o.reshape(-1), z.reshape(-1)])

    def ref(q, k, v, *bias):
        o = dense_masked_attention(q, k, v, part, bias[0] if bias else None)
        return torch.cat([o.reshape(-1), loop_segment_mean(o.reshape(B, 170, H * d), part).reshape(-1)])

    compare_forward_backward(ours, ref, inputs, dtype=dtype, tol=tol, generator=g, device=device)


def test_intra_pooled_gradient_through_means_alone(mode):
    device, dtype, tol = mode
    g = torch.Generator().manual_seed(17)
    part = random_partition(60, max_size=9, generator=g)
    ins = [torch.randn(1, 60, 2, 16, generator=g, dtype=F64) for _ in range(3)]
    ours = [t.to(device, dtype).requires_grad_() for t in ins]
    ref = [t.clone().requires_grad_() for t in ins]
    sk.intra_attention_pooled(*ours, part.to(device), backend="triton")[1].square().sum().backward()
    loop_segment_mean(dense_masked_attention(*ref, part).reshape(1, 60, 32), part).square().sum().backward()
    for a, b in zip(ours, ref):
        assert rel_err(a.grad.cpu(), b.grad) <= 2 * tol


def test_segment_mean_matches_reference(mode):
    device, dtype, tol = mode
    g = torch.Generator().manual_seed(12)
    part = random_partition(200, max_size=13, giant=70, generator=g)
    dpart = part.to(device)
    x = torch.randn(3, 200, 150, generator=g)   # C spans two channel blocks
    compare_forward_backward(lambda x: sk.segment_mean(x, dpart, backend="triton"),
                             lambda x: loop_segment_mean(x, part), [x], dtype=dtype, tol=tol, generator=g,
                             device=device)


@pytest.mark.parametrize("head_dim", [16, 24, 32, 64, 128])
def test_head_dims_forward(mode, head_dim):
    device, dtype, tol = mode
    g = torch.Generator().manual_seed(head_dim)
    part = random_partition(50, max_size=20, generator=g)
    q, k, v = (torch.randn(1, 50, 2, head_dim, generator=g) for _ in range(3))
    out = sk.intra_attention(*(t.to(device, dtype) for t in (q, k, v)), part.to(device), backend="triton")
    assert rel_err(out.cpu(), dense_masked_attention(q.double(), k.double(), v.double(), part)) <= tol


def test_noncontiguous_inputs_and_large_logits(mode):
    device, dtype, tol = mode
    g = torch.Generator().manual_seed(13)
    part = random_partition(90, max_size=12, generator=g)
    qkv = torch.randn(2, 90, 3, 2, 16, generator=g)          # as a fused projection lays it out
    q, k, v = qkv.to(device, dtype).unbind(2)               # cast first: views, not copies
    assert not q.is_contiguous()
    out = sk.intra_attention(q, k, v, part.to(device), scale=100 / 4, backend="triton")
    ref = dense_masked_attention(*(t.double() for t in qkv.unbind(2)), part, scale=100 / 4)
    assert torch.isfinite(out).all()
    # Softmax at scale 100 is nearly one-hot: rounding of q.k moves the argmax rarely but can.
    assert rel_err(out.cpu(), ref) <= max(tol, 1e-4) * 10


def test_backward_is_deterministic(mode):
    device, dtype, _ = mode
    g = torch.Generator().manual_seed(14)
    part = random_partition(120, max_size=9, giant=70, generator=g).to(device)
    base = [torch.randn(2, 120, 2, 16, generator=g).to(device, dtype) for _ in range(3)]
    bias = torch.randn(part.num_parts, part.max_size, part.max_size, generator=g).to(device, dtype)
    grads = []
    for _ in range(2):
        ins = [t.clone().requires_grad_() for t in base + [bias]]
        sk.intra_attention(*ins[:3], part, bias=ins[3], backend="triton").sum().backward()
        grads.append([t.grad for t in ins])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_bias_without_grad_and_explicit_backend_errors():
    g = torch.Generator().manual_seed(15)
    part = random_partition(30, max_size=6, generator=g)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, 30, 2, 16, generator=g, device="cpu").to(dev).requires_grad_()
    bias = torch.randn(part.num_parts, part.max_size, part.max_size).to(dev)     # no grad wanted
    sk.intra_attention(q, q, q, part.to(dev), bias=bias, backend="triton").sum().backward()
    assert q.grad is not None and bias.grad is None and torch.isfinite(q.grad).all()
