"""``mammocad demo``: the whole path on a small synthetic study, twice into the same folder."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from mammocad.demo import run_demo
from mammocad.errors import ConfigError, InputError
from mammocad.io.outdir import claim_output_dir, is_output_dir


def test_demo_refuses_a_bad_n_and_a_folder_in_use(tmp_path):
    with pytest.raises(ConfigError, match="--n: must be at least 1, got 0"):
        run_demo(tmp_path / "demo", n=0)
    assert not (tmp_path / "demo").exists()  # refused before anything was written
    with claim_output_dir(tmp_path / "busy", "demo"):
        with pytest.raises(InputError, match="another mammocad run is writing to this folder"):
            run_demo(tmp_path / "busy", n=4, console=Console(quiet=True))
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [".mammocad-output", ".mammocad.lock"]


@pytest.mark.slow
def test_demo_with_one_patient_runs_twice_into_the_same_folder(tmp_path):
    """n=4 is one patient (the patient split failed halfway); a re-run into the folder must resume."""
    out = tmp_path / "demo"
    for _ in range(2):
        result = run_demo(out, n=4, console=Console(quiet=True))
        assert result["n_cases"] == 4 and result["n_predicted"] == 4
    assert is_output_dir(out)
    split = json.loads((out / "prepared" / "splits.json").read_text())
    assert len(split["folds"][0]["train"]) == 4 and split["folds"][0]["val"] == []
    summary = json.loads((out / "predictions" / "summary.json").read_text())
    assert (summary["inputs"], summary["skipped"], summary["failed"]) == (4, 4, 0)  # the second run resumed
    assert len(list((out / "previews").glob("*.png"))) == 4
