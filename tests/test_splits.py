"""Patient splits (make_splits), the leakage audit (audit_splits) and the perceptual-hash search.

Most tests write a prepared dataset's records (spec.json + cases.jsonl) without pixels: splitting
and auditing read only the records and their perceptual hashes. One test runs the real
prepare -> split -> audit chain on images, one splits the real CBIS-DDSM train CSVs.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import shared_path
from mammocad.cli import app
from mammocad.datasets import dedup
from mammocad.datasets.dedup import hashes_to_uint64, near_duplicate_pairs
from mammocad.datasets.splits import audit_splits, make_splits, patient_labels
from mammocad.errors import ConfigError, InputError
from mammocad.records import Case, Lesion

LABELS = ("normal", "benign", "malignant")


def write_records(root: Path, cases: list[Case], hashes: list[str] | None = None, fine: list[str] | None = None) -> Path:
    """A prepared dataset folder with records only (no image files)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.json").write_text(json.dumps({"preprocess": {}, "adapter": "test"}))
    rng = np.random.default_rng(1)
    lines = []
    for i, c in enumerate(cases):
        h = hashes[i] if hashes else f"{int(rng.integers(0, 2**63)):016x}"
        lines.append(json.dumps({
            "case": c.to_dict(), "geometry": {"source_size": [8, 8], "steps": []}, "image": f"images/{c.case_id}.png",
            "lesion_masks": [None] * len(c.lesions), "lesion_boxes": [None] * len(c.lesions),
            "union_mask": f"masks/{c.case_id}/union.png", "breast_mask": f"masks/{c.case_id}/breast.png",
            "notes": [], "phash": h, **({"phash256": fine[i]} if fine else {})}))
    (root / "cases.jsonl").write_text("".join(line + "\n" for line in lines))
    return root


def synthetic_cases(n_patients: int, seed: int = 0, p=(0.5, 0.3, 0.2)) -> list[Case]:
    """Patients with 1-4 images; a patient's images share its label except for extra normal views."""
    rng = np.random.default_rng(seed)
    cases = []
    for p_i in range(n_patients):
        label = str(rng.choice(LABELS, p=p))
        for v in range(int(rng.integers(1, 5))):
            lab = label if v == 0 else str(rng.choice([label, "normal"]))
            lesions = [] if lab == "normal" else [Lesion(pathology=lab, kind="mass")]
            cases.append(Case(case_id=f"p{p_i:03d}_{v}", patient_id=f"p{p_i:03d}", dataset="t", modality="MG",
                              image_path=f"/x/p{p_i}_{v}.png", label=lab, lesions=lesions))
    return cases


def split_of(data: dict, fold: int = 0) -> dict[str, str]:
    out = {}
    for name in ("train", "val", "test"):
        for cid in data["folds"][fold][name]:
            assert cid not in out, f"{cid} in two splits"
            out[cid] = name
    return out


def test_fractions_group_by_patient_and_keep_label_proportions(tmp_path):
    cases = synthetic_cases(300)
    root = write_records(tmp_path / "prep", cases)
    res = make_splits(root, val=0.15, test=0.2, seed=3)
    data = json.loads((root / "splits.json").read_text())
    assert data == res.data and data["method"] == "fractions" and data["group_by"] == "patient"
    where = split_of(data)
    assert sorted(where) == sorted(c.case_id for c in cases)  # every case exactly once
    by_patient: dict[str, set[str]] = {}
    for c in cases:
        by_patient.setdefault(c.patient_id, set()).add(where[c.case_id])
    assert all(len(s) == 1 for s in by_patient.values())  # no patient in two splits
    plabels = patient_labels(cases)
    n_pat = Counter(next(iter(s)) for s in by_patient.values())
    assert n_pat["test"] == 60 and n_pat["val"] == pytest.approx(45, abs=1)  # 20% / 15% of 300 patients
    overall = Counter(plabels.values())
    for name in ("train", "val", "test"):
        in_split = Counter(plabels[p] for p, s in by_patient.items() if name in s)
        total = sum(in_split.values())
        for lab in LABELS:  # stratified: patient-label proportions within 3 points of the whole
            assert in_split[lab] / total == pytest.approx(overall[lab] / 300, abs=0.03), (name, lab)
    assert audit_splits(root).ok


def test_same_seed_same_file_other_seed_other_split(tmp_path):
    root = write_records(tmp_path / "prep", synthetic_cases(80))
    make_splits(root, seed=7, out=tmp_path / "a.json")
    make_splits(root, seed=7, out=tmp_path / "b.json")
    make_splits(root, seed=8, out=tmp_path / "c.json")
    a, b, c = ((tmp_path / f"{n}.json").read_bytes() for n in "abc")
    assert a == b
    assert json.loads(a)["folds"] != json.loads(c)["folds"]


def test_kfold_every_case_is_val_exactly_once(tmp_path):
    cases = synthetic_cases(50, seed=2)
    root = write_records(tmp_path / "prep", cases)
    data = make_splits(root, folds=5, test=0, seed=1).data
    assert data["method"] == "kfold" and len(data["folds"]) == 5
    all_ids = sorted(c.case_id for c in cases)
    val_counts = Counter(cid for f in data["folds"] for cid in f["val"])
    assert sorted(val_counts) == all_ids and set(val_counts.values()) == {1}
    pid = {c.case_id: c.patient_id for c in cases}
    for k, fold in enumerate(data["folds"]):
        assert fold["test"] == []
        assert sorted(fold["train"] + fold["val"]) == all_ids
        assert not {pid[c] for c in fold["train"]} & {pid[c] for c in fold["val"]}
        assert data["counts"][k]["val"]["patients"] == 10
    assert audit_splits(root).ok


def test_kfold_carves_the_test_patients_off_first(tmp_path):
    cases = synthetic_cases(200, seed=5)
    root = write_records(tmp_path / "prep", cases)
    data = make_splits(root, folds=4, test=0.2, seed=2).data
    assert data["method"] == "kfold" and len(data["folds"]) == 4
    assert data["parameters"]["test"] == 0.2 and data["parameters"]["folds"] == 4 and data["parameters"]["val"] is None
    test = data["folds"][0]["test"]
    assert all(f["test"] == test for f in data["folds"])  # the same held-out test set in every fold
    pid = {c.case_id: c.patient_id for c in cases}
    test_patients = {pid[c] for c in test}
    assert len(test_patients) == 40  # 20% of 200 patients
    all_ids = sorted(c.case_id for c in cases)
    rest = sorted(set(all_ids) - set(test))
    val_counts = Counter(cid for f in data["folds"] for cid in f["val"])
    assert sorted(val_counts) == rest and set(val_counts.values()) == {1}  # k folds over the rest only
    for k, fold in enumerate(data["folds"]):
        assert sorted(fold["train"] + fold["val"] + fold["test"]) == all_ids
        assert not {pid[c] for c in fold["train"] + fold["val"]} & test_patients
        assert data["counts"][k]["test"]["patients"] == 40 and data["counts"][k]["val"]["patients"] == 40
    plabels = patient_labels(cases)
    overall, in_test = Counter(plabels.values()), Counter(plabels[p] for p in test_patients)
    for lab in LABELS:  # stratified by patient label
        assert in_test[lab] / 40 == pytest.approx(overall[lab] / 200, abs=0.03), lab
    again = make_splits(root, folds=4, test=0.2, seed=2, out=tmp_path / "again.json").data
    assert again["folds"] == data["folds"]  # seeded
    assert audit_splits(root).ok


def official_cases() -> tuple[list[Case], list[str]]:
    cases = synthetic_cases(60, seed=4)
    crossing = ["p001", "p010", "p020"]
    for c in cases:  # patients < 40 official train, others test; crossing ones have images in both
        c.split = "train" if int(c.patient_id[1:]) < 40 else "test"
    for pid in crossing:
        cases.append(Case(case_id=f"{pid}_T", patient_id=pid, dataset="t", modality="MG", image_path="/x/t.png",
                          label="normal", split="test"))
    return cases, crossing


def test_official_split_keep_crossing_keeps_them_and_the_audit_fails(tmp_path):
    cases, crossing = official_cases()
    root = write_records(tmp_path / "prep", cases)
    result = make_splits(root, val=0.2, official=True, seed=0, keep_crossing=True)
    data = result.data
    assert data["method"] == "official" and data["crossing_patients"] == crossing and data["dropped"]["patients"] == []
    assert data["parameters"]["keep_crossing"] is True
    fold = data["folds"][0]
    assert fold["test"] == sorted(c.case_id for c in cases if c.split == "test")  # official test kept as is
    assert {c.split for c in cases if c.case_id in fold["val"]} == {"train"}  # val carved out of train
    report = audit_splits(root)
    assert not report.ok
    assert sorted(leak["patient_id"] for leak in report.leaks if leak["kind"] == "patient") == crossing
    from rich.console import Console

    console = Console(record=True, width=200)
    result.print_summary(console)
    assert "3 patients are in both official splits, KEPT" in console.export_text()


def test_official_split_drops_crossing_patients_by_default(tmp_path):
    """Patients in both official splits leak; the default removes them from both (issue 6)."""
    cases, crossing = official_cases()
    root = write_records(tmp_path / "prep", cases)
    result = make_splits(root, val=0.2, official=True)
    data = result.data
    assert data["dropped"]["patients"] == crossing and "both" in data["dropped"]["reason"]
    assert data["parameters"]["keep_crossing"] is False
    assigned = {cid for name in ("train", "val", "test") for cid in data["folds"][0][name]}
    assert not {c.case_id for c in cases if c.patient_id in crossing} & assigned
    assert len(assigned) == sum(c.patient_id not in crossing for c in cases)
    assert audit_splits(root).ok
    from rich.console import Console

    console = Console(record=True, width=200)
    result.print_summary(console)
    assert "3 patients are in both official splits, dropped from both" in console.export_text()
    cli = CliRunner().invoke(app, ["split", str(root), "--official", "--val", "0.2", "--out", str(tmp_path / "cli.json")])
    assert cli.exit_code == 0, cli.output
    assert json.loads((tmp_path / "cli.json").read_text())["dropped"]["patients"] == crossing


def test_official_needs_source_split(tmp_path):
    root = write_records(tmp_path / "prep", synthetic_cases(10))
    with pytest.raises(ConfigError, match="official"):
        make_splits(root, official=True)
    with pytest.raises(ConfigError, match="--keep-crossing"):
        make_splits(root, keep_crossing=True)
    with pytest.raises(ConfigError):
        make_splits(root, folds=1)
    with pytest.raises(ConfigError):
        make_splits(root, val=0.6, test=0.5)


def folded_cases(n_patients: int = 100, k: int = 5) -> list[Case]:
    """Synthetic cases carrying a source's own patient-grouped folds, as BUS-BRA's ``cv5_fold``."""
    cases = synthetic_cases(n_patients, seed=6)
    for c in cases:
        c.attributes["cv5_fold"] = int(c.patient_id[1:]) % k + 1
    return cases


def test_official_folds_test_each_fold_once_and_carve_val_by_patient(tmp_path):
    cases = folded_cases()
    root = write_records(tmp_path / "prep", cases)
    result = make_splits(root, official_folds="cv5", val=0.2, seed=3)
    data = result.data
    assert data["method"] == "official_folds" and data["official_fold_numbers"] == [1, 2, 3, 4, 5]
    assert data["parameters"]["official_folds"] == "cv5" and data["parameters"]["test"] is None
    assert data["parameters"]["val"] == 0.2 and len(data["folds"]) == 5
    all_ids = sorted(c.case_id for c in cases)
    pid = {c.case_id: c.patient_id for c in cases}
    tested = Counter(cid for f in data["folds"] for cid in f["test"])
    assert sorted(tested) == all_ids and set(tested.values()) == {1}  # every image tested exactly once
    for i, fold in enumerate(data["folds"]):
        assert fold["test"] == sorted(c.case_id for c in cases if c.attributes["cv5_fold"] == i + 1)  # the source's fold
        assert sorted(fold["train"] + fold["val"] + fold["test"]) == all_ids
        pats = {name: {pid[c] for c in fold[name]} for name in ("train", "val", "test")}
        assert not pats["train"] & pats["val"] and not pats["train"] & pats["test"] and not pats["val"] & pats["test"]
        assert len(pats["val"]) == pytest.approx(0.2 * 80, abs=1)  # val: 20% of the 80 other patients
    assert audit_splits(root).ok
    assert make_splits(root, official_folds="cv5", val=0.2, seed=3, out=tmp_path / "again.json").data["folds"] == data["folds"]
    assert all(f["val"] == [] for f in make_splits(root, official_folds="cv5", val=0.0, out=tmp_path / "noval.json").data["folds"])
    from rich.console import Console

    console = Console(record=True, width=200)
    result.print_summary(console)
    assert "4 (official 5)" in console.export_text()


def test_official_folds_refuse_missing_attribute_crossing_patients_and_other_modes(tmp_path):
    root = write_records(tmp_path / "none", synthetic_cases(20))
    with pytest.raises(ConfigError, match=r"needs each case's 'cv5_fold' attribute .* cases have none"):
        make_splits(root, official_folds="cv5")
    cases = folded_cases(30)
    crossing = next(c for c in cases if c.patient_id == "p007")
    cases.append(Case(case_id="p007_x", patient_id="p007", dataset="t", modality="US", image_path="/x/y.png",
                      label="benign", attributes={"cv5_fold": crossing.attributes["cv5_fold"] % 5 + 1}))
    root = write_records(tmp_path / "crossing", cases)
    with pytest.raises(ConfigError, match=r"not grouped by patient: 1 patient\(s\) .*p007"):
        make_splits(root, official_folds="cv5")
    root = write_records(tmp_path / "ok", folded_cases(30))
    with pytest.raises(ConfigError, match="--official"):
        make_splits(root, official_folds="cv5", official=True)
    with pytest.raises(ConfigError, match="--folds"):
        make_splits(root, official_folds="cv5", folds=5)
    with pytest.raises(ConfigError, match="fold scheme"):
        make_splits(root, official_folds="../cv5")
    one_fold = folded_cases(30, k=1)
    with pytest.raises(ConfigError, match="at least 2 folds"):
        make_splits(write_records(tmp_path / "one", one_fold), official_folds="cv5")


def test_audit_catches_planted_leaks_and_cli_exits_1(tmp_path):
    cases = synthetic_cases(40, seed=5)
    hashes = [f"{h:016x}" for h in np.random.default_rng(9).integers(0, 2**63, len(cases))]
    original = list(hashes)
    root = write_records(tmp_path / "prep", cases, hashes)
    data = make_splits(root, val=0.2, test=0.2).data
    where = split_of(data)
    fold = data["folds"][0]
    # a patient leak: one image of a multi-image train patient moved to test
    multi = Counter(c.patient_id for c in cases)
    moved = next(c for c in cases if multi[c.patient_id] > 1 and where[c.case_id] == "train")
    fold["train"].remove(moved.case_id)
    fold["test"].append(moved.case_id)
    # a near-duplicate: a val image gets a hash 2 bits away from a test image's
    val_id, test_id = fold["val"][0], next(c for c in fold["test"] if c != moved.case_id)
    ids = [c.case_id for c in cases]
    hashes[ids.index(val_id)] = f"{int(hashes[ids.index(test_id)], 16) ^ 0b101:016x}"
    # an unknown id
    fold["val"].append("no_such_case")
    write_records(root, cases, hashes)
    (root / "splits.json").write_text(json.dumps(data))
    report = audit_splits(root, hash_distance=2)
    kinds = Counter(leak["kind"] for leak in report.leaks)
    assert not report.ok and kinds == {"patient": 1, "near-duplicate": 1, "unknown case": 1}
    leak = next(leak for leak in report.leaks if leak["kind"] == "patient")
    assert leak["patient_id"] == moved.patient_id and moved.case_id in leak["case_ids"]
    dup = next(leak for leak in report.leaks if leak["kind"] == "near-duplicate")
    assert sorted(dup["case_ids"]) == sorted([val_id, test_id]) and dup["distance"] == 2
    assert len(audit_splits(root, hash_distance=1).leaks) == 2  # 2 bits > 1: not a near-duplicate
    result = CliRunner().invoke(app, ["audit", str(root), "--hash-distance", "2"])
    assert result.exit_code == 1 and "audit FAILED" in result.output
    write_records(root, cases, original)
    assert CliRunner().invoke(app, ["split", str(root)]).exit_code == 0  # a fresh split passes
    assert CliRunner().invoke(app, ["audit", str(root)]).exit_code == 0


def test_near_duplicate_candidates_are_confirmed_by_the_256_bit_hash(tmp_path):
    cases = [Case(case_id=f"c{i}", patient_id=f"p{i}", dataset="t", modality="MG", image_path="/x.png") for i in range(4)]
    ids = [c.case_id for c in cases]
    coarse = ["00000000000000ff"] * 2 + ["ffff000000000000", "0f0f0f0f0f0f0f0f"]  # 0 and 1: same 64-bit hash
    fine = ["0" * 64, "f" * 9 + "0" * 55, "1" * 64, "2" * 64]  # ... but 36 bits apart at 256 bits
    root = write_records(tmp_path / "prep", cases, coarse, fine)
    (root / "splits.json").write_text(json.dumps({"version": 1, "folds": [{"train": [ids[0]], "val": [ids[1]], "test": []}]}))
    report = audit_splits(root, hash_distance=4)  # confirmation bound 8 * 4 = 32 < 36
    assert report.ok and report.n_unconfirmed == 1
    assert audit_splits(root, hash_distance=5).ok  # bound min(8 * 5, 32) = 32 < 36 still
    fine[1] = "f" * 7 + "0" * 57  # 28 bits from fine[0]
    write_records(root, cases, coarse, fine)
    assert audit_splits(root, hash_distance=3).ok  # bound 24 < 28
    report = audit_splits(root, hash_distance=4)  # bound 32 >= 28: a near-duplicate
    assert [(leak["distance"], leak["distance256"]) for leak in report.leaks] == [(0, 28)]


def test_audit_case_in_two_splits_and_missing_files(tmp_path):
    root = write_records(tmp_path / "prep", synthetic_cases(10))
    with pytest.raises(InputError, match="splits"):
        audit_splits(root)
    data = make_splits(root, val=0.3, test=0.0).data
    data["folds"][0]["val"].append(data["folds"][0]["train"][0])  # one case in train and val
    (root / "splits.json").write_text(json.dumps(data))
    dup = data["folds"][0]["train"][0]
    leaks = audit_splits(root).leaks
    assert sorted(leak["kind"] for leak in leaks) == ["case in two splits", "patient"]  # its patient crosses too
    assert all(dup in leak["case_ids"] for leak in leaks)
    with pytest.raises(InputError, match="not a prepared dataset"):
        make_splits(tmp_path)


def test_near_duplicate_pairs_match_brute_force(monkeypatch):
    monkeypatch.setattr(dedup, "_BLOCK_ROWS", 37)  # several blocks with a ragged last one
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 60, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, (60, 3)).astype(np.uint64)
    near = base ^ flips[:, 0] ^ flips[:, 1] ^ flips[:, 2]  # each base hash has a twin <= 3 bits away
    h = np.concatenate([base, near])
    brute = sorted((i, j, bin(int(h[i]) ^ int(h[j])).count("1")) for i in range(h.size) for j in range(i + 1, h.size)
                   if bin(int(h[i]) ^ int(h[j])).count("1") <= 3)
    assert sorted(near_duplicate_pairs(h, 3)) == brute and len(brute) >= 60
    assert hashes_to_uint64(["ffffffffffffffff"])[0] == np.uint64(2**64 - 1)
    with pytest.raises(ValueError):
        hashes_to_uint64(["abc"])


def test_real_cbis_ddsm_train_csvs_split_by_patient(tmp_path):
    from mammocad.datasets.cbis_ddsm import cases_from_rows, read_case_description_csv

    folder = shared_path("cbis_ddsm")
    rows = [r for p in sorted(folder.glob("*_train_set.csv")) for r in read_case_description_csv(p)]
    cases = cases_from_rows(rows, "benign")
    n_patients = len({c.patient_id for c in cases})
    assert n_patients > 600  # 691 mass + 602 calc patients, overlapping
    root = write_records(tmp_path / "prep", cases)
    data = make_splits(root, val=0.1, test=0.2, seed=0).data
    where = split_of(data)
    assert len(where) == len(cases)
    per_patient: dict[str, set[str]] = {}
    for c in cases:
        per_patient.setdefault(c.patient_id, set()).add(where[c.case_id])
    assert all(len(s) == 1 for s in per_patient.values())
    assert sum(v["patients"] for v in data["counts"][0].values()) == n_patients
    assert audit_splits(root).ok
