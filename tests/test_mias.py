"""mini-MIAS adapter: real Info.txt (cross-checked against our images.csv/abnormalities.csv/masks)
and synthetic Info.txt edge cases."""

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
from mammocad.datasets.mias import read_mias
from mammocad.datasets.rasterize import rasterize_lesion
from mammocad.errors import AnnotationError, ConfigError, InputError


def _simple_info_rows(info: Path) -> list[list[str]]:
    """Independent, deliberately naive reading of Info.txt: every line starting with 'mdb'."""
    return [ln.split() for ln in info.read_text(encoding="latin-1").splitlines() if ln.strip().startswith("mdb")]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def mias_dir() -> Path:
    return shared_path("mias")


@pytest.fixture(scope="module")
def mias_cases(mias_dir):
    return read_mias(mias_dir)


def test_registered():
    assert registry._ADAPTERS["mias"] is read_mias


@pytest.mark.realdata
def test_counts_match_info_txt(mias_dir, mias_cases):
    rows = _simple_info_rows(mias_dir / "Info.txt")
    abnormal = [r for r in rows if r[2] != "NORM"]
    assert len(mias_cases) == len({r[0] for r in rows}) == 216
    lesions = [les for c in mias_cases for les in c.lesions]
    assert len(lesions) == len(abnormal) == 82
    classes = Counter(les.source_label.split()[0] for les in lesions)
    assert classes == Counter(r[2] for r in abnormal) == {"CALC": 20, "CIRC": 16, "SPIC": 14, "ARCH": 13, "MISC": 10, "ASYM": 9}
    assert Counter(les.pathology for les in lesions) == {"benign": 47, "malignant": 35}
    assert Counter(c.label for c in mias_cases) == {"normal": 138, "benign": 44, "malignant": 34}
    assert Counter(les.kind for les in lesions) == {"mass": 40, "calcification": 20, "distortion": 13, "asymmetry": 9}
    assert {c.dataset for c in mias_cases} == {"mias"} and {c.modality for c in mias_cases} == {"MG"}
    assert {c.view for c in mias_cases} == {"MLO"}
    assert all(Path(c.image_path).is_file() for c in mias_cases)


@pytest.mark.realdata
def test_cases_match_images_csv(mias_dir, mias_cases):
    by_id = {c.case_id: c for c in mias_cases}
    table = _csv(mias_dir / "images.csv")
    assert set(by_id) == {r["refnum"] for r in table}
    for r in table:
        c = by_id[r["refnum"]]
        assert c.patient_id == f"mias_p{int(r['patient_id']):03d}"
        assert c.laterality == {"left": "L", "right": "R"}[r["side"]]
        assert c.attributes["background_tissue"] == r["background_tissue"]
        assert c.label == r["image_label"]
        assert len(c.lesions) == int(r["n_abnormalities"])
        assert sum(les.circle is not None for les in c.lesions) == int(r["n_with_coordinates"])
    assert len({c.patient_id for c in mias_cases}) == 108


@pytest.mark.realdata
def test_lesions_match_abnormalities_csv(mias_dir, mias_cases):
    by_id = {c.case_id: c for c in mias_cases}
    table = _csv(mias_dir / "abnormalities.csv")
    assert len(table) == 82
    for r in table:
        les = by_id[r["refnum"]].lesions[int(r["abnormality_index"]) - 1]
        assert les.source_label == f"{r['abnormality_class']} {r['severity']}"
        assert les.pathology == {"B": "benign", "M": "malignant"}[r["severity"]]
        if r["has_coordinates"] == "1":
            # abnormalities.csv gives the pixel (col, row) holding the centre; our centre is that pixel's centre.
            assert les.circle == (float(r["col"]) + 0.5, float(r["row"]) + 0.5, float(r["radius"]))
        else:
            assert les.circle is None


@pytest.mark.realdata
def test_multi_lesion_films(mias_cases):
    by_id = {c.case_id: c for c in mias_cases}
    assert {cid: len(c.lesions) for cid, c in by_id.items() if len(c.lesions) > 1} == {"mdb223": 2, "mdb226": 3, "mdb249": 2}
    assert [les.circle for les in by_id["mdb226"].lesions] == [(287.5, 414.5, 7.0), (329.5, 474.5, 25.0), (531.5, 303.5, 8.0)]
    assert by_id["mdb249"].label == "malignant" and by_id["mdb223"].label == "benign"
    assert (by_id["mdb001"].laterality, by_id["mdb002"].laterality) == ("R", "L")
    assert by_id["mdb001"].patient_id == by_id["mdb002"].patient_id == "mias_p001"


@pytest.mark.realdata
def test_rasterized_discs_match_shared_masks(mias_dir, mias_cases):
    """Union of our discs vs the precomputed masks (made independently from Info.txt)."""
    with_coords = [c for c in mias_cases if any(les.circle is not None for les in c.lesions)]
    assert {f"{c.case_id}_mask.png" for c in with_coords} == {p.name for p in (mias_dir / "masks").iterdir()}
    ious = {}
    for c in with_coords:
        union = np.zeros((1024, 1024), bool)
        for les in c.lesions:
            union |= rasterize_lesion(les, (1024, 1024))
        ref = cv2.imread(str(mias_dir / "masks" / f"{c.case_id}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
        ious[c.case_id] = (union & ref).sum() / (union | ref).sum()
    large = [c.case_id for c in with_coords if all(les.circle[2] >= 10 for les in c.lesions)]
    assert len(large) == 74  # 78 minus mdb212, mdb218, mdb223, mdb226
    assert min(ious[cid] for cid in large) >= 0.95
    assert min(ious.values()) >= 0.95  # measured: 1.0 on all 78 films (same disc formula)


# ---------------------------------------------------------------- synthetic Info.txt

HEADER = "        MAMMOGRAPHIC IMAGE ANALYSIS SOCIETY\r\n\r\n3rd column: Class of abnormality present:\r\n   CALC - Calcification\r\n=====\r\n\r\n"


def _write_pgm(path: Path, h: int = 64, w: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((h, w), 7, np.uint8))


def _write_info(folder: Path, data_lines: list[str]) -> Path:
    info = folder / "Info.txt"
    info.write_bytes((HEADER + "".join(line + "\r\n" for line in data_lines) + "\r\n=====\r\n").encode("ascii"))
    return info


def test_synthetic_layout(tmp_path, caplog):
    for n in (1, 2, 3, 4):
        _write_pgm(tmp_path / f"mdb00{n}.pgm")
    _write_info(
        tmp_path,
        [
            "mdb001 G CIRC B 20 10 5 ",  # trailing blank
            "mdb001 G CALC M *NOTE 3* ",
            "mdb002 D NORM ",
            "mdb003 F SPIC B",  # severity but no coordinates
            "mdb004 F NORM",
            "mdb005 F NORM ",  # listed, but no image on disk
        ],
    )
    with caplog.at_level(logging.WARNING, logger="mammocad.datasets.mias"):
        cases = read_mias(tmp_path)
    assert [c.case_id for c in cases] == ["mdb001", "mdb002", "mdb003", "mdb004"]
    assert "mdb005" in caplog.text and "skipped" in caplog.text
    c1, c2, c3, c4 = cases
    assert (c1.label, c2.label, c3.label, c4.label) == ("malignant", "normal", "benign", "normal")
    assert [les.source_label for les in c1.lesions] == ["CIRC B", "CALC M"]
    assert [les.kind for les in c1.lesions] == ["mass", "calcification"]
    # Bottom-left origin, 64-row image: centre (20 + 0.5, 64 - 10 + 0.5), taken from the PGM header.
    assert c1.lesions[0].circle == (20.5, 54.5, 5.0)
    assert c1.lesions[1].circle is None and c1.lesions[1].attributes["note"] == "*NOTE 3*"
    mask = rasterize_lesion(c1.lesions[0], (64, 48))
    assert mask[54, 20] and mask[54, 25] and not mask[54, 26] and mask.sum() == 81  # 81 = lattice points in r=5 disc
    assert c3.lesions[0].circle is None and c3.lesions[0].pathology == "benign" and not c3.lesions[0].has_geometry
    assert [c.patient_id for c in cases] == ["mias_p001", "mias_p001", "mias_p002", "mias_p002"]
    assert [c.laterality for c in cases] == ["R", "L", "R", "L"]
    assert c2.attributes["background_tissue"] == "D"
    assert all(c.image_path.endswith(".pgm") for c in cases)


def test_images_subfolder_png(tmp_path):
    img = tmp_path / "images" / "mdb007.png"
    img.parent.mkdir()
    cv2.imwrite(str(img), np.zeros((100, 80), np.uint8))
    _write_info(tmp_path, ["mdb007 G ARCH M 30 40 12"])
    (case,) = read_mias(tmp_path)
    assert case.image_path == str(img) and case.lesions[0].circle == (30.5, 60.5, 12.0)
    assert case.lesions[0].kind == "distortion" and case.patient_id == "mias_p004"


@pytest.mark.parametrize(
    "bad_line",
    ["mdb002 G CIRC B 535 abc 12", "mdb002 X NORM", "mdb002 G BLOB B 1 2 3", "mdb002 G CIRC B 1 2", "garbage here", "mdb002"],
)
def test_unparsable_line_names_info_txt_and_line(tmp_path, bad_line):
    _write_pgm(tmp_path / "mdb001.pgm")
    info = _write_info(tmp_path, ["mdb001 G NORM ", bad_line])
    line_no = HEADER.count("\r\n") + 2
    with pytest.raises(AnnotationError) as exc:
        read_mias(tmp_path)
    assert str(exc.value).startswith(f"{info}:{line_no}: ")
    assert "\n" not in str(exc.value)


def test_norm_and_abnormal_for_same_film_is_an_error(tmp_path):
    _write_pgm(tmp_path / "mdb001.pgm")
    _write_info(tmp_path, ["mdb001 G NORM", "mdb001 G CIRC B 1 2 3"])
    with pytest.raises(AnnotationError, match="NORM"):
        read_mias(tmp_path)


def test_missing_info_txt_names_folder(tmp_path):
    _write_pgm(tmp_path / "mdb001.pgm")
    with pytest.raises(InputError) as exc:
        read_mias(tmp_path)
    assert str(exc.value).startswith(f"{tmp_path}: ") and "Info.txt" in str(exc.value)


def test_no_image_at_all_is_an_error(tmp_path):
    _write_info(tmp_path, ["mdb001 G NORM"])
    with pytest.raises(InputError, match="none of the 1 films"):
        read_mias(tmp_path)


def test_unknown_option_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"^mias: unknown option\(s\) size; the mias adapter takes no options$"):
        read_mias(tmp_path, size="512")
