"""The command line contract: one-line errors with a non-zero status; the demo writes its outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mammocad.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=600)


@pytest.mark.parametrize("args, source, cause", [
    (["prepare", "folder", "{tmp}/missing", "{tmp}/out"], "missing", ""),
    (["prepare", "folder", "{tmp}/empty", "{tmp}/out"], "empty", "empty"),
    (["prepare", "nosuch", "{tmp}/empty", "{tmp}/out"], "nosuch", "unknown dataset adapter"),
    (["prepare", "folder", "{tmp}/empty", "{tmp}/out", "--size", "12x"], "12x", ""),
    (["audit", "{tmp}/empty"], "empty", ""),
])
def test_user_errors_are_one_line(tmp_path, args, source, cause):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    proc = _run(*[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mammocad: ") and source in lines[0] and cause in lines[0]
    assert "Traceback" not in proc.stderr


def test_usage_error_exits_2():
    proc = _run("prepare")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_writes_prepared_dataset_and_previews(tmp_path):
    proc = _run("demo", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "demo"
    previews = sorted((out / "previews").glob("*.png"))
    cases = (out / "prepared" / "cases.jsonl").read_text().splitlines()
    assert len(previews) == len(cases) >= 6
    assert (out / "prepared" / "splits.json").is_file()
    # the default MG model ran on every synthetic DICOM: JSON, mask and overlay per input
    jsons = [p for p in (out / "predictions").glob("*.json") if p.name != "summary.json"]
    assert len(jsons) == len(cases)
    for j in jsons:
        rec = json.loads(j.read_text())
        assert rec["model_name"] == "mammo-lesion-seg" and len(rec["image_size"]) == 2
        assert (out / "predictions" / rec["mask"]).is_file() and (out / "predictions" / rec["overlay"]).is_file()
