"""What training and evaluation share about a prepared dataset: the label map of a case
(``build_target``), the value that marks unscored pixels (``IGNORE_INDEX``) and the case ids of a
split (``split_case_ids``). It lives in the data layer so that sampling, training and evaluation all
import it from below instead of from each other."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mammocad.datasets.splits import SPLIT_NAMES
from mammocad.errors import ConfigError, InputError

if TYPE_CHECKING:
    from mammocad.datasets.prepared import PreparedDataset

log = logging.getLogger(__name__)

IGNORE_INDEX = 255  # target value of pixels no loss or metric scores (unknown pathology, padding)
# label value of a lesion per pathology; "unknown" is resolved by load_samples' ``unknown`` option
PATHOLOGY_LABELS = {2: {"benign": 1, "malignant": 1}, 3: {"benign": 1, "malignant": 2}}
UNKNOWN_CHOICES = {2: {"lesion": 1, "ignore": IGNORE_INDEX, "background": 0},
                   3: {"ignore": IGNORE_INDEX, "background": 0, "benign": 1, "malignant": 2}}
DEFAULT_UNKNOWN = {2: "lesion", 3: "ignore"}
# Classes of a classifier per ``classify.target`` (training config and model card): benign vs malignant
# lesion patches; lesion-free tissue + kind x pathology (every kind but calcification counts as a mass:
# distortions and asymmetries are soft-tissue findings, read like masses); whole-image labels.
CLASSIFY_CLASSES = {
    "pathology": ("benign", "malignant"),
    "kind_pathology": ("background", "calcification-benign", "mass-benign", "calcification-malignant",
                       "mass-malignant"),
    "image": ("normal", "benign", "malignant"),
}


def split_case_ids(prepared: "PreparedDataset", fold: int = 0, split: str = "train",
                      splits_path: str | Path | None = None) -> list[str]:
    """Case ids of ``split`` in ``fold`` of the splits file; refuses a file that puts a case in two splits."""
    from mammocad.datasets.prepared import SPLITS_FILE

    source = splits_path if splits_path is not None else prepared.root / SPLITS_FILE
    data = prepared.load_splits(splits_path)
    if split not in SPLIT_NAMES:
        raise ConfigError("split", f"unknown split {split!r}: expected one of {', '.join(SPLIT_NAMES)}")
    if not 0 <= fold < len(data["folds"]):
        raise ConfigError("fold", f"fold {fold} does not exist: {source} has {len(data['folds'])} fold(s)")
    parts = {name: [str(c) for c in data["folds"][fold][name]] for name in SPLIT_NAMES}
    for i, a in enumerate(SPLIT_NAMES):
        for b in SPLIT_NAMES[i + 1:]:
            both = sorted(set(parts[a]) & set(parts[b]))
            if both:
                raise ConfigError(source, f"fold {fold}: {len(both)} case(s) in both {a} and {b} (e.g. {both[0]!r}); "
                                          "re-run `mammocad split`")
    known = {pc.case_id: pc for pc in prepared.cases}
    missing = [c for c in parts[split] if c not in known]
    if missing:
        raise InputError(source, f"fold {fold} {split}: {len(missing)} case id(s) not in the prepared dataset "
                                 f"(e.g. {missing[0]!r}); the splits belong to another dataset")
    mine = {known[c].patient_id for c in parts[split]}
    others = {known[c].patient_id for name in SPLIT_NAMES if name != split for c in parts[name] if c in known}
    if mine & others:  # only official splits made with --keep-crossing have such patients
        log.warning("%s: fold %d: %d patient(s) of %s also appear in other splits", source, fold,
                    len(mine & others), split)
    return list(dict.fromkeys(parts[split]))


def build_target(shape: tuple[int, int], union: np.ndarray | None, lesion_masks: list[np.ndarray | None],
                 pathologies: list[str], num_classes: int = 2, unknown: str | None = None) -> np.ndarray:
    """uint8 label map from per-lesion masks. Unknown-pathology lesions (and union pixels no lesion
    mask covers) take the ``unknown`` value; known pathologies are painted after them, malignant last,
    so a pixel that is certainly lesion never ends up ignored or benign when a malignant lesion covers it."""
    if num_classes not in PATHOLOGY_LABELS:
        raise ConfigError("num_classes", f"must be 2 (background/lesion) or 3 (background/benign/malignant), got {num_classes}")
    unknown = DEFAULT_UNKNOWN[num_classes] if unknown is None else unknown
    if unknown not in UNKNOWN_CHOICES[num_classes]:
        raise ConfigError("unknown", f"{unknown!r} is not a choice for {num_classes} classes: "
                                     f"{', '.join(UNKNOWN_CHOICES[num_classes])}")
    target = np.zeros(shape, dtype=np.uint8)
    if union is not None:
        target[union] = UNKNOWN_CHOICES[num_classes][unknown]
    value = {**PATHOLOGY_LABELS[num_classes], "unknown": UNKNOWN_CHOICES[num_classes][unknown]}
    order = sorted((i for i, m in enumerate(lesion_masks) if m is not None),
                   key=lambda i: ("unknown", "benign", "malignant").index(pathologies[i]))
    for i in order:
        target[lesion_masks[i]] = value[pathologies[i]]
    return target
