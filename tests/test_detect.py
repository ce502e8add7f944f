"""The detection task: instance targets from prepared data, merging across windows and flips, one
training engine for detection, and the bundle through Predictor, predict and evaluate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mammocad.errors import ConfigError
from mammocad.records import CroppedMask
from mammocad.tasks.detect import (InferenceSettings, _windows, decode_instances, find_candidates, find_lesions,
                                   instance_codes, merge_instances)
from tiny_prepared import make_tiny_prepared, write_config

DETECTOR = {"name": "maskrcnn", "kwargs": {"backbone": "efficientnet_lite0", "pretrained": False, "fpn_channels": 16,
                                           "box_head_width": 32, "mask_head_channels": 8,
                                           "anchor_sizes": [8, 16, 32, 64, 128]}}
DETECT_SECTIONS = {
    "task": "detect", "model": DETECTOR,
    "sampling": {"kind": "balanced", "patch": 64, "n_per_epoch": 8, "batch_size": 2, "workers": 0,
                 "fractions": {"lesion": 0.75, "tissue": 0.25, "background": 0.0}},
    "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "schedule": {"kind": "none"}},
    "inference": {"tile": 64, "overlap": 0.25, "batch_size": 2, "mode": "whole", "threshold": 0.5, "min_area": 4},
    "bundle": {"name": "tiny-det", "description": "test detector"},
}


def settings(**kw) -> InferenceSettings:
    base = dict(class_names=("background", "benign", "malignant"), threshold=0.5, min_area=1, tile=64, overlap=0.25,
                mode="whole", batch_size=2)
    return InferenceSettings(**{**base, **kw})


def test_instance_codes_round_trip_to_torchvision_targets():
    shape = (40, 50)
    a, b, sliver = (np.zeros(shape, bool) for _ in range(3))
    a[5:15, 5:20] = True
    b[20:35, 30:45] = True
    sliver[0, 0:3] = True  # 3 pixels: no training instance
    codes = instance_codes([a, None, b, sliver], [2, 1, 1, 2], 2, shape)
    assert sorted(np.unique(codes).tolist()) == [0, 2, 3, 6]  # 1 + k*K + (c-1): k = 0, 1, 2 (None skipped)
    t = decode_instances(torch.from_numpy(codes.astype(np.int64)), 2)
    assert t["labels"].tolist() == [2, 1]
    assert t["boxes"].tolist() == [[5, 5, 20, 15], [30, 20, 45, 35]]
    assert t["masks"].shape == (2, 40, 50) and int(t["masks"][1].sum()) == int(b.sum())
    empty = decode_instances(torch.zeros(shape, dtype=torch.int64), 2)  # a normal patch: a negative
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["masks"].shape == (0, 40, 50)


def _raw(box, score, label, size=(60, 80)):
    x0, y0, x1, y1 = box
    return {"box": np.array(box, float), "score": score, "label": label, "mask": np.ones((y1 - y0, x1 - x0), bool),
            "top": y0, "left": x0}


def test_merge_groups_overlapping_instances_across_classes_and_unions_their_masks():
    raw = [_raw((10, 10, 30, 30), 0.6, 1), _raw((12, 10, 32, 30), 0.3, 2), _raw((11, 11, 31, 31), 0.5, 1),
           _raw((50, 40, 70, 55), 0.2, 2)]
    breast = np.ones((60, 80), bool)
    breast[:, 66:] = False
    d = merge_instances(raw, (60, 80), 2, breast)
    assert len(d) == 2
    # one pass: benign best 0.6 + malignant best 0.3 (torchvision scores both classes of a proposal from one softmax)
    assert d.scores.tolist() == pytest.approx([0.9, 0.2])
    assert d.class_scores[0].tolist() == pytest.approx([0.6, 0.3])
    assert d.masks[0].box == (10, 10, 32, 31)  # the union of the three members' masks
    assert d.masks[1].box == (50, 40, 66, 55)  # cut to the breast
    names = ("benign", "malignant")
    lesions = find_lesions(d, breast, settings(threshold=0.5), names)
    assert len(lesions) == 1 and lesions[0].label == "benign"
    assert lesions[0].class_probabilities == pytest.approx({"benign": 2 / 3, "malignant": 1 / 3})
    cands, search = find_candidates(d, breast, settings(), names, threshold=0.05, max_candidates=1)
    assert [c.score for c in cands] == pytest.approx([0.9]) and search["highest_score_dropped"] == pytest.approx(0.2)
    assert len(merge_instances([], (60, 80), 2)) == 0


def test_merge_never_adds_scores_of_different_passes():
    """A plain pass calling a lesion benign 0.45 and a flipped pass calling it malignant 0.45 is a
    lesion of score 0.5 (the best pass: 0.45 + 0.05), not 0.9."""
    plain = [{**_raw((10, 10, 30, 30), 0.45, 1), "source": "plain"}, {**_raw((10, 10, 30, 30), 0.05, 2), "source": "plain"}]
    flip = [{**_raw((11, 10, 31, 30), 0.45, 2), "source": "flip"}, {**_raw((11, 10, 31, 30), 0.05, 1), "source": "flip"}]
    d = merge_instances(plain + flip, (60, 80), 2)
    assert len(d) == 1 and d.scores.tolist() == pytest.approx([0.5])
    # within one window a small box inside a large one is another finding (a lesion inside a false
    # positive's box); from another window it is the piece of a lesion that the window cut
    big, small = _raw((0, 0, 40, 40), 0.7, 1), _raw((5, 5, 15, 15), 0.6, 1)
    assert len(merge_instances([big, small], (60, 80), 2)) == 2
    assert len(merge_instances([{**big, "source": (0, 0, False)}, {**small, "source": (0, 30, False)}], (60, 80), 2)) == 1
    with pytest.raises(ConfigError, match="class 3 from a model said to have 2"):
        merge_instances([_raw((1, 1, 5, 5), 0.9, 3)], (60, 80), 2)


class _FakeDetector(torch.nn.Module):
    """Finds the bright pixels of each window it is given (as a box + mask), score 0.9: a model whose
    right answer is known, to check the window offsets and the flip mapping back."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.eval()

    def forward(self, images):
        out = []
        for im in images:
            m = im[0] > 0.5
            if not m.any():
                out.append({"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                            "masks": torch.zeros((0, 1) + tuple(m.shape))})
                continue
            ys, xs = torch.nonzero(m, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            out.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
                        "masks": m[None, None].float()})
        return out


@pytest.mark.parametrize("mode,tta", [("whole", ()), ("sliding", ()), ("sliding", ("hflip",)), ("four", ("hflip",))])
def test_windows_and_flips_map_instances_back_onto_the_image(monkeypatch, mode, tta):
    import mammocad.tasks.detect as detect

    monkeypatch.setattr(detect, "_forward", lambda model, images, bf16: model(images))
    img = np.zeros((100, 90), np.float32)
    img[20:35, 50:70] = 1.0  # an asymmetric lesion: a wrong flip mapping would move it
    found = detect.infer(_FakeDetector(), img, None, settings(mode=mode, tile=64, tta=tta, class_names=("background", "lesion")))
    assert len(found) == 1
    assert found.masks[0].box == (50, 20, 70, 35)
    assert found.masks[0].area == 15 * 20


def test_windows_whole_four_and_sliding_cover_the_image():
    assert _windows((100, 90), settings(mode="whole"), 32, None) == [(0, 0, 100, 90)]
    four = _windows((100, 90), settings(mode="four"), 32, None)
    assert len(four) == 4
    cover = np.zeros((100, 90), bool)
    for y, x, h, w in four:
        cover[y:y + h, x:x + w] = True
    assert cover.all()
    sliding = _windows((100, 90), settings(mode="sliding", tile=64, overlap=0.25), 32, None)
    cover[:] = False
    for y, x, h, w in sliding:
        assert h <= 64 and w <= 64
        cover[y:y + h, x:x + w] = True
    assert cover.all() and len(sliding) == 4
    with pytest.raises(ConfigError, match="not one of whole, four, sliding"):
        _windows((10, 10), settings(mode="diagonal"), 32, None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("detect")
    make_tiny_prepared(root)
    return root


@pytest.fixture(scope="module")
def trained(workdir, one_torch_thread):
    from mammocad.training.config import load_config
    from mammocad.training.engine import train

    cfg = load_config(write_config(workdir, "det.yaml", **DETECT_SECTIONS,
                                   train={"epochs": 3, "patience": 5, "amp": "none", "threads": 1, "seed": 0,
                                          "final_n_boot": 10}))
    return cfg, train(cfg, workdir / "run", progress=False)


def test_the_engine_trains_a_detector_and_writes_a_detection_bundle(workdir, trained):
    cfg, result = trained
    assert result.bundle_dir is not None and result.epochs == 3
    with open(workdir / "run" / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["train_loss"]) for r in rows][-1] < float(rows[0]["train_loss"])  # it learns
    assert all(np.isfinite(float(r["val_froc"])) for r in rows)  # validated every epoch on whole images
    card = json.loads((result.bundle_dir / "model.json").read_text())
    assert card["task"] == "detect" and card["output"] == "instances"
    assert card["architecture"]["name"] == "maskrcnn" and card["architecture"]["kwargs"]["num_classes"] == 1
    assert card["class_names"] == ["background", "lesion"] and card["tiling"]["mode"] == "whole"
    assert card["validation"]["detection"]["n_lesions"] >= 1  # the final validation scored lesions


def test_predictor_runs_a_detection_bundle_like_a_segmentation_one(workdir, trained):
    from mammocad.datasets.prepared import PreparedDataset
    from mammocad.evaluation.run import evaluate_prepared
    from mammocad.inference.predictor import Predictor

    _, result = trained
    predictor = Predictor(result.bundle_dir, device="cpu", autocast="fp32")
    pc = PreparedDataset(workdir / "prepared").by_id("img0")
    out = predictor.predict_image(pc.case.image_path, candidate_threshold=0.05)
    p = out.prediction
    assert p.model_name == "tiny-det" and tuple(p.image_size) == (96, 80)  # the ORIGINAL image's grid
    assert all(c.score >= 0.05 for c in p.candidates)
    assert all(les.score >= 0.5 for les in p.lesions) and len(out.lesion_masks) == len(p.lesions)
    assert 0.0 <= p.attributes["max_lesion_probability"] <= 1.0
    report = evaluate_prepared(predictor, workdir / "prepared", split="all", n_boot=0, progress=False)
    assert report.detection is not None and report.detection.n_lesions == 6
    assert report.detection.coco["ranked"] == "the candidates"  # COCO AP of a detector's instances


def test_a_segmentation_model_or_mode_is_refused_by_the_detect_task(workdir):
    from mammocad.training.config import load_config
    from mammocad.training.engine import train

    cfg = load_config(write_config(workdir, "det_unet.yaml", **{**DETECT_SECTIONS, "model": {
        "name": "unet", "kwargs": {"base_channels": 4, "depth": 2}}}, train={"epochs": 1, "amp": "none", "threads": 1}))
    with pytest.raises(ConfigError, match="is not a detection model"):
        train(cfg, workdir / "bad", progress=False)
    seg = load_config(write_config(workdir, "seg_whole.yaml", inference={"tile": 32, "mode": "whole"},
                                   train={"epochs": 1, "amp": "none", "threads": 1}))
    with pytest.raises(ConfigError, match="'whole' is for detection"):
        train(seg, workdir / "bad_seg", progress=False)


def test_benign_malignant_detector_leaves_out_unknown_pathology_unless_told(workdir, caplog):
    """The tiny dataset's lesions have unknown pathology: a benign/malignant detector cannot use them
    (a lesion is not a negative) unless ``data.unknown`` names a class."""
    from mammocad.datasets.prepared import PreparedDataset
    from mammocad.tasks.detect import load_split
    from mammocad.training.config import load_config

    prepared = PreparedDataset(workdir / "prepared")
    cfg = load_config(write_config(workdir, "det3.yaml", **DETECT_SECTIONS,
                                   data={"prepared": "prepared", "fold": 0, "num_classes": 3}))
    kept = load_split(cfg, prepared, "train")
    assert all(not d.lesion_masks or all(m is None for m in d.lesion_masks) for d in kept)  # only the normal ones
    assert "left out" in caplog.text
    cfg.data.unknown = "malignant"
    named = load_split(cfg, prepared, "train")
    assert len(named) == 6
    codes = [np.unique(d.sample.target) for d in named]
    assert all(set(c.tolist()) <= {0, 2} for c in codes)  # malignant = class 2 -> code 1 + 0*2 + 1


def test_predict_command_writes_detections_on_the_original_grid(workdir, trained, tmp_path):
    from typer.testing import CliRunner

    from mammocad.cli import app

    _, result = trained
    image = workdir / "raw" / "images" / "img0.png"
    res = CliRunner().invoke(app, ["predict", str(image), "--out", str(tmp_path / "pred"), "--model",
                                   str(result.bundle_dir), "--device", "cpu", "--autocast", "fp32"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "pred" / "img0.json").read_text())
    assert record["model_name"] == "tiny-det" and record["image_size"] == [96, 80]
    assert "candidates" in record


def test_masks_pasted_in_their_boxes_equal_torchvisions_full_canvas():
    """``mask_in_box`` makes, for a region, exactly the pixels torchvision's full-image paste makes."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from mammocad.tasks.detect import mask_in_box

    g = torch.Generator().manual_seed(0)
    h, w = 70, 90
    masks = torch.rand(6, 1, 28, 28, generator=g)
    boxes = torch.tensor([[10.3, 5.7, 40.2, 30.9], [0.0, 0.0, 12.5, 8.1], [60.4, 50.2, 90.0, 70.0],
                          [33.0, 33.0, 33.9, 34.2], [0.0, 20.0, 90.0, 21.0], [5.5, 1.5, 88.8, 68.8]])
    full = paste_masks_in_image(masks, boxes, (h, w))[:, 0].numpy()
    for j, box in enumerate(boxes.numpy()):
        x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
        x1, y1 = min(max(int(np.ceil(box[2])), x0 + 1), w), min(max(int(np.ceil(box[3])), y0 + 1), h)
        assert np.array_equal(mask_in_box(masks[j, 0], box, (y0, x0, y1, x1)), full[j, y0:y1, x0:x1])
        assert np.array_equal(mask_in_box(masks[j, 0], box, (0, 0, h, w)), full[j])  # beyond the box: zeros


def test_a_trained_detector_finds_the_same_instances_without_full_image_masks(workdir, trained, monkeypatch):
    import mammocad.tasks.detect as detect
    from mammocad.datasets.prepared import PreparedDataset
    from mammocad.models.bundle import load_bundle

    model, _ = load_bundle(trained[1].bundle_dir)
    model.roi_heads.score_thresh = 0.0  # a 3-epoch detector's scores are low: keep every instance to compare
    ds = PreparedDataset(workdir / "prepared")
    s = settings(mode="whole", tile=64, class_names=("background", "lesion"), threshold=0.05)
    images = [ds.load_image(pc) for pc in ds.cases[:4]]
    ours = [detect.infer(model, im, None, s, autocast="fp32") for im in images]

    def pasted(model, images, bf16):  # torchvision's own postprocess: every mask on a full canvas
        with torch.no_grad():
            return model(images)

    monkeypatch.setattr(detect, "_forward", pasted)
    theirs = [detect.infer(model, im, None, s, autocast="fp32") for im in images]
    assert sum(len(f) for f in ours) > 0
    for a, b in zip(ours, theirs):
        assert a.scores == pytest.approx(b.scores)
        assert [m.box for m in a.masks] == [m.box for m in b.masks]
        assert all(np.array_equal(m.mask, n.mask) for m, n in zip(a.masks, b.masks))
