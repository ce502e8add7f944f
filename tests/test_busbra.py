"""BUS-BRA adapter: the real release in ../shared/data/busbra (cross-checked against its CSVs, read
here independently with the csv module), a prepare -> official-fold split -> audit chain on a few
real patients (symlinked, never copied), and a small synthetic BUS-BRA-like tree for the error paths."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from mammocad.datasets import registry
from mammocad.datasets.busbra import read_busbra
from mammocad.datasets.rasterize import rasterize_lesion
from mammocad.datasets.splits import audit_splits, make_splits
from mammocad.errors import AnnotationError, ConfigError, InputError
from test_splits import write_records

DATA_HEADER = "ID,Case,Histology,Pathology,BIRADS,Device,Width,Height,Side,BBOX"
LOGGER = "mammocad.datasets.busbra"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def busbra_dir() -> Path:
    return shared_path("busbra")


@pytest.fixture(scope="module")
def table(busbra_dir) -> dict[str, dict[str, str]]:
    return {r["ID"]: r for r in _rows(busbra_dir / "bus_data.csv")}


@pytest.fixture(scope="module")
def busbra_cases(busbra_dir):
    return read_busbra(busbra_dir)


def test_registered_and_uses_the_shared_helpers():
    from mammocad.datasets import busbra, common

    assert registry.get_adapter("busbra") is read_busbra and "busbra" in registry.list_adapters()
    assert busbra.check_options is common.check_options and busbra.pathology_from_word is common.pathology_from_word


@pytest.mark.realdata
def test_counts_and_fields_match_bus_data_csv(busbra_cases, table):
    assert len(busbra_cases) == len(table) == 1252
    assert len({c.patient_id for c in busbra_cases}) == len({r["Case"] for r in table.values()}) == 710
    assert Counter(c.label for c in busbra_cases) == Counter(r["Pathology"] for r in table.values()) == {"benign": 847, "malignant": 405}
    assert [c.case_id for c in busbra_cases] == list(table)  # bus_data.csv order
    for c in busbra_cases:
        r = table[c.case_id]
        assert (c.dataset, c.modality, c.laterality, c.split) == ("busbra", "US", None, None)
        assert c.patient_id == f"busbra_p{int(r['Case']):04d}" and c.attributes["busbra_case"] == int(r["Case"])
        assert Path(c.image_path).name == f"{c.case_id}.png" and c.label == r["Pathology"]
        (les,) = c.lesions
        assert (les.pathology, les.kind, les.source_label) == (r["Pathology"], "mass", r["Pathology"])
        assert Path(les.mask_path).name == f"mask_{c.case_id[4:]}.png"
        assert les.attributes["bbox_csv"] == json.loads(r["BBOX"])
        a = c.attributes
        assert (a["birads"], a["histology"], a["device"], a["screen_side"]) == (int(r["BIRADS"]), r["Histology"], r["Device"], r["Side"])
    assert Counter(c.attributes["birads"] for c in busbra_cases) == {4: 457, 2: 380, 3: 305, 5: 110}
    assert len({c.attributes["device"] for c in busbra_cases}) == 4


@pytest.mark.realdata
def test_left_right_are_halves_of_a_dual_view_screen_not_breasts(busbra_cases):
    """Why laterality stays None: -l/-r images are about half as wide as the -s ones of the same scanner."""
    by_id = {c.case_id: c for c in busbra_cases}
    widths: dict[tuple[str, bool], list[int]] = defaultdict(list)
    for c in busbra_cases:
        side = c.attributes["screen_side"]
        assert side == {"l": "left", "r": "right", "s": "single"}[c.case_id[-1]]
        pair = c.attributes["paired_case_id"]
        if side == "single":
            assert pair is None
        else:  # every l/r image here has its other half, of the same patient
            assert by_id[pair].attributes["paired_case_id"] == c.case_id and by_id[pair].patient_id == c.patient_id
        widths[(c.attributes["device"], side == "single")].append(Image.open(c.image_path).size[0])
    for device in {d for d, _ in widths}:
        if widths[(device, True)]:
            assert np.median(widths[(device, False)]) < 0.8 * np.median(widths[(device, True)]), device


@pytest.mark.realdata
def test_masks_exist_match_image_sizes_and_the_matlab_bbox(busbra_cases):
    """Every mask exists, has its image's size and is not empty; BBOX is the mask's box written
    1-based as [first column, first row, last - first, last - first], on every row but one."""
    disagree = []
    for c in busbra_cases:
        mask_path = Path(c.lesions[0].mask_path)
        with Image.open(c.image_path) as im, Image.open(mask_path) as mk:
            assert mk.size == im.size, c.case_id
            mask = np.array(mk) > 0
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert rows.size, c.case_id  # never empty
        x, y, w, h = c.lesions[0].attributes["bbox_csv"]
        if (x - 1, y - 1, x + w, y + h) != (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1):
            disagree.append(c.case_id)
    assert disagree == ["bus_0845-s"]  # its BBOX lies 77 px left of its (single) mask


@pytest.mark.realdata
def test_named_mask_pixel_count(busbra_cases):
    case = next(c for c in busbra_cases if c.case_id == "bus_0001-l")
    mask = rasterize_lesion(case.lesions[0], (353, 274))  # Height x Width from bus_data.csv
    assert int(mask.sum()) == 5664
    assert mask[23:103, 90:194].sum() == 5664 and not mask[:, :90].any()  # inside the box of BBOX [91, 24, 103, 79]


@pytest.mark.realdata
def test_official_folds_are_read_and_group_patients(busbra_dir, busbra_cases, table):
    by_id = {c.case_id: c for c in busbra_cases}
    for scheme, name, k, sizes in (("cv5", "5-fold-cv.csv", 5, {1: 239, 2: 245, 3: 275, 4: 232, 5: 261}),
                                   ("cv10", "10-fold-cv.csv", 10, None)):
        rows = _rows(busbra_dir / name)
        assert {r["ID"] for r in rows} == set(by_id)
        folds_of: dict[str, set[str]] = defaultdict(set)
        for r in rows:
            assert by_id[r["ID"]].attributes[f"{scheme}_fold"] == int(r["kFold"])
            assert r["Pathology"] == table[r["ID"]]["Pathology"]
            folds_of[table[r["ID"]]["Case"]].add(r["kFold"])
        assert all(len(s) == 1 for s in folds_of.values())  # the authors' test folds are grouped by patient
        counts = Counter(c.attributes[f"{scheme}_fold"] for c in busbra_cases)
        assert sorted(counts) == list(range(1, k + 1)) and (sizes is None or counts == sizes)
        # Their valid_k columns are NOT grouped by patient (why the adapter drops them): in round 1,
        # some patient has one view marked 0 and the other 1.
        marks: dict[str, set[str]] = defaultdict(set)
        for r in rows:
            if r["kFold"] != "1":
                marks[table[r["ID"]]["Case"]].add(r["valid_1"])
        assert sum(len(s) > 1 for s in marks.values()) > 100


@pytest.mark.realdata
def test_real_quirks_are_one_line_warnings(busbra_dir, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        read_busbra(busbra_dir)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in m for m in lines)
    assert lines[0] == (f"{busbra_dir / 'bus_data.csv'}:991: bus_0856-l: Width x Height 387x405 but the image is 387x353 "
                        "(the image's size is used)")
    assert lines[1].startswith(f"{busbra_dir / 'bus_data.csv'}:994: bus_0857-r: Width x Height 384x409")


@pytest.mark.realdata
def test_all_cases_official_fold_splits_pass_the_audit(tmp_path, busbra_cases):
    """splits.json from the authors' folds on every case (records only): each image tested once,
    no patient in two splits of any fold."""
    root = write_records(tmp_path / "prep", busbra_cases)
    for scheme, k in (("cv5", 5), ("cv10", 10)):
        data = make_splits(root, official_folds=scheme, val=0.15, seed=0).data
        assert len(data["folds"]) == k and data["official_fold_numbers"] == list(range(1, k + 1))
        tested = Counter(cid for f in data["folds"] for cid in f["test"])
        assert len(tested) == 1252 and set(tested.values()) == {1}
        for i, fold in enumerate(data["folds"]):
            assert fold["test"] == sorted(c.case_id for c in busbra_cases if c.attributes[f"{scheme}_fold"] == i + 1)
        assert audit_splits(root).ok


# ---------------------------------------------------------------- a few real patients, prepared

def busbra_subset(tmp_path: Path, per_fold: int = 2) -> Path:
    """The rows of the first ``per_fold`` patients of each official 5-fold from the three CSVs +
    symlinks to their images and masks (no copies)."""
    src = shared_path("busbra")
    raw = tmp_path / "busbra"
    (raw / "Images").mkdir(parents=True)
    (raw / "Masks").mkdir()
    patient_of = {r["ID"]: r["Case"] for r in _rows(src / "bus_data.csv")}
    chosen: dict[str, list[str]] = defaultdict(list)
    for r in _rows(src / "5-fold-cv.csv"):
        pats = chosen[r["kFold"]]
        if patient_of[r["ID"]] not in pats and len(pats) < per_fold:
            pats.append(patient_of[r["ID"]])
    keep = {i for i, p in patient_of.items() if any(p in pats for pats in chosen.values())}
    for name in ("bus_data.csv", "5-fold-cv.csv", "10-fold-cv.csv"):
        lines = (src / name).read_text().splitlines(keepends=True)
        (raw / name).write_text(lines[0] + "".join(ln for ln in lines[1:] if ln.split(",")[0] in keep))
    for image_id in keep:
        (raw / "Images" / f"{image_id}.png").symlink_to(src / "Images" / f"{image_id}.png")
        (raw / "Masks" / f"mask_{image_id[4:]}.png").symlink_to(src / "Masks" / f"mask_{image_id[4:]}.png")
    return raw


@pytest.mark.realdata
def test_prepare_real_subset_then_official_fold_split_and_audit(tmp_path):
    from mammocad.datasets.prepared import PreparedDataset, prepare_dataset
    from mammocad.preprocess.pipeline import PreprocessSpec

    raw = busbra_subset(tmp_path)
    cases = read_busbra(raw)
    assert sorted({c.attributes["cv5_fold"] for c in cases}) == [1, 2, 3, 4, 5]  # the subset spans every fold
    report = prepare_dataset("busbra", raw, tmp_path / "out", spec=PreprocessSpec(long_side=256), workers=1, progress=False)
    assert report.n_failed == 0 and report.n_done == len(cases) and len({c.patient_id for c in cases}) == 10
    ds = PreparedDataset(tmp_path / "out")
    assert ds.spec.modality == "US"
    for pc in ds.cases:
        assert pc.case.attributes["cv5_fold"] is not None and pc.case.lesions[0].mask_path
        truth = np.array(Image.open(pc.case.lesions[0].mask_path)) > 0
        assert pc.geometry.source_size == truth.shape
        back = pc.geometry.inverse_array(ds.load_union_mask(pc), kind="mask").astype(bool)
        assert (back & truth).sum() / (back | truth).sum() >= 0.85, pc.case_id
    data = make_splits(tmp_path / "out", official_folds="cv5", val=0.25, seed=0).data
    assert data["method"] == "official_folds" and len(data["folds"]) == 5
    fold_of = {c.case_id: c.attributes["cv5_fold"] for c in cases}
    for number, fold in zip(data["official_fold_numbers"], data["folds"]):
        assert fold["test"] and {fold_of[c] for c in fold["test"]} == {number}
        assert fold["val"] and fold["train"]
    audit = audit_splits(tmp_path / "out")
    assert audit.ok, audit.leaks
    # the command line gives the same folds (split --official-folds)
    from mammocad.cli import main

    main(["split", str(tmp_path / "out"), "--official-folds", "cv5", "--val", "0.25", "--seed", "0",
          "--out", str(tmp_path / "cli_splits.json")])
    import json

    assert json.loads((tmp_path / "cli_splits.json").read_text())["folds"] == data["folds"]


# ---------------------------------------------------------------- synthetic BUS-BRA-like trees


def _write_tree(root: Path, rows: list[str], images: list[str], masks: list[str], folds5: list[str] | None = None,
                folds10: list[str] | None = None) -> Path:
    """bus_data.csv with ``rows`` (after the header), 40x60 images and masks, optional fold files."""
    (root / "Images").mkdir(parents=True, exist_ok=True)
    (root / "Masks").mkdir(exist_ok=True)
    (root / "bus_data.csv").write_text("\n".join([DATA_HEADER, *rows]) + "\n")
    for name in images:
        assert cv2.imwrite(str(root / "Images" / name), np.full((40, 60), 80, np.uint8))
    for name in masks:
        m = np.zeros((40, 60), np.uint8)
        m[10:20, 5:25] = 255
        assert cv2.imwrite(str(root / "Masks" / name), m)
    for name, lines in (("5-fold-cv.csv", folds5), ("10-fold-cv.csv", folds10)):
        if lines is not None:
            (root / name).write_text("\n".join(["ID,Pathology,kFold,valid_1,valid_2", *lines]) + "\n")
    return root


def _row(image_id: str, case: str, pathology: str = "benign", birads: str = "3", side: str = "left",
         bbox: str = '"[6,11,19,9]"', size: tuple[str, str] = ("60", "40")) -> str:
    return f"{image_id},{case},fibroadenoma,{pathology},{birads},GE Logiq 5 @10-12MHz,{size[0]},{size[1]},{side},{bbox}"


def test_synthetic_tree_bad_rows_warn_with_file_and_line(tmp_path, caplog):
    ids = ["bus_0001-l", "bus_0001-r", "bus_0002-s", "bus_0003-s", "bus_0004-s", "bus_0005-s", "bus_0007-s"]
    root = _write_tree(
        tmp_path / "BUSBRA",
        rows=[
            _row("bus_0001-l", "1"),                                  # line 2: good
            _row("bus_0001-r", "1", side="right", birads="4a"),       # 3: kept, BI-RADS not a number
            _row("bus_0002-s", "9", side="single"),                   # 4: Case contradicts the ID
            _row("bus_0003-s", "3", pathology="normal", side="single"),  # 5: neither benign nor malignant
            _row("bus_0004-s", "4", side="single"),                   # 6: image missing
            _row("bus_0005-s", "5", pathology="malignant", side="single", size=("60", "50")),  # 7: kept, mask missing, size wrong
            _row("bus_0001-l", "1"),                                  # 8: listed again
            _row("bus-6", "6", side="single"),                        # 9: bad ID
            _row("bus_0007-s", "7", side="left", bbox='"[1,2]"'),     # 10: kept, Side and BBOX wrong
        ],
        images=[f"{i}.png" for i in ids if i != "bus_0004-s"] + ["bus_0099-s.png"],
        masks=[f"mask_{i[4:]}.png" for i in ids if i != "bus_0005-s"],
        folds5=["bus_0001-l,benign,1,NaN,1", "bus_0001-r,benign,1,NaN,0", "bus_0005-s,benign,x,1,NaN",
                "bus_0007-s,benign,2,1,NaN", "bus_0007-s,benign,1,1,NaN"],
    )
    data_csv = root / "bus_data.csv"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cases = read_busbra(tmp_path)  # the parent of BUSBRA/
    messages = [r.getMessage() for r in caplog.records]
    assert all("\n" not in m for m in messages)
    expected = [
        f"{data_csv}:3: bus_0001-r: BIRADS '4a' is not a number (kept as None)",
        f"{data_csv}:4: Case '9' is not the patient number of bus_0002-s; row skipped",
        f"{data_csv}:5: Pathology 'normal' is neither benign nor malignant; row skipped",
        f"{data_csv}:6: image Images/bus_0004-s.png not found; row skipped",
        (f"{data_csv}:7: bus_0005-s: mask Masks/mask_0005-s.png not found (lesion kept without outline); "
         "Width x Height 60x50 but the image is 60x40 (the image's size is used)"),
        f"{data_csv}:8: bus_0001-l listed again (first on line 2); row skipped",
        f"{data_csv}:9: ID 'bus-6' is not like bus_0001-l; row skipped",
        f"{data_csv}:10: bus_0007-s: Side 'left' contradicts the ID suffix (the suffix is kept); BBOX '[1,2]' is not [x, y, w, h] (not kept)",
    ]
    for line in expected:
        assert line in messages, line
    assert any(m.startswith(f"{root / 'Images'}: 1 image(s) not listed in bus_data.csv (e.g. bus_0099-s.png)") for m in messages)
    folds5 = root / "5-fold-cv.csv"
    assert f"{folds5}:4: kFold 'x' of bus_0005-s is not a fold number; row skipped" in messages
    assert f"{folds5}:6: bus_0007-s listed again (first in fold 2); row skipped" in messages
    assert f"{folds5}: 1 image(s) of bus_data.csv not listed (e.g. bus_0005-s); their cv5_fold is None" in messages
    assert any(m.startswith(f"{root}: no 10-fold-cv.csv; every case's cv10_fold is None") for m in messages)
    assert [c.case_id for c in cases] == ["bus_0001-l", "bus_0001-r", "bus_0005-s", "bus_0007-s"]
    l, r, five, seven = cases
    assert l.attributes["paired_case_id"] == "bus_0001-r" and r.attributes["paired_case_id"] == "bus_0001-l"
    assert r.attributes["birads"] is None and l.attributes["birads"] == 3 and l.patient_id == r.patient_id == "busbra_p0001"
    assert [c.attributes["cv5_fold"] for c in cases] == [1, 1, None, 2] and {c.attributes["cv10_fold"] for c in cases} == {None}
    assert five.label == "malignant" and not five.lesions[0].has_geometry
    assert seven.attributes["screen_side"] == "single" and seven.lesions[0].attributes["bbox_csv"] is None
    assert int(rasterize_lesion(l.lesions[0], (40, 60)).sum()) == 200


def test_fold_file_pathology_disagreeing_is_warned(tmp_path, caplog):
    _write_tree(tmp_path, [_row("bus_0001-s", "1", side="single")], ["bus_0001-s.png"], ["mask_0001-s.png"],
                folds5=["bus_0001-s,malignant,1,NaN,1"], folds10=["bus_0001-s,benign,3,1,1"])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        (case,) = read_busbra(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / '5-fold-cv.csv'}: bus_0001-s is 'malignant' here but benign in bus_data.csv"]
    assert (case.attributes["cv5_fold"], case.attributes["cv10_fold"]) == (1, 3)


def test_missing_files_and_columns_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="folder not found"):
        read_busbra(tmp_path / "nope")
    with pytest.raises(InputError, match=r"no bus_data.csv here or in BUSBRA/") as exc:
        read_busbra(tmp_path)
    assert str(exc.value).startswith(f"{tmp_path}: ")
    (tmp_path / "bus_data.csv").write_text(DATA_HEADER + "\n" + _row("bus_0001-s", "1", side="single") + "\n")
    with pytest.raises(InputError, match=r"no Images/ folder"):
        read_busbra(tmp_path)
    (tmp_path / "Images").mkdir()
    with pytest.raises(InputError, match=r"bus_data.csv: no usable row"):
        read_busbra(tmp_path)  # its one image is missing
    (tmp_path / "bus_data.csv").write_text("ID,Case,Histology\nbus_0001-s,1,cyst\n")
    with pytest.raises(AnnotationError) as exc:
        read_busbra(tmp_path)
    assert str(exc.value) == f"{tmp_path / 'bus_data.csv'}: missing column(s) pathology (columns: id, case, histology)"
    _write_tree(tmp_path, [_row("bus_0001-s", "1", side="single")], ["bus_0001-s.png"], ["mask_0001-s.png"])
    (tmp_path / "5-fold-cv.csv").write_text("ID,Pathology\nbus_0001-s,benign\n")
    with pytest.raises(AnnotationError, match=r"5-fold-cv.csv: missing column\(s\) kfold"):
        read_busbra(tmp_path)
    with pytest.raises(ConfigError, match=r"^busbra: unknown option\(s\) folds; the busbra adapter takes no options$"):
        read_busbra(tmp_path, folds="cv5")
