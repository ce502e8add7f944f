"""``Predictor`` and ``mammocad predict`` end to end with a tiny "bright = lesion" bundle built here
(no shipped bundle needed): synthetic MG DICOM and PNG, a real mini-MIAS film written as PGM, a real
BUSI image as ultrasound, folders with a broken file, shared stems, resume, modality choice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from conftest import shared_path
from mammocad.cli import app
from mammocad.errors import DicomError, InputError
from mammocad.inference.predict_run import DEFAULT_MODELS, input_modality, output_stems, predict_files
from mammocad.inference.predictor import Predictor
from mammocad.io.outdir import claim_output_dir
from mammocad.models import create_model
from mammocad.models.bundle import save_bundle
from mammocad.preprocess.pipeline import PreprocessSpec

RECT = (250, 200, 330, 260)  # x0, y0, x1, y1 of the bright rectangle, original pixels (exclusive end)
RECT_AREA = (RECT[2] - RECT[0]) * (RECT[3] - RECT[1])


def pointwise_bundle(directory: Path, *, modality: str = "MG", cut: float = 0.7, long_side: int = 256,
                     name: str = "pointwise", min_area: int = 4, gain: float = 60.0, version: str = "0.0.1") -> Path:
    """A bundle whose lesion probability is sigmoid(gain * (pixel - cut)): pixels brighter than ``cut``
    (on the prepared grid) are lesion. ``logreg`` with all weight on its raw-intensity feature."""
    model = create_model("logreg", num_classes=1, scales=[1.0])
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.weight[0, 0] = gain  # feature 0 is the pixel itself
        model.classifier.bias.fill_(-gain * cut)
    card = {"name": name, "version": version, "task": "segment", "class_names": ["background", "lesion"],
            "preprocessing": PreprocessSpec(modality=modality, long_side=long_side).model_dump(mode="json"),
            "thresholds": {"probability": 0.5, "min_area": min_area},
            "tiling": {"tile": 128, "overlap": 0.25, "mode": "sliding", "batch_size": 4}}
    return save_bundle(directory, model, card)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return pointwise_bundle(tmp_path_factory.mktemp("bundle") / "pointwise")


def breast_image(h: int = 600, w: int = 480, wall: str = "R", rect=RECT) -> np.ndarray:
    """float [0, 1]: a flat half-ellipse breast (0.4) against the ``wall`` side, one bright (1.0) rectangle."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    x_wall = xx if wall == "L" else (w - 1 - xx)
    breast = (x_wall / (0.75 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2 <= 1
    img = np.where(breast, 0.4, 0.02).astype(np.float32)
    if rect is not None:
        x0, y0, x1, y1 = rect
        img[y0:y1, x0:x1] = 1.0
    return img


def write_png8(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.round(img * 255).astype(np.uint8))
    return path


def write_mg_dicom(path: Path, img: np.ndarray, laterality: str, view: str = "CC") -> Path:
    """12-bit MG For-Presentation DICOM of ``img`` with a full-range window (center 2048, width 4096)."""
    from mammocad.synth_writers import DicomIdentity, mammogram_dataset, save_dataset, uid_from

    ident = DicomIdentity("TEST01", uid_from(path, "st"), uid_from(path, "se"), uid_from(path, "sop"))
    stored = np.round(img * 4095).astype(np.uint16)
    ds = mammogram_dataset(stored, ident, laterality, view, 0.1, "MONOCHROME2", (2048.0, 4096.0), "explicit-little")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_dataset(ds, path)
    return path


def rect_mask(h: int, w: int, rect=RECT) -> np.ndarray:
    m = np.zeros((h, w), bool)
    x0, y0, x1, y1 = rect
    m[y0:y1, x0:x1] = True
    return m


def read_png(path: Path) -> np.ndarray:
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert a is not None, path
    return a


def check_outputs(out: Path, stem: str, size: tuple[int, int]) -> dict:
    """The files of one input: JSON schema, every mask and the overlay at the ORIGINAL size."""
    record = json.loads((out / f"{stem}.json").read_text())
    assert record["image_size"] == list(size)
    assert {"model_name", "model_version", "lesions", "attributes", "input", "mask", "overlay"} <= set(record)
    union = read_png(out / record["mask"])
    assert union.shape == size and union.dtype == np.uint8 and set(np.unique(union)) <= {0, 255}
    overlay = read_png(out / record["overlay"])
    assert overlay.shape == (*size, 3) and overlay.dtype == np.uint8
    expected = np.zeros(size, bool)
    for k, les in enumerate(record["lesions"], start=1):
        assert les["mask"] == les["mask_path"] == f"{stem}_lesion{k}.png"
        assert {"box", "score", "label", "class_probabilities", "area"} <= set(les)
        m = read_png(out / les["mask"]) > 0
        assert m.shape == size and m.sum() == les["area"]
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        x0, y0, x1, y1 = les["box"]  # the mask's own extent lies within the box, to resampling
        assert x0 - 2 <= cols[0] and cols[-1] + 1 <= x1 + 2 and y0 - 2 <= rows[0] and rows[-1] + 1 <= y1 + 2
        expected |= m
    assert np.array_equal(union > 0, expected)
    return record


def test_box_and_mask_in_original_pixels_after_crop_resize_flip(tmp_path, bundle):
    img = breast_image(wall="R")  # chest wall on the right: the MG pipeline crops, resizes AND flips
    prediction, union, masks = Predictor(bundle, autocast="fp32").predict_image(write_png8(tmp_path / "r.png", img))
    ops = [s["op"] for s in prediction.attributes["geometry"]["steps"]]
    assert ops == ["crop", "resize", "flip"]
    assert prediction.image_size == (600, 480) and prediction.model_name == "pointwise"
    assert len(prediction.lesions) == 1 and len(masks) == 1
    lesion = prediction.lesions[0]
    assert np.allclose(lesion.box, RECT, atol=2.0), lesion.box
    truth, mask = rect_mask(600, 480), masks[0].full()
    assert mask.shape == union.shape == (600, 480) and np.array_equal(union, mask) and mask.sum() == lesion.area
    assert (mask & truth).sum() / (mask | truth).sum() > 0.9
    assert lesion.score > 0.99 and lesion.label == "lesion" and prediction.attributes["laterality_from_pixels"] == "R"


@pytest.mark.slow
@pytest.mark.realdata
def test_cli_dicom_png_and_real_pgm_then_resume(tmp_path, bundle):
    mias = cv2.imread(str(shared_path("mias", "images", "mdb001.png")), cv2.IMREAD_GRAYSCALE)
    pgm = tmp_path / "in" / "mdb001.pgm"
    pgm.parent.mkdir(parents=True)
    assert cv2.imwrite(str(pgm), mias) and pgm.read_bytes()[:2] == b"P5"
    # tag says L, pixels show a right breast (chest wall on the right): a note, the pixels win
    dcm = write_mg_dicom(tmp_path / "in" / "study.dcm", breast_image(wall="R"), laterality="L")
    png = write_png8(tmp_path / "in" / "film.png", breast_image(wall="L", rect=(100, 300, 140, 380)))
    out = tmp_path / "out"
    args = ["predict", str(dcm), str(png), str(pgm), "--out", str(out), "--model", str(bundle), "--autocast", "fp32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "predictions in" in result.output and "lesions found" in result.output

    rec = check_outputs(out, "study", (600, 480))
    assert len(rec["lesions"]) == 1 and np.allclose(rec["lesions"][0]["box"], RECT, atol=2.0)
    attrs = rec["attributes"]
    assert attrs["voi"]["kind"] == "window" and attrs["image_modality"] == "MG" and attrs["laterality_tag"] == "L"
    assert any("disagrees" in n for n in attrs["preprocessing_notes"])
    rec = check_outputs(out, "film", (600, 480))
    assert len(rec["lesions"]) == 1 and np.allclose(rec["lesions"][0]["box"], (100, 300, 140, 380), atol=2.0)
    rec = check_outputs(out, "mdb001", (1024, 1024))
    assert rec["input"] == str(pgm.resolve()) and rec["model_version"] == "0.0.1"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["inputs"], summary["predicted"], summary["skipped"], summary["failed"]) == (3, 3, 0, 0)
    assert summary["lesions"] == sum(len(json.loads((out / f"{s}.json").read_text())["lesions"])
                                     for s in ("study", "film", "mdb001"))

    stamp = (out / "film.json").stat().st_mtime_ns
    result = CliRunner().invoke(app, args)  # resume: everything is done
    summary = json.loads((out / "summary.json").read_text())
    assert result.exit_code == 0 and (summary["predicted"], summary["skipped"]) == (0, 3)
    assert (out / "film.json").stat().st_mtime_ns == stamp
    result = CliRunner().invoke(app, args + ["--overwrite"])
    assert result.exit_code == 0 and json.loads((out / "summary.json").read_text())["predicted"] == 3


def test_folder_with_broken_file_and_shared_stems(tmp_path, bundle):
    root = tmp_path / "in"
    a = write_png8(root / "P_00001_LEFT_CC" / "1-1.png", breast_image(wall="L", rect=(60, 250, 100, 300)))
    b = write_png8(root / "P_00002_RIGHT_CC" / "1-1.png", breast_image(wall="R"))
    bad = root / "P_00003_LEFT_CC" / "1-1.dcm"
    bad.parent.mkdir()
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    (root / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(root), "--out", str(out), "--model", str(bundle)])
    assert result.exit_code == 1, result.output
    assert f"mammocad: {bad}: " in result.stderr and "Traceback" not in result.output
    assert "failed inputs" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["inputs"], summary["predicted"], summary["failed"]) == (3, 2, 1)
    assert summary["failures"][0]["input"] == str(bad) and summary["failures"][0]["error"].startswith(f"{bad}: ")
    rec_a = check_outputs(out, "P_00001_LEFT_CC_1-1", (600, 480))
    rec_b = check_outputs(out, "P_00002_RIGHT_CC_1-1", (600, 480))
    assert rec_a["input"] == str(a.resolve()) and rec_b["input"] == str(b.resolve())
    assert np.allclose(rec_a["lesions"][0]["box"], (60, 250, 100, 300), atol=2.0)
    assert np.allclose(rec_b["lesions"][0]["box"], RECT, atol=2.0)


def test_output_stems_are_unique_and_readable(tmp_path):
    nbia = [tmp_path / "Mass-Training_P_00001_LEFT_CC" / "07-20-2016-DDSM-74994" / "1.000000-full-24515" / "1-1.dcm",
            tmp_path / "Mass-Training_P_00004_LEFT_MLO" / "07-20-2016-DDSM-23157" / "1.000000-full-65511" / "1-1.dcm"]
    others = [tmp_path / "x" / "a.png", tmp_path / "x" / "a.dcm", tmp_path / "y" / "1.2.840.113619.2.1",
              tmp_path / "y" / "1.2.840.113619.2.2", tmp_path / "z" / "summary.png", tmp_path / "z" / "B.png",
              tmp_path / "w" / "b.png"]
    stems = output_stems(nbia + others)
    assert stems[nbia[0]] == "Mass-Training_P_00001_LEFT_CC_07-20-2016-DDSM-74994_1.000000-full-24515_1-1"
    assert stems[others[0]] == "a_png" and stems[others[1]] == "a_dcm"
    assert stems[others[2]] == "1.2.840.113619.2.1" and stems[others[3]] == "1.2.840.113619.2.2"
    assert stems[others[4]].startswith("summary-") and len(stems[others[4]]) == len("summary-") + 8
    assert stems[others[5]] == "z_B" and stems[others[6]] == "w_b"  # B.png / b.png collide on macOS and Windows
    assert len({s.casefold() for s in stems.values()}) == len(stems)


@pytest.mark.realdata
def test_input_modality_says_where_it_came_from():
    assert input_modality(shared_path("dicom", "fo-dicom", "GH133.dcm")) == ("MG", "dicom")
    assert input_modality(shared_path("dicom", "dicom-test-files", "MG1_J2KI"), "US") == ("MG", "dicom")  # header wins
    with pytest.raises(DicomError, match="modality DX is neither.*pass --model"):
        input_modality(shared_path("dicom", "highdicom", "dx_image.dcm"))  # a chest DX
    with pytest.raises(DicomError, match="modality CT"):
        input_modality(shared_path("dicom", "pydicom", "CT_small.dcm"))
    assert input_modality(Path("film.png")) == ("MG", "assumed")
    assert input_modality(Path("scan.jpg"), "US") == ("US", "--modality")


@pytest.mark.realdata
def test_default_model_by_modality(tmp_path):
    bundles = {"mammo-lesion-seg": pointwise_bundle(tmp_path / "mg", name="mg-test"),
               "us-lesion-seg": pointwise_bundle(tmp_path / "us", name="us-test", modality="US")}
    assert set(bundles) == set(DEFAULT_MODELS.values())
    loaded = []

    def load(name):
        loaded.append(name)
        return Predictor(bundles[name], autocast="fp32")

    busi = shared_path("busi", "benign", "benign (16).png")
    dcm = write_mg_dicom(tmp_path / "in" / "mg.dcm", breast_image(wall="L"), laterality="L")
    ct = shared_path("dicom", "pydicom", "CT_small.dcm")
    report = predict_files([busi, dcm, ct], tmp_path / "out_us", modality="US", progress=False, load_predictor=load)
    assert (report.n_done, report.n_failed) == (2, 1) and "modality CT" in report.failures[0]["error"]
    us = json.loads((tmp_path / "out_us" / "benign (16).json").read_text())
    h, w = cv2.imread(str(busi), cv2.IMREAD_GRAYSCALE).shape
    assert us["model_name"] == "us-test" and us["attributes"]["modality"] == "US" and us["image_size"] == [h, w]
    check_outputs(tmp_path / "out_us", "benign (16)", (h, w))
    assert json.loads((tmp_path / "out_us" / "mg.json").read_text())["model_name"] == "mg-test"  # DICOM header wins
    assert sorted(loaded) == ["mammo-lesion-seg", "us-lesion-seg"]  # each loaded once
    report = predict_files([busi], tmp_path / "out_mg", progress=False, load_predictor=load)  # plain image: MG by default
    assert json.loads((tmp_path / "out_mg" / "benign (16).json").read_text())["model_name"] == "mg-test"


def test_bad_model_and_missing_input(tmp_path, bundle):
    png = write_png8(tmp_path / "a.png", breast_image())
    result = CliRunner().invoke(app, ["predict", str(png), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nope")])
    assert result.exit_code == 1 and isinstance(result.exception, InputError) and "no such bundle" in str(result.exception)
    assert not (tmp_path / "o").exists()  # --out is checked first but created only once the model loads
    report = predict_files([tmp_path / "missing.png", png], tmp_path / "o2", model=bundle, progress=False)
    assert report.n_done == 1 and report.failures == [{"input": str(tmp_path / "missing.png"),
                                                       "error": f"{tmp_path / 'missing.png'}: file not found"}]
    assert os.path.exists(tmp_path / "o2" / "a_overlay.png")
    other = write_png8(tmp_path / "other" / "a.png", breast_image(rect=None))  # same stem, another image, a later run
    report = predict_files([other], tmp_path / "o2", model=bundle, progress=False)
    stem = report.outputs[0]["stem"]
    assert report.n_done == 1 and stem.startswith("a-") and len(stem) == 10
    assert json.loads((tmp_path / "o2" / "a.json").read_text())["input"] == str(png.resolve())  # not overwritten
    lesions = json.loads((tmp_path / "o2" / f"{stem}.json").read_text())["lesions"]  # no rectangle: the breast is
    assert len(lesions) == 1 and lesions[0]["area"] > 20 * RECT_AREA  # the brightest thing, all "lesion"


def test_max_lesions_keeps_the_highest_scoring_components_and_tta_averages_flips(tmp_path):
    """``thresholds.max_lesions`` and ``tiling.tta`` in the card reach the predictor."""
    plain = Predictor(pointwise_bundle(tmp_path / "plain", modality="US", long_side=128))
    img = np.full((128, 128), 0.2, np.float32)
    img[10:30, 10:30] = 0.9  # brighter blob: higher score
    img[80:100, 70:95] = 0.8
    probs = plain.infer(img, None)
    assert len(plain.lesions(probs, None)) == 2

    bundle = pointwise_bundle(tmp_path / "top1", modality="US", long_side=128)
    card_path = bundle / "model.json"
    card = json.loads(card_path.read_text())
    card["thresholds"]["max_lesions"] = 1
    card["tiling"]["tta"] = ["hflip"]
    card_path.write_text(json.dumps(card))
    top1 = Predictor(bundle)
    kept = top1.lesions(top1.infer(img, None), None)
    assert len(kept) == 1 and kept[0].box == (10, 10, 30, 30)
    # a pointwise model is mirror-symmetric: flip TTA must give the plain probabilities back
    np.testing.assert_allclose(top1.infer(img, None), probs, atol=1e-6)

    card["tiling"]["tta"] = ["vflip"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(Exception, match="tta"):
        Predictor(bundle)


def test_any_error_of_one_input_is_reported_and_the_batch_goes_on(tmp_path, bundle, capsys):
    """An out-of-memory, OpenCV or numpy error on one input is that input's failure (one line); only
    Ctrl-C (KeyboardInterrupt) ends the batch."""
    names = ["a", "oom", "cv", "value", "z"]
    files = [write_png8(tmp_path / "in" / f"{n}.png", breast_image()) for n in names]
    errors = {"oom": torch.OutOfMemoryError("CUDA out of memory.\nTried to allocate 2.00 GiB"),
              "cv": cv2.error("OpenCV(5.0) resize.cpp:4155: error: (-215:Assertion failed) !ssize.empty()"),
              "value": ValueError("operands could not be broadcast together")}
    real = Predictor(bundle, autocast="fp32")

    class Failing:
        voi, name, version = real.voi, real.name, real.version

        def __init__(self, error_for):
            self.error_for = error_for

        def predict_image(self, image):
            stem = Path(image.path).stem
            if stem in self.error_for:
                raise self.error_for[stem]
            return real.predict_image(image)

    report = predict_files(files, tmp_path / "out", model=bundle, progress=False,
                           load_predictor=lambda name: Failing(errors))
    assert (report.n_done, report.n_failed) == (2, 3)
    err = capsys.readouterr().err
    expected = {"oom": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                "cv": "error: OpenCV(5.0) resize.cpp:4155: error: (-215:Assertion failed) !ssize.empty()",
                "value": "ValueError: operands could not be broadcast together"}
    for f in files[1:4]:
        line = f"{f}: {expected[f.stem]}"
        assert {"input": str(f), "error": line} in report.failures
        assert f"mammocad: {line}\n" in err
    assert "Traceback" not in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["predicted"], summary["failed"]) == (2, 3)

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C stops the run, it is not one input's failure
        predict_files(files, tmp_path / "out2", model=bundle, progress=False,
                      load_predictor=lambda name: Failing({"a": KeyboardInterrupt()}))
    assert not (tmp_path / "out2" / "z.json").exists()


# ---- issue 6: inputs, output folder, identity, modality source, size limit --------------------------
def test_folder_walk_finds_suffixless_dicom_reports_the_rest_and_skips_output_folders(tmp_path, bundle):
    root = tmp_path / "study"
    write_png8(root / "film.png", breast_image(wall="L"))
    write_mg_dicom(root / "DICOM" / "IM0001", breast_image(wall="R"), laterality="R")  # no suffix: told by content
    (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    (root / "LICENSE").write_text("not an image, no suffix")
    first = predict_files([root], root / "p1", model=bundle, progress=False)
    assert (first.n_done, first.n_failed) == (2, 0)
    # a second run into another folder under the input folder: p1's overlays and masks are not inputs
    second = predict_files([root], root / "p2", model=bundle, progress=False)
    assert (second.n_inputs, second.n_done, second.n_failed) == (2, 2, 0)
    summary = json.loads((root / "p2" / "summary.json").read_text())
    assert summary["not_used"] == [
        {"path": str(root / "DICOMDIR"), "reason": "DICOMDIR index (the image files it lists are found on their own)"},
        {"path": str(root / "LICENSE"), "reason": "not an image (no image suffix and no DICOM header)"},
        {"path": str(root / "p1"), "reason": "a mammocad output folder (mammocad predict): its images are outputs, not inputs"},
        {"path": str(root / "p2"), "reason": "the output folder of this run"}]
    console = Console(record=True, width=200)
    second.print_summary(console)
    assert "paths in the input folders not used" in console.export_text()


def test_second_run_into_a_claimed_output_folder_is_refused(tmp_path, bundle):
    png = write_png8(tmp_path / "a.png", breast_image())
    with claim_output_dir(tmp_path / "out", "predict"):  # another run is writing there (the lock is held)
        with pytest.raises(InputError, match="another mammocad run is writing to this folder"):
            predict_files([png], tmp_path / "out", model=bundle, progress=False)
    assert not (tmp_path / "out" / "a.json").exists()
    assert predict_files([png], tmp_path / "out", model=bundle, progress=False).n_done == 1  # released: it runs


def test_concurrent_predict_process_is_refused(tmp_path, bundle):
    """Two processes: the second exits 1 with one line while the first holds the folder."""
    import subprocess
    import sys

    png = write_png8(tmp_path / "a.png", breast_image())
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from mammocad.io.outdir import claim_output_dir\n"
        f"with claim_output_dir({str(tmp_path / 'out')!r}, 'predict'):\n"
        "    print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(app, ["predict", str(png), "--out", str(tmp_path / "out"), "--model", str(bundle)])
        assert result.exit_code == 1 and isinstance(result.exception, InputError)
        assert "another mammocad run is writing to this folder (predict pid" in str(result.exception)
    finally:
        holder.kill()
        holder.wait()


def test_overwrite_removes_the_previous_runs_lesion_masks(tmp_path, bundle):
    path = tmp_path / "in" / "x.png"
    img = breast_image(rect=None)
    img[150:190, 300:340] = img[280:320, 300:340] = img[410:450, 300:340] = 1.0  # three lesions
    write_png8(path, img)
    out = tmp_path / "out"
    predict_files([path], out, model=bundle, progress=False)
    assert sorted(p.name for p in out.glob("x_lesion*.png")) == ["x_lesion1.png", "x_lesion2.png", "x_lesion3.png"]
    write_png8(path, breast_image())  # now one lesion
    report = predict_files([path], out, model=bundle, overwrite=True, progress=False)
    assert report.n_done == 1 and sorted(p.name for p in out.glob("x_lesion*.png")) == ["x_lesion1.png"]
    check_outputs(out, "x", (600, 480))


def test_output_of_another_model_or_version_is_redone_not_skipped(tmp_path, bundle):
    png = write_png8(tmp_path / "a.png", breast_image())
    out = tmp_path / "out"
    predict_files([png], out, model=bundle, progress=False)
    again = predict_files([png], out, model=bundle, progress=False)
    assert (again.n_done, again.n_skipped) == (0, 1)  # same model, same version: skipped
    newer = pointwise_bundle(tmp_path / "v2", version="0.0.2")
    report = predict_files([png], out, model=newer, progress=False)
    assert (report.n_done, report.n_skipped, report.n_redone) == (1, 0, 1)
    assert report.outputs[0]["note"] == "redone: written by model pointwise v0.0.1"
    assert json.loads((out / "a.json").read_text())["model_version"] == "0.0.2"
    assert json.loads((out / "summary.json").read_text())["redone"] == 1


def test_json_records_the_inputs_sha256_and_size(tmp_path, bundle):
    import hashlib

    png = write_png8(tmp_path / "a.png", breast_image())
    predict_files([png], tmp_path / "out", model=bundle, progress=False)
    record = json.loads((tmp_path / "out" / "a.json").read_text())
    data = png.read_bytes()
    assert record["input_sha256"] == hashlib.sha256(data).hexdigest() and record["input_bytes"] == len(data)


def test_plain_image_modality_is_assumed_and_said_so(tmp_path):
    bundles = {"mammo-lesion-seg": pointwise_bundle(tmp_path / "mg", name="mg-test"),
               "us-lesion-seg": pointwise_bundle(tmp_path / "us", name="us-test", modality="US")}

    def load(name):
        return Predictor(bundles[name], autocast="fp32")

    png = write_png8(tmp_path / "in" / "scan.png", breast_image())
    dcm = write_mg_dicom(tmp_path / "in" / "mg.dcm", breast_image(wall="L"), laterality="L")
    report = predict_files([png, dcm], tmp_path / "o1", progress=False, load_predictor=load)
    assert report.n_assumed == 1 and json.loads((tmp_path / "o1" / "summary.json").read_text())["modality_assumed"] == 1
    source = {p: json.loads((tmp_path / "o1" / f"{p}.json").read_text())["attributes"]["modality_source"] for p in ("scan", "mg")}
    assert source == {"scan": "assumed", "mg": "dicom"}
    console = Console(record=True, width=200)
    report.print_summary(console)
    assert "modality assumed MG (plain images, no --modality)" in console.export_text()
    report = predict_files([png], tmp_path / "o2", modality="US", progress=False, load_predictor=load)
    record = json.loads((tmp_path / "o2" / "scan.json").read_text())
    assert report.n_assumed == 0 and record["attributes"]["modality_source"] == "--modality" and record["model_name"] == "us-test"


def test_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, bundle, monkeypatch):
    png = write_png8(tmp_path / "a.png", breast_image())  # 480x600 = 0.29 MP
    monkeypatch.setattr("mammocad.io.images.read_plain_image", lambda path: pytest.fail("decoded"))
    report = predict_files([png], tmp_path / "out", model=bundle, max_pixels=100_000, progress=False)
    assert report.n_failed == 1
    assert report.failures[0]["error"] == (f"{png}: 480x600 pixels = 0.3 megapixels, over the limit of 0.1 megapixels "
                                           "(raise it with --max-pixels)")


def test_a_changed_input_is_redone_not_skipped(tmp_path, bundle):
    """An image replaced under the same name must not keep its old result (same model and version)."""
    png = write_png8(tmp_path / "a.png", breast_image())
    out = tmp_path / "out"
    predict_files([png], out, model=bundle, progress=False)
    write_png8(png, breast_image(rect=(100, 100, 160, 150)))  # same name, another picture
    report = predict_files([png], out, model=bundle, progress=False)
    assert (report.n_done, report.n_skipped) == (1, 0)
    assert report.outputs[0]["note"] == "redone: the input file changed since it was predicted"
    import hashlib

    assert json.loads((out / "a.json").read_text())["input_sha256"] == hashlib.sha256(png.read_bytes()).hexdigest()
    assert predict_files([png], out, model=bundle, progress=False).n_skipped == 1  # unchanged now: skipped


def test_an_input_folder_as_out_is_refused_and_left_unmarked(tmp_path, bundle):
    """``predict DIR --out DIR`` (everything in DIR would be excluded as output) is refused, and a
    user's folder that is not empty never gets the output marker that hides it from later runs."""
    from mammocad.io.outdir import is_output_dir

    folder = tmp_path / "films"
    write_png8(folder / "a.png", breast_image())
    with pytest.raises(InputError, match="is an input folder"):
        predict_files([folder], folder, model=bundle, progress=False)
    assert not is_output_dir(folder)
    report = predict_files([folder / "a.png"], folder, model=bundle, progress=False)  # a file in it: allowed
    assert report.n_done == 1 and not is_output_dir(folder)
    report = predict_files([folder / "a.png"], tmp_path / "out", model=bundle, progress=False)
    assert report.n_done == 1 and is_output_dir(tmp_path / "out")  # created by the run: marked
