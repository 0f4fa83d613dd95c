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


def _forward_backward(per_head_bias: bool, bias_parameter: bool = False):
    """Pooled intra attention with a bias (an ``nn.Parameter`` with ``bias_parameter``), segment
    mean and inter attention, backward through all: (outputs, gradients of q, k, v and the bias)."""
    g = torch.Generator().manual_seed(21)
    part = random_partition(37, max_size=7, generator=g).to(DEVICE)
    q, k, v = (torch.randn(2, 37, 2, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    shape = (2, part.num_parts, part.max_size, part.max_size) if per_head_bias else \
        (part.num_parts, part.max_size, part.max_size)
    bias = torch.randn(shape, generator=g).to(DEVICE)
    bias = torch.nn.Parameter(bias) if bias_parameter else bias.requires_grad_()
    o, z = sk.intra_attention_pooled(q, k, v, part, bias=bias, backend="triton")
    m = sk.segment_mean(q.flatten(2), part, backend="triton")
    y = sk.inter_attention(z, z, z, backend="triton")
    loss = (o * 1.5).sum() + (m ** 2).sum() + (y * z).sum()
    grads = torch.autograd.grad(loss, (q, k, v, bias))
    return (o, z, m, y), grads


@pytest.mark.parametrize("per_head_bias, bias_parameter", [(False, False), (True, False), (False, True)])
def test_eager_path_matches_the_custom_ops(monkeypatch, per_head_bias, bias_parameter):
    if sk.backends.get("triton").unavailable(torch.device(DEVICE)):
        pytest.skip("triton backend unavailable here")
    ops_called = []
    for name in ("attention_fwd", "attention_bwd", "segment_mean_fwd", "segment_mean_bwd"):
        op = getattr(custom_ops, name)
        monkeypatch.setattr(custom_ops, name, lambda *a, _op=op, _n=name: ops_called.append(_n) or _op(*a))
    eager_out, eager_grads = _forward_backward(per_head_bias, bias_parameter)
    assert ops_called == []                                   # eager: no custom op dispatch

    monkeypatch.setattr(custom_ops, "_eager", lambda *tensors: False)
    op_out, op_grads = _forward_backward(per_head_bias, bias_parameter)
    assert {"attention_fwd", "attention_bwd", "segment_mean_fwd", "segment_mean_bwd"} <= set(ops_called)
    for a, b in zip(eager_out + eager_grads, op_out + op_grads):
        assert torch.equal(a, b)


class _ZeroFills(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten calls that fill a tensor with zeros (how autograd materializes the
    gradient of an output nobody used)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.zeros, torch.ops.aten.zero_, torch.ops.aten.fill_,
                                   torch.ops.aten.zeros_like):
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["eager", "custom ops"])
def test_unused_outputs_get_no_zero_gradients(monkeypatch, path):
    """A backward through o alone (pooled or not) or z alone fills no zeros for lse or the
    output left unused (`custom_ops._attention_setup`), and its gradients are those of the
    same loss through the pooled attention with both outputs used."""
    if sk.backends.get("triton").unavailable(torch.device(DEVICE)):
        pytest.skip("triton backend unavailable here")
    if path == "custom ops":
        monkeypatch.setattr(custom_ops, "_eager", lambda *tensors: False)
    g = torch.Generator().manual_seed(22)
    part = random_partition(41, max_size=8, generator=g).to(DEVICE)
    q, k, v = (torch.randn(2, 41, 2, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    w_o, w_z = torch.randn(2, 41, 2, 16, generator=g).to(DEVICE), torch.randn(2, part.num_parts, 2, 16, generator=g).to(DEVICE)

    def grads(loss_of):
        loss = loss_of()
        with _ZeroFills() as fills:
            out = torch.autograd.grad(loss, (q, k, v))
        assert fills.seen == []
        return out

    plain = grads(lambda: (sk.intra_attention(q, k, v, part, backend="triton") * w_o).sum())
    o_only = grads(lambda: (sk.intra_attention_pooled(q, k, v, part, backend="triton")[0] * w_o).sum())
    z_only = grads(lambda: (sk.intra_attention_pooled(q, k, v, part, backend="triton")[1] * w_z).sum())
    both = grads(lambda: sum((t * w).sum() for t, w in zip(sk.intra_attention_pooled(q, k, v, part, backend="triton"),
                                                          (w_o, w_z))))
    # z.sum()'s gradient reaches the backward as an expanded tensor, every stride 0
    z_sum = grads(lambda: sk.intra_attention_pooled(q, k, v, part, backend="triton")[1].sum())
    both_sum = grads(lambda: sum(f(t) for t, f in zip(sk.intra_attention_pooled(q, k, v, part, backend="triton"),
                                                      (lambda o: (o * w_o).sum(), torch.sum))))
    for a, b, c, total, c_sum, total_sum in zip(plain, o_only, z_only, both, z_sum, both_sum):
        assert torch.equal(a, b)
        torch.testing.assert_close(b + c, total, rtol=1e-5, atol=1e-5)     # the gradient is linear in the loss
        torch.testing.assert_close(b + c_sum, total_sum, rtol=1e-5, atol=1e-5)
