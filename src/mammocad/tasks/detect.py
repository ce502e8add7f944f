"""The detection task: lesion INSTANCES (box, mask, class, score) from an instance-segmentation model
(Mask R-CNN, ``models.maskrcnn``), trained on patches and run on whole prepared images.

Training data. Each prepared case becomes a ``SegmentationSample`` whose target is an INSTANCE map:
lesion k of class c (1 = lesion, or 1 benign / 2 malignant) is painted ``1 + k*K + (c - 1)`` (K lesion
classes), so the segmentation task's patch samplers (lesion-centred, tissue, background, in the
config's fractions: the papers' lesion-centred and random patches) and its augmentation (torchvision
v2: masks resampled with nearest neighbour, so codes never blend) serve detection unchanged; the
collate turns each patch's codes back into torchvision targets (one mask, box and label per
instance; a patch without a lesion is a negative with empty targets). Where two lesions overlap, the
later one keeps the shared pixels. Cases with a lesion of unknown pathology are left out of a
benign/malignant detector unless ``data.unknown`` names a class: a lesion cannot be a negative.

Inference on the prepared grid (``infer``): the whole image (``inference.mode: whole``; the model
pads to its size divisor and never resizes), the papers' four quadrants (``four``; grown by
``inference.overlap`` into each other, so that a lesion on a cut is whole in one of them) or
sliding tiles; with ``tta: [hflip]`` the mirrored image too. The instances of all windows and flips
are merged class-agnostically: greedy grouping by box IoU >= ``MERGE_IOU`` or a box inside another
(a window's cut piece); a group's mask is the union of its members' masks (probability >= 0.5); its
class scores are the best score of each class within ONE pass (window, flip), its lesion score
their sum (capped at 1: torchvision scores each class of a proposal from one softmax, so the sum
estimates 1 - p(background); the max would halve the score of a lesion the model cannot call
benign or malignant), taken from the best pass (passes never add up). Masks are cut to the breast. ``find_lesions`` keeps the instances at the bundle's score threshold (papers: 0.7, 0.9),
minimum area and max lesions; ``find_candidates`` those at the low candidate threshold (FROC).

Validation scores what the bundle will output (the same ``infer`` and ``find_*``) with
``evaluate_segmentation`` (FROC, COCO AP, Dice of the instance masks); the monitored score is the
mean sensitivity at 1/8 ... 8 FP per image (the CPM of the LUNA16 challenge), steadier on a small
validation split than one point of the curve.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mammocad.datasets.targets import IGNORE_INDEX, build_target, split_case_ids
from mammocad.errors import ConfigError, InputError
from mammocad.records import CroppedMask, LesionComponent
from mammocad.sampling import SegmentationSample
from mammocad.tasks import RunContext, ValidationResult, autocast_context
from mammocad.tasks.segment import InferenceSettings, build_train_dataset
from mammocad.tasks.segment_lesions import (DEFAULT_CANDIDATE_THRESHOLD, DEFAULT_MAX_CANDIDATES, cap_candidates,
                                            lesion_label_map)

NAME = "detect"
MERGE_IOU = 0.5  # instances of overlapping windows / flips with box IoU >= this are one lesion
MERGE_INSIDE = 0.8  # ... or with this share of the smaller box inside the larger (a window's cut piece)
MASK_THRESHOLD = 0.5  # Mask R-CNN mask probability -> pixel
MIN_INSTANCE_PIXELS = 4  # a patch's sliver of a lesion smaller than this is no training instance
MAX_CODE = 254  # instance codes live in uint8 below IGNORE_INDEX
MODES = ("whole", "four", "sliding")


def model_outputs(cfg: Any) -> int:
    """``num_classes`` of the model for a training config: lesion classes, background excluded
    (torchvision adds it)."""
    return int(cfg.data.label_classes) - 1


def output_names(model: nn.Module, settings: InferenceSettings) -> tuple[str, ...]:
    """What the model's classes 1..K are called: the card's class names after the background."""
    names = tuple(settings.class_names[1:])
    if int(getattr(model, "num_classes", len(names))) != len(names):
        raise ConfigError(settings.name, f"model detects {model.num_classes} class(es) but the card names "
                                         f"{list(settings.class_names)}")
    return names


# ---- inference on the prepared grid --------------------------------------------------------------
@dataclass
class Detections:
    """Merged instances of one prepared image, best first."""

    image_size: tuple[int, int]
    scores: np.ndarray  # (N,) lesion score (see the module docstring)
    class_scores: np.ndarray  # (N, K) best score of each class in the group
    masks: list[CroppedMask] = field(default_factory=list)  # the box of a lesion is its mask's

    def __len__(self) -> int:
        return len(self.scores)


def _windows(shape: tuple[int, int], settings: InferenceSettings, divisor: int,
             breast_mask: np.ndarray | None) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) windows inside the image."""
    from mammocad.tasks.tiling import plan_tiles

    h, w = shape
    if settings.mode not in MODES:
        raise ConfigError(settings.name, f"tiling mode {settings.mode!r} is not one of {', '.join(MODES)} for detection")
    if settings.mode == "whole":
        return [(0, 0, h, w)]
    if settings.mode == "four":  # quadrants grown by ``overlap`` into each other (see the module docstring)
        th, tw = min(h, math.ceil(h / 2 * (1 + settings.overlap))), min(w, math.ceil(w / 2 * (1 + settings.overlap)))
        return list(dict.fromkeys((y, x, th, tw) for y in (0, h - th) for x in (0, w - tw)))
    plan = plan_tiles(shape, tile=settings.tile, overlap=settings.overlap, mode=settings.mode, size_divisor=divisor,
                      breast_mask=breast_mask)
    top, _, left, _ = plan.pad
    out = []
    for (y, x), keep in zip(plan.starts, plan.keep):
        y0, x0 = max(int(y) - top, 0), max(int(x) - left, 0)
        y1, x1 = min(int(y) - top + plan.tile[0], h), min(int(x) - left + plan.tile[1], w)
        if keep and y1 > y0 and x1 > x0:
            out.append((y0, x0, y1 - y0, x1 - x0))
    return out or [(0, 0, h, w)]


def _forward(model: nn.Module, images: list[torch.Tensor], bf16: bool) -> list[dict[str, torch.Tensor]]:
    """torchvision's ``GeneralizedRCNN.forward`` in eval mode, with bf16 (when asked) on the backbone
    and FPN only: under a whole-model autocast torchvision decodes boxes in bf16, which snaps them to
    a 2-pixel grid from 256 px on and rounds scores to ~0.004 (ties on a FROC curve)."""
    with torch.no_grad():
        sizes = [tuple(im.shape[-2:]) for im in images]
        batch, _ = model.transform(images)
        with torch.autocast(batch.tensors.device.type, dtype=torch.bfloat16, enabled=bf16):
            features = model.backbone(batch.tensors)
        features = {k: v.float() for k, v in features.items()}
        proposals, _ = model.rpn(batch, features)
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    if [tuple(s) for s in batch.image_sizes] != sizes:  # a transform that resizes: map back its way
        return model.transform.postprocess(detections, batch.image_sizes, sizes)
    # No resize to undo, and the masks stay at the head's M x M: ``_raw_instances`` pastes each into
    # its own box only. torchvision's postprocess pastes every mask onto a full-image canvas, which
    # at 1024 x 832 cost more than the whole network (2.5 of 4.4 s for 100 detections).
    return detections


def mask_in_box(mask: torch.Tensor, box: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    """The part ``region`` = (y0, x0, y1, x1) of what torchvision's ``paste_masks_in_image`` makes of
    the head's M x M probability ``mask`` for ``box`` (x0, y0, x1, y1), without the full canvas: the
    same padding by one pixel, box expansion, integer box and bilinear resize, so the pixels are equal."""
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    padded, scale = expand_masks(mask[None, None].float(), padding=1)
    bx0, by0, bx1, by1 = (int(v) for v in expand_boxes(torch.as_tensor(box, dtype=torch.float32)[None], scale)
                          .to(torch.int64)[0])
    bw, bh = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
    y0, x0, y1, x1 = region
    out = np.zeros((y1 - y0, x1 - x0), np.float32)
    iy0, iy1 = max(by0, y0), min(by0 + bh, y1)  # the pasted box meets the region here
    ix0, ix1 = max(bx0, x0), min(bx0 + bw, x1)
    if iy1 > iy0 and ix1 > ix0:
        resized = F.interpolate(padded, size=(bh, bw), mode="bilinear", align_corners=False)[0, 0]
        out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = resized[iy0 - by0:iy1 - by0, ix0 - bx0:ix1 - bx0].numpy()
    return out


def _raw_instances(model: nn.Module, pixels: np.ndarray, windows: list[tuple[int, int, int, int]], flip: bool,
                   batch_size: int, device: torch.device, bf16: bool) -> list[dict[str, Any]]:
    """Every instance of every window, in image coordinates, masks cropped to their boxes."""
    out = []
    image = pixels[:, ::-1] if flip else pixels
    w_img = pixels.shape[1]
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        tensors = [torch.from_numpy(np.ascontiguousarray(image[y:y + h, x:x + w]))[None].to(device)
                   for y, x, h, w in chunk]
        results = _forward(model, tensors, bf16)
        for (y, x, h, w), r in zip(chunk, results):
            boxes = r["boxes"].float().cpu().numpy()
            masks = r["masks"].float().cpu() if "masks" in r else None  # (N, 1, M, M), or pasted (N, 1, h, w)
            for j in range(len(boxes)):
                bx0, by0, bx1, by1 = boxes[j]
                cx0, cy0 = int(math.floor(bx0)), int(math.floor(by0))
                cx1, cy1 = max(int(math.ceil(bx1)), cx0 + 1), max(int(math.ceil(by1)), cy0 + 1)
                cx1, cy1 = min(cx1, w), min(cy1, h)
                if masks is None:
                    crop = np.ones((cy1 - cy0, cx1 - cx0), np.float32)
                elif masks.shape[-2:] == (h, w):  # already pasted onto the window
                    crop = masks[j, 0, cy0:cy1, cx0:cx1].numpy()
                else:
                    crop = mask_in_box(masks[j, 0], boxes[j], (cy0, cx0, cy1, cx1))
                box = np.array([bx0 + x, by0 + y, bx1 + x, by1 + y], dtype=np.float64)
                left = cx0 + x
                if flip:  # back to the unmirrored image
                    box = np.array([w_img - box[2], box[1], w_img - box[0], box[3]])
                    crop, left = crop[:, ::-1], w_img - (cx1 + x)
                out.append({"box": box, "score": float(r["scores"][j]), "label": int(r["labels"][j]),
                            # the pass: the window where it lies in the image (a flipped pass's too), and the flip
                            "mask": crop >= MASK_THRESHOLD, "top": cy0 + y, "left": left,
                            "source": (y, w_img - x - w if flip else x, flip)})
    return out


def _same_lesion(a: np.ndarray, b: np.ndarray, other_window: np.ndarray) -> np.ndarray:
    """Box ``a`` against boxes ``b``: IoU >= MERGE_IOU, or, for a box from another window
    (``other_window``), one box (nearly) inside the other (intersection over the smaller >=
    MERGE_INSIDE: the piece of a lesion that a window cut). Within one window a small box inside a
    large one is another finding (a lesion inside a false positive's box), never merged away."""
    x0, y0 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
    x1, y1 = np.minimum(a[2], b[:, 2]), np.minimum(a[3], b[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = max(a[2] - a[0], 0) * max(a[3] - a[1], 0)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union, smaller = area_a + area_b - inter, np.minimum(area_a, area_b)
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    inside = np.where(smaller > 0, inter / np.maximum(smaller, 1e-12), 0.0)
    return (iou >= MERGE_IOU) | (other_window & (inside >= MERGE_INSIDE))


def merge_instances(raw: list[dict[str, Any]], image_size: tuple[int, int], n_classes: int,
                    breast_mask: np.ndarray | None = None) -> Detections:
    """Class-agnostic greedy grouping of ``raw`` instances (see the module docstring). The class
    scores are summed within each pass (window, flip) that saw the lesion, never across passes: the
    best pass gives the group's score and class scores, so overlapping windows and TTA do not add up."""
    h, w = image_size
    order = sorted(range(len(raw)), key=lambda i: -raw[i]["score"])
    boxes = np.array([raw[i]["box"] for i in order], dtype=np.float64).reshape(-1, 4)
    # the window of each instance, as an integer id ((y, x) in the image: a flipped pass shares it)
    window_ids = {}
    windows = np.array([window_ids.setdefault((raw[i].get("source") or (0, 0, False))[:2], len(window_ids))
                        for i in order], dtype=np.int64)
    taken = np.zeros(len(order), dtype=bool)
    groups: list[tuple[float, np.ndarray, CroppedMask]] = []
    for a in range(len(order)):
        if taken[a]:
            continue
        # every instance before ``a`` is taken (sorted by score): a group is ``a`` and the untaken overlapping it
        idx = np.union1d(np.flatnonzero(~taken & _same_lesion(boxes[a], boxes, windows != windows[a])), [a])
        taken[idx] = True
        members = [raw[order[m]] for m in idx]
        per_source: dict[Any, np.ndarray] = {}
        for r in members:
            c = r["label"] - 1
            if not 0 <= c < n_classes:
                raise ConfigError("model", f"detection of class {r['label']} from a model said to have {n_classes} class(es)")
            scores = per_source.setdefault(r.get("source"), np.zeros(n_classes))
            scores[c] = max(scores[c], r["score"])
        class_scores = max(per_source.values(), key=lambda v: v.sum())
        # the union of the members' masks, on the members' bounding region only (not a full-image canvas)
        y0 = max(min(r["top"] for r in members), 0)
        x0 = max(min(r["left"] for r in members), 0)
        y1 = min(max(r["top"] + r["mask"].shape[0] for r in members), h)
        x1 = min(max(r["left"] + r["mask"].shape[1] for r in members), w)
        if y1 <= y0 or x1 <= x0:
            continue
        region = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for r in members:
            mh, mw = r["mask"].shape
            ty0, tx0 = max(r["top"], y0), max(r["left"], x0)
            ty1, tx1 = min(r["top"] + mh, y1), min(r["left"] + mw, x1)
            if ty1 > ty0 and tx1 > tx0:
                region[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0] |= \
                    r["mask"][ty0 - r["top"]:ty1 - r["top"], tx0 - r["left"]:tx1 - r["left"]]
        if breast_mask is not None:
            region &= breast_mask[y0:y1, x0:x1] != 0
        if not region.any():
            continue
        rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
        mask = CroppedMask(region[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].copy(), x0 + int(cols[0]),
                           y0 + int(rows[0]), (h, w))
        groups.append((min(1.0, float(class_scores.sum())), class_scores, mask))
    groups.sort(key=lambda g: -g[0])
    return Detections(image_size=(h, w), scores=np.array([g[0] for g in groups], dtype=np.float64),
                      class_scores=np.array([g[1] for g in groups]).reshape(-1, n_classes),
                      masks=[g[2] for g in groups])


def infer(model: nn.Module, pixels: np.ndarray, breast_mask: np.ndarray | None, settings: InferenceSettings, *,
          batch_size: int | None = None, autocast: str = "auto", device: torch.device | None = None) -> Detections:
    """Merged instances of a preprocessed image (``settings``' windows and TTA). The model must be
    in eval mode (``Predictor`` and validation put it there): nothing is changed on it, so threads
    may share it."""
    from mammocad.tasks.tiling import use_bf16

    if pixels.ndim != 2 or not np.issubdtype(pixels.dtype, np.floating):
        raise InputError("image", f"expected a float HxW prepared image, got {pixels.dtype} {pixels.shape}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    bf16 = use_bf16(autocast, device)
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    if model.training:
        raise ConfigError(settings.name, "detection inference needs the model in eval mode (model.eval())")
    windows = _windows(pixels.shape, settings, int(getattr(model, "size_divisor", 32)), breast_mask)
    raw = _raw_instances(model, pixels, windows, False, int(batch_size or settings.batch_size), device, bf16)
    if "hflip" in settings.tta:
        flipped_windows = [(y, pixels.shape[1] - x - w, h, w) for y, x, h, w in windows]
        raw += _raw_instances(model, pixels, flipped_windows, True, int(batch_size or settings.batch_size), device, bf16)
    return merge_instances(raw, pixels.shape, len(settings.class_names) - 1, breast_mask)


def max_score(found: Detections, breast_mask: np.ndarray | None) -> float:
    return float(found.scores.max()) if len(found) else 0.0


def _components(found: Detections, threshold: float, min_area: int, names: tuple[str, ...]) -> list[LesionComponent]:
    out = []
    for score, cls, mask in zip(found.scores, found.class_scores, found.masks):
        if score < threshold or mask.area < max(int(min_area), 1):
            continue
        total = cls.sum()
        probs = cls / total if total > 0 else np.full(len(cls), 1.0 / len(cls))
        label = names[int(np.argmax(probs))]
        out.append(LesionComponent(mask=mask, box=mask.box, area=mask.area, score=float(score), label=label,
                                   class_probabilities={} if len(names) == 1 else
                                   {n: float(p) for n, p in zip(names, probs)}))
    return out  # Detections are sorted by score


def find_lesions(found: Detections, breast_mask: np.ndarray | None, settings: InferenceSettings,
                 channel_names: tuple[str, ...]) -> list[LesionComponent]:
    """The bundle's output: instances at its score threshold and minimum area, the max_lesions best."""
    comps = _components(found, settings.threshold, settings.min_area, channel_names)
    return comps if settings.max_lesions is None else comps[:settings.max_lesions]


def find_candidates(found: Detections, breast_mask: np.ndarray | None, settings: InferenceSettings,
                    channel_names: tuple[str, ...], threshold: float = DEFAULT_CANDIDATE_THRESHOLD,
                    max_candidates: int | None = DEFAULT_MAX_CANDIDATES) -> tuple[list[LesionComponent], dict[str, Any]]:
    """What a FROC curve is drawn from: every instance scoring >= ``threshold`` (the model's own
    ``box_score_thresh`` is the floor below which none exist), capped as segmentation caps its
    candidates (``segment_lesions.cap_candidates``)."""
    return cap_candidates(_components(found, threshold, settings.min_area, channel_names), threshold,
                          settings.min_area, max_candidates)


def predict_label_map(model: nn.Module, pixels: np.ndarray, breast_mask: np.ndarray | None, settings: InferenceSettings,
                      *, autocast: str = "fp32") -> tuple[np.ndarray, list[LesionComponent], list[LesionComponent]]:
    """(label map of the lesions, lesions, candidates) of a prepared image, as the bundle predicts it."""
    found = infer(model, pixels, breast_mask, settings, autocast=autocast)
    names = output_names(model, settings)
    lesions = find_lesions(found, breast_mask, settings, names)
    candidates, _ = find_candidates(found, breast_mask, settings, names)
    return lesion_label_map(lesions, pixels.shape, settings.class_names), lesions, candidates


# ---- data ----------------------------------------------------------------------------------------
@dataclass
class DetectionSample:
    """A prepared case for detection: the instance-coded sample, and what scoring needs."""

    sample: SegmentationSample  # target = instance codes
    gt: np.ndarray  # label map over the class names (build_target): what validation scores
    lesion_masks: list[np.ndarray | None]
    label: str


def instance_codes(masks: list[np.ndarray | None], classes: list[int], n_classes: int, shape: tuple[int, int],
                   source: str = "case") -> np.ndarray:
    """uint8 map: lesion k of class c painted ``1 + k*K + (c - 1)`` (0 = background)."""
    out = np.zeros(shape, dtype=np.uint8)
    k = 0
    for m, c in zip(masks, classes):
        if m is None or not m.any():
            continue
        code = 1 + k * n_classes + (c - 1)
        if code > MAX_CODE:
            raise InputError(source, f"more lesions than {MAX_CODE // n_classes} in one image")
        out[m] = code
        k += 1
    return out


def decode_instances(codes: torch.Tensor, n_classes: int) -> dict[str, torch.Tensor]:
    """torchvision targets of one (H, W) instance-code patch; no instance = a negative."""
    values = [int(v) for v in torch.unique(codes).tolist() if 0 < v < IGNORE_INDEX]
    masks, boxes, labels = [], [], []
    for v in values:
        m = codes == v
        if int(m.sum()) < MIN_INSTANCE_PIXELS:
            continue
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max()) + 1.0, float(ys.max()) + 1.0])
        labels.append((v - 1) % n_classes + 1)
        masks.append(m)
    h, w = codes.shape
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.stack(masks).to(torch.uint8) if masks else torch.zeros((0, h, w), dtype=torch.uint8)}


def load_split(cfg: Any, prepared: Any, split: str) -> list[DetectionSample]:
    """The split's cases as instance samples (see the module docstring for the unknown rule)."""
    from mammocad.datasets.rasterize import mask_to_box
    from mammocad.datasets.targets import PATHOLOGY_LABELS

    n_classes = model_outputs(cfg)
    with cfg.errors_in("data"):
        ids = split_case_ids(prepared, cfg.data.fold, split, cfg.data.splits)
    out, left_out = [], []
    for cid in ids:
        pc = prepared.by_id(cid)
        if pc.unlocated_lesions or (not pc.case.lesions and pc.label == "unknown"):
            left_out.append(cid)
            continue
        pathologies = [les.pathology for les in pc.case.lesions]
        if n_classes == 1:
            classes = [1] * len(pathologies)
        else:
            value = PATHOLOGY_LABELS[3]  # benign 1, malignant 2; an unknown lesion only when data.unknown names one
            named = {**value, "unknown": value.get(cfg.data.unknown or "")}
            if any(named.get(p) is None for p in pathologies):
                left_out.append(cid)
                continue
            classes = [int(named[p]) for p in pathologies]
        image = prepared.load_image(pc)
        masks = prepared.load_lesion_masks(pc)
        codes = instance_codes(masks, classes, n_classes, image.shape, cid)
        boxes = [tuple(int(v) for v in box) for m in masks if m is not None and (box := mask_to_box(m)) is not None]
        sample = SegmentationSample(image, codes, prepared.load_breast_mask(pc), cid, pc.patient_id, 2, boxes)
        gt = build_target(image.shape, prepared.load_union_mask(pc), masks, pathologies, cfg.data.label_classes,
                          cfg.data.unknown)
        out.append(DetectionSample(sample, gt, masks, pc.label))
    if left_out:
        import logging

        logging.getLogger("mammocad").warning("%s: %s split: left out %d case(s) whose lesions are not all outlined or "
                                              "have no class here (e.g. %s)", prepared.root, split, len(left_out), left_out[0])
    return out


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]], n_classes: int,
            ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """DataLoader collate (``functools.partial(collate, n_classes=K)``: picklable for worker processes)."""
    return [image for image, _ in batch], [decode_instances(codes, n_classes) for _, codes in batch]


# ---- validation ----------------------------------------------------------------------------------
def validate_images(model: nn.Module, samples: list[DetectionSample], class_names: list[str], inference: Any,
                    n_boot: int = 0) -> ValidationResult:
    from mammocad.evaluation.segmentation import EvalItem, evaluate_segmentation

    start = time.perf_counter()
    settings = InferenceSettings.from_config(inference, class_names)
    was_training = model.training
    model.eval()

    def items():
        for d in samples:
            s = d.sample
            pred, lesions, candidates = predict_label_map(model, s.image, s.breast, settings)
            yield EvalItem(case_id=s.case_id, patient_id=s.patient_id, gt=d.gt, pred=pred, image_label=d.label,
                           breast_mask=s.breast, lesion_masks=d.lesion_masks, components=candidates,
                           operating_components=lesions)

    try:
        with torch.no_grad():
            report = evaluate_segmentation(items(), class_names, n_boot=n_boot, keep_per_image=False, coco_ap=True)
    finally:
        model.train(was_training)
    det = report.detection
    sens = [p["sensitivity"] for p in det.operating_points] if det is not None else []
    # no scorable lesion: every sensitivity is None, and the score is undefined (NaN), not an error
    cpm = float(np.mean(sens)) if sens and all(v is not None and math.isfinite(v) for v in sens) else math.nan
    coco = (det.coco or {}) if det is not None else {}
    metrics = {"val_froc": cpm, "val_sens_1fp": det.sensitivity_at_1fp.value if det is not None else math.nan,
               "val_mask_ap": (coco.get("mask") or {}).get("AP"), "val_dice": report.headline["dice_lesion_images_mean"].value}
    return ValidationResult(score=cpm, metrics=metrics, report=report, seconds=time.perf_counter() - start)


# ---- one training run ----------------------------------------------------------------------------
class DetectTraining:
    """The detection side of one training run (``tasks.TaskTraining``)."""

    score_name = "FROC"
    log_metrics = ("val_froc", "val_sens_1fp", "val_mask_ap", "val_dice")

    def __init__(self, cfg: Any, prepared: Any, run: RunContext, loss_fn: nn.Module | None = None):
        self.cfg, self.prepared, self.run = cfg, prepared, run
        if cfg.inference.mode not in MODES:
            raise ConfigError(cfg.source, f"inference.mode: {cfg.inference.mode!r} is not one of {', '.join(MODES)}")
        self.n_classes = model_outputs(cfg)
        train = load_split(cfg, prepared, "train")
        if cfg.sampling.mode != "fractions" or cfg.sampling.kind != "balanced":
            raise ConfigError(cfg.source, "sampling: detection trains on balanced patches (kind: balanced, "
                                          "mode: fractions): lesion-centred, tissue and background patches")
        self.train_dataset = build_train_dataset(cfg, [d.sample for d in train])
        self.collate = functools.partial(collate, n_classes=self.n_classes)
        self.val_samples: list[DetectionSample] = []

    def prepare_validation(self, patch_loader: bool) -> None:
        if patch_loader:
            raise ConfigError(self.cfg.source, "train.val_mode: detection validates whole images (val_mode: image)")
        if self.run.is_main:
            self.val_samples = load_split(self.cfg, self.prepared, "val")
            if self.cfg.train.val_every > 0 and not any(d.lesion_masks for d in self.val_samples):
                raise ConfigError(self.cfg.source, f"data: fold {self.cfg.data.fold} has no validation image with a "
                                                   "lesion; re-split or set train.val_every: 0")

    def check_model(self, model: nn.Module) -> None:
        if getattr(model, "task", None) != NAME:
            raise ConfigError(self.cfg.source, f"model.name: {model.mammocad_config['name']} is not a detection model")
        d = int(getattr(model, "size_divisor", 32))
        if self.cfg.sampling.patch % d:
            raise ConfigError(self.cfg.source, f"sampling.patch: {self.cfg.sampling.patch} is not a multiple of {d}")
        if self.cfg.inference.mode == "sliding" and self.cfg.inference.tile % d:
            raise ConfigError(self.cfg.source, f"inference.tile: {self.cfg.inference.tile} is not a multiple of {d}")

    def train_step(self, net: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, targets = batch
        device = self.run.device
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with autocast_context(device, self.run.amp_dtype):
            losses = net(images, targets)
        losses = {k: v.float() for k, v in losses.items()}
        return {"loss": sum(losses.values()), **{k: v.detach() for k, v in losses.items()}}

    def batch_items(self, batch: Any) -> int:
        return len(batch[0])

    def validate(self, model: nn.Module) -> ValidationResult:
        if not self.run.is_main:
            return ValidationResult(score=math.nan)
        return validate_images(model, self.val_samples, self.cfg.data.class_names, self.cfg.inference)

    def final_validation(self, model: nn.Module, out_dir: Path, n_boot: int) -> tuple[Any, str | None]:
        from mammocad.evaluation.report import write_report

        if not self.val_samples:
            return None, None
        val = validate_images(model, self.val_samples, self.cfg.data.class_names, self.cfg.inference, n_boot=n_boot)
        write_report(val.report, out_dir)
        return val.report, (f"validation mean sensitivity at 1/8..8 FP/image {val.score:.4f} on "
                            f"{val.report.n_images} images of {val.report.n_patients} patients")


def training(cfg: Any, prepared: Any, run: RunContext, loss_fn: nn.Module | None = None) -> DetectTraining:
    return DetectTraining(cfg, prepared, run, loss_fn)
