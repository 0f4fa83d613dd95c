"""The triton backend inside a CUDA graph: forward and backward captured once, replayed on new
inputs. At small N an eager call is bound by the host (Python, autograd, launches;
`bench/results/gpu-h200/README.md`), and a training loop takes the host out by capturing its
step (`torch.cuda.graphs`); `bench/scaling.py --cuda-graph` times calls that way
(`measure.cuda_graph_replay`). A capture fails on a host synchronisation or a copy from
pageable memory inside an op; a replay must give the eager call's numbers (bit for bit where
the same kernels run on the same inputs without atomics), and those the dense reference's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import sba_kernels as sk
from helpers import dense_masked_attention, random_partition
from sba_model import SBAttention, knn_adjacency

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from measure import cuda_graph_replay  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")]


def _refill(static: list[torch.Tensor], generator: torch.Generator) -> None:
    """New N(0, 1) values in the captured inputs, in place (the graph reads these buffers)."""
    with torch.no_grad():
        for t in static:
            t.copy_(torch.randn(t.shape, generator=generator).to(t))


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "gathered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooled_attention_with_a_bias_replays_the_eager_numbers(contiguous, dtype):
    g = torch.Generator().manual_seed(31)
    part = random_partition(300, max_size=24, generator=g, contiguous=contiguous).to("cuda")
    assert (part.starts is not None) == contiguous
    q, k, v = (torch.empty(2, 300, 4, 32, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.empty(part.num_parts, part.max_size, part.max_size, device="cuda", dtype=dtype, requires_grad=True)
    w_o, w_z = torch.empty(2, 300, 4, 32, device="cuda", dtype=dtype), \
        torch.empty(2, part.num_parts, 4, 32, device="cuda", dtype=dtype)
    inputs = [q, k, v, bias, w_o, w_z]
    _refill(inputs, g)
    out = {}

    def step():
        for t in (q, k, v, bias):
            t.grad = None
        o, z = sk.intra_attention_pooled(q, k, v, part, bias=bias, backend="triton")
        ((o * w_o).sum() + (z * w_z).sum()).backward()
        out.update(o=o, z=z)

    step()                                     # compile the kernels outside the capture
    replay = cuda_graph_replay(step)
    captured = [out["o"], out["z"], q.grad, k.grad, v.grad, bias.grad]
    for _ in range(2):                         # new inputs each time: the graph must read them
        _refill(inputs, g)
        replay()
        replayed = [t.clone() for t in captured]
        step()                                 # eager, same inputs
        eager = [out["o"], out["z"], q.grad, k.grad, v.grad, bias.grad]
        for name, a, b in zip(("o", "z", "dq", "dk", "dv", "dbias"), replayed, eager):
            assert torch.equal(a, b), name
    expected = dense_masked_attention(q.detach().double().cpu(), k.detach().double().cpu(),
                                      v.detach().double().cpu(), part.to("cpu"), bias.detach().double().cpu())
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(replayed[0].double().cpu(), expected, atol=tol, rtol=tol)


def test_sba_layer_training_step_replays_the_eager_numbers():
    """The layer as a model holds it (projections, pooled intra attention with the graph bias,
    inter attention): a captured step's output and parameter gradients are an eager step's. To
    rounding, not bit for bit: the broadcast back to the nodes (`index_select`) has an
    ``index_add`` backward, whose CUDA atomics sum in no fixed order."""
    torch.manual_seed(32)
    g = torch.Generator().manual_seed(32)
    part = random_partition(500, max_size=32, generator=g, contiguous=True).to("cuda")
    adjacency = knn_adjacency(torch.rand(500, 2, generator=g).numpy(), k=6)
    layer = SBAttention(64, 4, part, backend="triton", adjacency=adjacency).to("cuda")
    assert layer.intra.graph_bias() is not None
    x = torch.empty(2, 500, 64, device="cuda", requires_grad=True)
    w = torch.empty(2, 500, 64, device="cuda")
    _refill([x, w], g)
    params = [p for p in layer.parameters() if p.requires_grad]
    out = {}

    def step():
        for t in [x, *params]:
            t.grad = None
        y = layer(x)
        (y * w).sum().backward()
        out["y"] = y

    step()
    replay = cuda_graph_replay(step)
    captured = [out["y"], x.grad, *(p.grad for p in params)]
    _refill([x, w], g)
    replay()
    replayed = [t.clone() for t in captured]
    step()
    eager = [out["y"], x.grad, *(p.grad for p in params)]
    assert len(replayed) == len(eager) >= 4
    for i, (a, b) in enumerate(zip(replayed, eager)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"output or gradient {i}")
