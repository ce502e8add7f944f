"""Users' own data: ``images/`` + ``masks/`` (+ optional ``labels.csv``).

Images are the files directly in ``images/`` that ``io.discover`` takes as images (plain suffixes,
and DICOM by content: ``IM0001``, UID names, files without preamble); everything else there is
logged as not used, with the reason. Masks are matched to images by stem: ``masks/<stem>.png``, ``<stem>_mask.png``, ``<stem>_<k>.png``,
``<stem>_mask_<k>.png`` (several lesions, one per file; the BUSI layout). With
``mask_mode=instances`` one file is a label mask and each distinct non-zero value is a lesion
(``attributes["label_value"]``, which ``rasterize_lesion`` honours). Masks are read once here, to
tell lesions from empty masks; their size is checked against the image when they are rasterised.

Image label, first that applies: ``labels.csv`` ``label``; benign/malignant from the lesions
(``pathology`` column or unknown); ``normal`` when the image has only empty masks (an explicit
negative annotation, as in BUSI's normal class); otherwise ``no_mask_means`` (default unknown:
a missing mask does not prove an image normal).

Modality, first that applies: ``labels.csv`` ``modality``; the ``modality`` option; a DICOM file's
header (``io.discover.breast_modality``: a CT or a chest X-ray is refused, a case whose
``attributes["refused"]`` holds the one-line error that ``prepare`` reports as its failure; it is
never prepared as a mammogram); MG for plain images. ``attributes["modality_from"]``
says which.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mammocad.datasets.common import check_options, image_label_from_word, inherit_pathology, parse_modality, pathology_from_word
from mammocad.datasets.rasterize import read_mask, read_mask_values
from mammocad.datasets.registry import register_adapter
from mammocad.errors import AnnotationError, ConfigError, DicomError, InputError, MammocadError
from mammocad.io.discover import NonBreastModalityError, breast_modality, find_images, image_stem
from mammocad.records import REFUSED
from mammocad.records import Case, Lesion, label_from_lesions

log = logging.getLogger(__name__)

MASK_SUFFIXES = {".png", ".pgm", ".tif", ".tiff", ".bmp"}  # lossless only: JPEG smears mask edges
CSV_COLUMNS = ("image", "label", "patient_id", "laterality", "view", "modality", "pathology")
_LATERALITY = {"l": "L", "left": "L", "r": "R", "right": "R"}
_MAX_NOT_USED_WARNINGS = 20  # one warning per path up to this many, then one line with the count


def _list_images(images_dir: Path) -> dict[str, Path]:
    if not images_dir.is_dir():
        raise InputError(images_dir, "folder not found (expected images/ with the image files)")
    walk = find_images(images_dir, recursive=False)
    for item in walk.not_used[:_MAX_NOT_USED_WARNINGS]:
        log.warning("%s: not used: %s", item.path, item.reason)
    if len(walk.not_used) > _MAX_NOT_USED_WARNINGS:
        log.warning("%s: %d more paths not used (not images, hidden, subfolders, ...)", images_dir,
                    len(walk.not_used) - _MAX_NOT_USED_WARNINGS)
    images: dict[str, Path] = {}
    for path in walk.files:
        stem = image_stem(path)
        if stem in images:
            raise InputError(images_dir, f"{images[stem].name} and {path.name} share the stem {stem!r}; masks are matched by stem")
        images[stem] = path
    if not images:
        raise InputError(images_dir, "empty folder: no images (PNG, PGM, JPEG, TIFF, BMP or DICOM files)")
    return images


def _mask_owner(stem: str, image_stems: dict[str, Path]) -> tuple[str, int] | None:
    """(image stem, lesion index) of a mask file stem; an exact image stem wins over a suffix reading,
    so that masks/a_1.png belongs to images/a_1.png when that image exists."""
    for candidate, index in ((stem, 0), (stem[:-5] if stem.endswith("_mask") else None, 0)):
        if candidate and candidate in image_stems:
            return candidate, index
    numbered = re.fullmatch(r"(.+)_(\d+)", stem)
    if numbered:
        base, index = numbered.group(1), int(numbered.group(2)) + 1
        for candidate in (base, base[:-5] if base.endswith("_mask") else None):
            if candidate and candidate in image_stems:
                return candidate, index
    return None


def _match_masks(masks_dir: Path, images: dict[str, Path]) -> dict[str, list[Path]]:
    matched: dict[str, list[tuple[int, str, Path]]] = {}
    if not masks_dir.is_dir():
        log.info("%s: no masks folder; labels come from labels.csv or no_mask_means", masks_dir)
        return {}
    for path in sorted(masks_dir.iterdir()):
        if not (path.is_file() and path.suffix.lower() in MASK_SUFFIXES):
            continue
        owner = _mask_owner(path.stem, images)
        if owner is None:
            log.warning("%s: matches no image stem in images/; ignored", path)
            continue
        matched.setdefault(owner[0], []).append((owner[1], path.name, path))
    return {stem: [p for _, _, p in sorted(found)] for stem, found in matched.items()}


def _read_labels(csv_path: Path, images: dict[str, Path]) -> dict[str, dict[str, str]]:
    """labels.csv rows by image stem; column names are matched case-insensitively."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = {str(c).strip().lower(): c for c in (reader.fieldnames or []) if c is not None}
            if "image" not in columns:
                raise AnnotationError(csv_path, f"missing required column 'image' (columns: {', '.join(columns) or 'none'})")
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise AnnotationError(csv_path, f"not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise AnnotationError(csv_path, f"malformed CSV ({exc})") from None
    except OSError as exc:  # permission denied, a folder named labels.csv, an I/O error
        raise InputError(csv_path, f"cannot read ({exc.strerror or exc})") from None
    by_stem: dict[str, dict[str, str]] = {}
    for line, row in enumerate(rows, start=2):
        values = {key: (row.get(columns[key]) or "").strip() for key in CSV_COLUMNS if key in columns}
        name = values["image"]
        stem = name if name in images else Path(name).stem
        if stem not in images or (name != stem and images[stem].name != Path(name).name):
            log.warning("%s line %d: image %r is not in images/; row ignored", csv_path, line, name)
            continue
        if stem in by_stem:
            log.warning("%s line %d: second row for image %r; ignored", csv_path, line, name)
            continue
        by_stem[stem] = values
    return by_stem


def _lesions_from_masks(mask_paths: list[Path], instances: bool) -> tuple[list[Lesion], int]:
    """(lesions, number of empty mask files). Masks are judged on their stored values (a DICOM
    mask is not windowed or inverted), as ``rasterize_lesion`` draws them."""
    lesions, empty = [], 0
    for path in mask_paths:
        if not instances:
            if read_mask(path).any():
                lesions.append(Lesion(mask_path=str(path), attributes={"mask_file": path.name}))
            else:
                empty += 1
            continue
        values = np.unique(read_mask_values(path))
        values = values[values > 0]  # the pixels read_mask counts as lesion
        if values.size == 0:
            empty += 1
        for value in values.tolist():
            lesions.append(Lesion(mask_path=str(path), attributes={"label_value": value, "mask_file": path.name}))
    return lesions, empty


def _try_lesions(mask_paths: list[Path], instances: bool) -> Callable[[], tuple[list[Lesion], int]]:
    """``_lesions_from_masks`` run now, its result (or its error) handed back when called."""
    try:
        result = _lesions_from_masks(mask_paths, instances)
    except MammocadError as exc:
        err = exc

        def fail() -> tuple[list[Lesion], int]:
            raise err

        return fail
    return lambda: result


def _option_choice(options: dict[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = str(options.get(key) or default).strip().lower()
    if value not in allowed:
        raise ConfigError(f"folder option {key}", f"must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _header_modality(path: Path) -> tuple[str | None, str]:
    """(MG | US, where it came from) of an image without a modality option: its DICOM header, or
    MG for a plain image. A DICOM image of another modality gives (None, the one-line error that
    refuses it)."""
    try:
        modality = breast_modality(path)
    except NonBreastModalityError as err:
        return None, str(err)
    except DicomError:  # an unreadable header: preparing the image reports it, with the reader's words
        return "MG", "default"
    return (modality, "DICOM header") if modality else ("MG", "default (plain image)")


@register_adapter("folder")
def read_folder(raw_dir: Path, **options: Any) -> list[Case]:
    """Cases from ``raw_dir/images`` + ``raw_dir/masks`` (+ ``raw_dir/labels.csv``). Options
    (strings): modality (MG|US: every image is taken as this; default: a DICOM file's header, MG for
    plain images), mask_mode (binary|instances, default binary),
    no_mask_means (unknown|normal, default unknown), labels (CSV file name, default labels.csv),
    dataset (default 'folder')."""
    check_options("folder", options, ("modality", "mask_mode", "no_mask_means", "labels", "dataset"))
    raw_dir = Path(raw_dir).absolute()
    forced = parse_modality(options["modality"], "folder") if options.get("modality") else None
    instances = _option_choice(options, "mask_mode", ("binary", "instances"), "binary") == "instances"
    no_mask_label = _option_choice(options, "no_mask_means", ("unknown", "normal"), "unknown")
    dataset = options.get("dataset") or "folder"

    images = _list_images(raw_dir / "images")
    masks = _match_masks(raw_dir / "masks", images)
    csv_path = raw_dir / (options.get("labels") or "labels.csv")
    if options.get("labels") and not csv_path.is_file():
        raise InputError(csv_path, "labels CSV not found")
    labels = _read_labels(csv_path, images) if csv_path.is_file() else {}

    # Mask files are decoded here to tell lesions from empty (normal) masks: full-field masks take
    # ~0.1 s each, so decode them on threads (OpenCV and zlib release the GIL) rather than one by one.
    # DICOM headers are read here (for the modality) on the same threads.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        found = dict(zip(images, pool.map(lambda stem: _try_lesions(masks.get(stem, []), instances), images)))
        header = {} if forced else dict(zip(images, pool.map(_header_modality, images.values())))

    cases = []
    for stem, image_path in images.items():
        row = labels.get(stem, {})
        try:
            lesions, empty = found[stem]()
        except MammocadError as exc:
            log.warning("%s: image skipped, its mask is unreadable: %s", image_path, exc)
            continue
        where = f"{csv_path.name} row for {image_path.name}"
        if row.get("pathology"):
            pathology = pathology_from_word(row["pathology"])
            for les in lesions:
                les.pathology, les.source_label = pathology, row["pathology"]
        label = label_from_lesions(lesions) if lesions else ("normal" if empty else no_mask_label)
        label_from = "masks" if lesions or empty else f"no_mask_means={no_mask_label}"
        if row.get("label"):
            csv_label = image_label_from_word(row["label"]) or ("unknown" if row["label"].lower() == "unknown" else None)
            if csv_label is None:
                log.warning("%s: label %r is not normal/benign/malignant/unknown; ignored", where, row["label"])
            elif csv_label == "normal" and lesions:
                log.warning("%s: label 'normal' but %d lesion mask(s); label taken from the masks", where, len(lesions))
            else:
                inherit_pathology(lesions, csv_label)
                label, label_from = csv_label, csv_path.name
        laterality = _LATERALITY.get(row.get("laterality", "").lower()) if row.get("laterality") else None
        if row.get("laterality") and laterality is None:
            log.warning("%s: laterality %r is not L/R; ignored", where, row["laterality"])
        case_modality, modality_from = (forced, "modality option") if forced else header[stem]
        if row.get("modality"):
            try:
                case_modality, modality_from = parse_modality(row["modality"], where), csv_path.name
            except ConfigError as exc:
                log.warning("%s; ignored", exc)
        attributes: dict[str, Any] = {"label_from": label_from, "modality_from": modality_from,
                                      "patient_id_from": "labels.csv" if row.get("patient_id") else "image stem"}
        if case_modality is None:  # a CT, a chest X-ray: never prepared as a mammogram
            # kept as a case that ``prepare`` fails with this line (failed.jsonl, exit status 1), as
            # ``predict`` does: a refused image must be counted, not only logged
            attributes[REFUSED] = (f"{modality_from}; set its modality in labels.csv or with --modality "
                                   "to use it anyway")
            case_modality = "MG"  # a Case needs one; the refusal stops it before any preprocessing
        if empty:
            attributes["empty_masks"] = empty
        cases.append(
            Case(case_id=stem, patient_id=row.get("patient_id") or stem, dataset=dataset, modality=case_modality,
                 image_path=str(image_path), laterality=laterality, view=(row.get("view") or "").upper() or None,
                 label=label, lesions=lesions, attributes=attributes)
        )
    if not cases:
        raise InputError(raw_dir / "images", "no usable images (every image was skipped, see the warnings)")
    return cases
