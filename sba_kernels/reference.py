"""The ``"torch"`` backend (`TorchBackend`): plain PyTorch, any device, any float dtype (float64
included).

This is the reference every other backend is checked against, so it favours the obvious
formulation over speed. Autograd comes from torch itself. Memory stays linear in N:

* nothing N x N is ever built;
* intra attention groups subgraphs by size (power-of-two buckets) and pads each bucket only to
  its own widest subgraph, so the score tensors total at most ``2 * B * H * N * M`` elements
  even for a partition with one giant subgraph and many singletons;
* inter attention processes queries in chunks, so P = 16k pooled tokens stay affordable.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backends import Backend
from .partition import Partition

# Inter attention: queries per chunk. Bounds scores to B*H*_QUERY_CHUNK*P elements at a time.
_QUERY_CHUNK = 1024


def _size_buckets(partition: Partition) -> list[tuple[torch.Tensor, int]]:
    """Subgraphs grouped by ``ceil(log2(n_p))``: a list of (part ids [Pb] long, width m)."""

    def build():
        lengths = partition.lengths.long()
        level = torch.ceil(torch.log2(lengths.double())).long()
        buckets = []
        for lv in torch.unique(level).tolist():
            parts = torch.nonzero(level == lv).squeeze(1)
            buckets.append((parts, int(lengths[parts].max())))
        return buckets

    return partition.cached("size_buckets", build)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision contract: scores, softmax and accumulation in fp32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _masked_attention(q, k, v, valid_keys, bias, scale):
    """q, k, v ``[B, G, m, H, d]``; valid_keys bool ``[G, m]``; bias None or broadcastable to
    ``[B, H, G, m, m]``. Returns ``[B, G, m, H, d]`` in q's dtype."""
    acc = _compute_dtype(q.dtype)
    scores = torch.einsum("bgihd,bgjhd->bhgij", q.to(acc), k.to(acc)) * scale
    if bias is not None:
        scores = scores + bias.to(acc)
    scores = scores.masked_fill(~valid_keys[None, None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhgij,bgjhd->bgihd", probs, v.to(acc)).to(q.dtype)


def intra_attention(q, k, v, partition: Partition, bias: Optional[torch.Tensor], scale: float):
    """Attention inside each subgraph. q, k, v ``[B, N, H, d]``; bias ``[P, M, M]``,
    ``[H, P, M, M]`` or None. Returns ``[B, N, H, d]`` in node order."""
    outs, nodes = [], []
    for parts, m in _size_buckets(partition):
        idx = partition.index[parts, :m].long()               # [G, m], -1 in padding
        valid = idx >= 0
        safe = idx.clamp_min(0)
        b = None
        if bias is not None:       # entries with a padding slot are ignored, even -inf or NaN ones
            b = bias[..., parts, :m, :m].masked_fill(~(valid[:, :, None] & valid[:, None, :]), 0)  # [G,m,m] / [H,G,m,m]
            b = b.unsqueeze(0) if b.dim() == 4 else b.unsqueeze(0).unsqueeze(0)
        o = _masked_attention(q[:, safe], k[:, safe], v[:, safe], valid, b, scale)
        outs.append(o[:, valid])                              # [B, n_bucket, H, d]
        nodes.append(idx[valid])
    nodes = torch.cat(nodes)
    return torch.zeros_like(q).index_copy(1, nodes, torch.cat(outs, dim=1))


def intra_attention_pooled(q, k, v, partition: Partition, bias: Optional[torch.Tensor], scale: float):
    """`intra_attention` and the subgraph means of its output: ``[B, N, H, d]``, ``[B, P, H, d]``."""
    o = intra_attention(q, k, v, partition, bias, scale)
    B, N, H, d = o.shape
    return o, segment_mean(o.reshape(B, N, H * d), partition).view(B, -1, H, d)


def segment_mean(x, partition: Partition):
    """x ``[B, N, C]`` -> ``[B, P, C]``: the mean over each subgraph's real nodes."""
    sums = x.new_zeros(x.shape[0], partition.num_parts, x.shape[2])
    sums = sums.index_add(1, partition.assignment, x)
    return sums / partition.lengths.to(x.dtype).view(1, -1, 1)


def inter_attention(q, k, v, bias: Optional[torch.Tensor], scale: float):
    """Dense attention among pooled tokens. q, k, v ``[B, P, H, d]``; bias ``[P, P]``,
    ``[H, P, P]`` or None. Returns ``[B, P, H, d]``."""
    P, acc = q.shape[1], _compute_dtype(q.dtype)
    kt = k.to(acc).permute(0, 2, 3, 1)                        # [B, H, d, P]
    vt = v.to(acc).transpose(1, 2)                            # [B, H, P, d]
    outs = []
    for start in range(0, P, _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, P)
        scores = torch.matmul(q[:, start:stop].to(acc).transpose(1, 2), kt) * scale   # [B, H, c, P]
        if bias is not None:
            scores = scores + bias[..., start:stop, :].to(acc)
        outs.append(torch.matmul(torch.softmax(scores, dim=-1), vt))                  # [B, H, c, d]
    return torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)


class TorchBackend(Backend):
    """The reference: plain PyTorch, any device and float dtype; autograd from torch itself."""

    name = "torch"
    auto_devices = ("cpu", "cuda")
    intra_attention = staticmethod(intra_attention)
    intra_attention_pooled = staticmethod(intra_attention_pooled)
    segment_mean = staticmethod(segment_mean)
    inter_attention = staticmethod(inter_attention)


BACKEND = TorchBackend()
