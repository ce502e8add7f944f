"""COCO instance-segmentation / detection JSON (``images``, ``annotations``, ``categories``).

COCO coordinates are continuous pixel-edge coordinates (COCO's own rasteriser fills a 10x20
rectangle with exactly 200 pixels), the convention of our records, so they are used unchanged.

Geometry of an annotation, most faithful first, given that a Lesion has one outline:
* one polygon -> ``polygon``;
* several polygons for one object -> ``polygon`` = the largest part; the full segmentation is kept
  in ``attributes["coco_segmentation"]`` and a warning says how much area the outline leaves out
  (adapters write no files, so a union mask cannot be stored);
* RLE (compressed or not) -> decoded with pycocotools and traced to its exact pixel outline
  (largest connected part, holes filled), the RLE kept in ``attributes["coco_segmentation"]``;
* no segmentation -> ``box`` from ``bbox`` ([x, y, w, h] -> [x0, y0, x1, y1]).
Crowd annotations (``iscrowd=1``) are skipped with a warning; an image without annotations is a
normal case, an image whose annotations were all skipped has an unknown label.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mammocad.datasets.common import (
    ALLOW_OUTSIDE_ROOT,
    bool_option,
    check_options,
    find_json,
    kind_from_word,
    leads_outside,
    load_json,
    parse_modality,
    path_in_root,
    pathology_from_word,
    resolve_dir,
    unique_case_id,
)
from mammocad.datasets.rasterize import mask_to_box
from mammocad.datasets.registry import register_adapter
from mammocad.errors import AnnotationError
from mammocad.records import Case, Lesion, label_from_lesions

log = logging.getLogger(__name__)


def polygon_area(points: list[tuple[float, float]]) -> float:
    xy = np.asarray(points, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def mask_outlines(mask: np.ndarray) -> list[list[tuple[float, float]]]:
    """Outer outlines of a binary mask's connected parts in edge coordinates, largest first.

    cv2.findContours returns the centres of the boundary pixels, half a pixel inside the true
    outline (re-filling them with the pixel-centre rule loses about half the boundary pixels). On a
    2x nearest-neighbour upsampling the traced centres lie 0.25 px inside the pixel edges, so the
    polygons re-fill to exactly the original pixels. Only the mask's bounding box is upsampled.
    """
    box = mask_to_box(mask)
    if box is None:
        return []
    c0, r0, c1, r1 = (int(v) for v in box)
    crop = np.ascontiguousarray(mask[r0:r1, c0:c1], dtype=np.uint8)
    up = cv2.resize(crop, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outlines = []
    for contour in contours:
        pts = (contour[:, 0, :].astype(np.float64) + 0.5) / 2.0 + (c0, r0)
        if len(pts) >= 3:
            outlines.append([(float(x), float(y)) for x, y in pts])
    return sorted(outlines, key=polygon_area, reverse=True)


def _decode_rle(segmentation: dict[str, Any], source: Path) -> np.ndarray:
    try:
        from pycocotools import mask as coco_mask  # lazy: only RLE needs it
    except ImportError:
        raise AnnotationError(source, "RLE segmentation needs pycocotools (pip install pycocotools)") from None
    h, w = (int(v) for v in segmentation["size"])
    rle = segmentation
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        rle = coco_mask.frPyObjects(segmentation, h, w)
    elif isinstance(segmentation["counts"], str):
        rle = {"size": [h, w], "counts": segmentation["counts"].encode("ascii")}
    return coco_mask.decode(rle).astype(bool)


def _geometry(ann: dict[str, Any], source: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Lesion geometry kwargs, extra attributes) for one annotation; ValueError says why not."""
    seg = ann.get("segmentation")
    extra: dict[str, Any] = {}
    parts: list[list[tuple[float, float]]] = []
    if isinstance(seg, dict):
        parts = mask_outlines(_decode_rle(seg, source))
        extra["coco_segmentation"] = seg
        if not parts:
            raise ValueError("empty RLE mask")
    elif isinstance(seg, list) and seg:
        flat_lists = [seg] if all(isinstance(v, (int, float)) for v in seg) else seg
        for flat in flat_lists:
            if not isinstance(flat, list) or len(flat) % 2 or not all(isinstance(v, (int, float)) for v in flat):
                raise ValueError("polygon is not an even-length list of numbers")
            if len(flat) >= 6:
                parts.append([(float(flat[i]), float(flat[i + 1])) for i in range(0, len(flat), 2)])
        if not parts:
            raise ValueError("polygon(s) with fewer than 3 points")
        parts.sort(key=polygon_area, reverse=True)
        if len(parts) > 1:
            extra["coco_segmentation"] = seg
    if parts:
        if len(parts) > 1:
            total = sum(polygon_area(p) for p in parts)
            kept = polygon_area(parts[0])
            extra["coco_parts"] = len(parts)
            log.warning("%s: annotation %s has %d separate parts; the outline is the largest (%.0f%% of the area), "
                        "all parts kept in attributes['coco_segmentation']", source, ann.get("id"), len(parts), 100 * kept / max(total, 1e-9))
        return {"polygon": parts[0]}, extra
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4):
        raise ValueError("neither a segmentation nor a 4-number bbox")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise ValueError(f"bbox {bbox} has no area")
    return {"box": (x, y, x + w, y + h)}, extra


def _require_list(data: dict[str, Any], key: str, source: Path) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise AnnotationError(source, f"no {key!r} list (not a COCO annotation file?)")
    return value


@register_adapter("coco")
def read_coco(raw_dir: Path, **options: Any) -> list[Case]:
    """Cases from a COCO JSON. Options (strings): json, image_dir (default: the JSON's folder, or
    ``images/`` beside it), modality (MG|US, default MG), patient_field (key of the image record
    holding the patient id; default 'patient_id' when present, else the image stem), dataset,
    allow_outside_root (read a ``file_name`` that leads outside the image folder: absolute or ``..``;
    refused by default)."""
    check_options("coco", options, ("json", "image_dir", "modality", "patient_field", "dataset"))
    raw_dir = Path(raw_dir)
    json_path = find_json(raw_dir, options.get("json"), subfolders=("annotations",))
    modality = parse_modality(options.get("modality", "MG"), "coco")
    dataset = options.get("dataset") or "coco"
    patient_field = options.get("patient_field") or None
    allow_outside = bool_option(options, ALLOW_OUTSIDE_ROOT)
    if options.get("image_dir"):
        image_dirs = [resolve_dir(options["image_dir"], json_path.parent, json_path.parent)]
    else:
        bases = [json_path.parent] + ([raw_dir] if raw_dir.is_dir() else [])
        image_dirs = list(dict.fromkeys(p.absolute() for b in bases for p in (b, b / "images")))

    data = load_json(json_path)
    if not isinstance(data, dict):
        raise AnnotationError(json_path, f"expected a JSON object, got {type(data).__name__}")
    images = _require_list(data, "images", json_path)
    annotations = _require_list(data, "annotations", json_path)
    categories = {}
    for cat in _require_list(data, "categories", json_path):
        if isinstance(cat, dict) and "id" in cat:
            categories[cat["id"]] = cat

    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for ann in annotations:
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise AnnotationError(json_path, f"annotation {ann!r:.80} has no 'image_id'")
        by_image[ann["image_id"]].append(ann)
    image_ids = {img.get("id") for img in images if isinstance(img, dict)}
    for image_id in set(by_image) - image_ids:
        log.warning("%s: %d annotation(s) refer to image id %r, which is not in 'images'; skipped", json_path, len(by_image[image_id]), image_id)

    cases: list[Case] = []
    used_ids: set[str] = set()
    seen_image_ids: set[Any] = set()
    for img in images:
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise AnnotationError(json_path, f"image record {img!r:.80} lacks 'id' or 'file_name'")
        if img["id"] in seen_image_ids:
            log.warning("%s: image id %r is listed twice; the second record is skipped", json_path, img["id"])
            continue
        seen_image_ids.add(img["id"])
        file_name = str(img["file_name"])
        dirs = image_dirs if allow_outside else [d for d in image_dirs if not leads_outside(file_name, d)]
        if not dirs:
            path_in_root(file_name, image_dirs[0], json_path, allow_outside)  # raises: names the file and the path
        image_path = next((d / file_name for d in dirs if (d / file_name).is_file()), None)
        if image_path is None:
            log.warning("%s: image %s not found in %s; skipped", json_path, file_name, ", ".join(map(str, image_dirs)))
            continue
        lesions, skipped = [], 0
        for ann in by_image.get(img["id"], []):
            if ann.get("iscrowd"):
                log.warning("%s: annotation %s on %s is a crowd region; skipped", json_path, ann.get("id"), file_name)
                skipped += 1
                continue
            try:
                geometry, extra = _geometry(ann, json_path)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("%s: annotation %s on %s skipped: %s", json_path, ann.get("id"), file_name, exc)
                skipped += 1
                continue
            cat = categories.get(ann.get("category_id"))
            if cat is None:
                log.warning("%s: annotation %s has unknown category id %r; pathology unknown", json_path, ann.get("id"), ann.get("category_id"))
                name, supercategory = str(ann.get("category_id")), ""
            else:
                name, supercategory = str(cat.get("name", "")), str(cat.get("supercategory") or "")
            pathology = pathology_from_word(name)
            if pathology == "unknown" and supercategory:
                pathology = pathology_from_word(supercategory)
            kind = kind_from_word(name) if kind_from_word(name) != "other" else kind_from_word(supercategory)
            attributes = {"coco_annotation_id": ann.get("id"), "coco_category_id": ann.get("category_id"), **extra}
            if "bbox" in ann:
                attributes["coco_bbox"] = ann["bbox"]
            lesions.append(Lesion(pathology=pathology, kind=kind, source_label=name, attributes=attributes, **geometry))

        label = label_from_lesions(lesions) if lesions or not skipped else "unknown"
        patient_key = patient_field or ("patient_id" if "patient_id" in img else None)
        if patient_key and str(img.get(patient_key) or "").strip():
            patient_id, patient_from = str(img[patient_key]).strip(), f"image field {patient_key!r}"
        else:
            if patient_field:
                log.warning("%s: image %s has no %r; patient id = image stem", json_path, file_name, patient_field)
            patient_id, patient_from = Path(file_name).stem, "image stem"
        attributes = {"annotation_file": str(json_path), "coco_image_id": img["id"], "patient_id_from": patient_from}
        for key in ("width", "height"):
            if key in img:
                attributes[key] = img[key]
        if skipped:
            attributes["skipped_annotations"] = skipped
        cases.append(
            Case(case_id=unique_case_id(file_name, used_ids), patient_id=patient_id, dataset=dataset, modality=modality,
                 image_path=str(image_path), label=label, lesions=lesions, attributes=attributes)
        )
    if not cases:
        raise AnnotationError(json_path, f"no usable images (looked for them in {', '.join(map(str, image_dirs))})")
    return cases
