"""Sensor graphs: conversion from every common form (`to_csr`), graph builders, METIS
partitions and their hierarchy, and Laplacian positional encodings.

Every public function here takes a graph in any form `to_csr` accepts and converts it once;
the checked CSR it returns is passed on as is (see `sba_model.graph.adjacency`).
"""

from .adjacency import gaussian_kernel_adjacency, haversine_distances, knn_adjacency, permute_graph, to_csr
from .partitioning import model_partitions, multiscale_partitions, partition_graph, token_levels
from .pe import laplacian_pe

__all__ = [
    "to_csr", "permute_graph", "gaussian_kernel_adjacency", "haversine_distances", "knn_adjacency",
    "partition_graph", "multiscale_partitions", "token_levels", "model_partitions", "laplacian_pe",
]
