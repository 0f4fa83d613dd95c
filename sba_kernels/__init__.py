"""sba_kernels: the Spatial Balance Attention ops over torch, SDPA, Triton and CUDA C++ backends.

    >>> import torch, sba_kernels as sk
    >>> part = sk.Partition.from_assignment(torch.tensor([0, 0, 1, 1, 1]))
    >>> q = k = v = torch.randn(2, 5, 4, 16)          # [B, N, H, d]
    >>> sk.intra_attention(q, k, v, part).shape
    torch.Size([2, 5, 4, 16])
"""

from .backends import Backend, available_backends, register
from .ops import inter_attention, intra_attention, intra_attention_pooled, segment_mean
from .partition import Partition

__all__ = ["Partition", "intra_attention", "intra_attention_pooled", "segment_mean", "inter_attention",
           "available_backends", "Backend", "register"]
__version__ = "0.1.0"
