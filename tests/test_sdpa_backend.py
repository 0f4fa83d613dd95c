"""What is particular to the sdpa backend (the CPU fast path): its layouts (a view for equal
contiguous runs, packed qkv), the chunked bias gradient, its off-CPU kernel pair, and that
``backend="auto"`` picks it on the CPU. The SPEC 5 checks every backend shares are in
test_conformance.py.

Every case draws fresh random inputs; partitions are ragged with singletons and a giant
subgraph. fp32 within 1e-5 of float64 (gradients 2e-5), bf16/fp16 within 1e-2.
"""

import pytest
import torch

import sba_kernels as sk
from sba_kernels import backends, sdpa_backend
from helpers import (compare_forward_backward, dense_attention, dense_masked_attention, loop_segment_mean,
                     random_partition)

F64 = torch.float64
MODES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)]
MODE_IDS = ["fp32", "bf16", "fp16"]


@pytest.fixture(params=MODES, ids=MODE_IDS)
def mode(request):
    return request.param


@pytest.fixture
def g():
    """A generator with a fresh seed, printed so that a failure can be replayed."""
    gen = torch.Generator()
    print(f"generator seed {gen.seed()}")
    return gen


def _bias(g, kind, heads, partition):
    shape = (partition.num_parts, partition.max_size, partition.max_size)
    return torch.randn(((heads,) if kind == "per_head" else ()) + shape, generator=g)


@pytest.mark.parametrize("bias_kind", [None, "shared", "per_head"])
def test_intra_on_equal_contiguous_runs(bias_kind, g):
    """index == arange(N).view(P, M): the padded batch is a view of the inputs, no mask."""
    part = sk.Partition.from_assignment(torch.arange(96) // 8)
    assert sdpa_backend._layout(part).identity
    H = 3
    inputs = [torch.randn(2, 96, H, 8, generator=g) for _ in range(3)]
    if bias_kind:
        inputs.append(_bias(g, bias_kind, H, part))

    def ours(q, k, v, *bias):
        return sk.intra_attention(q, k, v, part, bias=bias[0] if bias else None, backend="sdpa")

    def ref(q, k, v, *bias):
        return dense_masked_attention(q, k, v, part, bias[0] if bias else None)

    compare_forward_backward(ours, ref, inputs, dtype=torch.float32, tol=1e-5, generator=g)


def test_segment_mean_on_equal_contiguous_runs(mode, g):
    dtype, tol = mode
    part = sk.Partition.from_assignment(torch.arange(120) // 12)
    x = torch.randn(3, 120, 20, generator=g)
    compare_forward_backward(lambda x: sk.segment_mean(x, part, backend="sdpa"),
                             lambda x: loop_segment_mean(x, part), [x], dtype=dtype, tol=tol, generator=g)


@pytest.mark.parametrize("chunk", [1, 100, 2000])
def test_bias_gradient_in_chunks(monkeypatch, chunk, g):
    """With a bias to differentiate, the backward recomputes the probabilities in chunks of
    subgraphs and query rows; any chunk size gives the same numbers. Here (scores per subgraph:
    intra 2 x 15 x 15, inter 2 x 40 x 40) 1 takes one query row at a time, 100 a few rows, and
    2000 four subgraphs at a time (intra) or 25 rows then 15 (inter)."""
    monkeypatch.setattr(sdpa_backend, "_SCORE_CHUNK", chunk)
    part = random_partition(60, max_size=7, giant=15, generator=g)
    intra = [torch.randn(2, 60, 2, 8, generator=g) for _ in range(3)] + [_bias(g, "per_head", 2, part)]
    compare_forward_backward(lambda q, k, v, b: sk.intra_attention(q, k, v, part, bias=b, backend="sdpa"),
                             lambda q, k, v, b: dense_masked_attention(q, k, v, part, b), intra,
                             dtype=torch.float32, tol=1e-5, generator=g)
    inter = [torch.randn(2, 40, 2, 8, generator=g) for _ in range(3)] + [torch.randn(40, 40, generator=g)]
    compare_forward_backward(lambda q, k, v, b: sk.inter_attention(q, k, v, bias=b, backend="sdpa"),
                             lambda q, k, v, b: dense_attention(q, k, v, b), inter,
                             dtype=torch.float32, tol=1e-5, generator=g)


def test_bias_in_padding_slots_is_ignored(g):
    part = random_partition(40, max_size=6, giant=9, generator=g)
    q, k, v = (torch.randn(2, 40, 2, 8, generator=g) for _ in range(3))
    bias = torch.randn(2, part.num_parts, part.max_size, part.max_size, generator=g)
    pad = torch.arange(part.max_size).unsqueeze(0) >= part.lengths.unsqueeze(1)          # [P, M]
    in_padding = (pad.unsqueeze(2) | pad.unsqueeze(1)).expand_as(bias)
    garbage = bias.masked_fill(in_padding, float("nan")).requires_grad_()
    out = sk.intra_attention(q, k, v, part, bias=garbage, backend="sdpa")
    assert torch.equal(out, sk.intra_attention(q, k, v, part, bias=bias, backend="sdpa"))
    out.sum().backward()
    assert torch.isfinite(garbage.grad).all() and not garbage.grad[in_padding].any()


# --------------------------------------------------------------------------- what "auto" picks
def test_auto_picks_sdpa_on_cpu_and_torch_for_float64():
    part = sk.Partition.from_assignment(torch.arange(12) % 4)
    q32 = torch.randn(2, 12, 2, 8)
    assert backends.choose("auto", q32).name == "sdpa"
    assert backends.choose("auto", q32.double()).name == "torch"
    assert backends.choose("auto", q32.bfloat16(), torch.zeros(4, 3, 3)).name == "sdpa"
    assert "sdpa" in sk.available_backends()
    # "auto" gives the sdpa numbers bit for bit on float32, the reference's on float64.
    assert torch.equal(sk.intra_attention(q32, q32, q32, part), sk.intra_attention(q32, q32, q32, part, backend="sdpa"))
    q64 = q32.double()
    assert torch.equal(sk.intra_attention(q64, q64, q64, part), sk.intra_attention(q64, q64, q64, part, backend="torch"))
    x = torch.randn(2, 12, 5)
    assert torch.equal(sk.segment_mean(x, part), sk.segment_mean(x, part, backend="sdpa"))


def test_sbattention_on_auto_runs_the_sdpa_backend(g):
    """The layer a CPU user builds with the default backend gets the sdpa numbers bit for bit."""
    from sba_model import SBAttention

    part = random_partition(80, max_size=10, giant=20, generator=g)
    auto, sdpa = SBAttention(32, 4, part), SBAttention(32, 4, part, backend="sdpa")
    sdpa.load_state_dict(auto.state_dict())
    x = torch.randn(2, 80, 32, generator=g)
    assert torch.equal(auto(x), sdpa(x))


@pytest.mark.parametrize("bias_kind", [None, "per_head"])
def test_other_devices_kernel_pair(monkeypatch, bias_kind, g):
    """Off the CPU the backend runs the public SDPA and recomputes it in the backward; that pair,
    run here on CPU tensors, gives the reference's numbers too."""
    monkeypatch.setattr(sdpa_backend, "_kernels", lambda device: (sdpa_backend._sdpa_forward,
                                                                  sdpa_backend._sdpa_backward))
    part = random_partition(100, max_size=9, giant=30, generator=g)
    inputs = [torch.randn(2, 100, 2, 8, generator=g) for _ in range(3)]
    if bias_kind:
        inputs.append(_bias(g, bias_kind, 2, part))

    def ours(q, k, v, *bias):
        o, z = sk.intra_attention_pooled(q, k, v, part, bias=bias[0] if bias else None, backend="sdpa")
        return torch.cat([o.reshape(-1), z.reshape(-1)])

    def ref(q, k, v, *bias):
        o = dense_masked_attention(q, k, v, part, bias[0] if bias else None)
        return torch.cat([o.reshape(-1), loop_segment_mean(o.reshape(2, 100, 16), part).reshape(-1)])

    compare_forward_backward(ours, ref, inputs, dtype=torch.float32, tol=1e-5, generator=g)


def test_packed_qkv_gathered_once(g):
    """q, k, v unbound from one fused projection are gathered as one tensor: same numbers, bit
    for bit, as contiguous copies; slices that are not laid out that way are not taken for it."""
    part = random_partition(70, max_size=9, giant=20, generator=g)
    qkv = torch.randn(2, 70, 3, 2, 8, generator=g)
    packed = qkv.unbind(2)
    assert sdpa_backend._packed_rows(*packed) is not None
    assert sdpa_backend._packed_rows(packed[1], packed[0], packed[2]) is None       # out of order
    assert sdpa_backend._packed_rows(*torch.randn(2, 70, 2, 3, 8).unbind(3)) is None      # packed per head
    for pooled in (sk.intra_attention, sk.intra_attention_pooled):
        ins = [t.requires_grad_() for t in qkv.clone().unbind(2)]
        copies = [t.detach().contiguous().requires_grad_() for t in packed]
        a, b = pooled(*ins, part, backend="sdpa"), pooled(*copies, part, backend="sdpa")
        assert all(torch.equal(x, y) for x, y in zip(a if pooled is sk.intra_attention_pooled else [a],
                                                     b if pooled is sk.intra_attention_pooled else [b]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's CUDA kernels decide this; the CPU takes any mask dtype")
def test_on_cuda_a_bias_that_would_round_in_the_inputs_dtype_is_refused():
    """SDPA's CUDA kernels add a mask only in the inputs' dtype: an fp32 bias with bf16 inputs
    would be rounded, so the sdpa backend refuses it by name; an fp16 bias with fp32 inputs is
    exact in fp32 and runs."""
    part = sk.Partition.from_assignment(torch.tensor([0, 0, 1, 1, 1])).to("cuda")
    q = torch.randn(1, 5, 2, 16, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(part.num_parts, part.max_size, part.max_size, device="cuda")
    with pytest.raises(ValueError, match="sdpa backend on CUDA adds the bias in the inputs' dtype"):
        sk.intra_attention(q, q, q, part, bias=bias, backend="sdpa")
    out = sk.intra_attention(q.float(), q.float(), q.float(), part, bias=bias.half(), backend="sdpa")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
