"""``mammocad evaluate`` end to end on a constructed dataset where scoring the bundle's own lesions
gives a FROC plateau: the curve drawn from candidates, the model's operating point beside it, the
same metrics from ``--model`` and ``--predictions``, one ground truth, lost lesions, and a predictions
folder matched to the cases by content (not by the last parts of a path) and from one model only.

The films are flat (breast 0.4) with discs of chosen brightness; a 3x3 pixel at 1.0 (below the
minimum area) pins the MG normalisation (``intensity_percentile=100``: divide by the brightest breast
pixel), so a disc's prepared value is its own. The bundle says lesion probability = sigmoid(30 (value - 0.6)) with threshold 0.5:

    film  lesions (value: probability)     false-positive blobs     at the operating threshold
    a     1.0: ~1                          -                        found
    b     0.58: 0.36                       -                        missed
    c     -                                0.7: 0.95, 0.55: 0.18    one FP
    d     0.62: 0.65                       -                        found
    e     -                                0.59: 0.41               -
    f     0.54: 0.15                       -                        missed
    g     1.0: ~1 (pathology unknown)      -                        found
    h     1.0: ~1, and one cropped away    -                        found (the other is lost)

Scored at the bundle's threshold, sensitivity is 4/6 at every rate >= 1/8 FP/image. Over the
candidates it is 4/6 at <= 1 FP (0.125/image), 5/6 at <= 2 (0.25), 6/6 at <= 4 (0.5).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from mammocad.datasets.prepared import PreparedDataset, prepare_dataset
from mammocad.errors import ConfigError, InputError
from mammocad.evaluation.run import evaluate_prepared
from mammocad.inference.predict_run import predict_files
from mammocad.inference.predictor import Predictor
from mammocad.preprocess.pipeline import PreprocessSpec
from mammocad.records import CroppedMask, Prediction
from mammocad.tasks.segment_lesions import DEFAULT_CANDIDATE_THRESHOLD
from test_predict import pointwise_bundle

H, W = 300, 240
SPEC = PreprocessSpec(long_side=256, intensity_percentile=100.0)
# stem, patient, side, label, pathology, lesions (cx, cy, r, value), false-positive blobs, lost lesions (cx, cy, r)
CASES = [
    ("a", "p1", "L", "malignant", "malignant", [(70, 150, 12, 1.0)], [], []),
    ("b", "p1", "R", "benign", "benign", [(170, 150, 12, 0.58)], [], []),
    ("c", "p2", "L", "normal", "", [], [(70, 110, 12, 0.7), (80, 200, 12, 0.55)], []),
    ("d", "p2", "R", "malignant", "malignant", [(170, 150, 12, 0.62)], [], []),
    ("e", "p3", "L", "normal", "", [], [(70, 150, 12, 0.59)], []),
    ("f", "p3", "R", "benign", "benign", [(170, 150, 12, 0.54)], [], []),
    ("g", "p4", "L", "unknown", "", [(70, 150, 12, 1.0)], [], []),
    ("h", "p4", "L", "benign", "benign", [(70, 150, 12, 1.0)], [], [(232, 8, 5)]),
]
N_LESIONS = 6  # scorable: h's second lesion lies outside the breast crop


def disc(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r


def film(side: str, discs: list[tuple[float, float, float, float]]) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    x_wall = xx if side == "L" else (W - 1 - xx)
    breast = (x_wall / (0.75 * W)) ** 2 + ((yy - H / 2) / (0.45 * H)) ** 2 <= 1
    img = np.where(breast, 0.4, 0.03)
    for cx, cy, r, value in discs:
        img = np.where(disc(cx, cy, r), value, img)
    marker_x = 20 if side == "L" else W - 23
    img[60:63, marker_x:marker_x + 3] = 1.0  # pins the normalisation; under the minimum area
    return np.round(img * 255).astype(np.uint8)


def write_raw(root: Path, cases=CASES, values_shift: float = 0.0) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for stem, patient, side, label, pathology, lesions, fps, lost in cases:
        shifted = [(x, y, r, v + values_shift) for x, y, r, v in lesions + fps]
        cv2.imwrite(str(root / "images" / f"{stem}.png"), film(side, shifted))
        for k, (cx, cy, r) in enumerate([les[:3] for les in lesions] + lost):
            name = f"{stem}_mask.png" if k == 0 else f"{stem}_mask_{k}.png"
            cv2.imwrite(str(root / "masks" / name), disc(cx, cy, r).astype(np.uint8) * 255)
        rows.append({"image": f"{stem}.png", "label": label, "patient_id": patient, "laterality": side,
                     "pathology": pathology})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def bundle_with_training_rule(directory: Path) -> Path:
    """The pointwise bundle, its card saying training mapped unknown pathology to 'ignore' (what the
    --model route used to read and the --predictions route could not)."""
    path = pointwise_bundle(directory, cut=0.6, gain=30.0, min_area=20)
    card_path = path / "model.json"
    card = json.loads(card_path.read_text())
    card["preprocessing"] = SPEC.model_dump(mode="json")
    card["training_data"] = {**(card.get("training_data") or {}), "unknown_pathology_label": "ignore"}
    card_path.write_text(json.dumps(card, indent=2))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("froc")
    raw = write_raw(root / "one" / "raw")
    report = prepare_dataset("folder", raw, root / "prepared", spec=SPEC, workers=1,
                             progress=False)
    assert report.n_failed == 0, report.failures
    bundle = bundle_with_training_rule(root / "bundle")
    preds = root / "preds"
    assert predict_files([raw / "images"], preds, model=bundle, autocast="fp32", progress=False).n_done == len(CASES)
    return {"root": root, "raw": raw, "prepared": root / "prepared", "bundle": bundle, "preds": preds}


def metrics(path: Path) -> dict:
    """metrics.json without the notes (they name the route)."""
    d = json.loads((path / "metrics.json").read_text())
    d.pop("notes")
    return d


def sens_at(report, k: float) -> float:
    return next(p["sensitivity"] for p in report.detection.operating_points if p["fp_per_image"] == k)


def test_curve_spans_the_candidates_and_the_operating_point_is_marked(data, tmp_path):
    ds = PreparedDataset(data["prepared"])
    lost = ds.by_id("h").lost_lesions
    assert list(lost) == [1] and "cropped away" in lost[1]  # the fixture does what the docstring says
    report = evaluate_prepared(data["bundle"], data["prepared"], split="all", out_dir=tmp_path, autocast="fp32",
                               n_boot=0, progress=False)
    det = report.detection
    assert det.n_images == len(CASES) and det.n_lesions == N_LESIONS
    # the old plateau read 4/6 at every one of these; the candidates give a curve
    assert [sens_at(report, k) for k in (0.125, 0.25, 0.5)] == pytest.approx([4 / 6, 5 / 6, 1.0])
    assert sens_at(report, 8.0) == 1.0 and report.detection.sensitivity_at_1fp.value == 1.0
    op = det.model_operating_point
    assert op["sensitivity"] == pytest.approx(4 / 6) and op["fp_per_image"] == pytest.approx(1 / 8)
    assert (op["n_detected"], op["n_false_positives"], op["probability_threshold"]) == (4, 1, 0.5)
    scored = det.components_scored
    assert scored["source"] == "candidates" and scored["probability_threshold"] == DEFAULT_CANDIDATE_THRESHOLD
    assert 0.1 < scored["lowest_score"] < 0.2 and scored["highest_score"] > 0.99  # f's 0.15 up to ~1
    assert min(p.threshold for p in det.froc) == pytest.approx(scored["lowest_score"])
    md = (tmp_path / "metrics.md").read_text()
    assert "Model operating point" in md and "candidates: every component of lesion probability >= 0.05" in md
    assert "scores from 0.1" in md


def test_both_routes_give_identical_metrics_and_one_ground_truth(data, tmp_path):
    by_model, by_preds = tmp_path / "model", tmp_path / "preds"
    a = evaluate_prepared(data["bundle"], data["prepared"], split="all", out_dir=by_model, autocast="fp32", n_boot=30,
                          progress=False)
    b = evaluate_prepared(data["preds"], data["prepared"], split="all", out_dir=by_preds, n_boot=30, progress=False)
    assert metrics(by_model) == metrics(by_preds)
    # one rule, the evaluation's, not the card's 'ignore': the unknown-pathology lesion of g is lesion
    assert a.ground_truth["unknown_pathology"] == b.ground_truth["unknown_pathology"] == "lesion"
    g = {r["case_id"]: r for r in a.per_image}["g"]
    assert g["category"] == "lesion" and g["dice"] > 0.8
    assert a.counts["ignored_pixels"] == 0
    ignoring = evaluate_prepared(data["preds"], data["prepared"], split="all", n_boot=0, progress=False,
                                 unknown_pathology="ignore")
    assert ignoring.ground_truth["unknown_pathology"] == "ignore" and ignoring.counts["ignored_pixels"] > 0
    with pytest.raises(ConfigError, match="'benign' is not a choice for 2 classes"):
        evaluate_prepared(data["preds"], data["prepared"], split="all", n_boot=0, unknown_pathology="benign")


def test_lost_lesions_are_counted_not_scored(data):
    report = evaluate_prepared(data["preds"], data["prepared"], split="all", n_boot=0, progress=False)
    assert "h" in {r["case_id"] for r in report.per_image}  # scored, not left out as "not all outlined"
    det = report.detection
    assert det.n_lesions == N_LESIONS and det.n_lesions_lost == 1 and det.n_lesions_without_geometry == 0
    (reason,) = det.lost_in_preprocessing
    assert "cropped away" in reason
    assert report.ground_truth["n_lesions_lost_in_preprocessing"] == 1
    assert report.ground_truth["n_cases_left_out_unlocated"] == 0


def test_predictions_hold_candidates_with_rle_masks_capped(data, tmp_path):
    record = json.loads((data["preds"] / "c.json").read_text())
    search = record["attributes"]["candidate_search"]
    assert search["probability_threshold"] == DEFAULT_CANDIDATE_THRESHOLD and search["max_candidates"] == 100
    assert len(record["candidates"]) == 2 and len(record["lesions"]) == 1  # c: two blobs, one above 0.5
    prediction = Prediction.from_dict(record)
    for cand in prediction.candidates:
        assert cand.mask.image_size == (H, W) and cand.mask.area == cand.area
        assert cand.mask.box[0] >= cand.box[0] - 2 and cand.mask.box[2] <= cand.box[2] + 2
    assert [c.score for c in prediction.candidates] == sorted((c.score for c in prediction.candidates), reverse=True)
    # the cap keeps the best and records the best it dropped (the curve is complete above it)
    capped = Predictor(data["bundle"], autocast="fp32").predict_image(data["raw"] / "images" / "c.png", max_candidates=1)
    (kept,) = capped.prediction.candidates
    dropped = capped.prediction.attributes["candidate_search"]["highest_score_dropped"]
    assert kept.score == pytest.approx(prediction.candidates[0].score) and dropped == pytest.approx(
        prediction.candidates[1].score)
    assert CroppedMask.from_rle(record["candidates"][1]["mask_rle"]).area == record["candidates"][1]["area"]


def test_old_predictions_without_candidates_stop_at_the_threshold(data, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(data["preds"], old)
    for path in old.glob("*.json"):
        record = json.loads(path.read_text())
        if path.name != "summary.json":
            record.pop("candidates")
            record["attributes"].pop("candidate_search")
            path.write_text(json.dumps(record))
    report = evaluate_prepared(old, data["prepared"], split="all", n_boot=0, progress=False)
    assert report.detection.components_scored["source"] == "lesions"
    assert [sens_at(report, k) for k in (0.125, 0.5, 8.0)] == pytest.approx([4 / 6] * 3)  # the plateau
    assert any("STOPS AT THE MODEL'S THRESHOLD" in n for n in report.notes)
    with pytest.raises(ConfigError, match="hold candidates at lesion probability >= 0.05, not 0.2"):
        evaluate_prepared(data["preds"], data["prepared"], split="all", n_boot=0, candidate_threshold=0.2)


def test_a_folder_of_two_models_is_refused(data, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(data["preds"], mixed)
    record = json.loads((mixed / "b.json").read_text())
    record["model_version"] = "0.0.2"
    (mixed / "b.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match=r"holds predictions of 2 models \(pointwise 0\.0\.1; pointwise 0\.0\.2\)"):
        evaluate_prepared(mixed, data["prepared"], split="all", n_boot=0)


def test_predictions_are_matched_by_content_not_by_path_parts(data, tmp_path):
    # another raw tree whose files end in the same three parts (raw/images/a.png) but hold other films
    other = write_raw(tmp_path / "two" / "raw", values_shift=-0.05)
    assert (other / "images" / "a.png").read_bytes() != (data["raw"] / "images" / "a.png").read_bytes()
    preds_other = tmp_path / "preds_other"
    predict_files([other / "images"], preds_other, model=data["bundle"], autocast="fp32", progress=False)
    with pytest.raises(InputError, match="no prediction for case a "):
        evaluate_prepared(preds_other, data["prepared"], split="all", n_boot=0)
    # both trees predicted into one folder: each case finds the prediction of its own film
    both = tmp_path / "both"
    predict_files([data["raw"] / "images", other / "images"], both, model=data["bundle"], autocast="fp32",
                  progress=False)
    evaluate_prepared(both, data["prepared"], split="all", n_boot=0, out_dir=tmp_path / "ev_both", progress=False)
    evaluate_prepared(data["preds"], data["prepared"], split="all", n_boot=0, out_dir=tmp_path / "ev_one",
                      progress=False)
    assert metrics(tmp_path / "ev_both") == metrics(tmp_path / "ev_one")


def _two_predicted_cases(tmp_path, data):
    """(raw folder, prepared dataset, predictions) of the first two cases."""
    raw = write_raw(tmp_path / "raw", cases=CASES[:2])
    prepared = tmp_path / "prepared"
    prepare_dataset("folder", raw, prepared, spec=SPEC, workers=1, progress=False)
    preds = tmp_path / "preds"
    predict_files([raw / "images"], preds, model=data["bundle"], autocast="fp32", progress=False)
    return raw, prepared, preds


def test_a_changed_image_is_refused(tmp_path, data):
    raw, prepared, preds = _two_predicted_cases(tmp_path, data)
    cv2.imwrite(str(raw / "images" / "b.png"), film("R", [(170, 150, 12, 0.9)]))  # same path, new content
    with pytest.raises(InputError, match=r"b\.json: predicts .*b\.png as it was .* now has other content"):
        evaluate_prepared(preds, prepared, split="all", n_boot=0)


def test_an_unreadable_case_image_is_matched_by_path(tmp_path, data):
    raw, prepared, preds = _two_predicted_cases(tmp_path, data)
    (raw / "images" / "a.png").rename(tmp_path / "elsewhere.png")  # the original is gone from here
    report = evaluate_prepared(preds, prepared, split="all", n_boot=0, progress=False)
    assert any("1 case(s) matched to their prediction by resolved path (and size) only" in n for n in report.notes)
    assert report.n_images == 2
    (preds / "a.json").unlink()
    with pytest.raises(InputError, match="no prediction for case a .*cannot be read here"):
        evaluate_prepared(preds, prepared, split="all", n_boot=0)


def test_a_file_as_out_dir_fails_before_any_work(data, tmp_path):
    not_a_folder = tmp_path / "metrics"
    not_a_folder.write_text("x")
    # the bundle does not exist either: the --out error must come first, before anything is loaded
    with pytest.raises(InputError, match="metrics: exists and is not a folder"):
        evaluate_prepared(tmp_path / "no-such-bundle", data["prepared"], split="all", out_dir=not_a_folder)


def test_the_caller_says_what_the_source_is(data, tmp_path):
    """--model and --predictions are passed as such: an interrupted predict run (no summary.json yet)
    is still a predictions folder, and a predictions folder given as a model is refused by name."""
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(data["preds"], partial)
    (partial / "summary.json").unlink()  # the run was stopped before its summary
    a = evaluate_prepared(partial, data["prepared"], split="all", n_boot=0, progress=False, source_kind="predictions")
    b = evaluate_prepared(partial, data["prepared"], split="all", n_boot=0, progress=False)  # its marker tells it
    assert a.detection.n_lesions == b.detection.n_lesions == N_LESIONS
    with pytest.raises(InputError, match="output folder of `mammocad predict`, not a model bundle: use --predictions"):
        evaluate_prepared(data["preds"], data["prepared"], split="all", n_boot=0, source_kind="model")
    with pytest.raises(InputError, match="is a model bundle, not the output folder"):  # nor a bundle as predictions
        evaluate_prepared(data["bundle"], data["prepared"], split="all", n_boot=0, source_kind="predictions")


def test_the_hit_rule_reaches_the_written_report(data, tmp_path):
    """``evaluate --hit`` decides the matching and is written into metrics.json and metrics.md."""
    from typer.testing import CliRunner

    from mammocad.cli import app

    result = CliRunner().invoke(app, ["evaluate", str(data["prepared"]), "--predictions", str(data["preds"]),
                                      "--split", "all", "--hit", "iou0.5", "--n-boot", "0", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    det = json.loads((tmp_path / "e" / "metrics.json").read_text())["detection"]
    assert det["hit_rule"] == "iou0.5" and det["iou_threshold"] == 0.5
    coco = det["coco"]  # COCO AP of a segmentation model's own scored components, boxes and masks
    assert coco["ranked"] == "the model's output components"
    assert coco["n_lesions"] == N_LESIONS and 0.0 < coco["mask"]["AP50"] <= 1.0 and 0.0 < coco["box"]["AP"] <= 1.0
    assert "Hit rule: **iou0.5**" in (tmp_path / "e" / "metrics.md").read_text()
    import cv2 as _cv2

    for name in ("froc.png", "pr.png"):  # the FROC and precision-recall figures are written beside the metrics
        png = _cv2.imread(str(tmp_path / "e" / name))
        assert png is not None and png.shape[0] > 200 and png.shape[1] > 300, name
    result = CliRunner().invoke(app, ["evaluate", str(data["prepared"]), "--predictions", str(data["preds"]),
                                      "--split", "all", "--hit", "centre", "--out", str(tmp_path / "f")])
    assert result.exit_code == 1 and "unknown hit rule 'centre'" in str(result.exception)
    assert not (tmp_path / "f").exists()


def test_precision_recall_points_follow_the_froc_decisions():
    """recall = sensitivity, precision = lesions found / (found + false-positive components), point by point."""
    from types import SimpleNamespace

    from mammocad.evaluation.lesion_detection import FrocPoint
    from mammocad.evaluation.report import pr_points

    froc = [FrocPoint(threshold=0.9, fp_per_image=0.0, sensitivity=0.25, n_detected=1, n_false_positives=0),
            FrocPoint(threshold=0.5, fp_per_image=0.5, sensitivity=0.75, n_detected=3, n_false_positives=1),
            FrocPoint(threshold=0.1, fp_per_image=2.0, sensitivity=1.0, n_detected=4, n_false_positives=4)]
    assert pr_points(SimpleNamespace(froc=froc)) == [(0.25, 1.0, 0.9), (0.75, 0.75, 0.5), (1.0, 0.5, 0.1)]
