"""``mammocad combine``: several prepared datasets as one (BUSI + BUS-BRA for the ultrasound detector),
the source-stratified split of such a dataset, and the per-source figures of ``mammocad cv``."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import shared_path
from mammocad.cli import app
from mammocad.datasets.combine import combine_prepared
from mammocad.datasets.prepared import PreparedDataset
from mammocad.datasets.splits import make_splits
from mammocad.errors import InputError
from mammocad.evaluation.cv import source_metrics, summarize, table_markdown
from tiny_prepared import make_tiny_prepared


def _renamed_copy(src: Path, dst: Path, prefix: str, dataset: str) -> Path:
    """A copy of a prepared dataset whose cases are another source: new ids, files and dataset name."""
    shutil.copytree(src, dst)
    lines = []
    for e in (json.loads(x) for x in (dst / "cases.jsonl").read_text().splitlines() if x.strip()):
        old = e["case"]["case_id"]
        e["case"].update(case_id=prefix + old, patient_id=prefix + e["case"]["patient_id"], dataset=dataset)
        (dst / "images" / f"{old}.png").rename(dst / "images" / f"{prefix}{old}.png")
        (dst / "masks" / old).rename(dst / "masks" / f"{prefix}{old}")
        for key in ("image", "union_mask", "breast_mask"):
            e[key] = e[key].replace(old, prefix + old)
        e["lesion_masks"] = [m and m.replace(old, prefix + old) for m in e["lesion_masks"]]
        lines.append(json.dumps(e, sort_keys=True))
    (dst / "cases.jsonl").write_text("".join(x + "\n" for x in lines))
    return dst


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("combine")
    a = make_tiny_prepared(root)
    b = _renamed_copy(a, root / "other", "b_", "other")
    return a, b


def test_combine_holds_every_case_with_its_files_and_records_the_sources(two_sources, tmp_path):
    a, b = two_sources
    out = tmp_path / "both"
    result = CliRunner().invoke(app, ["combine", str(out), str(a), str(b)])
    assert result.exit_code == 0, result.output
    both, da, db = PreparedDataset(out), PreparedDataset(a), PreparedDataset(b)
    assert len(both) == len(da) + len(db) == 16
    assert both.spec.model_dump() == da.spec.model_dump()
    spec = json.loads((out / "spec.json").read_text())
    assert spec["adapter"] == "combined" and [s["cases"] for s in spec["sources"]] == [8, 8]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["by_dataset"] == {"folder": 8, "other": 8} and summary["patients"] == 16
    for pc in both.cases:  # the same pixels and masks as in the source
        src = (da if pc.case.dataset == "folder" else db).by_id(pc.case_id)
        assert np.array_equal(both.load_image(pc), (da if src in da.cases else db).load_image(src))
        assert np.array_equal(both.load_union_mask(pc), (da if src in da.cases else db).load_union_mask(src))
        assert all(p.is_file() for p in pc.files()) and pc.image_path.is_relative_to(out)
    # the combined folder stands on its own: the sources may go
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert len(PreparedDataset(moved)) == 16 and PreparedDataset(moved).load_image(PreparedDataset(moved).cases[0]).size


def test_combine_refuses_colliding_ids_other_preprocessing_and_a_single_source(two_sources, tmp_path):
    a, b = two_sources
    with pytest.raises(InputError, match="case id 'img0' is also in"):
        combine_prepared([a, _renamed_copy(a, tmp_path / "same_ids", "", "again")], tmp_path / "x")
    other = _renamed_copy(a, tmp_path / "other_spec", "c_", "third")
    spec = json.loads((other / "spec.json").read_text())
    spec["preprocess"]["long_side"] = 128
    (other / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match=r"preprocessed differently .*long_side"):
        combine_prepared([a, other], tmp_path / "y")
    with pytest.raises(InputError, match="at least two"):
        combine_prepared([a], tmp_path / "z")
    with pytest.raises(InputError, match="given twice"):
        combine_prepared([a, a], tmp_path / "w")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_real_busi_and_mammograms_are_refused_together(tmp_path):
    """Real BUSI ultrasound and the tiny mammograms went through different preprocessing: refused."""
    busi = shared_path("busi")
    from mammocad.datasets.prepared import prepare_dataset
    from mammocad.preprocess.pipeline import PreprocessSpec

    prepare_dataset("busi", busi, tmp_path / "busi", spec=PreprocessSpec(long_side=64), workers=1, progress=False)
    t = tmp_path / "tiny"
    t.mkdir()
    with pytest.raises(InputError, match="preprocessed differently"):
        combine_prepared([tmp_path / "busi", make_tiny_prepared(t)], tmp_path / "out")


def test_split_of_a_combined_dataset_is_stratified_by_source(tmp_path):
    from test_splits import synthetic_cases, write_records

    big = synthetic_cases(120, seed=3)
    small = synthetic_cases(20, seed=4)
    for c in small:
        c.case_id, c.patient_id, c.dataset = "s_" + c.case_id, "s_" + c.patient_id, "small"
    root = write_records(tmp_path / "mixed", big + small)
    data = make_splits(root, val=0.15, folds=5, seed=0, cv=True).data
    assert data["stratify_by"] == "dataset+label"
    per_fold = [Counter(cid.startswith("s_") for cid in f["test"]) for f in data["folds"]]
    small_patients = [len({cid.rsplit("_", 1)[0] for cid in f["test"] if cid.startswith("s_")}) for f in data["folds"]]
    assert all(n == 4 for n in small_patients), small_patients  # 20 patients of the small source: 4 per fold
    assert all(c[True] and c[False] for c in per_fold)
    single = make_splits(write_records(tmp_path / "one", big), val=0.15, folds=5, seed=0, cv=True).data
    assert single["stratify_by"] == "label"


def test_cv_table_reports_each_source_of_a_combined_dataset():
    rows = [{"case_id": "a1", "category": "lesion", "dice": 0.9, "iou": 0.8},
            {"case_id": "a2", "category": "lesion", "dice": 0.7, "iou": 0.5},
            {"case_id": "b1", "category": "lesion", "dice": 0.4, "iou": 0.25},
            {"case_id": "b2", "category": "false_positive", "dice": 0.0, "iou": 0.0}]  # not a lesion image
    per = source_metrics({"per_image": rows}, {"a1": "busbra", "a2": "busbra", "b1": "busi", "b2": "busi"})
    assert per["busbra"]["headline"]["dice_lesion_images_mean"]["value"] == pytest.approx(0.8)
    assert per["busi"]["headline"]["iou_lesion_images_mean"]["value"] == pytest.approx(0.25)
    assert per["busi"]["n_lesion_images"] == 1
    table = {"config": "c.yaml", "n_folds": 2, "splits": {"method": "cv", "path": "s.json"}, "protocol": "p",
             "metrics": {}, "external": {},
             "by_source": {"busi": {"n_lesion_images": 3, "metrics": {"dice_lesion_images": summarize([0.4, 0.6])}}}}
    md = table_markdown(table)
    assert "## Source busi: its 3 lesion images" in md and "| dice_lesion_images | 0.400 | 0.600 | 0.500 |" in md
