"""Folder adapter: images/ + masks/ (+ labels.csv), mask naming, label rules, instance masks, errors."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import shared_path
from mammocad.datasets.folder import read_folder
from mammocad.datasets.rasterize import rasterize_lesion
from mammocad.datasets.registry import read_cases
from mammocad.errors import AnnotationError, ConfigError, InputError

H, W = 60, 80


def write(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)
    return path


def image() -> np.ndarray:
    return (np.arange(H * W).reshape(H, W) % 200).astype(np.uint8)


def mask(*boxes: tuple[int, int, int, int], value: int = 255) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = value
    return m


def make_folder(root: Path, csv: str | None) -> Path:
    for name in ("a.png", "a_1.png", "b.png", "c.tif", "d.jpg", "e.png"):
        write(root / "images" / name, image())
    (root / "images" / "notes.txt").write_text("not an image")
    write(root / "masks" / "a_mask.png", mask((10, 20, 10, 30)))  # 200 px
    write(root / "masks" / "a_mask_1.png", mask((30, 35, 40, 50)))  # 50 px
    write(root / "masks" / "a_1.png", mask((0, 3, 0, 3)))  # the mask of image a_1, not a 2nd lesion of a
    write(root / "masks" / "b.png", mask())  # empty: an explicit "nothing here"
    write(root / "masks" / "c_2.png", mask((5, 9, 5, 9)))  # 16 px
    write(root / "masks" / "zzz_mask.png", mask((1, 2, 1, 2)))  # no such image
    if csv is not None:
        (root / "labels.csv").write_text(csv)
    return root


LABELS = (
    "Image,label,patient_id,laterality,view,modality,pathology\n"
    "a.png,malignant,P1,left,cc,,Malignant\n"
    "c,benign,P2,R,MLO,US,\n"
    "e.png,normal,P2,,,,\n"
    "ghost.png,benign,P3,,,,\n"
)


def test_folder_with_labels_csv(tmp_path, caplog):
    root = make_folder(tmp_path, LABELS)
    with caplog.at_level(logging.WARNING):
        cases = read_cases("folder", root)
    summary = [(c.case_id, c.patient_id, c.label, c.laterality, c.view, c.modality, len(c.lesions)) for c in cases]
    assert summary == [
        ("a", "P1", "malignant", "L", "CC", "MG", 2),
        ("a_1", "a_1", "unknown", None, None, "MG", 1),
        ("b", "b", "normal", None, None, "MG", 0),
        ("c", "P2", "benign", "R", "MLO", "US", 1),
        ("d", "d", "unknown", None, None, "MG", 0),
        ("e", "P2", "normal", None, None, "MG", 0),
    ]
    assert [c.attributes["label_from"] for c in cases] == ["labels.csv", "masks", "masks", "labels.csv", "no_mask_means=unknown", "labels.csv"]
    assert cases[2].attributes["empty_masks"] == 1
    assert cases[0].image_path == str((root / "images" / "a.png").absolute())

    a0, a1 = cases[0].lesions
    assert [Path(a0.mask_path).name, Path(a1.mask_path).name] == ["a_mask.png", "a_mask_1.png"]
    assert [(les.pathology, les.source_label) for les in (a0, a1)] == [("malignant", "Malignant")] * 2
    assert [rasterize_lesion(les, (H, W)).sum() for les in (a0, a1)] == [200, 50]
    assert rasterize_lesion(a0, (H, W))[10:20, 10:30].all()
    (c0,) = cases[3].lesions
    assert c0.pathology == "benign" and c0.attributes["pathology_from"] == "image label"
    assert rasterize_lesion(c0, (H, W)).sum() == 16
    assert cases[1].lesions[0].pathology == "unknown"

    assert "ghost.png' is not in images/" in caplog.text
    assert "zzz_mask.png: matches no image" in caplog.text


def test_folder_without_csv_and_no_mask_means_normal(tmp_path):
    root = make_folder(tmp_path, None)
    cases = read_folder(root, no_mask_means="normal", modality="US", dataset="mine")
    assert [(c.case_id, c.label, c.patient_id) for c in cases] == [
        ("a", "unknown", "a"), ("a_1", "unknown", "a_1"), ("b", "normal", "b"), ("c", "unknown", "c"),
        ("d", "normal", "d"), ("e", "normal", "e")]
    assert {c.modality for c in cases} == {"US"} and {c.dataset for c in cases} == {"mine"}
    assert all(les.pathology == "unknown" for c in cases for les in c.lesions)


def test_folder_instance_label_masks(tmp_path):
    write(tmp_path / "images" / "x.png", image())
    labels = mask((5, 10, 5, 10), value=1) + mask((20, 30, 40, 44), value=7)
    write(tmp_path / "masks" / "x.png", labels)
    (case,) = read_folder(tmp_path, mask_mode="instances")
    assert [les.attributes["label_value"] for les in case.lesions] == [1, 7]
    assert [rasterize_lesion(les, (H, W)).sum() for les in case.lesions] == [25, 40]
    (binary,) = read_folder(tmp_path)
    assert len(binary.lesions) == 1 and rasterize_lesion(binary.lesions[0], (H, W)).sum() == 65


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match=r"images: folder not found"):
        read_folder(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "readme.txt").write_text("x")
    with pytest.raises(InputError, match=r"images: empty folder"):
        read_folder(tmp_path)

    write(tmp_path / "images" / "x.png", image())
    (tmp_path / "labels.csv").write_text("file,label\nx.png,benign\n")
    with pytest.raises(AnnotationError, match=r"labels\.csv: missing required column 'image'"):
        read_folder(tmp_path)
    (tmp_path / "labels.csv").unlink()

    with pytest.raises(ConfigError, match="mask_mode"):
        read_folder(tmp_path, mask_mode="rgb")
    with pytest.raises(ConfigError, match="unknown option"):
        read_folder(tmp_path, json="x.json")

    # A mask of another size (and aspect ratio) is refused when it is rasterised, naming the mask.
    write(tmp_path / "masks" / "x_mask.png", np.full((H, H), 255, dtype=np.uint8))
    (case,) = read_folder(tmp_path)
    with pytest.raises(AnnotationError, match=r"x_mask\.png: mask size 60x60 does not match image size 80x60"):
        rasterize_lesion(case.lesions[0], (H, W))


def test_unreadable_labels_csv_is_an_input_error_naming_it(tmp_path, monkeypatch):
    from mammocad.datasets import folder

    write(tmp_path / "images" / "x.png", image())
    (tmp_path / "labels.csv").write_text("image,label\nx.png,benign\n")
    real_open = open

    def denied(path, *args, **kwargs):  # chmod 000 does not stop root, which the tests may run as
        if Path(path).name == "labels.csv":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(folder, "open", denied, raising=False)
    with pytest.raises(InputError, match=r"labels\.csv: cannot read \(Permission denied\)$"):
        read_folder(tmp_path)


def test_float_mask_counts_and_draws_the_same_pixels(tmp_path):
    import tifffile

    # A float TIFF mask holding 0 / 0.3: a lesion for the adapter AND non-empty when drawn
    # (the adapter used "!= 0" but rasterize_lesion "> 0.5", which drew nothing).
    write(tmp_path / "images" / "x.png", image())
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "masks" / "x.tif", mask((10, 20, 10, 30), value=1).astype(np.float32) * np.float32(0.3))
    (case,) = read_folder(tmp_path)
    assert case.label == "unknown" and len(case.lesions) == 1
    drawn = rasterize_lesion(case.lesions[0], (H, W))
    assert int(drawn.sum()) == 200 and drawn[10:20, 10:30].all()


@pytest.mark.realdata
def test_folder_finds_dicom_without_suffix_and_refuses_non_breast_modalities(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(shared_path("dicom", "dicom-test-files", "MG1_J2KI"), images / "IM0001")  # a real mammogram, no suffix
    shutil.copy(shared_path("dicom", "pydicom", "CT_small.dcm"), images / "ct.dcm")
    write(images / "film.png", image())
    (images / "notes.txt").write_text("not an image")
    (images / ".DS_Store").write_bytes(b"\0" * 16)
    write(images / "sub" / "x.png", image())
    with caplog.at_level(logging.WARNING):
        cases = read_folder(tmp_path)
    assert [(c.case_id, c.modality, c.attributes["modality_from"]) for c in cases if "refused" not in c.attributes] == [
        ("IM0001", "MG", "DICOM header"), ("film", "MG", "default (plain image)")]
    (ct,) = [c for c in cases if "refused" in c.attributes]  # kept so that prepare counts it as a failure
    assert ct.case_id == "ct" and ct.attributes["refused"].startswith(f"{images / 'ct.dcm'}: modality CT is neither a mammogram")
    from mammocad.datasets.prepare_run import prepare_case

    status, record = prepare_case(ct, tmp_path / "out", None)
    assert status == "failed" and record["error"] == ct.attributes["refused"] and "\n" not in record["error"]
    assert not (tmp_path / "out").exists()  # refused before any work
    for name, reason in (("notes.txt", "not an image"), (".DS_Store", "hidden file"), ("sub", "subfolder: not searched")):
        assert f"{images / name}: not used: {reason}" in caplog.text

    # naming the modality takes every image as it, the CT included (the user said so)
    cases = read_folder(tmp_path, modality="US")
    assert [(c.case_id, c.modality, c.attributes["modality_from"]) for c in cases] == [
        ("IM0001", "US", "modality option"), ("ct", "US", "modality option"), ("film", "US", "modality option")]
    (tmp_path / "labels.csv").write_text("image,modality\nct.dcm,MG\n")  # or labels.csv names it for that image
    assert [c.case_id for c in read_folder(tmp_path)] == ["IM0001", "ct", "film"]


def test_folder_keeps_uid_named_dicom_names_whole(tmp_path):
    from mammocad.synth_writers import DicomIdentity, mammogram_dataset, save_dataset, uid_from

    for name in ("1.2.840.113619.2.55.3", "1.2.840.113619.2.55.4"):  # their "suffixes" are numbers
        path = tmp_path / "images" / name
        ident = DicomIdentity("P1", uid_from(path, "st"), uid_from(path, "se"), uid_from(path, "sop"))
        ds = mammogram_dataset(np.full((H, W), 1000, np.uint16), ident, "L", "CC", 0.1, "MONOCHROME2", (2048.0, 4096.0),
                               "explicit-little")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_dataset(ds, path)
    cases = read_folder(tmp_path)
    assert [(c.case_id, c.modality, c.attributes["modality_from"]) for c in cases] == [
        ("1.2.840.113619.2.55.3", "MG", "DICOM header"), ("1.2.840.113619.2.55.4", "MG", "DICOM header")]
