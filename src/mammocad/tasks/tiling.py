"""Breast-aware tiled whole-image inference: sliding window with Gaussian blending, or 4 quadrants.

Reproduces ``monai.inferers.sliding_window_inference`` window for window: the same window starts
(fixed step ``int(tile * (1 - overlap))``, the last window aligned to the border), the same Gaussian
importance map (sigma = tile / 8 as in nnU-Net, floored at 1e-3 so the weight at window borders is
never ~0), the same blending of logits, the same zero padding of images smaller than a window. It
differs where that saves time (measured in ``benchmarks/bench_tiling.py``, 1 CPU thread, U-Net 16/4,
tile 256, overlap 0.25):

- a window without a single breast pixel is never run and its area is background (probability 0):
  15 of 20 windows on an uncropped 1024x832 mammogram (1.3x); none skipped on an image already
  cropped to the breast by ``preprocess_image``, where the two engines are equally fast;
- channels-last convolutions and, where the CPU has native bf16 (AVX512-BF16/AMX), bf16 autocast by
  default: 0.36 s instead of 1.49 s for MONAI called on the same model as it comes (NCHW, fp32).
  MONAI given a channels-last model under the same autocast is as fast: these defaults are the gain.

``mode="four"`` is the "split the image into 4 tiles" inference of the mammography segmentation
papers reproduced here: a full-resolution mammogram's activations did not fit in GPU memory, so the
image is cut into 2 x 2 quadrants, each predicted on its own and the outputs stitched, without
overlap or blending (seams are the price of the memory saving).

It lives with the tasks (layer: tasks < training/inference) because tasks supply the inference on
the prepared grid that both training-time validation and ``Predictor`` run.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np
import torch
from torch import nn

from mammocad.devices import cpu_supports_bf16
from mammocad.errors import ConfigError, InputError

MODES = ("sliding", "four")
AUTOCAST = ("auto", "bf16", "fp32")
WEIGHT_FLOOR = 1e-3  # MONAI's floor for the Gaussian importance map


@dataclass(frozen=True)
class TilePlan:
    """Where the windows go. All coordinates are on the padded canvas."""

    image_size: tuple[int, int]  # (H, W) of the input image
    pad: tuple[int, int, int, int]  # (top, bottom, left, right) zero padding making the canvas
    tile: tuple[int, int]  # (height, width) of every window
    starts: np.ndarray  # (N, 2) int (y, x) window corners
    keep: np.ndarray  # (N,) bool: window holds at least one breast pixel (all True without a mask)
    blend: bool  # Gaussian blending (sliding) or plain stitching (four)

    @property
    def canvas_size(self) -> tuple[int, int]:
        t, b, lft, r = self.pad
        return self.image_size[0] + t + b, self.image_size[1] + lft + r


def _round_up(n: int, d: int) -> int:
    return -(-n // d) * d


def _window_starts(length: int, tile: int, overlap: float) -> list[int]:
    """MONAI's ``dense_patch_slices`` on one axis: fixed step, last window moved back to the border."""
    if length <= tile:
        return [0]
    step = max(int(tile * (1 - overlap)), 1)
    n = next(d for d in range(math.ceil(length / step)) if d * step + tile >= length) + 1
    return [min(i * step, length - tile) for i in range(n)]


def plan_tiles(image_size: tuple[int, int], tile: int = 256, overlap: float = 0.25, mode: str = "sliding",
               size_divisor: int = 1, breast_mask: np.ndarray | None = None) -> TilePlan:
    """Window layout for an image; ``tile`` is ignored by ``mode="four"`` (quadrants)."""
    h, w = (int(v) for v in image_size)
    d = max(int(size_divisor), 1)
    if mode not in MODES:
        raise ConfigError("mode", f"unknown tiling mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "sliding":
        if tile < 1 or tile % d:
            raise ConfigError("tile", f"tile size {tile} must be a positive multiple of the model's size_divisor {d}")
        if not 0 <= overlap < 1:
            raise ConfigError("overlap", f"overlap must be in [0, 1), got {overlap}")
        th = tw = int(tile)
        # Images smaller than a window are zero-padded to it, split evenly on both sides (as MONAI).
        ph, pw = max(th - h, 0), max(tw - w, 0)
        pad = (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
        ys, xs = _window_starts(h + ph, th, overlap), _window_starts(w + pw, tw, overlap)
    else:
        # Quadrant size rounded up to the divisor; the padding goes to the outer (bottom/right) edge only,
        # so no window carries padding in the middle of the breast.
        th, tw = _round_up(-(-h // 2), d), _round_up(-(-w // 2), d)
        pad = (0, 2 * th - h, 0, 2 * tw - w)
        ys, xs = [0, th], [0, tw]
    starts = np.array([(y, x) for y in ys for x in xs], dtype=np.int64)
    keep = np.ones(len(starts), dtype=bool)
    if breast_mask is not None:
        if breast_mask.shape != (h, w):
            raise InputError("breast_mask", f"shape {breast_mask.shape} does not match the image {h}x{w}")
        on = np.pad(breast_mask != 0, ((pad[0], pad[1]), (pad[2], pad[3]))).astype(np.uint8)
        # Summed-area table: breast pixels per window in O(1) each, whatever the window count.
        sat = cv2.integral(on, sdepth=cv2.CV_64F)
        y0, x0 = starts[:, 0], starts[:, 1]
        y1, x1 = y0 + th, x0 + tw
        keep = (sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]) > 0
    return TilePlan((h, w), pad, (th, tw), starts, keep, mode == "sliding")


@functools.lru_cache(maxsize=8)
def gaussian_importance_map(height: int, width: int, sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI's ``compute_importance_map(mode="gaussian")``: separable Gaussian centred on the window,
    sigma = sigma_scale * size, floored at 1e-3. Cached per window size (pure function of its arguments)."""
    axes = []
    for n in (height, width):
        x = np.arange(n, dtype=np.float32) - (n - 1) / 2.0
        axes.append(np.exp(x**2 / (-2 * (sigma_scale * n) ** 2)).astype(np.float32))
    g = np.maximum(np.outer(axes[0], axes[1]), np.float32(WEIGHT_FLOOR))
    g.setflags(write=False)
    return g


def use_bf16(autocast: str, device: torch.device) -> bool:
    if autocast not in AUTOCAST:
        raise ConfigError("autocast", f"unknown autocast {autocast!r}; choose one of {', '.join(AUTOCAST)}")
    if autocast == "fp32":
        return False
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = device.type == "cpu" and cpu_supports_bf16()
    if autocast == "bf16" and not supported:
        raise ConfigError("autocast", f"bf16 was asked for but the {device.type} device does not support it")
    return supported


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _as_chw(image: np.ndarray, in_channels: int | None) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1] < 1 or a.shape[2] < 1:
        raise InputError("image", f"expected an HxW (or CxHxW) image, got shape {np.shape(image)}")
    if in_channels is not None and a.shape[0] != in_channels:
        raise InputError("image", f"the model takes {in_channels} channel(s), the image has {a.shape[0]}")
    if not np.issubdtype(a.dtype, np.floating):
        raise InputError("image", f"expected a float image (the prepared, normalised image), got {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise InputError("image", "image contains NaN or infinite values")
    return a


def _batches(idx: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(idx), size):
        yield idx[i:i + size]


def predict_tiled(model: nn.Module, image: np.ndarray, tile: int = 256, overlap: float = 0.25, batch_size: int = 8,
                  breast_mask: np.ndarray | None = None, mode: str = "sliding", autocast: str = "auto",
                  device: torch.device | str | None = None, sigma_scale: float = 0.125,
                  channels_last: bool = True) -> np.ndarray:
    """Whole-image probabilities ``(C_out, H, W)`` float32 of a segmentation model run tile by tile.

    ``C_out == 1``: sigmoid lesion probability; ``C_out > 1``: softmax, class 0 background. Windows
    without a breast pixel (``breast_mask``) are skipped and read as background. Logits are blended
    (weighted by the Gaussian map) before the activation, as nnU-Net and MONAI do. ``autocast="auto"``
    runs bf16 where the CPU/GPU computes it natively.

    Safe to call from several threads on one model: nothing global or on the model changes during
    a call -- no torch thread count (a process setting: set it once where the process is set up),
    no memory format, and no train/eval switch for a model already in eval mode (one in training
    mode, as during training-time validation, is switched to eval for the call and back).

    ``channels_last``: the tiles are fed in NHWC, oneDNN's native layout on CPU (1.4x faster than NCHW
    in fp32 for the U-Net, and bf16 pays only in NHWC: 2.6x more) -- when the model's weights are
    channels-last too, which is the caller's job, done once: ``Predictor`` converts at load, training
    validation before it validates (``is_channels_last``).
    """
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be at least 1, got {batch_size}")
    img = _as_chw(image, getattr(model, "in_channels", None))
    dev = torch.device(device) if device is not None else _model_device(model)
    if next(model.parameters(), None) is not None and _model_device(model).type != dev.type:
        raise ConfigError("device", f"the model is on {_model_device(model)}, the tiles were asked on {dev}; move the model")
    bf16 = use_bf16(autocast, dev)
    plan = plan_tiles(img.shape[1:], tile, overlap, mode, getattr(model, "size_divisor", 1), breast_mask)
    t, b, lft, r = plan.pad
    canvas = np.pad(img, ((0, 0), (t, b), (lft, r))) if any(plan.pad) else img

    was_training = model.training
    try:
        if was_training:
            model.eval()
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            acc, wsum = _run_windows(model, canvas, plan, batch_size, dev, sigma_scale, channels_last)
    finally:
        if was_training:
            model.train()

    h, w = plan.image_size
    with torch.inference_mode():
        acc, wsum = acc[:, t:t + h, lft:lft + w], wsum[t:t + h, lft:lft + w]
        covered = wsum > 0
        logits = acc / wsum.clamp_min(WEIGHT_FLOOR * WEIGHT_FLOOR)  # uncovered pixels: 0 / tiny = 0, fixed below
        prob = torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)
        if not bool(covered.all()):
            prob *= covered  # skipped windows: no lesion ...
            if prob.shape[0] > 1:
                prob[0] += (~covered).float()  # ... i.e. certain background
        return prob.cpu().numpy()


def is_channels_last(model: nn.Module) -> bool:
    """True when every 4-D weight of ``model`` is stored channels-last (NHWC)."""
    weights = [p for p in model.parameters() if p.ndim == 4]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


def _run_windows(model: nn.Module, canvas: np.ndarray, plan: TilePlan, batch_size: int, dev: torch.device,
                 sigma_scale: float, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the kept windows in batches; return the weighted logit sum and the weight sum on the canvas."""
    th, tw = plan.tile
    hc, wc = plan.canvas_size
    x = torch.from_numpy(np.ascontiguousarray(canvas)).to(dev)
    if plan.blend:
        weight = torch.from_numpy(gaussian_importance_map(th, tw, float(sigma_scale)).copy()).to(dev)
    else:
        weight = torch.ones((th, tw), device=dev)
    wsum = torch.zeros((hc, wc), dtype=torch.float32, device=dev)
    acc: torch.Tensor | None = None
    kept = np.flatnonzero(plan.keep)
    for chunk in _batches(kept, batch_size):
        batch = torch.stack([x[:, y:y + th, xx:xx + tw] for y, xx in plan.starts[chunk]])
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        out = model(batch).float()
        if acc is None:
            acc = torch.zeros((out.shape[1], hc, wc), dtype=torch.float32, device=dev)
        # A handful of windows per image: a Python loop of in-place adds costs microseconds per window.
        for o, (y, xx) in zip(out, plan.starts[chunk]):
            acc[:, y:y + th, xx:xx + tw].addcmul_(o, weight)
            wsum[y:y + th, xx:xx + tw].add_(weight)
    if acc is None:  # nothing to evaluate (no breast at all): only the output channel count is needed
        channels = getattr(model, "num_classes", None)
        if channels is None:
            channels = model(torch.zeros((1, x.shape[0], th, tw), device=dev)).shape[1]
        acc = torch.zeros((int(channels), hc, wc), dtype=torch.float32, device=dev)
    return acc, wsum
