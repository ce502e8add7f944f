"""``mammocad prepare`` end to end: synthetic folder datasets, real mini-MIAS and BUSI subsets
(symlinked, never copied), resume after a simulated crash, bad cases, spec changes, the reader."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import REPO, shared_path
from mammocad.cli import app
from mammocad.datasets.prepared import PreparedDataset
from mammocad.datasets.rasterize import mask_to_box, rasterize_lesion
from mammocad.datasets.splits import audit_splits
from mammocad.errors import ConfigError, InputError
from mammocad.preprocess.pipeline import PreprocessSpec

SPEC = PreprocessSpec(long_side=256)


def synth_image(rng: np.random.Generator, h: int, w: int, side: str, discs: list[tuple[float, float, float]]) -> np.ndarray:
    """8-bit film-like image: textured half-ellipse breast on the chest-wall side, brighter discs."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    x_wall = xx if side == "L" else (w - 1 - xx)
    breast = (x_wall / (0.75 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2 <= 1
    texture = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 3) * 0.6
    img = np.where(breast, 0.45 + texture * 0.15, 0.03)
    for cx, cy, r in discs:
        img = np.where((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r, img + 0.3, img)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def disc_mask(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r).astype(np.uint8) * 255


# (stem, patient, side, label, discs): 2 lesions on a, 1 on c, normals b and d
FOLDER_CASES = [
    ("a", "p1", "L", "malignant", [(60.0, 90.0, 14.0), (90.0, 200.0, 10.0)]),
    ("b", "p1", "R", "normal", []),
    ("c", "p2", "R", "benign", [(170.0, 150.0, 16.0)]),
    ("d", "p3", "L", "normal", []),
]


def make_folder_dataset(root: Path, cases=FOLDER_CASES, h: int = 300, w: int = 240, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for stem, patient, side, label, discs in cases:
        cv2.imwrite(str(root / "images" / f"{stem}.png"), synth_image(rng, h, w, side, discs))
        for k, disc in enumerate(discs):
            name = f"{stem}_mask.png" if k == 0 else f"{stem}_mask_{k}.png"
            cv2.imwrite(str(root / "masks" / name), disc_mask(h, w, *disc))
        rows.append({"image": f"{stem}.png", "label": label, "patient_id": patient, "laterality": side,
                     "pathology": "" if label == "normal" else label})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def check_prepared_case(ds: PreparedDataset, pc, min_radius_iou: float | None = None) -> None:
    """Invariants every prepared case must satisfy; with lesions, round-trip of each mask."""
    img = ds.load_image(pc)
    assert img.dtype == np.float32 and img.shape == pc.size and 0.0 <= img.min() and img.max() <= 1.0 and img.max() > 0.5
    breast = ds.load_breast_mask(pc)
    assert breast.shape == pc.size and breast.mean() > 0.2
    lesion_masks = ds.load_lesion_masks(pc)
    union = ds.load_union_mask(pc)
    expected = np.zeros(pc.size, bool)
    for k, (lesion, mask) in enumerate(zip(pc.case.lesions, lesion_masks)):
        if not lesion.has_geometry:
            assert mask is None and pc.boxes[k] is None
            continue
        expected |= mask
        assert mask.any(), f"{pc.case_id} lesion {k} is empty"
        assert pc.boxes[k] == list(mask_to_box(mask))
        if min_radius_iou is not None:  # back to the original grid: compare with the annotation there
            source = rasterize_lesion(lesion, pc.geometry.source_size)
            back = pc.geometry.inverse_array(mask, kind="mask").astype(bool)
            assert iou(back, source) >= min_radius_iou, (pc.case_id, k, iou(back, source))
    assert np.array_equal(union, expected)  # union == OR of the lesion masks (empty for normals)


def test_prepare_folder_dataset_end_to_end(tmp_path):
    raw = make_folder_dataset(tmp_path / "raw")
    report = prepare_and_check(raw, tmp_path / "out")
    assert (report.n_done, report.n_skipped, report.n_failed) == (4, 0, 0)
    ds = PreparedDataset(tmp_path / "out")
    assert [pc.case_id for pc in ds.cases] == ["a", "b", "c", "d"]
    assert ds.spec == SPEC and ds.spec_record["adapter"] == "folder"
    a, b, c = ds.by_id("a"), ds.by_id("b"), ds.by_id("c")
    assert len(a.lesion_mask_paths) == 2 and b.lesion_mask_paths == [] and not ds.load_union_mask(b).any()
    assert all(max(pc.size) == 256 for pc in ds.cases) and a.laterality_from_pixels == "L" and c.laterality_from_pixels == "R"
    assert [s["op"] for s in c.geometry.steps][-1] == "flip"  # right breast turned to the canonical side
    for pc in ds.cases:
        check_prepared_case(ds, pc, min_radius_iou=0.9)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cases"] == 4 and summary["patients"] == 3 and summary["lesions"] == 3
    assert summary["by_label"] == {"benign": 1, "malignant": 1, "normal": 2}
    assert (tmp_path / "out" / "failed.jsonl").read_text() == ""
    with pytest.raises(InputError, match="no case"):
        ds.by_id("zz")


def prepare_and_check(raw: Path, out: Path, **kw):
    from mammocad.datasets.prepared import prepare_dataset

    return prepare_dataset("folder", raw, out, spec=kw.pop("spec", SPEC), workers=kw.pop("workers", 1), progress=False, **kw)


def test_resume_after_a_crash_redoes_only_missing_cases(tmp_path):
    raw = make_folder_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    prepare_and_check(raw, out)
    before = (out / "images" / "c.png").read_bytes()
    # crash simulation: c's image lost, a's entry never appended, a half-written line and .part files
    (out / "images" / "c.png").unlink()
    lines = (out / "cases.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["case"]["case_id"] != "a"]
    (out / "cases.jsonl").write_text("\n".join(kept) + "\n" + '{"case": {"case_id": "d", "pat')
    (out / "images" / ".b.png.x1.part").write_bytes(b"junk")
    (out / "masks" / "a" / ".union.png.x2.part").write_bytes(b"junk")
    assert len(PreparedDataset(out).cases) == 3  # the reader ignores the partial last line
    report = prepare_and_check(raw, out)
    assert (report.n_done, report.n_skipped, report.n_failed) == (2, 2, 0)
    assert not list(out.rglob("*.part"))
    assert (out / "images" / "c.png").read_bytes() == before  # deterministic re-preparation
    entries = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert [e["case"]["case_id"] for e in entries] == ["a", "b", "c", "d"]
    again = prepare_and_check(raw, out)
    assert (again.n_done, again.n_skipped) == (0, 4)


def test_keyboard_interrupt_keeps_finished_cases(tmp_path, monkeypatch):
    from mammocad.datasets import prepare_run

    raw = make_folder_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    real, calls = prepare_run.prepare_case, []

    def interrupted_on_third(case, out_dir, spec):
        calls.append(case.case_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(case, out_dir, spec)

    monkeypatch.setattr(prepare_run, "prepare_case", interrupted_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_and_check(raw, out)
    assert [pc.case_id for pc in PreparedDataset(out).cases] == calls[:2]
    monkeypatch.setattr(prepare_run, "prepare_case", real)
    report = prepare_and_check(raw, out)
    assert (report.n_done, report.n_skipped) == (2, 2)


def test_bad_cases_fail_alone_and_cli_exits_1(tmp_path):
    raw = make_folder_dataset(tmp_path / "raw")
    (raw / "images" / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # unreadable image
    cv2.imwrite(str(raw / "images" / "f.png"), synth_image(np.random.default_rng(1), 300, 240, "L", []))
    cv2.imwrite(str(raw / "masks" / "f_mask.png"), np.full((100, 300), 255, np.uint8))  # other aspect ratio
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["prepare", "folder", str(raw), str(out), "--size", "256", "--workers", "1"])
    assert result.exit_code == 1, result.output
    failed = {f["case_id"]: f for f in map(json.loads, (out / "failed.jsonl").read_text().splitlines())}
    assert sorted(failed) == ["e", "f"]
    assert failed["e"]["error"].startswith(str(raw / "images" / "e.png") + ": ")
    assert str(raw / "masks" / "f_mask.png") in failed["f"]["error"] and "aspect" in failed["f"]["error"]
    assert [pc.case_id for pc in PreparedDataset(out).cases] == ["a", "b", "c", "d"]
    assert "failed cases" in result.output
    (raw / "images" / "e.png").unlink()
    (raw / "masks" / "f_mask.png").unlink()  # f becomes an unannotated image: prepared on the re-run
    result = CliRunner().invoke(app, ["prepare", "folder", str(raw), str(out), "--size", "256", "--workers", "1"])
    assert result.exit_code == 0 and (out / "failed.jsonl").read_text() == ""  # the LAST run's failures only


@pytest.mark.slow
def test_cli_subprocess_with_two_workers_logs_one_line_per_bad_case(tmp_path):
    raw = make_folder_dataset(tmp_path / "raw")
    bad = raw / "images" / "e.png"
    bad.write_bytes(b"garbage")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "mammocad.cli", "prepare", "folder", str(raw), str(out), "--size", "256",
                           "--workers", "2"], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 1, proc.stderr
    assert f"mammocad: {bad}: " in proc.stderr and "Traceback" not in proc.stderr
    assert len(PreparedDataset(out).cases) == 4


def test_different_spec_into_same_out_is_an_error(tmp_path):
    raw = make_folder_dataset(tmp_path / "raw", cases=FOLDER_CASES[:1])
    out = tmp_path / "out"
    prepare_and_check(raw, out)
    with pytest.raises(ConfigError, match=r"preprocess\.clahe: False -> True"):
        prepare_and_check(raw, out, spec=SPEC.model_copy(update={"clahe": True}))
    with pytest.raises(ConfigError, match="adapter_options"):
        prepare_and_check(raw, out, adapter_options={"no_mask_means": "normal"})
    assert json.loads((out / "spec.json").read_text())["preprocess"]["clahe"] is False


def test_reader_and_adapter_errors_name_the_folder(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        PreparedDataset(tmp_path / "nope")
    with pytest.raises(InputError, match="spec.json is missing"):
        PreparedDataset(tmp_path)
    with pytest.raises(InputError, match="images"):  # the folder adapter's own error propagates
        prepare_and_check(tmp_path, tmp_path / "out")


def test_same_image_under_two_patients_is_caught_by_the_audit(tmp_path):
    """A real near-duplicate (one film exported under two patient ids) crossing splits fails the audit."""
    raw = make_folder_dataset(tmp_path / "raw")
    (raw / "images" / "dup.png").write_bytes((raw / "images" / "d.png").read_bytes())
    with open(raw / "labels.csv", "a", newline="") as fh:
        fh.write("dup.png,normal,p9,L,\n")
    out = tmp_path / "out"
    prepare_and_check(raw, out)
    ds = PreparedDataset(out)
    assert ds.by_id("dup").phash == ds.by_id("d").phash
    splits = {"version": 1, "folds": [{"train": ["a", "b", "d"], "val": ["c"], "test": ["dup"]}]}
    (out / "splits.json").write_text(json.dumps(splits))
    report = audit_splits(out)
    assert [(leak["kind"], sorted(leak["case_ids"]), leak["distance"]) for leak in report.leaks] == \
        [("near-duplicate", ["d", "dup"], 0)]
    splits["folds"][0] = {"train": ["a", "b", "d", "dup"], "val": ["c"], "test": []}
    (out / "splits.json").write_text(json.dumps(splits))
    assert audit_splits(out).ok


# ---- real data ---------------------------------------------------------------------------------
MIAS_SUBSET = ["mdb001", "mdb002", "mdb003", "mdb004", "mdb028", "mdb212", "mdb223"]


def mias_subset(tmp_path: Path) -> Path:
    """Info.txt lines of a few films + symlinks to the real images (no copies)."""
    mias = shared_path("mias")
    raw = tmp_path / "mias"
    (raw / "images").mkdir(parents=True)
    lines = [line for line in (mias / "Info.txt").read_text(encoding="latin-1").splitlines()
             if line.split()[:1] and line.split()[0] in MIAS_SUBSET]
    (raw / "Info.txt").write_text("\n".join(lines) + "\n")
    for ref in MIAS_SUBSET:
        (raw / "images" / f"{ref}.png").symlink_to(mias / "images" / f"{ref}.png")
    return raw


@pytest.mark.realdata
def test_real_mias_subset(tmp_path):
    from mammocad.datasets.prepared import prepare_dataset

    mias = shared_path("mias")
    report = prepare_dataset("mias", mias_subset(tmp_path), tmp_path / "out", spec=PreprocessSpec(), workers=1, progress=False)
    assert report.n_failed == 0
    with open(mias / "abnormalities.csv", newline="") as fh:
        abn = [r for r in csv.DictReader(fh) if r["refnum"] in MIAS_SUBSET]
    with open(mias / "images.csv", newline="") as fh:
        labels = {r["refnum"]: r["image_label"] for r in csv.DictReader(fh) if r["refnum"] in MIAS_SUBSET}
    ds = PreparedDataset(tmp_path / "out")
    assert sorted(pc.case_id for pc in ds.cases) == sorted(MIAS_SUBSET)
    assert sum(len(pc.case.lesions) for pc in ds.cases) == len(abn)
    for pc in ds.cases:
        assert pc.label == labels[pc.case_id]
        radii = [float(r["radius"]) for r in abn if r["refnum"] == pc.case_id]
        check_prepared_case(ds, pc, min_radius_iou=0.9 if radii and min(radii) >= 10 else None)
        if radii:  # the union mapped back to the film matches the dataset's own mask file
            back = pc.geometry.inverse_array(ds.load_union_mask(pc), kind="mask").astype(bool)
            truth = cv2.imread(str(mias / "masks" / f"{pc.case_id}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
            assert iou(back, truth) >= (0.9 if min(radii) >= 10 else 0.5), pc.case_id


@pytest.mark.realdata
def test_real_busi_subset(tmp_path):
    from mammocad.datasets.prepared import prepare_dataset

    busi = shared_path("busi")
    with open(busi / "images.csv", newline="") as fh:
        rows = {r["image_file"]: r for r in csv.DictReader(fh)}
    chosen = ["benign/benign (25).png", "benign/benign (16).png", "malignant/malignant (1).png", "normal/normal (1).png"]
    raw = tmp_path / "busi"
    for name in chosen:
        for f in [name, *filter(None, rows[name]["mask_files"].split(";"))]:
            (raw / f).parent.mkdir(parents=True, exist_ok=True)
            (raw / f).symlink_to(busi / f)
    report = prepare_dataset("busi", raw, tmp_path / "out", spec=PreprocessSpec(long_side=512), workers=1, progress=False)
    assert report.n_failed == 0 and report.n_done == 4
    ds = PreparedDataset(tmp_path / "out")
    for name in chosen:
        r = rows[name]
        pc = ds.by_id(f"{r['label']}_{r['busi_id']}")
        assert pc.geometry.source_size == (int(r["height"]), int(r["width"]))
        n_lesions = 0 if r["label"] == "normal" else int(r["n_mask_files"])
        assert len(pc.case.lesions) == n_lesions and pc.case.modality == "US"
        check_prepared_case(ds, pc, min_radius_iou=0.9)
        back = pc.geometry.inverse_array(ds.load_union_mask(pc), kind="mask").astype(bool)
        assert abs(int(back.sum()) - int(r["lesion_pixels"])) <= 0.1 * int(r["lesion_pixels"]) + 1


@pytest.mark.slow
@pytest.mark.realdata
def test_real_mias_full_cli_with_two_workers_then_split_and_audit(tmp_path):
    mias = shared_path("mias")
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["prepare", "mias", str(mias), str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    with open(mias / "images.csv", newline="") as fh:
        images = list(csv.DictReader(fh))
    with open(mias / "abnormalities.csv", newline="") as fh:
        n_abn = sum(1 for _ in csv.DictReader(fh))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == len(images) and summary["lesions"] == n_abn
    assert summary["patients"] == len({r["patient_id"] for r in images})
    labels = {}
    for r in images:
        labels[r["image_label"]] = labels.get(r["image_label"], 0) + 1
    assert summary["by_label"] == dict(sorted(labels.items()))
    assert runner.invoke(app, ["split", str(out), "--folds", "3"]).exit_code == 0
    audit = runner.invoke(app, ["audit", str(out)])
    assert audit.exit_code == 0, audit.output


def test_spec_records_the_modality_the_cases_went_through(tmp_path):
    """A US dataset prepared with the default (MG) spec records the US pipeline it really got."""
    import cv2
    import numpy as np

    from mammocad.datasets.prepared import PreparedDataset, prepare_dataset

    raw = tmp_path / "busi" / "benign"
    raw.mkdir(parents=True)
    img = np.full((60, 80), 90, np.uint8)
    img[20:40, 30:50] = 30
    mask = np.zeros_like(img)
    mask[20:40, 30:50] = 255
    cv2.imwrite(str(raw / "benign (1).png"), img)
    cv2.imwrite(str(raw / "benign (1)_mask.png"), mask)
    prepare_dataset("busi", tmp_path / "busi", tmp_path / "out", workers=1, progress=False)
    assert PreparedDataset(tmp_path / "out").spec.modality == "US"


class _InProcessPool:
    """Stands in for ProcessPoolExecutor: records its arguments, runs the initializer and the jobs here."""

    created: list[dict] = []

    def __init__(self, **kwargs):
        _InProcessPool.created.append(kwargs)
        kwargs["initializer"]()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        from concurrent.futures import Future

        fut = Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self, **kw):
        pass


def test_worker_pool_limits_opencv_to_one_thread_per_worker(tmp_path, monkeypatch):
    from mammocad.datasets import prepare_run

    import signal

    before, sigint_before = cv2.getNumThreads(), signal.getsignal(signal.SIGINT)
    cv2.setNumThreads(4)  # what a 4-core machine gives each worker by default
    _InProcessPool.created.clear()
    monkeypatch.setattr(prepare_run, "ProcessPoolExecutor", _InProcessPool)
    try:
        report = prepare_and_check(make_folder_dataset(tmp_path / "raw"), tmp_path / "out", workers=2)
        threads_in_worker, sigint_in_worker = cv2.getNumThreads(), signal.getsignal(signal.SIGINT)
    finally:  # the initializer ran in this process: give it back its Ctrl-C
        cv2.setNumThreads(before)
        signal.signal(signal.SIGINT, sigint_before)
    assert (report.n_done, report.n_failed) == (4, 0)
    assert len(_InProcessPool.created) == 1 and _InProcessPool.created[0]["max_workers"] == 2
    assert _InProcessPool.created[0]["initializer"] is prepare_run._init_worker
    assert threads_in_worker == 1
    assert sigint_in_worker == signal.SIG_IGN  # workers leave Ctrl-C to the parent


def _worker_state(case, out_dir: str) -> tuple[int, list[str], str, bool]:
    """Runs in a spawned worker: prepare one case, then report OpenCV's threads, any torch import and
    whether SIGINT is ignored (Ctrl-C is the parent's to handle)."""
    import signal

    from mammocad.datasets.prepare_run import prepare_case

    status, _ = prepare_case(case, out_dir, SPEC)
    return (cv2.getNumThreads(), sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")), status,
            signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def _sigint_ignored_here() -> bool:
    import signal

    return signal.getsignal(signal.SIGINT) == signal.SIG_IGN


@pytest.mark.slow
def test_spawned_worker_runs_one_opencv_thread_and_never_imports_torch(tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from mammocad.datasets.folder import read_folder
    from mammocad.datasets.prepare_run import _init_worker

    case = read_folder(make_folder_dataset(tmp_path / "raw"))[0]
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker) as pool:
        threads, torch_modules, status, ignores_sigint = pool.submit(_worker_state, case, str(tmp_path / "out")).result(timeout=120)
    assert (threads, torch_modules, status, ignores_sigint) == (1, [], "done", True)


@pytest.mark.slow
def test_workers_started_by_prepare_ignore_sigint_from_their_first_instruction():
    """A worker spawned while `_run_cases` submits inherits SIGINT ignored (an ignored signal stays
    ignored across exec), so a Ctrl-C during its ~1 s of imports cannot kill it with a traceback
    before its initializer runs; the parent's own handler is back afterwards."""
    import multiprocessing
    import signal
    from concurrent.futures import ProcessPoolExecutor

    from mammocad.datasets.prepare_run import _sigint_ignored

    before = signal.getsignal(signal.SIGINT)
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))  # no initializer
    try:
        with _sigint_ignored():
            fut = pool.submit(_sigint_ignored_here)
        assert signal.getsignal(signal.SIGINT) is before
        assert fut.result(timeout=120) is True
    finally:
        pool.shutdown()


# ---- issue 6: lost ground truth, re-runs, --out, Ctrl-C ------------------------------------------
def _coco_dataset(root: Path) -> Path:
    """One left breast (a of FOLDER_CASES) as a COCO dataset with four lesions: 0 inside the breast,
    1 in the empty corner the breast crop cuts away, 2 a polygon wholly outside the image (an
    empty source annotation), 3 a lesion far smaller than one prepared pixel (kept, not lost)."""
    make_folder_dataset(root, cases=FOLDER_CASES[:1])
    def square(x0: float, y0: float, s: float) -> list[float]:
        return [x0, y0, x0 + s, y0, x0 + s, y0 + s, x0, y0 + s]

    polygons = [square(50, 80, 20), square(228, 4, 8), square(400, 400, 10), square(60.2, 150.2, 0.3)]
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 240, "height": 300, "patient_id": "p1"}],
            "annotations": [{"id": k, "image_id": 1, "category_id": 1, "segmentation": [poly]} for k, poly in enumerate(polygons)],
            "categories": [{"id": 1, "name": "malignant mass"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def test_lesions_lost_in_preprocessing_are_recorded_not_written_as_empty_masks(tmp_path):
    from mammocad.datasets.prepared import prepare_dataset

    raw = _coco_dataset(tmp_path / "raw")
    report = prepare_dataset("coco", raw, tmp_path / "out", spec=SPEC, workers=1, progress=False,
                             adapter_options={"json": "annotations.json", "image_dir": "images"})
    assert report.n_failed == 0
    entry = json.loads((tmp_path / "out" / "cases.jsonl").read_text())
    assert entry["lost_lesions"] == {"1": "outside the prepared image (cropped away)", "2": "empty source annotation"}
    assert entry["lesion_masks"][1] is None and entry["lesion_masks"][2] is None
    assert entry["lesion_boxes"][1] is None and entry["lesion_boxes"][2] is None
    assert not (tmp_path / "out" / "masks" / "a" / "lesion_1.png").exists()
    assert not (tmp_path / "out" / "masks" / "a" / "lesion_2.png").exists()
    ds = PreparedDataset(tmp_path / "out")
    pc = ds.by_id("a")
    assert pc.lost_lesions == {1: "outside the prepared image (cropped away)", 2: "empty source annotation"}
    assert pc.unlocated_lesions == []
    masks = ds.load_lesion_masks(pc)
    assert masks[0].any() and masks[3].any() and masks[1] is None and masks[2] is None  # sub-pixel lesion 3 kept
    assert "lesion 3: smaller than one prepared pixel; kept its most covered pixels" in pc.notes
    assert pc.boxes[0] == list(mask_to_box(masks[0])) and pc.boxes[3] == list(mask_to_box(masks[3]))
    assert np.array_equal(ds.load_union_mask(pc), masks[0] | masks[3])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["lesions"], summary["lesions_with_mask"], summary["lesions_lost"]) == (4, 2, 2)
    assert summary["lesions_lost_by_reason"] == {"empty source annotation": 1, "outside the prepared image (cropped away)": 1}
    from rich.console import Console

    console = Console(record=True, width=200)
    report.print_summary(console)
    text = console.export_text()
    assert "lesions lost in preprocessing" in text and "empty source annotation: 1" in text
    # training reads the case (its lost lesions are known to be absent from the prepared image) and
    # paints only the lesions that are there
    from mammocad.sampling import load_samples

    (sample,) = load_samples(ds, ["a"])
    assert np.array_equal(sample.target > 0, masks[0] | masks[3])


def test_unlocated_lesions_are_those_without_outline_that_are_not_lost(tmp_path):
    """An old entry (no "lost_lesions") reads as nothing lost; a lesion without geometry is unlocated."""
    from mammocad.datasets.prepared import PreparedCase
    from mammocad.records import Case, Lesion

    case = Case(case_id="x", patient_id="p", dataset="t", modality="MG", image_path="/x.png", label="malignant",
                lesions=[Lesion(pathology="malignant", kind="mass"), Lesion(pathology="malignant", kind="mass", box=(1, 1, 3, 3)),
                         Lesion(pathology="malignant", kind="mass", box=(4, 4, 6, 6))])
    entry = {"case": case.to_dict(), "geometry": {"source_size": [8, 8], "steps": []}, "image": "images/x.png",
             "lesion_masks": [None, None, "masks/x/lesion_2.png"], "lesion_boxes": [None, None, [4.0, 4.0, 6.0, 6.0]],
             "union_mask": "masks/x/union.png", "breast_mask": "masks/x/breast.png", "phash": "0" * 16}
    old = PreparedCase.from_entry(tmp_path, entry)
    assert old.lost_lesions == {} and old.unlocated_lesions == [0, 1]
    new = PreparedCase.from_entry(tmp_path, {**entry, "lost_lesions": {"1": "empty source annotation"}})
    assert new.lost_lesions == {1: "empty source annotation"} and new.unlocated_lesions == [0]
    with pytest.raises(ValueError, match="lost_lesions"):  # a lesion with a mask cannot be lost
        PreparedCase.from_entry(tmp_path, {**entry, "lost_lesions": {"2": "empty source annotation"}})


def test_rerun_of_a_finished_dataset_with_two_workers_skips_everything(tmp_path):
    """A re-run with nothing left to do used to crash: ProcessPoolExecutor(max_workers=0)."""
    raw = make_folder_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    prepare_and_check(raw, out)
    again = prepare_and_check(raw, out, workers=2)
    assert (again.n_done, again.n_skipped, again.n_failed) == (0, 4, 0)
    result = CliRunner().invoke(app, ["prepare", "folder", str(raw), str(out), "--size", "256", "--workers", "2"])
    assert result.exit_code == 0, result.output


def test_unwritable_out_is_one_line_error_before_any_work(tmp_path, monkeypatch, capsys):
    from mammocad.cli import main
    from mammocad.datasets import prepare_run, registry

    raw = make_folder_dataset(tmp_path / "raw", cases=FOLDER_CASES[:1])
    monkeypatch.setattr(registry, "read_cases", lambda *a, **k: pytest.fail("the adapter ran before --out was checked"))
    monkeypatch.setattr(prepare_run, "prepare_case", lambda *a: pytest.fail("a case was prepared"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):  # an existing file, a folder that would lie under a file
        with pytest.raises(SystemExit) as exited:
            main(["prepare", "folder", str(raw), str(out), "--size", "256", "--workers", "1"])
        err = capsys.readouterr().err
        assert exited.value.code == 1 and err.startswith(f"mammocad: {out}: ") and err.count("\n") == 1, err


def test_read_only_out_is_one_line_error(tmp_path):
    raw = make_folder_dataset(tmp_path / "raw", cases=FOLDER_CASES[:1])
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable (test_unwritable_out_is_one_line_error_before_any_work covers --out as a file)")
        with pytest.raises(InputError, match="cannot write here"):
            prepare_and_check(raw, read_only)
    finally:
        read_only.chmod(0o755)


def test_a_second_prepare_into_the_same_folder_is_refused(tmp_path):
    from mammocad.io.outdir import claim_output_dir

    raw = make_folder_dataset(tmp_path / "raw", cases=FOLDER_CASES[:1])
    out = tmp_path / "out"
    # A first run holding the folder (flock locks are per open file, so this process can play both).
    with claim_output_dir(out, "prepare"), pytest.raises(InputError, match="another mammocad run is writing"):
        prepare_and_check(raw, out)
    assert prepare_and_check(raw, out).n_done == 1


def _first_case_fast_others_stuck(case, out_dir, spec):
    """Runs in a spawned worker: case a is prepared, every other case hangs as a huge image would."""
    import time

    from mammocad.datasets.prepare_run import prepare_case

    if case.case_id != "a":
        time.sleep(60)
    return prepare_case(case, out_dir, spec)


@pytest.mark.slow
def test_interrupt_terminates_running_workers_instead_of_waiting_for_them(tmp_path, monkeypatch):
    """Ctrl-C while workers are busy: the KeyboardInterrupt comes back at once (the workers are
    terminated, not waited for), the finished case stays and no worker process is left."""
    import multiprocessing
    import signal
    import threading
    import time

    from mammocad.datasets import prepare_run

    raw = make_folder_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    monkeypatch.setattr(prepare_run, "prepare_case", _first_case_fast_others_stuck)
    fired: list[float] = []
    running = threading.Event()

    def interrupt_after_first_case() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and running.is_set():  # never interrupt pytest itself afterwards
            if (out / "cases.jsonl").is_file() and (out / "cases.jsonl").read_text().count("\n") >= 1:
                fired.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does to the parent
                return
            time.sleep(0.02)

    running.set()
    threading.Thread(target=interrupt_after_first_case, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare_and_check(raw, out, workers=2)
    finally:
        running.clear()
    assert fired and time.monotonic() - fired[0] < 3.0, "the run waited for the stuck workers"
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not multiprocessing.active_children()
    assert [pc.case_id for pc in PreparedDataset(out).cases] == ["a"]


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_exits_130_and_a_rerun_skips_finished_cases(tmp_path):
    """Ctrl-C in a terminal (SIGINT to the whole process group) during `mammocad prepare --workers 2`:
    exit 130 within seconds with `mammocad: interrupted` and no worker tracebacks; the cases
    finished before it stay and a re-run skips them."""
    import signal
    import time

    big = [(f"c{i:02d}", f"p{i // 2}", "LR"[i % 2], "benign", [(500.0, 900.0, 80.0)] if i % 2 == 0 else [(1100.0, 900.0, 80.0)])
           for i in range(14)]
    raw = make_folder_dataset(tmp_path / "raw", cases=big, h=2000, w=1600)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mammocad.cli", "prepare", "folder", str(raw), str(out), "--size", "256",
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)  # its own process group, as a shell job has
    try:
        deadline = time.monotonic() + 120
        while not ((out / "cases.jsonl").is_file() and (out / "cases.jsonl").read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before its first case"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)  # the terminal sends Ctrl-C to every process of the job
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert "mammocad: interrupted" in stderr and "Traceback" not in stderr, stderr
    assert took < 3.0, f"took {took:.1f} s to stop"
    done = [json.loads(line)["case"]["case_id"] for line in (out / "cases.jsonl").read_text().splitlines()]
    assert 1 <= len(done) < len(big)
    report = prepare_and_check(raw, out)
    assert (report.n_skipped, report.n_done, report.n_failed) == (len(done), len(big) - len(done), 0)


def test_folders_prepared_before_issue_6_are_read_as_they_were_made(tmp_path):
    """spec.json without intensity_percentile meant the breast maximum; entries without lost_lesions
    may hold empty masks of lost lesions, so a re-run re-prepares them."""
    raw = make_folder_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    prepare_and_check(raw, out, spec=SPEC.model_copy(update={"intensity_percentile": 100.0}))
    spec = json.loads((out / "spec.json").read_text())
    del spec["preprocess"]["intensity_percentile"]
    (out / "spec.json").write_text(json.dumps(spec))
    assert PreparedDataset(out).spec.intensity_percentile == 100.0
    with pytest.raises(ConfigError, match=r"preprocess\.intensity_percentile: 100\.0 -> 99\.5"):
        prepare_and_check(raw, out)
    lines = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    for entry in lines[:2]:
        del entry["lost_lesions"]
    (out / "cases.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert all(pc.lost_lesions == {} for pc in PreparedDataset(out).cases)
    report = prepare_and_check(raw, out, spec=SPEC.model_copy(update={"intensity_percentile": 100.0}))
    assert (report.n_done, report.n_skipped) == (2, 2)
