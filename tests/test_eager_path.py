"""The kernel backends' eager path (`custom_ops._EagerAttention`, `_EagerSegmentMean`): eager
calls skip torch.library's dispatch, and give the same numbers and gradients as the ``sba::``
custom ops that torch.compile traces."""

from __future__ import annotations

import pytest
import torch

import sba_kernels as sk
from sba_kernels import custom_ops
from helpers import random_partition

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu     # on a GPU, gpu_check.sh runs these on the device


def _forward_backward(per_head_bias: bool):
    """Pooled intra attention with a bias, segment mean and inter attention, backward through all:
    (outputs, gradients of q, k, v and the bias)."""
    g = torch.Generator().manual_seed(21)
    part = random_partition(37, max_size=7, generator=g).to(DEVICE)
    q, k, v = (torch.randn(2, 37, 2, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    shape = (2, part.num_parts, part.max_size, part.max_size) if per_head_bias else \
        (part.num_parts, part.max_size, part.max_size)
    bias = torch.randn(shape, generator=g).to(DEVICE).requires_grad_()
    o, z = sk.intra_attention_pooled(q, k, v, part, bias=bias, backend="triton")
    m = sk.segment_mean(q.flatten(2), part, backend="triton")
    y = sk.inter_attention(z, z, z, backend="triton")
    loss = (o * 1.5).sum() + (m ** 2).sum() + (y * z).sum()
    grads = torch.autograd.grad(loss, (q, k, v, bias))
    return (o, z, m, y), grads


@pytest.mark.parametrize("per_head_bias", [False, True])
def test_eager_path_matches_the_custom_ops(monkeypatch, per_head_bias):
    if sk.backends.get("triton").unavailable(torch.device(DEVICE)):
        pytest.skip("triton backend unavailable here")
    ops_called = []
    for name in ("attention_fwd", "attention_bwd", "segment_mean_fwd", "segment_mean_bwd"):
        op = getattr(custom_ops, name)
        monkeypatch.setattr(custom_ops, name, lambda *a, _op=op, _n=name: ops_called.append(_n) or _op(*a))
    eager_out, eager_grads = _forward_backward(per_head_bias)
    assert ops_called == []                                   # eager: no custom op dispatch

    monkeypatch.setattr(custom_ops, "_eager", lambda *tensors: False)
    op_out, op_grads = _forward_backward(per_head_bias)
    assert {"attention_fwd", "attention_bwd", "segment_mean_fwd", "segment_mean_bwd"} <= set(ops_called)
    for a, b in zip(eager_out + eager_grads, op_out + op_grads):
        assert torch.equal(a, b)
