"""Tasks by name: what a model does (``segment``, ``detect``, ``classify``).

A task module supplies everything that depends on the kind of output, so that the training engine
(epochs, stages, DDP, resume, early stopping) and the ``Predictor`` (read, preprocess, Geometry
inverse, ``Prediction``) stay the same for every task:

- ``training(cfg, prepared, run, loss_fn)`` -> a ``TaskTraining``: the training dataset from a
  prepared split, its collate, the train step (-> loss dict), validation during and after training;
- ``model_outputs(cfg)``: the model's ``num_classes`` for a training config;
- ``infer(model, pixels, breast_mask, settings, ...)``: the model's raw output on the prepared grid
  (segment: tiled probabilities; detect: merged instances), and what it means:
  ``find_lesions(raw, breast_mask, settings, output_names(model, settings))`` (the bundle's output)
  and ``find_candidates(...)`` (what a FROC curve is drawn from), each a list of
  ``records.LesionComponent`` that ``Predictor`` maps back to the original image;
  ``max_score(raw, breast_mask)`` the image's highest lesion score. ``classify`` has no lesions to
  find: its ``infer`` gives a whole image's class probabilities (``target: image``), and
  ``classify_patches`` those of lesion boxes on a prepared image (what a detector -> classifier
  pipeline calls); ``Predictor`` runs lesion tasks only.

The model card's ``task`` and the training config's ``task`` pick the module (``get_task``). Task
modules are imported when asked for, so importing this registry stays cheap.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Protocol

import torch
from torch import nn

from mammocad.errors import ConfigError

_TASK_MODULES = {"segment": "mammocad.tasks.segment", "detect": "mammocad.tasks.detect",
                 "classify": "mammocad.tasks.classify"}


@dataclass
class RunContext:
    """What the engine tells a task about the run: this rank's device and AMP, and how numbers
    are summed over ranks (a no-op with one process) -- so a task never touches torch.distributed."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    all_reduce_sum: Callable[[list[float]], list[float]] = list

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class ValidationResult:
    score: float  # the monitored number early stopping maximises (NaN when undefined)
    metrics: dict[str, float | None] = field(default_factory=dict)  # flat numbers for the log
    report: Any = None  # the task's full report (segmentation: SegmentationReport)
    seconds: float = 0.0


class TaskTraining(Protocol):
    """One training run's task side (see the module docstring)."""

    score_name: str  # what ``ValidationResult.score`` is, for progress lines ("Dice")
    log_metrics: tuple[str, ...]  # ``ValidationResult.metrics`` keys that go into log.csv
    train_dataset: torch.utils.data.Dataset  # has ``set_epoch(epoch)``
    collate: Callable[[list[Any]], Any] | None  # DataLoader collate_fn (None: torch's default)

    def prepare_validation(self, patch_loader: bool) -> None: ...
    def check_model(self, model: nn.Module) -> None: ...
    def train_step(self, net: nn.Module, batch: Any) -> dict[str, torch.Tensor]: ...
    def batch_items(self, batch: Any) -> int: ...
    def validate(self, model: nn.Module) -> ValidationResult: ...
    def final_validation(self, model: nn.Module, out_dir: Any, n_boot: int) -> tuple[Any, str | None]: ...


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def list_tasks() -> list[str]:
    return sorted(_TASK_MODULES)


def get_task(name: str, source: str = "task") -> ModuleType:
    """The task module registered as ``name`` (a one-line ConfigError naming the known ones otherwise)."""
    if name not in _TASK_MODULES:
        raise ConfigError(source, f"task {name!r} is not available in this mammocad; known: {', '.join(list_tasks())}")
    return importlib.import_module(_TASK_MODULES[name])
