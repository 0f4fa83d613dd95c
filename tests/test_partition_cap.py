"""Size-capped partitions: ``partition_graph(..., max_size=M)`` and ``multiscale_partitions(...,
max_size=M)`` never make a subgraph of more than M nodes, on any graph, including the ones METIS
balances badly (a star: it keeps every leaf with the hub) and when METIS misses its tolerance.

Every case draws a fresh graph and cap; the seed is printed so that a failure can be replayed.
"""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from sba_model import knn_adjacency, multiscale_partitions, partition_graph, to_csr
from sba_model.graph import partitioning


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print(f"numpy seed {seed}")
    return np.random.default_rng(seed)


def _edge_index(src, dst) -> np.ndarray:
    return np.stack([np.asarray(src), np.asarray(dst)])


def _knn(rng, n):
    return knn_adjacency(rng.random((n, 2)), int(rng.integers(3, 10)))


def _star(rng, n):
    """One hub joined to every other node."""
    return _edge_index(np.zeros(n - 1, dtype=int), np.arange(1, n))


def _hubs(rng, n):
    """A few stars of random sizes whose hubs form a ring, plus a few random edges."""
    hubs = int(rng.integers(2, 6))
    owner = rng.integers(0, hubs, n - hubs)
    src = np.concatenate([owner, np.arange(hubs), rng.integers(0, n, n // 20)])
    dst = np.concatenate([np.arange(hubs, n), (np.arange(hubs) + 1) % hubs, rng.integers(0, n, n // 20)])
    keep = src != dst
    return _edge_index(src[keep], dst[keep])


def _preferential(rng, n):
    """Preferential attachment: each node joins two earlier nodes picked by degree (power-law degrees)."""
    ends = [0, 1]
    src, dst = [1], [0]
    for node in range(2, n):
        for target in {ends[int(rng.integers(len(ends)))] for _ in range(2)}:
            src.append(node)
            dst.append(target)
            ends += [node, target]
    return _edge_index(src, dst)


def _islands(rng, n):
    """Three k-NN clusters, no edges between them, and isolated nodes."""
    sizes = rng.multinomial(n - 10, [1 / 3] * 3)
    blocks = [knn_adjacency(rng.random((int(s), 2)), 4) for s in sizes] + [sp.csr_matrix((10, 10))]
    return sp.block_diag(blocks).tocsr()


GRAPHS = [_knn, _star, _hubs, _preferential, _islands]


def _check_cover(part, n):
    assert sorted(sum(part.parts(), [])) == list(range(n))


def _check_capped(part, n, max_size):
    _check_cover(part, n)
    lengths = part.lengths.numpy()
    assert lengths.max() <= max_size, (lengths.max(), max_size)
    assert lengths.min() >= 1


@pytest.mark.parametrize("graph", GRAPHS, ids=lambda g: g.__name__.strip("_"))
def test_every_subgraph_fits_the_cap(graph, rng):
    n = int(rng.integers(300, 3000))
    max_size = int(rng.integers(2, 130))
    adj = graph(rng, n)
    part = partition_graph(adj, max_size=max_size, seed=int(rng.integers(1000)))
    _check_capped(part, n, max_size)
    assert part.num_parts >= math.ceil(n / max_size)
    # with a given num_parts too, anywhere from the fewest that can hold the graph upwards
    fewest = math.ceil(n / max_size)
    num_parts = int(rng.integers(fewest, 2 * fewest + 1))
    _check_capped(partition_graph(adj, num_parts, max_size=max_size), n, max_size)


def test_knn_subgraphs_stay_close_to_the_cap(rng):
    """The cap costs few tile rows: on k-NN graphs the count is the ceil(1.02 N / max_size) METIS
    is asked for, give or take a few re-cut parts, and the subgraphs average >= 90 % of the cap
    (re-cutting METIS's usual one-node overshoots in halves would give about 67 %)."""
    n = int(rng.integers(4000, 8000))
    for max_size in (32, 64, 128):
        part = partition_graph(_knn(rng, n), max_size=max_size)
        _check_capped(part, n, max_size)
        asked = math.ceil(n * 1.02 / max_size)
        assert asked - 2 <= part.num_parts <= asked + max(2, asked // 50), (part.num_parts, asked)
        assert n / part.num_parts >= 0.9 * max_size


def test_default_num_parts_and_what_metis_is_asked(monkeypatch, rng):
    """METIS gets ceil(1.02 N / max_size) parts (one when the graph fits one) and a tolerance
    whose bound, (1 + ufactor / 1000) x the average part, stays under max_size + 1."""
    calls = []
    kway = partitioning._kway_assignment
    monkeypatch.setattr(partitioning, "_kway_assignment",
                        lambda a, k, **kw: calls.append((a.shape[0], k, kw.get("ufactor"))) or kway(a, k, **kw))
    n = int(rng.integers(1000, 3000))
    adj = _knn(rng, n)
    for max_size in (17, 64, 100):
        calls.clear()
        partition_graph(adj, max_size=max_size)
        nodes, parts, ufactor = calls[0]
        assert (nodes, parts) == (n, math.ceil(n * 1.02 / max_size))
        assert 1 <= ufactor <= 30 and (1 + ufactor / 1000) * n / parts < max_size + 1
    calls.clear()
    whole = partition_graph(adj, max_size=n)
    assert whole.num_parts == 1 and calls == []


def test_cap_holds_when_metis_ignores_it(monkeypatch, rng):
    """METIS stand-ins that put everything in one part, or in parts of random sizes: the
    re-cut still caps every subgraph, and on a path its pieces are paths (connected)."""
    n = int(rng.integers(200, 2000))
    max_size = int(rng.integers(5, 70))
    path = _edge_index(np.arange(n - 1), np.arange(1, n))
    monkeypatch.setattr(partitioning, "_kway_assignment", lambda a, k, **kw: np.zeros(a.shape[0], dtype=np.int64))
    part = partition_graph(path, max_size=max_size)
    _check_capped(part, n, max_size)
    assert part.num_parts == math.ceil(n / max_size)                 # equal runs: as few pieces as fit
    csr = to_csr(path)
    for nodes in part.parts():
        assert sp.csgraph.connected_components(csr[nodes][:, nodes])[0] == 1
    monkeypatch.setattr(partitioning, "_kway_assignment",
                        lambda a, k, **kw: rng.integers(0, max(1, k // 3), a.shape[0]))
    _check_capped(partition_graph(_knn(rng, n), max_size=max_size), n, max_size)


def test_overfull_parts_are_recut_into_as_few_pieces_as_fit(monkeypatch, rng):
    """A first METIS call that leaves every part at about 1.5 x the cap: each is re-cut into two
    pieces (not more: tiles stay full), and every piece fits."""
    n = int(rng.integers(1000, 3000))
    max_size = int(rng.integers(10, 60))
    blocks = math.ceil(n / (1.5 * max_size))
    kway = partitioning._kway_assignment
    first = []

    def overfull_first(a, k, **kw):
        if first:
            return kway(a, k, **kw)
        first.append(k)
        return np.arange(a.shape[0]) * blocks // a.shape[0]

    monkeypatch.setattr(partitioning, "_kway_assignment", overfull_first)
    part = partition_graph(_knn(rng, n), max_size=max_size)
    _check_capped(part, n, max_size)
    assert part.num_parts == 2 * blocks


def test_cap_holds_through_the_two_stage_cut(monkeypatch, rng):
    """Many parts are cut in two stages (regions, then parts per region): each region's METIS
    call gets a tolerance from its own size and share, and the cap holds."""
    monkeypatch.setattr(partitioning, "_KWAY_MAX_PARTS", 16)
    monkeypatch.setattr(partitioning, "_REGION_PARTS", 8)
    calls = []
    kway = partitioning._kway_assignment
    monkeypatch.setattr(partitioning, "_kway_assignment",
                        lambda a, k, **kw: calls.append((a.shape[0], k, kw.get("ufactor"))) or kway(a, k, **kw))
    n = int(rng.integers(3000, 6000))
    max_size = int(rng.integers(50, 61))              # 52..123 parts: 7..16 regions, cut in one stage
    part = partition_graph(_knn(rng, n), max_size=max_size)
    _check_capped(part, n, max_size)
    regions, *per_region = calls
    assert regions[1] == math.ceil(math.ceil(n * 1.02 / max_size) / 8) and regions[2] is None
    assert len(per_region) >= regions[1]
    for nodes, parts, ufactor in per_region:
        assert (1 + ufactor / 1000) * nodes / parts < max_size + 1


def test_multiscale_caps_the_finest_level_and_stays_nested(rng):
    n = int(rng.integers(1500, 3000))
    max_size = int(rng.integers(20, 80))
    fewest = math.ceil(n / max_size)
    parts, perm = multiscale_partitions(_knn(rng, n), [fewest + 3, fewest // 4 + 1, 2], max_size=max_size)
    assert sorted(perm.tolist()) == list(range(n))
    _check_capped(parts[0], n, max_size)
    assert len(parts) == 3 and parts[1].num_parts <= fewest // 4 + 1 and parts[2].num_parts <= 2
    for level in parts:
        for nodes in level.parts():                                   # contiguous ascending runs
            assert nodes == list(range(nodes[0], nodes[0] + len(nodes)))
    for fine, coarse in zip(parts, parts[1:]):
        for nodes in fine.parts():                                    # each fine part inside one coarse part
            assert len(set(coarse.assignment[nodes].tolist())) == 1
    with pytest.raises(ValueError, match=r"parts\[0\]"):
        multiscale_partitions(_knn(rng, n), [fewest - 1, 2], max_size=max_size)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("64", TypeError),
                                        (True, TypeError), (64.0, TypeError)])
def test_bad_max_size_raises_naming_it(bad, error):
    adj = _star(None, 50)
    with pytest.raises(error, match="max_size"):
        partition_graph(adj, max_size=bad)
    with pytest.raises(error, match="max_size"):
        multiscale_partitions(adj, [10, 2], max_size=bad)


def test_num_parts_rules():
    adj = _star(None, 100)
    with pytest.raises(ValueError, match="num_parts"):
        partition_graph(adj, 9, max_size=10)                          # 9 x 10 < 100 nodes
    with pytest.raises(ValueError, match="num_parts"):
        partition_graph(adj, 0, max_size=10)
    with pytest.raises(TypeError, match="num_parts or max_size"):
        partition_graph(adj)
    _check_capped(partition_graph(adj, 10, max_size=np.int64(10)), 100, 10)   # no room to spare
    assert partition_graph(adj, 500, max_size=3).max_size == 1         # more parts than nodes: singletons
    assert partition_graph(knn_adjacency(np.random.default_rng(0).random((200, 2)), 5), num_parts=4).num_parts == 4
