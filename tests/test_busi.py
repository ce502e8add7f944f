"""BUSI adapter: real original-layout folder (cross-checked against our images.csv) and synthetic
layouts for the edge cases."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import shared_path
from mammocad.datasets import registry
from mammocad.datasets.busi import read_busi
from mammocad.datasets.rasterize import rasterize_lesion
from mammocad.errors import AnnotationError, ConfigError, InputError


@pytest.fixture(scope="module")
def busi_dir() -> Path:
    return shared_path("busi")


@pytest.fixture(scope="module")
def busi_cases(busi_dir):
    return read_busi(busi_dir)


@pytest.fixture(scope="module")
def busi_table(busi_dir) -> dict[str, dict[str, str]]:
    with open(busi_dir / "images.csv", newline="") as fh:
        return {f"{r['label']}_{r['busi_id']}": r for r in csv.DictReader(fh)}


def test_registered():
    assert registry._ADAPTERS["busi"] is read_busi


@pytest.mark.realdata
def test_counts(busi_cases, busi_table):
    assert len(busi_cases) == len(busi_table) == 91
    assert Counter(c.label for c in busi_cases) == {"benign": 23, "malignant": 34, "normal": 34}
    assert {c.case_id for c in busi_cases} == set(busi_table)
    # 92 mask files; the 34 normal ones are all-zero and give no lesion, benign (25) has two.
    assert sum(int(r["n_mask_files"]) for r in busi_table.values()) == 92
    assert sum(len(c.lesions) for c in busi_cases) == 58
    by_id = {c.case_id: c for c in busi_cases}
    assert [Path(les.mask_path).name for les in by_id["benign_25"].lesions] == ["benign (25)_mask.png", "benign (25)_mask_1.png"]
    for c in busi_cases:
        assert c.modality == "US" and c.dataset == "busi"
        assert c.patient_id == f"busi_{c.case_id}" and c.attributes["patient_id_source"] == "image"
        assert Path(c.image_path).name == f"{c.label} ({c.attributes['busi_id']}).png"
        if c.label == "normal":
            assert c.lesions == []
        else:
            assert len(c.lesions) == int(busi_table[c.case_id]["n_mask_files"]) >= 1
            assert all(les.pathology == c.label and les.kind == "mass" and les.mask_path for les in c.lesions)


@pytest.mark.realdata
def test_rasterized_union_matches_lesion_pixels(busi_cases, busi_table):
    """Pixel count of the union of each image's lesion masks equals images.csv's lesion_pixels."""
    for c in busi_cases:
        row = busi_table[c.case_id]
        shape = (int(row["height"]), int(row["width"]))
        union = np.zeros(shape, bool)
        for les in c.lesions:
            mask = rasterize_lesion(les, shape)
            assert mask.any(), les.mask_path
            union |= mask
        assert int(union.sum()) == int(row["lesion_pixels"]), c.case_id


# ---------------------------------------------------------------- synthetic layouts


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def _lesion_mask(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    r0, r1, c0, c1 = box
    m[r0:r1, c0:c1] = 255
    return m


def test_synthetic_wrapper_folder_capitalised_and_orphan(tmp_path, caplog):
    root = tmp_path / "Dataset_BUSI_with_GT"
    img = np.full((40, 60, 3), 90, np.uint8)
    _png(root / "Benign" / "benign (3).png", img)
    _png(root / "Benign" / "benign (3)_mask.png", _lesion_mask(40, 60, (5, 15, 10, 30)))
    _png(root / "Benign" / "benign (3)_mask_1.png", _lesion_mask(40, 60, (20, 25, 40, 50)))
    _png(root / "Benign" / "benign (4)_mask.png", _lesion_mask(40, 60, (0, 5, 0, 5)))  # orphan
    _png(root / "MALIGNANT" / "malignant (10).png", img)
    _png(root / "MALIGNANT" / "malignant (10)_mask.png", _lesion_mask(20, 30, (2, 7, 5, 15)))  # half size
    _png(root / "normal" / "normal (2).png", img)
    _png(root / "normal" / "normal (2)_mask.png", np.zeros((40, 60), np.uint8))
    with caplog.at_level(logging.WARNING, logger="mammocad.datasets.busi"):
        cases = read_busi(tmp_path)  # the parent of Dataset_BUSI_with_GT
    assert "benign (4)_mask.png" in caplog.text and "without its image" in caplog.text
    assert [c.case_id for c in cases] == ["benign_3", "malignant_10", "normal_2"]
    benign, malignant, normal = cases
    assert [les.attributes["mask_index"] for les in benign.lesions] == [0, 1]
    assert [int(rasterize_lesion(les, (40, 60)).sum()) for les in benign.lesions] == [200, 50]
    assert normal.lesions == [] and normal.label == "normal"
    # Mask at half the image size, same aspect: rasterize_lesion resizes it (nearest neighbour).
    resized = rasterize_lesion(malignant.lesions[0], (40, 60))
    assert resized.shape == (40, 60) and int(resized.sum()) == 200 and resized[4:14, 10:30].all()
    # Same folder read directly (no wrapper) gives the same cases.
    assert [c.case_id for c in read_busi(root)] == ["benign_3", "malignant_10", "normal_2"]


def test_mask_with_other_aspect_is_rejected_by_rasterize(tmp_path):
    _png(tmp_path / "benign" / "benign (1).png", np.zeros((40, 60), np.uint8))
    _png(tmp_path / "benign" / "benign (1)_mask.png", _lesion_mask(40, 40, (0, 10, 0, 10)))
    (case,) = read_busi(tmp_path)
    with pytest.raises(AnnotationError, match="aspect"):
        rasterize_lesion(case.lesions[0], (40, 60))


def test_lesion_class_with_only_empty_mask_keeps_outline_less_lesion(tmp_path, caplog):
    _png(tmp_path / "malignant" / "malignant (1).png", np.zeros((10, 10), np.uint8))
    _png(tmp_path / "malignant" / "malignant (1)_mask.png", np.zeros((10, 10), np.uint8))
    with caplog.at_level(logging.WARNING, logger="mammocad.datasets.busi"):
        (case,) = read_busi(tmp_path)
    assert case.label == "malignant" and len(case.lesions) == 1 and not case.lesions[0].has_geometry
    assert "without a non-empty mask" in caplog.text


def test_empty_folder_names_it(tmp_path):
    with pytest.raises(InputError) as exc:
        read_busi(tmp_path)
    assert str(exc.value).startswith(f"{tmp_path}: ") and "class folders" in str(exc.value)


def test_class_folders_without_images_is_an_error(tmp_path):
    (tmp_path / "benign").mkdir()
    _png(tmp_path / "normal" / "normal (1)_mask.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match="no BUSI images"):
        read_busi(tmp_path)


def test_missing_folder_and_unknown_option(tmp_path):
    with pytest.raises(InputError, match="folder not found"):
        read_busi(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"^busi: unknown option\(s\) masks; the busi adapter takes no options$"):
        read_busi(tmp_path, masks="union")
