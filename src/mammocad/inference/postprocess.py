"""Probability map -> lesions, and lesions mapped back to the original image through ``Geometry``.

Masks are kept as ``CroppedMask`` (the component's bounding region + offset): a lesion covers a tiny
part of a mammogram, and a full 3328 x 4084 bool mask per lesion would cost 13.6 MB for nothing.

Mapping back inverts ONE int32 label map (every component painted with its number) with
``kind="nearest"`` and cuts each lesion out of it by label, instead of inverting one full-size mask
per lesion: one resize of the whole image, whatever the lesion count, and lesions that touch stay
disjoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import scipy.ndimage

from mammocad.datasets.rasterize import mask_to_box
from mammocad.errors import ConfigError, InputError
from mammocad.preprocess.geometry import Geometry
from mammocad.records import PredictedLesion

BINARY_CLASSES = ("lesion",)
PATHOLOGY_CLASSES = ("background", "benign", "malignant")
TOP_FRACTION = 0.1  # the score is the mean of the top 10 % lesion probabilities of a component


@dataclass
class CroppedMask:
    """A bool mask stored as its bounding region: ``full()[y0:y0+h, x0:x0+w] == mask``, zero elsewhere."""

    mask: np.ndarray  # bool (h, w)
    x0: int
    y0: int
    image_size: tuple[int, int]  # (H, W) of the grid the mask lives on

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Tight [x0, y0, x1, y1] (pixel edges, exclusive end) of the set pixels."""
        box = mask_to_box(self.mask)
        if box is None:
            return (self.x0, self.y0, self.x0, self.y0)
        x0, y0, x1, y1 = (int(v) for v in box)
        return (self.x0 + x0, self.y0 + y0, self.x0 + x1, self.y0 + y1)

    def paste_into(self, canvas: np.ndarray, value: int | bool = True) -> np.ndarray:
        h, w = self.mask.shape
        canvas[self.y0:self.y0 + h, self.x0:self.x0 + w][self.mask] = value
        return canvas

    def full(self) -> np.ndarray:
        return self.paste_into(np.zeros(self.image_size, dtype=bool))


@dataclass
class LesionComponent:
    """One connected component of the thresholded probability map, on the prepared (model) grid."""

    mask: CroppedMask
    box: tuple[int, int, int, int]  # [x0, y0, x1, y1] pixel edges, exclusive end
    area: int  # pixels
    score: float  # mean of the top 10 % lesion probabilities inside the component
    label: str  # class name
    class_probabilities: dict[str, float] = field(default_factory=dict)  # foreground classes, sum to 1


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


def _label_map(components: list[LesionComponent], size: tuple[int, int]) -> np.ndarray:
    labels = np.zeros(size, dtype=np.int32)
    for k, comp in enumerate(components, start=1):
        if comp.mask.image_size != tuple(size):
            raise InputError("lesions", f"component mask on a {comp.mask.image_size} grid, geometry output is {size}")
        comp.mask.paste_into(labels, k)
    return labels


def lesions_to_original(components: list[LesionComponent], geometry: Geometry) -> list[tuple[PredictedLesion, CroppedMask]]:
    """Map prepared-grid components back to the original image: ``PredictedLesion`` (box through
    ``geometry.inverse_boxes`` clipped to the image, area in original pixels) and its mask on the
    original grid. Components that map outside the original image (drawn on padding) are dropped."""
    if not components:
        return []
    size = tuple(geometry.size)
    orig = geometry.inverse_array(_label_map(components, size), kind="nearest")
    oh, ow = geometry.source_size
    boxes = geometry.inverse_boxes([c.box for c in components])
    out = []
    for k, (comp, box) in enumerate(zip(components, boxes), start=1):
        x0, y0 = np.clip(box[:2], 0, [ow, oh])
        x1, y1 = np.clip(box[2:], 0, [ow, oh])
        # The mask lies inside the mapped box up to rounding of nearest-neighbour resampling: cut with a margin.
        cx0, cy0 = max(int(np.floor(x0)) - 1, 0), max(int(np.floor(y0)) - 1, 0)
        cx1, cy1 = min(int(np.ceil(x1)) + 1, ow), min(int(np.ceil(y1)) + 1, oh)
        region = orig[cy0:cy1, cx0:cx1] == k
        area = int(np.count_nonzero(region))
        if area == 0 or x1 <= x0 or y1 <= y0:
            continue
        lesion = PredictedLesion(box=(x0, y0, x1, y1), score=comp.score, label=comp.label,
                                 class_probabilities=dict(comp.class_probabilities), area=float(area))
        out.append((lesion, CroppedMask(region, cx0, cy0, (oh, ow))))
    return out


def union_mask_original(lesions: list[tuple[PredictedLesion, CroppedMask]], image_size: tuple[int, int]) -> np.ndarray:
    """All lesion masks from ``lesions_to_original`` as one bool mask of the original image size."""
    union = np.zeros((int(image_size[0]), int(image_size[1])), dtype=bool)
    for _, mask in lesions:
        mask.paste_into(union, True)
    return union
