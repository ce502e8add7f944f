"""Task modules (``mammocad.tasks``): the registry, the config's ``task`` key, and a training engine
that reaches everything task-specific through the task interface (tiny prepared dataset, 1 epoch)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from mammocad.errors import ConfigError
from mammocad.tasks import get_task, list_tasks
from mammocad.training import engine
from mammocad.training.config import load_config, parse_config

from tiny_prepared import make_tiny_prepared, write_config


def test_the_registry_names_the_tasks_it_can_run():
    assert list_tasks() == ["classify", "detect", "segment"]
    for name in list_tasks():  # the interface the engine uses (``mammocad.tasks``)
        task = get_task(name)
        assert task.NAME == name
        for fn in ("training", "model_outputs", "output_names", "infer"):
            assert callable(getattr(task, fn)), (name, fn)
    for name in ("detect", "segment"):  # lesion tasks: what Predictor uses
        for fn in ("find_lesions", "find_candidates", "max_score"):
            assert callable(getattr(get_task(name), fn)), (name, fn)
    for fn in ("classify_patches", "classify_image"):  # a classifier's inference (detector -> classifier pipelines)
        assert callable(getattr(get_task("classify"), fn)), fn
    with pytest.raises(ConfigError, match=r"^model\.json: task 'rank' is not available in this mammocad; "
                                          r"known: classify, detect, segment$"):
        get_task("rank", "model.json")


def test_the_config_picks_the_task_and_existing_configs_still_load():
    cfg = parse_config({"data": {"prepared": "p"}, "model": {"name": "unet"}}, "old.yaml")
    assert cfg.task == "segment" and cfg.to_json()["task"] == "segment"
    assert parse_config({"task": "detect", "data": {"prepared": "p"}, "model": {"name": "maskrcnn"}}, "d.yaml").task == "detect"
    assert parse_config({"task": "classify", "data": {"prepared": "p"}, "model": {"name": "classifier"}}, "c.yaml").task == "classify"
    with pytest.raises(ConfigError, match=r"^new\.yaml: task: Input should be 'segment', 'detect' or 'classify' "
                                          r"\(got 'rank'\)$"):
        parse_config({"task": "rank", "data": {"prepared": "p"}, "model": {"name": "unet"}}, "new.yaml")


def test_the_engine_runs_the_task_through_its_interface(tmp_path, monkeypatch):
    """Every task-specific step of a run (dataset, model check, train steps, validation, the final
    report) is a call on the task; the engine's source names no segmentation code."""
    source = inspect.getsource(engine)
    for specific in ("mammocad.sampling", "SegmentationSample", "validate_images", "validate_patches", "evaluation",
                     "load_split", "check_patch_size", "logits"):
        assert specific not in source, specific

    segment = get_task("segment")
    calls: dict[str, int] = {}

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            value = getattr(self.inner, name)
            if callable(value):
                def counted(*args, **kwargs):
                    calls[name] = calls.get(name, 0) + 1
                    return value(*args, **kwargs)
                return counted
            return value

    recording_module = SimpleNamespace(training=lambda *a: Recording(segment.training(*a)))
    monkeypatch.setattr(engine, "get_task", lambda name, where: recording_module)
    make_tiny_prepared(tmp_path)
    cfg = load_config(write_config(tmp_path, "one.yaml", train={"epochs": 1, "tensorboard": False, "final_n_boot": 0}))
    result = engine.train(cfg, tmp_path / "run", progress=False)
    # 16 patches per epoch in batches of 4
    assert calls == {"prepare_validation": 1, "check_model": 1, "train_step": 4, "batch_items": 4, "validate": 1,
                     "final_validation": 1}
    card = json.loads((Path(result.bundle_dir) / "model.json").read_text())
    assert card["task"] == "segment" and card["config"]["task"] == "segment"
