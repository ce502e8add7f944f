"""COCO average precision of lesion detections, boxes and masks, computed by pycocotools' COCOeval.

FROC (``lesion_detection``) answers the clinical question (how many lesions found at how many false
marks per image, with a lenient hit rule); AP@[.5:.95], AP50 and AP75 answer the detection-benchmark
question the Mask R-CNN papers report, with COCO's one-to-one matching at fixed IoU thresholds. Both
are computed from the same components on the prepared grid, so they always describe one model run.

The images are accumulated one at a time as compressed RLE (a few hundred bytes per mask), so a
dataset of full mammograms never sits in memory as masks. Class-agnostic ("lesion") by default:
the datasets' benign/malignant pathology is scored by the classification metrics; ``by_class`` adds
per-pathology AP when the components carry benign/malignant labels.

Notes on COCO's rules (they are pycocotools', written into the report): at most 100 detections per
image (``maxDets``), areas in prepared pixels, ground truth is never "crowd", and an image without
lesions contributes only false positives.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from mammocad.errors import InputError
from mammocad.records import CroppedMask, LesionComponent

COCO_RULES = [
    "COCO AP (pycocotools COCOeval): AP = mean precision over IoU thresholds 0.50:0.05:0.95 and 101 recall "
    "points; AP50 / AP75 at IoU 0.5 / 0.75; one-to-one matching by descending score; at most 100 detections "
    "per image; boxes are the tight boxes of the masks; class-agnostic unless stated.",
]


def _rle(mask: np.ndarray | CroppedMask) -> dict[str, Any]:
    from pycocotools import mask as coco_mask

    if isinstance(mask, CroppedMask):
        rle = mask.to_rle()
        return {"size": rle["size"], "counts": rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]}
    return coco_mask.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))


@dataclass
class CocoAccumulator:
    """Ground-truth lesions and scored detections of many images, then ``result()``."""

    by_class: bool = False
    class_names: tuple[str, ...] = ("lesion",)
    _images: list[dict] = field(default_factory=list)
    _gts: list[dict] = field(default_factory=list)
    _dets: list[dict] = field(default_factory=list)

    def _category(self, label: str | None) -> int:
        if not self.by_class:
            return 1
        if label not in self.class_names:
            raise InputError(None, f"label {label!r} is not one of {list(self.class_names)} (per-class COCO AP)")
        return self.class_names.index(label) + 1

    def add(self, shape: tuple[int, int], lesion_masks: Sequence[np.ndarray | None], detections: Sequence[LesionComponent],
            lesion_labels: Sequence[str | None] | None = None) -> None:
        """One image: its ground-truth lesion masks (None = not scorable, left out) and detections."""
        from pycocotools import mask as coco_mask

        image_id = len(self._images) + 1
        h, w = int(shape[0]), int(shape[1])
        self._images.append({"id": image_id, "height": h, "width": w})
        labels = list(lesion_labels) if lesion_labels is not None else [None] * len(lesion_masks)
        for m, label in zip(lesion_masks, labels):
            if m is None or not np.any(m):
                continue
            rle = _rle(m)
            self._gts.append({"id": len(self._gts) + 1, "image_id": image_id, "category_id": self._category(label),
                              "segmentation": rle, "area": float(coco_mask.area(rle)),
                              "bbox": [float(v) for v in coco_mask.toBbox(rle)], "iscrowd": 0})
        for c in detections:
            rle = _rle(c.mask)
            self._dets.append({"image_id": image_id, "category_id": self._category(c.label), "score": float(c.score),
                               "segmentation": rle, "area": float(coco_mask.area(rle)),
                               "bbox": [float(v) for v in coco_mask.toBbox(rle)]})

    def result(self) -> dict[str, Any]:
        """``{"box": {"AP", "AP50", "AP75"}, "mask": {...}, "n_images", "n_lesions", "n_detections"}``;
        AP is None when there is no ground-truth lesion (undefined), 0 when there are no detections."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        out: dict[str, Any] = {"n_images": len(self._images), "n_lesions": len(self._gts),
                               "n_detections": len(self._dets), "by_class": self.by_class, "rules": COCO_RULES}
        if not self._gts:
            return {**out, "box": None, "mask": None}
        names = self.class_names if self.by_class else ("lesion",)
        gt = COCO()
        gt.dataset = {"images": self._images, "annotations": self._gts,
                      "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            gt.createIndex()
        for kind, iou_type in (("box", "bbox"), ("mask", "segm")):
            if not self._dets:
                out[kind] = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
                continue
            # loadRes takes the first of 'bbox' / 'segmentation' it finds and REWRITES the other from it (a
            # box becomes a rectangle polygon), so each pass gets only its own geometry
            drop = "segmentation" if kind == "box" else "bbox"
            with contextlib.redirect_stdout(io.StringIO()):
                dt = gt.loadRes([{k: v for k, v in d.items() if k != drop} for d in self._dets])
                ev = COCOeval(gt, dt, iou_type)
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            out[kind] = {"AP": _finite(ev.stats[0]), "AP50": _finite(ev.stats[1]), "AP75": _finite(ev.stats[2])}
        return out


def _finite(v: float) -> float | None:
    """COCOeval writes -1 where a figure is undefined."""
    return None if v is None or v < 0 else float(v)
