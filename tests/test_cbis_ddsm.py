"""CBIS-DDSM adapter: counts from the real official CSVs (expected values computed here with the
stdlib csv module), small synthetic DICOM trees in both layouts, and CSV edge cases."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cbis_tree import FULL_SHAPE, mask_pixels, read_real_rows, write_cbis_tree, write_dicom
from conftest import shared_path
from mammocad.datasets.cbis_ddsm import (
    cases_from_rows,
    check_csv_paths,
    find_case_description_csvs,
    read_case_description_csv,
    read_cbis_ddsm,
    split_mask_and_crop,
)
from mammocad.errors import AnnotationError, ConfigError, InputError
from mammocad.records import Case

MASS_CSV = "mass_case_description_train_set.csv"
CALC_CSV = "calc_case_description_train_set.csv"
# P_00001 LEFT CC: one malignant mass. P_00710 RIGHT CC: benign mass + malignant calc (merged).
# P_00106 RIGHT CC: 3 masses + 1 calc, all BENIGN_WITHOUT_CALLBACK (several abnormalities, merged).
TREE_KEYS = {("P_00001", "LEFT", "CC"), ("P_00710", "RIGHT", "CC"), ("P_00106", "RIGHT", "CC")}
TREE_IDS = ["Train_P_00001_LEFT_CC", "Train_P_00106_RIGHT_CC", "Train_P_00710_RIGHT_CC"]


def _stdlib_rows(name: str) -> list[dict[str, str]]:
    with open(shared_path("cbis_ddsm", name), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _real_tables() -> dict[str, tuple[list[str], list[list[str]]]]:
    return {name: read_real_rows(shared_path("cbis_ddsm", name), TREE_KEYS) for name in (MASS_CSV, CALC_CSV)}


def _by_id(cases: list[Case]) -> dict[str, Case]:
    return {c.case_id: c for c in cases}


# ----------------------------------------------------------------------------- real CSVs


@pytest.mark.realdata
def test_real_csv_counts_match_stdlib_reading():
    mass, calc = _stdlib_rows(MASS_CSV), _stdlib_rows(CALC_CSV)
    key = lambda r: (r["patient_id"], r["left or right breast"], r["image view"])  # noqa: E731
    mass_images, calc_images = {key(r) for r in mass}, {key(r) for r in calc}
    assert (len(mass), len(calc)) == (1318, 1546)  # DATA.md
    assert (len({r["patient_id"] for r in mass}), len({r["patient_id"] for r in calc})) == (691, 602)  # DATA.md

    folder = shared_path("cbis_ddsm")
    csvs = find_case_description_csvs(folder)
    assert [p.name for p in csvs] == [MASS_CSV, CALC_CSV]
    cases = cases_from_rows([r for p in csvs for r in read_case_description_csv(p)])
    lesions = [les for c in cases for les in c.lesions]

    assert Counter(les.kind for les in lesions) == {"mass": len(mass), "calcification": len(calc)}
    assert len(cases) == len(mass_images | calc_images)
    assert sum(any(les.kind == "mass" for les in c.lesions) for c in cases) == len(mass_images)
    assert sum(any(les.kind == "calcification" for les in c.lesions) for c in cases) == len(calc_images)
    merged = [c for c in cases if {les.kind for les in c.lesions} == {"mass", "calcification"}]
    assert len(merged) == len(mass_images & calc_images) > 0
    assert len({c.patient_id for c in cases}) == len({r["patient_id"] for r in mass + calc})
    assert len({c.patient_id for c in cases if any(les.kind == "mass" for les in c.lesions)}) == 691
    assert sum(len(c.lesions) > 1 for c in cases) == sum(n > 1 for n in Counter(map(key, mass + calc)).values())

    raw_words = Counter(r["pathology"] for r in mass + calc)
    assert Counter(les.source_label for les in lesions) == raw_words
    assert raw_words["BENIGN_WITHOUT_CALLBACK"] > 0
    assert Counter(les.pathology for les in lesions) == {
        "malignant": raw_words["MALIGNANT"],
        "benign": raw_words["BENIGN"] + raw_words["BENIGN_WITHOUT_CALLBACK"],
    }
    assert sum(les.attributes["mass_margins"] is None for les in lesions if les.kind == "mass") == sum(r["mass margins"] == "N/A" for r in mass)
    assert sum(les.attributes["calc_distribution"] is None for les in lesions if les.kind != "mass") == sum(r["calc distribution"] == "N/A" for r in calc)
    assert Counter(les.attributes["assessment"] for les in lesions) == Counter(int(r["assessment"]) for r in mass + calc)

    assert len({c.case_id for c in cases}) == len(cases)
    assert all("/" not in c.case_id and c.split == "train" and c.modality == "MG" for c in cases)
    assert {c.laterality for c in cases} == {"L", "R"} and {c.view for c in cases} == {"CC", "MLO"}
    assert all(len(c.patient_id) == 7 and c.patient_id.startswith("P_") for c in cases)
    # Embedded newlines inside quoted path fields are gone from every path.
    assert all("\n" not in v for les in lesions for k, v in les.attributes.items() if k.startswith("csv_") and v)
    assert all(c.label == ("malignant" if any(les.pathology == "malignant" for les in c.lesions) else "benign") for c in cases)


@pytest.mark.realdata
def test_real_csvs_with_partial_tree_keep_only_found_images(tmp_path, caplog):
    raw = tmp_path / "raw"
    write_cbis_tree(raw, _real_tables(), layout="nbia", write_csvs=False)
    with caplog.at_level(logging.WARNING, logger="mammocad.datasets.cbis_ddsm"):
        cases = read_cbis_ddsm(raw, csv_dir=str(shared_path("cbis_ddsm")))
    assert sorted(_by_id(cases)) == TREE_IDS
    n_images = len({(r["patient_id"], r["left or right breast"], r["image view"]) for r in _stdlib_rows(MASS_CSV) + _stdlib_rows(CALC_CSV)})
    assert f"{n_images - 3} of {n_images} CBIS-DDSM images not found" in caplog.text


# ----------------------------------------------------------------------------- small DICOM trees


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("tree_layout", "nbia_root", "layout"),
    [("csv", "", "auto"), ("csv", "", "csv"), ("csv", "", "nbia"), ("nbia", "", "auto"), ("nbia", "manifest-1/CBIS-DDSM", "nbia")],
)
def test_small_tree_cases(tmp_path, tree_layout, nbia_root, layout):
    raw = tmp_path / "raw"
    made = write_cbis_tree(raw, _real_tables(), layout=tree_layout, nbia_root=nbia_root)
    cases = _by_id(read_cbis_ddsm(raw, layout=layout))
    assert sorted(cases) == TREE_IDS

    one = cases["Train_P_00001_LEFT_CC"]
    assert (one.patient_id, one.laterality, one.view, one.split, one.modality, one.dataset) == ("P_00001", "L", "CC", "train", "MG", "cbis-ddsm")
    assert one.image_path == str(made["images"]["Mass-Training_P_00001_LEFT_CC"])
    [les] = one.lesions
    assert (les.kind, les.pathology, les.source_label) == ("mass", "malignant", "MALIGNANT")
    assert les.mask_path == str(made["masks"]["Mass-Training_P_00001_LEFT_CC_1"])
    assert les.attributes["cropped_image_path"] == str(made["crops"]["Mass-Training_P_00001_LEFT_CC_1"])
    assert les.attributes.items() >= {"abnormality_id": 1, "assessment": 4, "subtlety": 4, "mass_shape": "IRREGULAR-ARCHITECTURAL_DISTORTION", "mass_margins": "SPICULATED"}.items()
    assert one.label == "malignant" and one.attributes["breast_density"] == 3

    merged = cases["Train_P_00710_RIGHT_CC"]
    assert merged.image_path == str(made["images"]["Mass-Training_P_00710_RIGHT_CC"])
    assert merged.attributes["image_copies"] == [str(made["images"][f]) for f in ("Mass-Training_P_00710_RIGHT_CC", "Calc-Training_P_00710_RIGHT_CC")]
    assert [(x.kind, x.pathology, x.attributes["abnormality_id"]) for x in merged.lesions] == [("mass", "benign", 1), ("calcification", "malignant", 2)]
    assert merged.lesions[1].mask_path == str(made["masks"]["Calc-Training_P_00710_RIGHT_CC_2"])
    assert merged.lesions[1].attributes.items() >= {"calc_type": "PLEOMORPHIC", "calc_distribution": "CLUSTERED"}.items()
    assert merged.label == "malignant"
    assert merged.attributes["source_csvs"] == [MASS_CSV, CALC_CSV]

    multi = cases["Train_P_00106_RIGHT_CC"]
    assert [(x.kind, x.attributes["abnormality_id"]) for x in multi.lesions] == [("calcification", 1), ("mass", 2), ("mass", 3), ("mass", 4)]
    assert {x.source_label for x in multi.lesions} == {"BENIGN_WITHOUT_CALLBACK"}
    assert {x.pathology for x in multi.lesions} == {"benign"} and multi.label == "benign"
    assert [x.mask_path for x in multi.lesions] == [str(made["masks"][x.attributes["roi_folder"]]) for x in multi.lesions]
    assert multi.attributes["pathology_map"]["BENIGN_WITHOUT_CALLBACK"] == "benign"
    # Cases survive the JSON round trip unchanged.
    assert Case.from_dict(multi.to_dict()) == multi


@pytest.mark.realdata
def test_nbia_tree_is_not_found_with_csv_layout(tmp_path):
    raw = tmp_path / "raw"
    write_cbis_tree(raw, _real_tables(), layout="nbia")
    with pytest.raises(InputError, match=r"raw: none of the 3 images .* was found \(layout=csv\)"):
        read_cbis_ddsm(raw, layout="csv")


@pytest.mark.realdata
@pytest.mark.parametrize(("option", "pathology", "label"), [("benign", "benign", "benign"), ("Unknown", "unknown", "unknown"), ("malignant", "malignant", "malignant")])
def test_benign_without_callback_is_configurable(tmp_path, option, pathology, label):
    raw = tmp_path / "raw"
    write_cbis_tree(raw, _real_tables(), layout="nbia")
    cases = _by_id(read_cbis_ddsm(raw, benign_without_callback=option))
    multi = cases["Train_P_00106_RIGHT_CC"]
    assert {x.pathology for x in multi.lesions} == {pathology} and multi.label == label
    assert {x.source_label for x in multi.lesions} == {"BENIGN_WITHOUT_CALLBACK"}
    assert multi.attributes["pathology_map"] == {"MALIGNANT": "malignant", "BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": pathology}
    assert cases["Train_P_00710_RIGHT_CC"].lesions[0].pathology == "benign"  # plain BENIGN is untouched


@pytest.mark.realdata
def test_missing_images_skip_case_with_warning(tmp_path, caplog):
    raw = tmp_path / "raw"
    made = write_cbis_tree(raw, _real_tables(), layout="csv")
    made["images"]["Mass-Training_P_00001_LEFT_CC"].unlink()
    made["images"]["Mass-Training_P_00710_RIGHT_CC"].unlink()  # the calc copy of this image remains
    made["masks"]["Mass-Training_P_00106_RIGHT_CC_2"].unlink()
    with caplog.at_level(logging.WARNING, logger="mammocad.datasets.cbis_ddsm"):
        cases = _by_id(read_cbis_ddsm(raw))
    assert sorted(cases) == ["Train_P_00106_RIGHT_CC", "Train_P_00710_RIGHT_CC"]
    assert cases["Train_P_00710_RIGHT_CC"].image_path == str(made["images"]["Calc-Training_P_00710_RIGHT_CC"])
    assert "Train_P_00001_LEFT_CC" in caplog.text and "case skipped" in caplog.text
    # The abnormality whose mask is gone keeps its pathology but has no outline (crop still found).
    les2 = cases["Train_P_00106_RIGHT_CC"].lesions[1]
    assert les2.attributes["roi_folder"] == "Mass-Training_P_00106_RIGHT_CC_2"
    assert les2.mask_path is None and not les2.has_geometry
    assert les2.attributes["cropped_image_path"] == str(made["crops"]["Mass-Training_P_00106_RIGHT_CC_2"])
    assert "Mass-Training_P_00106_RIGHT_CC_2" in caplog.text
    for f in made["images"].values():
        f.unlink(missing_ok=True)
    with pytest.raises(InputError, match=r"raw: none of the 3 images"):
        read_cbis_ddsm(raw)


# ----------------------------------------------------------------------------- CSV edge cases

HEADER = ("patient_id,breast_density,left or right breast,image view,abnormality id,abnormality type,mass shape,"
          "mass margins,assessment,pathology,subtlety,image file path,cropped image file path,ROI mask file path")


def _synthetic_csv(folder: Path, name: str, lines: list[str], header: str = HEADER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(header + "\n" + "".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _row(patient="P_00001", side="LEFT", view="CC", abn=1, shape="OVAL", margins="SPICULATED", assessment="4", pathology="BENIGN", prefix="Mass-Training"):
    folder = f"{prefix}_{patient}_{side}_{view}"
    return (f"{patient},2,{side},{view},{abn},mass,{shape},{margins},{assessment},{pathology},3,"
            f" {folder}/1.2/1.3/000000.dcm ,{folder}_{abn}/1.4/1.5/000000.dcm,\"{folder}_{abn}/1.4/1.5/000001.dcm\n\"")


def _parse(path: Path, **kw) -> list[Case]:
    return cases_from_rows(read_case_description_csv(path), **kw)


def test_missing_value_spellings_and_embedded_newline(tmp_path):
    path = _synthetic_csv(tmp_path, MASS_CSV, [
        _row("P_00001", shape="N/A", margins="NA", assessment=""),
        _row("P_00002", shape=" na ", margins="ILL_DEFINED", assessment="3"),
    ])
    one, two = _parse(path)
    assert one.lesions[0].attributes.items() >= {"mass_shape": None, "mass_margins": None, "assessment": None}.items()
    assert two.lesions[0].attributes.items() >= {"mass_shape": None, "mass_margins": "ILL_DEFINED", "assessment": 3}.items()
    assert one.image_path == "Mass-Training_P_00001_LEFT_CC/1.2/1.3/000000.dcm"
    assert one.lesions[0].attributes["csv_roi_mask_path"] == "Mass-Training_P_00001_LEFT_CC_1/1.4/1.5/000001.dcm"
    assert one.attributes["breast_density"] == 2  # from the 'breast_density' spelling


def test_missing_column_names_file_and_column(tmp_path):
    path = _synthetic_csv(tmp_path, MASS_CSV, [], header=HEADER.replace(",pathology,", ",diagnosis,"))
    with pytest.raises(AnnotationError, match=rf"{MASS_CSV}: missing required column 'pathology'"):
        read_cbis_ddsm(tmp_path)


def test_no_csv_and_no_folder(tmp_path):
    (tmp_path / "Mass-Training_P_00001_LEFT_CC").mkdir()
    with pytest.raises(InputError, match=rf"{tmp_path}: no CBIS-DDSM case-description CSV"):
        read_cbis_ddsm(tmp_path)
    with pytest.raises(InputError, match=rf"{tmp_path / 'csvs'}: folder not found"):
        read_cbis_ddsm(tmp_path, csv_dir=tmp_path / "csvs")
    with pytest.raises(InputError, match="folder not found"):
        read_cbis_ddsm(tmp_path / "absent")


def test_bad_options_are_config_errors(tmp_path):
    _synthetic_csv(tmp_path, MASS_CSV, [_row()])
    with pytest.raises(ConfigError, match="benign_without_callback"):
        read_cbis_ddsm(tmp_path, benign_without_callback="maybe")
    with pytest.raises(ConfigError, match="layout"):
        read_cbis_ddsm(tmp_path, layout="flat")
    # A misspelt option is refused, not ignored (it used to vanish into **_).
    with pytest.raises(ConfigError, match=r"cbis-ddsm: unknown option\(s\) benign_without_calback; known: benign_without_callback, csv_dir, layout"):
        read_cbis_ddsm(tmp_path, benign_without_calback="unknown")


def test_malformed_row_skips_its_whole_image(tmp_path, caplog):
    path = _synthetic_csv(tmp_path, MASS_CSV, [
        _row("P_00001", abn=1, pathology="MALIGNANT"),
        _row("P_00001", abn=2, pathology="MAYBE"),
        _row("P_00002"),
    ])
    with caplog.at_level(logging.WARNING):
        cases = _parse(path)
    assert [c.case_id for c in cases] == ["Train_P_00002_LEFT_CC"]
    assert "line 4: unknown pathology 'MAYBE'"  # rows span 2 lines in caplog.text


def test_official_test_split_kept_apart_from_train(tmp_path):
    train = _synthetic_csv(tmp_path, MASS_CSV, [_row("P_00038")])
    test = _synthetic_csv(tmp_path, "calc_case_description_test_set.csv", [_row("P_00038", prefix="Calc-Test").replace(",mass,", ",calcification,")],
                          header=HEADER.replace("mass shape,mass margins", "calc type,calc distribution").replace("breast_density", "breast density"))
    cases = cases_from_rows(read_case_description_csv(train) + read_case_description_csv(test))
    assert [(c.case_id, c.split, c.patient_id) for c in cases] == [("Test_P_00038_LEFT_CC", "test", "P_00038"), ("Train_P_00038_LEFT_CC", "train", "P_00038")]
    assert cases[0].lesions[0].kind == "calcification" and cases[0].lesions[0].attributes["calc_type"] == "OVAL"
    # A renamed CSV still gets its split from the folder prefix (Calc-Test_).
    renamed = test.rename(tmp_path / "calc_case_description.csv")
    assert cases_from_rows(read_case_description_csv(renamed))[0].split == "test"


def test_registry_lookup(tmp_path):
    from mammocad.datasets import registry

    assert registry.get_adapter("cbis-ddsm") is read_cbis_ddsm
    folder = tmp_path / "Mass-Training_P_00001_LEFT_CC" / "1.2" / "1.3"
    write_dicom(folder / "000000.dcm", np.zeros(FULL_SHAPE, np.uint16))
    _synthetic_csv(tmp_path, MASS_CSV, [_row()])
    [case] = registry.read_cases("cbis-ddsm", tmp_path, benign_without_callback="unknown")
    assert case.image_path == str(folder / "000000.dcm") and case.lesions[0].mask_path is None


# ----------------------------------------------------------------------------- ROI masks


def test_mask_told_from_crop_by_size_then_pixels(tmp_path):
    mask = write_dicom(tmp_path / "a.dcm", mask_pixels(1))
    crop = write_dicom(tmp_path / "b.dcm", np.arange(120, dtype=np.uint16).reshape(12, 10))
    assert split_mask_and_crop([crop, mask], FULL_SHAPE) == (mask, crop)
    # A half-size mask is not told by size; its binary pixels decide.
    half = write_dicom(tmp_path / "c.dcm", mask_pixels(1)[::2, ::2].copy())
    assert split_mask_and_crop([crop, half], FULL_SHAPE) == (half, crop)
    assert split_mask_and_crop([crop], FULL_SHAPE) == (None, crop)
    assert split_mask_and_crop([crop, mask], None) == (mask, crop)


def _write_mask(path: Path, pixels: np.ndarray) -> Path:
    if path.suffix == ".png":
        from mammocad.io.images import write_png

        write_png(path, pixels)
        return path
    return write_dicom(path, pixels)


@pytest.mark.parametrize("suffix", [".dcm", ".png"])
def test_missized_roi_mask_is_resized_with_warning_when_rasterized(tmp_path, caplog, suffix):
    from mammocad.datasets.rasterize import rasterize_lesion
    from mammocad.records import Lesion

    full = mask_pixels(2)
    half = _write_mask(tmp_path / f"half{suffix}", full[::2, ::2].copy())
    lesion = Lesion(pathology="benign", kind="mass", mask_path=str(half))
    with caplog.at_level(logging.WARNING, logger="mammocad.datasets.rasterize"):
        got = rasterize_lesion(lesion, FULL_SHAPE)
    assert f"half{suffix}: mask size 24x32 differs from image size 48x64; resized" in caplog.text
    np.testing.assert_array_equal(got, full > 0)  # the even-aligned rectangle comes back exactly

    lesion.mask_path = str(_write_mask(tmp_path / f"square{suffix}", full[:48, :48].copy()))
    with pytest.raises(AnnotationError, match=rf"square{suffix}: mask size 48x48 does not match image size 48x64"):
        rasterize_lesion(lesion, FULL_SHAPE)


def test_csv_paths_leaving_the_dataset_folder_are_refused_unless_allowed(tmp_path):
    """A CSV whose paths climb out of raw_dir (`../`) would make prepare read (and copy) files the
    user never pointed at: refused with the CSV, its line and the path named (issue 6)."""
    raw = tmp_path / "raw"
    folder = "Mass-Training_P_00001_LEFT_CC"
    row = _row().replace(f" {folder}/1.2/1.3/000000.dcm ", f"../elsewhere/{folder}/1.2/1.3/000000.dcm")
    csv_path = _synthetic_csv(raw, MASS_CSV, [row])
    with pytest.raises(AnnotationError, match=rf"^{csv_path}:2: path '\.\./elsewhere/{folder}/1\.2/1\.3/000000\.dcm' leads outside"):
        read_cbis_ddsm(raw)
    outside = tmp_path / "elsewhere" / folder / "1.2" / "1.3" / "000000.dcm"
    outside.parent.mkdir(parents=True)
    write_dicom(outside, np.zeros(FULL_SHAPE, np.uint16), patient_id="P_00001")
    for word in ("true", "1", "yes", True):
        [case] = read_cbis_ddsm(raw, allow_outside_root=word)
        assert case.image_path == str(raw / ".." / "elsewhere" / folder / "1.2" / "1.3" / "000000.dcm")
    with pytest.raises(ConfigError, match="allow_outside_root"):
        read_cbis_ddsm(raw, allow_outside_root="perhaps")
    # Paths inside the folder (leading slash included, as some copies write them) are unaffected.
    inside = _row().replace(f" {folder}/1.2/", f"/{folder}/sub/../1.2/")
    _synthetic_csv(raw, MASS_CSV, [inside])
    check_csv_paths(read_case_description_csv(raw / MASS_CSV), raw, False)
