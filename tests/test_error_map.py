"""The per-sensor error map: MAE per sensor, seams of a partition, and the command on trained runs."""

import json

import numpy as np
import pytest
import torch

from sba_model import SBATransformer
from sba_model.forecast import data as D
from sba_model.forecast import error_map, train
from sba_model.forecast.zoo import NodeGRU, Shape
from sba_model.graph import knn_adjacency, partition_graph

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_sensor_mae_by_hand():
    # B = 2 windows, T_out = 2 steps, N = 3 sensors, C = 1.
    target = torch.zeros(2, 2, 3, 1)
    pred = torch.tensor([[[1.0, 2.0, 5.0], [3.0, -2.0, 5.0]],
                         [[1.0, 4.0, 5.0], [-7.0, 100.0, 5.0]]]).unsqueeze(-1)
    mask = torch.ones(2, 2, 3, 1, dtype=torch.bool)
    mask[1, 1, 1] = False          # the 100 is not observed
    mask[:, :, 2] = False          # sensor 2 never is
    first, second = (pred[:1], target[:1], mask[:1]), (pred[1:], target[1:], mask[1:])
    mae = error_map.sensor_mae([first, second])
    assert mae[0] == pytest.approx((1 + 3 + 1 + 7) / 4) and mae[1] == pytest.approx((2 + 2 + 4) / 3)
    assert np.isnan(mae[2])
    step2 = error_map.sensor_mae([first, second], horizons=[2])
    assert step2[0] == pytest.approx((3 + 7) / 2) and step2[1] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="^horizons"):
        error_map.sensor_mae([first], horizons=[3])
    with pytest.raises(ValueError, match="^batches"):
        error_map.sensor_mae([])


def _six_nodes() -> np.ndarray:
    """Two triangles 0-1-2 and 3-4-5, joined by the edges 2-3 and 1-4."""
    a = np.zeros((6, 6))
    for i, j in [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3), (1, 4)]:
        a[i, j] = a[j, i] = 1.0
    return a


def test_seams_on_a_six_node_graph():
    a = _six_nodes()
    halves = np.array([0, 0, 0, 1, 1, 1])
    assert error_map.cut_edges(a, halves).tolist() == [[1, 4], [2, 3]]
    seam = error_map.seam_sensors(a, halves)
    assert seam.tolist() == [False, True, True, True, True, False]
    pairs = np.array([0, 0, 1, 1, 2, 2])                     # keeps 0-1, 2-3 and 4-5 inside
    assert error_map.cut_edges(a, pairs).tolist() == [[0, 2], [1, 2], [1, 4], [3, 4], [3, 5]]
    assert error_map.seam_sensors(a, pairs).all()
    assert not error_map.seam_sensors(a, np.zeros(6, int)).any()
    a[1, 4] = a[4, 1] = 3.0                                   # a heavier edge across
    share = error_map.cut_share(a, halves)
    assert share.tolist() == pytest.approx([0, 3 / 5, 1 / 3, 1 / 3, 3 / 5, 0])
    summary = error_map.seam_summary(np.array([1.0, 3.0, 5.0, 7.0, np.nan, 2.0]), seam, share)
    assert summary["seam"] == {"sensors": 3, "mean_mae": 5.0} and summary["interior"] == {"sensors": 2, "mean_mae": 1.5}
    # Sensors 0 1 2 3 5: MAE ranks 1 3 4 5 2, share ranks 1.5 5 3.5 3.5 1.5 (ties share a rank).
    assert summary["spearman_mae_cut_share"] == pytest.approx(6 / np.sqrt(10 * 9))
    flat = error_map.seam_summary(np.ones(6), np.zeros(6, bool), np.zeros(6))
    assert np.isnan(flat["seam"]["mean_mae"]) and np.isnan(flat["spearman_mae_cut_share"])
    with pytest.raises(ValueError, match="^assignment"):
        error_map.cut_edges(a, halves[:5])


def _same_grouping(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two assignments put the nodes in the same groups, whatever the labels."""
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


def test_finest_assignment_is_the_first_layers_partition_in_the_callers_order():
    adj = knn_adjacency(np.random.default_rng(0).random((60, 2)), 5)
    metis = partition_graph(adj, 6, seed=3).assignment.numpy()
    sba = SBATransformer.from_graph(adj, [6, 2], in_steps=4, in_channels=1, out_steps=2, out_channels=1, dim=8,
                                    num_heads=2, seed=3)
    assert sba.perm is not None and not torch.equal(sba.perm, torch.arange(60))
    assert _same_grouping(error_map.finest_assignment(sba, adj, [6, 2], seed=3), metis)
    gru = NodeGRU(Shape(60, 4, 2, 1, None), hidden=8)
    assert np.array_equal(error_map.finest_assignment(gru, adj, [6, 2], seed=3), metis)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """SBA trained for 2 epochs on synthetic_large with 300 sensors (they have coordinates)."""
    run = tmp_path_factory.mktemp("map") / "run"
    train.main(["--data", "synthetic_large:300:300", "--epochs", "2", "--parts", "8", "2", "--dim", "16",
                "--heads", "2", "--run-dir", str(run), "--device", "cpu", "--quiet"])
    return run


def test_cli_draws_a_trained_run_at_its_coordinates(trained_run, tmp_path, capsys):
    out = tmp_path / "maps" / "error_map.png"
    assert error_map.main(["--run", str(trained_run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "seam sensors:" in printed and "interior sensors:" in printed and "(coordinates)" in printed
    for bad, says in ((["--out", str(tmp_path)], "--out must be a file"), (["--batch-size", "0"], "--batch-size must be >= 1")):
        with pytest.raises(SystemExit):
            error_map.main(["--run", str(trained_run), *bad])
        assert says in capsys.readouterr().err

    result = error_map.error_map(trained_run, tmp_path / "again.png", batch_size=7)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert result["geographic"] and result["mae"].shape == (300,)
    assert np.nanmean(result["mae"]) == pytest.approx(metrics["test"]["average"]["MAE"], rel=1e-5)
    assert result["summary"]["seam"]["sensors"] + result["summary"]["interior"]["sensors"] == 300
    assert 0 < result["seam"].sum() < 300 and int(result["assignment"].max()) + 1 == 8


def test_a_run_without_coordinates_or_weights_gets_the_spectral_layout(tmp_path):
    rng = np.random.default_rng(0)
    points = rng.random((30, 2))
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    arrays = dict(values=rng.normal(size=(300, 30, 1)), distances=distances,
                  timestamps=np.datetime64("2024-03-04T00:00", "s") + np.arange(300) * np.timedelta64(300, "s"))
    D.save_npz(D.validate(arrays), tmp_path / "plain.npz")
    train.main(["--data", str(tmp_path / "plain.npz"), "--model", "last_value", "--parts", "4", "--run-dir",
                str(tmp_path / "run"), "--quiet"])
    result = error_map.error_map(tmp_path / "run", tmp_path / "map.png")
    assert not result["geographic"] and (tmp_path / "map.png").read_bytes()[:8] == PNG_SIGNATURE
    assert int(result["assignment"].max()) + 1 == 4          # sba's finest partition, from --parts
    with pytest.raises(ValueError, match="^run_dir: no config.json"):
        error_map.error_map(tmp_path, tmp_path / "none.png")
