"""The segmentation task: pixel labels from a prepared split, patch training, whole-image validation,
tiled inference on the prepared grid.

Training side (``training(...)`` -> ``SegmentTraining``): the split's images become
``SegmentationSample``s, a patch sampler + augmentation makes the training dataset, a train step is
``loss_fn(model(image), target)``, validation is either

- ``validate_images`` (the default, what the papers report): every validation image goes through
  the very code path of the bundle the run will write (``predict_label_map`` with the config's
  ``inference`` settings: tiled, breast-aware probabilities with its TTA, lesions of >= min_area
  pixels inside the breast, the max_lesions best, painted as a label map), scored by
  ``evaluate_segmentation``; the monitored number is the mean Dice over images WITH a lesion. So
  early stopping and the card's validation figures are those ``mammocad evaluate`` gives the bundle
  (same autocast). It runs on the main process only; the engine broadcasts the score; or
- ``validate_patches`` (fast fallback, ``train.val_mode: patch``): a fixed grid of patches over the
  validation images, sharded over ranks; Dice of the lesion foreground summed over all patches
  (2 sum|P.G| / (sum|P| + sum|G|)) and the mean loss, summed over ranks. Cheaper, but it is not the
  Dice of whole images, so its numbers are not comparable with papers.

Inference side: ``InferenceSettings`` (tiling + post-processing, one definition for the card and the
config), ``grid_probabilities`` (tiling + TTA), then ``find_lesions`` / ``find_candidates`` (from
``segment_lesions``): what ``Predictor`` runs on a preprocessed image through this module, and
``predict_label_map``, the same path painted as a label map, what validation scores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from mammocad.datasets.targets import IGNORE_INDEX, split_case_ids
from mammocad.errors import ConfigError
from mammocad.records import LesionComponent
from mammocad.sampling import (BalancedPatchSampler, GridPatchSampler, LesionContextSampler, PatchDataset,
                               SegmentationSample, load_samples)
from mammocad.tasks import RunContext, ValidationResult, autocast_context
# find_lesions and find_candidates (the lesions on the prepared grid) are this task's interface to
# Predictor (``task.find_lesions``), hence imported into this module's namespace
from mammocad.tasks.segment_lesions import find_candidates, find_lesions, lesion_label_map  # noqa: F401
from mammocad.tasks.tiling import is_channels_last, predict_tiled

NAME = "segment"
MONITOR = "dice_lesion_images_mean"


# ---- inference on the prepared grid ------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class InferenceSettings:
    """Tiling and post-processing: what turns a model's output into lesions and a label map. One
    definition for ``Predictor`` (read from a model card) and for validation during training (read
    from the config's ``inference`` section, which becomes the card), so the validation Dice that
    drives early stopping and goes into the card is the Dice of what the bundle will predict."""

    name: str = "model"  # for error messages
    class_names: tuple[str, ...]  # label-map classes, background first ("background", "lesion")
    threshold: float
    min_area: int
    tile: int
    overlap: float
    mode: str
    batch_size: int
    max_lesions: int | None = None  # keep the k highest-scoring components (None = all)
    tta: tuple[str, ...] = ()  # test-time augmentations whose probabilities are averaged ("hflip")

    @classmethod
    def from_config(cls, inference: Any, class_names: Sequence[str], name: str = "model") -> "InferenceSettings":
        """From a training config's ``inference`` section (``InferenceConfig``, already validated)."""
        return cls(name=name, class_names=tuple(str(c) for c in class_names), threshold=float(inference.threshold),
                   min_area=int(inference.min_area), tile=int(inference.tile), overlap=float(inference.overlap),
                   mode=str(inference.mode), batch_size=int(inference.batch_size),
                   max_lesions=None if inference.max_lesions is None else int(inference.max_lesions),
                   tta=tuple(str(t) for t in inference.tta))

    def channel_names(self, n_channels: int) -> tuple[str, ...]:
        """Names of the model's output channels: one sigmoid channel is the lesion class; softmax
        channels are the classes, background first."""
        if n_channels == 1 and len(self.class_names) == 2:
            return self.class_names[1:]
        if n_channels == len(self.class_names):
            return self.class_names
        raise ConfigError(self.name, f"model has {n_channels} output channel(s) but the card names classes {list(self.class_names)}")


def grid_probabilities(model: nn.Module, pixels: np.ndarray, breast_mask: np.ndarray | None,
                       settings: InferenceSettings, *, batch_size: int | None = None, autocast: str = "auto",
                       device: torch.device | None = None) -> np.ndarray:
    """(C, H, W) probabilities of a preprocessed image: ``settings``' tiling, then its test-time
    augmentation (``hflip``: averaged with the mirrored image's prediction, mirrored back). Changes
    nothing on the model or the process, so threads may share the model."""
    s = settings

    def run(img: np.ndarray, breast: np.ndarray | None) -> np.ndarray:
        return predict_tiled(model, img, tile=s.tile, overlap=s.overlap, batch_size=int(batch_size or s.batch_size),
                             breast_mask=breast, mode=s.mode, autocast=autocast, device=device)

    probs = run(pixels, breast_mask)
    if "hflip" in s.tta:
        flipped = run(np.ascontiguousarray(pixels[:, ::-1]),
                      None if breast_mask is None else np.ascontiguousarray(breast_mask[:, ::-1]))
        probs = 0.5 * (probs + flipped[:, :, ::-1])
    return probs


infer = grid_probabilities  # the task interface's name (``mammocad.tasks``)


def model_outputs(cfg: Any) -> int:
    """``num_classes`` of the model for a training config (1 = one sigmoid channel)."""
    return int(cfg.data.num_classes)


def output_names(model: nn.Module, settings: InferenceSettings) -> tuple[str, ...]:
    """Names of the model's output channels (``InferenceSettings.channel_names``)."""
    n = getattr(model, "num_classes", None)
    if n is None:
        raise ConfigError(settings.name, "model has no num_classes attribute")
    if settings.mode == "whole":
        raise ConfigError(settings.name, "tiling.mode: 'whole' is for detection models; segmentation tiles "
                                         "(sliding, four)")
    return settings.channel_names(int(n))


def max_score(probs: np.ndarray, breast_mask: np.ndarray | None) -> float:
    """The highest lesion probability inside the breast (0 without breast pixels)."""
    lesion = probs[0] if probs.shape[0] == 1 else 1.0 - probs[0]
    return float(lesion[breast_mask].max()) if breast_mask is not None and breast_mask.any() else 0.0


def predict_label_map(model: nn.Module, pixels: np.ndarray, breast_mask: np.ndarray | None, settings: InferenceSettings,
                      *, autocast: str = "auto") -> tuple[np.ndarray, list[LesionComponent]]:
    """(uint8 label map over ``settings.class_names``, lesions) of a preprocessed image, exactly as a
    bundle with these settings predicts it (``grid_probabilities`` -> ``find_lesions`` ->
    ``lesion_label_map``); what training-time validation scores."""
    probs = grid_probabilities(model, pixels, breast_mask, settings, autocast=autocast)
    found = find_lesions(probs, breast_mask, settings, settings.channel_names(int(model.num_classes)))
    return lesion_label_map(found, probs.shape[1:], settings.class_names), found


# ---- data --------------------------------------------------------------------------------------
def load_split(cfg: Any, prepared: Any, split: str) -> tuple[list[SegmentationSample], dict[str, str]]:
    """(samples, image label per case id) of ``split`` in the configured fold."""
    with cfg.errors_in("data"):
        ids = split_case_ids(prepared, cfg.data.fold, split, cfg.data.splits)
        samples = load_samples(prepared, ids, cfg.data.label_classes, cfg.data.unknown) if ids else []
    return samples, {cid: prepared.by_id(cid).label for cid in ids}


def build_sampler(cfg: Any, samples: list[SegmentationSample]) -> Any:
    s = cfg.sampling
    with cfg.errors_in("sampling"):
        if s.kind == "balanced":
            return BalancedPatchSampler(samples, patch=s.patch, fractions=s.fractions, mode=s.mode,
                                        n_per_epoch=s.n_per_epoch, seed=cfg.train.seed, pad_label=s.pad_label)
        if s.kind == "grid":
            return GridPatchSampler(samples, patch=s.patch, stride=s.stride or max(1, s.patch // 2),
                                    skip_background=s.skip_background, pad_label=s.pad_label)
        return LesionContextSampler(samples, context=s.context, out_size=s.patch, fixed_size=s.fixed_size,
                                    pad_label=s.pad_label)


def build_train_dataset(cfg: Any, samples: list[SegmentationSample]) -> PatchDataset:
    augment = None
    if cfg.augment is not None:
        from mammocad.augment import build_augment

        with cfg.errors_in("augment"):
            augment = build_augment(cfg.augment)
    return PatchDataset(build_sampler(cfg, samples), augment=augment, seed=cfg.train.seed)


def make_patch_val_loader(cfg: Any, samples: list[SegmentationSample], run: RunContext) -> torch.utils.data.DataLoader:
    """Non-overlapping grid patches of the validation images, strided over ranks (no duplicates)."""
    from torch.utils.data import DataLoader, Subset

    with cfg.errors_in("sampling"):
        grid = GridPatchSampler(samples, patch=cfg.sampling.patch, stride=cfg.sampling.patch, skip_background=True,
                                pad_label=cfg.sampling.pad_label)
    dataset = PatchDataset(grid, augment=None, seed=cfg.train.seed)
    shard = Subset(dataset, list(range(run.rank, len(dataset), run.world_size)))
    return DataLoader(shard, batch_size=cfg.sampling.batch_size, shuffle=False, num_workers=0)


def check_patch_size(cfg: Any, model: nn.Module) -> None:
    if getattr(model, "task", NAME) != NAME:
        raise ConfigError(cfg.source, f"model.name: {model.mammocad_config['name']} is a {model.task} model; "
                                      "this config's task is segment")
    if cfg.inference.mode == "whole":
        raise ConfigError(cfg.source, "inference.mode: 'whole' is for detection; segmentation tiles (sliding, four)")
    d = int(getattr(model, "size_divisor", 1))
    if cfg.sampling.patch % d:
        raise ConfigError(cfg.source, f"sampling.patch: {cfg.sampling.patch} is not a multiple of the model's "
                                      f"size_divisor {d}")
    if cfg.inference.mode == "sliding" and cfg.inference.tile % d:
        raise ConfigError(cfg.source, f"inference.tile: {cfg.inference.tile} is not a multiple of the model's "
                                      f"size_divisor {d}")


# ---- validation --------------------------------------------------------------------------------
def inference_autocast(amp_dtype: torch.dtype | None) -> str:
    """``predict_tiled``'s autocast for a training AMP dtype: it autocasts to bf16 only, so an fp16
    (CUDA) run validates in fp32."""
    return "bf16" if amp_dtype == torch.bfloat16 else "fp32"


def validate_images(model: nn.Module, samples: list[SegmentationSample], labels: dict[str, str], class_names: list[str],
                    inference: Any, amp_dtype: torch.dtype | None = None, n_boot: int = 0,
                    progress: Callable[[], None] | None = None) -> ValidationResult:
    """Whole-image validation (see the module docstring). ``labels``: image label per case id;
    ``inference``: the config's ``inference`` section (``InferenceConfig``)."""
    from mammocad.evaluation.segmentation import EvalItem, evaluate_segmentation

    start = time.perf_counter()
    settings = InferenceSettings.from_config(inference, class_names)
    was_training = model.training
    model.eval()
    # channels-last once for the whole validation (oneDNN's native layout, see tasks.tiling), not per image
    restore_format = _to_channels_last(model)

    def items():
        for s in samples:
            pred, _ = predict_label_map(model, s.image, s.breast, settings, autocast=inference_autocast(amp_dtype))
            if progress is not None:
                progress()
            yield EvalItem(case_id=s.case_id, patient_id=s.patient_id, gt=s.target, pred=pred,
                           image_label=labels.get(s.case_id, "unknown"), breast_mask=s.breast)

    try:
        with torch.no_grad():
            report = evaluate_segmentation(items(), class_names, n_boot=n_boot, keep_per_image=False)
    finally:
        if restore_format:
            model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    h = {k: v.value for k, v in report.headline.items()}
    metrics = {"val_dice": h[MONITOR], "val_iou": h["iou_lesion_images_mean"], "val_dice_all": h["dice_all_images_mean"],
               "val_mean_iou": h["mean_iou"]}
    return ValidationResult(score=h[MONITOR], metrics=metrics, report=report, seconds=time.perf_counter() - start)


def _to_channels_last(model: nn.Module) -> bool:
    """Convert ``model`` to channels-last; True when it was not (so the caller converts it back)."""
    if is_channels_last(model):
        return False
    model.to(memory_format=torch.channels_last)
    return True


def validate_patches(model: nn.Module, loader: torch.utils.data.DataLoader, loss_fn: nn.Module, run: RunContext,
                     threshold: float = 0.5) -> ValidationResult:
    """Patch-level validation, sharded over ranks (the loader holds this rank's share)."""
    start = time.perf_counter()
    logit_threshold = math.log(threshold / (1.0 - threshold))  # sigmoid(logit) >= threshold
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # intersection, predicted, ground truth, loss sum, patches
    try:
        with torch.no_grad():
            for image, target in loader:
                image, target = image.to(run.device, non_blocking=True), target.to(run.device, non_blocking=True)
                with autocast_context(run.device, run.amp_dtype):
                    logits = model(image)
                logits = logits.float()
                loss = loss_fn(logits, target)
                pred = (logits[:, 0] >= logit_threshold) if logits.shape[1] == 1 else (logits.argmax(1) > 0)
                valid = target != IGNORE_INDEX
                gt = (target > 0) & valid
                pred = pred & valid
                sums += torch.tensor([float((pred & gt).sum()), float(pred.sum()), float(gt.sum()),
                                      float(loss) * image.shape[0], float(image.shape[0])], dtype=torch.float64)
    finally:
        model.train(was_training)
    inter, p, g, loss_sum, n = run.all_reduce_sum(sums.tolist())
    dice = 2 * inter / (p + g) if p + g > 0 else math.nan
    iou = inter / (p + g - inter) if p + g - inter > 0 else math.nan
    metrics = {"val_dice": dice, "val_iou": iou, "val_loss": loss_sum / n if n else math.nan}
    return ValidationResult(score=dice, metrics=metrics, seconds=time.perf_counter() - start)


# ---- one training run --------------------------------------------------------------------------
class SegmentTraining:
    """The segmentation side of one training run (``tasks.TaskTraining``)."""

    score_name = "Dice"
    log_metrics = ("val_loss", "val_dice", "val_iou")
    collate = None  # (image, target) tensors: torch's default collate stacks them

    def __init__(self, cfg: Any, prepared: Any, run: RunContext, loss_fn: nn.Module):
        self.cfg, self.prepared, self.run, self.loss_fn = cfg, prepared, run, loss_fn
        train_samples, _ = load_split(cfg, prepared, "train")
        self.train_dataset = build_train_dataset(cfg, train_samples)
        self.val_samples: list[SegmentationSample] = []
        self.val_labels: dict[str, str] = {}
        self.val_loader: torch.utils.data.DataLoader | None = None

    def prepare_validation(self, patch_loader: bool) -> None:
        """Read the validation split where it is used: the main process (image validation, the final
        report) and, for ``val_mode: patch``, every rank."""
        cfg = self.cfg
        if not (self.run.is_main or patch_loader):
            return
        self.val_samples, self.val_labels = load_split(cfg, self.prepared, "val")
        if cfg.train.val_every > 0 and not any(((s.target > 0) & (s.target < 255)).any() for s in self.val_samples):
            raise ConfigError(cfg.source, f"data: fold {cfg.data.fold} has no validation image with a lesion, so "
                                          "val Dice is undefined; re-split or set train.val_every: 0")
        if patch_loader:
            self.val_loader = make_patch_val_loader(cfg, self.val_samples, self.run)

    def check_model(self, model: nn.Module) -> None:
        check_patch_size(self.cfg, model)

    def train_step(self, net: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Forward and loss of one batch; ``{"loss": mean over the batch}`` (the engine steps)."""
        image, target = batch
        device = self.run.device
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast_context(device, self.run.amp_dtype):
            logits = net(image)
        return {"loss": self.loss_fn(logits.float(), target)}

    def batch_items(self, batch: Any) -> int:
        return int(batch[0].shape[0])

    def validate(self, model: nn.Module) -> ValidationResult:
        """Image validation on the main process (NaN elsewhere: the engine broadcasts), or the sharded
        patch validation."""
        cfg = self.cfg
        if cfg.train.val_mode == "patch":
            return validate_patches(model, self.val_loader, self.loss_fn, self.run, cfg.inference.threshold)
        if not self.run.is_main:
            return ValidationResult(score=math.nan)
        return validate_images(model, self.val_samples, self.val_labels, cfg.data.class_names, cfg.inference,
                               self.run.amp_dtype)

    def final_validation(self, model: nn.Module, out_dir: Path, n_boot: int) -> tuple[Any, str | None]:
        """(report for the model card, a line to print) of the final model on the validation split,
        with bootstrap CIs; the report is written to ``out_dir`` (main process only)."""
        from mammocad.evaluation.report import write_report

        if not self.val_samples:
            return None, None
        val = validate_images(model, self.val_samples, self.val_labels, self.cfg.data.class_names, self.cfg.inference,
                              self.run.amp_dtype, n_boot=n_boot)
        write_report(val.report, out_dir)
        return val.report, (f"validation Dice (lesion images) {val.score:.4f} on {val.report.n_images} images of "
                            f"{val.report.n_patients} patients")


def training(cfg: Any, prepared: Any, run: RunContext, loss_fn: nn.Module) -> SegmentTraining:
    return SegmentTraining(cfg, prepared, run, loss_fn)
