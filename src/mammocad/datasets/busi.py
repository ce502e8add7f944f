"""BUSI (Breast Ultrasound Images, Al-Dhabyani et al. 2020) adapter, original ``Dataset_BUSI_with_GT``
layout::

    <raw_dir>/[Dataset_BUSI_with_GT/]benign/benign (k).png
                                           benign (k)_mask.png, benign (k)_mask_1.png, ...
                                    malignant/..., normal/...

Each mask file is one lesion. Normal images come with all-zero masks, so masks are read to tell an
outline from an empty placeholder (they are small). BUSI has no patient ids: every image is its own
patient (``attributes["patient_id_source"] = "image"``). The full dataset contains near-duplicate
images of the same patient, so a patient-grouped split cannot be guaranteed from the ids alone; the
audit's perceptual-hash check (datasets/splits.py) is the guard against leakage between splits.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mammocad.datasets.common import check_options
from mammocad.datasets.rasterize import read_mask
from mammocad.datasets.registry import register_adapter
from mammocad.errors import InputError, MammocadError
from mammocad.records import Case, Lesion

log = logging.getLogger(__name__)

CLASSES = ("benign", "malignant", "normal")
WRAPPER_FOLDER = "dataset_busi_with_gt"  # the folder name of the Kaggle/Mendeley download
# "benign (12).png", "benign (12)_mask.png", "benign (12)_mask_1.png"
_FILE = re.compile(r"^(?P<cls>[a-z]+)\s*\((?P<k>\d+)\)(?P<mask>_mask(?:_(?P<idx>\d+))?)?\.png$", re.IGNORECASE)


def _child_dir(parent: Path, name_lower: str) -> Path | None:
    """The sub-folder of ``parent`` whose name equals ``name_lower`` ignoring case."""
    for p in sorted(parent.iterdir()):
        if p.is_dir() and p.name.lower() == name_lower:
            return p
    return None


def find_class_dirs(raw_dir: Path) -> dict[str, Path]:
    """{class: folder} in raw_dir or in its ``Dataset_BUSI_with_GT`` sub-folder (case-insensitive)."""
    if not raw_dir.is_dir():
        raise InputError(raw_dir, "folder not found")
    for root in (raw_dir, _child_dir(raw_dir, WRAPPER_FOLDER)):
        if root is None:
            continue
        found = {c: d for c in CLASSES if (d := _child_dir(root, c)) is not None}
        if found:
            return found
    raise InputError(raw_dir, f"no BUSI class folders ({', '.join(CLASSES)}) here or in Dataset_BUSI_with_GT/")


def _scan_class_dir(folder: Path, cls: str) -> tuple[dict[int, Path], dict[int, list[tuple[int, Path]]]]:
    """Images and masks of one class folder, keyed by the image number k."""
    images: dict[int, Path] = {}
    masks: dict[int, list[tuple[int, Path]]] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        m = _FILE.match(p.name)
        if m is None or m.group("cls").lower() != cls:
            log.warning("%s: not a BUSI file name ('%s (k).png' or '%s (k)_mask[_i].png'); ignored", p, cls, cls)
            continue
        k = int(m.group("k"))
        if m.group("mask"):
            masks.setdefault(k, []).append((int(m.group("idx") or 0), p))
        else:
            images[k] = p
    return images, masks


def _mask_is_empty(path: Path) -> bool:
    return not bool(read_mask(path).any())


def _case(cls: str, k: int, image: Path, mask_files: list[tuple[int, Path]]) -> Case | None:
    pathology = "unknown" if cls == "normal" else cls
    lesions: list[Lesion] = []
    for idx, mask in sorted(mask_files):
        try:
            empty = _mask_is_empty(mask)
        except MammocadError as exc:
            log.warning("%s; image %s skipped", exc, image)
            return None
        if empty:
            continue  # normal images ship all-zero masks: no lesion
        if cls == "normal":
            log.warning("%s: non-empty mask for a normal image; ignored", mask)
            continue
        lesions.append(Lesion(pathology=pathology, kind="mass", source_label=cls, mask_path=str(mask), attributes={"mask_index": idx}))
    if cls != "normal" and not lesions:
        # Keep the finding without an outline rather than turning a benign/malignant image into a
        # lesion-free one (which segmentation training would read as "nothing here").
        log.warning("%s: %s image without a non-empty mask; lesion kept without outline", image, cls)
        lesions.append(Lesion(pathology=pathology, kind="mass", source_label=cls, attributes={"mask_index": None}))
    return Case(
        case_id=f"{cls}_{k}",
        patient_id=f"busi_{cls}_{k}",
        dataset="busi",
        modality="US",
        image_path=str(image),
        label=cls,
        lesions=lesions,
        attributes={"patient_id_source": "image", "busi_class": cls, "busi_id": k},
    )


@register_adapter("busi")
def read_busi(raw_dir: Path, **options: str) -> list[Case]:
    """Cases of a BUSI folder (class folders matched case-insensitively), ordered by class then k."""
    check_options("busi", options, ())
    raw_dir = Path(raw_dir)
    cases: list[Case] = []
    for cls, folder in find_class_dirs(raw_dir).items():
        images, masks = _scan_class_dir(folder, cls)
        for k in sorted(set(masks) - set(images)):
            log.warning("%s: mask without its image '%s (%d).png'; skipped", masks[k][0][1], cls, k)
        for k in sorted(images):
            case = _case(cls, k, images[k], masks.get(k, []))
            if case is not None:
                cases.append(case)
    if not cases:
        raise InputError(raw_dir, "no BUSI images ('<class> (k).png') in the class folders")
    return cases
