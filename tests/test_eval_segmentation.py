"""Segmentation metrics, empty-mask rules, patient bootstrap and the report writers, on tiny arrays
with hand-computed expectations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mammocad.errors import InputError
from mammocad.evaluation import EvalItem, evaluate_segmentation, write_report
from mammocad.evaluation.bootstrap import bootstrap_ci, grouped_mean_ci
from mammocad.evaluation.segmentation import confusion_metrics, score_image

BIN = ["background", "lesion"]
TRI = ["background", "benign", "malignant"]


def square(shape=(8, 8), rows=(0, 2), cols=(0, 2), value=1):
    a = np.zeros(shape, dtype=np.uint8)
    a[rows[0]:rows[1], cols[0]:cols[1]] = value
    return a


def half_overlap(case_id="a", patient_id="p1", label="benign"):
    """4-px square vs the same square shifted one column: |P∩G| = 2 -> Dice 1/2, IoU 1/3."""
    return EvalItem(case_id, patient_id, square(), square(cols=(1, 3)), label)


def perfect(case_id="b", patient_id="p2", label="malignant"):
    return EvalItem(case_id, patient_id, square(rows=(3, 6), cols=(3, 6)), square(rows=(3, 6), cols=(3, 6)), label)


def both_empty(case_id="n0", patient_id="p3"):
    return EvalItem(case_id, patient_id, np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), "normal")


def test_dice_and_iou_of_known_overlap():
    r = score_image(half_overlap(), BIN)
    assert (r.gt_pixels, r.pred_pixels, r.intersection) == (4, 4, 2)
    assert r.dice == pytest.approx(0.5) and r.iou == pytest.approx(1 / 3)
    assert r.confusion.tolist() == [[58, 2], [2, 2]]


def test_both_empty_counted_separately_and_not_averaged():
    rep = evaluate_segmentation([half_overlap(), both_empty(), both_empty("n1", "p4")], BIN, n_boot=50)
    assert rep.counts["both_empty"] == 2 and rep.counts["lesion_images"] == 1
    assert rep.headline["dice_lesion_images_mean"].value == pytest.approx(0.5)
    assert rep.headline["dice_lesion_images_mean"].n == 1
    # all-images Dice also leaves both-empty images out (they would otherwise count as 1 or 0)
    assert rep.headline["dice_all_images_mean"].value == pytest.approx(0.5)
    assert rep.headline["dice_all_images_mean"].n == 1


def test_false_positive_area_on_normal_image():
    pred = np.zeros((10, 10), np.uint8)
    pred[0, :5] = 1  # 5 predicted pixels on an image without lesion
    breast = np.zeros((10, 10), bool)
    breast[:5] = True  # 50 breast pixels
    normal = EvalItem("n", "p9", np.zeros((10, 10), np.uint8), pred, "normal", breast_mask=breast)
    rep = evaluate_segmentation([half_overlap(), normal, both_empty()], BIN, n_boot=50)
    fp = rep.false_positive_area
    assert rep.counts["false_positive_images"] == 1
    assert fp["n_images_without_lesion"] == 2 and fp["n_false_positive_images"] == 1
    assert fp["total_fp_pixels"] == 5 and fp["false_positive_image_rate"] == pytest.approx(0.5)
    assert fp["mean_fp_fraction_of_image"] == pytest.approx(0.05)
    assert fp["mean_fp_fraction_of_breast"] == pytest.approx(0.1)
    assert fp["mean_fp_pixels_per_image_without_lesion"] == pytest.approx(2.5)
    # headline (lesion images) unchanged; all-images Dice counts the FP image as 0
    assert rep.headline["dice_lesion_images_mean"].value == pytest.approx(0.5)
    assert rep.headline["dice_all_images_mean"].value == pytest.approx(0.25)
    assert rep.headline["iou_all_images_mean"].value == pytest.approx(1 / 6)
    per = {p["case_id"]: p for p in rep.per_image}
    assert per["n"]["category"] == "false_positive" and per["n"]["dice"] is None
    assert per["n"]["fp_fraction_of_image"] == pytest.approx(0.05)


def test_mean_and_max_over_images():
    rep = evaluate_segmentation([half_overlap(), perfect()], BIN, n_boot=50)
    h = rep.headline
    assert h["dice_lesion_images_mean"].value == pytest.approx(0.75)
    assert h["dice_lesion_images_max"].value == pytest.approx(1.0)
    assert h["iou_lesion_images_mean"].value == pytest.approx(2 / 3)
    assert h["iou_lesion_images_max"].value == pytest.approx(1.0)
    assert rep.by_image_label["benign"]["dice_mean"] == pytest.approx(0.5)
    assert rep.by_image_label["malignant"]["dice_mean"] == pytest.approx(1.0)


def test_confusion_matrix_metrics_from_known_matrix():
    # confusion matrix (rows = GT): [[5,1,0],[1,2,1],[0,0,2]]
    pairs = [(0, 0)] * 5 + [(0, 1)] + [(1, 0)] + [(1, 1)] * 2 + [(1, 2)] + [(2, 2)] * 2
    gt = np.array([[g for g, _ in pairs]], dtype=np.int32)
    pred = np.array([[p for _, p in pairs]], dtype=np.int32)
    rep = evaluate_segmentation([EvalItem("x", "p", gt, pred)], TRI, n_boot=0)
    assert rep.confusion_matrix == [[5, 1, 0], [1, 2, 1], [0, 0, 2]]
    ious = [5 / 7, 2 / 5, 2 / 3]
    assert [c["iou"] for c in rep.per_class] == pytest.approx(ious)
    assert rep.headline["mean_iou"].value == pytest.approx(sum(ious) / 3)
    assert rep.headline["pixel_accuracy"].value == pytest.approx(9 / 12)
    assert [c["accuracy"] for c in rep.per_class] == pytest.approx([5 / 6, 1 / 2, 1.0])
    assert rep.headline["mean_class_accuracy"].value == pytest.approx(7 / 9)
    assert rep.headline["mean_iou"].ci is None  # n_boot=0: no interval


def test_confusion_metrics_skip_absent_classes():
    m = confusion_metrics(np.array([[3, 1, 0], [1, 1, 0], [0, 0, 0]]))  # class 2 absent everywhere
    assert np.isnan(m["iou"][2]) and np.isnan(m["class_accuracy"][2])
    assert float(m["mean_iou"]) == pytest.approx((3 / 5 + 1 / 3) / 2)
    assert float(m["mean_class_accuracy"]) == pytest.approx((3 / 4 + 1 / 2) / 2)


@pytest.mark.parametrize("use_mask", [False, True])
def test_three_classes_with_ignored_pixels(use_mask):
    gt = np.array([[1, 1, 255, 0], [2, 2, 0, 255]])
    pred = np.array([[1, 2, 1, 0], [2, 2, 0, 0]])
    ignore = None
    if use_mask:  # same pixels ignored through the mask instead of the 255 value
        ignore = gt == 255
        gt = np.where(ignore, 0, gt)
    rep = evaluate_segmentation([EvalItem("t", "p", gt, pred, "malignant", ignore=ignore)], TRI, n_boot=0)
    assert rep.confusion_matrix == [[2, 0, 0], [0, 1, 1], [0, 0, 2]]
    assert rep.counts["ignored_pixels"] == 2 and rep.counts["scored_pixels"] == 6
    assert rep.headline["dice_lesion_images_mean"].value == pytest.approx(1.0)  # foreground = benign + malignant
    assert rep.class_dice["benign"]["mean"].value == pytest.approx(2 / 3)  # the ignored predicted 1 is not counted
    assert rep.class_dice["malignant"]["mean"].value == pytest.approx(0.8)


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(InputError, match="^bad: prediction shape"):
        evaluate_segmentation([EvalItem("bad", "p", np.zeros((4, 4), int), np.zeros((4, 5), int))], BIN)
    with pytest.raises(InputError, match="^bad: ground truth holds label 3"):
        evaluate_segmentation([EvalItem("bad", "p", np.full((2, 2), 3), np.zeros((2, 2), int))], BIN)
    with pytest.raises(InputError, match="integer class labels"):
        evaluate_segmentation([EvalItem("bad", "p", np.zeros((2, 2)), np.zeros((2, 2), int))], BIN)
    with pytest.raises(InputError, match="no images"):
        evaluate_segmentation([], BIN)


# ---- patient bootstrap -------------------------------------------------------------------------

def test_ci_contains_point_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    values = rng.uniform(0.3, 0.9, size=40)
    groups = [f"p{i // 2}" for i in range(40)]
    a = grouped_mean_ci(values, groups, n_boot=500, seed=7)
    b = grouped_mean_ci(values, groups, n_boot=500, seed=7)
    c = grouped_mean_ci(values, groups, n_boot=500, seed=8)
    assert a.low < values.mean() < a.high
    assert (a.low, a.high) == (b.low, b.high)
    assert (a.low, a.high) != (c.low, c.high)
    assert a.n_groups == 20 and a.n_valid == 500 and not a.degenerate


def test_ci_narrows_with_more_patients():
    def width(n):
        ci = grouped_mean_ci([i % 2 for i in range(n)], [str(i) for i in range(n)], n_boot=1000, seed=0)
        return ci.high - ci.low
    # the width of a mean of 0/1 values scales like 1/sqrt(n): 20x the patients -> ~4.5x narrower
    assert width(200) < width(10) / 3


def test_grouping_moves_a_patients_images_together():
    # each patient has one image at 0 and one at 1: every patient resample has mean exactly 0.5,
    # while resampling images independently spreads the mean over 0..1
    values = [0.0, 1.0, 0.0, 1.0]
    grouped = grouped_mean_ci(values, ["A", "A", "B", "B"], n_boot=1000, seed=0)
    ungrouped = grouped_mean_ci(values, ["1", "2", "3", "4"], n_boot=1000, seed=0)
    assert grouped.low == grouped.high == 0.5
    assert ungrouped.low <= 0.25 and ungrouped.high >= 0.75


def test_grouped_bootstrap_through_evaluate_segmentation():
    items = [half_overlap("a1", "A"), perfect("a2", "A"), half_overlap("b1", "B"), perfect("b2", "B")]
    rep = evaluate_segmentation(items, BIN, n_boot=500)
    ci = rep.headline["dice_lesion_images_mean"].ci
    assert (ci.low, ci.high) == (pytest.approx(0.75), pytest.approx(0.75))
    alone = [EvalItem(it.case_id, it.case_id, it.gt, it.pred, it.image_label) for it in items]
    ci2 = evaluate_segmentation(alone, BIN, n_boot=500).headline["dice_lesion_images_mean"].ci
    assert ci2.low < 0.75 < ci2.high and ci2.n_groups == 4


def test_single_patient_ci_is_degenerate_and_said_so():
    rep = evaluate_segmentation([half_overlap("a", "P"), perfect("b", "P")], BIN, n_boot=200)
    ci = rep.headline["dice_lesion_images_mean"].ci
    assert ci.degenerate and ci.low == ci.high == pytest.approx(0.75)
    assert any("only one patient" in n for n in rep.notes)


def test_bootstrap_ci_drops_undefined_resamples():
    ci = bootstrap_ci(lambda w: np.where(w[:, 0] > 0, w[:, 0], np.nan), 2, n_boot=400, seed=0)
    assert 0 < ci.n_valid < 400 and ci.low >= 1


# ---- report ------------------------------------------------------------------------------------

def test_write_report_json_and_markdown(tmp_path):
    normal = EvalItem("n", "p9", np.zeros((8, 8), np.uint8), square(), "normal")
    rep = evaluate_segmentation([half_overlap(), perfect(), both_empty(), normal], BIN, n_boot=100)
    json_path, md_path = write_report(rep, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["counts"]["both_empty"] == 1 and data["counts"]["false_positive_images"] == 1
    assert data["headline"]["dice_lesion_images_mean"]["value"] == pytest.approx(0.75)
    assert data["headline"]["dice_lesion_images_max"]["ci"] is None
    assert data["bootstrap"]["unit"] == "patient" and data["bootstrap"]["n_boot"] == 100
    assert data["per_image"][2]["dice"] is None  # NaN written as null, not as invalid JSON
    assert any("Both empty" in r for r in data["rules"])
    md = md_path.read_text()
    assert "both empty: 1" in md and "| Dice, lesion images, mean | 0.7500 |" in md
    assert "2|P∩G| / (|P| + |G|)" in md and "resampling PATIENTS" in md
    assert "FP pixels: 4" in md
