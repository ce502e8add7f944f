"""Validation during training.

``validate_images`` (the default, what the papers report): every validation image is predicted
whole with the tiled, breast-aware inference a bundle uses at run time (``predict_tiled``), turned
into a label map (probability >= threshold for a binary model, argmax otherwise) and scored by
``evaluate_segmentation``; the monitored number is the mean Dice over images WITH a lesion. It
runs on the main process only (rank 0); the engine broadcasts the score.

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

import numpy as np
import torch
from torch import nn

from mammocad.sampling import IGNORE_INDEX, SegmentationSample
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


def probabilities_to_labels(probs: np.ndarray, threshold: float) -> np.ndarray:
    """(C,H,W) probabilities -> HxW uint8 label map (C == 1: sigmoid lesion probability)."""
    if probs.shape[0] == 1:
        return (probs[0] >= threshold).astype(np.uint8)
    return np.argmax(probs, axis=0).astype(np.uint8)


def predict_image(model: nn.Module, sample: SegmentationSample, inference: Any, amp_dtype: torch.dtype | None) -> np.ndarray:
    """Whole-image (C,H,W) probabilities of one validation image, as a bundle would predict it."""
    from mammocad.inference.tiling import predict_tiled

    # predict_tiled autocasts to bf16 only; an fp16 (CUDA) training run validates in fp32
    probs = predict_tiled(model, sample.image, tile=inference.tile, overlap=inference.overlap,
                          batch_size=inference.batch_size, breast_mask=sample.breast, mode=inference.mode,
                          autocast="bf16" if amp_dtype == torch.bfloat16 else "fp32")
    return np.asarray(probs, dtype=np.float32)


def validate_images(model: nn.Module, samples: list[SegmentationSample], labels: dict[str, str], class_names: list[str],
                    inference: Any, amp_dtype: torch.dtype | None = None, n_boot: int = 0,
                    progress: Callable[[], None] | None = None) -> ValidationResult:
    """Whole-image validation (see the module docstring). ``labels``: image label per case id."""
    from mammocad.evaluation.segmentation import EvalItem, evaluate_segmentation

    start = time.perf_counter()
    was_training = model.training
    model.eval()

    def items():
        for s in samples:
            pred = probabilities_to_labels(predict_image(model, s, inference, amp_dtype), inference.threshold)
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
