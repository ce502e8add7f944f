"""Segmentation losses for binary and multi-class logits, with ignored pixels.

Every loss is an ``nn.Module`` called as ``loss(logits, target, valid_mask=None)``:

- binary: logits ``(N, 1, H, W)`` (sigmoid), target ``(N, 1, H, W)`` or ``(N, H, W)``, float/bool/int;
- multi-class: logits ``(N, C, H, W)`` with C >= 2 (softmax), target ``(N, H, W)`` integer classes.

Pixels are ignored where ``valid_mask`` is False (e.g. outside the breast) or where the target
equals ``ignore_index``; means are taken over the remaining pixels. A batch with no valid pixel
gives a zero loss that still backpropagates (zeros).

torch's own losses do the per-pixel arithmetic; what is written here is the target handling,
the masking and the class-frequency weighting, which no library loss combines.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from mammocad.errors import ConfigError


def prepare_target(
    logits: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise the target and the valid mask.

    Returns ``(target, valid)``: binary -> float target ``(N, 1, H, W)``; multi-class -> long
    target ``(N, H, W)`` (ignored pixels set to 0); ``valid`` is a float mask shaped like the target."""
    if logits.ndim != 4:
        raise ConfigError("loss", f"logits must be (N, C, H, W), got {tuple(logits.shape)}")
    n, c, h, w = logits.shape
    if target.ndim == 4 and target.shape[1] == 1 and c > 1:
        target = target[:, 0]
    if target.ndim == 3 and c == 1:
        target = target[:, None]
    want = (n, 1, h, w) if c == 1 else (n, h, w)
    if tuple(target.shape) != want:
        raise ConfigError("loss", f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    valid = torch.ones(want, dtype=torch.bool, device=logits.device)
    if ignore_index is not None:
        valid &= target != ignore_index
    if valid_mask is not None:
        vm = valid_mask.to(device=logits.device, dtype=torch.bool)
        if vm.ndim == 4 and c > 1:
            vm = vm[:, 0]
        if vm.ndim == 3 and c == 1:
            vm = vm[:, None]
        if tuple(vm.shape) != want:
            raise ConfigError("loss", f"valid_mask shape {tuple(valid_mask.shape)} does not match logits {tuple(logits.shape)}")
        valid &= vm
    if c == 1:
        target = torch.where(valid, target.to(logits.dtype), torch.zeros((), dtype=logits.dtype, device=logits.device))
        if target.numel() and (float(target.min()) < 0 or float(target.max()) > 1):
            raise ConfigError("loss", f"binary targets must lie in [0, 1] (a 0/255 mask?), got {float(target.min())}..{float(target.max())}")
    else:
        target = torch.where(valid, target.long(), torch.zeros((), dtype=torch.long, device=logits.device))
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= c):
            raise ConfigError("loss", f"target classes must be in 0..{c - 1} (or ignore_index), got {int(target.min())}..{int(target.max())}")
    return target, valid.to(logits.dtype)


def masked_mean(values: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum(w * v * valid) / sum(w * valid); 0 (with a graph) when the denominator is 0."""
    w = valid if weights is None else valid * weights
    denom = w.sum()
    total = (values * w).sum()
    return total / denom if denom > 0 else total * 0.0


def class_counts(target: torch.Tensor, valid: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Valid pixels per class; binary targets count as classes (background, lesion)."""
    if num_classes == 1:
        pos = (target * valid).sum()
        return torch.stack([valid.sum() - pos, pos])
    flat = target[valid > 0]
    return torch.bincount(flat, minlength=num_classes).to(valid.dtype)


def frequency_weights(frequencies: torch.Tensor) -> torch.Tensor:
    """w_c = 1 - share_c, share_c = frequency_c / sum(frequencies)."""
    total = frequencies.sum()
    if total <= 0:
        return torch.ones_like(frequencies)
    return 1.0 - frequencies / total


class BCEWithPosWeight(nn.Module):
    """Binary cross-entropy on logits with a positive-class weight: a number, or ``"auto"`` =
    (#negative / #positive valid pixels) of the batch (1 when the batch has no positive pixel)."""

    def __init__(self, pos_weight: float | str | None = None, ignore_index: int | None = None):
        super().__init__()
        if not (pos_weight is None or pos_weight == "auto" or (isinstance(pos_weight, (int, float)) and pos_weight > 0)):
            raise ConfigError("pos_weight", f"must be a positive number, 'auto' or None, got {pos_weight!r}")
        self.pos_weight, self.ignore_index = pos_weight, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        if logits.shape[1] != 1:
            raise ConfigError("loss bce", f"needs binary logits (N, 1, H, W), got {tuple(logits.shape)}")
        t, valid = prepare_target(logits, target, valid_mask, self.ignore_index)
        pw = self.pos_weight
        if pw == "auto":
            neg, pos = class_counts(t, valid, 1)
            pw = (neg / pos).detach() if pos > 0 else 1.0
        pw_t = None if pw is None else torch.as_tensor(pw, dtype=logits.dtype, device=logits.device)
        loss = F.binary_cross_entropy_with_logits(logits, t, pos_weight=pw_t, reduction="none")
        return masked_mean(loss, valid)


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with class weights w_c = 1 - share_c, from ``class_frequencies`` (counts or
    shares; for binary logits two values: background, lesion) or, when None, from each batch's valid
    pixels. Weighted mean as torch's: sum(w_y * loss) / sum(w_y). Per-batch weights make a batch that
    holds one class only contribute nothing (its weight is 0): pass dataset frequencies to avoid it."""

    def __init__(self, class_frequencies: Sequence[float] | None = None, ignore_index: int | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.class_frequencies = None if class_frequencies is None else [float(f) for f in class_frequencies]
        if self.class_frequencies is not None and (min(self.class_frequencies) < 0 or sum(self.class_frequencies) <= 0):
            raise ConfigError("class_frequencies", f"must be non-negative with a positive sum, got {class_frequencies!r}")

    def weights(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        c = logits.shape[1]
        n_classes = 2 if c == 1 else c
        if self.class_frequencies is not None:
            if len(self.class_frequencies) != n_classes:
                raise ConfigError("class_frequencies", f"need {n_classes} values for {c}-channel logits, got {len(self.class_frequencies)}")
            freq = torch.tensor(self.class_frequencies, dtype=logits.dtype, device=logits.device)
        else:
            freq = class_counts(target, valid, c)
        return frequency_weights(freq)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        t, valid = prepare_target(logits, target, valid_mask, self.ignore_index)
        w = self.weights(logits, t, valid)
        if logits.shape[1] == 1:
            loss = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
            pixel_w = w[1] * t + w[0] * (1 - t)
        else:
            loss = F.cross_entropy(logits, t, reduction="none")
            pixel_w = w[t]
        return masked_mean(loss, valid, pixel_w)


class SoftDiceLoss(nn.Module):
    """1 - mean soft Dice, Dice = (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth).

    Channels: binary -> the lesion map (plus 1 - p as background if ``include_background``);
    multi-class -> classes 1..C-1 (plus class 0 if ``include_background``). ``batch_dice`` sums over
    the whole batch (nnU-Net's batch Dice) instead of averaging per-image Dice."""

    def __init__(self, smooth: float = 1.0, include_background: bool = False, batch_dice: bool = False, ignore_index: int | None = None):
        super().__init__()
        self.smooth, self.include_background, self.batch_dice, self.ignore_index = smooth, include_background, batch_dice, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        t, valid = prepare_target(logits, target, valid_mask, self.ignore_index)
        if logits.shape[1] == 1:
            p = torch.sigmoid(logits)
            if self.include_background:
                p, t = torch.cat([1 - p, p], 1), torch.cat([1 - t, t], 1)
        else:
            p = torch.softmax(logits, 1)
            t = F.one_hot(t, logits.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
            valid = valid[:, None]
            if not self.include_background:
                p, t = p[:, 1:], t[:, 1:]
        p, t = p * valid, t * valid
        dims = (0, 2, 3) if self.batch_dice else (2, 3)
        inter = (p * t).sum(dims)
        dice = (2 * inter + self.smooth) / (p.sum(dims) + t.sum(dims) + self.smooth)
        return 1 - dice.mean()


class DiceCELoss(nn.Module):
    """``dice_weight * SoftDice + ce_weight * CE``; CE is BCE (with ``pos_weight``) for binary
    logits, and weighted CE (w = 1 - share) for multi-class when ``class_frequencies`` is given."""

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        smooth: float = 1.0,
        include_background: bool = False,
        batch_dice: bool = False,
        pos_weight: float | str | None = None,
        class_frequencies: Sequence[float] | None = None,
        ignore_index: int | None = None,
    ):
        super().__init__()
        self.dice_weight, self.ce_weight = dice_weight, ce_weight
        self.dice = SoftDiceLoss(smooth, include_background, batch_dice, ignore_index)
        self.bce = BCEWithPosWeight(pos_weight, ignore_index)
        self.ce = WeightedCrossEntropy(class_frequencies, ignore_index) if class_frequencies else None
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        if logits.shape[1] == 1:
            ce = self.bce(logits, target, valid_mask)
        elif self.ce is not None:
            ce = self.ce(logits, target, valid_mask)
        else:
            t, valid = prepare_target(logits, target, valid_mask, self.ignore_index)
            ce = masked_mean(F.cross_entropy(logits, t, reduction="none"), valid)
        return self.dice_weight * self.dice(logits, target, valid_mask) + self.ce_weight * ce


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): -alpha_t (1 - p_t)^gamma log p_t, mean over valid pixels.

    Binary: torchvision's ``sigmoid_focal_loss``; ``alpha`` is the lesion weight in [0, 1] (background
    1 - alpha), None = unweighted. Multi-class: ``alpha`` is None or one weight per class.
    ``gamma=0`` and no alpha is plain (B)CE."""

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | None = None, ignore_index: int | None = None):
        super().__init__()
        if gamma < 0:
            raise ConfigError("gamma", f"must be >= 0, got {gamma!r}")
        self.gamma, self.alpha, self.ignore_index = gamma, alpha, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        t, valid = prepare_target(logits, target, valid_mask, self.ignore_index)
        c = logits.shape[1]
        if c == 1:
            if self.alpha is not None and not isinstance(self.alpha, (int, float)):
                raise ConfigError("alpha", "binary focal loss takes one number in [0, 1] (lesion weight)")
            alpha = -1.0 if self.alpha is None else float(self.alpha)  # torchvision: < 0 = no weighting
            loss = sigmoid_focal_loss(logits, t, alpha=alpha, gamma=self.gamma, reduction="none")
            return masked_mean(loss, valid)
        logp = F.log_softmax(logits, 1).gather(1, t[:, None])[:, 0]
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        if self.alpha is not None:
            if isinstance(self.alpha, (int, float)) or len(self.alpha) != c:
                raise ConfigError("alpha", f"multi-class focal loss takes one weight per class ({c})")
            loss = loss * torch.tensor(list(self.alpha), dtype=logits.dtype, device=logits.device)[t]
        return masked_mean(loss, valid)


LOSSES: dict[str, type[nn.Module]] = {
    "bce": BCEWithPosWeight,
    "wce": WeightedCrossEntropy,
    "dice": SoftDiceLoss,
    "dice_ce": DiceCELoss,
    "focal": FocalLoss,
}


def list_losses() -> list[str]:
    return sorted(LOSSES)


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """``create_loss("dice_ce", pos_weight="auto")``; unknown names or arguments raise ConfigError."""
    if name not in LOSSES:
        raise ConfigError(name, f"unknown loss; known: {', '.join(list_losses())}")
    try:
        return LOSSES[name](**kwargs)
    except TypeError as err:
        raise ConfigError(f"loss {name}", str(err)) from None
