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
* lesions without geometry cannot be scored: they are counted and reported, not in the denominator;
  lesions lost in preprocessing (nothing of them on the prepared grid) likewise, with the reason.

The curve is only as wide as the components it is given: components already cut at a model's
operating threshold give a plateau (every FP rate above the model's own reads the same sensitivity).
Evaluation therefore scores CANDIDATES (every component at a low probability threshold, each with
its score) and reports the model's own output (``operating_components``) as one separate point.

Components are ``records.LesionComponent`` (the prepared-grid predicted-lesion type,
mask kept cropped so memory stays per image). pycocotools/torchmetrics compute COCO AP with
one-to-one matching, not this hit rule or FROC, so the matching is hand-written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from mammocad.errors import ConfigError, InputError
from mammocad.evaluation.bootstrap import (DEFAULT_CONFIDENCE, DEFAULT_N_BOOT, DEFAULT_SEED, SINGLE_GROUP_NOTE,
                                           MetricValue, bootstrap_ci, group_index, ratio)
from mammocad.records import LesionComponent

DEFAULT_IOU_THRESHOLD = 0.1
DEFAULT_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class HitRule:
    """When a predicted component finds a lesion: IoU >= ``iou`` (None: IoU not used) and/or its
    centroid inside the lesion (``centroid``). Named as written on the command line (``--hit``):

    * ``iou0.1+centroid`` (default): the MIAS papers' rule, lenient for circles drawn around a lesion;
    * ``iou0.1``, ``iou0.5`` (COCO's AP50 threshold): overlap only;
    * ``centroid``: the component's centre of mass lies inside the lesion (the CAD convention).
    """

    iou: float | None = DEFAULT_IOU_THRESHOLD
    centroid: bool = True

    @property
    def name(self) -> str:
        parts = ([f"iou{self.iou:g}"] if self.iou is not None else []) + (["centroid"] if self.centroid else [])
        return "+".join(parts)

    def describe(self) -> str:
        parts = ([f"IoU(component, lesion) >= {self.iou:g}"] if self.iou is not None else []) + (
            ["the component's centroid (centre of mass of its pixels) lies inside the lesion"] if self.centroid else [])
        return " or ".join(parts)

    @classmethod
    def parse(cls, rule: "HitRule | str | None") -> "HitRule":
        """A rule from its name (``iou0.1+centroid``, ``iou0.5``, ``centroid``, ...) or itself."""
        if rule is None:
            return cls()
        if isinstance(rule, HitRule):
            return rule
        iou, centroid, seen = None, False, set()
        for part in str(rule).strip().lower().replace(" ", "").split("+"):
            if part in seen or not part:
                break
            seen.add(part)
            if part == "centroid":
                centroid = True
                continue
            try:
                iou = float(part[3:]) if part.startswith("iou") else None
            except ValueError:
                iou = None
            if iou is None or not 0.0 < iou <= 1.0:
                break
        else:
            if iou is not None or centroid:
                return cls(iou, centroid)
        raise ConfigError("--hit", f"unknown hit rule {rule!r}: expected e.g. iou0.1+centroid, iou0.1, iou0.5, centroid")


DEFAULT_HIT = HitRule()


def detection_rules(hit: HitRule | str | None = None) -> list[str]:
    hit = HitRule.parse(hit)
    return [
        f"Hit (rule {hit.name}): a predicted connected component hits a lesion if {hit.describe()}.",
        "A lesion is detected at threshold t if any component with score >= t hits it (its score: the best "
        "score of the components hitting it).",
        "False positive at t: a component with score >= t that hits no lesion; a second component on an "
        "already-hit lesion counts as neither a true nor a false positive.",
        "FP per image = false positives / number of ALL images (normal images included).",
        "FROC: one point per distinct score of the scored components (see 'Components scored'), from the "
        "highest score to the lowest.",
        "Sensitivity at k FP/image = the highest sensitivity over score thresholds whose FP/image <= k "
        "(no interpolation; 0 if no threshold qualifies).",
        "Operating point: the model's own output (its probability threshold, minimum area and max lesions: what "
        "`mammocad predict` writes as lesions), matched by the same rules, all of it counted: one point. It need "
        "not lie on the curve: candidates at a low threshold can be merged blobs of the components the model's "
        "threshold separates.",
        "Lesions without geometry cannot be scored: they are counted separately and left out of the "
        "sensitivity denominator. Lesions lost in preprocessing (nothing of them left on the prepared grid) "
        "are counted with the reason and left out likewise.",
        "95% CI of sensitivity at 1 FP/image: percentile bootstrap resampling patients.",
    ]


def lesion_masks(lesions: Iterable, shape: tuple[int, int]) -> list[np.ndarray | None]:
    """Ground-truth mask per ``records.Lesion`` on an image of ``shape`` (None: no geometry)."""
    from mammocad.datasets.rasterize import rasterize_lesion

    return [rasterize_lesion(les, shape) for les in lesions]


@dataclass
class DetectionImage:
    """One image's ground-truth lesions (full-size boolean masks; None = lesion without geometry)
    and predicted components: ``components`` are what the curve is drawn from (candidates),
    ``operating_components`` the model's own output (its operating point; None: not given).
    ``lost_lesions`` (lesion index -> reason) are lesions preprocessing lost: not scored."""

    case_id: str
    patient_id: str
    shape: tuple[int, int]
    lesion_masks: list[np.ndarray | None]
    components: list[LesionComponent]
    operating_components: list[LesionComponent] | None = None
    lost_lesions: dict[int, str] = field(default_factory=dict)


@dataclass
class MatchedImage:
    """What detection needs of one image once matched: small, so a whole dataset fits in memory."""

    case_id: str
    patient_id: str
    lesion_scores: np.ndarray  # per scorable lesion: highest score of a hitting component (-inf: never hit)
    fp_scores: np.ndarray  # scores of components hitting no lesion
    n_without_geometry: int = 0
    n_components: int = 0
    lost_reasons: tuple[str, ...] = ()  # one per lesion lost in preprocessing
    score_range: tuple[float, float] | None = None  # lowest, highest score of the components
    operating: tuple[int, int, int] | None = None  # operating components: detected lesions, FPs, components


def _check_component(c: LesionComponent, shape: tuple[int, int], source: str) -> None:
    m = c.mask
    h, w = np.shape(m.mask)
    if tuple(m.image_size) != tuple(shape):
        raise InputError(source, f"component mask on a {tuple(m.image_size)} grid, the image is {tuple(shape)}")
    if not (0 <= m.x0 and 0 <= m.y0 and m.x0 + w <= shape[1] and m.y0 + h <= shape[0]):
        raise InputError(source, f"component mask region ({m.x0}, {m.y0}, {m.x0 + w}, {m.y0 + h}) lies outside "
                                 f"the {shape[1]}x{shape[0]} image")
    if not np.isfinite(c.score):
        raise InputError(source, f"component score is {c.score}")


def component_hits(component: LesionComponent, lesion: np.ndarray, iou_threshold: float | None = DEFAULT_IOU_THRESHOLD,
                   centroid: bool = True, lesion_area: int | None = None) -> bool:
    """The hit rule: IoU >= ``iou_threshold`` (None: not used), or (``centroid``) the centroid's pixel
    is inside the lesion. ``lesion_area`` (its pixel count) spares a count over the whole image per
    call when the caller matches many components against one lesion."""
    m = component.mask
    cmask = np.asarray(m.mask, dtype=bool)
    h, w = cmask.shape
    rr, cc = np.nonzero(cmask)
    if rr.size == 0:
        return False
    if centroid:
        # Centroid in pixel-edge coordinates is (mean index + 0.5); the pixel containing it is floor().
        pr, pc = int(np.floor(rr.mean() + 0.5)) + m.y0, int(np.floor(cc.mean() + 0.5)) + m.x0
        if lesion[pr, pc]:
            return True
    if iou_threshold is None:
        return False
    inter = int(np.count_nonzero(lesion[m.y0:m.y0 + h, m.x0:m.x0 + w] & cmask))
    area = int(np.count_nonzero(lesion)) if lesion_area is None else int(lesion_area)
    union = rr.size + area - inter
    return union > 0 and inter / union >= iou_threshold


def _match(components: Sequence[LesionComponent], lesions: list[np.ndarray], shape: tuple[int, int], source: str,
           hit: HitRule) -> tuple[np.ndarray, np.ndarray]:
    """(best hit score per lesion, -inf when none; scores of components hitting no lesion)."""
    lesion_scores = np.full(len(lesions), -np.inf)
    areas = [int(np.count_nonzero(m)) for m in lesions]  # once per lesion, not per (component, lesion)
    fp = []
    for c in components:
        _check_component(c, shape, source)
        hit_any = False
        for j, m in enumerate(lesions):
            if component_hits(c, m, hit.iou, hit.centroid, areas[j]):
                hit_any = True
                lesion_scores[j] = max(lesion_scores[j], c.score)
        if not hit_any:
            fp.append(c.score)
    return lesion_scores, np.asarray(fp, dtype=np.float64)


def match_image(image: DetectionImage, hit: HitRule | str | None = None) -> MatchedImage:
    hit = HitRule.parse(hit)
    shape = tuple(int(v) for v in image.shape)
    lesions = []
    n_without = 0
    lost = []
    for k, m in enumerate(image.lesion_masks):
        if k in image.lost_lesions:
            lost.append(str(image.lost_lesions[k]))
            continue
        if m is None:
            n_without += 1
            continue
        m = np.asarray(m, dtype=bool)
        if m.shape != shape:
            raise InputError(image.case_id, f"lesion {k} mask shape {m.shape} differs from the image shape {shape}")
        lesions.append(m)
    lesion_scores, fp = _match(image.components, lesions, shape, image.case_id, hit)
    scores = [c.score for c in image.components]
    operating = None
    if image.operating_components is not None:
        op_scores, op_fp = _match(image.operating_components, lesions, shape, image.case_id, hit)
        operating = (int(np.isfinite(op_scores).sum()), int(op_fp.size), len(image.operating_components))
    return MatchedImage(image.case_id, str(image.patient_id), lesion_scores, fp, n_without, len(image.components),
                        tuple(lost), (float(min(scores)), float(max(scores))) if scores else None, operating)


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
    iou_threshold: float | None  # of the hit rule (None: the rule uses no IoU)
    sensitivity_at_1fp: MetricValue
    threshold_at_1fp: float | None
    operating_points: list[dict]  # {"fp_per_image": k, "sensitivity": s, "threshold": t}
    froc: list[FrocPoint]
    rules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # what the curve was drawn from (the caller's description, e.g. the candidate threshold) and the
    # lowest / highest score actually scored: the range of thresholds the curve covers
    components_scored: dict[str, Any] = field(default_factory=dict)
    # the model's own output as one point (None when not given): fp_per_image, sensitivity, counts,
    # and the caller's description of it (threshold, min area, max lesions)
    model_operating_point: dict[str, Any] | None = None
    n_lesions_lost: int = 0  # lost in preprocessing: not scored
    lost_in_preprocessing: dict[str, int] = field(default_factory=dict)  # reason -> lesions
    hit_rule: str = DEFAULT_HIT.name  # HitRule.name: written into every output, the figures depend on it
    coco: dict[str, Any] | None = None  # COCO AP / AP50 / AP75 of boxes and masks (coco_ap.py), when computed

    def to_dict(self) -> dict:
        return {"n_images": self.n_images, "n_patients": self.n_patients, "n_lesions": self.n_lesions,
                "n_lesions_without_geometry": self.n_lesions_without_geometry, "n_lesions_lost": self.n_lesions_lost,
                "lost_in_preprocessing": self.lost_in_preprocessing, "n_components": self.n_components,
                "hit_rule": self.hit_rule, "iou_threshold": self.iou_threshold, "coco": self.coco,
                "components_scored": self.components_scored,
                "model_operating_point": self.model_operating_point,
                "sensitivity_at_1fp": self.sensitivity_at_1fp.to_dict(),
                "threshold_at_1fp": self.threshold_at_1fp, "operating_points": self.operating_points,
                "froc": [p.to_dict() for p in self.froc], "rules": self.rules, "notes": self.notes}


def _score_range(matched: Sequence[MatchedImage]) -> tuple[float, float] | None:
    """Lowest and highest component score over all images (from what matching kept when an image
    was built by hand without ``score_range``)."""
    lows, highs = [], []
    for m in matched:
        if m.score_range is not None:
            lows.append(m.score_range[0])
            highs.append(m.score_range[1])
        else:
            known = np.concatenate([m.lesion_scores[np.isfinite(m.lesion_scores)], m.fp_scores])
            if known.size:
                lows.append(float(known.min()))
                highs.append(float(known.max()))
    return (min(lows), max(highs)) if lows else None


def _model_operating_point(matched: Sequence[MatchedImage], n_lesions: int,
                           settings: dict[str, Any] | None) -> dict[str, Any] | None:
    given = [m.operating is not None for m in matched]
    if not any(given):
        return None
    if not all(given):
        raise InputError(None, "operating components must be given for every image or for none")
    n_det = sum(m.operating[0] for m in matched)
    n_fp = sum(m.operating[1] for m in matched)
    return {**(settings or {}), "fp_per_image": n_fp / len(matched),
            "sensitivity": n_det / n_lesions if n_lesions else None, "n_detected": n_det, "n_false_positives": n_fp,
            "n_lesions": n_lesions, "n_components": sum(m.operating[2] for m in matched)}


def evaluate_matched(matched: Sequence[MatchedImage], *, fp_rates: Sequence[float] = DEFAULT_FP_RATES,
                     hit: HitRule | str | None = None, n_boot: int = DEFAULT_N_BOOT,
                     seed: int = DEFAULT_SEED, confidence: float = DEFAULT_CONFIDENCE,
                     components_scored: dict[str, Any] | None = None,
                     operating_settings: dict[str, Any] | None = None) -> DetectionReport:
    """FROC, sensitivity at the ``fp_rates`` (with a bootstrap CI at 1 FP/image) and, when the images
    carry operating components, the model's operating point. ``components_scored`` describes what the
    components are (e.g. ``{"source": "candidates", "probability_threshold": 0.05}``) and
    ``operating_settings`` the model's post-processing: both go into the report as given."""
    hit = HitRule.parse(hit)  # must be the rule the images were matched with (evaluate_lesion_detection passes it)
    matched = list(matched)
    if not matched:
        raise InputError(None, "no images to evaluate for lesion detection")
    curve = froc_curve(matched)
    n_lesions = sum(m.lesion_scores.size for m in matched)
    n_without = sum(m.n_without_geometry for m in matched)
    lost = Counter(reason for m in matched for reason in m.lost_reasons)
    points = []
    for k in sorted(set(float(r) for r in fp_rates) | {1.0}):
        s, t = sensitivity_at(curve, k)
        points.append({"fp_per_image": k, "sensitivity": s if n_lesions else None, "threshold": t})
    sens1, thr1 = sensitivity_at(curve, 1.0)
    statistic, n_groups = _sensitivity_at_k_statistic(matched, 1.0)
    ci = bootstrap_ci(statistic, n_groups, n_boot=n_boot, seed=seed, confidence=confidence) if n_lesions else None
    scored = dict(components_scored or {})
    low_high = _score_range(matched)
    scored.update({"n_components": sum(m.n_components for m in matched),
                   "lowest_score": None if low_high is None else low_high[0],
                   "highest_score": None if low_high is None else low_high[1]})
    notes = []
    if n_lesions == 0:
        notes.append("no scorable lesion: sensitivity is undefined")
    if n_without:
        notes.append(f"{n_without} lesion(s) have no geometry and cannot be scored; they are not in the denominator")
    if lost:
        notes.append(f"{sum(lost.values())} lesion(s) lost in preprocessing are not scored and not in the denominator ("
                     + "; ".join(f"{n}: {why}" for why, n in sorted(lost.items())) + ")")
    if n_groups == 1:
        notes.append(SINGLE_GROUP_NOTE)
    return DetectionReport(
        n_images=len(matched), n_patients=n_groups, n_lesions=n_lesions, n_lesions_without_geometry=n_without,
        n_components=scored["n_components"], iou_threshold=hit.iou, hit_rule=hit.name,
        sensitivity_at_1fp=MetricValue(sens1 if n_lesions else float("nan"), ci, n_lesions), threshold_at_1fp=thr1,
        operating_points=points, froc=curve, rules=detection_rules(hit), notes=notes,
        components_scored=scored, model_operating_point=_model_operating_point(matched, n_lesions, operating_settings),
        n_lesions_lost=sum(lost.values()), lost_in_preprocessing=dict(sorted(lost.items())))


def evaluate_lesion_detection(images: Iterable[DetectionImage], **kwargs) -> DetectionReport:
    """Match every image's components to its lesions, then FROC + sensitivity at k FP/image (and the
    operating point when the images carry operating components)."""
    hit = HitRule.parse(kwargs.pop("hit", None))
    return evaluate_matched([match_image(im, hit) for im in images], hit=hit, **kwargs)
