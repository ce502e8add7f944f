"""VGG Image Annotator (VIA) annotations: VIA 1.x ``via_region_data.json``, VIA 2.x project files
(``_via_img_metadata``) and VIA 2.x JSON exports.

VIA stores region coordinates in the image's pixel units with the origin at the top-left corner of
the image (the canvas position divided by the display scale), so they are read as our continuous
pixel-edge coordinates unchanged. Shapes become: polygon -> ``polygon``, circle -> ``circle``,
rect -> ``box``, ellipse -> ``polygon`` (sampled densely enough that no vertex chord strays more
than ~0.25 px from the true ellipse); point and polyline have no area and are skipped.

The helpers the adapters share (option parsing, the benign/malignant word mapping) live in
``mammocad.datasets.common``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from mammocad.datasets.common import (
    ALLOW_OUTSIDE_ROOT,
    bool_option,
    check_options,
    find_json,
    image_label_from_word,
    inherit_pathology,
    kind_from_word,
    load_json,
    parse_modality,
    path_in_root,
    pathology_from_word,
    resolve_dir,
    unique_case_id,
)
from mammocad.datasets.registry import register_adapter
from mammocad.errors import AnnotationError
from mammocad.records import Case, Lesion, label_from_lesions

log = logging.getLogger(__name__)

DEFAULT_CLASS_ATTRIBUTES = ("class", "label", "type", "pathology", "name", "category", "diagnosis")


# --- VIA ---------------------------------------------------------------------------------------


def ellipse_polygon(cx: float, cy: float, rx: float, ry: float, theta: float = 0.0) -> list[tuple[float, float]]:
    """Vertices of an ellipse rotated by ``theta`` radians, as VIA draws it (HTML canvas
    ``ellipse()``: positive theta turns the x axis towards +y, clockwise on screen). The vertex
    count keeps the chord sagitta r * (1 - cos(pi / n)) under 0.25 px, and is at least 64."""
    r = max(abs(rx), abs(ry))
    n = max(64, math.ceil(math.pi * math.sqrt(2.0 * r / 0.25)))
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    points = []
    for k in range(n):
        a = 2.0 * math.pi * k / n
        x, y = rx * math.cos(a), ry * math.sin(a)
        points.append((cx + x * cos_t - y * sin_t, cy + x * sin_t + y * cos_t))
    return points


def _lesion_geometry(shape: dict[str, Any]) -> dict[str, Any]:
    """Lesion keyword arguments for one VIA shape; ValueError says why a shape cannot be used."""
    name = str(shape.get("name", "")).lower()
    if name == "polygon":
        xs, ys = shape.get("all_points_x") or [], shape.get("all_points_y") or []
        if len(xs) != len(ys):
            raise ValueError(f"polygon has {len(xs)} x and {len(ys)} y coordinates")
        if len(xs) < 3:
            raise ValueError(f"polygon with {len(xs)} point(s)")
        return {"polygon": [(float(x), float(y)) for x, y in zip(xs, ys)]}
    if name == "rect":
        x, y, w, h = (float(shape[k]) for k in ("x", "y", "width", "height"))
        x0, x1, y0, y1 = min(x, x + w), max(x, x + w), min(y, y + h), max(y, y + h)
        if x1 <= x0 or y1 <= y0:
            raise ValueError("rect with zero area")
        return {"box": (x0, y0, x1, y1)}
    if name == "circle":
        cx, cy, r = (float(shape[k]) for k in ("cx", "cy", "r"))
        if r <= 0:
            raise ValueError("circle with zero radius")
        return {"circle": (cx, cy, abs(r))}
    if name == "ellipse":
        cx, cy, rx, ry = (float(shape[k]) for k in ("cx", "cy", "rx", "ry"))
        if rx == 0 or ry == 0:
            raise ValueError("ellipse with a zero radius")
        return {"polygon": ellipse_polygon(cx, cy, rx, ry, float(shape.get("theta") or 0.0))}
    raise ValueError(f"shape {name or '(none)'!r} has no area (only polygon, rect, circle, ellipse are lesions)")


def _attribute_word(value: Any) -> str:
    """VIA attribute values: text/dropdown/radio -> str; checkbox -> {option: true}."""
    if isinstance(value, dict):
        return " ".join(str(k) for k, v in value.items() if v)
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return "" if value is None else str(value).strip()


def _pick_attribute(attributes: dict[str, Any], wanted: str | None) -> tuple[str, str] | None:
    """(key, word) of the class attribute: the one named, else the first common name present."""
    if not isinstance(attributes, dict):
        return None
    lowered = {str(k).lower(): k for k in attributes}
    for name in (wanted,) if wanted else DEFAULT_CLASS_ATTRIBUTES:
        key = lowered.get(name.lower())
        if key is not None and _attribute_word(attributes[key]):
            return str(key), _attribute_word(attributes[key])
    return None


def _entries(data: Any, path: Path) -> list[dict[str, Any]]:
    """The per-image records of any VIA 1.x / 2.x file."""
    if not isinstance(data, dict):
        raise AnnotationError(path, f"expected a JSON object of images, got {type(data).__name__}")
    if "_via_img_metadata" in data:  # VIA 2 project file
        data = data["_via_img_metadata"]
    elif "_via_data_format_version" in data or ("project" in data and "metadata" in data and "file" in data):
        raise AnnotationError(path, "VIA 3 project files are not supported; export the annotations from VIA 2 as JSON")
    if not isinstance(data, dict):
        raise AnnotationError(path, "'_via_img_metadata' is not a JSON object")
    entries = []
    for key, entry in data.items():
        if not isinstance(entry, dict) or "filename" not in entry:
            raise AnnotationError(path, f"entry {key!r} is not a VIA image record (no 'filename')")
        entries.append(entry)
    return entries


def _regions(entry: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    regions = entry.get("regions") or []
    if isinstance(regions, dict):  # VIA 1.x: {"0": {...}, "1": {...}}
        regions = [regions[k] for k in sorted(regions, key=lambda k: int(k) if str(k).isdigit() else str(k))]
    if not isinstance(regions, list):
        raise AnnotationError(path, f"{entry['filename']}: 'regions' is neither a list nor an object")
    return regions


@register_adapter("via")
def read_via(raw_dir: Path, **options: Any) -> list[Case]:
    """Cases from a VIA JSON. Options (strings): json, image_dir, modality (US|MG, default US),
    class_attribute (region attribute holding benign/malignant), label_attribute (file attribute
    holding normal/benign/malignant), patient_attribute (file attribute holding the patient id),
    dataset (name written into the cases, default 'via'), allow_outside_root (read a ``filename``
    that leads outside the image folder: absolute or ``..``; refused by default)."""
    check_options("via", options, ("json", "image_dir", "modality", "class_attribute", "label_attribute", "patient_attribute", "dataset"))
    raw_dir = Path(raw_dir)
    json_path = find_json(raw_dir, options.get("json"))
    image_dir = resolve_dir(options.get("image_dir"), json_path.parent, json_path.parent.absolute())
    modality = parse_modality(options.get("modality", "US"), "via")
    class_attr = options.get("class_attribute") or None
    label_attr = options.get("label_attribute") or None
    patient_attr = options.get("patient_attribute") or None
    dataset = options.get("dataset") or "via"
    allow_outside = bool_option(options, ALLOW_OUTSIDE_ROOT)

    cases: list[Case] = []
    used_ids: set[str] = set()
    seen_files: set[str] = set()
    for entry in _entries(load_json(json_path), json_path):
        filename = str(entry["filename"])
        if filename in seen_files:
            log.warning("%s: %s is listed twice; the second record is skipped", json_path, filename)
            continue
        seen_files.add(filename)
        image_path = path_in_root(filename, image_dir, json_path, allow_outside)
        if not image_path.is_file():
            log.warning("%s: image %s not found; skipped", json_path, image_path)
            continue
        case_id = unique_case_id(filename, used_ids)
        lesions = []
        for index, region in enumerate(_regions(entry, json_path)):
            if not isinstance(region, dict):
                log.warning("%s: %s region %d is not an object; skipped", json_path, filename, index)
                continue
            try:
                geometry = _lesion_geometry(region.get("shape_attributes") or {})
            except (KeyError, TypeError, ValueError) as exc:
                reason = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
                log.warning("%s: %s region %d skipped: %s", json_path, filename, index, reason)
                continue
            picked = _pick_attribute(region.get("region_attributes") or {}, class_attr)
            word = picked[1] if picked else ""
            shape_name = str(region["shape_attributes"].get("name", "")).lower()
            attributes: dict[str, Any] = {"via_shape": shape_name, "region_index": index}
            if shape_name == "ellipse":
                attributes["via_ellipse"] = {k: region["shape_attributes"].get(k) for k in ("cx", "cy", "rx", "ry", "theta")}
            if region.get("region_attributes"):
                attributes["region_attributes"] = region["region_attributes"]
            lesions.append(Lesion(pathology=pathology_from_word(word), kind=kind_from_word(word), source_label=word, attributes=attributes, **geometry))

        file_attrs = entry.get("file_attributes") or {}
        label = label_from_lesions(lesions)
        case_attrs: dict[str, Any] = {"annotation_file": str(json_path)}
        picked = _pick_attribute(file_attrs, label_attr)
        if picked is not None and image_label_from_word(picked[1]) is not None:
            file_label = image_label_from_word(picked[1])
            case_attrs["source_label"] = picked[1]
            if file_label == "normal" and lesions:
                log.warning("%s: %s is labelled %r but has %d region(s); label taken from the regions", json_path, filename, picked[1], len(lesions))
            else:
                inherit_pathology(lesions, file_label)
                label = file_label
        patient_id, patient_from = Path(filename).stem, "image stem"
        if patient_attr:
            value = _attribute_word(file_attrs.get(patient_attr)) if isinstance(file_attrs, dict) else ""
            if value:
                patient_id, patient_from = value, f"file attribute {patient_attr!r}"
            else:
                log.warning("%s: %s has no file attribute %r; patient id = image stem", json_path, filename, patient_attr)
        case_attrs["patient_id_from"] = patient_from
        if file_attrs:
            case_attrs["file_attributes"] = file_attrs
        cases.append(
            Case(case_id=case_id, patient_id=patient_id, dataset=dataset, modality=modality, image_path=str(image_path),
                 label=label, lesions=lesions, attributes=case_attrs)
        )
    if not cases:
        why = f"none of its images is in {image_dir}" if seen_files else "lists no images"
        raise AnnotationError(json_path, f"no usable images: {why}")
    return cases
