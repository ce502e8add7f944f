"""Plain image files (PNG 8/16-bit, PGM, JPEG, TIFF) and the format-independent ``read_image``.

Pixels keep their stored precision (uint8 / uint16 / float32); colour images whose channels are
equal (BUSI, screenshots) become single-channel, other colour images are converted to luminance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mammocad.errors import InputError
from mammocad.io.atomic import atomic_write_bytes
from mammocad.io.discover import DICOM_SUFFIXES, PLAIN_SUFFIXES, image_kind, is_dicom_file

__all__ = ["DEFAULT_MAX_PIXELS", "DICOM_SUFFIXES", "LoadedImage", "PLAIN_SUFFIXES", "check_pixel_limit", "encode_png",
           "float_to_uint16", "is_dicom_file", "read_image", "read_plain_image", "write_png"]

# Inputs larger than this are refused before decoding: decoding and preprocessing take ~20 bytes a
# pixel (a 20000x20000 PNG took 7.6 GB). The largest mammography detectors (FFDM, CR) are about
# 5000x6000 = 30 megapixels, so the default admits every real mammogram with room to spare.
DEFAULT_MAX_PIXELS = 100_000_000


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


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS, **dicom_options: Any) -> LoadedImage:
    """Read any supported image; DICOM options (``voi``, ``frame``) are passed to the DICOM reader.
    An image of more than ``max_pixels`` pixels (None: no limit) is refused from its header, before
    any pixel is decoded."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, expected an image file")
    if path.suffix.lower() in PLAIN_SUFFIXES:
        check_pixel_limit(path, max_pixels, dicom=False)
        return read_plain_image(path)
    try:
        kind = image_kind(path)
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from None
    if kind == "dicom":
        from mammocad.io.dicom import read_dicom

        check_pixel_limit(path, max_pixels, dicom=True)
        return read_dicom(path, **dicom_options)
    raise InputError(path, f"unsupported file type {path.suffix!r}" if path.suffix else
                     "unsupported file type: no image suffix and no DICOM header")


def check_pixel_limit(path: Path, max_pixels: int | None, dicom: bool) -> None:
    """Raise ``InputError`` when the header of ``path`` declares more than ``max_pixels`` pixels
    (all frames of a DICOM file). A header that cannot be read passes: the decoder then reports
    the file in its own words."""
    if max_pixels is None:
        return
    size = _dicom_size(path) if dicom else _plain_size(path)
    if size is not None and size[0] > max_pixels:
        n, what = size
        raise InputError(path, f"{what} = {n / 1e6:.1f} megapixels, over the limit of {max_pixels / 1e6:g} megapixels "
                               "(raise it with --max-pixels)")


def _size(rows: int, columns: int, frames: int = 1) -> tuple[int, str]:
    """(pixel count, "WxH pixels [x N frames]")."""
    what = f"{columns}x{rows} pixels" + (f" x {frames} frames" if frames > 1 else "")
    return rows * columns * frames, what


def _plain_size(path: Path) -> tuple[int, str] | None:
    """Pixel count and size from a plain file's header: tifffile for TIFF (the pages ``imread``
    would read), Pillow for the others (``Image.open`` reads the header only)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                page = tif.pages[0]
                samples = int(getattr(page, "samplesperpixel", 1) or 1)
                total = int(np.prod(series.shape, dtype=np.int64)) // samples
                rows, columns = int(page.imagelength), int(page.imagewidth)
        except Exception:  # tifffile raises many types on broken files; the reader reports them
            return None
        return _size(rows, columns, max(1, total // max(1, rows * columns)))
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                columns, rows = im.size
    except Image.DecompressionBombError as exc:
        # Pillow refuses over ~179 MP on its own and names the size only in its message
        found = re.search(r"\((\d+) pixels\)", str(exc))
        return (int(found.group(1)), f"{found.group(1)} pixels") if found else None
    except Exception:  # not identifiable by Pillow: OpenCV decides (and reports) when reading
        return None
    return _size(int(rows), int(columns))


def _dicom_size(path: Path) -> tuple[int, str] | None:
    """Pixel count and size from a DICOM header (pixel data not read)."""
    import pydicom

    from mammocad.io.dicom import _quiet_pydicom

    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True,
                                 specific_tags=["Rows", "Columns", "NumberOfFrames"])
            return _size(int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames") or 1))
    except Exception:  # a broken header: read_dicom says what is wrong with it
        return None


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
