"""Overlays for people to look at: contours of lesion masks drawn on an 8-bit copy of the image."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

# BGR colours (OpenCV): benign green, malignant red, unknown / lesion yellow.
COLOURS = {"benign": (60, 200, 60), "malignant": (40, 40, 230), "unknown": (0, 215, 255), "lesion": (0, 215, 255)}


def to_display_8bit(pixels: np.ndarray) -> np.ndarray:
    """Float [0,1] or integer image -> uint8 for display (percentile stretch for non-float data)."""
    p = np.asarray(pixels)
    if np.issubdtype(p.dtype, np.floating):
        return np.round(np.clip(p, 0, 1) * 255).astype(np.uint8)
    lo, hi = np.percentile(p, (0.5, 99.5))
    return np.round(np.clip((p.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def draw_overlay(pixels: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[str] = (),
                 texts: Sequence[str] = (), thickness: int | None = None) -> np.ndarray:
    """BGR uint8 image with each mask's contour drawn in its label's colour and an optional text."""
    gray = to_display_8bit(pixels)
    canvas = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    h, w = gray.shape
    thick = thickness or max(1, round(max(h, w) / 500))
    for i, mask in enumerate(masks):
        label = labels[i] if i < len(labels) else "lesion"
        colour = COLOURS.get(label, COLOURS["lesion"])
        contours, _ = cv2.findContours(np.asarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, colour, thick, lineType=cv2.LINE_AA)
        if i < len(texts) and texts[i] and contours:
            x, y, _, _ = cv2.boundingRect(np.concatenate(contours))
            scale = max(0.4, max(h, w) / 1500)
            cv2.putText(canvas, texts[i], (x, max(y - 4, 12)), cv2.FONT_HERSHEY_SIMPLEX, scale, colour,
                        max(1, thick // 2), cv2.LINE_AA)
    return canvas
