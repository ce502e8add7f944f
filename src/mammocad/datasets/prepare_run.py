"""``mammocad prepare``: adapter -> preprocess every case in worker processes -> prepared dataset.

The layout written is described in ``mammocad.datasets.prepared``. A run is resumable: a case is
finished when its entry (for the same Case record) is in cases.jsonl and its files exist; finished
cases are skipped on a re-run. Entries are appended one complete, fsynced line per finished case,
so a crash or Ctrl-C never loses finished work and never leaves a half entry that counts; the file
is rewritten sorted (atomically) when the run ends. Ctrl-C stops the worker processes at once
(the cases they were on are redone by the next run) and the KeyboardInterrupt reaches the caller.
One bad case is logged, recorded in failed.jsonl and skipped; the others finish. A lesion whose
outline leaves nothing on the prepared grid is recorded as lost, with the reason (see prepared.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

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
    from mammocad.records import REFUSED

    if case.attributes.get(REFUSED):  # the adapter refused it (a CT among mammograms): a failure, as stated
        return "failed", {"case_id": case.case_id, "image_path": case.image_path, "error": str(case.attributes[REFUSED])}
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
    this path (preprocessing is OpenCV/NumPy), so it needs no such setting.

    Workers ignore SIGINT: Ctrl-C in a terminal reaches the whole process group, and the parent
    alone decides what happens (it terminates the workers); a KeyboardInterrupt in each worker
    would only add tracebacks."""
    import cv2

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)


# Why a lesion has no mask on the prepared grid although its source annotation has geometry. Such a
# lesion is LOST, not missed: evaluation must not count it as a lesion the model failed to find.
LOST_EMPTY_SOURCE = "empty source annotation"
LOST_CROPPED_AWAY = "outside the prepared image (cropped away)"


def _map_mask(src: np.ndarray, geometry: Any, k: int, notes: list[str]) -> tuple[np.ndarray | None, str | None]:
    """A lesion mask on the original grid -> (mask on the prepared grid, None), or (None, why it is
    lost) when nothing of it is left there. A lesion smaller than a prepared pixel is not lost: it
    keeps the pixels it covers most."""
    src = np.asarray(src, dtype=bool)
    if not src.any():
        notes.append(f"lesion {k}: the source annotation is empty; recorded as lost")
        return None, LOST_EMPTY_SOURCE
    # Same result as kind="mask" (area/linear fraction >= 0.5) but on 0/255 uint8, which OpenCV
    # resizes ~2x faster than the float32 copy of a 13.6-megapixel mask.
    mask = geometry.forward_array(src.view(np.uint8) * np.uint8(255), kind="image") >= 128
    if not mask.any():
        cover = geometry.forward_array(src.astype(np.float32), kind="image")
        peak = float(cover.max())
        if peak <= 0:
            notes.append(f"lesion {k}: lies outside the prepared image (cropped away); recorded as lost")
            return None, LOST_CROPPED_AWAY
        mask = cover >= 0.5 * peak  # smaller than a prepared pixel: keep the pixels it covers most
        notes.append(f"lesion {k}: smaller than one prepared pixel; kept its most covered pixels")
    return mask, None


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
    lost: dict[str, str] = {}  # lesion index (JSON key) -> why it has no mask on the prepared grid
    for k, lesion in enumerate(case.lesions):
        src = rasterize_lesion(lesion, image.shape)  # on the ORIGINAL grid, where annotations live
        mask, why_lost = (None, None) if src is None else _map_mask(src, geometry, k, notes)
        if mask is None:  # no outline at all, or lost: no mask file, no box
            if why_lost is not None:
                lost[str(k)] = why_lost
            lesion_rels.append(None)
            boxes.append(None)
            continue
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
        "lost_lesions": lost,
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
        n_lost = s.get("lesions_lost", 0)
        reasons = ", ".join(f"{why}: {n}" for why, n in s.get("lesions_lost_by_reason", {}).items())
        t.add_row("lesions lost in preprocessing", f"[yellow]{n_lost}[/yellow] ({reasons})" if n_lost else "0")
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
    from mammocad.preprocess.pipeline import LEGACY_RECORD_DEFAULTS

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
            old_value = {**LEGACY_RECORD_DEFAULTS, **old_value}  # what a spec.json without newer fields meant
            diffs += [f"preprocess.{k}: {old_value.get(k)!r} -> {new_value.get(k)!r}"
                      for k in sorted(set(old_value) | set(new_value)) if old_value.get(k) != new_value.get(k)]
        elif old_value != new_value:
            diffs.append(f"{key}: {old_value!r} -> {new_value!r}")
    if diffs:
        raise ConfigError(path, "this folder was prepared with other settings (" + "; ".join(diffs)
                          + "); use another output folder or delete this one")


def _finished_entries(out_dir: Path, cases: list[Case]) -> dict[str, dict[str, Any]]:
    """Entries of cases.jsonl that are still valid: same Case record, all files present. Entries
    written before lost lesions were recorded (no "lost_lesions") are re-prepared: they may hold an
    empty mask for a lesion preprocessing lost, which evaluation would count as a missed lesion."""
    path = out_dir / CASES_FILE
    if not path.exists():
        return {}
    current = {c.case_id: _normalised(c.to_dict()) for c in cases}
    finished: dict[str, dict[str, Any]] = {}
    for entry in read_jsonl_lines(path):  # later lines win (a case re-prepared after a deletion)
        try:
            cid = entry["case"]["case_id"]
            rels = [entry["image"], entry["union_mask"], entry["breast_mask"], *(m for m in entry["lesion_masks"] if m)]
            if not isinstance(entry["lost_lesions"], dict):
                raise TypeError("lost_lesions is not an object")
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
    lost = Counter(why for e in entries for why in e.get("lost_lesions", {}).values())
    return {
        "dataset": report.dataset,
        "cases": len(cases),
        "patients": len({c.patient_id for c in cases}),
        "lesions": len(lesions),
        "lesions_with_mask": sum(m is not None for e in entries for m in e["lesion_masks"]),
        "lesions_lost": sum(lost.values()),  # had an outline, but nothing of it is on the prepared grid
        "lesions_lost_by_reason": dict(sorted(lost.items())),
        "by_label": dict(sorted(Counter(c.label for c in cases).items())),
        "by_pathology": dict(sorted(Counter(les.pathology for les in lesions).items())),
        "by_kind": dict(sorted(Counter(les.kind for les in lesions).items())),
        "by_modality": dict(sorted(Counter(c.modality for c in cases).items())),
        "failed": report.n_failed,
        "this_run": {"prepared": report.n_done, "skipped": report.n_skipped, "failed": report.n_failed},
        "seconds": round(report.seconds, 2),
    }


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while worker processes are started: an ignored signal stays ignored across the
    spawn's exec, so a Ctrl-C while a worker boots (imports take ~1 s) cannot kill it with a
    traceback before ``_init_worker`` runs. Only the main thread may set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop now: drop pending cases and kill the running ones (their files are written atomically
    and their entries never appended, so a re-run simply redoes them). ``shutdown(wait=False)``
    alone lets each worker finish its current case, seconds of work that would be thrown away
    while the user waits; Python < 3.14 has no public way to terminate the workers."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()


def _run_cases(todo: list[Case], out_dir: Path, spec: Any, workers: int, handle: Callable[[Result], None]) -> None:
    """Prepare ``todo``, in-process for workers=1 (easy debugging), else in spawned worker processes
    (spawn: no fork of a parent holding threads or an OpenMP pool). On Ctrl-C the workers are
    stopped at once and the KeyboardInterrupt goes on to the caller; cases already handled stay."""
    if not todo:  # a re-run of a finished dataset: nothing to do (and a pool of 0 workers is an error)
        return
    if workers == 1 or len(todo) == 1:
        for case in todo:
            handle(prepare_case(case, out_dir, spec))
        return
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_init_worker)
    try:
        with _sigint_ignored():  # the workers start while the cases are submitted
            futures: dict[Future, Case] = {pool.submit(prepare_case, c, str(out_dir), spec): c for c in todo}
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
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)


def prepare_dataset(dataset: str, raw_dir: str | Path, out_dir: str | Path, spec: Any = None, workers: int = 1,
                    adapter_options: dict[str, Any] | None = None, progress: bool = True) -> PrepareReport:
    """Read ``raw_dir`` with adapter ``dataset``, preprocess every case with ``spec`` (default
    ``PreprocessSpec()``) in ``workers`` processes and write (or resume) the prepared dataset in ``out_dir``.

    ``out_dir`` is claimed first (``mammocad.io.outdir``): an unwritable folder is a one-line error
    before the adapter reads anything, and a second prepare into the same folder is refused while
    this one runs. Adapter failures (MammocadError) propagate; failures of single cases are in the
    report. DICOM reading options for a case come from ``case.attributes["dicom_options"]`` when an
    adapter sets it.
    """
    from mammocad.io.outdir import claim_output_dir
    from mammocad.preprocess.pipeline import PreprocessSpec

    start = time.monotonic()
    if workers < 1:
        raise ConfigError("--workers", f"must be at least 1, got {workers}")
    spec = spec if spec is not None else PreprocessSpec()
    with claim_output_dir(out_dir, "prepare") as claimed:
        return _prepare_claimed(dataset, Path(raw_dir), claimed, spec, workers, dict(adapter_options or {}),
                                progress, start)


def _prepare_claimed(dataset: str, raw_dir: Path, out_dir: Path, spec: Any, workers: int, options: dict[str, Any],
                     progress: bool, start: float) -> PrepareReport:
    """``prepare_dataset`` once ``out_dir`` is ours."""
    from rich.console import Console
    from mammocad.console import progress_bar

    from mammocad import __version__
    from mammocad.datasets.registry import read_cases
    from mammocad.io.atomic import atomic_write_json, atomic_write_text
    from mammocad.records import write_jsonl

    cases = read_cases(dataset, raw_dir, **options)
    seen: set[str] = set()
    for c in cases:
        if c.case_id in seen:
            raise InputError(raw_dir, f"the {dataset} adapter returned case id {c.case_id!r} twice")
        seen.add(c.case_id)
    modalities = sorted({c.modality for c in cases})
    if len(modalities) == 1:  # record the spec every case really went through (US cases: the US pipeline)
        spec = spec.for_modality(modalities[0])
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
