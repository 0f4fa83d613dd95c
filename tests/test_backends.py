"""The backend registry: what "auto" picks, what naming a backend does, and registration."""

import pytest
import torch

import sba_kernels as sk
from sba_kernels import backends


def _inputs(dtype):
    part = sk.Partition.from_assignment(torch.tensor([0, 0, 1, 1, 1]))
    return torch.randn(1, 5, 2, 16, dtype=dtype), part


def test_auto_picks_the_first_backend_for_the_device_that_supports_the_input():
    q, _ = _inputs(torch.float32)
    expected = next(n for n in backends.names()
                    if "cpu" in backends.get(n).auto_devices and backends.get(n).supports(q) is None)
    assert backends.choose("auto", q).name == expected
    assert backends.choose("auto", q.double()).name == "torch"       # float64: the reference only
    assert "triton" not in [backends.choose("auto", q.to(t)).name for t in (torch.float32, torch.float16)]


def test_auto_says_why_each_backend_was_passed_by():
    """On a device no backend is auto for, every backend gets a reason (the ones that supported
    the input read "None" before)."""
    q = torch.zeros(1, 5, 2, 16, device="meta")
    with pytest.raises(ValueError, match="no registered backend runs") as err:
        backends.choose("auto", q)
    assert "None" not in str(err.value) and "torch: auto picks it for ('cpu', 'cuda') tensors only" in str(err.value)


def test_unknown_and_missing_backends_say_why():
    q, part = _inputs(torch.float32)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        sk.intra_attention(q, q, q, part, backend="tpu")
    with pytest.raises(TypeError, match="backend must be a str"):
        sk.intra_attention(q, q, q, part, backend=None)
    backends.register("broken", "sba_kernels.no_such_module", before="torch")
    try:
        assert "broken" in backends.names() and "broken" not in sk.available_backends()
        with pytest.raises(ValueError, match="broken.*could not be imported"):
            sk.intra_attention(q, q, q, part, backend="broken")
        assert backends.choose("auto", q).name != "broken"           # passed by, no exception, no ban
        assert sk.intra_attention(q, q, q, part).shape == q.shape
    finally:
        backends.unregister("broken")
    assert "broken" not in backends.names()


def test_register_places_a_backend_in_the_order_and_checks_its_arguments():
    order = backends.names()
    backends.register("later", "sba_kernels.reference", before=order[0])
    try:
        assert backends.names() == ["later"] + order
        assert backends.get("later").name == "torch"        # the module's BACKEND
    finally:
        backends.unregister("later")
    assert backends.names() == order
    with pytest.raises(ValueError, match="name must be"):
        backends.register("auto", "sba_kernels.reference")
    with pytest.raises(ValueError, match="before must name"):
        backends.register("x", "sba_kernels.reference", before="nope")


def test_kernel_backends_refuse_more_batch_x_head_pairs_than_a_cuda_grid_axis_holds():
    """The attention launches put (batch, head) pairs, and segment_mean batch rows, on the grid's
    second axis, which CUDA caps at 65535: past it the launch itself would fail. Views with a zero
    batch stride stand for the big batch (nothing is allocated or run)."""
    from sba_kernels.custom_ops import KernelBackend

    part = sk.Partition.from_assignment(torch.tensor([0, 0, 1, 1, 1]))
    fits, over = (torch.zeros(1, 5, 2, 16).expand(b, 5, 2, 16) for b in (32767, 32768))
    rows_over = torch.zeros(1, 5, 32).expand(65536, 5, 32)           # segment_mean's [B, N, C]
    for name in ("triton", "cuda"):
        backend = backends.get(name)
        assert isinstance(backend, KernelBackend)
        assert "65535" not in str(backend.supports(fits))
        assert "batch x heads = 65536 on an axis CUDA caps at 65535" in backend.supports(over)
        assert "the batch = 65536" in backend.supports(rows_over)
        assert backend.supports(rows_over[:65535]) is None or "65535" not in backend.supports(rows_over[:65535])
    with pytest.raises(ValueError, match="backend='triton' cannot run this input: .*split the batch"):
        sk.intra_attention(over, over, over, part, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' cannot run this input: .*split the batch"):
        sk.segment_mean(rows_over, part, backend="triton")



PART6 = sk.Partition.from_assignment(torch.tensor([0, 0, 0, 1, 1, 2]))


def _penalty_gradient(attend, dtype=torch.float32):
    """d/dq of ||d loss / dq||^2, loss = <attend(q, k, v), w> + 0.01 ||q||^2: a gradient
    penalty, which needs the attention's backward to be differentiable."""
    g = torch.Generator().manual_seed(5)
    q0, k, v, w = (torch.randn(1, 6, 1, 16, generator=g, dtype=dtype) for _ in range(4))
    q = q0.clone().requires_grad_()
    loss = (attend(q, k, v) * w).sum() + 0.01 * (q ** 2).sum()
    gq, = torch.autograd.grad(loss, q, create_graph=True)
    return torch.autograd.grad(gq.pow(2).sum(), q)[0]


def test_double_backward_is_exact_on_torch_and_refused_by_name_elsewhere():
    """Second-order gradients: the torch backend's pass gradgradcheck and equal those through a
    dense float64 masked softmax (`helpers`); the fused backwards are not differentiable and say
    so, rather than hand back gradients missing their second-order terms (relative error 0.998
    before they refused)."""
    from helpers import dense_masked_attention

    inputs = [torch.randn(1, 6, 1, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradgradcheck(lambda q, k, v: sk.intra_attention(q, k, v, PART6, backend="torch"), inputs)
    torch.testing.assert_close(
        _penalty_gradient(lambda q, k, v: sk.intra_attention(q, k, v, PART6, backend="torch"), torch.float64),
        _penalty_gradient(lambda q, k, v: dense_masked_attention(q, k, v, PART6), torch.float64))
    for name in [n for n in ("sdpa", "triton") if backends.get(n).unavailable(torch.device("cpu")) is None]:
        with pytest.raises(NotImplementedError, match=f"the {name} backend's attention has no double backward"):
            _penalty_gradient(lambda q, k, v: sk.intra_attention(q, k, v, PART6, backend=name))
        with pytest.raises(NotImplementedError, match="no double backward"):
            _penalty_gradient(lambda q, k, v: sk.inter_attention(q, k, v, backend=name))


def test_segment_mean_double_backward_keeps_the_graph():
    """segment_mean is linear: its backward through the kernels, run under create_graph=True,
    must stay differentiable in dz (d/dx of ||d/dx ||mean(x)||^2||^2 against the torch backend's)."""
    def second(backend):
        x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float32).requires_grad_()
        gx, = torch.autograd.grad(sk.segment_mean(x, PART6, backend=backend).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), x)[0]

    expected = second("torch")
    assert expected.abs().sum() > 0
    for name in [n for n in ("triton", "sdpa") if backends.get(n).unavailable(torch.device("cpu")) is None]:
        torch.testing.assert_close(second(name), expected)
