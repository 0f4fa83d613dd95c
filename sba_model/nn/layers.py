"""SBA layers: intra-subgraph attention, inter-subgraph attention, the drop-in `SBAttention`
and the pre-norm `SBABlock` of S2Transformer.

All layers take node features ``[B, N, D]`` and hold their `Partition` (and the inter
attention its token levels), which follow the module across ``.to(device)`` / ``.cuda()``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

import sba_kernels as sk
from sba_kernels import Partition

from ..graph.adjacency import to_csr
from ..graph.partitioning import INTER_THRESHOLD, positive_int, token_levels

__all__ = ["IntraAttention", "InterAttention", "SBAttention", "SBABlock", "LocalTokens"]


def _check_nodes(x, partition: Partition, width: int) -> None:
    """``x`` must be ``[B, N, D]`` floating point, N the partition's nodes and D the layer's
    width: said here, by name, rather than by a matmul or a reshape deep inside."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or tuple(x.shape[1:]) != (partition.num_nodes, width):
        raise ValueError(f"x must be [B, N={partition.num_nodes}, D={width}], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")


def _head_dim(embed_dim: int, num_heads: int) -> int:
    if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
    return embed_dim // num_heads


def subgraph_blocks(adjacency, partition: Partition) -> torch.Tensor:
    """Each subgraph's block of the weighted adjacency, in slot order: float32 ``[P, M, M]``,
    diagonal 1 on real slots, 0 on padding.

    One scatter of the edges that stay inside a subgraph (no loop over subgraphs): O(E) work
    besides zeroing the ``P * M * M`` output. The output is zeroed and filled by torch: a
    sequential memset then a parallel scatter, 3x faster than numpy's lazily zeroed pages
    faulted in at random (the 4.6 GB blocks of a 976-subgraph layer at N = 1e6).
    """
    a = to_csr(adjacency).tocoo()             # no diagonal: it is set to 1 below
    if a.shape[0] != partition.num_nodes:
        raise ValueError(f"adjacency has {a.shape[0]} nodes but partition has num_nodes={partition.num_nodes}")
    index = partition.index.cpu().numpy()
    M = partition.max_size
    part, slot = np.nonzero(index >= 0)       # [real slots]: subgraph and slot of index[part, slot]
    node = index[part, slot]
    part_of, slot_of = np.empty_like(node, dtype=np.int64), np.empty_like(node, dtype=np.int64)
    part_of[node], slot_of[node] = part, slot
    inside = part_of[a.row] == part_of[a.col]
    row, col = a.row[inside], a.col[inside]
    # flat offsets into [P, M, M]: the edges inside subgraphs, then the diagonal of real slots
    flat = np.concatenate([(part_of[row] * M + slot_of[row]) * M + slot_of[col], (part * M + slot) * M + slot])
    weight = np.concatenate([a.data[inside], np.ones(part.size)]).astype(np.float32)
    out = torch.zeros(partition.num_parts * M * M, dtype=torch.float32)
    out[torch.from_numpy(flat)] = torch.from_numpy(weight)
    return out.view(partition.num_parts, M, M)


def _built(partition: Partition, name: str) -> Partition:
    if not isinstance(partition, Partition):
        raise TypeError(f"{name} must be a sba_kernels.Partition, got {type(partition).__name__}")
    partition.assignment  # built now, only read later
    return partition


class LocalTokens:
    """How an `SBABlock` reaches the pooled tokens of all P subgraphs: in one process, they are
    all here, so both steps are the identity. A spatial shard replaces it (see
    `sba_model.nn.distributed.TokenGather`) to gather the tokens of every rank."""

    def gather(self, z: torch.Tensor) -> torch.Tensor:
        """This process's tokens ``[B, P_local, D]`` -> all tokens ``[B, P, D]``."""
        return z

    def own(self, z: torch.Tensor) -> torch.Tensor:
        """All tokens ``[B, P, D]`` -> the rows of this process's subgraphs ``[B, P_local, D]``."""
        return z


class _HoldsPartition(nn.Module):
    """Keeps the module's `Partition`s on its device: ``.to()``/``.cuda()`` move them too.

    ``_held`` names the attributes holding one `Partition` or a list of them. Each partition's
    ``assignment`` is built here, eagerly, so that a torch.compile trace of ``forward`` only
    reads it (building it is data-dependent indexing).
    """

    _held = ("partition",)

    def _hold(self, partition: Partition) -> None:
        self.partition = _built(partition, "partition")

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)

        def move(p: Partition) -> Partition:   # an empty slice: where fn sends tensors, no copy
            return p.to(fn(p.index[:0]).device)

        for name in self._held:
            held = getattr(self, name)
            setattr(self, name, [move(p) for p in held] if isinstance(held, list) else move(held))
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
        _check_nodes(x, self.partition, self.qkv.in_features)
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


class InterAttention(_HoldsPartition):
    """Multi-head attention among pooled subgraph tokens: ``[B, P, D] -> [B, P, D]``.

    Without ``levels`` it is dense attention among the P tokens: O(P^2) time. With ``levels``
    (`Partition`s of the tokens, from `sba_model.token_levels` or `sba_model.model_partitions`),
    it is SBA one level up, recursively: the tokens are split into groups by ``levels[0]``,
    attend inside their group, and each group's mean token attends (by the same rule, over
    ``levels[1:]``) among the groups; the group's result is added to its tokens::

        attend(q, k, v, level) = inter_attention(q, k, v)                       if level is the top
                               = intra_attention(q, k, v, groups)
                                 + attend(mean q, mean k, mean v, level + 1)[group of each token]

    (the mean of the projected tokens is the projection of the mean token, the projections being
    affine, so a group token is the group's pooled token, as in `SBAttention`). Time is
    O(P * g) per level for groups of about g tokens plus O(T^2) at a top level of T tokens,
    i.e. linear in P. It approximates dense attention: a token sees its own group's tokens one
    by one and the others only through group means. The levels add no parameters.
    """

    _held = ("levels",)

    def __init__(self, embed_dim: int, num_heads: int, *, backend: str = "auto", levels: Sequence[Partition] = ()):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, _head_dim(embed_dim, num_heads)
        self.backend = backend
        self.levels = [_built(p, f"levels[{i}]") for i, p in enumerate(levels)]
        for i, (low, high) in enumerate(zip(self.levels, self.levels[1:])):
            if high.num_nodes != low.num_parts:
                raise ValueError(f"levels[{i + 1}] must group the {low.num_parts} groups of levels[{i}], "
                                 f"got num_nodes={high.num_nodes}")
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z ``[B, P, D]`` pooled tokens -> ``[B, P, D]``."""
        if not isinstance(z, torch.Tensor) or z.dim() != 3 or z.shape[2] != self.qkv.in_features:
            raise ValueError(f"z must be a [B, P, D={self.qkv.in_features}] tensor, got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        B, P, D = z.shape
        if self.levels and P != self.levels[0].num_nodes:
            raise ValueError(f"z must be [B, P={self.levels[0].num_nodes}, D] to match levels[0], got {tuple(z.shape)}")
        return self.proj(self._attend(self.qkv(z), 0).reshape(B, P, D))

    def _attend(self, qkv: torch.Tensor, level: int) -> torch.Tensor:
        """Packed ``qkv`` ``[B, T, 3 * D]`` of level ``level``'s T tokens -> ``[B, T, H, d]``."""
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        if level == len(self.levels):
            return sk.inter_attention(q, k, v, backend=self.backend)
        groups = self.levels[level]
        local = sk.intra_attention(q, k, v, groups, backend=self.backend)
        far = self._attend(sk.segment_mean(qkv, groups, backend=self.backend), level + 1)
        return far.index_select(1, groups.assignment).add_(local)     # as in SBAttention.forward


def _resolve_levels(partition: Partition, levels: Optional[Sequence[Partition]], threshold: int,
                    adjacency=None) -> list[Partition]:
    """The levels of the hierarchical inter attention over ``partition``'s P pooled tokens.

    ``levels=None``: none when ``P <= threshold`` (dense, exactly as without a hierarchy), else
    `sba_model.token_levels` on ``adjacency``. Given levels are checked: they must start at the
    P tokens, chain (each groups the previous level's groups), leave a top level of at most
    ``threshold`` tokens, and every level must hold more than ``threshold`` tokens, so that at or
    below the threshold the attention stays dense.
    """
    threshold = positive_int(threshold, "inter_threshold")
    P = partition.num_parts
    if levels is None:
        if P <= threshold:
            return []
        if adjacency is None:
            raise ValueError(f"adjacency (or inter_levels) is needed: the partition has P={P} subgraphs, more than "
                             f"inter_threshold={threshold}, and its pooled tokens are grouped on the graph")
        return token_levels(adjacency, partition, threshold=threshold)
    levels = list(levels)
    tokens = P
    for i, level in enumerate(levels):
        _built(level, f"inter_levels[{i}]")
        if level.num_nodes != tokens:
            raise ValueError(f"inter_levels[{i}] must group {tokens} tokens, got num_nodes={level.num_nodes}")
        if tokens <= threshold:
            raise ValueError(f"inter_levels[{i}] groups {tokens} tokens, not more than inter_threshold={threshold}: "
                             "at or below the threshold the inter attention is dense")
        tokens = level.num_parts
    if tokens > threshold:
        raise ValueError(f"inter_levels leave {tokens} tokens at the top, more than inter_threshold={threshold}")
    return levels


class SBAttention(_HoldsPartition):
    """Spatial Balance Attention, the drop-in layer: ``forward(x [B, N, D]) -> [B, N, D]``.

    ``h = IntraAttn(x)``; each subgraph's mean of ``h`` attends to every other subgraph's;
    the result is broadcast back to the subgraph's nodes and added: ``out = h + g[assignment]``.

    Cost, for N nodes in P subgraphs of at most M nodes: the intra attention is O(N * M); the
    inter attention is dense, O(P^2), while ``P <= inter_threshold``, and hierarchical above it
    (see `InterAttention`: O(P * g) per level, at most ``inter_threshold^2`` at the top), so the
    layer is linear in N for a fixed M at every N. Above the threshold the inter attention is an
    approximation of the dense one (a subgraph sees far subgraphs through group means); at or
    below it the layer is exactly the dense SBA layer.

    Args:
        embed_dim: D. num_heads: H (D divisible by H).
        partition: a `Partition` of the N nodes (e.g. from `sba_model.partition_graph`).
        dropout: dropout on the layer's output.
        backend: kernel backend for the ops (``"auto"``, ``"torch"``, ``"sdpa"``, ``"triton"``, ``"cuda"``).
        adjacency: optional graph; adds the learnable graph bias to intra attention, and groups
            the pooled tokens when ``P > inter_threshold`` and ``inter_levels`` is not given.
        inter_threshold: the most pooled tokens attended densely.
        inter_levels: the hierarchy's token levels (`sba_model.token_levels`,
            `sba_model.model_partitions`); by default built from ``adjacency`` when needed.

    Example:
        >>> part = sba_model.partition_graph(adj, num_parts=64)
        >>> layer = SBAttention(128, 8, part)
        >>> y = layer(torch.randn(4, part.num_nodes, 128))
    """

    def __init__(self, embed_dim: int, num_heads: int, partition: Partition, *, dropout: float = 0.0,
                 backend: str = "auto", adjacency=None, inter_threshold: int = INTER_THRESHOLD,
                 inter_levels: Optional[Sequence[Partition]] = None):
        super().__init__()
        self._hold(partition)
        adjacency = None if adjacency is None else to_csr(adjacency)     # once, for the intra and inter parts
        self.intra = IntraAttention(embed_dim, num_heads, partition, adjacency=adjacency, backend=backend)
        self.inter = InterAttention(embed_dim, num_heads, backend=backend,
                                    levels=_resolve_levels(partition, inter_levels, inter_threshold, adjacency))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, z = self.intra.forward_pooled(x)          # z = segment mean of h, fused
        g = self.inter(z)
        # g[assignment] + h, adding h into the gathered rows: one [B, N, D] tensor, not two, and
        # index_select's backward is an index_add (advanced indexing's is a slower index_put).
        return self.dropout(g.index_select(1, self.partition.assignment).add_(h))


def _mlp(dim: int, ratio: float, dropout: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class SBABlock(_HoldsPartition):
    """The pre-norm SBA block (S2Transformer)::

        h = x + IntraAttn(LN(x))
        h = h + MLP(LN(h))
        z = segment_mean(h)                         # [B, P, D]: each subgraph's mean over its nodes
        z = z + InterAttn(LN(z));  z = z + MLP(LN(z))
        out = h + ReLU(W_node h + W_sub z[assignment])

    ``inter=False`` drops the inter-subgraph path (``out = h``), for the ablation.
    ``inter_threshold`` and ``inter_levels``: the hierarchical InterAttn above the threshold,
    as in `SBAttention`.
    ``tokens`` (a `LocalTokens`) gathers the pooled tokens before InterAttn and keeps this
    process's rows after it; a spatial shard swaps in one that talks to the other ranks.
    """

    def __init__(self, dim: int, num_heads: int, partition: Partition, *, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, backend: str = "auto", adjacency=None, inter: bool = True,
                 inter_threshold: int = INTER_THRESHOLD, inter_levels: Optional[Sequence[Partition]] = None):
        super().__init__()
        self._hold(partition)
        self.backend = backend
        adjacency = None if adjacency is None else to_csr(adjacency)     # once, for the intra and inter parts
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.intra = IntraAttention(dim, num_heads, partition, adjacency=adjacency, backend=backend)
        self.mlp = _mlp(dim, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)
        self.has_inter = inter
        if inter:
            self.norm_z1, self.norm_z2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.inter = InterAttention(dim, num_heads, backend=backend,
                                        levels=_resolve_levels(partition, inter_levels, inter_threshold, adjacency))
            self.mlp_z = _mlp(dim, mlp_ratio, dropout)
            self.node_proj = nn.Linear(dim, dim)
            self.sub_proj = nn.Linear(dim, dim, bias=False)
        self.tokens = LocalTokens()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_nodes(x, self.partition, self.norm1.normalized_shape[0])
        h = x + self.drop(self.intra(self.norm1(x)))
        h = h + self.drop(self.mlp(self.norm2(h)))
        if not self.has_inter:
            return h
        z = self.tokens.gather(sk.segment_mean(h, self.partition, backend=self.backend))
        z = self.tokens.own(z + self.drop(self.inter(self.norm_z1(z))))     # the rest is row-wise
        z = z + self.drop(self.mlp_z(self.norm_z2(z)))
        # index_select, not z[:, assignment]: its backward is an index_add, not a slower index_put
        return h + torch.relu(self.node_proj(h) + self.sub_proj(z).index_select(1, self.partition.assignment))
