"""The prepared dataset on disk, and its reader.

``mammocad prepare`` (``prepare_dataset``, written in ``prepare_run.py``) turns a raw dataset into::

    OUT/
      spec.json            PreprocessSpec + adapter name/options + raw folder + mammocad version.
                           A re-run into the same OUT with anything different is an error, so that
                           one OUT never mixes two preprocessings.
      images/<stem>.png    16-bit PNG of the preprocessed [0, 1] image (``float_to_uint16``)
      masks/<stem>/lesion_<k>.png   0/255 mask of lesion k (index in ``Case.lesions``) on the
                                    prepared grid, for every lesion WITH geometry that is not lost
      masks/<stem>/union.png        union of all lesions (every case; empty for normals)
      masks/<stem>/breast.png       breast (MG) / scan-area (US) mask
      cases.jsonl          one line per prepared case, sorted by case id:
                           {"case": Case.to_dict(), "geometry": Geometry.to_dict(),
                            "image": "images/<stem>.png", "lesion_masks": [path | null per lesion],
                            "union_mask": path, "breast_mask": path, "notes": [...],
                            "lesion_boxes": [[x0, y0, x1, y1] | null per lesion, prepared grid],
                            "lost_lesions": {"<k>": "<reason>"},
                            "phash": "<16 hex digits>", "phash256": "<64 hex digits>",
                            "laterality_from_pixels": "L" | "R" | null}
                           (the hashes are of the prepared image, for the near-duplicate audit)
                           A LOST lesion has an outline in the source but nothing of it on the
                           prepared grid ("empty source annotation", "outside the prepared image
                           (cropped away)"): it has no mask file (path and box null) and is known
                           to be absent from the prepared image, unlike a lesion without any
                           outline, whose true extent is unknown (``PreparedCase.unlocated_lesions``).
      failed.jsonl         {"case_id", "image_path", "error"} per case that failed in the LAST run
      summary.json         counts (cases, patients, lesions, lesions_lost and lesions_lost_by_reason,
                           by label / pathology / kind, failed), seconds taken
      splits.json          written later by ``mammocad split`` (see ``splits.py``)

``<stem>`` is the case id when it is a safe file name (letters, digits, ``._-``), otherwise the id
with other characters replaced by ``_`` plus 8 hex digits of its SHA-1 (ids stay unique). Paths in
cases.jsonl are relative to OUT, so a prepared dataset can be moved.

While a run is in progress cases.jsonl is appended one complete line per finished case (flushed
and fsynced); a crash can leave at most one partial last line, which readers ignore.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mammocad.errors import InputError
from mammocad.preprocess.geometry import Geometry
from mammocad.records import Case

if TYPE_CHECKING:
    from mammocad.datasets.prepare_run import PrepareReport

SPEC_FILE = "spec.json"
CASES_FILE = "cases.jsonl"
FAILED_FILE = "failed.jsonl"
SUMMARY_FILE = "summary.json"
SPLITS_FILE = "splits.json"
FORMAT_VERSION = 1
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def case_file_stem(case_id: str) -> str:
    """File-name stem for a case id (see the module docstring)."""
    if _SAFE_ID.match(case_id) and len(case_id) <= 150:
        return case_id
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("._")[:100] or "case"
    return f"{cleaned}-{hashlib.sha1(case_id.encode('utf-8')).hexdigest()[:8]}"


def read_jsonl_lines(path: Path) -> list[dict[str, Any]]:
    """JSON objects of a JSON-lines file that may end in a half-written line (a crash mid-append):
    a final line without its newline is ignored; a broken line elsewhere is an error."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from None
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail is b"" when the file ends with a newline
    out: list[dict[str, Any]] = []
    for no, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{path}:{no}", "line is not valid JSON") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{no}", "line is not a JSON object")
        out.append(obj)
    del tail  # partial last line of an interrupted append: not an entry
    return out


@dataclass
class PreparedCase:
    """One case of a prepared dataset: the record, its geometry and resolved file paths."""

    case: Case
    geometry: Geometry
    image_path: Path
    lesion_mask_paths: list[Path | None]  # one per lesion of ``case``; None without geometry or when lost
    union_mask_path: Path
    breast_mask_path: Path
    notes: list[str]
    boxes: list[list[float] | None]  # one per lesion, prepared grid, None when no (visible) geometry
    phash: str
    laterality_from_pixels: str | None = None
    phash256: str | None = None  # finer hash confirming near-duplicate candidates (dedup.py)
    # Lesion index -> why preprocessing lost it (see the module docstring); empty in entries written
    # before lost lesions were recorded.
    lost_lesions: dict[int, str] = field(default_factory=dict)

    @property
    def case_id(self) -> str:
        return self.case.case_id

    @property
    def patient_id(self) -> str:
        return self.case.patient_id

    @property
    def label(self) -> str:
        return self.case.label

    @property
    def unlocated_lesions(self) -> list[int]:
        """Indices of lesions with no outline on the prepared grid that are NOT lost: their true
        foreground is unknown (a lost lesion is known to be absent from the prepared image)."""
        return [k for k, p in enumerate(self.lesion_mask_paths) if p is None and k not in self.lost_lesions]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the prepared image."""
        return self.geometry.size

    @classmethod
    def from_entry(cls, root: Path, entry: dict[str, Any]) -> "PreparedCase":
        case = Case.from_dict(entry["case"])
        masks = entry["lesion_masks"]
        if len(masks) != len(case.lesions) or len(entry["lesion_boxes"]) != len(case.lesions):
            raise ValueError(f"case {case.case_id}: {len(case.lesions)} lesions but {len(masks)} masks / "
                             f"{len(entry['lesion_boxes'])} boxes")
        lost = {int(k): str(why) for k, why in (entry.get("lost_lesions") or {}).items()}
        if any(not 0 <= k < len(masks) or masks[k] is not None for k in lost):
            raise ValueError(f"case {case.case_id}: lost_lesions {sorted(lost)} are not lesions without a mask")
        return cls(
            case=case,
            geometry=Geometry.from_dict(entry["geometry"]),
            image_path=root / entry["image"],
            lesion_mask_paths=[None if m is None else root / m for m in masks],
            union_mask_path=root / entry["union_mask"],
            breast_mask_path=root / entry["breast_mask"],
            notes=list(entry.get("notes", [])),
            boxes=[None if b is None else [float(v) for v in b] for b in entry["lesion_boxes"]],
            phash=str(entry["phash"]),
            laterality_from_pixels=entry.get("laterality_from_pixels"),
            phash256=entry.get("phash256"),
            lost_lesions=lost,
        )

    def files(self) -> list[Path]:
        return [self.image_path, self.union_mask_path, self.breast_mask_path,
                *(p for p in self.lesion_mask_paths if p is not None)]


class PreparedDataset:
    """Read access to a prepared dataset folder (see the module docstring for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(self.root, "no such folder (expected a prepared dataset made by `mammocad prepare`)")
        spec_path = self.root / SPEC_FILE
        if not spec_path.is_file():
            raise InputError(self.root, f"not a prepared dataset: {SPEC_FILE} is missing (run `mammocad prepare`)")
        try:
            self.spec_record: dict[str, Any] = json.loads(spec_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(spec_path, f"unreadable ({exc})") from None
        if not isinstance(self.spec_record, dict) or "preprocess" not in self.spec_record:
            raise InputError(spec_path, "no 'preprocess' entry: not written by `mammocad prepare`")
        if not (self.root / CASES_FILE).is_file():
            raise InputError(self.root, f"not a prepared dataset: {CASES_FILE} is missing (the prepare run did not start)")
        self._cases: list[PreparedCase] | None = None
        self._by_id: dict[str, PreparedCase] | None = None

    # ---- records ----------------------------------------------------------------------------
    @property
    def spec(self) -> Any:
        """The ``PreprocessSpec`` the images were prepared with."""
        from mammocad.preprocess.pipeline import PreprocessSpec

        try:
            return PreprocessSpec.from_record(self.spec_record["preprocess"])
        except ValueError as exc:
            raise InputError(self.root / SPEC_FILE, f"invalid preprocessing spec ({exc})") from None

    @property
    def cases(self) -> list[PreparedCase]:
        if self._cases is None:
            path = self.root / CASES_FILE
            cases = []
            for no, entry in enumerate(read_jsonl_lines(path), start=1):
                try:
                    cases.append(PreparedCase.from_entry(self.root, entry))
                except (KeyError, TypeError, ValueError) as exc:
                    raise InputError(f"{path}:{no}", f"malformed entry ({type(exc).__name__}: {exc})") from None
            self._cases = cases
        return self._cases

    def __len__(self) -> int:
        return len(self.cases)

    def by_id(self, case_id: str) -> PreparedCase:
        if self._by_id is None:
            self._by_id = {pc.case_id: pc for pc in self.cases}
        try:
            return self._by_id[case_id]
        except KeyError:
            raise InputError(self.root / CASES_FILE, f"no case {case_id!r}") from None

    # ---- pixels -----------------------------------------------------------------------------
    def load_image(self, pc: PreparedCase) -> np.ndarray:
        """The prepared image as float32 in [0, 1]."""
        from mammocad.io.images import read_plain_image

        img = read_plain_image(pc.image_path)
        if img.pixels.dtype != np.uint16:
            raise InputError(pc.image_path, f"expected a 16-bit prepared image, got {img.pixels.dtype}")
        return img.pixels.astype(np.float32) / np.float32(65535.0)

    @staticmethod
    def _load_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
        from mammocad.io.images import read_plain_image

        mask = read_plain_image(path).pixels > 0
        if mask.shape != shape:
            raise InputError(path, f"mask is {mask.shape[1]}x{mask.shape[0]}, the prepared image {shape[1]}x{shape[0]}")
        return mask

    def load_union_mask(self, pc: PreparedCase) -> np.ndarray:
        return self._load_mask(pc.union_mask_path, pc.size)

    def load_lesion_masks(self, pc: PreparedCase) -> list[np.ndarray | None]:
        return [None if p is None else self._load_mask(p, pc.size) for p in pc.lesion_mask_paths]

    def load_breast_mask(self, pc: PreparedCase) -> np.ndarray:
        return self._load_mask(pc.breast_mask_path, pc.size)

    # ---- splits -----------------------------------------------------------------------------
    def load_splits(self, path: str | Path | None = None) -> dict[str, Any]:
        """The splits file (default OUT/splits.json), checked for shape: ``folds`` of train/val/test."""
        p = Path(path) if path is not None else self.root / SPLITS_FILE
        if not p.is_file():
            raise InputError(p, "no splits file (run `mammocad split` first)")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(p, f"unreadable ({exc})") from None
        if not isinstance(data, dict) or data.get("version") != 1:
            raise InputError(p, "not a mammocad splits file (expected \"version\": 1)")
        folds = data.get("folds")
        if not isinstance(folds, list) or not folds:
            raise InputError(p, "no folds")
        for i, fold in enumerate(folds):
            if not isinstance(fold, dict) or any(not isinstance(fold.get(k), list) for k in ("train", "val", "test")):
                raise InputError(p, f"fold {i} needs lists 'train', 'val' and 'test'")
        return data


def prepare_dataset(dataset: str, raw_dir: str | Path, out_dir: str | Path, **kwargs: Any) -> "PrepareReport":
    """Read ``raw_dir`` with adapter ``dataset`` and write a prepared dataset to ``out_dir``.

    See ``mammocad.datasets.prepare_run.prepare_dataset`` for the arguments.
    """
    from mammocad.datasets.prepare_run import prepare_dataset as run

    return run(dataset, raw_dir, out_dir, **kwargs)
