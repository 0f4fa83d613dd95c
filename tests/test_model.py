import numpy as np
import pytest
import torch

import sba_kernels as sk
from sba_model import (InterAttention, SBABlock, SBAttention, SBATransformer, knn_adjacency, partition_graph,
                       token_levels)
from sba_model.forecast.data import load
from sba_model.nn.layers import subgraph_blocks


def _graph(n=120, seed=0):
    return knn_adjacency(np.random.default_rng(seed).random((n, 2)), 5)


def test_sbattention_shapes_and_math():
    adj = _graph()
    part = partition_graph(adj, 8)
    torch.manual_seed(0)
    layer = SBAttention(32, 4, part).double()
    x = torch.randn(3, 120, 32, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape
    # Recompute by hand from the layer's own projections.
    B, N, D = x.shape
    q, k, v = layer.intra.qkv(x).view(B, N, 3, 4, 8).unbind(2)
    h = layer.intra.proj(sk.intra_attention(q, k, v, part).reshape(B, N, D))
    z = torch.stack([h[:, nodes].mean(1) for nodes in part.parts()], 1)
    qz, kz, vz = layer.inter.qkv(z).view(B, -1, 3, 4, 8).unbind(2)
    att = torch.softmax(torch.einsum("bphd,bqhd->bhpq", qz, kz) / 8 ** 0.5, -1)
    g = layer.inter.proj(torch.einsum("bhpq,bqhd->bphd", att, vz).reshape(B, -1, D))
    assert torch.allclose(y, h + g[:, part.assignment], atol=1e-12)


def test_sbattention_is_permutation_equivariant():
    adj = _graph(90, seed=1)
    part = partition_graph(adj, 6)
    torch.manual_seed(1)
    layer = SBAttention(16, 2, part).double()
    perm = torch.randperm(90)
    relabelled = sk.Partition.from_assignment(part.assignment[perm])
    layer_p = SBAttention(16, 2, relabelled).double()
    layer_p.load_state_dict(layer.state_dict())
    x = torch.randn(2, 90, 16, dtype=torch.float64)
    # Parts keep their order in from_assignment, so inter attention sees the same tokens.
    assert torch.allclose(layer_p(x[:, perm]), layer(x)[:, perm], atol=1e-10)


def test_graph_bias_blocks_and_gradient():
    adj = _graph(60, seed=2)
    part = partition_graph(adj, 5)
    blocks = subgraph_blocks(adj, part)
    dense = adj.toarray()
    np.fill_diagonal(dense, 1)
    for p, nodes in enumerate(part.parts()):
        assert np.allclose(blocks[p, : len(nodes), : len(nodes)].numpy(), dense[np.ix_(nodes, nodes)])
        assert torch.all(blocks[p, len(nodes):] == 0) and torch.all(blocks[p, :, len(nodes):] == 0)
    with pytest.raises(ValueError, match="num_nodes"):
        subgraph_blocks(adj[:50, :50], part)
    layer = SBAttention(16, 2, part, adjacency=adj)
    layer(torch.randn(2, 60, 16)).square().sum().backward()
    grad = layer.intra.node_weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_block_without_inter_keeps_subgraphs_apart():
    """Without inter attention a subgraph's output ignores every other subgraph; with it, a
    change in one subgraph reaches all the others through the pooled tokens."""
    part = partition_graph(_graph(), 10)
    x = torch.randn(2, 120, 32, dtype=torch.float64)
    moved = x.clone()
    first = torch.tensor(part.parts()[0])
    moved[:, first] += torch.randn(2, len(first), 32, dtype=torch.float64)
    rest = part.assignment != 0
    for inter in (True, False):
        torch.manual_seed(0)
        block = SBABlock(32, 4, part, inter=inter).double()
        y, y_moved = block(x), block(moved)
        assert y.shape == x.shape
        changed = (y - y_moved)[:, rest].abs().amax().item()
        assert (changed > 1e-6) if inter else (changed == 0.0), (inter, changed)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        SBABlock(30, 4, part)
    with pytest.raises(ValueError, match="embed_dim"):
        SBAttention(0, 1, part)


def test_model_restores_user_node_order():
    """from_graph reorders nodes internally; the output must still be in the caller's order."""
    adj = _graph(100, seed=3)
    torch.manual_seed(0)
    model = SBATransformer.from_graph(adj, [10, 3], in_steps=6, in_channels=2, out_steps=3, out_channels=1,
                                      dim=16, num_heads=2).eval()
    x = torch.randn(2, 6, 100, 2)
    y = model(x)
    assert y.shape == (2, 3, 100, 1)
    # Changing one node's input changes outputs mostly inside its own level-0 subgraph's
    # neighbourhood; in particular the node itself moves.
    x2 = x.clone()
    x2[:, :, 17] += 5.0
    diff = (model(x2) - y).abs().sum(dim=(0, 1, 3))
    assert int(diff.argmax()) == 17


def test_node_embedding_belongs_to_the_users_node():
    """With one node per subgraph and no inter attention nodes never mix, so a node identity
    moves that node's output alone; the identity row of user node u sits at internal position
    inv_perm[u] (``perm[internal] = user id``)."""
    n, k = 40, 11
    torch.manual_seed(0)
    singletons = sk.Partition.from_assignment(torch.arange(n))
    build = lambda **kw: SBATransformer(n, 4, 1, 2, 1, [singletons], dim=8, num_heads=2, inter=False,
                                        perm=torch.randperm(n, generator=torch.Generator().manual_seed(1)), **kw)
    model = build(node_embedding=True).eval()
    assert model.node_id.shape == (n, 8) and not model.node_id.any()    # zero at the start
    assert int(model.inv_perm[k]) != k
    x = torch.randn(3, 4, n, 1)
    y = model(x)
    with torch.no_grad():
        model.node_id[model.inv_perm[k]] = torch.randn(8)
    moved = (model(x) - y).abs().sum(dim=(0, 1, 3))
    assert moved[k] > 1e-4 and moved[torch.arange(n) != k].max() == 0
    model.train()
    model(x).square().sum().backward()
    assert model.node_id.grad.abs().sum(-1).gt(0).all()              # every node's identity learns
    plain = build()
    assert plain.node_id is None and len(list(model.parameters())) == len(list(plain.parameters())) + 1


def test_calendar_embeddings_start_small_next_to_the_history():
    """Time-of-day and day-of-week embeddings are added to every node's token, the same for all
    nodes. At nn.Embedding's N(0, 1) start they outweighed the history embedding of
    standard-scaled inputs (norm about sqrt(dim) against about 0.6 sqrt(dim)), and on los_loop
    every SBA model sat at one validation MAE for three or four epochs
    (`bench/results/los_loop_calendar_init.md`). They start at std 0.02, a few percent of it."""
    torch.manual_seed(0)
    part = partition_graph(_graph(), 4)
    model = SBATransformer(120, 12, 1, 3, 1, [part], dim=64, num_heads=4, steps_per_day=288, day_of_week=True)
    history = model.embed(torch.randn(64, 12)).norm(dim=-1).mean()
    for table in (model.tod, model.dow):
        assert table.weight.norm(dim=-1).max() < 0.1 * history
        assert table.weight.std() > 0          # small, not zero: every slot starts distinct


def test_model_rejects_bad_input():
    part = partition_graph(_graph(), 4)
    model = SBATransformer(120, 4, 1, 2, 1, [part], dim=16, num_heads=2, steps_per_day=24)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 4, 119, 1))
    with pytest.raises(ValueError, match="tod"):
        model(torch.randn(2, 4, 120, 1))
    with pytest.raises(ValueError, match="partitions"):
        SBATransformer(121, 4, 1, 2, 1, [part])
    x = torch.randn(2, 4, 120, 1)
    with pytest.raises(ValueError, match=r"tod must lie in \[0, 24\), got values from 0 to 24"):
        model(x, torch.tensor([0, 24]))
    with pytest.raises(ValueError, match=r"tod must lie in \[0, 24\), got values from -1"):
        model(x, torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="tod must hold integer slots"):
        model(x, torch.tensor([0.0, 23.9]))
    assert model(x, torch.tensor([0, 23])).shape == (2, 2, 120, 1)
    assert SBATransformer(120, 4, 1, 2, 1, [part], dim=16, num_heads=2, steps_per_day=np.int64(24)).tod.num_embeddings == 24
    for bad in (0, -24, 24.0):
        with pytest.raises(ValueError, match="steps_per_day must be a positive int or None"):
            SBATransformer(120, 4, 1, 2, 1, [part], dim=16, num_heads=2, steps_per_day=bad)
    weekly = SBATransformer(120, 4, 1, 2, 1, [part], dim=16, num_heads=2, day_of_week=True)
    with pytest.raises(ValueError, match=r"dow must lie in \[0, 7\)"):
        weekly(x, dow=torch.tensor([0, 7]))


@pytest.mark.parametrize("layer", ["SBAttention", "SBABlock"])
def test_layers_name_a_bad_x(layer):
    """Wrong width, node count, rank or dtype: a ValueError / TypeError naming x, not a matmul's
    shape error from inside."""
    part = partition_graph(_graph(), 4)
    module = {"SBAttention": SBAttention, "SBABlock": SBABlock}[layer](16, 2, part)
    assert module(torch.randn(2, 120, 16)).shape == (2, 120, 16)
    for bad in (torch.randn(2, 120, 15), torch.randn(2, 119, 16), torch.randn(120, 16)):
        with pytest.raises(ValueError, match=r"x must be \[B, N=120, D=16\], got shape"):
            module(bad)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        module(torch.zeros(2, 120, 16, dtype=torch.long))


def test_a_state_dict_loads_only_into_the_same_node_order():
    """Partitions are not in a state dict, only the node order they gave (`perm`): a checkpoint of
    a model with other subgraphs loaded "with all keys matched", its weights then meeting other
    sensors' subgraphs. Refused by name; a rebuild from the same graph and parts loads."""
    adj = _graph()
    kw = dict(in_steps=4, in_channels=1, out_steps=2, out_channels=1, dim=16, num_heads=2)
    torch.manual_seed(0)
    model = SBATransformer.from_graph(adj, [6, 2], **kw)
    rebuilt = SBATransformer.from_graph(adj, [6, 2], **kw)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 4, 120, 1)
    assert torch.equal(model.eval()(x), rebuilt.eval()(x))
    other = SBATransformer.from_graph(adj, [5, 2], **kw)
    assert not torch.equal(other.perm, model.perm)
    with pytest.raises(ValueError, match="state_dict: its model was built with another node order"):
        other.load_state_dict(model.state_dict())


def test_model_and_inter_attention_name_bad_inputs():
    model = SBATransformer.from_graph(_graph(), [6, 2], in_steps=4, in_channels=1, out_steps=2, out_channels=1,
                                      dim=16, num_heads=2)
    with pytest.raises(ValueError, match=r"x must be \[B >= 1, 4, 120, 1\], got \(0, 4, 120, 1\)"):
        model(torch.randn(0, 4, 120, 1))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        model(torch.ones(1, 4, 120, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model(np.ones((1, 4, 120, 1), np.float32))
    with pytest.raises(TypeError, match="perm must hold integer node ids"):
        SBATransformer(120, 4, 1, 2, 1, [partition_graph(_graph(), 4)], dim=16, num_heads=2,
                       perm=torch.arange(120) + 0.5)
    part = partition_graph(_graph(), 4)
    for name, args in (("in_steps", (120, 0, 1, 2, 1)), ("out_steps", (120, 4, 1, 0, 1)), ("in_channels", (120, 4, True, 2, 1))):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            SBATransformer(*args, [part], dim=16, num_heads=2)
    pe = np.random.default_rng(0).random((120, 3))
    assert torch.equal(SBATransformer(120, 4, 1, 2, 1, [part], dim=16, num_heads=2, pe=pe).pe, torch.as_tensor(pe).float())
    inter = InterAttention(16, 2)
    assert inter(torch.randn(1, 5, 16)).shape == (1, 5, 16)
    for bad in (torch.randn(1, 5, 8), torch.randn(5, 16)):
        with pytest.raises(ValueError, match=r"z must be a \[B, P, D=16\] tensor"):
            inter(bad)


def test_torch_compile_traces_the_model_with_its_calendar_in_one_graph():
    """The tod/dow range check reads values; inside a torch.compile trace it would break the
    graph (fullgraph=True failed): it stays out of traces, and the compiled model equals eager."""
    model = SBATransformer.from_graph(_graph(60), [6, 2], in_steps=4, in_channels=1, out_steps=2, out_channels=1,
                                      dim=16, num_heads=2, steps_per_day=24, day_of_week=True, backend="sdpa").eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, tod, dow = torch.randn(2, 4, 60, 1), torch.tensor([0, 23]), torch.tensor([6, 0])
    torch.testing.assert_close(compiled(x, tod, dow), model(x, tod, dow))


def test_module_to_moves_partition():
    part = partition_graph(_graph(), 4)
    layer = SBAttention(16, 2, part).to("meta")
    assert layer.partition.device.type == "meta" and layer.intra.partition.device.type == "meta"


def test_overfits_one_batch():
    adj = load("los_loop").adjacency
    torch.manual_seed(0)
    model = SBATransformer.from_graph(adj, [16, 4], in_steps=12, in_channels=1, out_steps=4, out_channels=1,
                                      dim=32, num_heads=4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 12, 207, 1, generator=g), torch.randn(2, 4, 207, 1, generator=g)
    steps = 400
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=steps)
    with torch.no_grad():
        first = (model.eval()(x) - y).abs().mean().item()
    model.train()
    for _ in range(steps):
        loss = (model(x) - y).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        last = (model.eval()(x) - y).abs().mean().item()
    assert last < 0.01 * first, (first, last)


# ----------------------------------------------------------------------------- hierarchical inter attention
def _dense_layer_reference(layer, x, part):
    """SBAttention with today's dense inter attention, by hand from the layer's own weights."""
    B, N, D = x.shape
    H = layer.inter.num_heads
    d = D // H
    q, k, v = layer.intra.qkv(x).view(B, N, 3, H, d).unbind(2)
    h = layer.intra.proj(sk.intra_attention(q, k, v, part).reshape(B, N, D))
    z = torch.stack([h[:, nodes].mean(1) for nodes in part.parts()], 1)
    qz, kz, vz = layer.inter.qkv(z).view(B, -1, 3, H, d).unbind(2)
    att = torch.softmax(torch.einsum("bphd,bqhd->bhpq", qz, kz) / d ** 0.5, -1)
    g = layer.inter.proj(torch.einsum("bhpq,bqhd->bphd", att, vz).reshape(B, -1, D))
    return h + g[:, part.assignment]


@pytest.mark.parametrize("threshold, with_graph", [(8, True), (8, False), (2048, False)])
def test_inter_at_or_below_threshold_is_exactly_dense(threshold, with_graph):
    """P = 8 subgraphs: at the threshold (8) and below it the layer is today's dense layer, in
    outputs and gradients. With the graph given, a hierarchy could be built if it were
    (wrongly) wanted at P == threshold; without it, none is needed."""
    adj = _graph()
    part = partition_graph(adj, 8)
    torch.manual_seed(0)
    layer = SBAttention(32, 4, part, adjacency=adj if with_graph else None, inter_threshold=threshold).double()
    assert layer.inter.levels == []
    if with_graph:
        with torch.no_grad():
            layer.intra.node_weight.zero_()     # the hand reference has no graph bias
    x = torch.randn(3, 120, 32, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 120, 32, dtype=torch.float64)
    ours, ref = layer(x), _dense_layer_reference(layer, x, part)
    assert (ours - ref).abs().max() < 1e-12
    params = [x, layer.inter.qkv.weight, layer.inter.proj.weight, layer.intra.qkv.weight]
    g_ours = torch.autograd.grad(ours, params, grad)
    g_ref = torch.autograd.grad(ref, params, grad)
    for a, b in zip(g_ours, g_ref):
        assert (a - b).abs().max() < 1e-12


def _masked_dense_hierarchy(q, k, v, levels):
    """The hierarchy by hand: dense attention with a same-group mask, group means through a
    dense averaging matrix, recursion, broadcast back. q, k, v ``[B, T, H, d]``."""
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    if not levels:
        return torch.einsum("bhts,bshd->bthd", torch.softmax(scores, -1), v)
    a = levels[0].assignment
    same = a[:, None] == a[None, :]
    local = torch.einsum("bhts,bshd->bthd", torch.softmax(scores.masked_fill(~same, float("-inf")), -1), v)
    member = (a[None, :] == torch.arange(levels[0].num_parts)[:, None]).to(q.dtype)     # [G, T]
    mean = member / member.sum(1, keepdim=True)
    far = _masked_dense_hierarchy(*(torch.einsum("gt,bthd->bghd", mean, t) for t in (q, k, v)), levels[1:])
    return local + torch.einsum("gt,bghd->bthd", member, far)


def test_hierarchical_inter_matches_masked_dense_reference():
    adj = _graph(600, seed=4)
    part = partition_graph(adj, 60)
    levels = token_levels(adj, part, threshold=10, group_size=4)
    assert [lv.num_nodes for lv in levels] == [60, levels[0].num_parts] and levels[-1].num_parts <= 10
    torch.manual_seed(0)
    layer = SBAttention(32, 4, part, inter_threshold=10, inter_levels=levels).double()
    x = torch.randn(2, 600, 32, dtype=torch.float64, requires_grad=True)
    B, N, D = x.shape
    h, z = layer.intra.forward_pooled(x)
    qz, kz, vz = layer.inter.qkv(z).view(B, -1, 3, 4, 8).unbind(2)
    g = layer.inter.proj(_masked_dense_hierarchy(qz, kz, vz, levels).reshape(B, -1, D))
    ref = h + g[:, part.assignment]
    ours = layer(x)
    assert (ours - ref).abs().max() < 1e-12
    assert (ours - _dense_layer_reference(layer, x, part)).abs().max() > 1e-3   # it is not the dense layer
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, [x, layer.inter.qkv.weight], grad),
                    torch.autograd.grad(ref, [x, layer.inter.qkv.weight], grad)):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("backend", [b for b in sk.available_backends() if b != "torch"])
def test_hierarchical_inter_on_every_backend(backend):
    adj = _graph(400, seed=5)
    part = partition_graph(adj, 40)
    levels = token_levels(adj, part, threshold=6, group_size=4)
    torch.manual_seed(0)
    ref = InterAttention(64, 4, levels=levels, backend="torch").double()
    ours = InterAttention(64, 4, levels=levels, backend=backend)
    ours.load_state_dict(ref.state_dict())
    z = torch.randn(2, 40, 64, dtype=torch.float64)
    expect, got = ref(z), ours(z.float())
    assert ((got.double() - expect).norm() / expect.norm()) < 1e-5


def test_inter_levels_are_checked():
    adj = _graph(600, seed=4)
    part = partition_graph(adj, 60)
    levels = token_levels(adj, part, threshold=10, group_size=4)
    with pytest.raises(ValueError, match="adjacency"):
        SBAttention(16, 2, part, inter_threshold=10)
    with pytest.raises(ValueError, match="inter_threshold"):
        SBAttention(16, 2, part, inter_threshold=0)
    with pytest.raises(ValueError, match=r"inter_levels\[0\] groups 60 tokens, not more than"):
        SBAttention(16, 2, part, inter_levels=levels)                     # default threshold 2048 > 60
    with pytest.raises(ValueError, match="leave .* tokens at the top"):
        SBAttention(16, 2, part, inter_threshold=10, inter_levels=levels[:1])
    with pytest.raises(ValueError, match=r"inter_levels\[0\] must group 60 tokens"):
        SBAttention(16, 2, part, inter_threshold=10, inter_levels=levels[1:])
    with pytest.raises(TypeError, match=r"inter_levels\[0\]"):
        SBAttention(16, 2, part, inter_threshold=10, inter_levels=["not a partition"])
    with pytest.raises(ValueError, match=r"levels\[1\] must group"):
        InterAttention(16, 2, levels=levels[::-1])
    with pytest.raises(ValueError, match="z must be"):
        InterAttention(16, 2, levels=levels)(torch.randn(1, 59, 16))
    built = SBAttention(16, 2, part, adjacency=adj, inter_threshold=10)   # levels from the graph
    assert built.inter.levels and built.inter.levels[-1].num_parts <= 10


def test_module_to_moves_inter_levels():
    adj = _graph(600, seed=4)
    part = partition_graph(adj, 60)
    layer = SBAttention(16, 2, part, adjacency=adj, inter_threshold=10).to("meta")
    assert all(lv.device.type == "meta" and lv.assignment.device.type == "meta" for lv in layer.inter.levels)


def test_model_from_graph_caps_the_first_layers_subgraphs():
    adj = _graph(1000, seed=7)
    plain = SBATransformer.from_graph(adj, [16, 4], in_steps=3, in_channels=1, out_steps=2, out_channels=1,
                                      dim=16, num_heads=2, pe_dim=0)
    capped = SBATransformer.from_graph(adj, [16, 4], in_steps=3, in_channels=1, out_steps=2, out_channels=1,
                                       dim=16, num_heads=2, pe_dim=0, max_size=63)
    assert plain.blocks[0].partition.max_size > 63                # METIS's imbalance: some parts over 1000 / 16
    assert capped.blocks[0].partition.max_size <= 63
    fine, coarse = capped.blocks[0].partition, capped.blocks[1].partition     # still nested
    assert all(len({int(coarse.assignment[i]) for i in part}) == 1 for part in fine.parts())
    capped(torch.randn(2, 3, 1000, 1)).square().sum().backward()


def test_model_from_graph_builds_hierarchy_above_threshold():
    adj = _graph(400, seed=6)
    model = SBATransformer.from_graph(adj, [40, 12], in_steps=3, in_channels=1, out_steps=2, out_channels=1,
                                      dim=16, num_heads=2, inter_threshold=10)
    tokens = [len(b.inter.levels) for b in model.blocks]
    assert tokens[0] >= 1 and tokens[1] >= 1                      # both layers are above 10 tokens
    assert model.blocks[0].inter.levels[0].num_parts == model.blocks[1].partition.num_parts
    x = torch.randn(2, 3, 400, 1)
    model(x).square().sum().backward()
    assert model.blocks[0].inter.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one list per layer"):
        SBATransformer(400, 3, 1, 2, 1, [b.partition for b in model.blocks], inter_levels=[[]])
