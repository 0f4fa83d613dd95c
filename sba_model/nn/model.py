"""SBATransformer: the multiscale SBA forecasting model."""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import nn

from sba_kernels import Partition

from ..graph.adjacency import permute_graph, to_csr
from .layers import SBABlock
from ..graph.partitioning import INTER_THRESHOLD, model_partitions, positive_int
from ..graph.pe import laplacian_pe

__all__ = ["SBATransformer"]


def time_embedding(name: str, table: Optional[nn.Embedding], ids: Optional[torch.Tensor], batch: int):
    """``table(ids)`` as ``[B, 1, D]`` to broadcast over the nodes, or 0.0 when ``table`` is None
    (the embedding is off). ``ids``: ``[B]`` long (time-of-day slot or day of week of the last
    input step); ``name`` names the argument in the error when they are missing, misshapen, not
    integers or out of the table's range."""
    if table is None:
        return 0.0
    if not isinstance(ids, torch.Tensor) or ids.shape != (batch,):
        raise ValueError(f"{name} must be a [B={batch}] long tensor when its embedding is enabled")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer slots, got dtype {ids.dtype}")
    # An id off the table is an IndexError, naming nothing, on the CPU. Checked there only: on a
    # GPU it would cost a host sync per forward (and break CUDA-graph capture); and not inside a
    # torch.compile trace, where a value-dependent branch breaks the graph.
    if (ids.device.type == "cpu" and not torch.compiler.is_compiling()
            and bool(((ids < 0) | (ids >= table.num_embeddings)).any())):
        raise ValueError(f"{name} must lie in [0, {table.num_embeddings}), got values from {int(ids.min())} "
                         f"to {int(ids.max())}")
    return table(ids.long()).unsqueeze(1)


class SBATransformer(nn.Module):
    """Forecast ``[B, T_out, N, C_out]`` from ``[B, T_in, N, C]``.

    Each node's whole history (``T_in * C`` numbers) is one token (Linear -> D); Laplacian PE,
    an optional learned node identity and time-of-day / day-of-week embeddings of the last
    input step are added; L `SBABlock`s
    follow, layer ``l`` on ``partitions[l]`` (fine to coarse); a Linear head maps each token to
    ``T_out * C_out``.

    Args:
        num_nodes: N. in_steps, in_channels: T_in, C. out_steps, out_channels: T_out, C_out.
        partitions: one `Partition` per layer over the model's internal node order.
        dim, num_heads, mlp_ratio, dropout, backend: block sizes and kernel backend.
        pe: optional ``[N, k]`` positional encodings (internal node order); random sign flips
            per column in training, as Laplacian eigenvectors have no fixed sign (drawn from
            ``self.pe_generator`` when set, else from the global RNG).
        steps_per_day: enables the time-of-day embedding (``tod`` in ``0..steps_per_day-1``).
        day_of_week: enables the day-of-week embedding (``dow`` in ``0..6``).
        perm: optional ``[N]`` long, ``perm[internal] = user node id``: inputs are reordered
            with it and outputs restored, so callers use their own node order.
        adjacency: optional graph (internal order) for the learnable intra-subgraph bias.
        inter: keep the inter-subgraph path (False for the ablation).
        inter_threshold: the most pooled tokens a layer's inter attention attends densely;
            above it the attention is hierarchical (see `SBAttention`).
        inter_levels: optional, one list of token-level `Partition`s per layer (empty for a
            layer at or below the threshold), e.g. from `sba_model.model_partitions`; by default
            built from ``adjacency`` for the layers that need them.
        node_embedding: a learned ``[N, D]`` identity per node added to its token (STID's spatial
            identity, Shao et al. 2022; zero at the start). It lets a node keep a bias of its own
            that PE computed from the graph cannot give; it ties the model to these N nodes.
        last_value_residual: predict the change from the last input step (needs C_out <= C):
            ``y = head(...) + x[:, -1:, :, :C_out]``. Short horizons are mostly persistence, which a
            flattened-history embedding reproduces poorly; with this the model learns deviations.

    Use `SBATransformer.from_graph` to get partitions, permutation and PE in one call.
    """

    def __init__(self, num_nodes: int, in_steps: int, in_channels: int, out_steps: int, out_channels: int,
                 partitions: Sequence[Partition], *, dim: int = 64, num_heads: int = 4, mlp_ratio: float = 2.0,
                 dropout: float = 0.0, backend: str = "auto", pe: Optional[torch.Tensor] = None,
                 steps_per_day: Optional[int] = None, day_of_week: bool = False,
                 perm: Optional[torch.Tensor] = None, adjacency=None, inter: bool = True,
                 last_value_residual: bool = False, node_embedding: bool = False,
                 inter_threshold: int = INTER_THRESHOLD, inter_levels: Optional[Sequence[Sequence[Partition]]] = None):
        super().__init__()
        for name, count in (("num_nodes", num_nodes), ("in_steps", in_steps), ("in_channels", in_channels),
                            ("out_steps", out_steps), ("out_channels", out_channels)):
            positive_int(count, name)
        if last_value_residual and out_channels > in_channels:
            raise ValueError("last_value_residual needs out_channels <= in_channels")
        self.last_value_residual = last_value_residual
        if not partitions:
            raise ValueError("partitions must hold one Partition per layer")
        for i, p in enumerate(partitions):
            if not isinstance(p, Partition) or p.num_nodes != num_nodes:
                raise ValueError(f"partitions[{i}] must be a Partition of num_nodes={num_nodes} nodes")
        self.num_nodes, self.in_steps, self.in_channels = num_nodes, in_steps, in_channels
        self.out_steps, self.out_channels = out_steps, out_channels
        self.embed = nn.Linear(in_steps * in_channels, dim)
        self.pe_generator: Optional[torch.Generator] = None
        if pe is not None:
            pe = torch.as_tensor(pe)                  # a numpy array from the user's own PE
            if pe.dim() != 2 or pe.shape[0] != num_nodes:
                raise ValueError(f"pe must be [N={num_nodes}, k], got {tuple(pe.shape)}")
            self.register_buffer("pe", pe.float())
            self.pe_proj = nn.Linear(pe.shape[1], dim)
        else:
            self.pe = None
        # Internal node order, like pe: row i belongs to the node at internal position i.
        self.node_id = nn.Parameter(torch.zeros(num_nodes, dim)) if node_embedding else None
        if steps_per_day is not None and (isinstance(steps_per_day, bool)
                                          or not isinstance(steps_per_day, numbers.Integral) or steps_per_day < 1):
            raise ValueError(f"steps_per_day must be a positive int or None (no time-of-day embedding), "
                             f"got {steps_per_day!r}")
        self.tod = nn.Embedding(int(steps_per_day), dim) if steps_per_day else None
        self.dow = nn.Embedding(7, dim) if day_of_week else None
        # The calendar is added to every node's token, the same for all nodes: at nn.Embedding's
        # N(0, 1) start it outweighs the history embedding (norm about sqrt(dim)) and SBA models
        # sat at one validation MAE for epochs (bench/results/los_loop_calendar_init.md).
        for table in (self.tod, self.dow):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
        if perm is not None:
            perm = torch.as_tensor(perm)
            if perm.dtype.is_floating_point or perm.dtype == torch.bool:
                raise TypeError(f"perm must hold integer node ids, got dtype {perm.dtype}")
            perm = perm.long()
            if perm.shape != (num_nodes,) or not torch.equal(perm.sort().values, torch.arange(num_nodes)):
                raise ValueError(f"perm must be a permutation of range({num_nodes})")
            self.register_buffer("perm", perm)
            self.register_buffer("inv_perm", torch.argsort(perm))
        else:
            self.perm = None
        adjacency = None if adjacency is None else to_csr(adjacency)     # once, for every block
        if inter_levels is not None and len(inter_levels) != len(partitions):
            raise ValueError(f"inter_levels must hold one list per layer ({len(partitions)}), got {len(inter_levels)}")
        self.blocks = nn.ModuleList(
            SBABlock(dim, num_heads, p, mlp_ratio=mlp_ratio, dropout=dropout, backend=backend,
                     adjacency=adjacency, inter=inter, inter_threshold=inter_threshold,
                     inter_levels=None if inter_levels is None else inter_levels[i])
            for i, p in enumerate(partitions)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_steps * out_channels)

    @classmethod
    def from_graph(cls, adjacency, parts: Sequence[int], *, in_steps: int, in_channels: int, out_steps: int,
                   out_channels: int, pe_dim: int = 8, graph_bias: bool = True, seed: int = 0,
                   inter_threshold: int = INTER_THRESHOLD, max_size: Optional[int] = None,
                   **kwargs) -> "SBATransformer":
        """Build from a sensor graph: nested METIS partitions for ``parts`` (one level per layer,
        finest first) and, for layers with more than ``inter_threshold`` subgraphs, the levels of
        their hierarchical inter attention (`model_partitions`: coarser levels of the same nested
        chain, so every group is a contiguous run of tokens); the node permutation; Laplacian PE
        of size ``pe_dim`` (0 = none); the graph-bias blocks when ``graph_bias``.

        ``max_size`` caps the first layer's subgraphs (`model_partitions`). METIS alone leaves
        about half of them one or two nodes over the ``N / parts[0]`` it aims at; with
        ``parts[0] = ceil(N / 64)`` and ``max_size=64`` every subgraph fits one tile of the
        triton kernels (16-bit at head dim 16, 32 or 64: `triton_backend.ONE_TILE_CAP`), whose one-tile forward and fused backward are
        the fast path on a GPU (`bench/results/static/tiles.md`).

        ``adjacency`` is converted and checked once, here (`sba_model.to_csr`); every step
        after it receives the checked graph and does not convert it again."""
        csr = to_csr(adjacency)
        partitions, levels, perm = model_partitions(csr, parts, threshold=inter_threshold, max_size=max_size,
                                                    seed=seed)
        internal = permute_graph(csr, perm)
        pe = laplacian_pe(internal, pe_dim) if pe_dim else None
        return cls(csr.shape[0], in_steps, in_channels, out_steps, out_channels, partitions, pe=pe,
                   perm=perm, adjacency=internal if graph_bias else None, inter_threshold=inter_threshold,
                   inter_levels=levels, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The partitions are not in a state dict, only the node order they gave: weights trained
        # under another order would load "with all keys matched" into subgraphs of other sensors.
        theirs = state_dict.get(prefix + "perm")
        if self.perm is not None and theirs is not None and not torch.equal(theirs.to(self.perm.device), self.perm):
            raise ValueError("state_dict: its model was built with another node order (other partitions of "
                             "the graph); build this one from the same graph, parts and max_size, with the "
                             "same METIS")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, tod: Optional[torch.Tensor] = None,
                dow: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x ``[B, T_in, N, C]``; tod, dow ``[B]`` long of the last input step (when enabled).
        Returns ``[B, T_out, N, C_out]``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_steps, self.num_nodes, self.in_channels) or not len(x):
            raise ValueError(
                f"x must be [B >= 1, {self.in_steps}, {self.num_nodes}, {self.in_channels}], got {tuple(x.shape)}"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if self.perm is not None:
            x = x[:, :, self.perm]
        y = self.forward_nodes(x, tod, dow)
        return y[:, :, self.inv_perm] if self.perm is not None else y

    def forward_nodes(self, x: torch.Tensor, tod: Optional[torch.Tensor] = None, dow: Optional[torch.Tensor] = None,
                      *, nodes: slice = slice(None)) -> torch.Tensor:
        """The forward pass in the internal node order, over the internal nodes ``nodes``:
        x ``[B, T_in, n, C]`` -> ``[B, T_out, n, C_out]``, n the length of ``nodes``.

        ``nodes`` is all of them in one process; a spatial shard (`sba_model.nn.distributed`) passes
        its own run, with blocks whose partitions cover exactly those nodes.
        """
        B, n = x.shape[0], x.shape[2]
        tokens = self.embed(x.permute(0, 2, 1, 3).reshape(B, n, -1))    # [B, n, D]
        if self.pe is not None:
            pe = self.pe[nodes]
            if self.training:
                pe = pe * (self._pe_signs(pe.shape[1]).to(pe.device) * 2 - 1)
            tokens = tokens + self.pe_proj(pe)
        if self.node_id is not None:
            tokens = tokens + self.node_id[nodes]
        tokens = tokens + time_embedding("tod", self.tod, tod, B)
        tokens = tokens + time_embedding("dow", self.dow, dow, B)
        for block in self.blocks:
            tokens = block(tokens)
        y = self.head(self.norm(tokens)).view(B, n, self.out_steps, self.out_channels).permute(0, 2, 1, 3)
        return y + x[:, -1:, :, : self.out_channels] if self.last_value_residual else y

    def _pe_signs(self, k: int) -> torch.Tensor:
        """``[1, k]`` random 0/1, one per PE column, from ``pe_generator`` when set (a CPU
        `torch.Generator`: the same flips on every rank of a spatial shard), else the global RNG."""
        g = self.pe_generator
        return torch.randint(0, 2, (1, k), generator=g, device=self.pe.device if g is None else g.device)
