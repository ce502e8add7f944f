"""Turn a Lesion's outline (mask file, polygon, circle, box) into a boolean mask on an image grid."""

from __future__ import annotations

import logging
import math
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


def read_mask_values(path: str | Path) -> np.ndarray:
    """The STORED pixel values of a mask file (2-D), never display values.

    ``read_image`` is for pictures: it applies a DICOM's VOI window and inverts MONOCHROME1, which
    can empty a 16-bit 0/255 mask (255 is near black in a 0..65535 window) or flip one. Mask
    DICOMs are therefore decoded with pydicom's ``pixel_array`` (the stored values); plain images
    (PNG, TIFF, ...) hold their values as stored already and go through ``read_image``.
    """
    from mammocad.io.images import PLAIN_SUFFIXES, is_dicom_file, read_image

    path = Path(path)
    if path.suffix.lower() in PLAIN_SUFFIXES or not path.is_file() or not is_dicom_file(path):
        return read_image(path).pixels  # also raises the file-not-found / unsupported-type errors
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        if n_frames > 1:
            raise AnnotationError(path, f"mask has {n_frames} frames; expected a single-frame mask")
        pixels = np.asarray(ds.pixel_array)
    except AnnotationError:
        raise
    except Exception as exc:  # pydicom raises many types for broken or non-image files
        raise AnnotationError(path, f"unreadable DICOM mask ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if pixels.ndim == 3 and int(ds.get("SamplesPerPixel") or 1) > 1:  # colour mask: any channel set
        pixels = pixels.max(axis=-1)
    if pixels.ndim != 2 or pixels.size == 0:
        raise AnnotationError(path, f"mask pixel array has shape {pixels.shape}; expected rows x columns")
    return pixels


def read_mask(path: str | Path) -> np.ndarray:
    """Boolean mask of a mask file: stored value > 0 (see ``read_mask_values``)."""
    return read_mask_values(path) > 0


def _fill_circle(cx: float, cy: float, r: float, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies in the disc, evaluated on the disc's bounding box only (two full
    HxW float64 grids would take ~220 MB on a 13.6-megapixel mammogram). The one-pixel margin makes
    sure no pixel the full-grid formula would include is outside the box; the formula itself is
    the full-grid one, so the result is identical."""
    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    reach = abs(r)
    c0, c1 = max(math.floor(cx - reach - 0.5) - 1, 0), min(math.ceil(cx + reach - 0.5) + 2, w)
    r0, r1 = max(math.floor(cy - reach - 0.5) - 1, 0), min(math.ceil(cy + reach - 0.5) + 2, h)
    if c1 <= c0 or r1 <= r0:
        return mask
    yy, xx = np.ogrid[r0:r1, c0:c1]
    mask[r0:r1, c0:c1] = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r**2
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
        label_value = lesion.attributes.get("label_value")
        if label_value is not None:  # one lesion of a label mask (folder adapter, mask_mode=instances)
            mask = read_mask_values(lesion.mask_path) == label_value
        else:
            mask = read_mask(lesion.mask_path)
        return resize_mask_to(mask, shape, lesion.mask_path)
    if lesion.polygon is not None:
        pts = np.asarray(lesion.polygon, dtype=np.float64)
        if len(pts) < 3:
            raise AnnotationError(None, "polygon with fewer than 3 points")
        return _fill_polygon(pts, (h, w))
    if lesion.circle is not None:
        return _fill_circle(*lesion.circle, (h, w))
    if lesion.box is not None:
        # Pixel-centre rule, as for polygons and circles: pixel c is in when x0 <= c + 0.5 < x1,
        # so a box and the equal polygon give the same mask.
        x0, y0, x1, y1 = lesion.box
        c0, r0 = max(math.ceil(x0 - 0.5), 0), max(math.ceil(y0 - 0.5), 0)
        c1, r1 = min(math.ceil(x1 - 0.5), w), min(math.ceil(y1 - 0.5), h)
        mask = np.zeros((h, w), dtype=bool)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
        return mask
    return None


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """[x0, y0, x1, y1] (edge coordinates, exclusive end) of a boolean mask; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)
