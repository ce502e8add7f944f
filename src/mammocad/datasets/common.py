"""Helpers the dataset adapters share, so that every adapter parses options and reads
benign/malignant/normal words the same way: option checking, class-word mapping, JSON reading,
folder options, unique case ids, and the check that paths written in annotation files stay inside
the dataset."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from mammocad.errors import AnnotationError, ConfigError, InputError
from mammocad.records import MODALITIES, Lesion

_BENIGN_WORDS = {"benign", "b"}
_MALIGNANT_WORDS = {"malignant", "malignancy", "m"}
_NEGATIONS = {"no", "not", "non"}
_KIND_WORDS = {
    "mass": "mass",
    "calcification": "calcification",
    "calcifications": "calcification",
    "calc": "calcification",
    "distortion": "distortion",
    "asymmetry": "asymmetry",
}


# The option every adapter accepts (``prepare --allow-outside-root`` sets it for any dataset): read
# paths written in annotation files even when they lead outside the dataset's folder. Adapters whose
# annotations name no paths (MIAS, BUSI, folder) have nothing to check and ignore it.
ALLOW_OUTSIDE_ROOT = "allow_outside_root"
_TRUE_WORDS, _FALSE_WORDS = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


def check_options(adapter: str, options: dict[str, Any], allowed: Iterable[str]) -> None:
    """Options come from ``-o key=value`` on the command line: refuse typos instead of ignoring them.
    ``allow_outside_root`` is accepted by every adapter (and its value checked)."""
    if ALLOW_OUTSIDE_ROOT in options:
        bool_option(options, ALLOW_OUTSIDE_ROOT)
    allowed = sorted(set(allowed))
    unknown = sorted(set(options) - set(allowed) - {ALLOW_OUTSIDE_ROOT})
    if unknown:
        known = f"known: {', '.join(allowed)}" if allowed else f"the {adapter} adapter takes no options"
        raise ConfigError(adapter, f"unknown option(s) {', '.join(unknown)}; {known}")


def bool_option(options: dict[str, Any], key: str, default: bool = False) -> bool:
    """A yes/no option: a bool, or the strings ``-o key=value`` gives (true/1/yes/on, false/0/no/off)."""
    value = options.get(key, default)
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE_WORDS or word in _FALSE_WORDS:
        return word in _TRUE_WORDS
    raise ConfigError(key, f"must be true or false (also 1/0, yes/no), got {value!r}")


def leads_outside(written: str | Path, root: Path) -> bool:
    """Whether ``root / written`` lies outside ``root``, by the written path alone (``..`` and
    absolute paths resolved lexically; the disk is not consulted)."""
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.abspath(root / written))
    try:
        return os.path.commonpath([base, target]) != base
    except ValueError:  # another drive (Windows)
        return True


def path_in_root(written: str | Path, root: Path, annotation_file: str | Path, allow_outside_root: bool) -> Path:
    """``root / written`` for a path an annotation file names (an absolute one stays as it is).

    A path that leads outside ``root`` (absolute elsewhere, or climbing out with ``..``) is refused
    with an AnnotationError naming the annotation file and the path, unless ``allow_outside_root``:
    a shared or downloaded annotation file must not make us read (and copy into a prepared dataset
    or a report) files the user never pointed us at. The test is on the written path, not on the
    disk (symlinks inside the dataset are the user's own choice and are followed).
    """
    path = root / written  # an absolute ``written`` replaces root
    if not allow_outside_root and leads_outside(written, root):
        raise AnnotationError(annotation_file, f"path {str(written)!r} leads outside {root}; refused "
                                               f"(use --allow-outside-root, or -o {ALLOW_OUTSIDE_ROOT}=true, to read it)")
    return path


def parse_modality(value: Any, source: str) -> str:
    modality = str(value).strip().upper()
    if modality not in MODALITIES:
        raise ConfigError(source, f"modality must be one of {', '.join(MODALITIES)}, got {value!r}")
    return modality


def _tokens(word: str) -> list[str]:
    return [t for t in re.split(r"[^a-z]+", word.lower()) if t]


def pathology_from_word(word: Any) -> str:
    """'benign' / 'malignant' from a dataset's class word (case-insensitive, also 'B' / 'M' and
    words like 'BENIGN_WITHOUT_CALLBACK' or 'malignant mass'); 'unknown' for anything else,
    including negated ('non-malignant') or contradictory words."""
    tokens = _tokens(str(word))
    if _NEGATIONS & set(tokens):
        return "unknown"
    benign = bool(_BENIGN_WORDS & set(tokens)) or any(t.startswith("benign") for t in tokens)
    malignant = bool(_MALIGNANT_WORDS & set(tokens)) or any(t.startswith("malignan") for t in tokens)
    if benign != malignant:
        return "benign" if benign else "malignant"
    return "unknown"


def image_label_from_word(word: Any) -> str | None:
    """normal / benign / malignant from an image-level word; None when the word says none of them."""
    if "normal" in _tokens(str(word)):
        return "normal"
    pathology = pathology_from_word(word)
    return None if pathology == "unknown" else pathology


def kind_from_word(word: Any) -> str:
    for token in _tokens(str(word)):
        if token in _KIND_WORDS:
            return _KIND_WORDS[token]
    return "other"


def inherit_pathology(lesions: list[Lesion], image_label: str) -> None:
    """Give lesions of unknown pathology the one the image label implies: every lesion of a benign
    image is benign (that is what 'benign image' means); the single lesion of a malignant image is
    malignant. With several lesions on a malignant image the unknown ones stay unknown."""
    unknown = [les for les in lesions if les.pathology == "unknown"]
    if not unknown:
        return
    if image_label == "benign" or (image_label == "malignant" and len(lesions) == 1):
        for les in unknown:
            les.pathology = image_label
            les.attributes["pathology_from"] = "image label"


def unique_case_id(name: str, used: set[str]) -> str:
    """The file's stem, or its relative path when two files share a stem."""
    stem = Path(name).stem
    case_id = stem if stem not in used else re.sub(r"[\\/]+", "__", name)
    used.add(case_id)
    return case_id


def find_json(raw_dir: Path, name: str | None, subfolders: tuple[str, ...] = ()) -> Path:
    """The annotation JSON: ``name`` (relative to raw_dir or absolute), raw_dir itself when it is a
    file, else the single *.json in raw_dir (or in one of ``subfolders``)."""
    if name:
        path = Path(name) if Path(name).is_absolute() else raw_dir / name
        if not path.is_file():
            raise InputError(path, "annotation JSON not found")
        return path
    if raw_dir.is_file():
        return raw_dir
    if not raw_dir.is_dir():
        raise InputError(raw_dir, "folder not found")
    for folder in (raw_dir, *(raw_dir / s for s in subfolders)):
        found = sorted(p for p in folder.glob("*.json") if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise InputError(folder, f"several JSON files ({names}); choose one with -o json=FILE")
    raise InputError(raw_dir, "no *.json annotation file found; pass -o json=FILE")


def resolve_dir(value: str | None, base: Path, default: Path) -> Path:
    """A folder option: absolute, or relative to the working directory, or relative to ``base``."""
    if not value:
        return default
    path = Path(value)
    if not path.is_absolute() and not path.is_dir() and (base / path).is_dir():
        path = base / path
    if not path.is_dir():
        raise InputError(path, "folder not found")
    return path.absolute()


def load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise AnnotationError(path, f"malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise AnnotationError(path, f"not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror})") from None
