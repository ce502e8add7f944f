"""BUS-BRA (Gomez-Flores et al., Medical Physics 2024) adapter, layout as released::

    <raw_dir>/[BUSBRA/]bus_data.csv       ID, Case, Histology, Pathology, BIRADS, Device, Width, Height, Side, BBOX
                       5-fold-cv.csv      ID, Pathology, kFold, valid_1 .. valid_5
                       10-fold-cv.csv     ID, Pathology, kFold, valid_1 .. valid_10
                       Images/bus_0001-l.png
                       Masks/mask_0001-l.png

One Case per image and one biopsy-proven lesion (its mask) per image; no normal images. The patient
is the ``Case`` column (``patient_id = busbra_p0001``), so a patient split keeps the two views of a
lesion together. Suffix ``-l``/``-r`` and ``Side`` left/right do NOT name the breast: they are the
two halves of a dual-view screen capture (those images are about half as wide as the ``-s``
"single" ones on every scanner), so ``laterality`` stays None and ``Side`` is kept as
``attributes["screen_side"]``, the other half as ``attributes["paired_case_id"]``.

The authors' patient-grouped folds are read into ``attributes["cv5_fold"]`` / ``["cv10_fold"]``
(``kFold``: the fold in which the image is TEST); ``splits.make_splits(official_folds="cv5")`` turns
them into splits.json. Their ``valid_k`` columns (training vs validation images of round k) are
not kept: they split a patient's two views between the two (over 130 patients in every round of
the development copy), which is the leak the patient split exists to prevent.

``BBOX`` is written the MATLAB way: 1-based first column and row, then last minus first, i.e. the
0-based exclusive box ``[x - 1, y - 1, x + w, y + h]``; it is kept raw (``Lesion.attributes
["bbox_csv"]``) since the mask is the outline (on one row, bus_0845-s, the two disagree). ``Width``/``Height`` are checked against the image
header (two rows of the release disagree with their image; the image wins).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mammocad.datasets.common import check_options, pathology_from_word
from mammocad.datasets.registry import register_adapter
from mammocad.errors import AnnotationError, InputError
from mammocad.records import Case, Lesion

log = logging.getLogger(__name__)

DATASET = "busbra"
DATA_CSV = "bus_data.csv"
WRAPPER_FOLDER = "busbra"  # the folder of the Zenodo/GitHub copies
# official fold scheme -> file; the case attribute is f"{scheme}_fold"
FOLD_FILES = {"cv5": "5-fold-cv.csv", "cv10": "10-fold-cv.csv"}
REQUIRED_COLUMNS = ("id", "case", "pathology")
FOLD_COLUMNS = ("id", "kfold")
SCREEN_SIDES = {"l": "left", "r": "right", "s": "single"}
_ID = re.compile(r"^bus_(?P<n>\d+)-(?P<side>[lrs])$", re.IGNORECASE)


def _child(parent: Path, name_lower: str, want_dir: bool) -> Path | None:
    """The entry of ``parent`` named ``name_lower`` ignoring case (copies differ: Images / images)."""
    for p in sorted(parent.iterdir()):
        if p.name.lower() == name_lower and (p.is_dir() if want_dir else p.is_file()):
            return p
    return None


def find_data_csv(raw_dir: Path) -> Path:
    """bus_data.csv in ``raw_dir`` or in its ``BUSBRA`` sub-folder (names matched ignoring case)."""
    if not raw_dir.is_dir():
        raise InputError(raw_dir, "folder not found")
    for root in (raw_dir, _child(raw_dir, WRAPPER_FOLDER, want_dir=True)):
        found = None if root is None else _child(root, DATA_CSV, want_dir=False)
        if found is not None:
            return found
    raise InputError(raw_dir, f"no {DATA_CSV} here or in BUSBRA/ (expected the BUS-BRA release: {DATA_CSV}, Images/, Masks/)")


def read_csv_rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, {lower-case column: stripped value}) of each non-empty row; AnnotationError
    naming the file when it is unreadable or lacks a required column."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = [h.strip().lower() for h in next(reader, [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise AnnotationError(path, f"missing column(s) {', '.join(missing)} (columns: {', '.join(header) or 'none'})")
            rows = []
            for fields in reader:
                if any(f.strip() for f in fields):
                    rows.append((reader.line_num, {c: (fields[i].strip() if i < len(fields) else "") for i, c in enumerate(header)}))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise AnnotationError(path, f"unreadable CSV ({exc})") from None
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror})") from None
    return rows


def _int(value: str) -> int | None:
    try:
        return int(float(value)) if value and float(value).is_integer() else None
    except ValueError:  # "NaN" parses as a float and is not an integer; words do not parse
        return None


def _files(folder: Path | None) -> dict[str, Path]:
    """Lower-case file name -> path of the files in ``folder`` (one listing instead of a stat per row)."""
    if folder is None:
        return {}
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_file()}


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the header only; None when unreadable (prepare reports that image)."""
    try:
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except (OSError, UnidentifiedImageError):
        return None


def read_folds(path: Path) -> dict[str, tuple[int, str]]:
    """{image ID: (test fold, pathology word)} of one official fold file; bad rows are warned and skipped."""
    folds: dict[str, tuple[int, str]] = {}
    for line, row in read_csv_rows(path, FOLD_COLUMNS):
        image_id, fold = row["id"], _int(row["kfold"])
        if fold is None or fold < 1:
            log.warning("%s:%d: kFold %r of %s is not a fold number; row skipped", path, line, row["kfold"], image_id)
        elif image_id in folds:
            log.warning("%s:%d: %s listed again (first in fold %d); row skipped", path, line, image_id, folds[image_id][0])
        else:
            folds[image_id] = (fold, row.get("pathology", ""))
    return folds


def _row_case(row: dict[str, str], data_csv: Path, line: int, images: dict[str, Path], masks: dict[str, Path]) -> Case | None:
    """The Case of one bus_data.csv row, or None (with a one-line warning) when the row is unusable."""
    where = f"{data_csv}:{line}"
    image_id = row["id"]
    m = _ID.match(image_id)
    number = _int(row["case"])
    pathology = pathology_from_word(row["pathology"])
    problem = None
    if m is None:
        problem = f"ID {image_id!r} is not like bus_0001-l"
    elif number is None or number != int(m.group("n")):
        problem = f"Case {row['case']!r} is not the patient number of {image_id}"
    elif pathology == "unknown":
        problem = f"Pathology {row['pathology']!r} is neither benign nor malignant"
    elif f"{image_id.lower()}.png" not in images:
        problem = f"image Images/{image_id}.png not found"
    if problem or m is None or number is None:
        log.warning("%s: %s; row skipped", where, problem)
        return None
    image = images[f"{image_id.lower()}.png"]
    notes = []
    mask_name = f"mask_{image_id[4:]}.png"
    mask = masks.get(mask_name.lower())
    if mask is None:
        notes.append(f"mask Masks/{mask_name} not found (lesion kept without outline)")
    birads = _int(row.get("birads", ""))
    if row.get("birads") and birads is None:
        notes.append(f"BIRADS {row['birads']!r} is not a number (kept as None)")
    side = row.get("side", "").lower()
    if side and side != SCREEN_SIDES[m.group("side").lower()]:
        notes.append(f"Side {row['side']!r} contradicts the ID suffix (the suffix is kept)")
    try:
        bbox = [int(v) for v in json.loads(row.get("bbox") or "null")]
        if len(bbox) != 4:
            raise ValueError
    except (ValueError, TypeError):
        if row.get("bbox"):
            notes.append(f"BBOX {row['bbox']!r} is not [x, y, w, h] (not kept)")
        bbox = None
    size = _image_size(image)
    csv_size = (_int(row.get("width", "")), _int(row.get("height", "")))
    if size is not None and None not in csv_size and csv_size != size:
        notes.append(f"Width x Height {csv_size[0]}x{csv_size[1]} but the image is {size[0]}x{size[1]} (the image's size is used)")
    if notes:
        log.warning("%s: %s: %s", where, image_id, "; ".join(notes))
    lesion = Lesion(pathology=pathology, kind="mass", source_label=row["pathology"],
                    mask_path=None if mask is None else str(mask), attributes={"bbox_csv": bbox})
    return Case(
        case_id=image_id,
        patient_id=f"busbra_p{number:04d}",
        dataset=DATASET,
        modality="US",
        image_path=str(image),
        label=pathology,
        lesions=[lesion],
        attributes={
            "patient_id_source": "Case",
            "busbra_case": number,
            "histology": row.get("histology") or None,
            "birads": birads,
            "device": row.get("device") or None,  # the scanner and probe frequency, e.g. "GE Logiq 7 @10-14MHz"
            "screen_side": SCREEN_SIDES[m.group("side").lower()],
            "csv_line": line,
        },
    )


def _add_folds(cases: list[Case], root: Path) -> None:
    """``cv5_fold`` / ``cv10_fold`` of every case from the official fold files present."""
    for scheme, name in FOLD_FILES.items():
        key = f"{scheme}_fold"
        path = _child(root, name, want_dir=False)
        if path is None:
            log.warning("%s: no %s; every case's %s is None (split --official-folds %s is unavailable)", root, name, key, scheme)
            for case in cases:
                case.attributes[key] = None
            continue
        folds = read_folds(path)
        unlisted = []
        for case in cases:
            fold, word = folds.get(case.case_id, (None, ""))
            case.attributes[key] = fold
            if fold is None:
                unlisted.append(case.case_id)
            elif word and pathology_from_word(word) != case.label:
                log.warning("%s: %s is %r here but %s in %s", path, case.case_id, word, case.label, DATA_CSV)
        if unlisted:
            log.warning("%s: %d image(s) of %s not listed (e.g. %s); their %s is None",
                        path, len(unlisted), DATA_CSV, unlisted[0], key)


@register_adapter(DATASET)
def read_busbra(raw_dir: Path, **options: str) -> list[Case]:
    """Cases of a BUS-BRA folder, in bus_data.csv order. Rows that cannot make a case (bad ID,
    patient or pathology; missing image) are warned and skipped; a missing mask keeps the lesion
    without outline (as BUSI does); InputError when no case remains."""
    check_options(DATASET, options, ())
    data_csv = find_data_csv(Path(raw_dir))
    root = data_csv.parent
    image_dir, mask_dir = _child(root, "images", want_dir=True), _child(root, "masks", want_dir=True)
    if image_dir is None:
        raise InputError(root, "no Images/ folder beside bus_data.csv")
    if mask_dir is None:
        log.warning("%s: no Masks/ folder; every lesion is kept without outline", root)
    images, masks = _files(image_dir), _files(mask_dir)
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for line, row in read_csv_rows(data_csv, REQUIRED_COLUMNS):
        if row["id"] in seen:
            log.warning("%s:%d: %s listed again (first on line %d); row skipped", data_csv, line, row["id"], seen[row["id"]])
            continue
        seen[row["id"]] = line
        case = _row_case(row, data_csv, line, images, masks)
        if case is not None:
            cases.append(case)
    if not cases:
        raise InputError(data_csv, f"no usable row (each needs ID, Case, Pathology and its image in {image_dir.name}/)")
    listed = {cid.lower() + ".png" for cid in seen}
    unlisted = sorted(name for name in images if name.endswith(".png") and name not in listed)
    if unlisted:
        log.warning("%s: %d image(s) not listed in %s (e.g. %s); ignored", image_dir, len(unlisted), DATA_CSV, images[unlisted[0]].name)
    by_id = {c.case_id: c for c in cases}
    for case in cases:  # the other half of a dual-view capture
        other = {"left": "r", "right": "l"}.get(case.attributes["screen_side"])
        pair = f"{case.case_id[:-1]}{other}" if other else None
        case.attributes["paired_case_id"] = pair if pair in by_id else None
    _add_folds(cases, root)
    return cases
