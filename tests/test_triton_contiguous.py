"""The contiguous fast path: `Partition.starts`, and the Triton kernels addressing a subgraph's
rows from its first node instead of gathering them through ``index``.

Partitions whose subgraphs are runs of consecutive node ids (the model's node order) must give
the float64 dense reference's numbers through that path, and the checks spy on the launches, so
a dispatch that silently gathered instead fails here rather than passing on the gather's numbers.
"""

from __future__ import annotations

import pytest
import torch

import sba_kernels as sk
from sba_kernels import Partition, triton_backend
from helpers import dense_attention, dense_masked_attention, loop_segment_mean, random_partition, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu     # on a GPU, gpu_check.sh runs these on the device


def test_starts_found_for_runs_of_consecutive_ids_only():
    runs = Partition.from_parts([[5, 6, 7], [0, 1], [2, 3, 4]])           # runs, subgraphs in any order
    assert runs.starts.dtype == torch.int32 and runs.starts.tolist() == [5, 0, 2]
    moved = runs.to("meta")                                              # a copy, on the new device
    assert moved.starts.device.type == "meta" and moved.starts.shape == (3,)
    assert Partition.from_assignment(torch.tensor([0, 0, 1, 1, 1, 2])).starts.tolist() == [0, 2, 5]
    assert Partition.from_parts([[5, 6, 7], [0, 1], [2, 4, 3]]).starts is None      # a run out of order
    assert Partition.from_parts([[5, 6, 7], [0, 2], [1, 3, 4]]).starts is None      # not runs
    assert Partition.from_assignment(torch.tensor([0, 1, 0, 1])).starts is None
    assert Partition.from_parts([[3], [0], [2], [1]]).starts.tolist() == [3, 0, 2, 1]  # singletons are runs
    ragged = random_partition(200, max_size=13, giant=40, generator=torch.Generator().manual_seed(0), contiguous=True)
    first = [nodes[0] for nodes in ragged.parts()]
    assert ragged.starts.tolist() == first and all(n == list(range(n[0], n[0] + len(n))) for n in ragged.parts())


@pytest.fixture
def node_ids(monkeypatch):
    """``(kernel name, Index argument, contiguous argument or None)`` of every launch that reads
    node ids, in order; outputs poisoned (NaN), so an element no program writes shows up."""
    seen = []
    real = triton_backend._launch

    def spy(kernel, grid, *args, **meta):
        named = dict(zip(kernel.arg_names, args))
        if "Index" in named:
            seen.append((kernel.fn.__name__, named["Index"], named.get("contiguous")))
        real(kernel, grid, *args, **meta)

    monkeypatch.setattr(triton_backend, "_launch", spy)
    monkeypatch.setattr(triton_backend, "POISON", True)
    return seen


# (dtype, largest subgraph size, giant subgraph, bias kind, the bias loop forced, tolerance):
# one tile (16 rows) with each bias form, and tiled (the 40-node giant spans several fp32 tiles),
# where the kernels must still get the [P, M] index.
CASES = [
    pytest.param(torch.float32, 11, 0, None, False, 1e-5, id="fp32-one-tile"),
    pytest.param(torch.float32, 11, 0, "per_head", False, 1e-5, id="fp32-one-tile-per-head-bias"),
    pytest.param(torch.float16, 11, 0, "shared", True, 1e-2, id="fp16-one-tile-shared-bias-loop"),
    pytest.param(torch.float32, 11, 40, "shared", False, 1e-5, id="fp32-tiled-shared-bias"),
]


@pytest.mark.parametrize("dtype,max_size,giant,bias_kind,bias_loop,tol", CASES)
def test_contiguous_partitions_take_the_path_and_match_the_reference(node_ids, dtype, max_size, giant, bias_kind,
                                                                      bias_loop, tol):
    g = torch.Generator().manual_seed(max_size + giant)
    N, B, H, d = 150, 2, 2, 16
    part = random_partition(N, max_size=max_size, giant=giant, generator=g, contiguous=True)
    assert part.starts is not None
    P, M = part.num_parts, part.max_size
    ins = [torch.randn(B, N, H, d, generator=g) for _ in range(3)]
    if bias_kind:
        ins.append(torch.randn(((H,) if bias_kind == "per_head" else ()) + (P, M, M), generator=g))
    ours = [t.to(DEVICE, dtype, copy=True).requires_grad_() for t in ins]
    ref = [t.double().requires_grad_() for t in ins]
    dpart = part.to(DEVICE)
    with triton_backend.bias_tuning(min_parts=1, min_pairs=1) if bias_loop else triton_backend.bias_tuning():
        o, z = sk.intra_attention_pooled(*ours[:3], dpart, bias=ours[3] if bias_kind else None, backend="triton")
    o_ref = dense_masked_attention(*ref[:3], part, ref[3] if bias_kind else None)
    z_ref = loop_segment_mean(o_ref.reshape(B, N, H * d), part).reshape(B, P, H, d)
    grads = [torch.randn(o_ref.shape, generator=g, dtype=torch.float64), torch.randn(z_ref.shape, generator=g,
                                                                                      dtype=torch.float64)]
    torch.autograd.backward([o, z], [t.to(DEVICE, dtype) for t in grads])
    torch.autograd.backward([o_ref, z_ref], grads)
    assert rel_err(o.cpu(), o_ref) <= tol and rel_err(z.cpu(), z_ref) <= tol
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert rel_err(a.grad.cpu(), b.grad) <= 2 * tol, f"gradient of input {i}"
    kernels = {name for name, _, _ in node_ids}
    expected = {"attention_fwd" if giant else "attention_fwd_one_tile"}
    expected |= {"attention_bwd_dq", "attention_bwd_dkdv"} if giant else {"attention_bwd_one_tile"}
    if giant and bias_kind:
        expected.add("attention_bwd_dbias")
    assert expected <= kernels, kernels
    for name, ids, contiguous in node_ids:     # the tiled kernels always gather
        if giant:
            assert name not in ("attention_fwd_one_tile", "attention_bwd_one_tile") and contiguous is None, name
            assert ids.shape == (P, M), name
        else:
            assert contiguous == 1 and ids.shape == (P,) and torch.equal(ids.cpu(), part.starts), name


def test_segment_mean_and_inter_attention_take_the_path(node_ids):
    g = torch.Generator().manual_seed(3)
    part = random_partition(120, max_size=9, giant=50, generator=g, contiguous=True)
    x = torch.randn(2, 120, 40, generator=g).to(DEVICE)
    means = sk.segment_mean(x, part.to(DEVICE), backend="triton")
    assert rel_err(means.cpu(), loop_segment_mean(x.cpu(), part)) <= 1e-6
    q, k, v = (torch.randn(2, 70, 2, 16, generator=g) for _ in range(3))     # fp32, 70 tokens: tiled
    out = sk.inter_attention(*(t.to(DEVICE) for t in (q, k, v)), backend="triton")
    assert rel_err(out.cpu(), dense_attention(q.double(), k.double(), v.double())) <= 1e-5
    q, k, v = (torch.randn(2, 60, 2, 16, generator=g) for _ in range(3))     # fp16, 60 tokens: one tile
    out = sk.inter_attention(*(t.to(DEVICE, torch.float16) for t in (q, k, v)), backend="triton")
    assert rel_err(out.cpu(), dense_attention(q.double(), k.double(), v.double())) <= 1e-2
    assert [(name, contiguous) for name, _, contiguous in node_ids] == [
        ("segment_mean_fwd", 1), ("attention_fwd", None), ("attention_fwd_one_tile", 1)]


def test_gathered_partitions_still_gather(node_ids):
    g = torch.Generator().manual_seed(4)
    part = random_partition(90, max_size=9, generator=g)
    assert part.starts is None
    q = torch.randn(1, 90, 2, 16, generator=g)
    out = sk.intra_attention(q.to(DEVICE), q.to(DEVICE), q.to(DEVICE), part.to(DEVICE), backend="triton")
    assert rel_err(out.cpu(), dense_masked_attention(q.double(), q.double(), q.double(), part)) <= 1e-5
    (name, ids, contiguous), = node_ids
    assert contiguous == 0 and ids.shape == (part.num_parts, part.max_size)


def test_a_neighbours_nonfinite_rows_stay_out():
    """A contiguous tile's masked slots address the next subgraph's rows: they must never be
    read as data. Non-finite q, k, v in the subgraph right after a short one leave every other
    subgraph's output and gradients exact."""
    g = torch.Generator().manual_seed(5)
    N = 100
    part = random_partition(N, max_size=11, generator=g, contiguous=True)     # 16-row tiles, fp32
    starts, lengths = part.starts.tolist(), part.lengths.tolist()
    short = next(p for p in range(part.num_parts) if lengths[p] < 11 and starts[p] + lengths[p] < N)
    neighbour = starts.index(starts[short] + lengths[short])       # its tile's masked slots point here
    poisoned = part.parts()[neighbour]
    ins = [torch.randn(1, N, 2, 16, generator=g) for _ in range(3)]
    ref = [t.double().requires_grad_() for t in ins]       # the dense reference itself needs finite rows
    for t, bad in zip(ins, (float("nan"), float("inf"), float("nan"))):
        t[:, poisoned] = bad
    ours = [t.to(DEVICE).requires_grad_() for t in ins]
    out = sk.intra_attention(*ours, part.to(DEVICE), backend="triton")
    exp = dense_masked_attention(*ref, part)
    keep = torch.ones(N, dtype=torch.bool)
    keep[poisoned] = False
    (out[:, keep].sum()).backward()
    (exp[:, keep].sum()).backward()
    assert rel_err(out[:, keep].cpu(), exp[:, keep]) <= 1e-5
    for a, b in zip(ours, ref):
        assert rel_err(a.grad[:, keep].cpu(), b.grad[:, keep]) <= 2e-5
