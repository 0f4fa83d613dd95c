"""What the benchmark compares. Each method turns ``(q, k, v, partition)`` into a callable
computing attention over ``[B, N, H, d]`` tokens; setup (masks, compiled kernels, layers) is
done once, outside the timed region.

Same work as SBA's intra-subgraph attention (block-diagonal attention):
  ``intra[<backend>]``  sba_kernels.intra_attention
  ``intra_gathered[triton]``  the same with each subgraph's nodes listed in descending order: no
                        subgraph is a run, so the Triton kernels gather rows through ``index``
                        where ``intra[triton]`` takes the contiguous path (`Partition.starts`)
  ``sdpa_dense_mask``   SDPA with a dense ``[N, N]`` block-diagonal boolean mask
  ``sdpa_padded``       subgraphs gathered into a padded ``[B*P, H, M, d]`` batch, key padding masked
  ``flex_document``     FlexAttention with a document BlockMask, compiled
  ``sdpa_nested``       SDPA on a jagged nested tensor, one sequence per (batch, subgraph): on
                        CUDA, PyTorch runs flash-attention's variable-length kernel
What SBA replaces and what a user runs:
  ``sdpa_full``         SDPA over all N tokens (full attention)
  ``sba_layer[<backend>]``  the SBAttention layer (projections, intra, pooling, inter; the inter
                        attention hierarchical above ``INTER_THRESHOLD`` subgraphs)
  ``layer_projections``  only the layer's two N-token Linear maps (qkv, then the output
                        projection of q's part): what ``sba_layer`` costs besides attention
and the layer's time split in two:
  ``sba_layer.intra[<backend>]``  its intra path: projections, intra attention, pooling
  ``sba_layer.inter[<backend>]``  its inter path on the pooled tokens, broadcast back to the nodes
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import sba_kernels as sk
from sba_kernels import Partition
from sba_model import SBAttention

Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _bhnd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def intra(backend: str):
    def build(q, k, v, partition: Partition) -> Method:
        return lambda q, k, v: sk.intra_attention(q, k, v, partition, backend=backend)
    return build


def reversed_runs(partition: Partition) -> Partition:
    """The same subgraphs over the same nodes, each listed in descending node order. Attention
    within a subgraph does not depend on the order its nodes are listed in, so the work and the
    memory read are the contiguous partition's, but no subgraph of two or more nodes is a run
    (``starts`` is None): the kernels gather."""
    index, lengths = partition.index.long(), partition.lengths.long()
    slots = torch.arange(index.shape[1], device=index.device)
    real = slots < lengths[:, None]
    mirrored = index.gather(1, torch.where(real, lengths[:, None] - 1 - slots, 0))
    return Partition(torch.where(real, mirrored, -1), lengths, partition.num_nodes)


def intra_gathered(backend: str):
    def build(q, k, v, partition: Partition) -> Method:
        return intra(backend)(q, k, v, reversed_runs(partition))
    return build


def _layer(q: torch.Tensor, partition: Partition, levels: Sequence[Partition], backend: str) -> SBAttention:
    B, N, H, d = q.shape
    return SBAttention(H * d, H, partition, backend=backend, inter_levels=levels).to(q.device, q.dtype)


def sba_layer(backend: str, levels: Sequence[Partition]):
    def build(q, k, v, partition: Partition) -> Method:
        layer = _layer(q, partition, levels, backend)
        return lambda q, k, v: layer(q.flatten(2)).view(q.shape)
    return build


def sba_layer_intra(backend: str, levels: Sequence[Partition]):
    def build(q, k, v, partition: Partition) -> Method:
        layer = _layer(q, partition, levels, backend)
        return lambda q, k, v: layer.intra.forward_pooled(q.flatten(2))[0].view(q.shape)
    return build


def sba_layer_inter(backend: str, levels: Sequence[Partition]):
    def build(q, k, v, partition: Partition) -> Method:
        layer = _layer(q, partition, levels, backend)
        # The pooled tokens are made once, outside the timed call: the intra path pools.
        z = sk.segment_mean(q.detach().flatten(2), partition).requires_grad_(q.requires_grad)
        return lambda q, k, v: layer.inter(z)[:, partition.assignment].view(q.shape)
    return build


def layer_projections(q, k, v, partition: Partition) -> Method:
    B, N, H, d = q.shape
    intra = SBAttention(H * d, H, partition).to(q.device, q.dtype).intra
    return lambda q, k, v: intra.proj(intra.qkv(q.reshape(B, N, H * d))[..., :H * d]).view(B, N, H, d)


def sdpa_full(q, k, v, partition: Partition) -> Method:
    return lambda q, k, v: _bhnd(F.scaled_dot_product_attention(_bhnd(q), _bhnd(k), _bhnd(v)))


def sdpa_dense_mask(q, k, v, partition: Partition) -> Method:
    a = partition.assignment
    mask = a.unsqueeze(0) == a.unsqueeze(1)                      # [N, N] bool: O(N^2) memory
    return lambda q, k, v: _bhnd(F.scaled_dot_product_attention(_bhnd(q), _bhnd(k), _bhnd(v), attn_mask=mask))


def sdpa_padded(q, k, v, partition: Partition) -> Method:
    index = partition.index.long()
    valid = index >= 0                                            # [P, M]
    safe = index.clamp_min(0)
    key_mask = valid[:, None, None, :]                            # [P, 1, 1, M] broadcast over B*P, H
    nodes = index[valid]
    # The real slots of the flattened [P * M] padded rows, found once: a boolean index at each
    # call would wait on the host (nonzero), which a CUDA graph cannot capture (--cuda-graph).
    real_slots = valid.flatten().nonzero().squeeze(1)

    def run(q, k, v):
        B, N, H, d = q.shape
        P, M = index.shape

        def pad(t):                                               # [B, N, H, d] -> [B*P, H, M, d]
            return t[:, safe].permute(0, 1, 3, 2, 4).reshape(B * P, H, M, d)

        mask = key_mask.expand(B, -1, -1, -1, -1).reshape(B * P, 1, 1, M)
        o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask)
        o = o.reshape(B, P, H, M, d).permute(0, 1, 3, 2, 4).reshape(B, P * M, H, d).index_select(1, real_slots)
        return torch.zeros_like(q).index_copy(1, nodes, o)

    return run


def _same_subgraph(doc: torch.Tensor):
    """FlexAttention's mask_mod for block-diagonal attention: ``doc[i]`` is node i's subgraph."""

    def same_subgraph(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    return same_subgraph


def _document_block_mask(partition: Partition, N: int, block: int):
    """FlexAttention's BlockMask for block-diagonal attention, built from block ranges in
    O(N / block) when every subgraph is a contiguous run of node ids (as the benchmark's layout
    makes them): query block i may meet only the key blocks from the start of its first row's
    subgraph to the end of its last row's. Else None. `create_block_mask` evaluates the mask at
    all N x N pairs instead: out of memory at N = 1e6 on an H200 eager, and over two minutes
    compiled (`bench/results/gpu-h200/README.md`)."""
    from torch.nn.attention.flex_attention import BlockMask

    doc = partition.assignment
    if N > 1 and bool((doc[1:] < doc[:-1]).any()):
        return None
    lengths = partition.lengths.long()
    ends = lengths.cumsum(0)                                       # subgraph p: nodes [ends[p] - len, ends[p])
    starts = ends - lengths
    q_blocks = -(-N // block)
    first = doc[torch.arange(q_blocks, device=doc.device) * block]             # subgraph of each block's first row
    last = doc[torch.clamp((torch.arange(q_blocks, device=doc.device) + 1) * block, max=N) - 1]
    lo, hi = starts[first] // block, (ends[last] - 1) // block                  # key blocks lo..hi
    width = int((hi - lo).max()) + 1
    # [q_blocks, q_blocks]: BlockMask derives the backward's transposed index from this square.
    indices = torch.zeros(q_blocks, q_blocks, dtype=torch.int32, device=doc.device)
    indices[:, :width] = torch.clamp(lo[:, None] + torch.arange(width, device=doc.device), max=q_blocks - 1).int()
    num = (hi - lo + 1).to(torch.int32)
    return BlockMask.from_kv_blocks(num[None, None], indices[None, None], BLOCK_SIZE=block,
                                    mask_mod=_same_subgraph(doc), seq_lengths=(N, N))


def flex_document(q, k, v, partition: Partition) -> Method:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    N = q.shape[1]
    block = 128 if q.is_cuda else 32
    mask = _document_block_mask(partition, N, block)
    if mask is None:
        mask = create_block_mask(_same_subgraph(partition.assignment), None, None, N, N, device=q.device,
                                 BLOCK_SIZE=block)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: _bhnd(compiled(_bhnd(q), _bhnd(k), _bhnd(v), block_mask=mask))


def sdpa_nested(q, k, v, partition: Partition) -> Method:
    index = partition.index.long()
    nodes = index[index >= 0]                                     # node ids, subgraph after subgraph
    lengths = partition.lengths.long()

    def run(q, k, v):
        B, N, H, d = q.shape
        # One jagged sequence per (batch, subgraph): offsets of B copies of the lengths.
        offsets = torch.cat([lengths.new_zeros(1), lengths.repeat(B).cumsum(0)])

        def jagged(t):                                            # [B, N, H, d] -> [B*P, H, (j), d]
            values = t[:, nodes].reshape(B * N, H, d)
            return torch.nested.nested_tensor_from_jagged(values, offsets).transpose(1, 2)

        o = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v))
        o = o.transpose(1, 2).values().view(B, N, H, d)
        return torch.empty_like(q).index_copy(1, nodes, o)

    return run


def registry(device: str, levels: Sequence[Partition] = ()) -> dict[str, Callable]:
    """Method name -> builder, for the backends usable on ``device`` (the Triton interpreter
    is never timed: on the CPU only the torch and sdpa backends run). ``levels``: the SBA layer's
    inter attention levels for this size's partition (`workload.build_layout`)."""
    backends = [b for b in sk.available_backends() if device == "cuda" or b in ("torch", "sdpa")]
    methods: dict[str, Callable] = {}
    for b in backends:
        methods[f"intra[{b}]"] = intra(b)
    if "triton" in backends:
        methods["intra_gathered[triton]"] = intra_gathered("triton")
    for b in backends:
        methods[f"sba_layer[{b}]"] = sba_layer(b, levels)
        methods[f"sba_layer.intra[{b}]"] = sba_layer_intra(b, levels)
        methods[f"sba_layer.inter[{b}]"] = sba_layer_inter(b, levels)
    methods["layer_projections"] = layer_projections
    methods.update(sdpa_full=sdpa_full, sdpa_dense_mask=sdpa_dense_mask, sdpa_padded=sdpa_padded,
                   sdpa_nested=sdpa_nested, flex_document=flex_document)
    return methods
