"""``mammocad prepare``: adapter -> preprocess every case in worker processes -> prepared dataset.

The layout written is described in ``mammocad.datasets.prepared``. A run is resumable: a case is
finished when its entry (for the same Case record) is in cases.jsonl and its files exist; finished
cases are skipped on a re-run. Entries are appended one complete, fsynced line per finished case,
so a crash or Ctrl-C never loses finished work and never leaves a half entry that counts; the file
is rewritten sorted (atomically) when the run ends. One bad case is logged, recorded in
failed.jsonl and skipped; the others finish.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mammocad.datasets.prepared import (CASES_FILE, FAILED_FILE, FORMAT_VERSION, SPEC_FILE, SUMMARY_FILE,
                                        case_file_stem, read_jsonl_lines)
from mammocad.errors import ConfigError, InputError, MammocadError
from mammocad.records import Case

log = logging.getLogger(__name__)
Result = tuple[str, dict[str, Any]]  # ("done", cases.jsonl entry) | ("failed", failed.jsonl entry)


# ---- one case (runs in a worker process) -------------------------------------------------------
def prepare_case(case: Case, out_dir: str | Path, spec: Any) -> Result:
    """Prepare one case into ``out_dir``; never raises for a bad case (returns a failure record)."""
    try:
        return "done", _prepare(case, Path(out_dir), spec)
    except MammocadError as err:
        msg = str(err) if err.source is not None else f"{case.image_path}: {err.cause}"
    except Exception as exc:  # a decoder/OpenCV error on one file must not stop the batch
        msg = f"{case.image_path}: {type(exc).__name__}: {' '.join(str(exc).split())}"
    return "failed", {"case_id": case.case_id, "image_path": case.image_path, "error": msg}


def _init_worker() -> None:
    """Runs once in each worker process: one OpenCV thread per worker. Each worker already gets a
    core; OpenCV's default pool (one thread per core) in every worker would oversubscribe the CPU
    (2 workers x 2 threads on 2 cores) and slow all of them down. torch is never imported on
    this path (preprocessing is OpenCV/NumPy), so it needs no such setting."""
    import cv2

    cv2.setNumThreads(1)


def _map_mask(src: np.ndarray, geometry: Any, k: int, notes: list[str]) -> np.ndarray:
    """A lesion mask on the original grid -> the prepared grid, never silently losing a lesion."""
    src = np.asarray(src, dtype=bool)
    if not src.any():
        notes.append(f"lesion {k}: the source annotation is empty")
        return np.zeros(geometry.size, dtype=bool)
    # Same result as kind="mask" (area/linear fraction >= 0.5) but on 0/255 uint8, which OpenCV
    # resizes ~2x faster than the float32 copy of a 13.6-megapixel mask.
    mask = geometry.forward_array(src.view(np.uint8) * np.uint8(255), kind="image") >= 128
    if not mask.any():
        cover = geometry.forward_array(src.astype(np.float32), kind="image")
        peak = float(cover.max())
        if peak > 0:  # smaller than a prepared pixel: keep the pixels it covers most
            mask = cover >= 0.5 * peak
            notes.append(f"lesion {k}: smaller than one prepared pixel; kept its most covered pixels")
        else:
            notes.append(f"lesion {k}: lies outside the prepared image (cropped away)")
    return mask


def _prepare(case: Case, out_dir: Path, spec: Any) -> dict[str, Any]:
    from mammocad.datasets.dedup import image_hashes
    from mammocad.datasets.rasterize import mask_to_box, rasterize_lesion
    from mammocad.io.images import float_to_uint16, read_image, write_png
    from mammocad.preprocess.pipeline import preprocess_image

    image = read_image(case.image_path, **dict(case.attributes.get("dicom_options") or {}))
    result = preprocess_image(image, spec.for_modality(case.modality), laterality=case.laterality)
    geometry = result.geometry
    size = tuple(geometry.size)
    if tuple(result.pixels.shape[:2]) != size or tuple(result.breast_mask.shape[:2]) != size:
        raise MammocadError(case.image_path, f"preprocessing returned {result.pixels.shape} pixels for a "
                                             f"{size} geometry (internal error)")
    stem = case_file_stem(case.case_id)
    image_rel, mask_dir = f"images/{stem}.png", f"masks/{stem}"
    notes = list(result.notes)
    union = np.zeros(size, dtype=bool)
    lesion_rels: list[str | None] = []
    boxes: list[list[float] | None] = []
    for k, lesion in enumerate(case.lesions):
        src = rasterize_lesion(lesion, image.shape)  # on the ORIGINAL grid, where annotations live
        if src is None:
            lesion_rels.append(None)
            boxes.append(None)
            continue
        mask = _map_mask(src, geometry, k, notes)
        union |= mask
        rel = f"{mask_dir}/lesion_{k}.png"
        write_png(out_dir / rel, mask)
        lesion_rels.append(rel)
        box = mask_to_box(mask)
        boxes.append(None if box is None else [float(v) for v in box])
    write_png(out_dir / f"{mask_dir}/union.png", union)
    write_png(out_dir / f"{mask_dir}/breast.png", result.breast_mask.astype(bool))
    write_png(out_dir / image_rel, float_to_uint16(result.pixels))
    return {
        "case": json.loads(json.dumps(case.to_dict())),
        "geometry": geometry.to_dict(),
        "image": image_rel,
        "lesion_masks": lesion_rels,
        "union_mask": f"{mask_dir}/union.png",
        "breast_mask": f"{mask_dir}/breast.png",
        "notes": notes,
        "lesion_boxes": boxes,
        **image_hashes(result.pixels),  # "phash" (64-bit) and "phash256" (its confirmation, see dedup.py)
        "laterality_from_pixels": getattr(result, "laterality_from_pixels", None),
    }


# ---- the run -----------------------------------------------------------------------------------
@dataclass
class PrepareReport:
    """What one ``prepare_dataset`` run did; ``summary`` is what summary.json holds."""

    out_dir: Path
    dataset: str
    n_cases: int  # cases the adapter read
    n_done: int = 0  # prepared in this run
    n_skipped: int = 0  # already prepared by an earlier run
    failures: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    def print_summary(self, console: Any = None, max_failures: int = 20) -> None:
        from rich.console import Console
        from rich.table import Table

        from mammocad.console import print_failures

        console = console or Console()
        s = self.summary
        t = Table(title=f"prepared dataset {self.out_dir}", show_header=False)
        t.add_row("cases read by the adapter", str(self.n_cases))
        t.add_row("prepared in this run", str(self.n_done))
        t.add_row("already prepared (skipped)", str(self.n_skipped))
        t.add_row("failed", f"[red]{self.n_failed}[/red]" if self.n_failed else "0")
        t.add_row("cases in the dataset", str(s.get("cases", 0)))
        t.add_row("patients", str(s.get("patients", 0)))
        t.add_row("lesions (with a mask)", f"{s.get('lesions', 0)} ({s.get('lesions_with_mask', 0)})")
        for key, title in (("by_label", "image labels"), ("by_pathology", "lesion pathology"), ("by_kind", "lesion kinds")):
            t.add_row(title, ", ".join(f"{k} {v}" for k, v in s.get(key, {}).items()) or "-")
        t.add_row("time", f"{self.seconds:.1f} s")
        console.print(t)
        print_failures(console, f"failed cases (also in {self.out_dir / FAILED_FILE})", "case",
                       [(f["case_id"], f["error"]) for f in self.failures], max_failures)


def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def _check_spec(out_dir: Path, record: dict[str, Any]) -> None:
    """Write spec.json on the first run; on a re-run refuse anything different."""
    from mammocad.io.atomic import atomic_write_json

    path = out_dir / SPEC_FILE
    if not path.exists():
        atomic_write_json(path, record, sort_keys=True)
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable ({exc}); delete the output folder to start over") from None
    diffs = []
    for key, new_value in record.items():
        old_value = old.get(key) if isinstance(old, dict) else None
        if key == "preprocess" and isinstance(old_value, dict):
            diffs += [f"preprocess.{k}: {old_value.get(k)!r} -> {new_value.get(k)!r}"
                      for k in sorted(set(old_value) | set(new_value)) if old_value.get(k) != new_value.get(k)]
        elif old_value != new_value:
            diffs.append(f"{key}: {old_value!r} -> {new_value!r}")
    if diffs:
        raise ConfigError(path, "this folder was prepared with other settings (" + "; ".join(diffs)
                          + "); use another output folder or delete this one")


def _finished_entries(out_dir: Path, cases: list[Case]) -> dict[str, dict[str, Any]]:
    """Entries of cases.jsonl that are still valid: same Case record, all files present."""
    path = out_dir / CASES_FILE
    if not path.exists():
        return {}
    current = {c.case_id: _normalised(c.to_dict()) for c in cases}
    finished: dict[str, dict[str, Any]] = {}
    for entry in read_jsonl_lines(path):  # later lines win (a case re-prepared after a deletion)
        try:
            cid = entry["case"]["case_id"]
            rels = [entry["image"], entry["union_mask"], entry["breast_mask"], *(m for m in entry["lesion_masks"] if m)]
        except (KeyError, TypeError):
            continue  # not an entry of ours: re-prepare that case
        if current.get(cid) == _normalised(entry["case"]) and all((out_dir / r).is_file() for r in rels):
            finished[cid] = entry
        else:
            finished.pop(cid, None)
    return finished


def _clean_partials(out_dir: Path) -> int:
    """Remove temporary ``.*.part`` files left by an interrupted atomic write."""
    n = 0
    for sub in (out_dir, out_dir / "images", out_dir / "masks"):
        if sub.is_dir():
            for p in (sub.rglob(".*.part") if sub != out_dir else sub.glob(".*.part")):
                p.unlink(missing_ok=True)
                n += 1
    return n


def _summary(entries: list[dict[str, Any]], report: PrepareReport) -> dict[str, Any]:
    cases = [Case.from_dict(e["case"]) for e in entries]
    lesions = [les for c in cases for les in c.lesions]
    return {
        "dataset": report.dataset,
        "cases": len(cases),
        "patients": len({c.patient_id for c in cases}),
        "lesions": len(lesions),
        "lesions_with_mask": sum(m is not None for e in entries for m in e["lesion_masks"]),
        "by_label": dict(sorted(Counter(c.label for c in cases).items())),
        "by_pathology": dict(sorted(Counter(les.pathology for les in lesions).items())),
        "by_kind": dict(sorted(Counter(les.kind for les in lesions).items())),
        "by_modality": dict(sorted(Counter(c.modality for c in cases).items())),
        "failed": report.n_failed,
        "this_run": {"prepared": report.n_done, "skipped": report.n_skipped, "failed": report.n_failed},
        "seconds": round(report.seconds, 2),
    }


def _run_cases(todo: list[Case], out_dir: Path, spec: Any, workers: int, handle: Callable[[Result], None]) -> None:
    """Prepare ``todo``, in-process for workers=1 (easy debugging), else in spawned worker processes
    (spawn: no fork of a parent holding threads or an OpenMP pool)."""
    if workers == 1 or len(todo) == 1:
        for case in todo:
            handle(prepare_case(case, out_dir, spec))
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_init_worker) as pool:
        futures: dict[Future, Case] = {pool.submit(prepare_case, c, str(out_dir), spec): c for c in todo}
        try:
            for fut in as_completed(futures):
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    case = futures[fut]
                    result = ("failed", {"case_id": case.case_id, "image_path": case.image_path,
                                         "error": f"{case.image_path}: a worker process died (out of memory or a "
                                                  "crash in a decoder) while this case was pending; re-run to retry"})
                handle(result)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def prepare_dataset(dataset: str, raw_dir: str | Path, out_dir: str | Path, spec: Any = None, workers: int = 1,
                    adapter_options: dict[str, Any] | None = None, progress: bool = True) -> PrepareReport:
    """Read ``raw_dir`` with adapter ``dataset``, preprocess every case with ``spec`` (default
    ``PreprocessSpec()``) in ``workers`` processes and write (or resume) the prepared dataset in ``out_dir``.

    Adapter failures (MammocadError) propagate; failures of single cases are in the report.
    DICOM reading options for a case come from ``case.attributes["dicom_options"]`` when an adapter sets it.
    """
    from rich.console import Console
    from mammocad.console import progress_bar

    from mammocad import __version__
    from mammocad.datasets.registry import read_cases
    from mammocad.io.atomic import atomic_write_json, atomic_write_text
    from mammocad.preprocess.pipeline import PreprocessSpec
    from mammocad.records import write_jsonl

    start = time.monotonic()
    if workers < 1:
        raise ConfigError("--workers", f"must be at least 1, got {workers}")
    spec = spec if spec is not None else PreprocessSpec()
    options = dict(adapter_options or {})
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    cases = read_cases(dataset, raw_dir, **options)
    seen: set[str] = set()
    for c in cases:
        if c.case_id in seen:
            raise InputError(raw_dir, f"the {dataset} adapter returned case id {c.case_id!r} twice")
        seen.add(c.case_id)
    modalities = sorted({c.modality for c in cases})
    if len(modalities) == 1:  # record the spec every case really went through (US cases: the US pipeline)
        spec = spec.for_modality(modalities[0])
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_spec(out_dir, _normalised({
        "format": FORMAT_VERSION, "mammocad_version": __version__, "adapter": dataset,
        "adapter_options": options, "raw_dir": str(raw_dir.resolve()), "preprocess": spec.model_dump(mode="json"),
    }))
    _clean_partials(out_dir)
    finished = _finished_entries(out_dir, cases)
    write_jsonl(out_dir / CASES_FILE, [finished[k] for k in sorted(finished)])  # drops stale lines, partial tail
    atomic_write_text(out_dir / FAILED_FILE, "")  # failed.jsonl describes the last run only
    report = PrepareReport(out_dir=out_dir, dataset=dataset, n_cases=len(cases), n_skipped=len(finished))
    todo = [c for c in cases if c.case_id not in finished]
    console = Console(stderr=True)
    if finished:
        console.print(f"mammocad: {len(finished)} of {len(cases)} cases already prepared in {out_dir}; skipped")

    with open(out_dir / CASES_FILE, "a", encoding="utf-8") as cases_fh, \
            open(out_dir / FAILED_FILE, "a", encoding="utf-8") as failed_fh, \
            progress_bar(console, progress) as bar:
        task = bar.add_task(f"prepare {dataset}", total=len(todo))

        def handle(result: Result) -> None:
            status, record = result
            fh = cases_fh if status == "done" else failed_fh
            fh.write(json.dumps(record, sort_keys=True) + "\n")  # one complete line, durable before we go on
            fh.flush()
            os.fsync(fh.fileno())
            if status == "done":
                finished[record["case"]["case_id"]] = record
                report.n_done += 1
            else:
                log.error("%s", record["error"])
                report.failures.append(record)
            bar.advance(task)

        _run_cases(todo, out_dir, spec, workers, handle)

    entries = [finished[k] for k in sorted(finished)]
    write_jsonl(out_dir / CASES_FILE, entries)
    report.seconds = time.monotonic() - start
    report.summary = _summary(entries, report)
    atomic_write_json(out_dir / SUMMARY_FILE, report.summary)
    return report
