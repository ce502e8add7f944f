"""``mammocad cv``: cross-validation splits, the fold runs, resumption and the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mammocad.cli import app
from mammocad.datasets.prepared import PreparedDataset
from mammocad.datasets.splits import make_splits
from mammocad.errors import ConfigError
from mammocad.evaluation.cv import check_cv_splits, run_cv, summarize
from tiny_prepared import make_tiny_prepared, write_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cv")
    make_tiny_prepared(root)
    return root


def _tested_once(splits: dict, case_ids: list[str]) -> None:
    tested = [c for f in splits["folds"] for c in f["test"]]
    assert sorted(tested) == sorted(case_ids)  # every case tested exactly once
    for f in splits["folds"]:
        assert not set(f["test"]) & (set(f["train"]) | set(f["val"]))
        assert sorted(f["train"] + f["val"] + f["test"]) == sorted(case_ids)


def test_cv_splits_test_every_case_once_and_validate_inside_the_training_patients(workdir, tmp_path):
    ds = PreparedDataset(workdir / "prepared")
    ids = [pc.case_id for pc in ds.cases]
    result = make_splits(workdir / "prepared", val=0.2, folds=2, seed=1, cv=True, out=tmp_path / "s.json")
    assert result.data["method"] == "cv" and len(result.data["folds"]) == 2
    _tested_once(result.data, ids)
    assert all(f["val"] for f in result.data["folds"])
    check_cv_splits(result.data, ids, "s.json")
    with pytest.raises(ConfigError, match="needs --folds"):
        make_splits(workdir / "prepared", cv=True, out=tmp_path / "t.json")
    # a k-fold split whose folds VALIDATE (and share one test set) is not a cross-validation
    kfold = make_splits(workdir / "prepared", val=0.2, test=0.25, folds=2, seed=1, out=tmp_path / "k.json")
    with pytest.raises(ConfigError, match="not a cross-validation"):
        check_cv_splits(kfold.data, ids, "k.json")
    broken = json.loads(json.dumps(result.data))
    broken["folds"][1]["test"].append(broken["folds"][0]["test"][0])
    with pytest.raises(ConfigError, match="tested in folds 0 and 1"):
        check_cv_splits(broken, ids, "broken.json")
    broken = json.loads(json.dumps(result.data))
    broken["folds"][1]["test"].pop()
    with pytest.raises(ConfigError, match="in no test fold"):
        check_cv_splits(broken, ids, "broken.json")


def test_summarize_is_the_mean_and_t_interval_over_folds():
    s = summarize([0.8, 0.9, None, 0.7])
    assert s["n_folds"] == 3 and s["mean"] == pytest.approx(0.8) and s["sd"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2)
    assert s["ci"]["low"] == pytest.approx(0.8 - half) and s["ci"]["high"] == pytest.approx(0.8 + half)
    assert summarize([None])["mean"] is None and summarize([0.5])["ci"] is None


def test_cv_trains_and_scores_each_fold_once_then_resumes_without_work(workdir, monkeypatch):
    config = write_config(workdir, "cv.yaml", train={"epochs": 1, "patience": 5, "amp": "none", "threads": 1,
                                                     "seed": 3, "final_n_boot": 0,
                                                     "val_every": 0})  # 8 images: a val carve may hold no lesion
    out = workdir / "cv_out"
    first = run_cv(config, out, folds=2, only=[0], seed=1, val=0.2, n_boot=10, progress=False)
    assert first.done == [0] and first.table is None  # one fold of two: no table yet
    splits = json.loads((out / "splits.json").read_text())
    assert splits["method"] == "cv"
    result = run_cv(config, out, folds=2, seed=1, val=0.2, n_boot=10, external=[workdir / "prepared"], progress=False)
    assert result.done == [0, 1] and result.table is not None
    for i in range(2):
        metrics = json.loads((out / f"fold{i}" / "eval" / "metrics.json").read_text())
        # each fold is scored on exactly its own test cases
        assert metrics["n_images"] == len(splits["folds"][i]["test"])
        assert (out / f"fold{i}" / "train" / "bundle" / "model.json").is_file()
        assert (out / f"fold{i}" / "external-prepared" / "metrics.json").is_file()
    table = json.loads((out / "cv.json").read_text())
    n_images = table["metrics"]["n_images"]
    assert n_images["folds"] == [len(f["test"]) for f in splits["folds"]]
    assert table["metrics"]["dice_all_images"]["n_folds"] >= 1
    assert table["hit_rule"] == "iou0.1+centroid"
    assert table["splits"]["method"] == "cv" and table["external"]["prepared"]["metrics"]["n_images"]["mean"] == 8
    assert "| fold 0 | fold 1 | mean | SD | 95% t-interval over folds |" in (out / "cv.md").read_text()

    # a finished cross-validation is not trained or scored again
    def refuse(*args, **kwargs):
        raise AssertionError("cv retrained or rescored a finished fold")

    monkeypatch.setattr("mammocad.training.engine.train", refuse)
    monkeypatch.setattr("mammocad.evaluation.run.evaluate_prepared", refuse)
    again = run_cv(config, out, folds=2, seed=1, val=0.2, n_boot=10, external=[workdir / "prepared"], progress=False)
    assert again.table["metrics"]["n_images"] == n_images
    assert again.table["scoring"]["autocast"] == "fp32"  # amp: none -> scored in fp32, as the bundle predicts
    monkeypatch.undo()
    # a fold retrained since it was scored (other weights) is scored again, the others are not
    scored = out / "fold1" / "eval" / "scored.json"
    scored.write_text(scored.read_text().replace('"weights_sha256": "', '"weights_sha256": "0'))
    calls = []
    import mammocad.evaluation.run as run_module

    real = run_module.evaluate_prepared
    monkeypatch.setattr(run_module, "evaluate_prepared", lambda *a, **k: calls.append(k.get("fold")) or real(*a, **k))
    run_cv(config, out, folds=2, seed=1, val=0.2, n_boot=10, external=[workdir / "prepared"], progress=False)
    assert calls == [1]
    # every fold is the same recipe: a changed config is refused
    changed = write_config(workdir, "cv.yaml", train={"epochs": 1, "patience": 5, "amp": "none", "threads": 1,
                                                      "seed": 4, "final_n_boot": 0, "val_every": 0})
    with pytest.raises(ConfigError, match="train: differs from the recipe this cross-validation ran"):
        run_cv(changed, out, folds=2, seed=1, val=0.2, progress=False)
    config = write_config(workdir, "cv.yaml", train={"epochs": 1, "patience": 5, "amp": "none", "threads": 1,
                                                     "seed": 3, "final_n_boot": 0, "val_every": 0})
    with pytest.raises(ConfigError, match="this run asks for"):  # same folder, other folds: refused
        run_cv(config, out, folds=3, seed=1, val=0.2, progress=False)
    with pytest.raises(ConfigError, match="fold 5 does not exist"):
        run_cv(config, out, folds=2, only=[5], seed=1, val=0.2, progress=False)


def test_cv_command_refuses_a_split_that_is_not_a_cross_validation(workdir):
    config = write_config(workdir, "cv_cli.yaml")  # data.splits: the tiny dataset's hand-made train/val split
    runner = CliRunner()
    res = runner.invoke(app, ["cv", str(config), "--out", str(workdir / "cv_cli"),
                              "--splits", str(workdir / "prepared" / "splits.json")])
    assert res.exit_code != 0
    assert "not a cross-validation" in str(res.exception or res.output)


def test_train_overrides_splits_and_fold(workdir, tmp_path):
    """The final model of a cross-validated recipe trains on a train/val split of every patient:
    ``train --splits FILE --fold N`` replaces the config's ``data.splits`` and ``data.fold``."""
    from mammocad.training.config import load_config, with_overrides

    cfg = load_config(write_config(workdir, "final.yaml"))
    other = make_splits(workdir / "prepared", val=0.25, test=0.0, seed=2, out=tmp_path / "final.json")
    out = with_overrides(cfg, splits=other.path, fold=0)
    assert out.data.splits == other.path.resolve() and out.data.fold == 0 and cfg.data.splits is None
    with pytest.raises(ConfigError, match="--fold: must be >= 0"):
        with_overrides(cfg, fold=-1)
