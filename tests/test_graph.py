import copy
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sba_kernels import Partition
from sba_model import (SBATransformer, gaussian_kernel_adjacency, haversine_distances, knn_adjacency, laplacian_pe,
                       model_partitions, multiscale_partitions, partition_graph, permute_graph, to_csr,
                       token_levels)
from sba_model.graph import adjacency as adjacency_module
from sba_model.graph import partitioning
from sba_model.graph.partitioning import hierarchy_parts, nested_levels
from sba_model.graph import pe as pe_module
from sba_model.graph.pe import normalized_laplacian


def _ring(n):
    src = np.arange(n)
    return np.stack([src, (src + 1) % n])


def test_to_csr_accepts_every_form_and_agrees():
    ei = _ring(6)
    dense = np.zeros((6, 6))
    dense[ei[0], ei[1]] = 1
    forms = [ei, torch.from_numpy(ei), dense, torch.from_numpy(dense), sp.coo_matrix(dense), dense.astype(bool)]
    mats = [to_csr(f).toarray() for f in forms]
    for m in mats:
        assert np.array_equal(m, mats[0])
    assert np.array_equal(mats[0], mats[0].T) and np.all(np.diag(mats[0]) == 0)


def test_to_csr_edge_index_keeps_trailing_isolated_nodes():
    assert to_csr(np.array([[0], [1]]), num_nodes=5).shape == (5, 5)


def test_graph_inputs_in_less_common_forms():
    """numpy ints where ints go, bf16 dense tensors; complex weights, an edgeless edge_index
    without num_nodes and a bad kernel width refused by name (complex weights lost their
    imaginary part with a warning; sigma=0 made every weight 1e-12)."""
    rng = np.random.default_rng(4)
    coords = rng.random((30, 2))
    assert (knn_adjacency(coords, np.int64(4)) != knn_adjacency(coords, 4)).nnz == 0
    assert partition_graph(knn_adjacency(coords, 4), np.int64(3)).num_parts == 3
    assert laplacian_pe(knn_adjacency(coords, 4), np.int32(2)).shape == (30, 2)
    dense = torch.tensor([[0, 1, 0], [1, 0, 2], [0, 2, 0]], dtype=torch.bfloat16)
    assert to_csr(dense).toarray().tolist() == [[0, 1, 0], [1, 0, 2], [0, 2, 0]]
    with pytest.raises(TypeError, match="adjacency must hold real numbers, got dtype complex128"):
        to_csr(np.eye(3) * (1 + 1j))
    with pytest.raises(TypeError, match="adjacency must hold real weights"):
        to_csr(sp.csr_matrix(np.ones((3, 3)) * 1j))
    with pytest.raises(ValueError, match="an edge_index with no edges needs num_nodes"):
        to_csr(np.zeros((2, 0), dtype=np.int64))
    assert to_csr(np.zeros((2, 0), dtype=np.int64), num_nodes=4).shape == (4, 4)
    for sigma in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="sigma must be a finite positive kernel width"):
            knn_adjacency(coords, 4, sigma=sigma)
    assert knn_adjacency(coords, 4, sigma=np.float32(0.5)).nnz > 0


def test_to_csr_refuses_a_two_by_two_integer_array_without_num_nodes():
    """Two edges 0-1, 1-2 as an edge_index are also a 2 x 2 integer matrix: read as a dense
    2-node graph, the path 0-1-2 silently became one edge. Ambiguous, so refused by name; with
    num_nodes it is an edge_index, as floats a dense matrix."""
    path = np.array([[0, 1], [1, 2]])
    for form in (path, torch.from_numpy(path)):
        with pytest.raises(ValueError, match="adjacency: a 2 x 2 integer array is both"):
            to_csr(form)
        with pytest.raises(ValueError, match="adjacency: a 2 x 2 integer array"):
            partition_graph(form, 2)
    assert to_csr(path, num_nodes=3).toarray().tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    assert to_csr(path.astype(float)).toarray().tolist() == [[0, 1], [1, 0]]


@pytest.mark.parametrize("bad, match", [
    (np.zeros((3, 4)), "square"),
    (np.zeros(3), "adjacency must be"),
    (-np.ones((3, 3)), ">= 0"),
    (np.array([[0, 7], [1, 2]]).T, "edge_index"),
])
def test_to_csr_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        to_csr(bad, num_nodes=3 if bad.dtype.kind == "i" else None)


def test_a_checked_graph_is_frozen_and_passed_on_as_is():
    user = sp.random(30, 30, density=0.2, random_state=0, format="csr")
    checked = to_csr(user)
    assert to_csr(checked) is checked
    with pytest.raises(ValueError, match="num_nodes=31"):
        to_csr(checked, num_nodes=31)
    with pytest.raises(ValueError, match="read-only"):
        checked.data[0] = -1.0
    user.data[:] = -1.0                      # the user's own matrix stays theirs: nothing shared
    assert checked.data.min() > 0
    # arithmetic makes a new, unmarked matrix: it is checked again and refused
    with pytest.raises(ValueError, match=">= 0"):
        to_csr(-checked)
    # a deep copy (or an unpickled graph) keeps the mark but not the frozen arrays: checked again
    copied = copy.deepcopy(checked)
    copied.data[:] = -1.0
    with pytest.raises(ValueError, match=">= 0"):
        to_csr(copied)


def test_permute_graph_relabels_and_stays_checked():
    dense = np.triu(np.random.default_rng(1).random((12, 12)) < 0.3, 1).astype(float)
    dense += dense.T
    perm = np.random.default_rng(2).permutation(12)
    out = permute_graph(dense, torch.from_numpy(perm))
    assert np.array_equal(out.toarray(), dense[perm][:, perm])
    assert to_csr(out) is out
    with pytest.raises(ValueError, match="perm must be a permutation"):
        permute_graph(dense, np.zeros(12, dtype=int))


def test_from_graph_converts_its_graph_exactly_once(monkeypatch):
    calls = []
    convert = adjacency_module._convert
    monkeypatch.setattr(adjacency_module, "_convert", lambda *a, **k: calls.append(1) or convert(*a, **k))
    coords = np.random.default_rng(0).random((600, 2))
    edges = knn_adjacency(coords, k=6).tocoo()
    edge_index = np.stack([edges.row, edges.col]).astype(np.int64)     # not a checked graph
    calls.clear()
    # two layers, graph bias and PE, and a layer above inter_threshold (token levels)
    model = SBATransformer.from_graph(edge_index, [40, 8], in_steps=2, in_channels=1, out_steps=1,
                                      out_channels=1, dim=16, num_heads=2, pe_dim=4, inter_threshold=16)
    assert len(calls) == 1
    assert model.blocks[0].inter.levels           # the token levels were built, on the checked graph
    # the constructor converts a graph given to it once too, for all its blocks
    calls.clear()
    partitions = [model.blocks[0].partition, model.blocks[1].partition]
    SBATransformer(600, 2, 1, 1, 1, partitions, dim=16, num_heads=2, adjacency=edge_index, inter_threshold=16)
    assert len(calls) == 1


def test_gaussian_kernel_matches_formula():
    rng = np.random.default_rng(0)
    d = rng.random((8, 8)) * 10
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0)
    w = gaussian_kernel_adjacency(d, sigma=4.0, threshold=0.3).toarray()
    expect = np.exp(-(d / 4.0) ** 2)
    expect[expect < 0.3] = 0
    np.fill_diagonal(expect, 0)
    assert np.allclose(w, expect)


def test_haversine_known_distance():
    # Los Angeles to San Francisco, about 559 km.
    d = haversine_distances(np.array([34.0522, 37.7749]), np.array([-118.2437, -122.4194]))
    assert abs(d[0, 1] - 559) < 3 and d[0, 0] == 0


def _check_partition_covers(part, n):
    nodes = sorted(sum(part.parts(), []))
    assert nodes == list(range(n))


@pytest.mark.parametrize("num_parts", [2, 7, 32])
def test_partition_graph_balanced_and_complete(num_parts):
    rng = np.random.default_rng(num_parts)
    adj = knn_adjacency(rng.random((2000, 2)), 6)
    part = partition_graph(adj, num_parts)
    _check_partition_covers(part, 2000)
    assert part.num_parts == num_parts
    # METIS k-way default imbalance: ufactor 30, i.e. 1.03 x the average part.
    assert int(part.lengths.max()) <= math.ceil(1.03 * 2000 / num_parts)


def _cut_weight(csr, assignment):
    coo = csr.tocoo()
    return coo.data[assignment[coo.row] != assignment[coo.col]].sum() / 2


@pytest.mark.parametrize("weighted", [False, True])
def test_many_parts_are_cut_in_two_stages_as_well_as_in_one(monkeypatch, weighted):
    rng = np.random.default_rng(7)
    adj = knn_adjacency(rng.random((3000, 2)), 6)
    vweights = rng.integers(1, 4, 3000) if weighted else None
    one_stage = partitioning.metis_assignment(adj, 96, vweights=vweights)
    monkeypatch.setattr(partitioning, "_KWAY_MAX_PARTS", 32)       # 96 parts: 6 regions of 16
    monkeypatch.setattr(partitioning, "_REGION_PARTS", 16)
    calls = []
    kway = partitioning._kway_assignment
    monkeypatch.setattr(partitioning, "_kway_assignment",
                        lambda a, k, **kw: calls.append(k) or kway(a, k, **kw))
    two_stage = partitioning.metis_assignment(adj, 96, vweights=vweights)
    assert calls[0] == 6 and len(calls) == 7 and max(calls) <= 32 and sum(calls[1:]) == 96
    weight = np.ones(3000) if vweights is None else vweights
    load = np.bincount(two_stage, weights=weight, minlength=96)
    assert set(np.unique(two_stage)) == set(range(96))                 # every part used, ids in range
    assert load.max() <= 1.15 * weight.sum() / 96                         # balanced (1.03 per stage + rounding)
    assert _cut_weight(adj, two_stage) <= 1.15 * _cut_weight(adj, one_stage)
    # each part lies inside one first-stage region: parts never straddle a region boundary
    monkeypatch.setattr(partitioning, "_KWAY_MAX_PARTS", 2048)
    regions = partitioning.metis_assignment(adj, 6, vweights=vweights)
    assert all(len(np.unique(regions[two_stage == p])) == 1 for p in range(96))


def test_quotient_graph_sums_the_edges_between_parts():
    rng = np.random.default_rng(3)
    dense = np.triu(rng.random((40, 40)) * (rng.random((40, 40)) < 0.2), 1)
    dense += dense.T
    assignment = rng.integers(0, 5, 40)
    expected = np.zeros((5, 5))
    for i, j in zip(*np.nonzero(dense)):
        if assignment[i] != assignment[j]:
            expected[assignment[i], assignment[j]] += dense[i, j]
    got = partitioning._quotient_graph(to_csr(dense), assignment, 5)
    assert np.allclose(got.toarray(), expected) and got.diagonal().sum() == 0


def test_partition_graph_keeps_subgraphs_connected_on_a_grid():
    n = 20
    ids = np.arange(n * n).reshape(n, n)
    ei = np.concatenate([np.stack([ids[:, :-1].ravel(), ids[:, 1:].ravel()]),
                         np.stack([ids[:-1].ravel(), ids[1:].ravel()])], axis=1)
    part = partition_graph(ei, 4)
    csr = to_csr(ei)
    for nodes in part.parts():
        ncomp, _ = sp.csgraph.connected_components(csr[nodes][:, nodes])
        assert ncomp <= 2      # METIS minimises the cut; pieces stay (nearly) whole


def test_partition_graph_disconnected_isolated_and_oversized():
    a = sp.block_diag([knn_adjacency(np.random.default_rng(1).random((50, 2)), 4)] * 3).tocsr()
    a = sp.block_diag([a, sp.csr_matrix((10, 10))]).tocsr()       # 10 isolated nodes
    part = partition_graph(a, 5)
    _check_partition_covers(part, 160)
    single = partition_graph(a, 1000)
    assert single.num_parts == 160 and single.max_size == 1
    assert partition_graph(a, 1).num_parts == 1
    assert partition_graph(sp.csr_matrix((9, 9)), 3).lengths.tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="num_parts"):
        partition_graph(a, 0)


def test_multiscale_partitions_nested_and_contiguous():
    rng = np.random.default_rng(2)
    adj = knn_adjacency(rng.random((1500, 2)), 6)
    parts, perm = multiscale_partitions(adj, [40, 10, 3])
    assert sorted(perm.tolist()) == list(range(1500))
    assert [p.num_parts for p in parts] == [40, 10, 3]
    for level in parts:
        _check_partition_covers(level, 1500)
        for nodes in level.parts():                      # contiguous ascending runs
            assert nodes == list(range(nodes[0], nodes[0] + len(nodes)))
    for fine, coarse in zip(parts, parts[1:]):
        for nodes in fine.parts():                       # each fine part inside one coarse part
            assert len(set(coarse.assignment[nodes].tolist())) == 1
    with pytest.raises(ValueError, match="strictly decreasing"):
        multiscale_partitions(adj, [10, 10])


def test_multiscale_perm_follows_the_graph():
    """Level-0 subgraphs in the new order are METIS parts of the original graph: their nodes,
    mapped back through perm, stay graph-close (a cut far below a random split's)."""
    rng = np.random.default_rng(3)
    adj = knn_adjacency(rng.random((800, 2)), 6)
    parts, perm = multiscale_partitions(adj, [16, 4])
    csr = to_csr(adj)
    old_assign = np.empty(800, dtype=int)
    old_assign[perm.numpy()] = parts[0].assignment.numpy()
    coo = csr.tocoo()
    cut = np.mean(old_assign[coo.row] != old_assign[coo.col])
    random_cut = np.mean(rng.permutation(old_assign)[coo.row] != rng.permutation(old_assign)[coo.col])
    assert cut < 0.25 * random_cut


def _pe_checks(adj, k):
    pe = laplacian_pe(adj, k).double().numpy()
    assert pe.shape[1] == k
    assert np.allclose(pe.T @ pe, np.eye(k), atol=1e-5)
    lap = normalized_laplacian(adj)
    lv = lap @ pe
    vals = np.sum(pe * lv, axis=0)                       # Rayleigh quotients
    assert np.allclose(lv, pe * vals, atol=1e-4)         # eigenvectors
    assert np.all(np.diff(vals) >= -1e-8) and vals[0] >= -1e-8
    return vals


def test_laplacian_pe_dense_path_skips_trivial_vector():
    adj = knn_adjacency(np.random.default_rng(4).random((300, 2)), 5)
    vals = _pe_checks(adj, 6)
    all_vals = np.linalg.eigvalsh(normalized_laplacian(adj).toarray())
    assert np.allclose(vals, all_vals[1:7], atol=1e-8)


def test_laplacian_pe_sparse_path_on_a_large_graph():
    """The sparse eigensolver path (its time is a benchmark's business, not a test's)."""
    adj = knn_adjacency(np.random.default_rng(5).random((20_000, 2)), 8)
    _pe_checks(adj, 8)


def test_laplacian_pe_small_graph_pads_with_zeros():
    pe = laplacian_pe(np.ones((3, 3)), 5)
    assert pe.shape == (3, 5) and torch.all(pe[:, 2:] == 0)


# ----------------------------------------------------------------------------- hierarchy levels
def _check_token_level(level, num_tokens):
    """Every token in exactly one group (the Partition checks it too; this does not trust it)."""
    assert level.num_nodes == num_tokens
    assert sorted(sum(level.parts(), [])) == list(range(num_tokens))


def test_hierarchy_parts_counts_and_arguments():
    assert hierarchy_parts(100, threshold=100) == []
    assert hierarchy_parts(101, threshold=100, group_size=10) == [11]
    assert hierarchy_parts(15625 * 10, threshold=2048, group_size=64) == [2442, 39]
    with pytest.raises(ValueError, match="group_size"):
        hierarchy_parts(100, threshold=10, group_size=1)
    with pytest.raises(ValueError, match="inter_threshold"):
        hierarchy_parts(100, threshold=0)


def test_token_levels_cover_chain_and_follow_the_graph():
    rng = np.random.default_rng(6)
    adj = knn_adjacency(rng.random((3000, 2)), 6)
    part = partition_graph(adj, 300)
    assert token_levels(adj, part, threshold=300) == []            # at the threshold: dense, no level
    levels = token_levels(adj, part, threshold=20, group_size=8)
    tokens = part.num_parts
    for level in levels:
        _check_token_level(level, tokens)
        assert tokens > 20
        assert int(level.lengths.max()) <= 2 * 8                   # about group_size tokens per group
        tokens = level.num_parts
    assert len(levels) == 2 and tokens <= 20
    # Groups are METIS parts of the graph between subgraphs: of the edges between two subgraphs,
    # far fewer join two groups than under a random grouping of the same sizes.
    sub = part.assignment.numpy()
    coo = to_csr(adj).tocoo()
    between = sub[coo.row] != sub[coo.col]
    row, col = sub[coo.row[between]], sub[coo.col[between]]
    group, shuffled = levels[0].assignment.numpy(), rng.permutation(levels[0].assignment.numpy())
    cut, random_cut = np.mean(group[row] != group[col]), np.mean(shuffled[row] != shuffled[col])
    assert cut < 0.5 * random_cut, (cut, random_cut)
    with pytest.raises(ValueError, match="num_nodes"):
        token_levels(adj[:100, :100], part, threshold=20)


def test_model_partitions_levels_nested_and_contiguous():
    rng = np.random.default_rng(7)
    adj = knn_adjacency(rng.random((2000, 2)), 6)
    parts, levels, perm = model_partitions(adj, [200, 50], threshold=30, group_size=4)
    assert sorted(perm.tolist()) == list(range(2000)) and [p.num_parts for p in parts] == [200, 50]
    assert [len(lv) for lv in levels] == [2, 1]                      # 200 -> 50 -> 13, and 50 -> 13
    for layer, chain in zip(parts, levels):
        node_group = layer.assignment                                  # node -> token of this layer
        tokens = layer.num_parts
        for level in chain:
            _check_token_level(level, tokens)
            for members in level.parts():                              # contiguous ascending runs
                assert members == list(range(members[0], members[0] + len(members)))
            node_group = level.assignment[node_group]                 # node -> group at this level
            tokens = level.num_parts
        assert tokens <= 30
    # Nesting, node by node: layer 0's first level groups its tokens exactly as layer 1's subgraphs do.
    assert torch.equal(levels[0][0].assignment[parts[0].assignment], parts[1].assignment)
    assert torch.equal(levels[0][1].assignment, levels[1][0].assignment)   # one chain above both layers
    small, small_levels, _ = model_partitions(adj, [20], threshold=30)
    assert small_levels == [[]] and small[0].num_parts == 20


def test_model_partitions_groups_a_level_that_max_size_pushed_past_the_threshold():
    """One level asked at the threshold (4 of a 20-node star) comes out with 5 subgraphs when
    capped at 5 nodes (METIS leaves one over the cap, cut again): its tokens still get a group
    level, ending at or below the threshold (an IndexError before)."""
    n = 20
    star = sp.coo_matrix((np.ones(n - 1), (np.zeros(n - 1, int), np.arange(1, n))), shape=(n, n))
    star = star + star.T
    for group_size in (64, 2):
        parts, levels, perm = model_partitions(star, [4], threshold=4, group_size=group_size, max_size=5)
        assert parts[0].num_parts == 5 and int(parts[0].lengths.max()) <= 5
        assert sorted(perm.tolist()) == list(range(n))
        (chain,) = levels
        assert len(chain) >= 1 and chain[-1].num_parts <= 4
        tokens = 5
        for level in chain:
            _check_token_level(level, tokens)
            for members in level.parts():
                assert members == list(range(members[0], members[0] + len(members)))
            tokens = level.num_parts


def test_nested_levels_rejects_partitions_that_do_not_nest():
    fine = Partition.from_assignment(torch.tensor([0, 0, 1, 1, 2, 2]))
    coarse = Partition.from_assignment(torch.tensor([0, 0, 0, 1, 1, 1]))          # splits fine part 1
    with pytest.raises(ValueError, match="nested"):
        nested_levels([fine, coarse])
    good = nested_levels([fine, Partition.from_assignment(torch.tensor([0, 0, 0, 0, 1, 1]))])
    assert good[0].parts() == [[0, 1], [2]]


def test_laplacian_pe_sparse_path_equals_the_dense_solver(monkeypatch):
    """The shift-invert path, forced on small graphs, gives the dense solver's eigenvectors:
    the same k-dimensional subspace, and each column up to sign where its eigenvalue is
    isolated (inside a (near-)degenerate eigenspace a rotation is as right)."""
    adj = knn_adjacency(np.random.default_rng(10).random((1500, 2)), 6)
    k = 8
    exact = laplacian_pe(adj, k).double().numpy()                        # dense path: N <= 2000
    vals = np.linalg.eigvalsh(normalized_laplacian(adj).toarray())[: k + 2]
    monkeypatch.setattr(pe_module, "_DENSE_MAX_NODES", 100)
    fast = laplacian_pe(adj, k).double().numpy()
    assert vals[k + 1] - vals[k] > 1e-3                                  # the subspace is well defined
    overlap = exact.T @ fast
    assert np.allclose(np.linalg.svd(overlap, compute_uv=False), 1, atol=1e-5)
    gaps = np.minimum(np.diff(vals[: k + 1]), np.diff(vals[1: k + 2]))    # to each column's neighbours
    isolated = gaps > 1e-4                     # eigenvalues here are about 5e-3 apart from 1e-4 to 2e-3
    assert isolated.sum() >= k // 2
    assert np.allclose(np.abs(np.diag(overlap))[isolated], 1, atol=1e-5)
    # Disconnected, with isolated nodes: several zero eigenvalues, still eigenvectors.
    parts = [knn_adjacency(np.random.default_rng(i).random((400, 2)), 5) for i in range(3)]
    _pe_checks(sp.block_diag(parts + [sp.csr_matrix((10, 10))]).tocsr(), 6)
