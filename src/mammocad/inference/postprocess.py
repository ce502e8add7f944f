"""Lesions mapped between the prepared (model) grid and the original image through ``Geometry``.

Two predicted-lesion types, one per grid: ``records.LesionComponent`` on the prepared grid (what a
task finds, e.g. ``tasks.segment_lesions.probability_to_lesions``), and ``records.PredictedLesion``
on the original grid (what ``Prediction`` records hold and evaluation scores, mapped forward with
``lesions_to_prepared``). This module is task-agnostic: whatever a task found, it maps.

Masks are kept as ``CroppedMask`` (the component's bounding region + offset): a lesion covers a tiny
part of a mammogram, and a full 3328 x 4084 bool mask per lesion would cost 13.6 MB for nothing.

Mapping back inverts ONE int32 label map (every component painted with its number) with
``kind="nearest"`` and cuts each lesion out of it by label, instead of inverting one full-size mask
per lesion: one resize of the whole image, whatever the lesion count, and lesions that touch stay
disjoint.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from mammocad.errors import InputError
from mammocad.preprocess.geometry import Geometry
from mammocad.records import CroppedMask, LesionComponent, PredictedLesion


def disjoint_layers(masks: list[CroppedMask], size: tuple[int, int]) -> list[list[int]]:
    """Indices of ``masks`` in layers of pairwise disjoint masks (greedy, in order). Components of one
    thresholded probability map are disjoint: one layer, one resize. Detection instances may overlap
    (a lesion inside a larger false positive's mask): each layer is mapped on its own, so no mask
    loses the pixels it shares with another."""
    layers: list[list[int]] = []
    taken: list[np.ndarray] = []
    for k, m in enumerate(masks):
        if tuple(m.image_size) != tuple(size):
            raise InputError("lesions", f"lesion mask on a {tuple(m.image_size)} grid, expected {tuple(size)}")
        h, w = m.mask.shape
        for layer, canvas in zip(layers, taken):
            if not (canvas[m.y0:m.y0 + h, m.x0:m.x0 + w] & m.mask).any():
                break
        else:
            layers.append([])
            taken.append(np.zeros(size, dtype=bool))
            layer, canvas = layers[-1], taken[-1]
        layer.append(k)
        m.paste_into(canvas, True)
    return layers


def _label_map(masks: list[CroppedMask], indices: list[int], size: tuple[int, int]) -> np.ndarray:
    labels = np.zeros(size, dtype=np.int32)
    for k in indices:
        masks[k].paste_into(labels, k + 1)
    return labels


def lesions_to_original(components: list[LesionComponent], geometry: Geometry) -> list[PredictedLesion]:
    """Map prepared-grid components back to the original image: ``PredictedLesion`` (box through
    ``geometry.inverse_boxes`` clipped to the image, area in original pixels) carrying its mask on the
    original grid. Components that map outside the original image (drawn on padding) are dropped.
    One int32 label map per layer of disjoint components (``disjoint_layers``) goes through
    ``geometry.inverse_array(kind="nearest")``: one resize for a segmentation's components, whatever their count."""
    found = components_to_original(components, geometry)
    return [found[k] for k in sorted(found)]


def components_to_original(components: list[LesionComponent], geometry: Geometry) -> dict[int, PredictedLesion]:
    """``lesions_to_original`` keyed by each kept lesion's index in ``components``: what a caller
    needs to pair a lesion with what it computed on the prepared grid (``inference.compose``)."""
    if not components:
        return {}
    size = tuple(geometry.size)
    masks = [c.mask for c in components]
    oh, ow = geometry.source_size
    boxes = geometry.inverse_boxes([c.box for c in components])
    found: dict[int, PredictedLesion] = {}
    for layer in disjoint_layers(masks, size):
        orig = geometry.inverse_array(_label_map(masks, layer, size), kind="nearest")
        for k in layer:
            comp, box = components[k], boxes[k]
            x0, y0 = np.clip(box[:2], 0, [ow, oh])
            x1, y1 = np.clip(box[2:], 0, [ow, oh])
            # The mask lies inside the mapped box up to rounding of nearest-neighbour resampling: cut with a margin.
            cx0, cy0 = max(int(np.floor(x0)) - 1, 0), max(int(np.floor(y0)) - 1, 0)
            cx1, cy1 = min(int(np.ceil(x1)) + 1, ow), min(int(np.ceil(y1)) + 1, oh)
            region = orig[cy0:cy1, cx0:cx1] == k + 1
            area = int(np.count_nonzero(region))
            if area == 0 or x1 <= x0 or y1 <= y0:
                continue
            found[k] = PredictedLesion(box=(x0, y0, x1, y1), score=comp.score, label=comp.label,
                                       class_probabilities=dict(comp.class_probabilities), area=float(area),
                                       mask=CroppedMask(region, cx0, cy0, (oh, ow)))
    return found


def lesions_to_prepared(lesions: list[PredictedLesion], geometry: Geometry) -> list[LesionComponent]:
    """Map original-grid lesions (each with its ``mask``) onto the geometry's output (prepared) grid,
    where evaluation's ground truth lives: the inverse of ``lesions_to_original``, the same way round
    (one label map per layer of disjoint masks through ``geometry.forward_array(kind="nearest")``).
    Lesions that fall outside the prepared image (cropped away) are dropped; box and area are those
    of the mapped mask."""
    if not lesions:
        return []
    source = tuple(geometry.source_size)
    for k, les in enumerate(lesions, start=1):
        if les.mask is None:
            raise InputError("lesions", f"lesion {k} has no mask to map")
    masks = [les.mask for les in lesions]
    found: dict[int, LesionComponent] = {}
    for layer in disjoint_layers(masks, source):
        mapped = geometry.forward_array(_label_map(masks, layer, source), kind="nearest")
        size = tuple(int(v) for v in mapped.shape[:2])
        windows = scipy.ndimage.find_objects(mapped, max_label=len(lesions))
        for k in layer:
            window = windows[k]
            if window is None:
                continue
            les = lesions[k]
            region = mapped[window] == k + 1
            y, x = window[0].start, window[1].start
            h, w = region.shape
            found[k] = LesionComponent(mask=CroppedMask(region, x, y, size), box=(x, y, x + w, y + h),
                                       area=int(np.count_nonzero(region)), score=les.score, label=les.label,
                                       class_probabilities=dict(les.class_probabilities))
    return [found[k] for k in sorted(found)]


def union_mask_original(lesions: list[PredictedLesion], image_size: tuple[int, int]) -> np.ndarray:
    """All lesion masks (``PredictedLesion.mask``) as one bool mask of the original image size."""
    union = np.zeros((int(image_size[0]), int(image_size[1])), dtype=bool)
    for les in lesions:
        if les.mask is not None:
            les.mask.paste_into(union, True)
    return union
