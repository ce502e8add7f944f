"""``mammocad predict``: run a lesion (segment / detect) or pipeline bundle over files and folders,
write per input::

    OUT/<stem>.json            Prediction.to_dict() (+ "mask", "overlay", "input"; per lesion "mask")
    OUT/<stem>_lesion<k>.png   lesion k (1-based), 0/255, the ORIGINAL image's size
    OUT/<stem>_mask.png        union of the lesions, 0/255, original size
    OUT/<stem>_overlay.png     colour overlay: contours + "malignant 0.83" labels on the image (a
                               pipeline's: coloured by the pathology call, + "P(malignant) 0.83")
    OUT/summary.json           this run: counts, models used, failures, one row per input

Every file is written atomically and the JSON last, so an input whose JSON exists is finished: a
re-run skips it, unless the JSON was written by another model or model version than the one this
input gets now (then it is redone, and the report says so) or ``overwrite`` is set. Redoing a stem
first removes the lesion masks of its earlier run. A JSON left by another image with the same stem
(an earlier run on other inputs) is never overwritten: this input's stem gets a hash of its path.
Each JSON records the input's SHA-256 and size, to match it on content. Bad inputs are reported as
``mammocad: <file>: <cause>`` and skipped; the rest finish. The output folder is claimed
(``io.outdir``): a second run into it while one is writing is refused.

Inputs: files as named, folders walked by ``io.discover.find_images`` (DICOM told by content, not
by name); what a walk passes over (not images, hidden files, DICOMDIR, broken links, mammocad
output folders, ...) is counted in the report and listed in summary.json ``not_used``. Images over
``max_pixels`` are refused from their header before decoding.

Model per input, when none is given: DICOM by its header (``io.discover.breast_modality``: MG, or
DX/CR/RG of the breast -> MG; US -> US; anything else is refused); plain images (PNG, PGM, JPEG,
TIFF) carry no modality and take ``modality``, or MG when none is given, which is then reported
as assumed. Each JSON says where its modality came from (``attributes.modality_source``: dicom,
--modality, assumed, or --model when a model was named). Output stems are the file stems; inputs
sharing a stem (NBIA trees have ``1-1.dcm`` everywhere) get stems from their paths instead (see
``output_stems``).
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
from mammocad.io.discover import NonBreastModalityError, NotUsed, breast_modality, file_sha256, find_images, image_stem
from mammocad.io.images import DEFAULT_MAX_PIXELS, read_image, write_png
from mammocad.io.outdir import check_output_dir, claim_output_dir

DEFAULT_MODELS = {"MG": "mammo-lesion-seg", "US": "us-lesion-seg"}
SUMMARY_FILE = "summary.json"
FORMAT_VERSION = 1
_UNSAFE = re.compile(r"[\\/:*?\"<>|\x00-\x1f]+")  # not allowed in file names somewhere


# ---- inputs ------------------------------------------------------------------------------------
def expand_inputs(inputs: Sequence[str | Path], exclude: str | Path | None = None
                  ) -> tuple[list[Path], list[dict[str, str]], list[NotUsed]]:
    """Files named by ``inputs`` (folders walked by ``find_images``, sorted), without duplicates and
    without anything under ``exclude`` (the output folder); a failure per missing input or folder
    without images; and every path the folder walks passed over, with its reason."""
    files: list[Path] = []
    failures: list[dict[str, str]] = []
    not_used: list[NotUsed] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            walk = find_images(p, exclude=[] if exclude is None else [exclude])
            not_used += walk.not_used
            found = walk.files
            if not found:
                refused = [n.reason for n in walk.not_used if n.path == str(p)]  # the folder itself (an output folder)
                why = refused[0] if refused else "folder holds no image files (DICOM, PNG, PGM, JPEG, TIFF)"
                failures.append({"input": str(p), "error": str(InputError(p, why))})
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
    return files, failures, not_used


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._") or "image"


def output_stems(files: Sequence[Path]) -> dict[Path, str]:
    """A unique output stem per file. The file stem when no other input has it (compared without
    case: macOS and Windows file systems ignore it); otherwise the path below the colliding files'
    common folder joined with ``_`` (``P_00001_LEFT_CC/1-1.dcm`` -> ``P_00001_LEFT_CC_1-1``), and
    8 hex digits of the path's SHA-1 if that still collides. ``summary`` is reserved."""
    def unique_key(s: str) -> str:
        return s.casefold()

    base = {f: _safe(image_stem(f)) for f in files}
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
            stems[m] = _safe("_".join([*rel.parent.parts, image_stem(r)]))
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


def input_modality(path: Path, given: str | None = None) -> tuple[str, str]:
    """(MG | US, where that came from) for choosing the default model: the DICOM header
    (``breast_modality``; other modalities raise), else ``given`` (``--modality``), else MG, assumed."""
    try:
        found = breast_modality(path)
    except NonBreastModalityError as err:
        raise DicomError(path, f"{err.cause}; pass --model to run a model on it anyway") from None
    if found is not None:
        return found, "dicom"
    if given is not None:
        return given, "--modality"
    return "MG", "assumed"


def _remove_previous(out_dir: Path, stem: str, record: dict[str, Any] | None) -> None:
    """Delete the lesion masks an earlier run wrote for ``stem`` (those its JSON names, and
    ``<stem>_lesion<k>.png`` from k = 1 on, as they are written), so that a redo with fewer
    lesions leaves none of the old ones behind. The union mask and overlay are overwritten anyway."""
    names = set()
    for lesion in (record or {}).get("lesions") or []:
        for key in ("mask", "mask_path"):
            name = lesion.get(key) if isinstance(lesion, dict) else None
            if isinstance(name, str) and name == Path(name).name and name.startswith(f"{stem}_lesion"):
                names.add(name)
    k = 1
    while (out_dir / f"{stem}_lesion{k}.png").exists():
        names.add(f"{stem}_lesion{k}.png")
        k += 1
    for name in names:
        (out_dir / name).unlink(missing_ok=True)


# ---- outputs -----------------------------------------------------------------------------------
def lesion_text(lesion: Any) -> str:
    """Overlay label: the class and its probability, ``malignant 0.83`` (P(malignant | lesion) of a
    benign/malignant model), or ``lesion 0.97`` (the lesion score of a one-class model); a pipeline's
    classified lesion adds its P(malignant): ``lesion 0.97 P(malignant) 0.83``."""
    p = lesion.class_probabilities.get(lesion.label, lesion.score) if lesion.class_probabilities else lesion.score
    text = f"{lesion.label} {p:.2f}"
    malignant = (getattr(lesion, "pathology_probabilities", None) or {}).get("malignant")
    return text if malignant is None else f"{text} P(malignant) {malignant:.2f}"


def lesion_colour_label(lesion: Any) -> str:
    """The overlay colour's key (``visualize.COLOURS``): a pipeline's pathology call, else the class."""
    return getattr(lesion, "pathology", None) or lesion.label


class FullMasks(abc.Sequence):
    """Full-size masks made one at a time from cropped ones (``ImagePrediction.lesion_masks``)."""

    def __init__(self, cropped: Sequence[Any]):
        self.cropped = cropped

    def __len__(self) -> int:
        return len(self.cropped)

    def __getitem__(self, i: Any) -> Any:
        return self.cropped[i].full()


def write_outputs(out_dir: Path, stem: str, image: Any, result: Any) -> dict[str, Any]:
    """Write the lesion masks, union mask, overlay and (last) the JSON of one input; return the JSON.

    The JSON is ``Prediction.to_dict()`` (a pipeline's adds per lesion ``pathology_probabilities``
    and ``pathology``, per image ``label_probabilities``, ``label`` and ``decision_thresholds``,
    the overlay colouring lesions by their pathology call): lesions name their mask PNGs; ``candidates`` (every
    component at the low candidate threshold, what ``mammocad evaluate`` draws its FROC curve from)
    carry their masks inline as COCO RLE on the original grid, and ``attributes.candidate_search``
    records their threshold and cap."""
    from mammocad.visualize import draw_overlay

    prediction, union, _ = result  # the lesion masks travel with the lesions (PredictedLesion.mask)
    masks = FullMasks([les.mask for les in prediction.lesions])
    for k, lesion in enumerate(prediction.lesions, start=1):
        lesion.mask_path = f"{stem}_lesion{k}.png"
        write_png(out_dir / lesion.mask_path, masks[k - 1])
    write_png(out_dir / f"{stem}_mask.png", np.asarray(union, dtype=bool))
    overlay = draw_overlay(image.pixels, masks, [lesion_colour_label(les) for les in prediction.lesions],
                           [lesion_text(les) for les in prediction.lesions])
    write_png(out_dir / f"{stem}_overlay.png", overlay)
    record = prediction.to_dict()
    for d in record["lesions"]:
        d["mask"] = d["mask_path"]
    record.update({"format_version": FORMAT_VERSION, "input": str(Path(image.path).resolve()),
                   "mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png",
                   "input_sha256": file_sha256(image.path), "input_bytes": os.path.getsize(image.path)})
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
    n_redone: int = 0  # of n_done: their JSON was written by another model or version
    n_assumed: int = 0  # plain images whose modality was assumed (MG: no --modality given)
    n_lesions: int = 0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    not_used: list[dict[str, str]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "inputs": self.n_inputs, "predicted": self.n_done,
                "skipped": self.n_skipped, "redone": self.n_redone, "failed": self.n_failed,
                "modality_assumed": self.n_assumed, "lesions": self.n_lesions, "models": self.models,
                "seconds": round(self.seconds, 3), "failures": self.failures, "not_used": self.not_used,
                "outputs": self.outputs}

    def print_summary(self, console: Any = None, max_failures: int = 20) -> None:
        from rich.console import Console
        from rich.table import Table

        from mammocad.console import print_failures

        console = console or Console()
        t = Table(title=f"predictions in {self.out_dir}", show_header=False)
        t.add_row("inputs", str(self.n_inputs))
        t.add_row("predicted in this run", str(self.n_done))
        if self.n_redone:
            t.add_row("  of which redone (written by another model)", str(self.n_redone))
        t.add_row("already done (skipped)", str(self.n_skipped))
        t.add_row("failed", f"[red]{self.n_failed}[/red]" if self.n_failed else "0")
        if self.n_assumed:
            t.add_row("modality assumed MG (plain images, no --modality)", f"[yellow]{self.n_assumed}[/yellow]")
        if self.not_used:
            t.add_row("paths in the input folders not used", f"{len(self.not_used)} (reasons in {SUMMARY_FILE})")
        t.add_row("lesions found", str(self.n_lesions))
        for name, m in self.models.items():
            t.add_row(f"model {name} {m['version']}", f"{m['images']} image(s)")
        t.add_row("time", f"{self.seconds:.1f} s")
        console.print(t)
        print_failures(console, f"failed inputs (also in {self.out_dir / SUMMARY_FILE})", "input",
                       [(f["input"], f["error"]) for f in self.failures], max_failures)


def predict_files(inputs: Sequence[str | Path], out_dir: str | Path, model: str | Path | None = None,
                  modality: str | None = None, overwrite: bool = False, progress: bool = True, device: str = "auto",
                  batch_size: int | None = None, autocast: str = "auto", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                  load_predictor: Callable[[str | Path], Any] | None = None) -> PredictReport:
    """Predict every input (see the module docstring); returns the report also written to summary.json.

    ``model`` (a bundle name or folder) is used for every input; without it the model is chosen per
    input by modality (``DEFAULT_MODELS``), ``modality`` being the one of plain images (None: MG,
    reported as assumed). Inputs over ``max_pixels`` pixels (None: no limit) are refused unread.
    ``load_predictor`` builds a predictor from a bundle name (default ``inference.compose.open_predictor``: a
    ``PipelinePredictor`` for a pipeline bundle, else ``Predictor``).
    """
    start = time.monotonic()
    if modality is not None:
        modality = str(modality).upper()
        if modality not in DEFAULT_MODELS:
            raise ConfigError("--modality", f"must be MG or US, got {modality!r}")
    if max_pixels is not None and max_pixels < 1:
        raise ConfigError("--max-pixels", f"must be at least 1, got {max_pixels}")
    out_dir = check_output_dir(out_dir, create=False)  # before any model loads; created when claimed
    if load_predictor is None:
        from mammocad.inference.compose import open_predictor

        def load_predictor(bundle: str | Path) -> Any:  # a pipeline bundle gets a PipelinePredictor
            return open_predictor(bundle, device=device, batch_size=batch_size, autocast=autocast)

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
        predictor_for(model)  # a bad --model is fatal before any work (and before --out is created)
    for item in inputs:  # outputs written into an input folder would be excluded from it: nothing left to read
        if Path(item).is_dir() and out_dir.resolve() == Path(item).resolve():
            raise InputError(out_dir, "is an input folder; write the predictions to another folder (--out)")
    with claim_output_dir(out_dir, "predict"):  # a second run into out_dir is refused while this one writes
        report = _run(inputs, out_dir, model, modality, overwrite, progress, max_pixels, predictor_for)
        report.seconds = time.monotonic() - start
        atomic_write_json(out_dir / SUMMARY_FILE, report.to_dict())  # inside the lock: no other run can interleave
    return report


def _stale_reason(existing: dict[str, Any], pred: Any, path: Path) -> str | None:
    """Why an earlier output of ``path`` cannot stand (None: it can, skip the input): another model or
    version wrote it, or the file's content changed since (size, then SHA-256: an image replaced
    under the same name must not keep its old result)."""
    written_by = (str(existing.get("model_name")), str(existing.get("model_version")))
    if written_by != (str(pred.name), str(pred.version)):
        return f"redone: written by model {written_by[0]} v{written_by[1]}"
    try:
        size = os.path.getsize(path)
    except OSError:
        return "redone: the input could not be checked"  # the read that follows reports why
    if existing.get("input_bytes") != size or existing.get("input_sha256") != file_sha256(path):
        return "redone: the input file changed since it was predicted"
    return None


def _run(inputs: Sequence[str | Path], out_dir: Path, model: str | Path | None, modality: str | None, overwrite: bool,
         progress: bool, max_pixels: int | None, predictor_for: Callable[[str | Path], Any]) -> PredictReport:
    """The loop over the inputs of ``predict_files``, in its claimed output folder."""
    from rich.console import Console

    from mammocad.console import progress_bar

    files, failures, not_used = expand_inputs(inputs, exclude=out_dir)
    report = PredictReport(out_dir=out_dir, n_inputs=len(files) + len(failures), failures=list(failures),
                           not_used=[n.to_dict() for n in not_used])
    stems = output_stems(files)
    console = Console(stderr=True)

    def fail(path: Path, err: MammocadError) -> None:
        message = str(err) if err.source else f"{path}: {err}"
        report.failures.append({"input": str(path), "error": message})
        report.outputs.append({"input": str(path), "status": "failed", "error": message})
        console.print(f"mammocad: {message}", markup=False, highlight=False, soft_wrap=True)

    def choose(path: Path) -> tuple[Any, str]:
        """The predictor for ``path`` and where its modality came from."""
        if model is not None:
            return predictor_for(model), "--model"
        found, source = input_modality(path, modality)
        return predictor_for(DEFAULT_MODELS[found]), source

    for f in failures:
        console.print(f"mammocad: {f['error']}", markup=False, highlight=False, soft_wrap=True)
    if not_used:
        console.print(f"mammocad: {len(not_used)} path(s) in the input folders not used (not images, hidden, "
                      f"output folders, ...): listed with their reasons in {out_dir / SUMMARY_FILE}",
                      markup=False, highlight=False, soft_wrap=True)
    with progress_bar(console, progress) as bar:
        task = bar.add_task("predict", total=len(files))
        for path in files:
            stem = stems[path]
            existing = _finished(out_dir / f"{stem}.json")
            if existing is not None and existing.get("input") != str(path.resolve()):
                stem = f"{stem}-{_path_hash(path)}"  # an earlier run gave this stem to another image: keep both
                existing = _finished(out_dir / f"{stem}.json")
            json_path = out_dir / f"{stem}.json"
            note = None
            try:
                pred, source = choose(path)
                report.n_assumed += source == "assumed"
                note = None if existing is None or overwrite else _stale_reason(existing, pred, path)
                if existing is not None and not overwrite and note is None:
                    report.n_skipped += 1
                    status, record = "skipped", existing
                else:
                    image = read_image(path, voi=pred.voi, max_pixels=max_pixels)
                    result = pred.predict_image(image)
                    result[0].attributes["modality_source"] = source
                    _remove_previous(out_dir, stem, existing)
                    record = write_outputs(out_dir, stem, image, result)
                    report.n_done += 1
                    report.n_redone += note is not None
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
                output = {"input": str(path), "stem": stem, "status": status, "json": json_path.name,
                          "lesions": len(record["lesions"]), "modality_source": source}
                if note:
                    output["note"] = note
                report.outputs.append(output)
            bar.advance(task)
    return report
