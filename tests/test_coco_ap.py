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


def test_agrees_with_torchmetrics_mean_average_precision():
    """Cross-check (issue 7.5): the same detections through torchmetrics' MeanAveragePrecision, boxes
    and masks, on a random scene of several images with jittered, rescored and spurious detections.

    Every image has a lesion here: on an image WITHOUT ground truth, torchmetrics 1.9's "segm" mode
    drops the false positives (its "bbox" mode and COCOeval itself count them; measured: adding two
    lesion-free images with false positives left its mask mAP unchanged while its box mAP fell).
    We follow COCOeval; ``test_false_positives_on_lesion_free_images_count`` pins that."""
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    rng = np.random.default_rng(7)
    acc = CocoAccumulator()
    preds, targets = [], []
    for _ in range(6):
        gts = []
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = int(rng.integers(0, 50)), int(rng.integers(0, 40))
            gts.append(rect(SHAPE, x0, y0, x0 + int(rng.integers(6, 28)), y0 + int(rng.integers(6, 22))))
        dets = []
        for g in gts:  # a jittered detection of most lesions
            if rng.random() < 0.8:
                ys, xs = np.nonzero(g)
                dx, dy = (int(v) for v in rng.integers(-4, 5, size=2))
                x0, y0 = max(xs.min() + dx, 0), max(ys.min() + dy, 0)
                dets.append(rect(SHAPE, x0, y0, min(xs.max() + 1 + dx, SHAPE[1]), min(ys.max() + 1 + dy, SHAPE[0])))
        for _ in range(int(rng.integers(0, 3))):  # and false positives
            x0, y0 = int(rng.integers(0, 60)), int(rng.integers(0, 50))
            dets.append(rect(SHAPE, x0, y0, x0 + 10, y0 + 8))
        dets = [d for d in dets if d.any()]
        scores = rng.random(len(dets))
        acc.add(SHAPE, gts, [LesionComponent.from_mask(d, s) for d, s in zip(dets, scores)])

        def boxes(masks):
            out = []
            for m in masks:
                ys, xs = np.nonzero(m)
                out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)

        def stack(masks):
            return torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, *SHAPE), dtype=torch.bool)

        preds.append({"boxes": boxes(dets), "scores": torch.tensor(scores, dtype=torch.float32),
                      "labels": torch.ones(len(dets), dtype=torch.long), "masks": stack(dets)})
        targets.append({"boxes": boxes(gts), "labels": torch.ones(len(gts), dtype=torch.long), "masks": stack(gts)})
    ours = acc.result()
    assert ours["n_lesions"] > 5 and ours["n_detections"] > ours["n_lesions"]
    for kind, iou_type in (("box", "bbox"), ("mask", "segm")):
        metric = MeanAveragePrecision(iou_type=iou_type)
        metric.update(preds, targets)
        theirs = metric.compute()
        got = ours[kind]
        assert got["AP"] == pytest.approx(float(theirs["map"]), abs=1e-6), kind
        assert got["AP50"] == pytest.approx(float(theirs["map_50"]), abs=1e-6), kind
        assert got["AP75"] == pytest.approx(float(theirs["map_75"]), abs=1e-6), kind


def test_false_positives_on_lesion_free_images_count():
    """COCO's rule (and the FROC's): a normal image's detections are false positives."""
    lesion = rect(SHAPE, 10, 10, 30, 30)
    acc = CocoAccumulator()
    acc.add(SHAPE, [lesion], [LesionComponent.from_mask(lesion, 0.5)])
    alone = acc.result()["mask"]["AP50"]
    acc.add(SHAPE, [], [LesionComponent.from_mask(rect(SHAPE, 40, 40, 60, 60), 0.9)])  # a normal image
    assert alone == pytest.approx(1.0) and acc.result()["mask"]["AP50"] == pytest.approx(0.5, abs=0.01)
