"""Validation during training.

``validate_images`` (the default, what the papers report): every validation image goes through the
very code path of the bundle the run will write (``predict_label_map`` with the config's
``inference`` settings: tiled, breast-aware probabilities with its TTA, lesions of >= min_area
pixels inside the breast, the max_lesions best, painted as a label map), and is scored by
``evaluate_segmentation``; the monitored number is the mean Dice over images WITH a lesion. So early
stopping and the card's validation figures are those ``mammocad evaluate`` gives the bundle (same
autocast). It runs on the main process only (rank 0); the engine broadcasts the score.

``validate_patches`` (fast fallback, ``train.val_mode: patch``): a fixed grid of patches over the
validation images, sharded over ranks; Dice of the lesion foreground summed over all patches
(2 sum|P.G| / (sum|P| + sum|G|)) and the mean loss, all-reduced. Cheaper, but it is not the Dice of
whole images, so its numbers are not comparable with papers.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from mammocad.datasets.targets import IGNORE_INDEX
from mammocad.sampling import SegmentationSample
from mammocad.training.distributed import DistContext, all_reduce_sum

MONITOR = "dice_lesion_images_mean"


@dataclass
class ValidationResult:
    dice: float  # the monitored score (NaN when undefined)
    metrics: dict[str, float | None] = field(default_factory=dict)  # flat numbers for the log
    report: Any = None  # SegmentationReport (image mode)
    seconds: float = 0.0


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


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
    from mammocad.inference.predictor import InferenceSettings, predict_label_map

    start = time.perf_counter()
    settings = InferenceSettings.from_config(inference, class_names)
    was_training = model.training
    model.eval()

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
        model.train(was_training)
    h = {k: v.value for k, v in report.headline.items()}
    metrics = {"val_dice": h[MONITOR], "val_iou": h["iou_lesion_images_mean"], "val_dice_all": h["dice_all_images_mean"],
               "val_mean_iou": h["mean_iou"]}
    return ValidationResult(dice=h[MONITOR], metrics=metrics, report=report, seconds=time.perf_counter() - start)


def validate_patches(model: nn.Module, loader: torch.utils.data.DataLoader, loss_fn: nn.Module, ctx: DistContext,
                     amp_dtype: torch.dtype | None = None, threshold: float = 0.5) -> ValidationResult:
    """Patch-level validation, sharded over ranks (the loader holds this rank's share)."""
    start = time.perf_counter()
    logit_threshold = math.log(threshold / (1.0 - threshold))  # sigmoid(logit) >= threshold
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # intersection, predicted, ground truth, loss sum, patches
    try:
        with torch.no_grad():
            for image, target in loader:
                image, target = image.to(ctx.device, non_blocking=True), target.to(ctx.device, non_blocking=True)
                with autocast_context(ctx.device, amp_dtype):
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
    inter, p, g, loss_sum, n = all_reduce_sum(ctx, sums.tolist())
    dice = 2 * inter / (p + g) if p + g > 0 else math.nan
    iou = inter / (p + g - inter) if p + g - inter > 0 else math.nan
    metrics = {"val_dice": dice, "val_iou": iou, "val_loss": loss_sum / n if n else math.nan}
    return ValidationResult(dice=dice, metrics=metrics, seconds=time.perf_counter() - start)
