"""sba_model: sensor graphs, METIS partitions, positional encodings, SBA layers and the model."""

from .adjacency import gaussian_kernel_adjacency, haversine_distances, knn_adjacency, to_csr
from .partitioning import model_partitions, multiscale_partitions, partition_graph, token_levels
from .layers import InterAttention, IntraAttention, SBABlock, SBAttention
from .model import SBATransformer
from .pe import laplacian_pe

__all__ = [
    "to_csr", "gaussian_kernel_adjacency", "haversine_distances", "knn_adjacency",
    "partition_graph", "multiscale_partitions", "token_levels", "model_partitions", "laplacian_pe",
    "IntraAttention", "InterAttention", "SBAttention", "SBABlock", "SBATransformer",
]
