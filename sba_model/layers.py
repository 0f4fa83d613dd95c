"""SBA layers: intra-subgraph attention, inter-subgraph attention, the drop-in `SBAttention`
and the pre-norm `SBABlock` of S2Transformer.

All layers take node features ``[B, N, D]`` and hold their `Partition`, which follows the
module across ``.to(device)`` / ``.cuda()``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

import sba_kernels as sk
from sba_kernels import Partition

from .adjacency import to_csr

__all__ = ["IntraAttention", "InterAttention", "SBAttention", "SBABlock", "LocalTokens"]


def _head_dim(embed_dim: int, num_heads: int) -> int:
    if num_heads < 1 or embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
    return embed_dim // num_heads


def subgraph_blocks(adjacency, partition: Partition) -> torch.Tensor:
    """Each subgraph's block of the weighted adjacency, in slot order: float32 ``[P, M, M]``,
    diagonal 1 on real slots, 0 on padding."""
    a = to_csr(adjacency).tolil()
    a.setdiag(1.0)
    a = a.tocsr()
    out = np.zeros((partition.num_parts, partition.max_size, partition.max_size), dtype=np.float32)
    for p, nodes in enumerate(partition.parts()):
        out[p, : len(nodes), : len(nodes)] = a[nodes][:, nodes].toarray()
    return torch.from_numpy(out)


class LocalTokens:
    """How an `SBABlock` reaches the pooled tokens of all P subgraphs: in one process, they are
    all here, so both steps are the identity. A spatial shard replaces it (see
    `sba_model.distributed.TokenGather`) to gather the tokens of every rank."""

    def gather(self, z: torch.Tensor) -> torch.Tensor:
        """This process's tokens ``[B, P_local, D]`` -> all tokens ``[B, P, D]``."""
        return z

    def own(self, z: torch.Tensor) -> torch.Tensor:
        """All tokens ``[B, P, D]`` -> the rows of this process's subgraphs ``[B, P_local, D]``."""
        return z


class _HoldsPartition(nn.Module):
    """Keeps ``self.partition`` on the module's device: ``.to()``/``.cuda()`` move it too.

    The partition's ``assignment`` is built here, eagerly, so that a torch.compile trace of
    ``forward`` only reads it (building it is data-dependent indexing).
    """

    def _hold(self, partition: Partition) -> None:
        if not isinstance(partition, Partition):
            raise TypeError(f"partition must be a sba_kernels.Partition, got {type(partition).__name__}")
        partition.assignment  # built now, only read later
        self.partition = partition

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        target = fn(self.partition.index[:0]).device    # an empty slice: where fn sends tensors, no copy
        self.partition = self.partition.to(target)
        return out


class IntraAttention(_HoldsPartition):
    """Multi-head attention inside each subgraph: ``[B, N, D] -> [B, N, D]``.

    With ``adjacency``, adds S2Transformer's graph bias ``bias[p, i, j] = w_i * A_p[i, j]``
    (``A_p`` the subgraph's adjacency block with unit diagonal, ``w`` one learnable scalar per
    node, initialised to 0 so training starts from plain attention). ``first_node`` is the
    global id of the partition's node 0 in ``node_weight`` (nonzero on a spatial shard).
    """

    def __init__(self, embed_dim: int, num_heads: int, partition: Partition, *, adjacency=None,
                 backend: str = "auto"):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, _head_dim(embed_dim, num_heads)
        self._hold(partition)
        self.backend = backend
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        if adjacency is not None:
            self.register_buffer("blocks", subgraph_blocks(adjacency, partition), persistent=False)
            self.node_weight = nn.Parameter(torch.zeros(partition.num_nodes))
        else:
            self.blocks, self.node_weight = None, None
        self.first_node = 0

    def graph_bias(self) -> Optional[torch.Tensor]:
        """``[P, M, M]`` or None."""
        if self.blocks is None:
            return None
        w = self.node_weight[self.first_node + self.partition.index.long().clamp_min(0)]       # [P, M]
        return w.unsqueeze(-1) * self.blocks

    def _qkv_bias(self, x: torch.Tensor):
        """q, k, v ``[B, N, H, d]`` and the graph bias (or None) in their dtype."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        bias = self.graph_bias()
        return q, k, v, None if bias is None else bias.to(q.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v, bias = self._qkv_bias(x)
        o = sk.intra_attention(q, k, v, self.partition, bias=bias, backend=self.backend)
        return self.proj(o.flatten(2))

    def forward_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(x)`` ``[B, N, D]`` and its subgraph means ``[B, P, D]``.

        The means come from the attention kernel (`sba_kernels.intra_attention_pooled`) and
        go through the output projection after pooling, which is exact since the projection
        is affine: no pass over the ``[B, N, D]`` output to pool it.
        """
        q, k, v, bias = self._qkv_bias(x)
        o, z = sk.intra_attention_pooled(q, k, v, self.partition, bias=bias, backend=self.backend)
        return self.proj(o.flatten(2)), self.proj(z.flatten(2))


class InterAttention(nn.Module):
    """Multi-head dense attention among pooled subgraph tokens: ``[B, P, D] -> [B, P, D]``."""

    def __init__(self, embed_dim: int, num_heads: int, *, backend: str = "auto"):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, _head_dim(embed_dim, num_heads)
        self.backend = backend
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, P, D = z.shape
        q, k, v = self.qkv(z).view(B, P, 3, self.num_heads, self.head_dim).unbind(2)
        return self.proj(sk.inter_attention(q, k, v, backend=self.backend).reshape(B, P, D))


class SBAttention(_HoldsPartition):
    """Spatial Balance Attention, the drop-in layer: ``forward(x [B, N, D]) -> [B, N, D]``.

    ``h = IntraAttn(x)``; each subgraph's mean of ``h`` attends to every other subgraph's;
    the result is broadcast back to the subgraph's nodes and added: ``out = h + g[assignment]``.
    Cost is linear in N for a fixed subgraph size.

    Args:
        embed_dim: D. num_heads: H (D divisible by H).
        partition: a `Partition` of the N nodes (e.g. from `sba_model.partition_graph`).
        dropout: dropout on the layer's output.
        backend: kernel backend for the ops (``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``).
        adjacency: optional graph; adds the learnable graph bias to intra attention.

    Example:
        >>> part = sba_model.partition_graph(adj, num_parts=64)
        >>> layer = SBAttention(128, 8, part)
        >>> y = layer(torch.randn(4, part.num_nodes, 128))
    """

    def __init__(self, embed_dim: int, num_heads: int, partition: Partition, *, dropout: float = 0.0,
                 backend: str = "auto", adjacency=None):
        super().__init__()
        self._hold(partition)
        self.intra = IntraAttention(embed_dim, num_heads, partition, adjacency=adjacency, backend=backend)
        self.inter = InterAttention(embed_dim, num_heads, backend=backend)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, z = self.intra.forward_pooled(x)          # z = segment mean of h, fused
        g = self.inter(z)
        return self.dropout(h + g[:, self.partition.assignment])


def _mlp(dim: int, ratio: float, dropout: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class SBABlock(_HoldsPartition):
    """The pre-norm SBA block (S2Transformer)::

        h = x + IntraAttn(LN(x))
        h = h + MLP(LN(h))
        z = masked_mean(h)                          # [B, P, D]
        z = z + InterAttn(LN(z));  z = z + MLP(LN(z))
        out = h + ReLU(W_node h + W_sub z[assignment])

    ``inter=False`` drops the inter-subgraph path (``out = h``), for the ablation.
    ``tokens`` (a `LocalTokens`) gathers the pooled tokens before InterAttn and keeps this
    process's rows after it; a spatial shard swaps in one that talks to the other ranks.
    """

    def __init__(self, dim: int, num_heads: int, partition: Partition, *, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, backend: str = "auto", adjacency=None, inter: bool = True):
        super().__init__()
        self._hold(partition)
        self.backend = backend
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.intra = IntraAttention(dim, num_heads, partition, adjacency=adjacency, backend=backend)
        self.mlp = _mlp(dim, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)
        self.has_inter = inter
        if inter:
            self.norm_z1, self.norm_z2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.inter = InterAttention(dim, num_heads, backend=backend)
            self.mlp_z = _mlp(dim, mlp_ratio, dropout)
            self.node_proj = nn.Linear(dim, dim)
            self.sub_proj = nn.Linear(dim, dim, bias=False)
        self.tokens = LocalTokens()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.drop(self.intra(self.norm1(x)))
        h = h + self.drop(self.mlp(self.norm2(h)))
        if not self.has_inter:
            return h
        z = self.tokens.gather(sk.segment_mean(h, self.partition, backend=self.backend))
        z = self.tokens.own(z + self.drop(self.inter(self.norm_z1(z))))     # the rest is row-wise
        z = z + self.drop(self.mlp_z(self.norm_z2(z)))
        return h + torch.relu(self.node_proj(h) + self.sub_proj(z)[:, self.partition.assignment])
