"""Synthetic mammograms: exact ground truth, texture statistics, anatomy, DICOM encoding, the
CBIS-DDSM and folder layouts (read back by their adapters) and reproducibility."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from conftest import shared_path
from mammocad.errors import ConfigError
from mammocad.synth import power_law_noise, synthesize_mammogram, write_synthetic_dicom, write_synthetic_study
from mammocad.synth_writers import CALC_HEADER, MASS_HEADER, jpeg_lossless_predictor, stored_values

SIZE = (512, 416)
STUDY_N, STUDY_SEED = 8, 3


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "study"
    summary = write_synthetic_study(out, n=STUDY_N, seed=STUDY_SEED, size=SIZE)
    assert summary.startswith(f"wrote {STUDY_N} synthetic mammograms")
    return out


@pytest.fixture(scope="module")
def truth(study) -> dict:
    return json.loads((study / "ground_truth.json").read_text())


def _many(n_masses=None, n_calc=None, count=6, seed=0, size=SIZE):
    views = [("L", "MLO"), ("R", "CC"), ("R", "MLO"), ("L", "CC")]
    return [synthesize_mammogram(np.random.default_rng([seed, i]), size, *views[i % 4], n_masses=n_masses, n_calc_clusters=n_calc)
            for i in range(count)]


def radial_power_spectrum(field_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frequency, power) radially averaged over 64 rings, DC and the corners left out."""
    power = np.abs(np.fft.fft2(field_ - field_.mean())) ** 2
    radius = np.hypot(np.fft.fftfreq(field_.shape[0])[:, None], np.fft.fftfreq(field_.shape[1])[None, :])
    edges = np.linspace(0, 0.5, 65)
    ring = np.digitize(radius.ravel(), edges) - 1
    keep = (ring >= 1) & (ring < 64)
    sums = np.bincount(ring[keep], power.ravel()[keep], minlength=64)
    counts = np.bincount(ring[keep], minlength=64)
    centres = (edges[:-1] + edges[1:]) / 2
    ok = counts > 0
    return centres[ok], sums[ok] / counts[ok]


def _solidity(mask: np.ndarray) -> float:
    pts = np.argwhere(mask)[:, ::-1].astype(np.int32)
    hull = np.zeros(mask.shape, np.uint8)
    cv2.fillPoly(hull, [cv2.convexHull(pts)], 1)
    return float(mask.sum()) / float(hull.sum())


# ------------------------------------------------------------------------------ ground truth


def test_lesion_masks_exact_inside_breast_and_disjoint():
    mammos = _many(n_masses=2, n_calc=1)
    n_lesions = 0
    for m in mammos:
        assert m.image.dtype == np.float32 and m.image.shape == SIZE
        assert 0.0 <= m.image.min() and m.image.max() <= 1.0
        union = np.zeros(SIZE, int)
        for les in m.lesions:
            assert les.mask.dtype == bool and les.mask.shape == SIZE and les.mask.any()
            assert not (les.mask & ~m.breast_mask).any(), "lesion outside the breast"
            assert not (les.mask & m.pectoral_mask).any(), "lesion on the pectoral muscle"
            assert les.pathology in ("benign", "malignant") and les.kind in ("mass", "calcification")
            union += les.mask
            n_lesions += 1
        assert union.max() <= 1, "lesions overlap"
    assert n_lesions >= 12  # 6 images x 3 planned lesions; only a crowded breast drops one


def test_lesions_are_drawn_where_their_masks_are():
    """The mask is the drawn region: masses are brighter than a ring around them, calcification
    specks are the brightest pixels of their hull."""
    contrasts, calc_peaks = [], []
    for m in _many(n_masses=2, n_calc=1, count=8, seed=1):
        for les in m.lesions:
            mask = les.mask.astype(np.uint8)
            ring = cv2.dilate(mask, np.ones((15, 15), np.uint8)).astype(bool) & ~les.mask & m.breast_mask
            if les.kind == "mass":
                contrasts.append(m.image[les.mask].mean() - m.image[ring].mean())
            else:
                calc_peaks.append(m.image[les.mask].max() - np.percentile(m.image[ring], 99))
    assert len(contrasts) >= 10 and np.median(contrasts) > 0.02 and np.mean(np.array(contrasts) > 0) >= 0.8
    assert len(calc_peaks) >= 5 and min(calc_peaks) > 0.05


def test_spiculated_and_circumscribed_masses_differ_in_shape():
    solidity = {"SPICULATED": [], "CIRCUMSCRIBED": []}
    for m in _many(n_masses=2, n_calc=0, count=7, seed=2):
        for les in m.lesions:
            solidity[les.source_label].append(_solidity(les.mask))
            assert les.pathology == ("malignant" if les.source_label == "SPICULATED" else "benign")
    assert len(solidity["SPICULATED"]) >= 3 and len(solidity["CIRCUMSCRIBED"]) >= 3
    assert max(solidity["SPICULATED"]) < 0.75 < 0.9 < min(solidity["CIRCUMSCRIBED"])


def test_calcification_cluster_is_a_dilated_hull_of_5_to_20_specks():
    for m in _many(n_masses=0, n_calc=1, count=6, seed=4):
        (les,) = m.lesions
        assert les.source_label == "CLUSTERED" and les.kind == "calcification"
        assert _solidity(les.mask) > 0.9  # convex (up to rasterisation)
        specks = m.image * les.mask > np.percentile(m.image[les.mask], 50) + 0.08
        n_specks = cv2.connectedComponents(specks.astype(np.uint8))[0] - 1
        assert 3 <= n_specks <= 20  # touching specks may merge


def test_normal_images_and_counts_vary():
    mammos = [synthesize_mammogram(np.random.default_rng([9, i]), (256, 208)) for i in range(24)]
    counts = [len(m.lesions) for m in mammos]
    assert counts.count(0) >= 3 and max(counts) >= 2 and all(c <= 3 for c in counts)
    assert {m.label for m in mammos} == {"normal", "benign", "malignant"}
    assert len({m.density for m in mammos}) >= 3


# ------------------------------------------------------------------------------ texture, anatomy


@pytest.mark.parametrize("beta", [2.0, 3.0])
def test_texture_power_spectrum_slope(beta):
    field_ = power_law_noise(np.random.default_rng(0), (512, 512), beta)
    assert abs(field_.mean()) < 1e-4 and abs(field_.std() - 1) < 1e-3
    freq, power = radial_power_spectrum(field_)
    keep = (freq > 0.01) & (freq < 0.3)
    slope = np.polyfit(np.log(freq[keep]), np.log(power[keep]), 1)[0]
    assert -beta - 0.3 < slope < -beta + 0.3
    if beta == 3.0:
        assert 2.5 <= -slope <= 3.5


@pytest.mark.parametrize("laterality", ["L", "R"])
def test_chest_wall_side_and_pectoral_muscle(laterality):
    m = synthesize_mammogram(np.random.default_rng(5), SIZE, laterality, "MLO", n_masses=0, n_calc_clusters=0)
    h, w = SIZE
    wall, far = (0, w - 1) if laterality == "L" else (w - 1, 0)
    assert m.breast_mask[:, wall].mean() > 0.6 and not m.breast_mask[:, far].any()
    pect = m.pectoral_mask
    assert pect.sum() > 0.02 * h * w
    rows, cols = np.nonzero(pect)
    assert rows.mean() < 0.35 * h and pect[0, wall]  # top corner on the chest-wall side
    assert (cols.mean() < 0.3 * w) == (laterality == "L")
    assert m.image[pect].mean() > np.median(m.image[m.breast_mask & ~pect]) + 0.05  # muscle is bright
    cc = synthesize_mammogram(np.random.default_rng(5), SIZE, laterality, "CC", n_masses=0, n_calc_clusters=0)
    assert not cc.pectoral_mask.any()


def test_skin_line_and_fade_towards_skin():
    m = synthesize_mammogram(np.random.default_rng(6), SIZE, "L", "CC", n_masses=0, n_calc_clusters=0)
    dist = cv2.distanceTransform(np.pad(m.breast_mask, ((0, 0), (8, 0)), mode="edge").astype(np.uint8), cv2.DIST_L2, 5)[:, 8:]
    near = m.breast_mask & (dist < 8)
    inner = m.breast_mask & (dist > 60)
    assert m.image[near].mean() < m.image[inner].mean() - 0.1
    assert m.image[~m.breast_mask].mean() < 0.06


# ------------------------------------------------------------------------------ DICOM


@pytest.mark.parametrize("syntax, uid", [("jpeg-lossless", None), ("explicit-little", "1.2.840.10008.1.2.1"), ("rle", "1.2.840.10008.1.2.5")])
def test_dicom_round_trip_bit_exact(tmp_path, syntax, uid):
    path = tmp_path / "mg.dcm"
    m = write_synthetic_dicom(path, np.random.default_rng(11), size=(300, 240), transfer_syntax=syntax)
    ds = pydicom.dcmread(path)
    if syntax == "jpeg-lossless":
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        predictor = jpeg_lossless_predictor(frame)
        uid = "1.2.840.10008.1.2.4.70" if predictor == 1 else "1.2.840.10008.1.2.4.57"
    assert ds.file_meta.TransferSyntaxUID == uid
    assert np.array_equal(ds.pixel_array, stored_values(m.image))
    assert ds.pixel_array.max() <= 4095


def test_dicom_mg_attributes(tmp_path):
    path = tmp_path / "mg.dcm"
    m = write_synthetic_dicom(path, np.random.default_rng(12), size=(300, 240), laterality="R", view="CC")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2"
    assert (ds.Modality, ds.PresentationIntentType, ds.ImageLaterality, ds.ViewPosition) == ("MG", "FOR PRESENTATION", "R", "CC")
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert (ds.Rows, ds.Columns) == (300, 240) and ds.PhotometricInterpretation == "MONOCHROME2"
    assert ds.VOILUTFunction == "LINEAR" and ds.Manufacturer == "mammocad-synth"
    assert float(ds.PixelSpacing[0]) == pytest.approx(m.pixel_spacing_mm, rel=1e-5) == pytest.approx(1.0)
    assert ds.ViewCodeSequence[0].CodeMeaning == "cranio-caudal" and list(ds.PatientOrientation) == ["P", "L"]
    lo, hi = ds.WindowCenter - ds.WindowWidth / 2, ds.WindowCenter + ds.WindowWidth / 2
    breast = stored_values(m.image)[m.breast_mask]
    assert lo <= np.percentile(breast, 1) and hi >= breast.max()  # the window shows the whole breast


def test_monochrome1_stores_inverted_values_same_display(tmp_path):
    paths = {}
    for phot in ("MONOCHROME2", "MONOCHROME1"):
        paths[phot] = tmp_path / f"{phot}.dcm"
        write_synthetic_dicom(paths[phot], np.random.default_rng(13), size=(300, 240), photometric=phot)
    m2, m1 = pydicom.dcmread(paths["MONOCHROME2"]), pydicom.dcmread(paths["MONOCHROME1"])
    assert m1.PhotometricInterpretation == "MONOCHROME1" and m1.PresentationLUTShape == "INVERSE"
    assert np.array_equal(m1.pixel_array.astype(int), 4095 - m2.pixel_array.astype(int))
    from mammocad.io.dicom import read_dicom

    d2, d1 = read_dicom(paths["MONOCHROME2"]).pixels, read_dicom(paths["MONOCHROME1"]).pixels
    assert d2.mean() > 0.1 and np.abs(d1 - d2).max() < 1e-3


@pytest.mark.slow
def test_full_size_dicom_for_benchmarks(tmp_path):
    path = tmp_path / "big.dcm"
    m = write_synthetic_dicom(path, np.random.default_rng(14))
    ds = pydicom.dcmread(path)
    assert (ds.Rows, ds.Columns) == (4084, 3328) and m.image.shape == (4084, 3328)
    assert np.array_equal(ds.pixel_array, stored_values(m.image))
    assert path.stat().st_size < 0.5 * 4084 * 3328 * 2  # compressed


# ------------------------------------------------------------------------------ study layouts


def test_cbis_csv_headers_identical_to_the_official_ones(study):
    real_dir = shared_path("cbis_ddsm")
    for kind, header in (("mass", MASS_HEADER), ("calc", CALC_HEADER)):
        real = (real_dir / f"{kind}_case_description_train_set.csv").read_bytes()
        ours_train = (study / "cbis-ddsm" / f"{kind}_case_description_train_set.csv").read_bytes()
        ours_test = (study / "cbis-ddsm" / f"{kind}_case_description_test_set.csv").read_bytes()
        assert ours_train.split(b"\r\n")[0] == ours_test.split(b"\r\n")[0] == real.split(b"\r\n")[0]
        with open(real_dir / f"{kind}_case_description_train_set.csv", newline="") as fh:
            real_rows = list(csv.reader(fh))
        with open(study / "cbis-ddsm" / f"{kind}_case_description_train_set.csv", newline="") as fh:
            our_rows = list(csv.reader(fh))
        assert our_rows[0] == real_rows[0] == header
        # The quirk: the same column ends with a newline inside quotes, rows end with CRLF.
        newline_cols = {tuple(i for i, v in enumerate(r) if v.endswith("\n")) for r in real_rows[1:]}
        assert {tuple(i for i, v in enumerate(r) if v.endswith("\n")) for r in our_rows[1:]} <= newline_cols
        assert ours_train.endswith(b"\r\n") and real.endswith(b"\r\n")
        for row in our_rows[1:]:
            assert row[11].startswith(f"{kind.capitalize()}-Training_{row[0]}_{row[2]}_{row[3]}/1.3.6.1.4.1.9590.100.1.2.")
            assert row[11].endswith("/000000.dcm") and row[13].strip().endswith(".dcm")


def test_cbis_tree_uses_the_nbia_layout(study, truth):
    root = study / "cbis-ddsm"
    fulls = sorted(root.glob("*/*-DDSM-NA-[0-9][0-9][0-9][0-9][0-9]/1.000000-full mammogram images-[0-9][0-9][0-9][0-9][0-9]/1-1.dcm"))
    masks = sorted(root.glob("*_[0-9]/*-DDSM-NA-*/1.000000-ROI mask images-*/1-1.dcm"))
    crops = sorted(root.glob("*_[0-9]/*-DDSM-NA-*/1.000000-cropped images-*/1-1.dcm"))
    n_lesions = sum(len(img["lesions"]) for img in truth["images"])
    n_copies = sum(len({les["kind"] for les in img["lesions"]}) for img in truth["images"])
    assert len(masks) == len(crops) == n_lesions > 0 and len(fulls) == n_copies
    for mask_path in masks:
        ds = pydicom.dcmread(mask_path)
        assert (ds.Rows, ds.Columns) == SIZE and set(np.unique(ds.pixel_array)) == {0, 255}
    split_of = {img["patient_id"]: img["official_split"] for img in truth["images"]}
    assert set(split_of.values()) == {"train", "test"}
    for full in fulls:
        case = full.relative_to(root).parts[0]  # e.g. Mass-Training_P_00001_LEFT_CC
        prefix, patient = case.split("_P_")[0], "P_" + case.split("_P_")[1][:5]
        assert prefix in ("Mass-Training", "Calc-Training", "Mass-Test", "Calc-Test")
        assert prefix.endswith("Test") == (split_of[patient] == "test")


def test_cbis_adapter_reads_the_tree(study, truth):
    from mammocad.datasets.cbis_ddsm import read_cbis_ddsm
    from mammocad.datasets.rasterize import rasterize_lesion

    cases = read_cbis_ddsm(study / "cbis-ddsm")
    expected = {(img["patient_id"], img["laterality"], img["view"]): img for img in truth["images"] if img["lesions"]}
    assert len(cases) == len(expected)
    for case in cases:
        img = expected[(case.patient_id, case.laterality, case.view)]
        assert case.split == img["official_split"] and case.label == img["label"]
        assert sorted((les.kind, les.pathology) for les in case.lesions) == sorted((les["kind"], les["pathology"]) for les in img["lesions"])
        gt_masks = {les["area"]: les for les in img["lesions"]}
        for les in case.lesions:
            mask = rasterize_lesion(les, SIZE)
            assert mask is not None and int(mask.sum()) in gt_masks
            box = gt_masks[int(mask.sum())]["box"]
            rows, cols = np.nonzero(mask)
            assert [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1] == box


def test_folder_layout(study, truth):
    folder = study / "folder"
    with open(folder / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image", "label", "patient_id", "laterality", "view", "modality", "pathology"]
    assert len(rows) == STUDY_N == len(truth["images"])
    patients = {r["patient_id"] for r in rows}
    assert len(patients) < STUDY_N  # several views per patient: grouping matters
    for img in truth["images"]:
        png = cv2.imread(str(study / img["png"]), cv2.IMREAD_UNCHANGED)
        assert png.dtype == np.uint16 and png.shape == SIZE
        twelve = np.round(png.astype(np.float64) * 4095 / 65535)  # 12-bit values scaled to 16 bit
        assert np.array_equal(np.round(twelve * 65535 / 4095), png) and twelve.max() <= 4095
        if img["lesions"]:  # the same pixels as the CBIS-DDSM DICOM copy
            ds = pydicom.dcmread(study / img["lesions"][0]["cbis_ddsm"]["image"])
            stored = ds.pixel_array.astype(int)
            assert np.array_equal(stored if ds.PhotometricInterpretation == "MONOCHROME2" else 4095 - stored, twelve.astype(int))
        for les in img["lesions"]:
            mask = cv2.imread(str(study / les["mask"]), cv2.IMREAD_UNCHANGED)
            assert set(np.unique(mask)) == {0, 255} and int((mask > 0).sum()) == les["area"]
    from mammocad.datasets.folder import read_folder

    cases = {c.case_id: c for c in read_folder(folder)}
    assert len(cases) == STUDY_N
    for img in truth["images"]:
        case = cases[img["image_id"]]
        assert (case.label, case.patient_id, case.laterality, case.view) == (img["label"], img["patient_id"], img["laterality"], img["view"])
        assert len(case.lesions) == len(img["lesions"])


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    small = (256, 208)
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_synthetic_study(tmp_path / name, n=3, seed=seed, size=small)
    first, second, other = (_digest(tmp_path / name) for name in "abc")
    assert len(first) > 10 and first == second
    pngs = [k for k in first if "/images/" in k]
    assert pngs and all(other.get(k) != first[k] for k in pngs) and other["ground_truth.json"] != first["ground_truth.json"]


def test_bad_options_are_one_line_errors(tmp_path):
    for kwargs, word in (({"layout": "dicomdir"}, "layout"), ({"transfer_syntax": "jpeg-ls"}, "transfer_syntax"),
                         ({"photometric": "RGB"}, "photometric"), ({"n": 0}, "n")):
        with pytest.raises(ConfigError, match=word):
            write_synthetic_study(tmp_path / "x", size=(128, 104), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"size": (0, 832)}, "height: must be between 64 and 8192 pixels, got 0"),
    ({"size": (1024, 0)}, "width: must be between 64 and 8192 pixels, got 0"),
    ({"size": (-5, 832)}, "height"),
    ({"size": (63, 832)}, "height"),
    ({"size": (1024, 100_000)}, "width: must be between 64 and 8192 pixels, got 100000"),
    ({"size": (512.5, 416)}, "height: must be a whole number"),
    ({"size": (512,)}, "size"),
    ({"n": 10**9}, "n: must be a whole number from 1 to"),
    ({"n": -1}, "n"),
])
def test_absurd_sizes_are_one_line_config_errors_before_any_work(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        write_synthetic_study(tmp_path / "x", **{"size": (128, 104), **kwargs})
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flag, value", [("--height", "0"), ("--width", "0"), ("--height", "100000")])
def test_cli_synth_bad_size_is_one_line(tmp_path, capsys, flag, value):
    from mammocad.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["synth", str(tmp_path / "cli"), "--n", "1", flag, value])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.startswith(f"mammocad: {flag[2:]}: must be between") and err.count("\n") == 1, err


def test_smallest_and_non_square_sizes_still_work(tmp_path):
    write_synthetic_study(tmp_path / "s", n=1, size=(64, 64), layout="folder")
    write_synthetic_study(tmp_path / "t", n=1, size=(np.int64(96), 80.0), layout="folder")
    assert (tmp_path / "t" / "folder" / "labels.csv").is_file()


def test_cli_synth(tmp_path, capsys):
    from mammocad.cli import main

    main(["synth", str(tmp_path / "cli"), "--n", "2", "--height", "256", "--width", "208", "--layout", "folder"])
    out = capsys.readouterr().out
    assert "wrote 2 synthetic mammograms" in out and (tmp_path / "cli" / "folder" / "labels.csv").is_file()
