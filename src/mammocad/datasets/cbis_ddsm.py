"""CBIS-DDSM adapter: the official case-description CSVs plus the DICOM tree, in both layouts.

Layouts of the DICOM tree (``layout`` option):
- ``csv``: the paths written in the CSVs, ``<case>/<StudyUID>/<SeriesUID>/000000.dcm``;
- ``nbia``: the current NBIA Data Retriever download, ``<case>/<date>-DDSM-NA-xxxxx/
  1.000000-full mammogram images-xxxxx/1-1.dcm``, ROI mask and cropped image in ``<case>_<abn id>/``
  (one series holding 1-1.dcm and 1-2.dcm, or two series);
- ``auto`` (default): the CSV path when it exists, else the NBIA search.
Case folders are found anywhere up to three levels below ``raw_dir`` (NBIA nests them under
``manifest-*/CBIS-DDSM/``).

The CSVs do not say reliably which of the two ROI files is the mask (the calc CSVs swap the columns),
so the mask is told from the cropped image by its DICOM header: the mask has the full image's size,
the crop is small; only when sizes cannot decide are the pixels read (the mask is binary).
Full images are never decoded here: the adapter only resolves paths.

One Case per image: mass and calc rows of the same image (patient, side, view, official split) are
merged, each CSV row becomes one Lesion. The image is stored twice in CBIS-DDSM (a Mass-* and a
Calc-* copy); the first copy found (mass first) is ``image_path``, all are in ``image_copies``.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from mammocad.datasets.common import ALLOW_OUTSIDE_ROOT, bool_option, check_options, path_in_root
from mammocad.datasets.rasterize import read_mask_values
from mammocad.datasets.registry import register_adapter
from mammocad.errors import AnnotationError, ConfigError, InputError, MammocadError
from mammocad.records import Case, Lesion, label_from_lesions

log = logging.getLogger(__name__)

DATASET = "cbis-ddsm"
# Missing-value spellings seen across CBIS-DDSM copies ("N/A" in TCIA's, "NA" in others).
MISSING_VALUES = {"", "N/A", "NA", "NAN", "NONE", "NULL"}
REQUIRED_COLUMNS = (
    "patient id",
    "left or right breast",
    "image view",
    "abnormality id",
    "abnormality type",
    "pathology",
    "image file path",
)
# Per-kind descriptive columns kept as lesion attributes (normalised name -> attribute key).
DESCRIPTIVE_COLUMNS = {
    "mass shape": "mass_shape",
    "mass margins": "mass_margins",
    "calc type": "calc_type",
    "calc distribution": "calc_distribution",
}
PATHOLOGY_WORDS = ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK")
PATH_COLUMNS = ("image file path", "cropped image file path", "roi mask file path")
KINDS = {"mass": "mass", "calcification": "calcification", "calc": "calcification"}
LAYOUTS = ("auto", "csv", "nbia")
CASE_FOLDER_RE = re.compile(r"^(mass|calc)-(training|test)_", re.IGNORECASE)
MAX_SEARCH_DEPTH = 3
MASK_SIZE_TOLERANCE = 0.3  # a mask is within 30% of the full image's rows and columns; crops are far smaller


@dataclass(frozen=True)
class CsvRow:
    """One abnormality as read from a case-description CSV; ``values`` keyed by normalised column."""

    csv_path: Path
    line: int
    split: str | None  # "train" | "test" from the CSV file name, None when the name does not say
    values: dict[str, str | None]

    def get(self, column: str) -> str | None:
        return self.values.get(column)


def normalise_column(name: str) -> str:
    """``breast_density`` / ``Breast Density `` -> ``breast density`` (copies differ in spelling)."""
    return " ".join(name.strip().lower().replace("_", " ").split())


def _clean(value: str | None) -> str | None:
    # Path fields end with an embedded newline inside quotes: strip whitespace everywhere.
    if value is None:
        return None
    value = value.strip()
    return None if value.upper() in MISSING_VALUES else value


def find_case_description_csvs(folder: Path) -> list[Path]:
    """The case-description CSVs in ``folder`` (not recursive), mass before calc, train before test."""
    if not folder.is_dir():
        raise InputError(folder, "folder not found")
    found = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".csv" and "case_description" in p.name.lower()]
    return sorted(found, key=lambda p: ("calc" in p.name.lower(), "test" in p.name.lower(), p.name))


def _split_from_name(name: str) -> str | None:
    low = name.lower()
    if "train" in low:
        return "train"
    if "test" in low:
        return "test"
    return None


def read_case_description_csv(path: Path) -> list[CsvRow]:
    """Parse one CSV with a real CSV parser; AnnotationError names the file and the missing column."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise AnnotationError(path, "empty CSV (no header line)")
            columns = [normalise_column(h) for h in header]
            for required in REQUIRED_COLUMNS:
                if required not in columns:
                    raise AnnotationError(path, f"missing required column {required!r} (columns: {', '.join(columns)})")
            split = _split_from_name(path.name)
            rows = []
            first_line = reader.line_num + 1  # a row may span lines (quoted newlines): report where it starts
            for fields in reader:
                if any(f.strip() for f in fields):
                    values = {col: _clean(fields[i]) if i < len(fields) else None for i, col in enumerate(columns)}
                    rows.append(CsvRow(path, first_line, split, values))
                first_line = reader.line_num + 1
    except (csv.Error, UnicodeDecodeError) as exc:
        raise AnnotationError(path, f"unreadable CSV ({exc})") from None
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror})") from None
    return rows


def _parse_bwc(value: str) -> str:
    v = str(value).strip().lower()
    if v not in ("benign", "unknown", "malignant"):
        raise ConfigError("benign_without_callback", f"must be benign, unknown or malignant, got {value!r}")
    return v


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _csv_relpath(value: str | None) -> str | None:
    return None if value is None else value.replace("\\", "/").strip("/")


def check_csv_paths(rows: list[CsvRow], raw_dir: Path, allow_outside_root: bool) -> None:
    """Refuse a CSV whose file paths climb out of ``raw_dir`` (``../``): one AnnotationError naming
    the CSV, its line and the path (see ``common.path_in_root``). Leading slashes are already
    read as relative to ``raw_dir`` (``_csv_relpath``), as the official CSVs are."""
    if allow_outside_root:
        return
    for row in rows:
        for column in PATH_COLUMNS:
            rel = _csv_relpath(row.get(column))
            if rel:
                path_in_root(rel, raw_dir, f"{row.csv_path}:{row.line}", False)


def _image_key(row: CsvRow) -> tuple[str | None, str, str, str]:
    """(official split, patient, LEFT|RIGHT, view) as written, before validation."""
    split = row.split
    if split is None:  # CSV renamed: fall back on the folder prefix (Mass-Training_ / Calc-Test_)
        m = CASE_FOLDER_RE.match(_csv_relpath(row.get("image file path")) or "")
        split = None if m is None else ("train" if m.group(2).lower() == "training" else "test")
    side = (row.get("left or right breast") or "").upper()
    return split, row.get("patient id") or "", {"L": "LEFT", "R": "RIGHT"}.get(side, side), (row.get("image view") or "").upper()


def _row_to_lesion(row: CsvRow, pathology_map: dict[str, str]) -> tuple[Lesion, str]:
    """(lesion, CSV image path) of one row; ValueError says what is wrong with it."""
    split, patient, side, view = _image_key(row)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", patient):
        raise ValueError(f"bad patient_id {patient!r}")
    if side not in ("LEFT", "RIGHT"):
        raise ValueError(f"bad 'left or right breast' {row.get('left or right breast')!r}")
    if not re.fullmatch(r"[A-Z]+", view):
        raise ValueError(f"bad 'image view' {row.get('image view')!r}")
    if split is None:
        raise ValueError("official split unknown (neither the CSV name nor the image path says train/test)")
    abn_id = _int_or_none(row.get("abnormality id"))
    if abn_id is None or abn_id < 1:
        raise ValueError(f"bad 'abnormality id' {row.get('abnormality id')!r}")
    kind = KINDS.get((row.get("abnormality type") or "").lower())
    if kind is None:
        raise ValueError(f"unknown 'abnormality type' {row.get('abnormality type')!r}")
    word = (row.get("pathology") or "").upper().replace(" ", "_")
    if word not in pathology_map:
        raise ValueError(f"unknown pathology {row.get('pathology')!r}")
    image_rel = _csv_relpath(row.get("image file path"))
    if not image_rel:
        raise ValueError("empty 'image file path'")
    attributes: dict[str, Any] = {
        "abnormality_id": abn_id,
        "assessment": _int_or_none(row.get("assessment")),  # BI-RADS
        "subtlety": _int_or_none(row.get("subtlety")),
    }
    for column, key in DESCRIPTIVE_COLUMNS.items():
        if (kind == "mass") == column.startswith("mass"):
            attributes[key] = row.get(column)
    attributes.update(
        source_csv=row.csv_path.name,
        roi_folder=f"{image_rel.split('/')[0]}_{abn_id}",
        csv_roi_mask_path=_csv_relpath(row.get("roi mask file path")),
        csv_cropped_image_path=_csv_relpath(row.get("cropped image file path")),
    )
    lesion = Lesion(pathology=pathology_map[word], kind=kind, source_label=word, attributes=attributes)
    return lesion, image_rel


def cases_from_rows(rows: list[CsvRow], benign_without_callback: str = "benign") -> list[Case]:
    """Group CSV rows into one Case per image, without touching the DICOM tree.

    ``image_path`` is still the CSV's relative path and masks are unresolved; ``read_cbis_ddsm``
    resolves them. An image with any malformed row is skipped with a warning (skipping just the row
    could turn a malignant image benign).
    """
    pathology_map = {"MALIGNANT": "malignant", "BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": _parse_bwc(benign_without_callback)}
    groups: dict[tuple, dict[str, Any]] = {}
    bad: dict[tuple, str] = {}
    for row in rows:
        key = _image_key(row)
        try:
            lesion, image_rel = _row_to_lesion(row, pathology_map)
        except ValueError as exc:
            bad.setdefault(key, f"{row.csv_path}: line {row.line}: {exc}")
            continue
        g = groups.setdefault(key, {"lesions": [], "images": [], "csvs": [], "density": []})
        g["lesions"].append(lesion)
        if image_rel not in g["images"]:
            g["images"].append(image_rel)
        if row.csv_path.name not in g["csvs"]:
            g["csvs"].append(row.csv_path.name)
        density = _int_or_none(row.get("breast density"))
        if density is not None and density not in g["density"]:
            g["density"].append(density)
    for reason in bad.values():
        log.warning("%s; image skipped", reason)
    cases = []
    for (split, patient, side, view), g in sorted(groups.items()):
        if (split, patient, side, view) in bad:
            continue
        # Abnormality ids are numbered per image across the mass and calc CSVs.
        lesions = sorted(g["lesions"], key=lambda les: (les.attributes["abnormality_id"], les.kind))
        images = sorted(g["images"], key=lambda p: not p.lower().startswith("mass"))
        density = g["density"]
        cases.append(
            Case(
                case_id=f"{split.capitalize()}_{patient}_{side}_{view}",
                patient_id=patient,
                dataset=DATASET,
                modality="MG",
                image_path=images[0],
                laterality=side[0],
                view=view,
                label=label_from_lesions(lesions),
                lesions=lesions,
                split=split,
                attributes={
                    "breast_density": density[0] if len(density) == 1 else (density or None),
                    "pathology_map": dict(pathology_map),
                    "source_csvs": g["csvs"],
                    "csv_image_paths": images,
                },
            )
        )
    return cases


# ---------------------------------------------------------------- resolving files in the DICOM tree


def index_case_folders(raw_dir: Path) -> dict[str, Path]:
    """Folder name -> path of every ``Mass-Training_...``-like folder up to 3 levels deep (BFS: shallowest wins)."""
    index: dict[str, Path] = {}
    queue: deque[tuple[Path, int]] = deque([(raw_dir, 0)])
    while queue:
        folder, depth = queue.popleft()
        try:
            entries = sorted((e for e in os.scandir(folder) if e.is_dir()), key=lambda e: e.name)
        except OSError as exc:
            log.warning("%s: cannot list folder (%s)", folder, exc.strerror)
            continue
        for entry in entries:
            if CASE_FOLDER_RE.match(entry.name):
                index.setdefault(entry.name, Path(entry.path))
            elif depth < MAX_SEARCH_DEPTH:
                queue.append((Path(entry.path), depth + 1))
    return index


def _dicoms_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".dcm" and p.is_file())


def _via_csv_path(rel: str | None, raw_dir: Path, index: dict[str, Path]) -> Path | None:
    if not rel:
        return None
    first, _, rest = rel.partition("/")
    for base in (raw_dir / first, index.get(first)):
        if base is not None and rest and (base / rest).is_file():
            return base / rest
    return None


def _resolve_image(rel: str, raw_dir: Path, index: dict[str, Path], layout: str) -> Path | None:
    if layout != "nbia":
        found = _via_csv_path(rel, raw_dir, index)
        if found is not None or layout == "csv":
            return found
    folder = index.get(rel.split("/")[0])
    if folder is None:
        return None
    files = _dicoms_under(folder)
    if len(files) > 1:
        files = [p for p in files if "full mammogram" in p.parent.name.lower()] or files
    if len(files) > 1:
        log.warning("%s: %d DICOM files, cannot tell which is the full mammogram", folder, len(files))
        return None
    return files[0] if files else None


def _rows_cols(path: Path) -> tuple[int, int] | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["Rows", "Columns"])
        return int(ds.Rows), int(ds.Columns)
    except Exception:  # pydicom raises many types on broken files; the prepare step reports them
        return None


def _is_binary(path: Path) -> bool:
    """Two stored values only (read_mask_values: a DICOM's stored pixels, no VOI or inversion)."""
    try:
        pixels = read_mask_values(path)
    except MammocadError:
        return False
    lo, hi = pixels.min(), pixels.max()
    return bool(hi > lo and not np.any((pixels != lo) & (pixels != hi)))


def _near(size: tuple[int, int] | None, full: tuple[int, int]) -> bool:
    return size is not None and all(abs(s / f - 1.0) <= MASK_SIZE_TOLERANCE for s, f in zip(size, full))


def split_mask_and_crop(candidates: list[Path], full_size: tuple[int, int] | None) -> tuple[Path | None, Path | None]:
    """(ROI mask, cropped image) among an abnormality's DICOM files.

    By header size first (the mask has the full image's size, give or take); the pixels are read
    only when sizes cannot decide, and then the binary file is the mask.
    """
    mask_like = [p for p in candidates if _near(_rows_cols(p), full_size)] if full_size else []
    if len(mask_like) != 1:
        mask_like = [p for p in (mask_like or candidates) if _is_binary(p)]
    mask = mask_like[0] if len(mask_like) == 1 else None
    crops = [p for p in candidates if p != mask and p not in mask_like]
    return mask, (crops[0] if crops else None)


def _resolve_roi(attrs: dict[str, Any], raw_dir: Path, index: dict[str, Path], layout: str, full_size) -> tuple[Path | None, Path | None]:
    candidates: list[Path] = []
    if layout != "nbia":
        for rel in (attrs.get("csv_roi_mask_path"), attrs.get("csv_cropped_image_path")):
            found = _via_csv_path(rel, raw_dir, index)
            if found is not None and found not in candidates:
                candidates.append(found)
    if not candidates and layout != "csv":
        folder = index.get(attrs["roi_folder"])
        candidates = _dicoms_under(folder) if folder is not None else []
    if not candidates:
        return None, None
    return split_mask_and_crop(candidates, full_size)


def _resolve_case(case: Case, raw_dir: Path, index: dict[str, Path], layout: str) -> bool:
    """Fill in real paths; False when no copy of the image exists."""
    copies = [p for p in (_resolve_image(rel, raw_dir, index, layout) for rel in case.attributes["csv_image_paths"]) if p is not None]
    if not copies:
        log.warning("%s: image file not found for case %s (%s); case skipped", raw_dir, case.case_id, case.attributes["csv_image_paths"][0])
        return False
    case.image_path = str(copies[0])
    case.attributes["image_copies"] = [str(p) for p in copies]
    full_size = _rows_cols(copies[0])
    for lesion in case.lesions:
        mask, crop = _resolve_roi(lesion.attributes, raw_dir, index, layout, full_size)
        lesion.mask_path = None if mask is None else str(mask)
        lesion.attributes["cropped_image_path"] = None if crop is None else str(crop)
        if mask is None:
            log.warning("%s: no ROI mask found for abnormality %s (%s); lesion kept without outline",
                        raw_dir, lesion.attributes["roi_folder"], case.case_id)
    return True


@register_adapter(DATASET)
def read_cbis_ddsm(
    raw_dir: Path,
    csv_dir: Path | str | None = None,
    benign_without_callback: str = "benign",
    layout: str = "auto",
    allow_outside_root: bool | str = False,
    **unknown: Any,
) -> list[Case]:
    """Cases of a CBIS-DDSM download: CSVs in ``csv_dir`` (default ``raw_dir``), DICOMs under ``raw_dir``.

    ``benign_without_callback``: benign (default) | unknown | malignant, the pathology given to
    BENIGN_WITHOUT_CALLBACK rows. ``layout``: auto | csv | nbia (see the module docstring).
    ``allow_outside_root``: read CSV paths that climb out of ``raw_dir`` (``../``); refused by default.
    Images missing on disk are skipped with a warning; InputError when none is found. Any other
    option is a ConfigError (a typo must not be ignored).
    """
    check_options(DATASET, unknown, ("csv_dir", "benign_without_callback", "layout"))
    allow_outside = bool_option({ALLOW_OUTSIDE_ROOT: allow_outside_root}, ALLOW_OUTSIDE_ROOT)
    raw_dir = Path(raw_dir)
    layout = str(layout).strip().lower()
    if layout not in LAYOUTS:
        raise ConfigError("layout", f"must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    _parse_bwc(benign_without_callback)
    if not raw_dir.is_dir():
        raise InputError(raw_dir, "folder not found")
    csv_folder = Path(csv_dir) if csv_dir not in (None, "") else raw_dir
    csv_paths = find_case_description_csvs(csv_folder)
    if not csv_paths:
        raise InputError(csv_folder, "no CBIS-DDSM case-description CSV (*case_description*.csv) in this folder")
    rows = [row for path in csv_paths for row in read_case_description_csv(path)]
    check_csv_paths(rows, raw_dir, allow_outside)
    cases = cases_from_rows(rows, benign_without_callback)
    index = index_case_folders(raw_dir)
    found = [case for case in cases if _resolve_case(case, raw_dir, index, layout)]
    if not found:
        raise InputError(raw_dir, f"none of the {len(cases)} images listed in {', '.join(p.name for p in csv_paths)} was found (layout={layout})")
    if len(found) < len(cases):
        log.warning("%s: %d of %d CBIS-DDSM images not found; those cases were skipped", raw_dir, len(cases) - len(found), len(cases))
    return found
