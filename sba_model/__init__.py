"""sba_model: the library (`sba_model.graph`: sensor graphs, METIS partitions, positional
encodings; `sba_model.nn`: SBA layers and the SBATransformer) and the forecasting harness
(`sba_model.forecast`: datasets, baselines, training and comparison CLIs).

The library's public names are re-exported here: ``from sba_model import SBAttention``.
"""

from .graph import (gaussian_kernel_adjacency, haversine_distances, knn_adjacency, laplacian_pe,
                    model_partitions, multiscale_partitions, partition_graph, permute_graph, to_csr,
                    token_levels)
from .nn import InterAttention, IntraAttention, SBABlock, SBATransformer, SBAttention

__all__ = [
    "to_csr", "permute_graph", "gaussian_kernel_adjacency", "haversine_distances", "knn_adjacency",
    "partition_graph", "multiscale_partitions", "token_levels", "model_partitions", "laplacian_pe",
    "IntraAttention", "InterAttention", "SBAttention", "SBABlock", "SBATransformer",
]
