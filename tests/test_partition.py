import numpy as np
import pytest
import torch

from sba_kernels import Partition


def test_from_assignment_groups_nodes_and_pads():
    a = torch.tensor([2, 0, 2, 1, 0, 2])
    p = Partition.from_assignment(a)
    assert p.num_parts == 3 and p.max_size == 3 and p.num_nodes == 6
    assert p.parts() == [[1, 4], [3], [0, 2, 5]]
    assert p.index[1].tolist() == [3, -1, -1]
    assert p.index.dtype == torch.int32 and p.lengths.dtype == torch.int32
    assert torch.equal(p.assignment, a)


def test_from_assignment_drops_empty_parts_and_renumbers():
    p = Partition.from_assignment([4, 4, 1], num_parts=6)
    assert p.parts() == [[2], [0, 1]]
    assert p.assignment.tolist() == [1, 1, 0]


def test_assignment_inverts_index_on_random_partitions():
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        a = torch.randint(0, 7, (50,), generator=g)
        p = Partition.from_assignment(a)
        for part_id, nodes in enumerate(p.parts()):
            assert all(int(p.assignment[n]) == part_id for n in nodes)
        assert sorted(sum(p.parts(), [])) == list(range(50))


@pytest.mark.parametrize(
    "index, lengths, num_nodes, match",
    [
        ([[0, 1], [1, -1]], [2, 1], 3, "exactly once"),                 # repeated (and missing)
        ([[0, 1], [3, -1]], [2, 1], 3, "out of range"),
        ([[0, 1], [2, 5]], [2, 1], 3, "padding slot"),                  # padding not -1
        ([[0, -1], [2, 1]], [2, 2], 3, "out of range"),                 # -1 in a real slot
        ([[0, 1], [2, -1]], [2, 0], 3, "lengths must be >= 1"),
        ([[0, 1], [2, -1]], [3, 1], 3, "lengths must be <="),
        ([[0, 1], [2, -1]], [2, 1], 4, "exactly once"),                  # node 3 missing
    ],
)
def test_bad_layout_raises_value_error_naming_the_argument(index, lengths, num_nodes, match):
    with pytest.raises(ValueError, match=match):
        Partition(torch.tensor(index), torch.tensor(lengths), num_nodes=num_nodes)


def test_bad_types_and_ranks():
    with pytest.raises(TypeError, match="index"):
        Partition(torch.tensor([[0.0, 1.0]]), torch.tensor([2]))
    with pytest.raises(TypeError, match="index"):
        Partition([[0, 1]], torch.tensor([2]))
    with pytest.raises(ValueError, match="index must have shape"):
        Partition(torch.tensor([0, 1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        Partition(torch.tensor([[0, 1]]), torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="assignment"):
        Partition.from_assignment([0, -1])
    with pytest.raises(ValueError, match="num_parts"):
        Partition.from_assignment([0, 3], num_parts=2)
    with pytest.raises(TypeError, match="num_parts must be an int"):
        Partition.from_assignment([0, 1], num_parts=2.0)
    with pytest.raises(ValueError, match="num_parts must be >= 1"):
        Partition.from_assignment([0, 1], num_parts=0)
    with pytest.raises(ValueError, match="lengths must be >= 1"):      # lengths, not the num_nodes they imply
        Partition(torch.tensor([[0, 1]]), torch.tensor([-2]))
    with pytest.raises(TypeError, match="parts must hold integers"):   # 0.9 and 1.7 were cut to 0 and 1
        Partition.from_parts([[0.9, 1.7], [2.2]])
    assert Partition(torch.tensor([[0, 1]]), torch.tensor([2]), num_nodes=np.int64(2)).num_nodes == 2


def test_from_assignment_memory_follows_n_not_the_largest_id():
    """Sparse ids are compacted by sorting: ids 0 and 10^12 make two subgraphs of one node, with
    no table of 10^12 counts (it took 24 bytes per possible id: 10^9 was killed for memory)."""
    p = Partition.from_assignment(torch.tensor([10**12, 0, 10**12, 7]))
    assert p.parts() == [[1], [3], [0, 2]]


def test_to_keeps_layout():
    p = Partition.from_assignment([0, 1, 1])
    q = p.to("cpu")
    assert q is p
    meta = p.to("meta")
    assert meta.device.type == "meta" and meta.num_nodes == 3


def test_partition_is_immutable_once_checked():
    index = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    lengths = torch.tensor([2, 1], dtype=torch.int32)
    part = Partition(index, lengths)
    index[0, 0] = 2                  # the caller's tensors change later: the partition does not
    lengths[1] = 2
    assert part.index.tolist() == [[0, 1], [2, -1]] and part.lengths.tolist() == [2, 1]
    with pytest.raises(AttributeError):
        part.index = index
    with pytest.raises(AttributeError):
        part.num_nodes = 5
