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


class _Launches(list):
    """Names of launched kernels, in order; ``metas`` their constexprs and options."""

    metas: list[dict]


@pytest.fixture
def launched(monkeypatch):
    """The kernels the triton backend launches (`_Launches`); outputs poisoned (NaN)."""
    names = _Launches()
    names.metas = []
    real = triton_backend._launch

    def spy(kernel, grid, *args, **meta):
        names.append(kernel.fn.__name__)
        names.metas.append(meta)
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

    # z's gradient joins dO's inside the backward (POOLED), but for the bias-gradient loop, which
    # takes dO with z's share added by a segment-mean backward first
    bias_grad = bias_kind is not None and not frozen
    assert list(launched) == ["attention_fwd_one_tile"] + ["segment_mean_bwd"] * bias_grad + ["attention_bwd_one_tile"]
    assert launched.metas[-1]["POOLED"] is not bias_grad
    assert launched.metas[launched.index("attention_fwd_one_tile")]["BIAS_LOOP"] == bias_loop
    # the bias-gradient loop runs without FMA contraction (its registers: triton_kernels._pair_grads)
    assert launched.metas[launched.index("attention_bwd_one_tile")].get("enable_fp_fusion", True) == (not bias_grad)
    assert rel_err(o.cpu(), o_ref) <= tol, f"seed {seed}"
    assert rel_err(z.cpu(), z_ref) <= tol, f"seed {seed}"
    for a, b in zip(ours, ref):
        assert (a.grad is None) == (b.grad is None) == (frozen and a is ours[-1] and bias_kind is not None)
        if b.grad is not None:
            assert rel_err(a.grad.cpu(), b.grad, floor=1.0) <= 2 * tol, f"seed {seed}"


@pytest.mark.parametrize("bias_kind,batch,loop", [("shared", 1, True), ("per_head", 1, False), ("per_head", 4, True),
                                                  (None, 4, False)])
def test_default_bias_loop_rule_and_launch_options(monkeypatch, bias_kind, batch, loop):
    """The defaults the H200 timings chose (`triton_backend.uses_bias_loop`): from 1024 subgraphs
    the one-tile forward loops over a bias tile when 4 or more (batch, head) pairs read it (a
    shared bias: B x H; a per-head one: B), capped at 168 registers; else one program per pair.
    The bias-gradient backward at 64 rows runs `BIAS_GRAD_OPTIONS_64_ROWS`. Launches recorded,
    not run, at the shape they were timed at (`triton_backend.TIMED_SHAPE`: bf16, d = 64, 64 rows)."""
    P, M, H, d = 1024, 64, 8, 64
    q = torch.zeros(batch, P * M, H, d, dtype=torch.bfloat16)
    index = torch.arange(P * M, dtype=torch.int32).view(P, M)
    lengths = torch.full((P,), M, dtype=torch.int32)
    bias = None if bias_kind is None else torch.zeros(((H,) if bias_kind == "per_head" else ()) + (P, M, M),
                                                      dtype=torch.bfloat16)
    monkeypatch.setattr(triton_backend, "LAUNCH_RECORDER", [])
    o, lse, _ = triton_backend.attention_forward(q, q, q, index, lengths, bias, 0.125, False)
    triton_backend.attention_backward(q, q, q, q, o, lse, index, lengths, bias, 0.125, need_dbias=bias is not None)
    (fwd_kernel, fwd_grid, _, fwd), (bwd_kernel, bwd_grid, _, bwd) = triton_backend.LAUNCH_RECORDER
    assert (fwd_kernel.fn.__name__, bwd_kernel.fn.__name__) == ("attention_fwd_one_tile", "attention_bwd_one_tile")
    assert fwd["BIAS_LOOP"] == loop
    assert fwd_grid == ((P, 1 if bias_kind == "shared" else H) if loop else (P, batch * H))
    assert fwd["maxnreg"] == (168 if loop else 255)
    with_grad = {"shared": (P, 1), "per_head": (P, H), None: (P, batch * H)}[bias_kind]
    assert bwd_grid == with_grad and bwd["BIAS_GRAD"] == (bias is not None)
    assert bwd["num_warps"] == (triton_backend.BIAS_GRAD_OPTIONS_64_ROWS.get("num_warps", 4) if bias is not None else 4)
    with triton_backend.bias_tuning(min_parts=P + 1):          # too few subgraphs: never the loop
        triton_backend.attention_forward(q, q, q, index, lengths, bias, 0.125, False)
    assert triton_backend.LAUNCH_RECORDER[-1][3]["BIAS_LOOP"] is False
    if bias is not None:             # bench/bias_options.py's alternatives reach the launch, and only inside
        with triton_backend.bias_tuning(min_parts=1, min_pairs=1, loop_forward_options={"maxnreg": 200},
                                        grad_options_64_rows={"num_warps": 8}):
            o, lse, _ = triton_backend.attention_forward(q, q, q, index, lengths, bias, 0.125, False)
            triton_backend.attention_backward(q, q, q, q, o, lse, index, lengths, bias, 0.125, need_dbias=True)
        (_, _, _, fwd), (_, _, _, bwd) = triton_backend.LAUNCH_RECORDER[-2:]
        assert fwd["BIAS_LOOP"] and fwd["maxnreg"] == 200 and bwd["num_warps"] == 8
    assert (triton_backend.BIAS_LOOP_MIN_PARTS, triton_backend.BIAS_LOOP_MIN_PAIRS) == (1024, 4)   # restored
    assert (triton_backend.BIAS_LOOP_FORWARD_OPTIONS, triton_backend.BIAS_GRAD_OPTIONS_64_ROWS) == (
        {"num_warps": 4, "maxnreg": 168}, {"num_warps": 4, "maxnreg": 255})


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
