import numpy as np
"""The torch backend against independent brute-force formulas, in float64."""

import pytest
import torch

import sba_kernels as sk
from helpers import dense_attention, dense_masked_attention, loop_segment_mean, random_partition, rel_err

F64 = torch.float64


def _qkv(g, B, N, H, d, dtype=F64, scale=1.0):
    return [torch.randn(B, N, H, d, generator=g, dtype=dtype) * scale for _ in range(3)]


@pytest.mark.parametrize("bias_kind", [None, "shared", "per_head"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_intra_matches_dense_masked_attention(seed, bias_kind):
    g = torch.Generator().manual_seed(seed)
    part = random_partition(61, max_size=9, giant=23, generator=g)   # M = 23: not a power of 2
    B, H, d = 2, 3, 8
    q, k, v = _qkv(g, B, 61, H, d)
    bias = None
    if bias_kind:
        shape = (part.num_parts, part.max_size, part.max_size)
        bias = torch.randn((H,) + shape if bias_kind == "per_head" else shape, generator=g, dtype=F64)
    out = sk.intra_attention(q, k, v, part, bias=bias, scale=0.7, backend="torch")
    ref = dense_masked_attention(q, k, v, part, bias, scale=0.7)
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("fill", [1e9, float("-inf"), float("nan")])
@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
def test_intra_ignores_bias_in_padding_slots(backend, fill):
    """Bias entries with a padding slot (query or key) change nothing: not the output, not the
    gradients, whatever they hold (the torch backend's padding query rows once turned a -inf
    there into NaN gradients for real nodes)."""
    if sk.backends.get(backend).unavailable(torch.device("cpu")):
        pytest.skip(f"{backend} does not run here")
    dtype = F64 if backend == "torch" else torch.float32
    g = torch.Generator().manual_seed(3)
    part = random_partition(20, max_size=6, generator=g)
    q, k, v = (t.to(dtype).requires_grad_() for t in _qkv(g, 1, 20, 2, 4))
    bias = torch.randn(part.num_parts, part.max_size, part.max_size, generator=g, dtype=dtype)
    slots = torch.arange(part.max_size)
    pad = slots.unsqueeze(0) >= part.lengths.unsqueeze(1)           # [P, M]
    pair_pad = pad.unsqueeze(2) | pad.unsqueeze(1)
    assert pair_pad.any()
    padded = bias.masked_fill(pair_pad, fill)
    w = torch.randn(1, 20, 2, 4, generator=g, dtype=dtype)
    results = []
    for b in (bias, padded):
        b = b.clone().requires_grad_()
        o = sk.intra_attention(q, k, v, part, bias=b, backend=backend)
        results.append((o, *torch.autograd.grad((o * w).sum(), (q, k, v, b))))
    (o_a, *grads_a), (o_b, *grads_b) = results
    assert torch.equal(o_a, o_b)
    for a, b in zip(grads_a[:3], grads_b[:3]):
        assert torch.equal(a, b)
    assert torch.equal(grads_b[3][~pair_pad], grads_a[3][~pair_pad])
    assert not grads_b[3][pair_pad].any()


def test_large_logits_stay_finite():
    g = torch.Generator().manual_seed(4)
    part = random_partition(40, max_size=7, generator=g)
    q, k, v = _qkv(g, 1, 40, 2, 8, scale=10.0)
    out = sk.intra_attention(q, k, v, part, scale=100.0, backend="torch")
    assert torch.isfinite(out).all()
    assert rel_err(out, dense_masked_attention(q, k, v, part, scale=100.0)) < 1e-10


def test_segment_mean_matches_loop():
    g = torch.Generator().manual_seed(5)
    part = random_partition(37, max_size=8, giant=12, generator=g)
    x = torch.randn(3, 37, 5, generator=g, dtype=F64)
    assert rel_err(sk.segment_mean(x, part, backend="torch"), loop_segment_mean(x, part)) < 1e-14


def test_intra_pooled_is_attention_then_mean():
    g = torch.Generator().manual_seed(9)
    part = random_partition(41, max_size=7, giant=10, generator=g)
    q, k, v = (t.requires_grad_() for t in _qkv(g, 2, 41, 3, 4))
    o, z = sk.intra_attention_pooled(q, k, v, part, backend="torch")
    expect = dense_masked_attention(q, k, v, part)
    assert rel_err(o, expect) < 1e-12
    assert rel_err(z.reshape(2, -1, 12), loop_segment_mean(expect.reshape(2, 41, 12), part)) < 1e-12
    assert torch.autograd.gradcheck(lambda *a: sk.intra_attention_pooled(*a, part, backend="torch"), (q, k, v))


@pytest.mark.parametrize("bias_shape", [None, "PP", "HPP"])
def test_inter_matches_dense_attention(bias_shape):
    g = torch.Generator().manual_seed(6)
    B, P, H, d = 2, 1500, 2, 4          # P > the reference's query chunk
    q, k, v = _qkv(g, B, P, H, d)
    bias = None if bias_shape is None else torch.randn(((H,) if bias_shape == "HPP" else ()) + (P, P), generator=g, dtype=F64)
    out = sk.inter_attention(q, k, v, bias=bias, backend="torch")
    assert rel_err(out, dense_attention(q, k, v, bias)) < 1e-12


def test_gradcheck_all_three_ops():
    g = torch.Generator().manual_seed(7)
    part = random_partition(13, max_size=5, giant=6, generator=g)
    q, k, v = (t.requires_grad_() for t in _qkv(g, 2, 13, 2, 3))
    bias = torch.randn(2, part.num_parts, part.max_size, part.max_size, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: sk.intra_attention(*a[:3], part, bias=a[3], backend="torch"), (q, k, v, bias))
    x = torch.randn(2, 13, 4, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sk.segment_mean(x, part, backend="torch"), (x,))
    qi, ki, vi = (t.requires_grad_() for t in _qkv(g, 2, 5, 2, 3))
    bi = torch.randn(2, 5, 5, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: sk.inter_attention(*a[:3], bias=a[3], backend="torch"), (qi, ki, vi, bi))


def test_permutation_equivariance():
    g = torch.Generator().manual_seed(8)
    N = 45
    part = random_partition(N, max_size=8, generator=g)
    q, k, v = _qkv(g, 2, N, 2, 4)
    bias = torch.randn(part.num_parts, part.max_size, part.max_size, generator=g, dtype=F64)
    perm = torch.randperm(N, generator=g)              # new node j is old node perm[j]
    inv = torch.argsort(perm)
    relabelled = sk.Partition(torch.where(part.index >= 0, inv[part.index.long().clamp_min(0)], -1), part.lengths)
    out = sk.intra_attention(q, k, v, part, bias=bias, backend="torch")
    out_p = sk.intra_attention(q[:, perm], k[:, perm], v[:, perm], relabelled, bias=bias, backend="torch")
    assert torch.allclose(out_p, out[:, perm], atol=1e-12)
    x = torch.randn(2, N, 3, generator=g, dtype=F64)
    assert torch.allclose(sk.segment_mean(x[:, perm], relabelled), sk.segment_mean(x, part), atol=1e-14)


def test_dtypes_and_noncontiguous_inputs():
    g = torch.Generator().manual_seed(9)
    part = random_partition(30, max_size=6, generator=g)
    qkv = torch.randn(2, 30, 3, 4, 8, generator=g, dtype=F64)    # as a fused projection gives it
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous() and q.stride(-1) == 1
    ref = dense_masked_attention(q, k, v, part)
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        out = sk.intra_attention(q.to(dtype), k.to(dtype), v.to(dtype), part, backend="torch")
        assert out.dtype == dtype and rel_err(out, ref) < tol


# --------------------------------------------------------------------------- bad input
def _good(N=10):
    part = sk.Partition.from_assignment(torch.arange(N) % 3)
    q = torch.randn(1, N, 2, 4)
    return q, part


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda q, p: sk.intra_attention(q[0], q, q, p), ValueError, "q must have rank 4"),
        (lambda q, p: sk.intra_attention(q, q[:, :5], q, p), ValueError, "k must have the shape"),
        (lambda q, p: sk.intra_attention(q, q.double(), q, p), TypeError, "k must have the dtype"),
        (lambda q, p: sk.intra_attention(q, q, q.to("meta"), p), ValueError, "v must be on the device"),
        (lambda q, p: sk.intra_attention(q.long(), q.long(), q.long(), p), TypeError, "q must be a floating"),
        (lambda q, p: sk.intra_attention(q, q, q, "p"), TypeError, "partition must be"),
        (lambda q, p: sk.intra_attention(q[:, :9], q[:, :9], q[:, :9], p), ValueError, "partition covers 10"),
        (lambda q, p: sk.intra_attention(q, q, q, p.to("meta")), ValueError, "partition is on"),
        (lambda q, p: sk.intra_attention(q, q, q, p, bias=torch.zeros(3, 4, 3)), ValueError, "bias must have shape"),
        (lambda q, p: sk.intra_attention(q, q, q, p, bias=[[1.0]]), TypeError, "bias must be"),
        (lambda q, p: sk.intra_attention(q, q, q, p, scale="x"), TypeError, "scale"),
        (lambda q, p: sk.intra_attention(q, q, q, p, scale=float("nan")), ValueError, "scale"),
        (lambda q, p: sk.intra_attention(q, q, q, p, scale=True), TypeError, "scale"),
        (lambda q, p: sk.intra_attention(q, q, q, p, backend="tpu"), ValueError, "backend"),
        (lambda q, p: sk.intra_attention_pooled(q, q, q, p, bias=torch.zeros(3, 4, 3)), ValueError,
         "bias must have shape"),
        (lambda q, p: sk.intra_attention_pooled(q, q, q[:, :, :1], p), ValueError, "v must have the shape"),
        (lambda q, p: sk.segment_mean(q, p), ValueError, "x must have rank 3"),
        (lambda q, p: sk.segment_mean(q[:, :4, 0], p), ValueError, "partition covers"),
        (lambda q, p: sk.inter_attention(q, q, q, bias=torch.zeros(10, 9)), ValueError, "bias must have shape"),
        (lambda q, p: sk.inter_attention(q, q, q[..., :2]), ValueError, "v must have the shape"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(call, exc, match):
    q, part = _good()
    with pytest.raises(exc, match=match):
        call(q, part)


def test_numpy_scalars_are_scales():
    q, part = _good()
    assert torch.equal(sk.intra_attention(q, q, q, part, scale=np.float32(0.5)),
                       sk.intra_attention(q, q, q, part, scale=0.5))


def test_available_backends_lists_torch():
    assert "torch" in sk.available_backends()
