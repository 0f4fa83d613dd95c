"""The triton backend's one-tile kernels (`attention_fwd_one_tile`, `attention_bwd_one_tile`):
which launches run, and their numbers against the float64 dense reference.

Subgraphs that fit one tile (`triton_backend.one_tile_blocks`) take one forward and one fused
backward launch; larger ones the tiled kernels. The checks spy on the launches, so a dispatch
that silently fell back to the tiled kernels fails here rather than passing on their numbers.
"""

from __future__ import annotations

import pytest
import torch

import sba_kernels as sk
from sba_kernels import triton_backend
from helpers import dense_masked_attention, loop_segment_mean, random_partition, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu     # on a GPU, gpu_check.sh runs these on the device
# (dtype, head dim, largest subgraph, tolerance): the widest one-tile subgraph each takes
# (`triton_backend.ONE_TILE_CAP`); 24 pads its columns to 32, 128 takes at most 32 rows.
CASES = [(torch.float32, 32, 16, 1e-5), (torch.float32, 24, 16, 1e-5), (torch.float16, 32, 64, 1e-2),
         (torch.float16, 24, 32, 1e-2), (torch.float16, 128, 32, 1e-2)]


@pytest.fixture
def launched(monkeypatch):
    """Names of the kernels the triton backend launches, in order; outputs poisoned (NaN)."""
    names: list[str] = []
    real = triton_backend._launch

    def spy(kernel, grid, *args, **meta):
        names.append(kernel.fn.__name__)
        real(kernel, grid, *args, **meta)

    monkeypatch.setattr(triton_backend, "_launch", spy)
    monkeypatch.setattr(triton_backend, "POISON", True)
    return names


def test_one_tile_blocks_follow_the_cap_table():
    fp16, fp32 = torch.float16, torch.float32
    assert triton_backend.one_tile_blocks(64, 64, fp16).m == 64
    assert triton_backend.one_tile_blocks(33, 64, fp16).m == 64
    assert triton_backend.one_tile_blocks(9, 64, fp16).m == 16           # tl.dot wants >= 16 a side
    assert triton_backend.one_tile_blocks(65, 64, fp16) is None          # two tiles: the tiled kernels
    assert triton_backend.one_tile_blocks(64, 128, fp16) is None         # head dim 128: 32 rows at most
    assert triton_backend.one_tile_blocks(32, 128, fp16).m == 32
    assert triton_backend.one_tile_blocks(16, 32, fp32).m == 16
    assert triton_backend.one_tile_blocks(17, 32, fp32) is None
    assert triton_backend.one_tile_blocks(16, 48, fp16) is None          # a head dim never compiled


def _combinations():
    """Every case with every bias kind, one program per (batch, head); the bias loop (one
    program per bias tile) only where there is a bias, at head dim 32 (its code is dim-free)."""
    ids = ["fp32", "fp32-d24", "fp16", "fp16-d24", "fp16-d128"]
    for case, name in zip(CASES, ids):
        for bias_kind in (None, "shared", "per_head", "shared-frozen", "per_head-frozen"):
            yield pytest.param(*case, bias_kind, False, id=f"{name}-{bias_kind}-pair-programs")
            if bias_kind is not None and case[1] == 32:
                yield pytest.param(*case, bias_kind, True, id=f"{name}-{bias_kind}-bias-loop")


@pytest.mark.parametrize("dtype,head_dim,max_size,tol,bias_kind,bias_loop", list(_combinations()))
def test_one_tile_kernels_match_the_reference(launched, monkeypatch, dtype, head_dim, max_size, tol, bias_kind,
                                              bias_loop):
    # The bias loop (one program per bias tile) starts at BIAS_LOOP_MIN_PARTS subgraphs and
    # BIAS_LOOP_MIN_PAIRS pairs per bias tile: 1 and 1 force it.
    monkeypatch.setattr(triton_backend, "BIAS_LOOP_MIN_PARTS", 1 if bias_loop else 10**9)
    monkeypatch.setattr(triton_backend, "BIAS_LOOP_MIN_PAIRS", 1)
    seed = torch.randint(0, 2**31 - 1, (1,)).item()
    g = torch.Generator().manual_seed(seed)
    frozen = bias_kind is not None and bias_kind.endswith("-frozen")     # a bias without a gradient
    bias_kind = bias_kind and bias_kind.removesuffix("-frozen")
    n, batch, heads = 3 * max_size, 2, 3
    part = random_partition(n, max_size=max_size, giant=max_size, generator=g)
    assert part.max_size == max_size
    ins = [torch.randn(batch, n, heads, head_dim, generator=g, dtype=torch.float64) for _ in range(3)]
    if bias_kind:
        shape = ((heads,) if bias_kind == "per_head" else ()) + (part.num_parts, max_size, max_size)
        ins.append(torch.randn(shape, generator=g, dtype=torch.float64))
    # q, k, v as strided views of one [B, N, H, 3d] tensor, as a fused QKV projection gives them
    qkv = torch.cat(ins[:3], dim=3).to(DEVICE, dtype)
    ours = [qkv[..., i * head_dim:(i + 1) * head_dim].detach().requires_grad_() for i in range(3)]
    ours += [t.to(DEVICE, dtype).requires_grad_(not frozen) for t in ins[3:]]
    ref = [t.clone().requires_grad_(i < 3 or not frozen) for i, t in enumerate(ins)]

    o, z = sk.intra_attention_pooled(*ours[:3], part.to(DEVICE), bias=ours[3] if bias_kind else None,
                                     backend="triton")
    o_ref = dense_masked_attention(*ref[:3], part, ref[3] if bias_kind else None)
    z_ref = loop_segment_mean(o_ref.reshape(batch, n, heads * head_dim), part).view(batch, -1, heads, head_dim)
    go = torch.randn(o_ref.shape, generator=g, dtype=torch.float64)
    gz = torch.randn(z_ref.shape, generator=g, dtype=torch.float64)
    (o.double().cpu() * go).sum().add((z.double().cpu() * gz).sum()).backward()
    (o_ref * go).sum().add((z_ref * gz).sum()).backward()

    assert [k for k in launched if k.startswith("attention")] == ["attention_fwd_one_tile", "attention_bwd_one_tile"]
    assert rel_err(o.cpu(), o_ref) <= tol, f"seed {seed}"
    assert rel_err(z.cpu(), z_ref) <= tol, f"seed {seed}"
    for a, b in zip(ours, ref):
        assert (a.grad is None) == (b.grad is None) == (frozen and a is ours[-1] and bias_kind is not None)
        if b.grad is not None:
            assert rel_err(a.grad.cpu(), b.grad, floor=1.0) <= 2 * tol, f"seed {seed}"


@pytest.mark.parametrize("bias_kind", ["shared", "per_head"])
def test_bias_gradient_is_deterministic(launched, bias_kind):
    """One program owns each bias tile and sums over batch and heads in a fixed order."""
    g = torch.Generator().manual_seed(5)
    part = random_partition(40, max_size=16, giant=16, generator=g)
    q, k, v = (torch.randn(3, 40, 2, 16, generator=g, device="cpu").to(DEVICE) for _ in range(3))
    shape = ((2,) if bias_kind == "per_head" else ()) + (part.num_parts, 16, 16)
    grads = []
    for _ in range(2):
        bias = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(DEVICE).requires_grad_()
        sk.intra_attention(q, k, v, part.to(DEVICE), bias=bias, backend="triton").sum().backward()
        grads.append(bias.grad)
    assert "attention_bwd_one_tile" in launched
    assert torch.equal(grads[0], grads[1])


def test_a_subgraph_over_the_tile_takes_the_tiled_kernels(launched):
    g = torch.Generator().manual_seed(3)
    part = random_partition(60, max_size=17, giant=17, generator=g)          # fp32 one-tile cap is 16
    q, k, v = (torch.randn(1, 60, 1, 32, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    sk.intra_attention(q, k, v, part.to(DEVICE), backend="triton").sum().backward()
    assert [k for k in launched if k.startswith("attention")] == [
        "attention_fwd", "attention_bwd_delta", "attention_bwd_dq", "attention_bwd_dkdv"]
