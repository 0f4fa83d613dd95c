"""Spatial sharding over torch.distributed: two gloo ranks in spawned processes compute exactly
what one process computes, forward and every parameter gradient, in float64."""

import itertools
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sba_kernels as sk
from sba_model import SBATransformer, knn_adjacency
from sba_model.nn import distributed as sd

WORLD = 2
N = 90


def _model() -> SBATransformer:
    """Three nested levels, graph bias with nonzero weights, PE (sign flips on), calendar
    embeddings, last-value residual: every path a shard must get right."""
    adj = knn_adjacency(np.random.default_rng(0).random((N, 2)), 5)
    torch.manual_seed(0)
    model = SBATransformer.from_graph(adj, [12, 5, 3], in_steps=4, in_channels=2, out_steps=3, out_channels=2,
                                      dim=16, num_heads=2, steps_per_day=24, day_of_week=True,
                                      last_value_residual=True).double()
    with torch.no_grad():
        for block in model.blocks:
            block.intra.node_weight.normal_()
    model.pe_generator = torch.Generator().manual_seed(1)
    return model.train()


def _inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, N, 2, generator=g, dtype=torch.float64)
    tod, dow = torch.randint(0, 24, (3,), generator=g), torch.randint(0, 7, (3,), generator=g)
    weights = torch.randn(3, 3, N, 2, generator=g, dtype=torch.float64)      # loss = sum(weights * y)
    return x, tod, dow, weights


def _all_gather_dropping_remote_grads(tensor, gather_dim, group):
    """The planted bug: a gather whose other ranks' rows carry no gradient back."""
    every = sd.funcol.all_gather_single(tensor.detach(), gather_dim, group)
    n, r = tensor.shape[0], dist.get_rank(group)
    return torch.cat([every[: r * n], tensor, every[(r + 1) * n:]])


def _rank(rank, init_file, out_dir, plant_bug):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        if plant_bug:
            sd.funcol.all_gather_single_autograd = _all_gather_dropping_remote_grads
        model = _model()
        plan = sd.plan_spatial([b.partition for b in model.blocks], WORLD)
        shard = sd.SpatialShard(model, plan, rank)
        x, tod, dow, weights = _inputs()
        nodes = shard.user_nodes
        y = shard(x[:, :, nodes], tod, dow)
        (y * weights[:, :, nodes]).sum().backward()
        sd.allreduce_gradients(model.parameters())
        torch.save({"nodes": nodes, "y": y.detach(), "plan": plan,
                    "grads": {n: p.grad for n, p in model.named_parameters()}}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _sharded_run(tmp_path, plant_bug=False):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path), plant_bug), nprocs=WORLD)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single_process():
    model = _model()
    x, tod, dow, weights = _inputs()
    y = model(x, tod, dow)
    (y * weights).sum().backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters()}


def _mismatches(ranks, ref_y, ref_grads):
    """Names of what differs from the single process (forward rows, gradients), beyond 1e-10 relative."""
    bad = []
    for r, out in enumerate(ranks):
        if not torch.allclose(out["y"], ref_y[:, :, out["nodes"]], rtol=1e-10, atol=1e-12):
            bad.append(f"rank {r} forward")
        bad += [f"rank {r} grad {n}" for n, g in out["grads"].items()
                if not torch.allclose(g, ref_grads[n], rtol=1e-10, atol=1e-12)]
    return bad


def test_two_gloo_ranks_compute_the_single_process_model(tmp_path):
    ranks = _sharded_run(tmp_path)
    ref_y, ref_grads = _single_process()
    assert torch.equal(torch.cat([r["nodes"] for r in ranks]).sort().values, torch.arange(N))
    plan = ranks[0]["plan"]
    assert plan.counts(2) in ([2, 1], [1, 2])        # uneven token counts: the padding path runs
    assert all(ref_grads[n].abs().sum() > 0 for n in ref_grads)
    assert _mismatches(ranks, ref_y, ref_grads) == []


def test_the_equivalence_check_catches_a_gather_without_gradient(tmp_path):
    """The same check with the planted bug: the forward still agrees, gradients must not."""
    ranks = _sharded_run(tmp_path, plant_bug=True)
    ref_y, ref_grads = _single_process()
    bad = _mismatches(ranks, ref_y, ref_grads)
    assert bad and not any("forward" in b for b in bad)
    assert any("intra.qkv" in b for b in bad)


# ----------------------------------------------------------------------------- the plan, in one process
def test_balanced_bounds_minimise_the_largest_rank():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 20, size=rng.integers(1, 9)).tolist()
        w = int(rng.integers(1, len(sizes) + 1))
        b = sd.balanced_bounds(sizes, w)
        assert len(b) == w + 1 and b[0] == 0 and b[-1] == len(sizes) and all(x < y for x, y in zip(b, b[1:]))
        best = min(max(sum(sizes[i:j]) for i, j in zip((0,) + cut, cut + (len(sizes),)))
                   for cut in itertools.combinations(range(1, len(sizes)), w - 1))
        assert max(sum(sizes[i:j]) for i, j in zip(b, b[1:])) == best
    with pytest.raises(ValueError, match="world_size=3 ranks need"):
        sd.balanced_bounds([4, 4], 3)
    with pytest.raises(ValueError, match="world_size must be"):
        sd.balanced_bounds([4, 4], 0)


def test_plan_and_local_partitions_cover_every_level():
    model = _model()
    parts = [b.partition for b in model.blocks]
    plan = sd.plan_spatial(parts, WORLD)
    for level, p in enumerate(parts):
        pieces = [sd.local_partition(p, plan, level, r) for r in range(WORLD)]
        assert sum(q.num_parts for q in pieces) == p.num_parts
        for r, q in enumerate(pieces):
            nodes = plan.nodes(r)
            assert q.num_nodes == nodes.stop - nodes.start
            back = torch.where(q.index >= 0, q.index + nodes.start, q.index)
            assert torch.equal(back, p.index[plan.parts(level, r), : q.max_size])
    assert sd.plan_spatial(parts, np.int64(WORLD)) == plan
    for bad_level, bad_rank, says in ((len(parts), 0, "level must be in"), (0, WORLD, "rank must be in"),
                                      (0, True, "rank must be in"), (1, 0, "is not level 1 of plan")):
        partition = parts[0]                       # level 0's partition: at level 1 it is the wrong one
        with pytest.raises(ValueError, match=says):
            sd.local_partition(partition, plan, bad_level, bad_rank)


def test_plan_rejects_partitions_that_are_not_nested_runs():
    fine = sk.Partition.from_assignment(torch.tensor([0, 0, 1, 1, 2, 2]))
    across = sk.Partition.from_assignment(torch.tensor([0, 0, 0, 1, 1, 1]))     # cuts fine's subgraph 1
    with pytest.raises(ValueError, match=r"partitions\[0\] has a subgraph across two ranks"):
        sd.plan_spatial([fine, across], 2)
    scattered = sk.Partition.from_assignment(torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="contiguous run"):
        sd.plan_spatial([scattered], 2)
    runs_out_of_order = sk.Partition.from_parts([[2, 3], [0, 1]])
    with pytest.raises(ValueError, match="contiguous run"):
        sd.plan_spatial([runs_out_of_order], 2)
    with pytest.raises(TypeError, match="partitions must be"):
        sd.plan_spatial([], 2)
    with pytest.raises(ValueError, match=r"partitions\[1\] covers 4 nodes, partitions\[0\] 6"):
        sd.plan_spatial([fine, sk.Partition.from_assignment(torch.tensor([0, 0, 1, 1]))], 1)


def test_shard_rejects_bad_arguments():
    model = _model()
    plan = sd.plan_spatial([b.partition for b in model.blocks], WORLD)
    for bad in (2, 0.0, True):
        with pytest.raises(ValueError, match="rank must be an int in 0..1"):
            sd.SpatialShard(model, plan, bad)
    with pytest.raises(TypeError, match="model must be an SBATransformer"):
        sd.SpatialShard(torch.nn.Linear(2, 2), plan, 0)
    with pytest.raises(ValueError, match="plan must be a SpatialPlan with one level per block"):
        sd.SpatialShard(model, sd.SpatialPlan(plan.node_bounds, plan.part_bounds[:1]), 0)


# ----------------------------------------------------------------------------- the training CLI under torchrun
def _torchrun(*args):
    """Run the training CLI on WORLD ranks; on a timeout, end torchrun and its ranks (a rank stuck
    in a collective would outlive torchrun alone)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "sba_model.forecast.train", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-3000:]
    return out


def test_torchrun_training_matches_one_process(tmp_path):
    """Without dropout, a 2-rank spatial run and a 2-rank data-parallel run train what one process
    trains: the same validation MAE after two epochs (float32 sums in another order), each run
    stopped after one epoch and resumed. Rank 0 alone prints and writes the run folder."""
    from sba_model.forecast import data as D
    from sba_model.forecast import train

    rng = np.random.default_rng(0)
    pts = rng.random((24, 2))
    arrays = dict(values=rng.normal(size=(240, 24, 1)), distances=np.linalg.norm(pts[:, None] - pts[None], axis=-1),
                  timestamps=np.datetime64("2024-03-04T00:00", "s") + np.arange(240) * np.timedelta64(300, "s"))
    path = tmp_path / "mine.npz"
    D.save_npz(D.validate(arrays), path)
    common = ["--data", str(path), "--parts", "6", "3", "--dim", "16", "--heads", "2", "--batch-size", "32",
              "--dropout", "0", "--quiet"]
    single = common + ["--run-dir", str(tmp_path / "one")]
    train.run(train.parse_args(single + ["--epochs", "1"]))     # both stop and resume: the cosine
    one = train.run(train.parse_args(single + ["--epochs", "2", "--resume"]))       # schedule is kept
    runs = {}
    for mode in ("spatial", "data"):
        args = common + ["--run-dir", str(tmp_path / mode), "--parallel", mode]
        _torchrun(*args, "--epochs", "1")
        runs[mode] = _torchrun(*args, "--epochs", "2", "--resume")
    for mode, out in runs.items():
        run_dir = tmp_path / mode
        assert out.count("test MAE") == 1, out                           # rank 0 prints
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["world_size"] == WORLD and metrics["parallel"] == mode and metrics["epochs_run"] == 2
        assert metrics["best_val_mae"] == pytest.approx(one["best_val_mae"], rel=1e-4), mode
        assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "config.json", "last.pt",
                                                            "learning_curve.png", "metrics.json"]
        last = torch.load(run_dir / "last.pt", weights_only=False)
        assert [h["epoch"] for h in last["history"]] == [1, 2] and len(last["torch_rng"]) == WORLD


def test_parallel_modes_need_torchrun(monkeypatch, tmp_path):
    from sba_model.forecast import train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)          # the default run folder is relative: not the checkout's runs/
    with pytest.raises(ValueError, match="parallel='spatial' runs under torchrun"):
        train.run(train.TrainConfig(parallel="spatial"))
    with pytest.raises(ValueError, match="parallel must be one of"):
        train.run(train.TrainConfig(parallel="model"))
