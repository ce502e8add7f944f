"""Segmentation metrics: per-image Dice/IoU of the lesion classes, dataset-level confusion-matrix
metrics (IoU per class, mean IoU, pixel accuracy, mean per-class accuracy), false-positive area on
images without lesions, patient-resampled bootstrap CIs, and (when components are given) lesion
detection from the segmentation.

Entry point: ``evaluate_segmentation(items, class_names) -> SegmentationReport``; write it with
``mammocad.evaluation.report.write_report``. Items are consumed one at a time and only small
per-image numbers are kept, so a generator that loads images lazily keeps memory flat.

The confusion matrix is a plain ``np.bincount`` (torchmetrics is not a dependency and gives no
per-image empty-mask rules); per-image Dice/IoU follow the definitions in ``segmentation_rules``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from mammocad.datasets.targets import IGNORE_INDEX
from mammocad.errors import InputError
from mammocad.evaluation.bootstrap import (DEFAULT_CONFIDENCE, DEFAULT_N_BOOT, DEFAULT_SEED, SINGLE_GROUP_NOTE,
                                           MetricValue, bootstrap_ci, group_index, grouped_mean_ci, per_group_sum, ratio)
from mammocad.evaluation.coco_ap import CocoAccumulator
from mammocad.evaluation.lesion_detection import (DEFAULT_FP_RATES, DetectionImage, DetectionReport, HitRule,
                                                  MatchedImage, evaluate_matched, match_image)
from mammocad.io.jsonutil import finite_or_none
from mammocad.records import LesionComponent


LESION_IMAGE, BOTH_EMPTY, FALSE_POSITIVE_IMAGE = "lesion", "both_empty", "false_positive"


def segmentation_rules(class_names: Sequence[str], ignore_index: int = IGNORE_INDEX) -> list[str]:
    lesion = " + ".join(class_names[1:])
    return [
        f"Lesion foreground = every class except '{class_names[0]}' ({lesion}); per-image Dice = 2|P∩G| / (|P| + |G|), "
        "IoU = |P∩G| / |P∪G|, with P, G the predicted and ground-truth foreground pixels.",
        "Headline Dice/IoU: mean and max over LESION images (G non-empty).",
        "Both empty (G and P empty): counted separately ('both empty: n'), not averaged into any Dice/IoU.",
        "G empty, P non-empty (a prediction on an image without lesion): reported as false-positive area "
        "(pixels, fraction of the image, fraction of the breast when a breast mask is given = |P| / |breast|) "
        "and count of such images; not in the headline Dice, scores 0 in the all-images Dice/IoU.",
        "All-images Dice/IoU: lesion images plus false-positive images (scoring 0); both-empty images left out.",
        f"Ignored pixels (ground truth == {ignore_index} or inside the ignore mask) are left out of every count.",
        "Confusion-matrix metrics are dataset-level (pixels of all images summed, background included): "
        "IoU per class = TP / (TP + FP + FN); mean IoU = mean over classes with a non-empty union; "
        "pixel accuracy = correct / all pixels; mean per-class accuracy = mean over classes present in the "
        "ground truth of the per-class recall.",
        "Per-class Dice (more than one lesion class): per image, over images where that class is present in G.",
        "95% CIs: percentile bootstrap resampling PATIENTS with replacement (all images of a drawn patient go "
        "in together), seeded; max over images is descriptive and has no CI.",
    ]


@dataclass
class EvalItem:
    """One image to score. ``gt``/``pred`` are HxW integer label maps (0 = background; binary:
    1 = lesion; 3-class: 1 benign, 2 malignant); ``gt == ignore_index`` or ``ignore`` (bool)
    marks pixels left out. ``lesion_masks`` (full-size bool per lesion, None = no geometry) and
    ``components`` (predicted, scored: the candidates the FROC curve is drawn from) enable detection
    scoring; give both for every item or none. ``operating_components`` (the model's own output) adds
    its operating point; ``lost_lesions`` (lesion index -> reason) are lesions preprocessing lost,
    never scored."""

    case_id: str
    patient_id: str
    gt: np.ndarray
    pred: np.ndarray
    image_label: str = "unknown"  # normal | benign | malignant | unknown
    ignore: np.ndarray | None = None
    breast_mask: np.ndarray | None = None
    lesion_masks: list[np.ndarray | None] | None = None
    components: list[LesionComponent] | None = None
    operating_components: list[LesionComponent] | None = None
    lost_lesions: dict[int, str] | None = None
    # what COCO AP ranks (default: ``components``). A segmentation model's candidates are blobs of
    # lesion probability >= 0.05, wider than any lesion, so its COCO AP is taken over its own output
    # components (scored); a detector's candidates are its instances.
    coco_components: list[LesionComponent] | None = None


@dataclass
class ImageResult:
    case_id: str
    patient_id: str
    image_label: str
    category: str  # lesion | both_empty | false_positive
    gt_pixels: int
    pred_pixels: int
    intersection: int
    valid_pixels: int
    breast_pixels: int | None
    ignored_pixels: int
    dice: float  # NaN unless a lesion image
    iou: float
    class_dice: dict[str, float]  # lesion classes present in G (more than one lesion class only)
    confusion: np.ndarray  # C x C, rows = ground truth, columns = prediction

    def to_dict(self) -> dict:
        fp = self.category == FALSE_POSITIVE_IMAGE
        return {"case_id": self.case_id, "patient_id": self.patient_id, "image_label": self.image_label,
                "category": self.category, "gt_pixels": self.gt_pixels, "pred_pixels": self.pred_pixels,
                "intersection": self.intersection, "dice": finite_or_none(self.dice), "iou": finite_or_none(self.iou),
                "class_dice": {k: finite_or_none(v) for k, v in self.class_dice.items()},
                "fp_fraction_of_image": self.pred_pixels / self.valid_pixels if fp and self.valid_pixels else None,
                "fp_fraction_of_breast": (self.pred_pixels / self.breast_pixels
                                          if fp and self.breast_pixels else None)}


def _label_map(a: np.ndarray, what: str, case_id: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise InputError(case_id, f"{what} must be a 2-D label map, got shape {a.shape}")
    if a.dtype == bool:
        return a.view(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise InputError(case_id, f"{what} must hold integer class labels, got dtype {a.dtype}")
    return a


def score_image(item: EvalItem, class_names: Sequence[str], ignore_index: int = IGNORE_INDEX) -> ImageResult:
    """Per-image counts, Dice/IoU and confusion matrix of one item."""
    n_cls = len(class_names)
    gt, pred = _label_map(item.gt, "ground truth", item.case_id), _label_map(item.pred, "prediction", item.case_id)
    if gt.shape != pred.shape:
        raise InputError(item.case_id, f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    valid = gt != ignore_index
    if item.ignore is not None:
        ign = np.asarray(item.ignore, dtype=bool)
        if ign.shape != gt.shape:
            raise InputError(item.case_id, f"ignore mask shape {ign.shape} differs from ground truth shape {gt.shape}")
        valid &= ~ign
    n_valid = int(np.count_nonzero(valid))
    g, p = (gt.ravel(), pred.ravel()) if n_valid == valid.size else (gt[valid], pred[valid])
    if g.size and (g.min() < 0 or g.max() >= n_cls):
        raise InputError(item.case_id, f"ground truth holds label {int(g.max() if g.max() >= n_cls else g.min())}, "
                                       f"outside 0..{n_cls - 1} and not the ignore value {ignore_index}")
    if pred.size and (pred.min() < 0 or pred.max() >= n_cls):
        raise InputError(item.case_id, f"prediction holds labels outside 0..{n_cls - 1}")
    confusion = np.bincount(g.astype(np.intp) * n_cls + p, minlength=n_cls * n_cls).reshape(n_cls, n_cls)
    # foreground = all lesion classes merged: its counts are blocks of the confusion matrix
    n_g, n_p, inter = int(confusion[1:].sum()), int(confusion[:, 1:].sum()), int(confusion[1:, 1:].sum())
    if n_g:
        category = LESION_IMAGE
        dice, iou = 2 * inter / (n_g + n_p), inter / (n_g + n_p - inter)
    else:
        category = FALSE_POSITIVE_IMAGE if n_p else BOTH_EMPTY
        dice = iou = float("nan")
    class_dice = {}
    if n_cls > 2:
        for c in range(1, n_cls):
            gc, pc = int(confusion[c].sum()), int(confusion[:, c].sum())
            if gc:
                class_dice[class_names[c]] = 2 * int(confusion[c, c]) / (gc + pc)
    breast = None
    if item.breast_mask is not None:
        bm = np.asarray(item.breast_mask, dtype=bool)
        if bm.shape != gt.shape:
            raise InputError(item.case_id, f"breast mask shape {bm.shape} differs from ground truth shape {gt.shape}")
        breast = int((bm & valid).sum())
    return ImageResult(item.case_id, str(item.patient_id), item.image_label, category, n_g, n_p, inter,
                       n_valid, breast, valid.size - n_valid, dice, iou, class_dice, confusion)


def confusion_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """IoU per class, mean IoU, pixel accuracy, per-class and mean accuracy of confusion matrices
    (..., C, C), rows = ground truth; classes with an empty denominator are NaN and left out of means."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    gt_sum, pred_sum = cm.sum(axis=-1), cm.sum(axis=-2)
    iou = ratio(tp, gt_sum + pred_sum - tp)
    acc = ratio(tp, gt_sum)
    return {"iou": iou, "mean_iou": _nanmean_last(iou), "pixel_accuracy": ratio(tp.sum(axis=-1), cm.sum(axis=(-2, -1))),
            "class_accuracy": acc, "mean_class_accuracy": _nanmean_last(acc)}


def _nanmean_last(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    return ratio(np.where(ok, x, 0.0).sum(axis=-1), ok.sum(axis=-1))


@dataclass
class SegmentationReport:
    class_names: list[str]
    n_images: int
    n_patients: int
    counts: dict[str, int]
    headline: dict[str, MetricValue]
    per_class: list[dict]
    class_dice: dict[str, dict[str, MetricValue]]
    confusion_matrix: list[list[int]]
    false_positive_area: dict
    by_image_label: dict[str, dict]
    bootstrap: dict
    rules: list[str]
    notes: list[str] = field(default_factory=list)
    per_image: list[dict] = field(default_factory=list)
    detection: DetectionReport | None = None
    ground_truth: dict = field(default_factory=dict)  # how the caller built it (rules, cases left out)

    def to_dict(self) -> dict:
        return {"class_names": self.class_names, "n_images": self.n_images, "n_patients": self.n_patients,
                "ground_truth": self.ground_truth,
                "counts": self.counts, "headline": {k: v.to_dict() for k, v in self.headline.items()},
                "per_class": self.per_class,
                "class_dice": {c: {k: v.to_dict() for k, v in d.items()} for c, d in self.class_dice.items()},
                "confusion_matrix": self.confusion_matrix, "false_positive_area": self.false_positive_area,
                "by_image_label": self.by_image_label, "bootstrap": self.bootstrap, "rules": self.rules,
                "notes": self.notes, "detection": None if self.detection is None else self.detection.to_dict(),
                "per_image": self.per_image}


def _mean_max(values: np.ndarray, groups: list[str], boot: dict) -> tuple[MetricValue, MetricValue]:
    ok = np.isfinite(values)
    n = int(ok.sum())
    if n == 0:
        return MetricValue(float("nan"), None, 0), MetricValue(float("nan"), None, 0)
    ci = grouped_mean_ci(values, groups, **boot)
    return MetricValue(float(values[ok].mean()), ci, n), MetricValue(float(values[ok].max()), None, n)


def evaluate_segmentation(items: Iterable[EvalItem], class_names: Sequence[str], *, ignore_index: int = IGNORE_INDEX,
                          n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
                          confidence: float = DEFAULT_CONFIDENCE, fp_rates: Sequence[float] = DEFAULT_FP_RATES,
                          hit: HitRule | str | None = None, keep_per_image: bool = True, coco_ap: bool = False,
                          components_scored: dict | None = None, operating_settings: dict | None = None,
                          ) -> SegmentationReport:
    """Score every item; see ``segmentation_rules`` for the definitions (they go into the report).
    ``components_scored`` / ``operating_settings`` describe the detection components (see
    ``evaluate_matched``)."""
    class_names = [str(c) for c in class_names]
    hit = HitRule.parse(hit)
    coco = CocoAccumulator() if coco_ap else None  # COCO AP of the same components, class-agnostic
    coco_ranked: set[str] = set()
    if len(class_names) < 2:
        raise InputError(None, f"need a background class and at least one lesion class, got {class_names}")
    results: list[ImageResult] = []
    matched: list[MatchedImage] = []
    with_detection = None
    for item in items:
        results.append(score_image(item, class_names, ignore_index))
        has_det = item.lesion_masks is not None and item.components is not None
        if with_detection is None:
            with_detection = has_det
        elif has_det != with_detection:
            raise InputError(item.case_id, "lesion masks and components must be given for every image or for none")
        if has_det:
            matched.append(match_image(DetectionImage(item.case_id, str(item.patient_id), item.gt.shape[:2],
                                                      item.lesion_masks, item.components, item.operating_components,
                                                      dict(item.lost_lesions or {})), hit))
            if coco is not None:
                coco_ranked.add("the model's output components" if item.coco_components is not None else "the candidates")
                lost = dict(item.lost_lesions or {})
                coco.add(item.gt.shape[:2], [None if k in lost else m for k, m in enumerate(item.lesion_masks)],
                         item.components if item.coco_components is None else item.coco_components)
    if not results:
        raise InputError(None, "no images to evaluate")
    boot = {"n_boot": n_boot, "seed": seed, "confidence": confidence}
    pids = [r.patient_id for r in results]
    groups, gindex = group_index(pids)
    cat = np.array([r.category for r in results])
    dice = np.array([r.dice for r in results])
    iou = np.array([r.iou for r in results])
    fp_img = cat == FALSE_POSITIVE_IMAGE
    dice_all, iou_all = np.where(fp_img, 0.0, dice), np.where(fp_img, 0.0, iou)

    headline: dict[str, MetricValue] = {}
    headline["dice_lesion_images_mean"], headline["dice_lesion_images_max"] = _mean_max(dice, pids, boot)
    headline["iou_lesion_images_mean"], headline["iou_lesion_images_max"] = _mean_max(iou, pids, boot)
    headline["dice_all_images_mean"], headline["dice_all_images_max"] = _mean_max(dice_all, pids, boot)
    headline["iou_all_images_mean"], headline["iou_all_images_max"] = _mean_max(iou_all, pids, boot)

    cms = np.stack([r.confusion for r in results])
    total = cms.sum(axis=0)
    cm_metrics = confusion_metrics(total)
    cm_by_patient = per_group_sum(cms, gindex, len(groups))
    n_pix = int(total.sum())
    for key in ("mean_iou", "pixel_accuracy", "mean_class_accuracy"):
        ci = bootstrap_ci(lambda w, key=key: confusion_metrics(np.tensordot(w, cm_by_patient, axes=1))[key],
                          len(groups), **boot) if n_pix else None
        headline[key] = MetricValue(float(cm_metrics[key]), ci, n_pix)
    per_class = [{"class": name, "iou": finite_or_none(cm_metrics["iou"][c]), "accuracy": finite_or_none(cm_metrics["class_accuracy"][c]),
                  "gt_pixels": int(total[c].sum()), "pred_pixels": int(total[:, c].sum())}
                 for c, name in enumerate(class_names)]

    class_dice = {}
    if len(class_names) > 2:
        for name in class_names[1:]:
            vals = np.array([r.class_dice.get(name, np.nan) for r in results])
            mean, mx = _mean_max(vals, pids, boot)
            class_dice[name] = {"mean": mean, "max": mx}

    empty_gt = cat != LESION_IMAGE
    fp_res = [r for r in results if r.category == FALSE_POSITIVE_IMAGE]
    frac_img = [r.pred_pixels / r.valid_pixels for r in fp_res if r.valid_pixels]
    frac_breast = [r.pred_pixels / r.breast_pixels for r in fp_res if r.breast_pixels]
    n_empty = int(empty_gt.sum())
    fp_area = {
        "n_images_without_lesion": n_empty, "n_false_positive_images": len(fp_res),
        "false_positive_image_rate": len(fp_res) / n_empty if n_empty else None,
        "total_fp_pixels": int(sum(r.pred_pixels for r in fp_res)),
        "mean_fp_pixels_per_image_without_lesion": (sum(r.pred_pixels for r in fp_res) / n_empty) if n_empty else None,
        "mean_fp_fraction_of_image": float(np.mean(frac_img)) if frac_img else None,
        "max_fp_fraction_of_image": float(np.max(frac_img)) if frac_img else None,
        "mean_fp_fraction_of_breast": float(np.mean(frac_breast)) if frac_breast else None,
    }

    by_label = {}
    for label in sorted({r.image_label for r in results}):
        sel = [r for r in results if r.image_label == label]
        les = [r for r in sel if r.category == LESION_IMAGE]
        by_label[label] = {"n_images": len(sel), "n_lesion_images": len(les),
                           "n_false_positive_images": sum(r.category == FALSE_POSITIVE_IMAGE for r in sel),
                           "dice_mean": float(np.mean([r.dice for r in les])) if les else None,
                           "iou_mean": float(np.mean([r.iou for r in les])) if les else None}

    notes = []
    if len(groups) == 1 and n_boot > 0:
        notes.append(SINGLE_GROUP_NOTE)
    odd = sum(1 for r in results if r.image_label in ("benign", "malignant") and r.category != LESION_IMAGE)
    if odd:
        notes.append(f"{odd} image(s) labelled benign/malignant have an empty ground-truth mask; they are scored as "
                     "images without lesion")
    odd = sum(1 for r in results if r.image_label == "normal" and r.category == LESION_IMAGE)
    if odd:
        notes.append(f"{odd} image(s) labelled normal have a non-empty ground-truth mask; they are scored as lesion images")

    detection = None
    if with_detection:
        detection = evaluate_matched(matched, fp_rates=fp_rates, hit=hit, **boot,
                                     components_scored=components_scored, operating_settings=operating_settings)
        if coco is not None:
            detection.coco = {**coco.result(), "ranked": " and ".join(sorted(coco_ranked))}
    return SegmentationReport(
        class_names=class_names, n_images=len(results), n_patients=len(groups),
        counts={"lesion_images": int((cat == LESION_IMAGE).sum()), "both_empty": int((cat == BOTH_EMPTY).sum()),
                "false_positive_images": int(fp_img.sum()), "ignored_pixels": int(sum(r.ignored_pixels for r in results)),
                "scored_pixels": n_pix},
        headline=headline, per_class=per_class, class_dice=class_dice, confusion_matrix=total.astype(int).tolist(),
        false_positive_area=fp_area, by_image_label=by_label,
        bootstrap={"unit": "patient", "n_boot": n_boot, "seed": seed, "confidence": confidence,
                   "n_patients": len(groups), "method": "percentile"},
        rules=segmentation_rules(class_names, ignore_index), notes=notes,
        per_image=[r.to_dict() for r in results] if keep_per_image else [], detection=detection)
