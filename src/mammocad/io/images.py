"""Plain image files (PNG 8/16-bit, PGM, JPEG, TIFF) and the format-independent ``read_image``.

Pixels keep their stored precision (uint8 / uint16 / float32); colour images whose channels are
equal (BUSI, screenshots) become single-channel, other colour images are converted to luminance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mammocad.errors import InputError
from mammocad.io.atomic import atomic_write_bytes

PLAIN_SUFFIXES = {".png", ".pgm", ".pnm", ".ppm", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ""}


@dataclass
class LoadedImage:
    """A decoded 2-D image and what we know about it.

    ``pixels`` is uint8/uint16 as stored for plain files, float32 in [0, 1] (display values after
    the DICOM VOI and inversion) for DICOM. ``valid`` is False on pixel padding (DICOM
    PixelPaddingValue), which is not image content. ``meta`` holds modality, laterality, view,
    pixel spacing, UIDs, bit depth, the VOI choice made, ...
    """

    pixels: np.ndarray
    path: str
    meta: dict[str, Any] = field(default_factory=dict)
    valid: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])

    def as_float(self) -> np.ndarray:
        """Pixels as float32 in [0, 1], scaled by the stored bit depth (not by the data range)."""
        p = self.pixels
        if np.issubdtype(p.dtype, np.floating):
            return p.astype(np.float32, copy=False)
        bits = int(self.meta.get("bits_stored") or (8 if p.dtype == np.uint8 else 16))
        return np.clip(p.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)


def is_dicom_file(path: Path) -> bool:
    """True for a Part-10 file ('DICM' at byte 128), and for .dcm files without a preamble."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    return path.suffix.lower() in (".dcm", ".dicom", ".dic") or (path.suffix == "" and len(head) > 8)


def read_plain_image(path: str | Path) -> LoadedImage:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            arr = tifffile.imread(path)
        except Exception as exc:  # tifffile raises many types
            raise InputError(path, f"unreadable TIFF ({exc})") from None
        if arr.size == 0:  # tifffile returns an empty array (with a logged warning) for a broken IFD
            raise InputError(path, "unreadable TIFF (no pixel data)")
    else:
        data = np.fromfile(path, dtype=np.uint8)
        arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if arr is None:
            raise InputError(path, "unreadable or empty image file")
    arr = _to_gray(np.asarray(arr), path)
    if arr.dtype not in (np.uint8, np.uint16, np.float32):
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        elif arr.min() >= 0 and arr.max() <= 65535:
            arr = arr.astype(np.uint16)
        else:
            raise InputError(path, f"unsupported pixel type {arr.dtype}")
    if arr.size == 0:
        raise InputError(path, "image has no pixels")
    bits = 8 if arr.dtype == np.uint8 else 16
    meta = {"format": suffix.lstrip(".") or "unknown", "bits_stored": bits, "rows": arr.shape[0], "columns": arr.shape[1]}
    return LoadedImage(pixels=arr, path=str(path), meta=meta)


def _to_gray(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        rgb = arr[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            return np.ascontiguousarray(rgb[..., 0])
        # OpenCV decodes to BGR(A); TIFF is RGB. Luminance weights differ only in R/B order.
        code = cv2.COLOR_RGB2GRAY if path.suffix.lower() in (".tif", ".tiff") else cv2.COLOR_BGR2GRAY
        return cv2.cvtColor(np.ascontiguousarray(rgb), code)
    if arr.ndim == 3 and arr.shape[2] == 1:
        return arr[..., 0]
    raise InputError(path, f"expected a 2-D greyscale or colour image, got shape {arr.shape}")


def read_image(path: str | Path, **dicom_options: Any) -> LoadedImage:
    """Read any supported image; DICOM options (``voi``, ``frame``) are passed to the DICOM reader."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, expected an image file")
    if path.suffix.lower() in PLAIN_SUFFIXES:
        return read_plain_image(path)
    if is_dicom_file(path):
        from mammocad.io.dicom import read_dicom

        return read_dicom(path, **dicom_options)
    raise InputError(path, f"unsupported file type {path.suffix!r}")


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8/uint16 greyscale or BGR(A) array (bool is written as 0/255)."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if a.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG needs uint8 or uint16 pixels, got {a.dtype}")
    ok, buf = cv2.imencode(".png", a)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Write a PNG atomically (no half-written file survives a crash)."""
    atomic_write_bytes(path, encode_png(array))


def float_to_uint16(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] floats to the full 16-bit range (the prepared-image encoding)."""
    return np.round(np.clip(pixels, 0.0, 1.0) * 65535.0).astype(np.uint16)
