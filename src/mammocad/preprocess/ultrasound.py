"""Ultrasound scan area: the image region inside the fan/rectangle, without the black frame and the
text, scale bars and logos that scanners print beside it."""

from __future__ import annotations

import cv2
import numpy as np

from mammocad.errors import InputError
from mammocad.preprocess.breast import largest_component

MIN_SCAN_FRACTION = 0.05  # a scan area smaller than this fraction of the screen is not one
RECTANGLE_FILL = 0.85  # hull covering this much of its bounding box: a rectangle, not a fan


def scan_area_mask_small(small: np.ndarray, source: str) -> np.ndarray:
    """Boolean scan-area mask on the small uint8 copy (stretched to 0..255).

    Non-black pixels (> 2% of the range, after a median blur that removes isolated specks) are
    closed so that dark but not black tissue (cysts, shadowing) joins the speckle around it; the
    largest component is the scan area, and its convex hull is the mask: fans and rectangles are
    convex, so the hull also restores anechoic lesions and deep shadows at the area's border that
    thresholding lost. Text and bars beside the scan area are separate components and drop out.
    """
    long = max(small.shape)
    blurred = cv2.medianBlur(small, 3) if min(small.shape) >= 3 else small
    binary = (blurred > 5).view(np.uint8)
    r = max(1, long // 100)
    closed = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    # Opening with a larger element detaches text touching the area's edge before picking it.
    r2 = max(1, long // 60)
    opened = cv2.morphologyEx(closed, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r2 + 1, 2 * r2 + 1)))
    area = largest_component(opened if opened.any() else closed)
    if area.sum() < MIN_SCAN_FRACTION * area.size:
        raise InputError(source, "no ultrasound scan area found (no non-black region larger than 5% of the image)")
    pts = cv2.findNonZero(area.view(np.uint8))
    hull = cv2.convexHull(pts)
    mask = np.zeros(small.shape, dtype=np.uint8)
    cv2.fillConvexPoly(mask, hull, 1)
    x, y, w, h = cv2.boundingRect(pts)
    if mask.sum() >= RECTANGLE_FILL * w * h:
        # A rectangular (linear-probe) image: the hull only nicks dark deep corners; keep them.
        mask[y:y + h, x:x + w] = 1
    return mask.astype(bool) | area
