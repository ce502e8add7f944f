"""One prepared dataset made of several (``mammocad combine OUT SRC SRC ...``).

Training on BUSI and BUS-BRA together (issue 7.8's ``us-lesion-det``) needs one prepared dataset
holding both: the samplers, ``split``, ``cv`` and ``evaluate`` all read one folder. ``prepare`` runs
one adapter, so each source is prepared on its own and then combined here:

* the preprocessing must be the SAME in every source (the whole ``preprocess`` record of spec.json):
  a model trained on a mix of two preprocessings would learn the difference, not the lesions;
* case ids must be unique across sources (file stems with them); a patient id found in two sources
  is one patient and stays one group for ``split`` (our adapters prefix ids with the dataset, so
  this only happens when a source really holds the same people twice);
* files are hard-linked when the file system allows it, otherwise copied, so the combined folder
  stands on its own (it may be moved, and a source re-prepared, without breaking it);
* spec.json records ``"adapter": "combined"`` and each source (folder, adapter, raw folder, number
  of cases); summary.json adds the counts per source (``by_dataset``). A case's own record keeps its
  ``dataset`` (``Case.dataset``), which is what per-source figures are computed from.

The output is written into a claimed folder and cases.jsonl / spec.json / summary.json last and
atomically: an interrupted run leaves no dataset that readers would take for complete. Running it
again over the same sources rewrites it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mammocad.datasets.prepared import (CASES_FILE, FAILED_FILE, FORMAT_VERSION, SPEC_FILE, SUMMARY_FILE,
                                        PreparedDataset, read_jsonl_lines)
from mammocad.errors import InputError

COMBINED_ADAPTER = "combined"


@dataclass
class CombineReport:
    out_dir: Path
    sources: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    n_linked: int = 0
    n_copied: int = 0

    def print_summary(self) -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"combined dataset {self.out_dir}")
        for col in ("source", "adapter", "cases"):
            t.add_column(col)
        for s in self.sources:
            t.add_row(s["path"], str(s["adapter"]), str(s["cases"]))
        t.add_row("all", COMBINED_ADAPTER, str(self.summary.get("cases", 0)))
        Console().print(t)
        Console().print(f"patients {self.summary.get('patients', 0)}; files hard-linked {self.n_linked}, "
                        f"copied {self.n_copied}")


def _place(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` to ``dst`` (True), or copy it when linking is not possible (False)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copy2(src, dst)
        return False


def _entry_files(entry: dict[str, Any]) -> list[str]:
    return [entry["image"], entry["union_mask"], entry["breast_mask"], *(m for m in entry["lesion_masks"] if m)]


def combine_prepared(sources: list[str | Path], out_dir: str | Path) -> CombineReport:
    """Combine the prepared datasets ``sources`` into ``out_dir`` (see the module docstring)."""
    from mammocad import __version__
    from mammocad.datasets.prepare_run import PrepareReport, _summary
    from mammocad.io.atomic import atomic_write_json
    from mammocad.io.outdir import claim_output_dir
    from mammocad.records import write_jsonl

    if len(sources) < 2:
        raise InputError("combine", f"needs at least two prepared datasets, got {len(sources)}")
    out = Path(out_dir)
    datasets = [PreparedDataset(p) for p in sources]
    resolved = [d.root.resolve() for d in datasets]
    if len(set(resolved)) != len(resolved):
        raise InputError("combine", "a prepared dataset is given twice")
    if out.resolve() in resolved:
        raise InputError(out, "the output folder is one of the sources")
    first = datasets[0]
    for d in datasets[1:]:
        a, b = first.spec_record["preprocess"], d.spec_record["preprocess"]
        if a != b:
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise InputError(d.root, f"preprocessed differently from {first.root} ({', '.join(keys)}); "
                                     "prepare every source with the same options before combining")
    start = time.monotonic()
    entries: list[dict[str, Any]] = []
    origin: dict[str, Path] = {}
    owner: dict[str, str] = {}  # file path in the combined folder -> the case it belongs to
    report = CombineReport(out_dir=out)
    for d in datasets:
        lines = read_jsonl_lines(d.root / CASES_FILE)
        for e in lines:
            cid = e["case"]["case_id"]
            if cid in origin:
                raise InputError(d.root, f"case id {cid!r} is also in {origin[cid]}; case ids must be unique")
            origin[cid] = d.root
            for rel in _entry_files(e):
                if owner.setdefault(rel, cid) != cid:  # only a hand-made dataset can name files apart from ids
                    raise InputError(d.root, f"file {rel} of case {cid!r} is also a file of case {owner[rel]!r}")
            entries.append((d.root, e))  # type: ignore[arg-type]
        report.sources.append({"path": str(d.root), "adapter": d.spec_record.get("adapter"),
                               "raw_dir": d.spec_record.get("raw_dir"), "cases": len(lines)})
    d0 = first.spec_record
    with claim_output_dir(out, "combine") as claimed:
        for name in (CASES_FILE, SPEC_FILE, SUMMARY_FILE):  # no half-old dataset while files are placed
            (claimed / name).unlink(missing_ok=True)
        for root, e in entries:  # type: ignore[misc]
            for rel in _entry_files(e):
                src = root / rel
                if not src.is_file():
                    raise InputError(src, f"missing (listed in {root / CASES_FILE}); re-run `mammocad prepare`")
                if _place(src, claimed / rel):
                    report.n_linked += 1
                else:
                    report.n_copied += 1
        combined = sorted((e for _, e in entries), key=lambda e: e["case"]["case_id"])  # type: ignore[misc]
        write_jsonl(claimed / CASES_FILE, combined)
        (claimed / FAILED_FILE).write_text("", encoding="utf-8")
        names = "+".join(str(s["adapter"]) for s in report.sources)
        summary = _summary(combined, PrepareReport(out_dir=claimed, dataset=names, n_cases=len(combined),
                                                   n_done=len(combined)))
        summary["by_dataset"] = dict(sorted(Counter(e["case"]["dataset"] for e in combined).items()))
        summary["seconds"] = round(time.monotonic() - start, 2)
        report.summary = summary
        atomic_write_json(claimed / SUMMARY_FILE, summary)
        # spec.json last: it is what makes the folder a prepared dataset
        atomic_write_json(claimed / SPEC_FILE, {
            "format": FORMAT_VERSION, "mammocad_version": __version__, "adapter": COMBINED_ADAPTER,
            "adapter_options": {}, "raw_dir": None, "preprocess": d0["preprocess"], "sources": report.sources,
        }, sort_keys=True)
    return report


def case_datasets(prepared: PreparedDataset) -> dict[str, str]:
    """Case id -> its source dataset (``Case.dataset``), for per-source figures."""
    return {pc.case_id: pc.case.dataset for pc in prepared.cases}

