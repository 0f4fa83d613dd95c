"""Shared test tools: random ragged partitions and an independent dense attention reference.

The dense reference builds the full N x N mask and bias from the partition, the most direct
reading of SPEC section 1, and shares no code with the package's backends.
"""

from __future__ import annotations

import torch

from sba_kernels import Partition


def random_partition(num_nodes: int, *, max_size: int, generator: torch.Generator,
                     giant: int = 0, contiguous: bool = False) -> Partition:
    """Ragged partition of a random node order: sizes drawn from 1..max_size (singletons
    included), plus one ``giant`` subgraph when ``giant > 0``; rows are shuffled. With
    ``contiguous``, of the node order 0..N-1 instead: every subgraph a run of consecutive ids."""
    order = torch.arange(num_nodes) if contiguous else torch.randperm(num_nodes, generator=generator)
    sizes, left = [], num_nodes
    if giant:
        sizes.append(min(giant, left))
        left -= sizes[-1]
    while left:
        s = int(torch.randint(1, max_size + 1, (1,), generator=generator))
        s = min(s, left)
        sizes.append(s)
        left -= s
    if len(sizes) > 1 and 1 not in sizes:          # always exercise a singleton
        sizes[-1] -= 1
        sizes.append(1)
        if sizes[-2] == 0:
            sizes.pop(-2)
    parts, start = [], 0
    for s in sizes:
        parts.append(order[start:start + s].tolist())
        start += s
    rows = torch.randperm(len(parts), generator=generator).tolist()
    return Partition.from_parts([parts[r] for r in rows], num_nodes=num_nodes)


def dense_bias(partition: Partition, bias: torch.Tensor | None, heads: int) -> torch.Tensor:
    """Scatter a ``[P, M, M]`` / ``[H, P, M, M]`` slot bias into a dense ``[H, N, N]`` one."""
    n = partition.num_nodes
    dtype = torch.float64 if bias is None else bias.dtype
    out = torch.zeros(heads, n, n, dtype=dtype)
    if bias is None:
        return out
    b = bias if bias.dim() == 4 else bias.unsqueeze(0).expand(heads, -1, -1, -1)
    for p, nodes in enumerate(partition.parts()):
        idx = torch.tensor(nodes)
        m = len(nodes)
        out[:, idx.unsqueeze(1), idx.unsqueeze(0)] = b[:, p, :m, :m]
    return out


def dense_masked_attention(q, k, v, partition: Partition, bias=None, scale=None):
    """Brute force: full ``[B, H, N, N]`` scores, mask = same subgraph. q, k, v ``[B, N, H, d]``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    a = partition.assignment.cpu()
    same = a.unsqueeze(0) == a.unsqueeze(1)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    scores = scores + dense_bias(partition, bias, q.shape[2]).to(scores)
    scores = scores.masked_fill(~same, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, -1), v)


def dense_attention(q, k, v, bias=None, scale=None):
    """Plain attention, ``[B, P, H, d]``; bias ``[P, P]`` / ``[H, P, P]``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if bias is not None:
        scores = scores + bias
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, -1), v)


def loop_segment_mean(x, partition: Partition):
    """Per-subgraph mean by a Python loop over ``partition.parts()``."""
    return torch.stack([x[:, nodes].mean(1) for nodes in partition.parts()], dim=1)


def compare_forward_backward(fn, ref_fn, inputs, *, dtype, tol, generator, device="cpu") -> None:
    """Forward and backward of ``fn`` on ``inputs`` cast to dtype/device vs ``ref_fn`` in
    float64; asserts output and every gradient within tol (gradients 2 x tol)."""
    ours = [t.to(device=device, dtype=dtype, copy=True).requires_grad_() for t in inputs]
    ref = [t.to(torch.float64, copy=True).requires_grad_() for t in inputs]
    out = fn(*ours)
    expect = ref_fn(*ref)
    grad_out = torch.randn(expect.shape, generator=generator, dtype=torch.float64)
    out.backward(grad_out.to(device=device, dtype=dtype))
    expect.backward(grad_out)
    assert out.dtype == dtype and out.device.type == device
    assert rel_err(out.cpu(), expect) <= tol, "output"
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert rel_err(a.grad.cpu(), b.grad) <= 2 * tol, f"gradient of input {i}"


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-300) -> float:
    """``||out - ref|| / max(||ref||, floor)`` in float64; inf if out has a NaN.

    ``floor`` matters where the true value can be exactly zero (the q and k gradients of a
    partition made only of singletons), so that rounding noise is not divided by zero.
    """
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(floor))
