"""Property-based check of the triton backend over shapes and partitions (hypothesis), and
torch.compile tracing through the registered ops."""

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import sba_kernels as sk
from sba_kernels import triton_backend
from sba_model import SBAttention
from helpers import dense_masked_attention, loop_segment_mean, random_partition, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu     # on a GPU, gpu_check.sh runs these on the device


# No shrinking phase: a failure reports its example at once instead of spending minutes.
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    n=st.integers(1, 110),
    max_size=st.integers(1, 40),
    giant=st.integers(0, 90),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([16, 32]),
    bias_kind=st.sampled_from([None, "shared", "per_head"]),
    scale=st.floats(0.05, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
# Two nodes, nearly one-hot softmax: the q and k gradients vanish but their fp32 rounding does not
# (4.4e-5 absolute, against 2e-5 before the floor below scaled with scale * sqrt(d)).
@example(n=2, max_size=8, giant=31, batch=1, heads=3, head_dim=32, bias_kind="per_head",
         scale=2.7478448516305876, seed=7515)
def test_intra_forward_and_backward_on_any_partition(n, max_size, giant, batch, heads, head_dim, bias_kind,
                                                     scale, seed):
    triton_backend.POISON = True
    try:
        g = torch.Generator().manual_seed(seed)
        part = random_partition(n, max_size=max_size, giant=giant, generator=g)
        ins = [torch.randn(batch, n, heads, head_dim, generator=g, dtype=torch.float64) for _ in range(3)]
        if bias_kind:
            shape = (part.num_parts, part.max_size, part.max_size)
            ins.append(torch.randn(((heads,) if bias_kind == "per_head" else ()) + shape, generator=g,
                                   dtype=torch.float64))
        ours = [t.to(DEVICE, torch.float32).requires_grad_() for t in ins]
        ref = [t.clone().requires_grad_() for t in ins]
        # The pooled op: o and its subgraph means z from the kernel's epilogue, both checked.
        o, z = sk.intra_attention_pooled(*ours[:3], part.to(DEVICE), bias=ours[3] if bias_kind else None,
                                         scale=scale, backend="triton")
        out = torch.cat([o.reshape(-1), z.reshape(-1)])
        o_ref = dense_masked_attention(*ref[:3], part, ref[3] if bias_kind else None, scale=scale)
        z_ref = loop_segment_mean(o_ref.reshape(batch, n, heads * head_dim), part)
        expect = torch.cat([o_ref.reshape(-1), z_ref.reshape(-1)])
        grad = torch.randn(expect.shape, generator=g, dtype=torch.float64)
        out.backward(grad.to(DEVICE, torch.float32))
        expect.backward(grad)
        assert rel_err(out.cpu(), expect) <= 1e-5
        # ds = p * (dp - rowsum(p * dp)) rounds to about eps * |dp| in fp32 however small ds is, and
        # dq, dk carry it times scale * |k| (|k| ~ sqrt(d)): where p is nearly one-hot their true
        # value vanishes and that rounding is what is left, so their floor scales with it.
        floors = [max(1.0, scale * head_dim ** 0.5)] * 2 + [1.0] * (len(ours) - 2)
        for a, b, floor in zip(ours, ref, floors):
            assert rel_err(a.grad.cpu(), b.grad, floor=floor) <= 2e-5
    finally:
        triton_backend.POISON = False


@pytest.mark.parametrize("contiguous", [False, True], ids=["gathered", "contiguous"])
def test_torch_compile_fullgraph_traces_sbattention_forward_and_backward(contiguous):
    torch.manual_seed(0)
    assignment = torch.arange(48) // 8 if contiguous else torch.randint(0, 6, (48,))
    part = sk.Partition.from_assignment(assignment)
    assert (part.starts is not None) == contiguous
    layer = SBAttention(32, 2, part, backend="triton").to(DEVICE)
    x = torch.randn(2, 48, 32, device=DEVICE, requires_grad=True)
    # aot_eager traces forward and backward graphs (no graph breaks allowed with fullgraph)
    # without inductor codegen; on a GPU, inductor compiles them too.
    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    grad_compiled = x.grad.clone()
    x.grad = None
    y_eager = layer(x)
    y_eager.square().sum().backward()
    assert torch.allclose(y, y_eager, atol=1e-5, rtol=1e-5)
    assert torch.allclose(grad_compiled, x.grad, atol=1e-4, rtol=1e-4)
