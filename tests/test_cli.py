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


def test_version():
    from mammocad import __version__

    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"mammocad {__version__}"


# Each of these failed only after work (a model loaded, images read) or with a traceback: now one line
# naming the bad value, before anything else happens. The model named does not exist, so an error about
# anything but the option under test would show the option was not checked first.
@pytest.mark.parametrize("args, source", [
    (["predict", "{tmp}/in", "--out", "{tmp}/o", "--model", "{tmp}/nomodel", "--device", "gpu"], "--device"),
    (["predict", "{tmp}/in", "--out", "{tmp}/o", "--model", "{tmp}/nomodel", "--autocast", "fp16"], "--autocast"),
    (["predict", "{tmp}/in", "--out", "{tmp}/file", "--model", "{tmp}/nomodel"], "{tmp}/file"),
    (["evaluate", "{tmp}/in", "--model", "{tmp}/nomodel", "--out", "{tmp}/file"], "{tmp}/file"),
    (["evaluate", "{tmp}/in", "--model", "{tmp}/nomodel", "--device", "cuda:x"], "--device"),
    (["evaluate", "{tmp}/in", "--model", "{tmp}/nomodel", "--autocast", "half"], "--autocast"),
    (["demo", "--out", "{tmp}/file"], "{tmp}/file"),
    (["predict", "{tmp}/in", "--out", "{tmp}/file/sub", "--model", "{tmp}/nomodel"], "{tmp}/file"),
    (["prepare", "cbis-ddsm", "{tmp}/in", "{tmp}/o", "--modality", "MG"], "--modality"),
])
def test_options_checked_before_any_work(tmp_path, args, source):
    (tmp_path / "in").mkdir()
    (tmp_path / "file").write_text("not a folder")
    proc = _run(*[a.format(tmp=tmp_path) for a in args])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"mammocad: {source.format(tmp=tmp_path)}"), lines[0]
    assert "nomodel" not in lines[0] and "Traceback" not in proc.stderr
    assert (tmp_path / "file").read_text() == "not a folder"
    assert not (tmp_path / "o").exists()  # nothing created by a run that was refused
