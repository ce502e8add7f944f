"""The segmentation task's lesions on the prepared grid: probability map -> ``LesionComponent``s
(threshold, minimum area, inside the breast, scored), the operating point a bundle outputs
(``find_lesions``), the low-threshold candidates a FROC curve is drawn from (``find_candidates``),
and the label map evaluation and validation score (``lesion_label_map``).

Here, in the task, because it is what a segmentation model's output MEANS: ``Predictor`` reaches it
through its task module (``task.find_lesions``), so a detection task brings its own without
changing ``Predictor``; ``inference.postprocess`` only maps lesions between grids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import scipy.ndimage

from mammocad.errors import ConfigError, InputError
from mammocad.records import CroppedMask, LesionComponent

if TYPE_CHECKING:  # segment.py imports this module: its settings type is only named here
    from mammocad.tasks.segment import InferenceSettings

BINARY_CLASSES = ("lesion",)
PATHOLOGY_CLASSES = ("background", "benign", "malignant")
TOP_FRACTION = 0.1  # the score is the mean of the top 10 % lesion probabilities of a component
# Candidates (what a FROC curve is drawn from): every component of lesion probability >= this, far
# below any operating threshold, so that the curve covers the whole range of scores, and at most
# DEFAULT_MAX_CANDIDATES per image (the highest scores) so a weak model cannot fill a JSON.
DEFAULT_CANDIDATE_THRESHOLD = 0.05
DEFAULT_MAX_CANDIDATES = 100


def _lesion_probability(prob: np.ndarray, class_names: tuple[str, ...] | None) -> tuple[np.ndarray, tuple[str, ...]]:
    p = np.asarray(prob)
    if p.ndim != 3 or p.shape[0] < 1 or p.shape[1] < 1 or p.shape[2] < 1:
        raise InputError("probability map", f"expected (C, H, W), got shape {p.shape}")
    c = p.shape[0]
    if class_names is None:
        if c == 1:
            class_names = BINARY_CLASSES
        elif c == len(PATHOLOGY_CLASSES):
            class_names = PATHOLOGY_CLASSES
        else:
            raise ConfigError("class_names", f"give the {c} class names (class 0 = background)")
    class_names = tuple(class_names)
    if len(class_names) != c:
        raise ConfigError("class_names", f"{len(class_names)} names for {c} probability channels")
    if not np.isfinite(p).all():
        raise InputError("probability map", "contains NaN or infinite values")
    # Multi-class: lesion = anything but background.
    lesion = p[0] if c == 1 else 1.0 - p[0]
    return lesion.astype(np.float32, copy=False), class_names


def top_fraction_mean(values: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """Mean of the largest ``fraction`` of ``values`` (at least one): tracks the peak, but one hot pixel
    does not make the score, and unlike the plain mean it does not fall as the component grows."""
    k = max(1, int(round(fraction * values.size)))
    return float(np.partition(values, values.size - k)[values.size - k:].mean())


def probability_to_lesions(prob: np.ndarray, threshold: float = 0.5, min_area: int = 16,
                           class_names: tuple[str, ...] | None = None, breast_mask: np.ndarray | None = None,
                           fill_holes: bool = False) -> list[LesionComponent]:
    """Threshold the lesion probability (``>= threshold``), split into 8-connected components, drop
    those under ``min_area`` pixels; sorted by score, highest first.

    ``prob`` is ``predict_tiled``'s output: one sigmoid channel, or softmax channels with class 0 =
    background (then lesion probability = 1 - p(background), and each lesion's class is the foreground
    class with the highest mean probability over it; ``class_probabilities`` are those means renormalised
    over the foreground classes). For one channel ``class_probabilities`` stays empty (no classification).
    ``breast_mask`` removes detections outside the breast; ``fill_holes`` fills enclosed holes first.
    Default ``min_area=16`` pixels is ~1.3 mm^2 at the 0.29 mm pixels of a 1024-row mammogram.
    """
    if not 0.0 < threshold <= 1.0:
        raise ConfigError("threshold", f"lesion probability threshold must be in (0, 1], got {threshold}")
    lesion, class_names = _lesion_probability(prob, class_names)
    fg = lesion >= threshold
    if breast_mask is not None:
        if breast_mask.shape != fg.shape:
            raise InputError("breast_mask", f"shape {breast_mask.shape} does not match the probability map {fg.shape}")
        fg &= breast_mask != 0
    if fill_holes:
        fg = scipy.ndimage.binary_fill_holes(fg)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= max(int(min_area), 1)]
    size = fg.shape
    comps = []
    for i in keep:
        x, y, w, h, area = (int(v) for v in stats[i])
        region = labels[y:y + h, x:x + w] == i
        comps.append(LesionComponent(
            mask=CroppedMask(region, x, y, size), box=(x, y, x + w, y + h), area=area,
            score=top_fraction_mean(lesion[y:y + h, x:x + w][region]),
            **_classify(prob, class_names, (slice(y, y + h), slice(x, x + w)), region)))
    comps.sort(key=lambda c: -c.score)
    return comps


def _classify(prob: np.ndarray, class_names: tuple[str, ...], window: tuple[slice, slice], region: np.ndarray) -> dict:
    if len(class_names) == 1:
        return {"label": class_names[0], "class_probabilities": {}}
    means = np.array([prob[c][window][region].mean() for c in range(1, len(class_names))], dtype=np.float64)
    total = means.sum()
    means = means / total if total > 0 else np.full_like(means, 1.0 / len(means))
    names = class_names[1:]
    return {"label": names[int(np.argmax(means))],
            "class_probabilities": {n: float(m) for n, m in zip(names, means)}}


def lesion_label_map(components: list[LesionComponent], shape: tuple[int, int], class_names: tuple[str, ...] | list[str],
                     ) -> np.ndarray:
    """uint8 label map of ``shape``: 0 = background, each component painted with the index of its
    class in ``class_names`` (background first; a label not in it, e.g. "lesion" against a
    benign/malignant list, counts as class 1). The label map evaluation and validation score."""
    names = list(class_names)
    out = np.zeros(tuple(shape), dtype=np.uint8)
    for comp in components:
        if comp.mask.image_size != tuple(shape):
            raise InputError("lesions", f"component mask on a {comp.mask.image_size} grid, label map is {tuple(shape)}")
        comp.mask.paste_into(out, names.index(comp.label) if comp.label in names else 1)
    return out


def find_lesions(probs: np.ndarray, breast_mask: np.ndarray | None, settings: InferenceSettings,
                 channel_names: tuple[str, ...]) -> list[LesionComponent]:
    """Lesion components on the grid of ``probs``: ``settings``' threshold and minimum area inside
    the breast, then its ``max_lesions`` highest-scoring ones."""
    s = settings
    found = probability_to_lesions(probs, threshold=s.threshold, min_area=s.min_area, class_names=channel_names,
                                   breast_mask=breast_mask)
    if s.max_lesions is not None:
        found = found[:s.max_lesions]  # probability_to_lesions sorts by score, highest first
    return found


def find_candidates(probs: np.ndarray, breast_mask: np.ndarray | None, settings: InferenceSettings,
                    channel_names: tuple[str, ...], threshold: float = DEFAULT_CANDIDATE_THRESHOLD,
                    max_candidates: int | None = DEFAULT_MAX_CANDIDATES) -> tuple[list[LesionComponent], dict[str, Any]]:
    """Candidates for a FROC curve: the components of lesion probability >= ``threshold`` (far below
    the operating threshold) with ``settings``' minimum area inside the breast, each with its score,
    WITHOUT the ``max_lesions`` cut; at most ``max_candidates`` (the highest scores). Returns them and
    what was done (``Prediction.attributes["candidate_search"]``), including the highest score the cap
    dropped: the curve drawn from these is complete only above it."""
    found = probability_to_lesions(probs, threshold=threshold, min_area=settings.min_area, class_names=channel_names,
                                   breast_mask=breast_mask)  # sorted by score, highest first
    return cap_candidates(found, threshold, settings.min_area, max_candidates)


def cap_candidates(found: list[LesionComponent], threshold: float, min_area: int, max_candidates: int | None,
                   ) -> tuple[list[LesionComponent], dict[str, Any]]:
    """The ``max_candidates`` best of ``found`` (sorted by score, highest first) and the record of the
    search (``Prediction.attributes["candidate_search"]``), with the highest score the cap dropped."""
    kept = found if max_candidates is None else found[:int(max_candidates)]
    dropped = found[len(kept):]
    search = {"probability_threshold": float(threshold), "min_area_prepared_pixels": int(min_area),
              "max_candidates": None if max_candidates is None else int(max_candidates), "n_found": len(found),
              "highest_score_dropped": dropped[0].score if dropped else None}
    return kept, search
