"""``mammocad predict``: run a segmentation bundle over files and folders, write per input::

    OUT/<stem>.json            Prediction.to_dict() (+ "mask", "overlay", "input"; per lesion "mask")
    OUT/<stem>_lesion<k>.png   lesion k (1-based), 0/255, the ORIGINAL image's size
    OUT/<stem>_mask.png        union of the lesions, 0/255, original size
    OUT/<stem>_overlay.png     colour overlay: contours + "malignant 0.83" labels on the image
    OUT/summary.json           this run: counts, models used, failures, one row per input

Every file is written atomically and the JSON last, so an input whose JSON exists is finished: a
re-run skips it (``overwrite`` redoes it). A JSON left by another image with the same stem (an
earlier run on other inputs) is never overwritten: this input's stem gets a hash of its path. Bad inputs are reported as ``mammocad: <file>: <cause>``
and skipped; the rest finish.

Model per input, when none is given: DICOM by its header (Modality MG, or DX/CR/RG of the breast ->
MG; US -> US; anything else is refused), plain images (PNG, PGM, JPEG, TIFF) carry no modality and
take ``modality`` (default MG). Output stems are the file stems; inputs sharing a stem (NBIA trees
have ``1-1.dcm`` everywhere) get stems from their paths instead (see ``output_stems``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter, abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mammocad.errors import ConfigError, DicomError, InputError, MammocadError
from mammocad.io.atomic import atomic_write_json
from mammocad.io.images import DICOM_SUFFIXES, PLAIN_SUFFIXES, read_image, write_png

DEFAULT_MODELS = {"MG": "mammo-lesion-seg", "US": "us-lesion-seg"}
SUMMARY_FILE = "summary.json"
FORMAT_VERSION = 1
# DICOM storage classes that are mammography / ultrasound whatever the Modality tag says.
MG_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1"}
US_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1"}
MAMMO_VIEWS = {"CC", "MLO", "ML", "LM", "LMO", "FB", "XCC", "XCCL", "XCCM", "SIO", "ISO", "CV", "AT"}
_UNSAFE = re.compile(r"[\\/:*?\"<>|\x00-\x1f]+")  # not allowed in file names somewhere


# ---- inputs ------------------------------------------------------------------------------------
def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _wanted_in_folder(path: Path) -> bool:
    """Image files of a folder: known suffixes, plus DICOM files named by UID or with no suffix
    (``1.2.840.113619.2.55.3``: their "suffix" is a number), told by the DICM magic."""
    if path.name.startswith(".") or path.name.upper() == "DICOMDIR":  # hidden/partial files, DICOM index
        return False
    suffix = path.suffix.lower()
    if suffix in PLAIN_SUFFIXES or (suffix in DICOM_SUFFIXES and suffix):
        return True
    return _has_dicom_magic(path)


def expand_inputs(inputs: Sequence[str | Path], exclude: str | Path | None = None) -> tuple[list[Path], list[dict[str, str]]]:
    """Files named by ``inputs`` (folders searched recursively, sorted), without duplicates and
    without anything under ``exclude`` (the output folder); and a failure per missing input."""
    files: list[Path] = []
    failures: list[dict[str, str]] = []
    seen: set[Path] = set()
    skip = Path(exclude).resolve() if exclude is not None else None
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _wanted_in_folder(q))
            if skip is not None:
                found = [q for q in found if not q.resolve().is_relative_to(skip)]
            if not found:
                failures.append({"input": str(p), "error": str(InputError(p, "folder holds no image files (DICOM, PNG, PGM, JPEG, TIFF)"))})
        elif p.is_file():
            found = [p]
        else:
            failures.append({"input": str(p), "error": str(InputError(p, "file not found"))})
            continue
        for q in found:
            key = q.resolve()
            if key not in seen:
                seen.add(key)
                files.append(q)
    return files, failures


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._") or "image"


def _file_stem(path: Path) -> str:
    """The name without a known image suffix; UID-named DICOM files (``1.2.840.1``) keep their whole name."""
    return path.stem if path.suffix.lower() in PLAIN_SUFFIXES | DICOM_SUFFIXES else path.name


def output_stems(files: Sequence[Path]) -> dict[Path, str]:
    """A unique output stem per file. The file stem when no other input has it (compared without
    case: macOS and Windows file systems ignore it); otherwise the path below the colliding files'
    common folder joined with ``_`` (``P_00001_LEFT_CC/1-1.dcm`` -> ``P_00001_LEFT_CC_1-1``), and
    8 hex digits of the path's SHA-1 if that still collides. ``summary`` is reserved."""
    def unique_key(s: str) -> str:
        return s.casefold()

    base = {f: _safe(_file_stem(f)) for f in files}
    groups: dict[str, list[Path]] = {}
    for f, s in base.items():
        groups.setdefault(unique_key(s), []).append(f)
    stems: dict[Path, str] = {}
    for members in groups.values():
        if len(members) == 1:
            stems[members[0]] = base[members[0]]
            continue
        resolved = [m.resolve() for m in members]
        common = Path(os.path.commonpath(resolved))
        for m, r in zip(members, resolved):
            rel = r.relative_to(common)
            stems[m] = _safe("_".join([*rel.parent.parts, _file_stem(r)]))
        if len({unique_key(stems[m]) for m in members}) < len(members):  # same folder: a.png and a.dcm
            for m in members:
                stems[m] = _safe(f"{stems[m]}_{m.suffix.lstrip('.')}")
    counts = Counter(unique_key(s) for s in stems.values())
    for f, s in stems.items():
        if counts[unique_key(s)] > 1 or unique_key(s) == unique_key(Path(SUMMARY_FILE).stem):
            stems[f] = f"{s}-{_path_hash(f)}"
    return stems


def _path_hash(path: Path) -> str:
    return hashlib.sha1(str(path.resolve()).encode("utf-8")).hexdigest()[:8]


def input_modality(path: Path, plain_default: str = "MG") -> str:
    """MG or US for choosing the default model (see the module docstring); raises for other DICOM."""
    if path.suffix.lower() in PLAIN_SUFFIXES:
        return plain_default
    from mammocad.io.dicom import read_dicom_metadata

    meta = read_dicom_metadata(path)  # header only; a broken file fails here with the reader's own message
    modality = (meta.get("modality") or "").upper()
    sop = meta.get("sop_class_uid") or ""
    if modality == "US" or sop in US_SOP_CLASSES:
        return "US"
    if modality == "MG" or sop in MG_SOP_CLASSES:
        return "MG"
    if modality in ("DX", "CR", "RG") and ((meta.get("view") or "").upper() in MAMMO_VIEWS or _body_part(path) == "BREAST"):
        return "MG"
    raise DicomError(path, f"modality {modality or 'not given'} is neither a mammogram (MG, or DX/CR/RG of the breast) "
                           "nor an ultrasound (US); pass --model to run a model on it anyway")


def _body_part(path: Path) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["BodyPartExamined"], force=True)
    except Exception:  # pydicom raises many types; the header was readable a moment ago
        return ""
    return str(getattr(ds, "BodyPartExamined", "") or "").strip().upper()


# ---- outputs -----------------------------------------------------------------------------------
def lesion_text(lesion: Any) -> str:
    """Overlay label: the class and its probability, ``malignant 0.83`` (P(malignant | lesion) of a
    benign/malignant model), or ``lesion 0.97`` (the lesion score of a one-class model)."""
    p = lesion.class_probabilities.get(lesion.label, lesion.score) if lesion.class_probabilities else lesion.score
    return f"{lesion.label} {p:.2f}"


class FullMasks(abc.Sequence):
    """Full-size masks made one at a time from cropped ones (``ImagePrediction.lesion_masks``)."""

    def __init__(self, cropped: Sequence[Any]):
        self.cropped = cropped

    def __len__(self) -> int:
        return len(self.cropped)

    def __getitem__(self, i: Any) -> Any:
        return self.cropped[i].full()


def write_outputs(out_dir: Path, stem: str, image: Any, result: Any) -> dict[str, Any]:
    """Write the lesion masks, union mask, overlay and (last) the JSON of one input; return the JSON."""
    from mammocad.visualize import draw_overlay

    prediction, union, cropped = result
    masks = FullMasks(cropped)
    for k, lesion in enumerate(prediction.lesions, start=1):
        lesion.mask_path = f"{stem}_lesion{k}.png"
        write_png(out_dir / lesion.mask_path, masks[k - 1])
    write_png(out_dir / f"{stem}_mask.png", np.asarray(union, dtype=bool))
    overlay = draw_overlay(image.pixels, masks, [les.label for les in prediction.lesions],
                           [lesion_text(les) for les in prediction.lesions])
    write_png(out_dir / f"{stem}_overlay.png", overlay)
    record = prediction.to_dict()
    for d in record["lesions"]:
        d["mask"] = d["mask_path"]
    record.update({"format_version": FORMAT_VERSION, "input": str(Path(image.path).resolve()),
                   "mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png"})
    atomic_write_json(out_dir / f"{stem}.json", record)
    return record


def _finished(json_path: Path) -> dict[str, Any] | None:
    """The JSON of an input finished by an earlier run (None when absent or unreadable: redo it)."""
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("lesions"), list) else None


# ---- the run -----------------------------------------------------------------------------------
@dataclass
class PredictReport:
    out_dir: Path
    n_inputs: int = 0
    n_done: int = 0
    n_skipped: int = 0
    n_lesions: int = 0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "inputs": self.n_inputs, "predicted": self.n_done,
                "skipped": self.n_skipped, "failed": self.n_failed, "lesions": self.n_lesions, "models": self.models,
                "seconds": round(self.seconds, 3), "failures": self.failures, "outputs": self.outputs}

    def print_summary(self, console: Any = None, max_failures: int = 20) -> None:
        from rich.console import Console
        from rich.table import Table

        from mammocad.console import print_failures

        console = console or Console()
        t = Table(title=f"predictions in {self.out_dir}", show_header=False)
        t.add_row("inputs", str(self.n_inputs))
        t.add_row("predicted in this run", str(self.n_done))
        t.add_row("already done (skipped)", str(self.n_skipped))
        t.add_row("failed", f"[red]{self.n_failed}[/red]" if self.n_failed else "0")
        t.add_row("lesions found", str(self.n_lesions))
        for name, m in self.models.items():
            t.add_row(f"model {name} {m['version']}", f"{m['images']} image(s)")
        t.add_row("time", f"{self.seconds:.1f} s")
        console.print(t)
        print_failures(console, f"failed inputs (also in {self.out_dir / SUMMARY_FILE})", "input",
                       [(f["input"], f["error"]) for f in self.failures], max_failures)


def predict_files(inputs: Sequence[str | Path], out_dir: str | Path, model: str | Path | None = None,
                  modality: str = "MG", overwrite: bool = False, progress: bool = True, device: str = "auto",
                  batch_size: int | None = None, autocast: str = "auto", load_predictor: Callable[[str | Path], Any] | None = None) -> PredictReport:
    """Predict every input (see the module docstring); returns the report also written to summary.json.

    ``model`` (a bundle name or folder) is used for every input; without it the model is chosen per
    input by modality (``DEFAULT_MODELS``), ``modality`` being the one assumed for plain images.
    ``load_predictor`` builds a predictor from a bundle name (default ``Predictor(bundle, device=..., ...)``).
    """
    from rich.console import Console
    from mammocad.console import progress_bar

    start = time.monotonic()
    modality = str(modality).upper()
    if modality not in DEFAULT_MODELS:
        raise ConfigError("--modality", f"must be MG or US, got {modality!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a folder")
    if load_predictor is None:
        from mammocad.inference.predictor import Predictor

        def load_predictor(bundle: str | Path) -> Any:
            return Predictor(bundle, device=device, batch_size=batch_size, autocast=autocast)

    predictors: dict[str, Any] = {}
    load_errors: dict[str, MammocadError] = {}

    def predictor_for(name: str | Path) -> Any:
        key = str(name)
        if key in load_errors:
            raise load_errors[key]
        if key not in predictors:
            try:
                predictors[key] = load_predictor(name)
            except MammocadError as err:
                load_errors[key] = err
                raise
        return predictors[key]

    if model is not None:
        predictor_for(model)  # a bad --model is fatal before any work
    files, failures = expand_inputs(inputs, exclude=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PredictReport(out_dir=out_dir, n_inputs=len(files) + len(failures), failures=list(failures))
    stems = output_stems(files)
    console = Console(stderr=True)

    def fail(path: Path, err: MammocadError) -> None:
        message = str(err) if err.source else f"{path}: {err}"
        report.failures.append({"input": str(path), "error": message})
        report.outputs.append({"input": str(path), "status": "failed", "error": message})
        console.print(f"mammocad: {message}", markup=False, highlight=False, soft_wrap=True)

    for f in failures:
        console.print(f"mammocad: {f['error']}", markup=False, highlight=False, soft_wrap=True)
    with progress_bar(console, progress) as bar:
        task = bar.add_task("predict", total=len(files))
        for path in files:
            stem = stems[path]
            existing = _finished(out_dir / f"{stem}.json")
            if existing is not None and existing.get("input") != str(path.resolve()):
                stem = f"{stem}-{_path_hash(path)}"  # an earlier run gave this stem to another image: keep both
                existing = _finished(out_dir / f"{stem}.json")
            json_path = out_dir / f"{stem}.json"
            done = None if overwrite else existing
            try:
                if done is not None:
                    report.n_skipped += 1
                    status, record = "skipped", done
                else:
                    pred = predictor_for(model if model is not None else DEFAULT_MODELS[input_modality(path, modality)])
                    image = read_image(path, voi=pred.voi)
                    record = write_outputs(out_dir, stem, image, pred.predict_image(image))
                    report.n_done += 1
                    status = "predicted"
            except MammocadError as err:
                fail(path, err)
            except Exception as err:  # noqa: BLE001 - one bad input (unreadable, huge: OOM, cv2.error, ...)
                # must not end the batch; Ctrl-C (KeyboardInterrupt is no Exception) still stops it.
                detail = " ".join(str(err).split())  # torch / OpenCV messages span lines: keep one
                fail(path, InputError(path, f"{type(err).__name__}: {detail}" if detail else type(err).__name__))
            else:
                report.n_lesions += len(record["lesions"])
                name = str(record.get("model_name"))
                entry = report.models.setdefault(name, {"version": str(record.get("model_version")), "images": 0})
                entry["images"] += 1
                report.outputs.append({"input": str(path), "stem": stem, "status": status, "json": json_path.name,
                                       "lesions": len(record["lesions"])})
            bar.advance(task)
    report.seconds = time.monotonic() - start
    atomic_write_json(out_dir / SUMMARY_FILE, report.to_dict())
    return report
