"""Multi-process training: the unchanged ``mammocad train`` under torchrun with 2 CPU processes (Gloo)
finishes, shards the patches between the ranks, all-reduces the counts and writes one bundle."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_prepared import make_tiny_prepared, write_config


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    make_tiny_prepared(tmp_path)
    config = write_config(tmp_path, "ddp.yaml", train={"epochs": 1, "tensorboard": False})
    out = tmp_path / "run_ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "mammocad.cli", "train", str(config), "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    shards = {s["rank"]: s for s in info["shards"]}
    assert set(shards) == {0, 1} and shards[0]["n"] == shards[1]["n"] == 8  # 16 patches per epoch, half each
    assert not set(shards[0]["first"]) & set(shards[1]["first"])  # the ranks draw different patches

    with open(out / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1"] and int(rows[0]["patches"]) == 16  # all-reduced over ranks
    assert sorted(p.name for p in out.rglob("model.json")) == ["model.json"]  # one bundle, written by rank 0
    card = json.loads((out / "bundle" / "model.json").read_text())
    assert card["training"]["world_size"] == 2 and card["training"]["epochs"] == 1
    assert proc.stdout.count("bundle written") + proc.stderr.count("bundle written") == 1
