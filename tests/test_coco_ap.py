"""COCO AP of lesion detections (``evaluation.coco_ap``) on examples whose AP follows by hand."""

from __future__ import annotations

import numpy as np
import pytest

from mammocad.evaluation.coco_ap import CocoAccumulator
from mammocad.records import LesionComponent


def rect(shape, x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


SHAPE = (64, 80)


def test_exact_detection_has_ap_one_and_a_partial_one_counts_only_to_its_iou():
    acc = CocoAccumulator()
    acc.add(SHAPE, [rect(SHAPE, 10, 10, 60, 20)], [LesionComponent.from_mask(rect(SHAPE, 10, 10, 60, 20), 0.9)])
    r = acc.result()
    assert r["box"] == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})
    assert r["mask"] == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})

    # IoU 330/500 = 0.66: a hit at the IoU thresholds 0.50, 0.55, 0.60, 0.65 -> AP = 4/10, AP50 1, AP75 0
    acc = CocoAccumulator()
    acc.add(SHAPE, [rect(SHAPE, 10, 10, 60, 20)], [LesionComponent.from_mask(rect(SHAPE, 10, 10, 43, 20), 0.9)])
    r = acc.result()
    for kind in ("box", "mask"):
        assert r[kind] == pytest.approx({"AP": 0.4, "AP50": 1.0, "AP75": 0.0}), kind


def test_a_higher_scored_false_positive_halves_the_precision_of_the_hit():
    """Two images, one lesion each; the false positive on the lesion-free area outranks one of the
    two hits: at recall 1/2 precision is 1, at recall 1 it is 2/3 (COCO's 101-point interpolation)."""
    acc = CocoAccumulator()
    lesion = rect(SHAPE, 10, 10, 30, 30)
    acc.add(SHAPE, [lesion], [LesionComponent.from_mask(lesion, 0.9), LesionComponent.from_mask(rect(SHAPE, 50, 40, 70, 60), 0.8)])
    acc.add(SHAPE, [lesion], [LesionComponent.from_mask(lesion, 0.7)])
    acc.add(SHAPE, [], [])  # a normal image without detections changes nothing
    r = acc.result()
    recall = np.linspace(0, 1, 101)
    expected = np.where(recall <= 0.5, 1.0, 2 / 3).mean()
    assert r["mask"]["AP50"] == pytest.approx(expected, abs=1e-6) and r["n_lesions"] == 2 and r["n_detections"] == 3


def test_undefined_without_lesions_and_zero_without_detections():
    acc = CocoAccumulator()
    acc.add(SHAPE, [None], [LesionComponent.from_mask(rect(SHAPE, 1, 1, 5, 5), 0.5)])  # None: not scorable
    assert acc.result()["box"] is None
    acc = CocoAccumulator()
    acc.add(SHAPE, [rect(SHAPE, 1, 1, 5, 5)], [])
    assert acc.result()["mask"] == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
