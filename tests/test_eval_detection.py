"""Lesion detection read off a segmentation: hit rules, threshold sweep, FROC, bootstrap, and a
real-data check on mini-MIAS circles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import shared_path
from mammocad.errors import InputError
from mammocad.evaluation import (DetectionImage, EvalItem, evaluate_lesion_detection, evaluate_segmentation,
                                 lesion_masks, write_report)
from mammocad.evaluation.lesion_detection import (MatchedImage, _sensitivity_at_k_statistic, component_hits,
                                                  evaluate_matched, froc_curve, match_image)
from mammocad.records import CroppedMask, Lesion, LesionComponent
from mammocad.tasks.segment_lesions import probability_to_lesions


def box_mask(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def test_centre_inside_rule_without_iou():
    lesion = box_mask((20, 20), (9, 11), (9, 11))  # 2x2 in the middle of a 10x10 component
    comp = LesionComponent.from_mask(box_mask((20, 20), (5, 15), (5, 15)), 0.7)
    assert comp.box == (5, 5, 15, 15) and comp.mask.mask.shape == (10, 10)
    # IoU = 4/100 < 0.1, but the centroid (pixel-edge 10, 10) is inside the lesion
    assert component_hits(comp, lesion)
    off_centre = LesionComponent.from_mask(box_mask((20, 20), (10, 20), (10, 20)), 0.7)  # overlaps 1 px, centroid outside
    assert not component_hits(off_centre, lesion)


def test_iou_rule_without_centre():
    lesion = box_mask((4, 16), (0, 4), (0, 4))  # 16 px
    near = LesionComponent.from_mask(box_mask((4, 16), (0, 4), (3, 7)), 0.5)  # IoU 4/28 = 0.143, centroid col 5
    far = LesionComponent.from_mask(box_mask((4, 16), (0, 4), (3, 13)), 0.5)  # IoU 4/52 = 0.077, centroid col 8
    assert component_hits(near, lesion) and not component_hits(far, lesion)
    assert not component_hits(near, lesion, iou_threshold=0.15)


def _sweep_example(with_empty_normal=True):
    """Lesion image A: lesion hit at 0.9, FP 0.8; lesion image B: lesion hit at 0.4, FP 0.7;
    normal C: FPs 0.95 and 0.6; normal D: nothing."""
    shape = (10, 10)
    lesion = box_mask(shape, (0, 3), (0, 3))
    hit = box_mask(shape, (0, 3), (0, 3))
    away = box_mask(shape, (7, 9), (7, 9))
    away2 = box_mask(shape, (0, 2), (7, 9))
    comp = LesionComponent.from_mask
    images = [
        DetectionImage("A", "pA", shape, [lesion], [comp(hit, 0.9), comp(away, 0.8)]),
        DetectionImage("B", "pB", shape, [lesion], [comp(hit, 0.4), comp(away, 0.7)]),
        DetectionImage("C", "pC", shape, [], [comp(away, 0.95), comp(away2, 0.6)]),
    ]
    if with_empty_normal:
        images.append(DetectionImage("D", "pD", shape, [], []))
    return images


def test_threshold_sweep_and_sensitivity_at_fp_rates():
    rep = evaluate_lesion_detection(_sweep_example(), n_boot=200)
    pts = [(p.threshold, p.fp_per_image, p.sensitivity) for p in rep.froc]
    assert pts == [(0.95, 0.25, 0.0), (0.9, 0.25, 0.5), (0.8, 0.5, 0.5), (0.7, 0.75, 0.5), (0.6, 1.0, 0.5),
                   (0.4, 1.0, 1.0)]
    assert rep.sensitivity_at_1fp.value == 1.0 and rep.threshold_at_1fp == 0.4
    ops = {p["fp_per_image"]: (p["sensitivity"], p["threshold"]) for p in rep.operating_points}
    assert ops[0.125] == (0.0, None) and ops[0.25] == (0.5, 0.9) and ops[0.5] == (0.5, 0.9)
    assert (rep.n_images, rep.n_lesions, rep.n_components) == (4, 2, 6)


def test_normal_images_count_in_fp_per_image():
    # the normal film C contributes the top-scoring FP; dropping the FP-free normal D raises FP/image
    # from 4/4 to 4/3 at threshold 0.4, so at <= 1 FP/image the best is sensitivity 0.5 (first at 0.9)
    without_d = evaluate_lesion_detection(_sweep_example(with_empty_normal=False), n_boot=0)
    assert without_d.froc[0].n_false_positives == 1 and without_d.froc[0].fp_per_image == pytest.approx(1 / 3)
    assert without_d.sensitivity_at_1fp.value == 0.5 and without_d.threshold_at_1fp == 0.9


def test_froc_is_monotone():
    rng = np.random.default_rng(3)
    matched = [MatchedImage(f"i{i}", f"p{i // 2}", np.where(rng.random(2) < 0.3, -np.inf, rng.random(2)),
                            rng.random(rng.integers(0, 5))) for i in range(30)]
    curve = froc_curve(matched)
    t = [p.threshold for p in curve]
    assert all(a > b for a, b in zip(t, t[1:]))
    assert all(a.fp_per_image <= b.fp_per_image and a.sensitivity <= b.sensitivity for a, b in zip(curve, curve[1:]))
    assert curve[-1].n_detected == sum(np.isfinite(m.lesion_scores).sum() for m in matched)


def test_bootstrap_statistic_matches_point_estimate():
    rng = np.random.default_rng(5)
    matched = [MatchedImage(f"i{i}", f"p{i // 3}", np.where(rng.random(1) < 0.2, -np.inf, rng.random(1)),
                            rng.random(rng.integers(0, 4))) for i in range(24)]
    rep = evaluate_matched(matched, n_boot=300, seed=1)
    for k in (0.25, 1.0, 2.0):
        stat, n_groups = _sensitivity_at_k_statistic(matched, k)
        expected = next(p["sensitivity"] for p in rep.operating_points if p["fp_per_image"] == k)
        assert stat(np.ones((1, n_groups)))[0] == pytest.approx(expected)
    ci = rep.sensitivity_at_1fp.ci
    assert ci.n_groups == 8 and ci.low <= rep.sensitivity_at_1fp.value <= ci.high and ci.low < ci.high


def test_lesions_without_geometry_are_counted_not_scored():
    shape = (6, 6)
    img = DetectionImage("x", "p", shape, [box_mask(shape, (0, 2), (0, 2)), None],
                         [LesionComponent.from_mask(box_mask(shape, (0, 2), (0, 2)), 0.8)])
    rep = evaluate_lesion_detection([img], n_boot=100)
    assert rep.n_lesions == 1 and rep.n_lesions_without_geometry == 1
    assert rep.sensitivity_at_1fp.value == 1.0
    assert rep.sensitivity_at_1fp.ci.degenerate  # one patient
    assert any("no geometry" in n for n in rep.notes) and any("only one patient" in n for n in rep.notes)


def test_lesion_masks_from_records():
    masks = lesion_masks([Lesion(circle=(5.0, 5.0, 2.0)), Lesion(pathology="malignant")], (10, 10))
    assert masks[1] is None
    assert int(masks[0].sum()) == 12  # pixel centres within radius 2 of (5, 5): 4 x 3 = 12


def test_bad_components_and_mixed_items_raise():
    shape = (5, 5)
    bad = LesionComponent(mask=CroppedMask(np.ones((2, 2), bool), 4, 4, shape), box=(4, 4, 6, 6), area=4, score=0.5,
                          label="lesion")
    with pytest.raises(InputError, match="^x: component mask region"):
        match_image(DetectionImage("x", "p", shape, [], [bad]))
    gt = np.zeros(shape, np.uint8)
    items = [EvalItem("a", "p", gt, gt, lesion_masks=[], components=[]), EvalItem("b", "p", gt, gt)]
    with pytest.raises(InputError, match="for every image or for none"):
        evaluate_segmentation(items, ["background", "lesion"], n_boot=0)


def test_detection_report_written(tmp_path):
    rep = evaluate_lesion_detection(_sweep_example(), n_boot=100)
    json_path, md_path = write_report(rep, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["sensitivity_at_1fp"]["value"] == 1.0 and len(data["froc"]) == 6
    md = md_path.read_text()
    assert "**Sensitivity at 1 FP/image: 1.0000**" in md and "centroid" in md and "ALL images" in md


@pytest.mark.realdata
def test_mias_masks_as_predictions():
    """The shipped MIAS circle masks used as the prediction: every lesion found, Dice 1; the same
    mask pasted on a normal film is a false-positive image with exactly the mask's pixel count."""
    import cv2

    from mammocad.datasets.mias import read_mias

    mias = shared_path("mias")
    cases = {c.case_id: c for c in read_mias(mias)}
    items = []
    for cid in ("mdb001", "mdb223", "mdb226", "mdb249", "mdb003"):
        case = cases[cid]
        masks = lesion_masks(case.lesions, (1024, 1024))
        gt = np.zeros((1024, 1024), np.uint8)
        for m in masks:
            gt[m] = 1
        src = "mdb001" if cid == "mdb003" else cid  # the normal film mdb003 gets mdb001's mask
        pred = (cv2.imread(str(mias / "masks" / f"{src}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8)
        comps = probability_to_lesions(pred[None].astype(np.float32), threshold=0.5, min_area=1)
        items.append(EvalItem(cid, case.patient_id, gt, pred, case.label, lesion_masks=masks, components=comps))
    rep = evaluate_segmentation(items, ["background", "lesion"], n_boot=200)
    assert rep.counts == {"lesion_images": 4, "both_empty": 0, "false_positive_images": 1, "ignored_pixels": 0,
                          "scored_pixels": 5 * 1024 * 1024}
    assert rep.headline["dice_lesion_images_mean"].value == 1.0
    mdb001_px = int((cv2.imread(str(mias / "masks" / "mdb001_mask.png"), cv2.IMREAD_GRAYSCALE) > 0).sum())
    assert rep.false_positive_area["total_fp_pixels"] == mdb001_px
    det = rep.detection
    assert (det.n_lesions, det.n_lesions_without_geometry, det.n_components) == (8, 0, 9)
    assert det.sensitivity_at_1fp.value == 1.0  # 1 FP over 5 films = 0.2 FP/image
    # every component scores 1.0, so the only threshold brings the FP along: nothing at <= 0.125 FP/image
    ops = {p["fp_per_image"]: p["sensitivity"] for p in det.operating_points}
    assert ops[0.125] == 0.0 and ops[0.25] == 1.0


def test_hit_rule_is_selectable_and_written_into_the_report():
    """Issue 7.5: the hit criterion is a choice (IoU >= 0.1, IoU >= 0.5, centroid inside, or the MIAS
    papers' IoU >= 0.1 or centroid), and every report says which one made its figures."""
    from mammocad.errors import ConfigError
    from mammocad.evaluation.lesion_detection import DEFAULT_HIT, HitRule, component_hits
    from mammocad.records import LesionComponent

    assert DEFAULT_HIT.name == "iou0.1+centroid"
    for name in ("iou0.1+centroid", "iou0.1", "iou0.5", "centroid", "centroid+iou0.3"):
        assert HitRule.parse(HitRule.parse(name).name) == HitRule.parse(name)
    for bad in ("iou", "iou0", "iou1.5", "centre", "", "iou0.1+iou0.5+centroid+centroid"):
        with pytest.raises(ConfigError, match="--hit"):
            HitRule.parse(bad)

    shape = (64, 64)
    lesion = np.zeros(shape, dtype=bool)
    lesion[20:40, 20:40] = True  # 400 px
    overlap = np.zeros(shape, dtype=bool)
    overlap[30:50, 30:50] = True  # IoU 100/700 = 0.14, centroid (40, 40) just outside the lesion
    ring = np.zeros(shape, dtype=bool)
    ring[10:51, [10, 50]] = True
    ring[[10, 50], 10:51] = True  # centroid (30, 30) inside, no overlap
    expected = {"iou0.1+centroid": (True, True), "iou0.1": (True, False), "iou0.5": (False, False),
                "centroid": (False, True)}
    for name, (by_overlap, by_ring) in expected.items():
        rule = HitRule.parse(name)
        got = tuple(component_hits(LesionComponent.from_mask(m, 0.9), lesion, rule.iou, rule.centroid)
                    for m in (overlap, ring))
        assert got == (by_overlap, by_ring), name
        report = evaluate_lesion_detection([DetectionImage("c", "p", shape, [lesion], [LesionComponent.from_mask(overlap, 0.9)])],
                                           hit=name, n_boot=0)
        assert report.hit_rule == name and report.to_dict()["hit_rule"] == name
        assert report.sensitivity_at_1fp.value == (1.0 if by_overlap else 0.0)
        assert f"Hit (rule {name})" in report.rules[0]
