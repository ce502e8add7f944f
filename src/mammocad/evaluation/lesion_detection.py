"""Lesion detection read off a segmentation: hits, sensitivity at k false positives per image, FROC.

The MIAS papers score a segmentation as a detector: the predicted foreground is split into
connected components, each with a score, and a lesion (a circle for MIAS) is found when a
component "hits" it. Rules used here (also written into every report):

* hit: IoU(component, lesion) >= 0.1, OR the component's centroid lies inside the lesion;
* a lesion is detected at threshold t when any component with score >= t hits it;
* a false positive at t is a component with score >= t that hits no lesion (a component hitting a
  lesion that another component also hits is neither a second true positive nor a false positive);
* FP per image divides by ALL images, normal images included;
* sensitivity at k FP/image is the highest sensitivity over thresholds whose FP/image <= k;
* lesions without geometry cannot be scored: they are counted and reported, not in the denominator.

pycocotools/torchmetrics compute COCO AP with one-to-one matching, not this hit rule or FROC, so
the matching is hand-written; it works on component crops so memory stays per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from mammocad.errors import InputError
from mammocad.evaluation.bootstrap import (DEFAULT_CONFIDENCE, DEFAULT_N_BOOT, DEFAULT_SEED, SINGLE_GROUP_NOTE,
                                           MetricValue, bootstrap_ci, group_index, ratio)

DEFAULT_IOU_THRESHOLD = 0.1
DEFAULT_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def detection_rules(iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> list[str]:
    return [
        f"Hit: a predicted connected component hits a lesion if IoU(component, lesion) >= {iou_threshold:g}, "
        "or if the component's centroid (centre of mass of its pixels) lies inside the lesion.",
        "A lesion is detected at threshold t if any component with score >= t hits it.",
        "False positive at t: a component with score >= t that hits no lesion; a second component on an "
        "already-hit lesion counts as neither a true nor a false positive.",
        "FP per image = false positives / number of ALL images (normal images included).",
        "Sensitivity at k FP/image = the highest sensitivity over score thresholds whose FP/image <= k "
        "(no interpolation; 0 if no threshold qualifies).",
        "Lesions without geometry cannot be scored: they are counted separately and left out of the "
        "sensitivity denominator.",
        "95% CI of sensitivity at 1 FP/image: percentile bootstrap resampling patients.",
    ]


class Component(NamedTuple):
    """One predicted connected component. ``mask`` is cropped to ``box`` (shape y1-y0, x1-x0) so a
    film with many components does not hold many full-size masks."""

    mask: np.ndarray  # bool
    score: float
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixel-edge coordinates, exclusive end

    @classmethod
    def from_mask(cls, mask: np.ndarray, score: float) -> "Component":
        """Component from a full-size boolean mask (cropped to its bounding box)."""
        from mammocad.datasets.rasterize import mask_to_box

        mask = np.asarray(mask, dtype=bool)
        box = mask_to_box(mask)
        if box is None:
            raise ValueError("empty component mask")
        x0, y0, x1, y1 = (int(v) for v in box)
        return cls(mask[y0:y1, x0:x1], float(score), (x0, y0, x1, y1))


def components_from_probability(prob_map: np.ndarray, threshold: float = 0.5, min_area: int = 1, *,
                                score: str = "max", connectivity: int = 8) -> list[Component]:
    """Connected components of ``prob_map >= threshold`` with at least ``min_area`` pixels, each
    scored by the max (or mean) probability inside it, highest score first."""
    import cv2

    prob = np.asarray(prob_map, dtype=np.float32)
    if prob.ndim != 2:
        raise ValueError(f"probability map must be 2-D, got shape {prob.shape}")
    if score not in ("max", "mean"):
        raise ValueError(f"score must be 'max' or 'mean', got {score!r}")
    n, labels, stats, _ = cv2.connectedComponentsWithStats((prob >= threshold).astype(np.uint8), connectivity=connectivity)
    out = []
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] < min_area:
            continue
        # scored on the component's crop: scipy.ndimage.maximum(labels=...) sorts the whole image
        # (about 0.3 s per 1024x1024 film), the crops cost only their own area
        x, y, w, h = (int(v) for v in stats[i, :4])
        mask = labels[y:y + h, x:x + w] == i
        values = prob[y:y + h, x:x + w][mask]
        out.append(Component(mask, float(values.max() if score == "max" else values.mean()), (x, y, x + w, y + h)))
    out.sort(key=lambda c: -c.score)
    return out


def lesion_masks(lesions: Iterable, shape: tuple[int, int]) -> list[np.ndarray | None]:
    """Ground-truth mask per ``records.Lesion`` on an image of ``shape`` (None: no geometry)."""
    from mammocad.datasets.rasterize import rasterize_lesion

    return [rasterize_lesion(les, shape) for les in lesions]


@dataclass
class DetectionImage:
    """One image's ground-truth lesions (full-size boolean masks; None = lesion without geometry)
    and predicted components."""

    case_id: str
    patient_id: str
    shape: tuple[int, int]
    lesion_masks: list[np.ndarray | None]
    components: list[Component]


@dataclass
class MatchedImage:
    """What detection needs of one image once matched: small, so a whole dataset fits in memory."""

    case_id: str
    patient_id: str
    lesion_scores: np.ndarray  # per scorable lesion: highest score of a hitting component (-inf: never hit)
    fp_scores: np.ndarray  # scores of components hitting no lesion
    n_without_geometry: int = 0
    n_components: int = 0


def _check_component(c: Component, shape: tuple[int, int], source: str) -> None:
    x0, y0, x1, y1 = c.box
    if not (0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]):
        raise InputError(source, f"component box {c.box} lies outside the {shape[1]}x{shape[0]} image")
    if np.shape(c.mask) != (y1 - y0, x1 - x0):
        raise InputError(source, f"component mask shape {np.shape(c.mask)} does not match its box {c.box}")
    if not np.isfinite(c.score):
        raise InputError(source, f"component score is {c.score}")


def component_hits(component: Component, lesion: np.ndarray, iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> bool:
    """The hit rule: IoU >= threshold, or the centroid's pixel is inside the lesion."""
    x0, y0, x1, y1 = component.box
    cmask = np.asarray(component.mask, dtype=bool)
    rr, cc = np.nonzero(cmask)
    if rr.size == 0:
        return False
    # Centroid in pixel-edge coordinates is (mean index + 0.5); the pixel containing it is floor().
    pr, pc = int(np.floor(rr.mean() + 0.5)) + y0, int(np.floor(cc.mean() + 0.5)) + x0
    if lesion[pr, pc]:
        return True
    inter = int(np.count_nonzero(lesion[y0:y1, x0:x1] & cmask))
    union = rr.size + int(np.count_nonzero(lesion)) - inter
    return union > 0 and inter / union >= iou_threshold


def match_image(image: DetectionImage, iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> MatchedImage:
    shape = tuple(int(v) for v in image.shape)
    lesions = []
    n_without = 0
    for k, m in enumerate(image.lesion_masks):
        if m is None:
            n_without += 1
            continue
        m = np.asarray(m, dtype=bool)
        if m.shape != shape:
            raise InputError(image.case_id, f"lesion {k} mask shape {m.shape} differs from the image shape {shape}")
        lesions.append(m)
    lesion_scores = np.full(len(lesions), -np.inf)
    fp = []
    for c in image.components:
        _check_component(c, shape, image.case_id)
        hit_any = False
        for j, m in enumerate(lesions):
            if component_hits(c, m, iou_threshold):
                hit_any = True
                lesion_scores[j] = max(lesion_scores[j], c.score)
        if not hit_any:
            fp.append(c.score)
    return MatchedImage(image.case_id, str(image.patient_id), lesion_scores, np.asarray(fp, dtype=np.float64),
                        n_without, len(image.components))


@dataclass(frozen=True)
class FrocPoint:
    threshold: float
    fp_per_image: float
    sensitivity: float
    n_detected: int
    n_false_positives: int

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "fp_per_image": self.fp_per_image, "sensitivity": self.sensitivity,
                "n_detected": self.n_detected, "n_false_positives": self.n_false_positives}


def _count_at_least(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="left")


def froc_curve(matched: Sequence[MatchedImage]) -> list[FrocPoint]:
    """One point per distinct score, threshold descending (FP/image and sensitivity non-decreasing)."""
    ls = np.sort(np.concatenate([m.lesion_scores for m in matched] + [np.empty(0)]))
    fs = np.sort(np.concatenate([m.fp_scores for m in matched] + [np.empty(0)]))
    thresholds = np.unique(np.concatenate([ls[np.isfinite(ls)], fs]))[::-1]
    n_det, n_fp = _count_at_least(ls, thresholds), _count_at_least(fs, thresholds)
    n_img = len(matched)
    sens = ratio(n_det, np.full(n_det.shape, ls.size))
    return [FrocPoint(float(t), float(f) / n_img, float(s), int(d), int(f))
            for t, d, f, s in zip(thresholds, n_det, n_fp, sens)]


def sensitivity_at(curve: Sequence[FrocPoint], fp_per_image: float) -> tuple[float, float | None]:
    """(sensitivity, threshold): the best sensitivity with FP/image <= k and the highest threshold
    reaching it; (0, None) when no threshold qualifies."""
    best, thr = 0.0, None
    for p in curve:
        if p.fp_per_image <= fp_per_image and p.sensitivity > best:
            best, thr = p.sensitivity, p.threshold
    return best, thr


def _sensitivity_at_k_statistic(matched: Sequence[MatchedImage], k: float):
    """Vectorised statistic for the grouped bootstrap: per-patient detected/FP counts at every
    distinct lesion score (the best threshold for 'sensitivity at k' is always one of them: lowering
    t between two lesion scores only adds false positives)."""
    groups, index = group_index([m.patient_id for m in matched])
    all_ls = np.concatenate([m.lesion_scores for m in matched] + [np.empty(0)])
    thresholds = np.unique(all_ls[np.isfinite(all_ls)])[::-1]
    det = np.zeros((len(groups), thresholds.size))
    fps = np.zeros((len(groups), thresholds.size))
    n_les = np.zeros(len(groups))
    n_img = np.zeros(len(groups))
    for m, g in zip(matched, index):
        det[g] += _count_at_least(np.sort(m.lesion_scores), thresholds)
        fps[g] += _count_at_least(np.sort(m.fp_scores), thresholds)
        n_les[g] += m.lesion_scores.size
        n_img[g] += 1

    def statistic(w: np.ndarray) -> np.ndarray:
        sens = ratio(w @ det, (w @ n_les)[:, None])
        fp_rate = (w @ fps) / (w @ n_img)[:, None]
        best = np.where(fp_rate <= k, sens, 0.0).max(axis=1, initial=0.0)
        return np.where(w @ n_les > 0, best, np.nan)

    return statistic, len(groups)


@dataclass
class DetectionReport:
    n_images: int
    n_patients: int
    n_lesions: int  # scorable (with geometry)
    n_lesions_without_geometry: int
    n_components: int
    iou_threshold: float
    sensitivity_at_1fp: MetricValue
    threshold_at_1fp: float | None
    operating_points: list[dict]  # {"fp_per_image": k, "sensitivity": s, "threshold": t}
    froc: list[FrocPoint]
    rules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"n_images": self.n_images, "n_patients": self.n_patients, "n_lesions": self.n_lesions,
                "n_lesions_without_geometry": self.n_lesions_without_geometry, "n_components": self.n_components,
                "iou_threshold": self.iou_threshold, "sensitivity_at_1fp": self.sensitivity_at_1fp.to_dict(),
                "threshold_at_1fp": self.threshold_at_1fp, "operating_points": self.operating_points,
                "froc": [p.to_dict() for p in self.froc], "rules": self.rules, "notes": self.notes}


def evaluate_matched(matched: Sequence[MatchedImage], *, fp_rates: Sequence[float] = DEFAULT_FP_RATES,
                     iou_threshold: float = DEFAULT_IOU_THRESHOLD, n_boot: int = DEFAULT_N_BOOT,
                     seed: int = DEFAULT_SEED, confidence: float = DEFAULT_CONFIDENCE) -> DetectionReport:
    matched = list(matched)
    if not matched:
        raise InputError(None, "no images to evaluate for lesion detection")
    curve = froc_curve(matched)
    n_lesions = sum(m.lesion_scores.size for m in matched)
    n_without = sum(m.n_without_geometry for m in matched)
    points = []
    for k in sorted(set(float(r) for r in fp_rates) | {1.0}):
        s, t = sensitivity_at(curve, k)
        points.append({"fp_per_image": k, "sensitivity": s if n_lesions else None, "threshold": t})
    sens1, thr1 = sensitivity_at(curve, 1.0)
    statistic, n_groups = _sensitivity_at_k_statistic(matched, 1.0)
    ci = bootstrap_ci(statistic, n_groups, n_boot=n_boot, seed=seed, confidence=confidence) if n_lesions else None
    notes = []
    if n_lesions == 0:
        notes.append("no scorable lesion: sensitivity is undefined")
    if n_without:
        notes.append(f"{n_without} lesion(s) have no geometry and cannot be scored; they are not in the denominator")
    if n_groups == 1:
        notes.append(SINGLE_GROUP_NOTE)
    return DetectionReport(
        n_images=len(matched), n_patients=n_groups, n_lesions=n_lesions, n_lesions_without_geometry=n_without,
        n_components=sum(m.n_components for m in matched), iou_threshold=iou_threshold,
        sensitivity_at_1fp=MetricValue(sens1 if n_lesions else float("nan"), ci, n_lesions), threshold_at_1fp=thr1,
        operating_points=points, froc=curve, rules=detection_rules(iou_threshold), notes=notes)


def evaluate_lesion_detection(images: Iterable[DetectionImage], **kwargs) -> DetectionReport:
    """Match every image's components to its lesions, then FROC + sensitivity at k FP/image."""
    iou = kwargs.get("iou_threshold", DEFAULT_IOU_THRESHOLD)
    return evaluate_matched([match_image(im, iou) for im in images], **kwargs)
