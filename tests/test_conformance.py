"""Every registered backend against the float64 dense reference (SPEC section 5).

One suite, parametrised over `sba_kernels.backends.names()`: a backend gets every check by being
registered, and loses its rows by being unregistered. Each runs here as `backend_setup.running`
says (Triton in its interpreter and the CUDA C++ on the emulator when there is no GPU), in every
precision mode it supports; a mode or backend that cannot run here is skipped with the reason
its own `supports` gives. The references in `helpers` share no code with any backend.
"""

from __future__ import annotations

import pytest
import torch

import sba_kernels as sk
from sba_kernels import backends
from backend_setup import GPU, running
from helpers import (compare_forward_backward, dense_attention, dense_masked_attention, loop_segment_mean,
                     random_partition, rel_err)

F64 = torch.float64
DEVICE = "cuda" if GPU else "cpu"
# (dtype, TF32 matmuls allowed, tolerance). fp32 on a GPU: with and without TF32.
if GPU:
    MODES = [(torch.float32, False, 1e-5), (torch.float32, True, 1e-3), (torch.bfloat16, False, 1e-2)]
else:
    MODES = [(torch.float32, False, 1e-5), (torch.float16, False, 1e-2), (torch.bfloat16, False, 1e-2)]
pytestmark = pytest.mark.gpu     # on a GPU, gpu_check.sh runs these on the device


@pytest.fixture(scope="module", params=backends.names())
def backend(request):
    """The name of a registered backend, set up to run here; skipped if it cannot."""
    name = request.param
    with running(name):
        reason = backends.get(name).unavailable(torch.device(DEVICE))
        if reason is not None:
            pytest.skip(f"{name} cannot run on {DEVICE} here: {reason}")
        yield name


@pytest.fixture(params=MODES, ids=lambda m: f"{str(m[0]).split('.')[1]}{'-tf32' if m[1] else ''}")
def mode(request, backend):
    """(dtype, tolerance) of one precision mode the backend supports."""
    dtype, tf32, tol = request.param
    reason = backends.get(backend).supports(torch.empty(1, 1, 1, 16, dtype=dtype, device=DEVICE))
    if reason is not None:
        pytest.skip(reason)
    saved = torch.backends.cuda.matmul.allow_tf32       # a property: set and restore by hand
    torch.backends.cuda.matmul.allow_tf32 = tf32
    yield dtype, tol
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("bias_kind", [None, "shared", "per_head"])
def test_intra_matches_reference(backend, mode, bias_kind):
    dtype, tol = mode
    g = torch.Generator().manual_seed(hash(bias_kind) % 1000)
    # the giant spans several key tiles (and query tiles where they are under 83 rows; the pooled
    # test below takes a giant over two 128-row query tiles)
    part = random_partition(170, max_size=11, giant=83, generator=g)
    assert part.max_size == 83 and 1 in part.lengths.tolist()
    B, H, d = 2, 2, 16
    inputs = [torch.randn(B, 170, H, d, generator=g) for _ in range(3)]
    if bias_kind:
        shape = (part.num_parts, part.max_size, part.max_size)
        inputs.append(torch.randn(((H,) if bias_kind == "per_head" else ()) + shape, generator=g))
    dpart = part.to(DEVICE)

    def ours(q, k, v, *bias):
        return sk.intra_attention(q, k, v, dpart, bias=bias[0] if bias else None, scale=0.5, backend=backend)

    def ref(q, k, v, *bias):
        return dense_masked_attention(q, k, v, part, bias[0] if bias else None, scale=0.5)

    compare_forward_backward(ours, ref, inputs, dtype=dtype, tol=tol, generator=g, device=DEVICE)


@pytest.mark.parametrize("bias_shape", [None, "PP", "HPP"])
def test_inter_matches_reference(backend, mode, bias_shape):
    dtype, tol = mode
    g = torch.Generator().manual_seed(11)
    B, P, H, d = 2, 150, 2, 32                 # P spans several query and key tiles
    inputs = [torch.randn(B, P, H, d, generator=g) for _ in range(3)]
    if bias_shape:
        inputs.append(torch.randn(((H,) if bias_shape == "HPP" else ()) + (P, P), generator=g))

    def ours(q, k, v, *bias):
        return sk.inter_attention(q, k, v, bias=bias[0] if bias else None, backend=backend)

    def ref(q, k, v, *bias):
        return dense_attention(q, k, v, bias[0] if bias else None)

    compare_forward_backward(ours, ref, inputs, dtype=dtype, tol=tol, generator=g, device=DEVICE)


@pytest.mark.parametrize("giant, bias_kind", [(0, None), (150, "per_head")])
def test_intra_pooled_matches_reference(backend, mode, giant, bias_kind):
    """o and the subgraph means z, with gradients flowing into both. giant=150: a subgraph
    spanning two query tiles of any size (128 rows at most), whose shares of the mean are summed."""
    dtype, tol = mode
    g = torch.Generator().manual_seed(16 + giant)
    part = random_partition(260, max_size=11, giant=giant, generator=g)
    B, H, d = 2, 2, 16
    inputs = [torch.randn(B, 260, H, d, generator=g) for _ in range(3)]
    if bias_kind:
        inputs.append(torch.randn(H, part.num_parts, part.max_size, part.max_size, generator=g))
    dpart = part.to(DEVICE)

    def ours(q, k, v, *bias):
        o, z = sk.intra_attention_pooled(q, k, v, dpart, bias=bias[0] if bias else None, backend=backend)
        assert z.shape == (B, part.num_parts, H, d)
        return torch.cat([o.reshape(-1), z.reshape(-1)])

    def ref(q, k, v, *bias):
        o = dense_masked_attention(q, k, v, part, bias[0] if bias else None)
        return torch.cat([o.reshape(-1), loop_segment_mean(o.reshape(B, -1, H * d), part).reshape(-1)])

    compare_forward_backward(ours, ref, inputs, dtype=dtype, tol=tol, generator=g, device=DEVICE)


def test_intra_pooled_gradient_through_means_alone(backend, mode):
    dtype, tol = mode
    g = torch.Generator().manual_seed(17)
    part = random_partition(60, max_size=9, generator=g)
    ins = [torch.randn(1, 60, 2, 16, generator=g, dtype=F64) for _ in range(3)]
    ours = [t.to(DEVICE, dtype).requires_grad_() for t in ins]
    ref = [t.clone().requires_grad_() for t in ins]
    sk.intra_attention_pooled(*ours, part.to(DEVICE), backend=backend)[1].square().sum().backward()
    loop_segment_mean(dense_masked_attention(*ref, part).reshape(1, 60, 32), part).square().sum().backward()
    for a, b in zip(ours, ref):
        assert rel_err(a.grad.cpu(), b.grad) <= 2 * tol


def test_segment_mean_matches_reference(backend, mode):
    dtype, tol = mode
    g = torch.Generator().manual_seed(12)
    part = random_partition(200, max_size=13, giant=70, generator=g)
    dpart = part.to(DEVICE)
    x = torch.randn(3, 200, 150, generator=g)   # C spans two channel blocks
    compare_forward_backward(lambda x: sk.segment_mean(x, dpart, backend=backend),
                             lambda x: loop_segment_mean(x, part), [x], dtype=dtype, tol=tol, generator=g,
                             device=DEVICE)


@pytest.mark.parametrize("head_dim", [16, 24, 32, 64, 128])
def test_head_dims(backend, mode, head_dim):
    """Forward and backward at each head dim (128 needs the cuda kernels' shared-memory opt-in)."""
    dtype, tol = mode
    g = torch.Generator().manual_seed(head_dim)
    part = random_partition(50, max_size=20, giant=33, generator=g)
    inputs = [torch.randn(1, 50, 2, head_dim, generator=g) for _ in range(3)]
    compare_forward_backward(lambda q, k, v: sk.intra_attention(q, k, v, part.to(DEVICE), backend=backend),
                             lambda q, k, v: dense_masked_attention(q, k, v, part), inputs, dtype=dtype, tol=tol,
                             generator=g, device=DEVICE)


def test_noncontiguous_inputs_and_large_logits(backend, mode):
    dtype, tol = mode
    g = torch.Generator().manual_seed(13)
    part = random_partition(90, max_size=12, generator=g)
    qkv = torch.randn(2, 90, 3, 2, 16, generator=g)          # as a fused projection lays it out
    q, k, v = qkv.to(DEVICE, dtype).unbind(2)               # cast first: views, not copies
    assert not q.is_contiguous()
    out = sk.intra_attention(q, k, v, part.to(DEVICE), scale=100 / 4, backend=backend)
    ref = dense_masked_attention(*(t.double() for t in qkv.unbind(2)), part, scale=100 / 4)
    assert torch.isfinite(out).all()
    # Softmax at scale 100 is nearly one-hot: rounding of q.k moves the argmax rarely but can.
    assert rel_err(out.cpu(), ref) <= max(tol, 1e-4) * 10


def test_backward_is_deterministic(backend, mode):
    dtype, _ = mode
    g = torch.Generator().manual_seed(14)
    part = random_partition(120, max_size=9, giant=70, generator=g).to(DEVICE)
    base = [torch.randn(2, 120, 2, 16, generator=g).to(DEVICE, dtype) for _ in range(3)]
    bias = torch.randn(part.num_parts, part.max_size, part.max_size, generator=g).to(DEVICE, dtype)
    grads = []
    for _ in range(2):
        ins = [t.clone().requires_grad_() for t in base + [bias]]
        sk.intra_attention(*ins[:3], part, bias=ins[3], backend=backend).sum().backward()
        grads.append([t.grad for t in ins])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float16])
def test_precision_contract_for_the_bias(backend, mode, bias_dtype):
    """The bias is read in its own dtype and its gradient comes back in it, whatever q's dtype:
    compared with the reference fed the bias's exact stored values."""
    dtype, tol = mode
    if backends.get(backend).supports(torch.empty(1, 1, 1, 16, dtype=dtype, device=DEVICE),
                                      torch.empty(1, dtype=bias_dtype, device=DEVICE)) is not None:
        pytest.skip(f"{backend} does not take a {bias_dtype} bias with {dtype} inputs")
    g = torch.Generator().manual_seed(18)
    part = random_partition(40, max_size=9, generator=g)
    ins = [torch.randn(1, 40, 2, 16, generator=g).to(dtype) for _ in range(3)]
    bias = (torch.randn(2, part.num_parts, part.max_size, part.max_size, generator=g) * 3).to(bias_dtype)
    ours = [t.to(DEVICE, copy=True).requires_grad_() for t in ins + [bias]]
    ref = [t.to(F64, copy=True).requires_grad_() for t in ins + [bias]]
    out = sk.intra_attention(*ours[:3], part.to(DEVICE), bias=ours[3], backend=backend)
    exp = dense_masked_attention(*ref[:3], part, ref[3])
    grad = torch.randn(exp.shape, generator=g, dtype=F64)
    out.backward(grad.to(DEVICE, dtype))
    exp.backward(grad)
    assert out.dtype == dtype and ours[3].grad.dtype == bias_dtype and ours[0].grad.dtype == dtype
    assert rel_err(out.cpu(), exp) <= tol
    assert rel_err(ours[3].grad.cpu(), ref[3].grad) <= 2 * max(tol, 1e-3 if bias_dtype == torch.float16 else 0)


def test_bias_without_grad(backend, mode):
    dtype, _ = mode
    g = torch.Generator().manual_seed(15)
    part = random_partition(30, max_size=6, generator=g)
    q = torch.randn(1, 30, 2, 16, generator=g).to(DEVICE, dtype).requires_grad_()
    bias = torch.randn(part.num_parts, part.max_size, part.max_size, generator=g).to(DEVICE, dtype)
    sk.intra_attention(q, q, q, part.to(DEVICE), bias=bias, backend=backend).sum().backward()
    assert q.grad is not None and bias.grad is None and torch.isfinite(q.grad).all()


def test_explicit_backend_says_why_it_cannot_run(backend):
    """An input the named backend does not support raises a ValueError with its reason; one it
    supports runs. Nothing falls back silently."""
    chosen = backends.get(backend)
    part = random_partition(10, max_size=4, generator=torch.Generator().manual_seed(19))
    for dtype in (F64, torch.float32, torch.float16, torch.bfloat16):
        q = torch.randn(1, 10, 2, 16, dtype=dtype, device=DEVICE)
        reason = chosen.supports(q)
        if reason is None:
            assert sk.intra_attention(q, q, q, part.to(DEVICE), backend=backend).dtype == dtype
        else:
            with pytest.raises(ValueError, match=f"backend='{backend}' cannot run this input"):
                sk.intra_attention(q, q, q, part.to(DEVICE), backend=backend)
