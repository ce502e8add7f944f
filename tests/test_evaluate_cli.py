"""``evaluate_prepared`` and ``mammocad evaluate`` on a tiny prepared folder dataset with the pointwise
"bright = lesion" bundle: Dice equals a hand computation on the prepared images (the bundle predicts the
original films with the same spec, and its masks come back onto the prepared grid); a ``mammocad predict``
output folder scores the same; one-line errors. The FROC, route and matching rules are in test_froc.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mammocad.cli import app
from mammocad.datasets.prepared import PreparedDataset, prepare_dataset
from mammocad.datasets.splits import make_splits
from mammocad.errors import InputError
from mammocad.evaluation.run import evaluate_prepared
from mammocad.inference.predict_run import predict_files
from mammocad.preprocess.pipeline import PreprocessSpec
from test_predict import pointwise_bundle
from test_prepare import make_folder_dataset  # 4 films of 3 patients: a (2 discs), b, c (1 disc), d

CUT = (round(0.6 * 65535) + 0.5) / 65535  # half-way between two 16-bit levels: no prepared pixel sits on it
# (at 0.6 the lesions are found with tissue around them, Dice ~0.4-0.6, and the normal films get false positives)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    raw = make_folder_dataset(root / "raw")
    report = prepare_dataset("folder", raw, root / "prepared", spec=PreprocessSpec(long_side=256, intensity_percentile=100.0), workers=1, progress=False)
    assert report.n_failed == 0
    make_splits(root / "prepared", val=0.34, test=0.0, seed=0)
    bundle = pointwise_bundle(root / "bundle", cut=CUT, min_area=1)
    # the bundle predicts the ORIGINAL films with its own spec: the dataset's, so the pixels are the same
    card = json.loads((bundle / "model.json").read_text())
    card["preprocessing"] = PreparedDataset(root / "prepared").spec.model_dump(mode="json")
    (bundle / "model.json").write_text(json.dumps(card, indent=2))
    return {"root": root, "raw": raw, "prepared": root / "prepared", "bundle": bundle}


def hand_dice(ds: PreparedDataset) -> dict[str, float | None]:
    """Dice of (prepared pixel >= CUT, inside the breast) against the union mask; None without lesion."""
    out = {}
    for pc in ds.cases:
        pred = (ds.load_image(pc) >= CUT) & ds.load_breast_mask(pc)
        gt = ds.load_union_mask(pc)
        out[pc.case_id] = 2 * (pred & gt).sum() / (pred.sum() + gt.sum()) if gt.any() else None
    return out


def per_image(metrics_json: Path) -> dict[str, dict]:
    return {r["case_id"]: r for r in json.loads(metrics_json.read_text())["per_image"]}


def test_bundle_dice_equals_hand_computation(data, tmp_path):
    ds = PreparedDataset(data["prepared"])
    expected = hand_dice(ds)
    assert sorted(k for k, v in expected.items() if v is not None) == ["a", "c"]
    assert all(0.2 < expected[k] < 0.9 for k in ("a", "c"))  # a real, imperfect segmentation
    report = evaluate_prepared(data["bundle"], data["prepared"], split="all", out_dir=tmp_path, autocast="fp32", n_boot=50)
    rows = per_image(tmp_path / "metrics.json")
    assert sorted(rows) == ["a", "b", "c", "d"]
    for case_id, dice in expected.items():
        if dice is None:
            assert rows[case_id]["dice"] is None and rows[case_id]["category"] == "false_positive"
        else:
            assert rows[case_id]["dice"] == pytest.approx(dice, abs=1e-12)
    headline = report.headline["dice_lesion_images_mean"]
    assert headline.value == pytest.approx((expected["a"] + expected["c"]) / 2, abs=1e-12) and headline.n == 2
    assert report.detection is not None and report.detection.n_lesions == 3
    assert report.false_positive_area["n_false_positive_images"] == 2  # the normal films b and d
    md = (tmp_path / "metrics.md").read_text()
    assert md.startswith("# Segmentation evaluation") and "bundle pointwise 0.0.1" in md


def test_cli_on_val_split_and_on_a_predictions_folder(data, tmp_path):
    bundle, prepared = data["bundle"], data["prepared"]
    val = json.loads((prepared / "splits.json").read_text())["folds"][0]["val"]
    out = tmp_path / "ev_model"
    result = CliRunner().invoke(app, ["evaluate", str(prepared), "--model", str(bundle), "--split", "val",
                                      "--out", str(out), "--n-boot", "20", "--autocast", "fp32"])
    assert result.exit_code == 0, result.output
    assert sorted(per_image(out / "metrics.json")) == sorted(val) and (out / "metrics.md").is_file()
    assert "dice_lesion_images_mean" in result.output and "metrics.md" in result.output

    # predict on the ORIGINAL images, then score those masks mapped onto the prepared grid
    preds = tmp_path / "preds"
    report = predict_files([data["raw"] / "images"], preds, model=bundle, autocast="fp32", progress=False)
    assert report.n_done == 4
    out = tmp_path / "ev_preds"
    result = CliRunner().invoke(app, ["evaluate", str(prepared), "--predictions", str(preds), "--split", "all",
                                      "--out", str(out), "--n-boot", "20"])
    assert result.exit_code == 0, result.output
    rows = per_image(out / "metrics.json")
    expected = hand_dice(PreparedDataset(prepared))
    for case_id in ("a", "c"):  # masks mapped original -> prepared: close to the hand computation
        assert abs(rows[case_id]["dice"] - expected[case_id]) < 0.05, (case_id, rows[case_id]["dice"], expected[case_id])
    assert "predictions in" in (out / "metrics.md").read_text()

    (preds / "c.json").unlink()
    with pytest.raises(InputError, match="no prediction for case c"):
        evaluate_prepared(preds, prepared, split="all", n_boot=0)


def test_cli_needs_exactly_one_source(data, tmp_path):
    for extra in ([], ["--model", str(data["bundle"]), "--predictions", str(tmp_path)]):
        result = CliRunner().invoke(app, ["evaluate", str(data["prepared"]), "--out", str(tmp_path / "o"), *extra])
        assert result.exit_code == 1 and "exactly one of --model and --predictions" in str(result.exception)
    result = CliRunner().invoke(app, ["evaluate", str(data["prepared"]), "--model", str(data["bundle"]), "--split", "dev",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "unknown split 'dev'" in str(result.exception)
    assert not (tmp_path / "o").exists()  # refused before the output folder is made
