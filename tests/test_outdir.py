"""Output folders (``io.outdir``): checked before work without leaving anything behind, locked while
a run writes, and marked as mammocad outputs only when the run made them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mammocad.errors import InputError
from mammocad.io.outdir import LOCK_FILE, MARKER_FILE, check_output_dir, claim_output_dir, is_output_dir


def test_check_without_create_leaves_nothing_behind(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_output_dir(target, create=False) == target and not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        check_output_dir(tmp_path / "file" / "sub", create=False)
    with pytest.raises(InputError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", create=False)
    assert check_output_dir(target) == target and target.is_dir()
    assert list(target.iterdir()) == []  # the write probe is gone


def test_claim_locks_the_folder_for_another_process(tmp_path):
    out = tmp_path / "out"
    code = (f"from mammocad.io.outdir import claim_output_dir\n"
            f"with claim_output_dir({str(out)!r}, 'predict'): pass\n")
    with claim_output_dir(out, "prepare"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "another mammocad run is writing to this folder (prepare pid" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr  # released when the first run ended
    assert (out / LOCK_FILE).is_file() and is_output_dir(out)


def test_only_a_folder_the_run_made_or_found_empty_is_marked(tmp_path):
    mine = tmp_path / "films"
    mine.mkdir()
    (mine / "a.png").write_bytes(b"not really")
    with claim_output_dir(mine, "predict"):
        pass
    assert not (mine / MARKER_FILE).exists() and not is_output_dir(mine)  # the user's folder stays an input folder
    empty = tmp_path / "empty"
    empty.mkdir()
    with claim_output_dir(empty, "predict"):
        pass
    assert is_output_dir(empty) and "mammocad predict" in (empty / MARKER_FILE).read_text()


def test_train_refuses_a_run_folder_another_run_holds(tmp_path, capsys):
    """Two trainings into one --out would interleave checkpoints and logs: the second is refused
    before it reads any data."""
    from mammocad.cli import main

    from tiny_prepared import make_tiny_prepared, write_config

    make_tiny_prepared(tmp_path)
    config = write_config(tmp_path, "t.yaml")
    with claim_output_dir(tmp_path / "run", "train"):
        with pytest.raises(SystemExit) as ex:
            main(["train", str(config), "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert ex.value.code == 1 and "another mammocad run is writing to this folder (train pid" in capsys.readouterr().err
    assert not (tmp_path / "run" / "log.csv").exists()
