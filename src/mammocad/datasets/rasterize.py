"""Turn a Lesion's outline (mask file, polygon, circle, box) into a boolean mask on an image grid."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from mammocad.errors import AnnotationError
from mammocad.records import Lesion

log = logging.getLogger(__name__)


def _fill_polygon(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre (c + 0.5, r + 0.5) lies inside the polygon (edge coordinates).

    The pixel-centre rule is the one the circle branch uses and the one COCO's rasteriser follows
    (a 10x20 rectangle covers exactly 200 pixels). cv2.fillPoly was not used: it also paints every
    pixel the outline touches, which inflated areas by about half the perimeter (11x21 for 10x20).
    """
    from matplotlib.path import Path as PolygonPath  # lazy: matplotlib's import is slow

    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    c0, r0 = max(int(np.floor(points[:, 0].min())), 0), max(int(np.floor(points[:, 1].min())), 0)
    c1, r1 = min(int(np.ceil(points[:, 0].max())), w), min(int(np.ceil(points[:, 1].max())), h)
    if c1 <= c0 or r1 <= r0:
        return mask
    rr, cc = np.mgrid[r0:r1, c0:c1]
    centres = np.column_stack([cc.ravel() + 0.5, rr.ravel() + 0.5])
    mask[r0:r1, c0:c1] = PolygonPath(points).contains_points(centres).reshape(rr.shape)
    return mask


def resize_mask_to(mask: np.ndarray, shape: tuple[int, int], source: str | Path) -> np.ndarray:
    """Nearest-neighbour resize of a mask whose size differs from the image's (CBIS-DDSM ROI masks).

    Refuses when the aspect ratios differ by more than 1%: then the mask belongs to another image.
    """
    h, w = shape
    mh, mw = mask.shape[:2]
    if (mh, mw) == (h, w):
        return mask
    ratio = (mw / mh) / (w / h)
    if abs(ratio - 1.0) > 0.01:
        raise AnnotationError(source, f"mask size {mw}x{mh} does not match image size {w}x{h} (aspect ratios differ by {abs(ratio - 1) * 100:.1f}%)")
    log.warning("%s: mask size %dx%d differs from image size %dx%d; resized (nearest neighbour)", source, mw, mh, w, h)
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST_EXACT).astype(mask.dtype)


def rasterize_lesion(lesion: Lesion, shape: tuple[int, int]) -> np.ndarray | None:
    """Boolean mask of the lesion on an image of ``shape`` (rows, cols); None without geometry."""
    h, w = shape
    if lesion.mask_path is not None:
        from mammocad.io.images import read_image

        img = read_image(lesion.mask_path)
        label_value = lesion.attributes.get("label_value")
        if label_value is not None:  # one lesion of a label mask (folder adapter, mask_mode=instances)
            mask = img.pixels == label_value
        else:
            mask = img.pixels > (0.5 if np.issubdtype(img.pixels.dtype, np.floating) else 0)
        mask = resize_mask_to(mask, shape, lesion.mask_path)
        return mask
    canvas = np.zeros((h, w), dtype=np.uint8)
    if lesion.polygon is not None:
        pts = np.asarray(lesion.polygon, dtype=np.float64)
        if len(pts) < 3:
            raise AnnotationError(None, "polygon with fewer than 3 points")
        return _fill_polygon(pts, (h, w))
    if lesion.circle is not None:
        cx, cy, r = lesion.circle
        yy, xx = np.ogrid[:h, :w]
        return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r**2
    if lesion.box is not None:
        x0, y0, x1, y1 = lesion.box
        c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c1, r1 = min(int(np.ceil(x1)), w), min(int(np.ceil(y1)), h)
        canvas[r0:r1, c0:c1] = 1
        return canvas.astype(bool)
    return None


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """[x0, y0, x1, y1] (edge coordinates, exclusive end) of a boolean mask; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)
