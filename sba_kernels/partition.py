"""The `Partition`: which nodes belong to which subgraph, in the padded layout kernels read.

A partition of N nodes into P disjoint subgraphs is held as

* ``index``   int32 ``[P, M]``: node ids of subgraph ``p`` in ``index[p, :lengths[p]]``,
  ``-1`` in the padding slots after them (``M`` >= the largest subgraph; `from_assignment`
  makes it exactly that, and the kernels' tiles follow ``M``);
* ``lengths`` int32 ``[P]``: ``n_p >= 1`` real nodes per subgraph.

Every node ``0..N-1`` appears exactly once. The constructor checks all of this, so a kernel
handed a `Partition` can trust it without re-checking. It also notes whether every subgraph is
a run of consecutive node ids (``starts``), as the model's node order makes them: the Triton
one-tile kernels and segment mean then address a subgraph's rows from its first node instead of
gathering them through ``index``.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

__all__ = ["Partition"]


class Partition:
    """A validated partition of ``num_nodes`` nodes into ``P`` subgraphs.

    Args:
        index: int tensor ``[P, M]`` of node ids, each row's real nodes first, ``-1`` after.
        lengths: int tensor ``[P]``, number of real nodes in each row (``1 <= lengths <= M``).
        num_nodes: N. Defaults to the number of real slots, ``lengths.sum()``.

    Raises:
        TypeError / ValueError naming the argument when the layout is broken: wrong rank or
        dtype, lengths < 1 or > M, a node id out of range, repeated or missing, a padding
        slot that is not -1, or a real slot that is.
    """

    def __init__(self, index: torch.Tensor, lengths: torch.Tensor, num_nodes: Optional[int] = None):
        index, lengths = _as_int_tensor(index, "index"), _as_int_tensor(lengths, "lengths")
        if index.dim() != 2:
            raise ValueError(f"index must have shape [P, M], got {tuple(index.shape)}")
        if lengths.dim() != 1 or lengths.shape[0] != index.shape[0]:
            raise ValueError(
                f"lengths must have shape [P] = [{index.shape[0]}] to match index, got {tuple(lengths.shape)}"
            )
        if index.shape[0] == 0 or index.shape[1] == 0:
            raise ValueError(f"index must hold at least one subgraph and one slot, got {tuple(index.shape)}")
        if index.device != lengths.device:
            raise ValueError(f"index ({index.device}) and lengths ({lengths.device}) must be on one device")
        if num_nodes is None:          # the lengths' sum, once they are known to be counts
            _check_lengths(lengths, index.shape[1])
            num_nodes = int(lengths.sum())
        if not isinstance(num_nodes, numbers.Integral) or isinstance(num_nodes, bool) or num_nodes < 1:
            raise TypeError(f"num_nodes must be a positive int, got {num_nodes!r}")
        num_nodes = int(num_nodes)
        _check_layout(index, lengths, num_nodes)
        # Copies: the caller's tensors may change later; this partition, checked once, may not.
        self._index = index.to(torch.int32, copy=True).contiguous()
        self._lengths = lengths.to(torch.int32, copy=True).contiguous()
        self._num_nodes = num_nodes
        self._starts = _run_starts(self._index, self._lengths)
        self._cache: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_assignment(cls, assignment, num_parts: Optional[int] = None) -> "Partition":
        """Build from a per-node subgraph id.

        Args:
            assignment: ints ``[N]`` (tensor, array or list), ``assignment[i]`` = subgraph of node i,
                in ``0..num_parts-1``.
            num_parts: P; defaults to ``max(assignment) + 1``. Empty subgraphs are dropped and
                the rest renumbered in order, so ``P`` of the result may be smaller.

        Within a subgraph, nodes are listed in increasing id.
        """
        a = _as_int_tensor(torch.as_tensor(assignment), "assignment").long()
        if a.dim() != 1 or a.numel() == 0:
            raise ValueError(f"assignment must be a non-empty 1-D sequence of ints, got shape {tuple(a.shape)}")
        if int(a.min()) < 0:
            raise ValueError("assignment must hold subgraph ids >= 0")
        if num_parts is not None:
            if not isinstance(num_parts, numbers.Integral) or isinstance(num_parts, bool):
                raise TypeError(f"num_parts must be an int, got {num_parts!r}")
            if num_parts < 1:
                raise ValueError(f"num_parts must be >= 1, got {num_parts}")
            if int(a.max()) >= num_parts:
                raise ValueError(f"assignment holds id {int(a.max())}, which is >= num_parts={num_parts}")
        # Compacted ids in the order of the old ones, empty parts gone; by sorting, not a count
        # per possible id, whose memory would follow the largest id rather than N.
        _, a, counts = torch.unique(a, sorted=True, return_inverse=True, return_counts=True)
        order = torch.argsort(a, stable=True)                # node ids grouped by part, ascending
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(a.numel(), device=a.device) - starts[a[order]]
        index = torch.full((counts.numel(), int(counts.max())), -1, dtype=torch.int32, device=a.device)
        index[a[order], slot] = order.to(torch.int32)
        return cls(index, counts.to(torch.int32), num_nodes=a.numel())

    @classmethod
    def from_parts(cls, parts: Sequence[Sequence[int]], num_nodes: Optional[int] = None) -> "Partition":
        """Build from a list of node-id lists, one per subgraph (kept in the given order)."""
        if len(parts) == 0:
            raise ValueError("parts must hold at least one subgraph")
        width = max(len(p) for p in parts)
        index = torch.full((len(parts), max(width, 1)), -1, dtype=torch.int32)
        for row, p in enumerate(parts):
            if len(p):                    # an empty one is refused by the lengths check
                index[row, : len(p)] = _as_int_tensor(torch.as_tensor(list(p)), "parts")
        lengths = torch.tensor([len(p) for p in parts], dtype=torch.int32)
        return cls(index, lengths, num_nodes=num_nodes)

    # ------------------------------------------------------------------ properties
    @property
    def index(self) -> torch.Tensor:
        """int32 ``[P, M]``: node ids per subgraph, -1 in padding slots. Read-only: a partition
        is checked once, when built, and trusted after."""
        return self._index

    @property
    def lengths(self) -> torch.Tensor:
        """int32 ``[P]``: real nodes per subgraph."""
        return self._lengths

    @property
    def starts(self) -> Optional[torch.Tensor]:
        """int32 ``[P]``, the first node of each subgraph, when every subgraph's slots hold
        consecutive node ids (``index[p, s] = starts[p] + s``; the subgraphs in any order); else
        None. Found once, when the partition is built."""
        return self._starts

    @property
    def num_nodes(self) -> int:
        """N."""
        return self._num_nodes

    @property
    def num_parts(self) -> int:
        """P, the number of subgraphs."""
        return self.index.shape[0]

    @property
    def max_size(self) -> int:
        """M, the padded width of ``index``: the largest subgraph's size where the partition
        came from `from_assignment`, at least that where ``index`` was given padded wider."""
        return self.index.shape[1]

    @property
    def device(self) -> torch.device:
        return self.index.device

    @property
    def assignment(self) -> torch.Tensor:
        """``[N]`` long: the subgraph id of every node."""
        if "assignment" not in self._cache:
            out = torch.empty(self.num_nodes, dtype=torch.long, device=self.device)
            real = self.index >= 0
            parts = torch.arange(self.num_parts, device=self.device).unsqueeze(1).expand_as(self.index)
            out[self.index[real].long()] = parts[real]
            self._cache["assignment"] = out
        return self._cache["assignment"]

    def cached(self, key, build):
        """Per-partition memo for derived tensors (the reference's size buckets, the sdpa backend's layout and masks): built once, reused."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def to(self, device) -> "Partition":
        """The same partition with its tensors on ``device`` (self if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        out = Partition.__new__(Partition)       # the same checked layout: no need to check again
        out._index, out._lengths = self._index.to(device), self._lengths.to(device)
        out._starts = None if self._starts is None else self._starts.to(device)
        out._num_nodes, out._cache = self._num_nodes, {}
        if "assignment" in self._cache:   # keep it built: traced code (torch.compile) should not build it
            out._cache["assignment"] = self._cache["assignment"].to(device)
        return out

    def parts(self) -> list[list[int]]:
        """The subgraphs as lists of node ids."""
        idx, lens = self.index.cpu().tolist(), self.lengths.cpu().tolist()
        return [row[:n] for row, n in zip(idx, lens)]

    def __repr__(self) -> str:
        lens = self.lengths
        return (
            f"Partition(num_nodes={self.num_nodes}, num_parts={self.num_parts}, sizes "
            f"{int(lens.min())}..{int(lens.max())}, device={self.device})"
        )


def _as_int_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
    return x


def _run_starts(index: torch.Tensor, lengths: torch.Tensor) -> Optional[torch.Tensor]:
    """`Partition.starts` of a checked layout: ``index[:, 0]`` if every real slot ``s`` of row
    ``p`` holds ``index[p, 0] + s``, else None."""
    slots = torch.arange(index.shape[1], device=index.device)
    real = slots.unsqueeze(0) < lengths.unsqueeze(1)
    first = index[:, 0]
    if bool(((index == first.unsqueeze(1) + slots) | ~real).all()):
        return first.contiguous()
    return None


def _check_lengths(lengths: torch.Tensor, width: int) -> None:
    if int(lengths.min()) < 1:
        raise ValueError(f"lengths must be >= 1 (no empty subgraphs), got min {int(lengths.min())}")
    if int(lengths.max()) > width:
        raise ValueError(f"lengths must be <= index.shape[1] = {width}, got max {int(lengths.max())}")


def _check_layout(index: torch.Tensor, lengths: torch.Tensor, num_nodes: int) -> None:
    """Every rule of the padded layout; raises ValueError naming the argument broken."""
    P, M = index.shape
    _check_lengths(lengths, M)
    slots = torch.arange(M, device=index.device).unsqueeze(0)
    real = slots < lengths.unsqueeze(1).to(slots.dtype)
    if bool((index[~real] != -1).any()):
        raise ValueError("index must hold -1 in every padding slot (slots at or after lengths[p])")
    ids = index[real].long()
    if bool((ids < 0).any()) or bool((ids >= num_nodes).any()):
        raise ValueError(f"index holds a node id out of range [0, {num_nodes}) in a real slot")
    if ids.numel() != num_nodes:
        raise ValueError(
            f"index must list every node exactly once: lengths sum to {ids.numel()} but num_nodes={num_nodes}"
        )
    counts = torch.bincount(ids, minlength=num_nodes)
    if bool((counts != 1).any()):
        dup = int((counts > 1).sum())
        miss = int((counts == 0).sum())
        raise ValueError(f"index must list every node exactly once: {dup} repeated, {miss} missing")

