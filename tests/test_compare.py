"""`compare` over seeds: mean ± sd and seeds won against numbers worked out by hand, and the CLI
on a small file."""

import json

import pytest

from sba_model.forecast import compare
from sba_model.forecast import data as D


def _run(mae, rmse, mape, epochs, seconds):
    """A `train.run` result: these averaged metrics; 15 min the same, 30 min twice them."""
    m = {"MAE": mae, "RMSE": rmse, "MAPE": mape}
    return {"test": {"horizons": {"15min": m, "30min": {k: 2 * v for k, v in m.items()}}, "average": m},
            "epochs_run": epochs, "train_seconds": seconds, "history": []}


# model -> three seeds' (avg MAE, avg RMSE, avg MAPE, epochs, train seconds)
RESULTS = {"sba": [_run(4.0, 6, 10, 5, 10), _run(4.2, 6, 12, 7, 20), _run(4.6, 9, 14, 6, 60)],
           "gru": [_run(4.1, 7, 11, 9, 4), _run(4.1, 7, 11, 9, 4), _run(4.1, 7, 11, 9, 4)],
           "last_value": [_run(5.0, 8, 20, 0, 0), _run(5.0, 8, 20, 0, 0), _run(5.0, 8, 20, 0, 0)]}


def _rows(text):
    """model -> its cells, from the data rows of a markdown table."""
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| model", "| ---"))]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)}


def test_mean_and_sample_sd():
    # 4.0, 4.2, 4.6: mean 12.8 / 3 = 4.2667; squared deviations 0.0711 + 0.0044 + 0.1111 = 0.1867,
    # / (3 - 1) = 0.0933, sd 0.3055.
    mean, sd = compare.mean_sd([4.0, 4.2, 4.6])
    assert mean == pytest.approx(4.266667, abs=1e-6) and sd == pytest.approx(0.305505, abs=1e-6)
    assert compare.spread([4.0, 4.2, 4.6]) == "4.267 ± 0.306"
    assert compare.spread([10, 12, 14], 2) == "12.00 ± 2.00"
    assert compare.mean_sd([3.5]) == (3.5, None) and compare.spread([3.5]) == "3.500"
    with pytest.raises(ValueError, match="^values"):
        compare.mean_sd([])


def test_seeds_won_counts_ties_for_each():
    won = compare.seeds_won({"a": [1.0, 2.0, 3.0], "b": [1.0, 1.0, 4.0], "c": [2.0, 3.0, 3.0]})
    assert won == {"a": 2, "b": 2, "c": 1}
    with pytest.raises(ValueError, match="^scores"):
        compare.seeds_won({"a": [1.0, 2.0], "b": [1.0]})


def test_table_over_seeds():
    text = compare.table(RESULTS)
    rows = _rows(text)
    assert list(rows) == ["sba", "gru", "last_value"]
    assert text.splitlines()[0] == ("| model | 15min MAE / RMSE / MAPE | 30min MAE / RMSE / MAPE | avg MAE | avg RMSE "
                                    "| avg MAPE | seeds won | avg MAE per seed | epochs | train s |")
    # sba: MAE 4.0, 4.2, 4.6 (see above); RMSE 6, 6, 9: mean 7, sd sqrt((1 + 1 + 4) / 2) = 1.732;
    # MAPE 10, 12, 14: mean 12, sd 2. 30 min doubles means and sds. Seeds: sba wins seed 0 (4.0),
    # gru seeds 1 and 2 (4.1); train seconds (10 + 20 + 60) / 3 = 30.
    assert rows["sba"] == ["4.267 ± 0.306 / 7.000 ± 1.732 / 12.00 ± 2.00%",
                           "8.533 ± 0.611 / 14.000 ± 3.464 / 24.00 ± 4.00%",
                           "4.267 ± 0.306", "7.000 ± 1.732", "12.00 ± 2.00%", "1", "4.000, 4.200, 4.600", "5, 7, 6",
                           "30"]
    assert rows["gru"][2:] == ["**4.100 ± 0.000**", "7.000 ± 0.000", "11.00 ± 0.00%", "2", "4.100, 4.100, 4.100",
                               "9, 9, 9", "4"]
    assert rows["last_value"][5] == "0" and text.count("**") == 2        # one bold cell: gru's lowest mean
    one_seed = _rows(compare.table({m: runs[:1] for m, runs in RESULTS.items()}))
    assert one_seed["sba"][2:6] == ["**4.000**", "6.000", "10.00%", "1"]
    with pytest.raises(ValueError, match="^results"):
        compare.table({})
    with pytest.raises(ValueError, match="^scores"):
        compare.table({"sba": RESULTS["sba"], "gru": RESULTS["gru"][:2]})


def test_cli_runs_every_model_on_every_seed(tmp_path):
    path = tmp_path / "small.npz"
    D.save_npz(D.synthetic(num_nodes=12, steps=400), path)
    out, runs = tmp_path / "table.md", tmp_path / "runs"
    compare.main(["--data", str(path), "--models", "last_value", "stid", "--seeds", "0", "1", "--epochs", "2",
                  "--dim", "16", "--runs", str(runs), "--out", str(out)])
    text = out.read_text()
    rows = _rows(text)
    assert list(rows) == ["last_value", "stid"]
    assert sum(int(cells[-4]) for cells in rows.values()) >= 2                 # every seed has a winner
    assert rows["stid"][-2] == "2, 2" and len(rows["last_value"][-3].split(", ")) == 2
    assert "Command: `python -m sba_model.forecast.compare --data" in text and "--seeds 0 1" in text
    assert "Commit: `" in text and "Seeds: 0, 1." in text and "Total wall time" in text
    assert text.count("**") == 2
    assert (tmp_path / "table_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for model in ("last_value", "stid"):
        for seed in (0, 1):
            metrics = json.loads((runs / model / f"seed{seed}" / "metrics.json").read_text())
            assert len(metrics["history"]) == (2 if model == "stid" else 0)
            assert json.loads((runs / model / f"seed{seed}" / "config.json").read_text())["seed"] == seed
    with pytest.raises(SystemExit):
        compare.main(["--data", str(path), "--seeds", "-1"])
    with pytest.raises(SystemExit):
        compare.main(["--data", str(path), "--seeds", "0", "0"])


def test_resume_reads_back_finished_runs_and_retrains_changed_ones(tmp_path, monkeypatch):
    path = tmp_path / "small.npz"
    D.save_npz(D.synthetic(num_nodes=12, steps=400), path)
    out, runs = tmp_path / "table.md", tmp_path / "runs"
    args = ["--data", str(path), "--models", "last_value", "stid", "--seeds", "0", "--epochs", "2", "--dim", "16",
            "--runs", str(runs), "--out", str(out)]
    compare.main(args)
    first = _rows(out.read_text())
    trained = []
    real_run = compare.train.run
    monkeypatch.setattr(compare.train, "run",
                        lambda cfg: trained.append((cfg.model, cfg.epochs, cfg.resume)) or real_run(cfg))
    for model, seconds in (("last_value", 1000.4), ("stid", 234.3)):       # the summed time counts read-back runs
        metrics_path = runs / model / "seed0" / "metrics.json"
        metrics_path.write_text(json.dumps({**json.loads(metrics_path.read_text()), "train_seconds": seconds}))
    compare.main(args + ["--resume"])                       # everything finished with these settings
    assert trained == [] and {m: c[:-1] for m, c in _rows(out.read_text()).items()} == {m: c[:-1] for m, c in first.items()}
    assert _rows(out.read_text())["stid"][-1] == "234"                             # mean training seconds
    assert "training time summed over all 2 runs 1235 s." in out.read_text()
    assert "(2 of 2 runs read back from an earlier call, --resume)" in out.read_text()
    monkeypatch.chdir(tmp_path)                     # the same folders, spelled another way: still read back
    compare.main([a if a != str(runs) else "runs" for a in args] + ["--resume"])
    assert trained == []
    three = [a if a != "2" else "3" for a in args] + ["--resume"]            # --epochs 3: other runs, trained afresh
    compare.main(three)
    assert trained == [("last_value", 3, False), ("stid", 3, False)] and "read back" not in out.read_text()
    history = json.loads((runs / "stid" / "seed0" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # A run stopped after it started: its settings are written, the earlier run's metrics gone,
    # so --resume continues it from its checkpoint instead of reading the old metrics back.
    monkeypatch.setattr(compare.train, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        compare.main([a if a != "3" else "4" for a in three])
    assert not (runs / "last_value" / "seed0" / "metrics.json").exists()
    monkeypatch.undo()
    monkeypatch.setattr(compare.train, "run",
                        lambda cfg: trained.append((cfg.model, cfg.epochs, cfg.resume)) or real_run(cfg))
    trained.clear()
    compare.main([a if a != "3" else "4" for a in three])
    assert trained == [("last_value", 4, True), ("stid", 4, False)]


def test_cli_refuses_bad_counts_and_outputs_before_training(tmp_path, capsys):
    for bad, says in ((["--epochs", "0"], "--epochs, --patience and --batch-size must be >= 1"),
                      (["--batch-size", "-3"], "--epochs, --patience and --batch-size must be >= 1"),
                      (["--out", str(tmp_path)], "--out must be a file"),
                      (["--out", str(tmp_path / "table.md" / "x.md")], None)):
        if says is None:
            (tmp_path / "table.md").write_text("a file")
            says = "a parent of"
        with pytest.raises(SystemExit):
            compare.parse_args(["--models", "last_value", *bad])
        assert says in capsys.readouterr().err
