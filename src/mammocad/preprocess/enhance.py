"""Intensity: conversion to [0, 1], normalisation to the breast, CLAHE at more than 8 bits."""

from __future__ import annotations

import cv2
import numpy as np

# CLAHE works on this many grey levels (12 bits): the depth of most mammography detectors, far
# beyond 8 bits, yet coarse enough that each level holds several pixels of a tile (see clahe).
CLAHE_LEVELS = 4096
_CV_HIST_SIZE_16U = 65536  # OpenCV's CLAHE histogram size for uint16 input, whatever the data range


def to_unit_float(pixels: np.ndarray, bits_stored: int | None = None) -> np.ndarray:
    """float32 in [0, 1], scaled by the stored bit depth like ``LoadedImage.as_float``."""
    if np.issubdtype(pixels.dtype, np.floating):
        return np.clip(pixels, 0.0, 1.0, dtype=np.float32)
    bits = int(bits_stored or (8 if pixels.dtype == np.uint8 else 16))
    out = pixels.astype(np.float32) * np.float32(1.0 / (2**bits - 1))
    return np.minimum(out, 1.0, out=out)


# Default top of the intensity scale: the 99.5th percentile of the breast pixels (see below).
DEFAULT_INTENSITY_PERCENTILE = 99.5


def normalise_to_breast(pixels: np.ndarray, mask: np.ndarray, percentile: float = DEFAULT_INTENSITY_PERCENTILE) -> np.ndarray:
    """Stretch so that the ``percentile``-th percentile of the breast pixels is 1, clipping the few
    above it to 1 (in place; background stays 0). ``percentile=100`` divides by the maximum.

    Why only the top end: a 12-bit mammogram stored in a 16-bit PNG otherwise arrives as values in
    [0, 0.06], and DICOM VOI windows differ between vendors; dividing by a top value puts every
    source on the same scale. The low end is left at 0: shifting it would push the faint skin-line
    fat into the background. The top is measured on the output grid, inside the breast mask, so
    labels outside the mask cannot set it.

    Why a percentile and not the maximum: a surgical clip, a skin marker (BB) or a single hot
    pixel inside the breast is far brighter than tissue, and dividing by it darkens the whole
    breast (a clip twice as bright as tissue halves every tissue value). Such objects cover well
    under 0.5% of the breast at any resolution (of a ~150 cm^2 compressed breast, a 3 x 1 mm clip
    is ~0.02%, a 4 mm skin-marker ball ~0.1%), so the 99.5th percentile lies in tissue and ignores
    them. The price is that the brightest 0.5% of the breast saturates at 1; calcifications among
    them stay the brightest structures around them, i.e. still visible, only without inner contrast.
    """
    if not mask.any():
        return pixels
    values = pixels[mask]
    top = float(values.max()) if percentile >= 100 else float(np.percentile(values, percentile))
    if top > 0:
        pixels *= np.float32(1.0 / top)
        np.minimum(pixels, 1.0, out=pixels)
    return pixels


def clahe(pixels: np.ndarray, clip: float = 2.0, grid: int = 8) -> np.ndarray:
    """CLAHE on float [0, 1] pixels at 12-bit depth; returns float32 [0, 1].

    OpenCV's CLAHE accepts uint16 but always uses a 65536-bin histogram, an integer per-bin clip
    limit ``int(clip * tile_area / 65536)`` (0, raised to 1, for any realistic tile: ``clip`` would
    be ignored) and spreads the clipped excess over all 65536 bins. So we quantise to CLAHE_LEVELS
    levels spaced evenly over the whole uint16 range (level k -> k * 16) and multiply the clip by
    that spacing: each occupied bin then gets the textbook limit ``clip * tile_area / levels`` and
    the excess is spread evenly over the data range, i.e. textbook CLAHE with ``clip`` on 4096
    levels (the 8-bit behaviour users know) whose output keeps far more than 256 grey levels.
    Going through uint8 instead would throw away the extra bit depth of digital mammograms.
    """
    step = _CV_HIST_SIZE_16U // CLAHE_LEVELS
    q = np.round(np.clip(pixels, 0.0, 1.0) * (CLAHE_LEVELS - 1)).astype(np.uint16)
    q *= np.uint16(step)
    h, w = q.shape
    g = max(1, min(int(grid), h, w))
    engine = cv2.createCLAHE(clipLimit=float(clip) * step, tileGridSize=(g, g))
    out = engine.apply(q).astype(np.float32)
    out *= np.float32(1.0 / (_CV_HIST_SIZE_16U - 1))  # the LUT spans the full uint16 range
    return out
