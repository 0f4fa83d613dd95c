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
