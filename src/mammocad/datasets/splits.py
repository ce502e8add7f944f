"""Patient-grouped, label-stratified, seeded splits of a prepared dataset, and the leakage audit.

``splits.json`` follows nnU-Net v2's ``splits_final.json`` (a list of folds with case ids) but is
grouped by PATIENT, always::

    {"version": 1, "seed": 0, "method": "fractions" | "kfold" | "official" | "official_folds" | "cv",
     "group_by": "patient", "stratify_by": "label" | "dataset+label" (a combined dataset),
     "parameters": {"val": .., "test": .., "folds": .., "official": .., "keep_crossing": .., "official_folds": ..},
     "folds": [{"train": [case ids], "val": [...], "test": [...]}, ...],
     "dropped": {"patients": [...], "reason": ...}, "crossing_patients": [...],
     "counts": [{"train": {"cases", "patients", "labels"}, ...} per fold], "notes": [...]}

Fractions give one fold; k folds give k entries: the ``test`` fraction of the patients is carved
off first (stratified, seeded; with ``official`` the official test set instead), then the other
patients are cut into k folds (val = fold k); every entry lists the same test set. With
``official_folds`` the source's own patient-grouped folds (BUS-BRA's ``cv5``/``cv10``, read from
``case.attributes["<name>_fold"]``) are the folds: entry i tests the source's i-th fold
(``official_fold_numbers[i]``), so every image is tested exactly once, and its val is a fraction of
the other patients. ``cv`` makes the same structure from k seeded folds of all the patients
(cross-validation: every image tested once; ``mammocad cv``). A patient's label is the worst label of its images
(malignant > benign > unknown > normal) and the split is made on the list of patients with
scikit-learn (``train_test_split(stratify=...)``, ``StratifiedKFold``): one row per patient makes
grouping exact and stratifies by the patient label, which ``StratifiedGroupKFold`` only
approximates on image rows. Patients are sorted first, so the same seed writes the same file.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mammocad.datasets.prepared import CASES_FILE, SPLITS_FILE, PreparedDataset
from mammocad.errors import ConfigError, InputError
from mammocad.records import Case

SPLIT_NAMES = ("train", "val", "test")
LABEL_RANK = {"normal": 0, "unknown": 1, "benign": 2, "malignant": 3}


def patient_labels(cases: list[Case]) -> dict[str, str]:
    """Patient id -> worst image label of that patient's cases."""
    worst: dict[str, str] = {}
    for c in cases:
        if c.patient_id not in worst or LABEL_RANK[c.label] > LABEL_RANK[worst[c.patient_id]]:
            worst[c.patient_id] = c.label
    return dict(sorted(worst.items()))


def _carve(patients: list[str], labels: list[str], frac: float, seed: int, what: str, notes: list[str],
           source: Path) -> tuple[list[str], list[str]]:
    """Split ``frac`` of the patients off (stratified by label when the counts allow it)."""
    from sklearn.model_selection import train_test_split

    if frac <= 0 or not patients:
        return patients, []
    try:
        rest, carved = train_test_split(patients, test_size=frac, random_state=seed, stratify=labels)
    except ValueError:
        try:
            rest, carved = train_test_split(patients, test_size=frac, random_state=seed)
        except ValueError as exc:
            raise ConfigError(source, f"cannot split a {what} fraction of {frac} off {len(patients)} patients ({exc})") from None
        notes.append(f"too few patients per label to stratify the {what} split; it is not stratified")
    return sorted(rest), sorted(carved)


def _kfold(patients: list[str], labels: list[str], k: int, seed: int, notes: list[str], source: Path) -> list[list[str]]:
    """Patients of each of the k validation folds."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if k > len(patients):
        raise ConfigError("--folds", f"{k} folds need at least {k} patients; {source} has {len(patients)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parts = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(patients, labels))
        except ValueError:
            parts = list(KFold(n_splits=k, shuffle=True, random_state=seed).split(patients))
            notes.append("too few patients per label for stratified folds; folds are not stratified")
    notes += [f"stratification: {w.message}" for w in caught if issubclass(w.category, UserWarning)]
    return [sorted(patients[i] for i in val_idx) for _, val_idx in parts]


def official_fold_patients(cases: list[Case], name: str, source: Path) -> dict[int, list[str]]:
    """{fold number: sorted patient ids} of the source's own folds ``case.attributes[f"{name}_fold"]``.

    Refuses cases without the attribute and folds that are not grouped by patient: a patient in
    two folds would be tested by a model trained on its other images."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ConfigError("--official-folds", f"expected a fold scheme name like cv5, got {name!r}")
    key = f"{name}_fold"
    missing = [c for c in cases if isinstance(c.attributes.get(key), bool) or not isinstance(c.attributes.get(key), int)]
    if missing:
        raise ConfigError(source, f"--official-folds {name} needs each case's {key!r} attribute (busbra sets cv5_fold and "
                                  f"cv10_fold); {len(missing)} of {len(cases)} cases have none (e.g. {missing[0].case_id})")
    folds_of: dict[str, set[int]] = defaultdict(set)
    for c in cases:
        folds_of[c.patient_id].add(c.attributes[key])
    crossing = sorted(p for p, s in folds_of.items() if len(s) > 1)
    if crossing:
        raise ConfigError(source, f"official folds {name} are not grouped by patient: {len(crossing)} patient(s) in several "
                                  f"folds (e.g. {crossing[0]} in folds {sorted(folds_of[crossing[0]])})")
    numbers = sorted({n for s in folds_of.values() for n in s})
    if len(numbers) < 2:
        raise ConfigError(source, f"official folds {name}: every case is in fold {numbers[0]}; at least 2 folds are needed")
    return {n: sorted(p for p, s in folds_of.items() if n in s) for n in numbers}


def _counts(fold: dict[str, list[str]], by_id: dict[str, Case]) -> dict[str, Any]:
    out = {}
    for name in SPLIT_NAMES:
        cs = [by_id[c] for c in fold[name]]
        out[name] = {"cases": len(cs), "patients": len({c.patient_id for c in cs}),
                     "labels": dict(sorted(Counter(c.label for c in cs).items()))}
    return out


@dataclass
class SplitResult:
    path: Path
    data: dict[str, Any]

    def print_summary(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        d = self.data
        t = Table(title=f"{self.path}  ({d['method']}, seed {d['seed']}, grouped by patient)")
        for col in ("fold", "split", "cases", "patients", "labels"):
            t.add_column(col)
        numbers = d.get("official_fold_numbers")
        for i, counts in enumerate(d["counts"]):
            for name in SPLIT_NAMES:
                c = counts[name]
                if c["cases"]:
                    t.add_row(str(i) if not numbers else f"{i} (official {numbers[i]})", name, str(c["cases"]), str(c["patients"]),
                              ", ".join(f"{k} {v}" for k, v in c["labels"].items()))
        console.print(t)
        crossing = d.get("crossing_patients") or []
        if crossing:
            fate = "dropped from both" if d["dropped"]["patients"] else "KEPT (--keep-crossing: they leak and the audit will fail)"
            console.print(f"{len(crossing)} patients are in both official splits, {fate}: {', '.join(crossing[:20])}"
                          + (" ..." if len(crossing) > 20 else ""))
        for note in d.get("notes", []):
            console.print(f"note: {note}")


def make_splits(prepared_dir: str | Path, val: float = 0.15, test: float = 0.15, folds: int = 0, seed: int = 0,
                official: bool = False, keep_crossing: bool = False, out: str | Path | None = None,
                official_folds: str | None = None, cv: bool = False) -> SplitResult:
    """Write splits.json (default ``prepared_dir/splits.json``, atomically) and return it.

    ``official``: keep the source's own train/test (``Case.split``); val is ``val`` of the official
    train patients. Patients found in both official splits (CBIS-DDSM has some) are dropped from
    both and reported: keeping them puts one patient's images in train and test, the leak the
    audit exists to catch. ``keep_crossing`` keeps them anyway (to reproduce work that used the
    official split as published), with the warning in the summary.

    ``official_folds`` (e.g. ``"cv5"``): one entry per fold of the source's own patient-grouped
    cross-validation (``official_fold_patients``), test = that fold, val = ``val`` of the other
    patients (stratified, seeded), train = the rest; ``test`` and ``folds`` do not apply.

    ``cv`` (with ``folds`` = k): the same structure on k stratified folds of ALL patients: entry i
    tests fold i, val = ``val`` of the other patients (for early stopping and checkpoint choice,
    inside the training folds), train = the rest. Every case is tested exactly once, by the model of
    the one entry that never saw its patient: what ``mammocad cv`` runs.
    """
    from mammocad.io.atomic import atomic_write_json

    ds = PreparedDataset(prepared_dir)
    cases = [pc.case for pc in ds.cases]
    if not cases:
        raise InputError(ds.root / CASES_FILE, "no prepared cases to split")
    if folds < 0 or folds == 1:
        raise ConfigError("--folds", f"must be 0 (fractions) or at least 2, got {folds}")
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ConfigError("--val/--test", f"fractions must be in [0, 1) with val + test < 1, got val={val} test={test}")
    if keep_crossing and not official:
        raise ConfigError("--keep-crossing", "only makes sense with --official")
    if official_folds is not None and official:
        raise ConfigError("--official-folds", "cannot be combined with --official (the source's own train/test)")
    if official_folds is not None and folds:
        raise ConfigError("--folds", "the official folds set the number of folds; leave --folds at 0 with --official-folds")
    if cv and (official or official_folds is not None or not folds):
        raise ConfigError("--cv", "needs --folds k (at least 2) and neither --official nor --official-folds")
    notes: list[str] = []
    dropped: dict[str, Any] = {"patients": [], "reason": None}
    crossing: list[str] = []
    fixed_test: list[str] = []
    if official:
        missing = [c for c in cases if c.split not in ("train", "test")]
        if missing:
            raise ConfigError(ds.root, f"--official needs the source's own train/test split, but {len(missing)} cases "
                                       f"have none (e.g. {missing[0].case_id}: split={missing[0].split!r})")
        splits_of: dict[str, set[str]] = defaultdict(set)
        for c in cases:
            splits_of[c.patient_id].add(c.split)  # type: ignore[arg-type]
        crossing = sorted(p for p, s in splits_of.items() if len(s) > 1)
        if crossing and not keep_crossing:
            cases = [c for c in cases if c.patient_id not in set(crossing)]
            dropped = {"patients": crossing, "reason": "patient in both the official train and test split"}
        fixed_test = sorted(c.case_id for c in cases if c.split == "test")
        pool = [c for c in cases if c.split == "train"]
    else:
        pool = cases
    by_patient: dict[str, list[str]] = defaultdict(list)
    for c in pool:
        by_patient[c.patient_id].append(c.case_id)
    plabels = patient_labels(pool)
    # A combined dataset (``mammocad combine``) is stratified by source too, so that every fold holds
    # its share of each source (BUSI's 91 images would otherwise fall unevenly among 1,252 of BUS-BRA).
    multi_source = len({c.dataset for c in pool}) > 1
    if multi_source:
        source_of = {c.patient_id: c.dataset for c in pool}
        plabels = {p: f"{source_of[p]}/{lab}" for p, lab in plabels.items()}
    patients, labels = list(plabels), list(plabels.values())

    def ids(pats: list[str]) -> list[str]:
        return sorted(cid for p in pats for cid in by_patient[p])

    fold_numbers: list[int] = []
    fold_list: list[dict[str, list[str]]] = []
    if official_folds is not None or cv:
        test_folds = (official_fold_patients(pool, official_folds, ds.root) if official_folds is not None else
                      dict(enumerate(_kfold(patients, labels, folds, seed, notes, ds.root))))
        for number, test_pats in test_folds.items():
            rest = sorted(set(patients) - set(test_pats))
            train_pats, val_pats = _carve(rest, [plabels[p] for p in rest], val, seed, "val", notes, ds.root)
            fold_list.append({"train": ids(train_pats), "val": ids(val_pats), "test": ids(test_pats)})
            fold_numbers.append(number)
        notes = list(dict.fromkeys(notes))  # one note, not one per fold
        method = "official_folds" if official_folds is not None else "cv"
    elif folds:
        if not official:  # the held-out test patients first, then k folds over the rest
            patients, test_pats = _carve(patients, labels, test, seed, "test", notes, ds.root)
            labels = [plabels[p] for p in patients]
            fixed_test = ids(test_pats)
        val_parts = _kfold(patients, labels, folds, seed, notes, ds.root)
        fold_list = [{"train": ids(sorted(set(patients) - set(part))), "val": ids(part), "test": fixed_test}
                     for part in val_parts]
        method = "official" if official else "kfold"
    else:
        rest, test_pats = (patients, []) if official else _carve(patients, labels, test, seed, "test", notes, ds.root)
        rest_labels = [plabels[p] for p in rest]
        val_frac = val if official else val / (1.0 - test)
        train_pats, val_pats = _carve(rest, rest_labels, val_frac, seed, "val", notes, ds.root)
        fold_list = [{"train": ids(train_pats), "val": ids(val_pats), "test": fixed_test if official else ids(test_pats)}]
        method = "official" if official else "fractions"
    by_id = {c.case_id: c for c in cases}
    data = {
        "version": 1, "seed": seed, "method": method, "group_by": "patient",
        "stratify_by": "dataset+label" if multi_source else "label",
        "parameters": {"val": None if folds and not cv else val, "test": None if official or official_folds or cv else test, "folds": folds,
                       "official": official, "keep_crossing": keep_crossing, "official_folds": official_folds,
                       **({"cv": True} if cv else {})},
        "folds": fold_list, "dropped": dropped, "crossing_patients": crossing,
        "counts": [_counts(f, by_id) for f in fold_list], "notes": notes,
    }
    if official_folds is not None:
        data["official_fold_numbers"] = fold_numbers  # entry i tests the source's fold official_fold_numbers[i]
    path = Path(out) if out is not None else ds.root / SPLITS_FILE
    atomic_write_json(path, data, sort_keys=True)
    return SplitResult(path=path, data=data)


# ---- audit -------------------------------------------------------------------------------------
@dataclass
class AuditReport:
    splits_path: Path
    n_cases: int
    n_folds: int
    hash_distance: int
    leaks: list[dict[str, Any]] = field(default_factory=list)
    n_unconfirmed: int = 0  # 64-bit near-duplicate candidates the 256-bit hash showed to be different images

    @property
    def ok(self) -> bool:
        return not self.leaks

    def print_summary(self, console: Any = None, max_rows: int = 50) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        if self.n_unconfirmed:
            console.print(f"{self.n_unconfirmed} pair(s) within {self.hash_distance} bits of the 64-bit phash were "
                          "different images by the 256-bit phash; not counted")
        if self.ok:
            console.print(f"[green]audit passed[/green]: {self.splits_path}, {self.n_folds} fold(s), {self.n_cases} cases; "
                          f"no patient, case or near-duplicate (phash distance <= {self.hash_distance}) crosses splits")
            return
        t = Table(title=f"[red]audit FAILED[/red]: {len(self.leaks)} leak(s) in {self.splits_path}")
        for col in ("fold", "leak", "splits", "cases / patient", "distance"):
            t.add_column(col, overflow="fold")
        for leak in self.leaks[:max_rows]:
            who = leak.get("patient_id") or ""
            t.add_row(str(leak["fold"]), leak["kind"], " / ".join(leak["splits"]),
                      (f"patient {who}: " if who else "") + ", ".join(leak["case_ids"]),
                      "" if leak.get("distance") is None else
                      str(leak["distance"]) + ("" if leak.get("distance256") is None else f" ({leak['distance256']}/256)"))
        if len(self.leaks) > max_rows:
            t.add_row("...", f"and {len(self.leaks) - max_rows} more", "", "", "")
        console.print(t)


def audit_splits(prepared_dir: str | Path, splits_path: str | Path | None = None, hash_distance: int = 4) -> AuditReport:
    """Check every fold: no patient or case in two splits, no unknown case id, and no pair of
    near-duplicate images in two splits: 64-bit phash Hamming distance <= ``hash_distance``,
    confirmed (when cases.jsonl has them) by the 256-bit phash within ``dedup.confirm_bound``."""
    from mammocad.datasets.dedup import confirm_bound, hamming_hex, hashes_to_uint64, near_duplicate_pairs

    if hash_distance < 0:
        raise ConfigError("--hash-distance", f"must be >= 0, got {hash_distance}")
    ds = PreparedDataset(prepared_dir)
    data = ds.load_splits(splits_path)
    path = Path(splits_path) if splits_path is not None else ds.root / SPLITS_FILE
    known = {pc.case_id: pc for pc in ds.cases}
    ids = sorted(known)
    try:
        hashes = hashes_to_uint64([known[c].phash for c in ids])
    except ValueError as exc:
        raise InputError(ds.root / CASES_FILE, str(exc)) from None
    pairs = []  # fold-independent: computed once
    candidates = near_duplicate_pairs(hashes, hash_distance)
    n_candidates = len(candidates)
    for i, j, dist in candidates:
        fine_a, fine_b = known[ids[i]].phash256, known[ids[j]].phash256
        fine = hamming_hex(fine_a, fine_b) if fine_a and fine_b and len(fine_a) == len(fine_b) else None
        if fine is None or fine <= confirm_bound(hash_distance):  # 64-bit candidates, confirmed at 256 bits
            pairs.append((i, j, dist, fine))
    report = AuditReport(splits_path=path, n_cases=len(ids), n_folds=len(data["folds"]), hash_distance=hash_distance)
    report.n_unconfirmed = n_candidates - len(pairs)
    for f, fold in enumerate(data["folds"]):
        where: dict[str, set[str]] = defaultdict(set)
        for name in SPLIT_NAMES:
            for cid in fold.get(name, []):
                where[cid].add(name)
        for cid in sorted(where):
            if cid not in known:
                report.leaks.append({"fold": f, "kind": "unknown case", "splits": sorted(where[cid]), "case_ids": [cid]})
            elif len(where[cid]) > 1:
                report.leaks.append({"fold": f, "kind": "case in two splits", "splits": sorted(where[cid]), "case_ids": [cid]})
        patient_splits: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for cid, names in where.items():
            if cid in known:
                for name in names:
                    patient_splits[known[cid].patient_id][name].append(cid)
        for pid in sorted(patient_splits):
            per = patient_splits[pid]
            if len(per) > 1:
                report.leaks.append({"fold": f, "kind": "patient", "splits": sorted(per), "patient_id": pid,
                                     "case_ids": sorted(c for cs in per.values() for c in cs)})
        for i, j, dist, fine in pairs:
            a, b = where.get(ids[i]), where.get(ids[j])
            if a and b and a != b:
                report.leaks.append({"fold": f, "kind": "near-duplicate", "splits": [min(a), min(b)],
                                     "case_ids": [ids[i], ids[j]], "distance": dist, "distance256": fine})
    return report
