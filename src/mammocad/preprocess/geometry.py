"""Geometry: the ordered, invertible record of what preprocessing did to an image.

Steps are ``flip`` (left-right), ``crop``, ``pad`` and ``resize``. Each maps continuous pixel-edge
coordinates (see ``mammocad.records``) forward and back exactly, and maps arrays (images, masks,
probability maps) forward and back on the pixel grid. This is what lets a prediction made on a
prepared 1024-pixel image become a mask or a DICOM SEG aligned with the original DICOM.

Like MONAI's invertible transforms, but as one serialisable object that travels with the case in
``cases.jsonl`` instead of per-sample metadata dictionaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np


@dataclass
class Geometry:
    source_size: tuple[int, int]  # (height, width) of the original image
    steps: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.source_size = (int(self.source_size[0]), int(self.source_size[1]))

    # ---- building -------------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        """(height, width) after all steps."""
        h, w = self.source_size
        for s in self.steps:
            h, w = s["out_size"]
        return h, w

    def _add(self, step: dict[str, Any]) -> "Geometry":
        step["in_size"] = list(self.size)
        self.steps.append(step)
        return self

    def flip(self) -> "Geometry":
        h, w = self.size
        return self._add({"op": "flip", "out_size": [h, w]})

    def crop(self, x0: int, y0: int, x1: int, y1: int) -> "Geometry":
        h, w = self.size
        x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(f"crop {x0, y0, x1, y1} outside image of size {w}x{h}")
        return self._add({"op": "crop", "box": [x0, y0, x1, y1], "out_size": [y1 - y0, x1 - x0]})

    def pad(self, top: int = 0, bottom: int = 0, left: int = 0, right: int = 0) -> "Geometry":
        h, w = self.size
        t, b, lft, r = (int(v) for v in (top, bottom, left, right))
        if min(t, b, lft, r) < 0:
            raise ValueError("padding must be non-negative")
        return self._add({"op": "pad", "tblr": [t, b, lft, r], "out_size": [h + t + b, w + lft + r]})

    def resize(self, height: int, width: int) -> "Geometry":
        if height < 1 or width < 1:
            raise ValueError("resize target must be at least 1x1")
        return self._add({"op": "resize", "out_size": [int(height), int(width)]})

    # ---- points and boxes -----------------------------------------------------------------
    @staticmethod
    def _map_points(step: dict[str, Any], pts: np.ndarray, inverse: bool) -> np.ndarray:
        pts = pts.copy()
        op = step["op"]
        ih, iw = step["in_size"]
        oh, ow = step["out_size"]
        if op == "flip":
            pts[:, 0] = iw - pts[:, 0]
        elif op == "crop":
            x0, y0 = step["box"][:2]
            sign = 1 if inverse else -1
            pts[:, 0] += sign * x0
            pts[:, 1] += sign * y0
        elif op == "pad":
            t, _, lft, _ = step["tblr"]
            sign = -1 if inverse else 1
            pts[:, 0] += sign * lft
            pts[:, 1] += sign * t
        elif op == "resize":
            sx, sy = ow / iw, oh / ih
            if inverse:
                pts[:, 0] /= sx
                pts[:, 1] /= sy
            else:
                pts[:, 0] *= sx
                pts[:, 1] *= sy
        return pts

    def forward_points(self, points: Any) -> np.ndarray:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        for s in self.steps:
            pts = self._map_points(s, pts, inverse=False)
        return pts

    def inverse_points(self, points: Any) -> np.ndarray:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        for s in reversed(self.steps):
            pts = self._map_points(s, pts, inverse=True)
        return pts

    def _map_boxes(self, boxes: Any, inverse: bool) -> np.ndarray:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        corners = np.stack([b[:, [0, 1]], b[:, [2, 1]], b[:, [0, 3]], b[:, [2, 3]]], axis=1).reshape(-1, 2)
        mapped = (self.inverse_points if inverse else self.forward_points)(corners).reshape(-1, 4, 2)
        return np.concatenate([mapped.min(axis=1), mapped.max(axis=1)], axis=1)

    def forward_boxes(self, boxes: Any) -> np.ndarray:
        return self._map_boxes(boxes, inverse=False)

    def inverse_boxes(self, boxes: Any) -> np.ndarray:
        return self._map_boxes(boxes, inverse=True)

    # ---- arrays ---------------------------------------------------------------------------
    @staticmethod
    def _resize_array(a: np.ndarray, height: int, width: int, kind: str) -> np.ndarray:
        if a.shape[:2] == (height, width):
            return a
        if kind == "nearest":  # label maps: centre-aligned nearest neighbour
            out = cv2.resize(a, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
        elif kind == "mask":  # binary masks: area/linear on the fraction covered, then threshold
            on = a != 0  # 0/1 and 0/255 masks alike (a 0/255 uint8 mask must not become 0/1)
            f = cv2.resize(on.astype(np.float32), (width, height), interpolation=_interp(a.shape, height, width))
            out = f >= 0.5
            if a.dtype != np.bool_:
                out = out.astype(a.dtype) * a.max()
        else:
            out = cv2.resize(a.astype(np.float32) if a.dtype == np.bool_ else a, (width, height),
                             interpolation=_interp(a.shape, height, width))
        if out.ndim == a.ndim - 1:  # cv2 drops a trailing channel axis of length 1
            out = out[..., None]
        return out

    def _apply(self, step: dict[str, Any], a: np.ndarray, kind: str, inverse: bool, fill: float) -> np.ndarray:
        op = step["op"]
        ih, iw = step["in_size"]
        oh, ow = step["out_size"]
        if op == "flip":
            return np.ascontiguousarray(a[:, ::-1])
        if op == "crop":
            x0, y0, x1, y1 = step["box"]
            if not inverse:
                return a[y0:y1, x0:x1]
            out = np.full((ih, iw) + a.shape[2:], fill, dtype=a.dtype)
            out[y0:y1, x0:x1] = a
            return out
        if op == "pad":
            t, b, lft, r = step["tblr"]
            if inverse:
                return a[t:t + ih, lft:lft + iw]
            pads = ((t, b), (lft, r)) + ((0, 0),) * (a.ndim - 2)
            return np.pad(a, pads, mode="constant", constant_values=fill)
        if op == "resize":
            h, w = (ih, iw) if inverse else (oh, ow)
            return self._resize_array(a, h, w, kind)
        raise ValueError(f"unknown geometry step {op!r}")

    def forward_array(self, a: np.ndarray, kind: str = "image", fill: float = 0) -> np.ndarray:
        """Map an array on the source grid to the output grid. ``kind``: image | mask | nearest."""
        if tuple(a.shape[:2]) != self.source_size:
            raise ValueError(f"array of shape {a.shape[:2]} does not match source size {self.source_size}")
        for s in self.steps:
            a = self._apply(s, a, kind, inverse=False, fill=fill)
        return np.ascontiguousarray(a)

    def inverse_array(self, a: np.ndarray, kind: str = "image", fill: float = 0) -> np.ndarray:
        """Map an array on the output grid back to the source grid (regions cropped away get ``fill``)."""
        if tuple(a.shape[:2]) != self.size:
            raise ValueError(f"array of shape {a.shape[:2]} does not match geometry output size {self.size}")
        for s in reversed(self.steps):
            a = self._apply(s, a, kind, inverse=True, fill=fill)
        return np.ascontiguousarray(a)

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"source_size": list(self.source_size), "steps": [dict(s) for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Geometry":
        return cls(source_size=tuple(d["source_size"]), steps=[dict(s) for s in d["steps"]])

    @property
    def flipped(self) -> bool:
        return sum(s["op"] == "flip" for s in self.steps) % 2 == 1


def _interp(shape: tuple[int, ...], height: int, width: int) -> int:
    """INTER_AREA when shrinking (no aliasing), INTER_LINEAR when enlarging."""
    return cv2.INTER_AREA if height * width < shape[0] * shape[1] else cv2.INTER_LINEAR
