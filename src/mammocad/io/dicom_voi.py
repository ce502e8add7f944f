"""The DICOM grayscale display pipeline: stored values -> Modality LUT / rescale -> VOI -> inversion.

The arithmetic of each step is pydicom's (``apply_modality_lut``, ``apply_voi``,
``apply_windowing``: LINEAR, LINEAR_EXACT, SIGMOID). What is added here and not in pydicom:

* an explicit, recorded choice between the VOI LUT Sequence items and the windows (pydicom
  silently prefers the first LUT, which hides GH133's SIGMOID windows);
* speed: for BitsStored <= 16 the whole chain is evaluated once on every possible stored value
  (at most 65536) to give one float32 table, which is then applied to the image with ``np.take``
  -- one pass, no float64 copy of a 14-megapixel mammogram;
* normalisation of each step's output range to [0, 1], and inversion AFTER the VOI.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from mammocad.errors import ConfigError, DicomError

VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
MAX_TABLE_BITS = 16  # above this the chain is applied to the pixels directly


@dataclass(frozen=True)
class VoiChoice:
    """One VOI transform: ``kind`` lut | window | none | auto, as recorded in ``meta["voi"]``."""

    kind: str
    index: int | None = None
    explanation: str | None = None
    function: str | None = None
    center: float | None = None
    width: float | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.index}" if self.index is not None else self.kind

    def as_meta(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


def _present(ds: Dataset, keyword: str) -> bool:
    """True when the element exists AND has a value (broken files carry empty elements)."""
    return keyword in ds and ds[keyword].value not in (None, "", b"")


def _multi(value: Any) -> list:
    """A DICOM value as a list, whatever its VM (pydicom gives a scalar for VM 1)."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def drop_empty_luts(ds: Dataset) -> list[str]:
    """Remove LUT items without LUTDescriptor/LUTData and empty VOI/rescale elements; return notes.

    Some writers emit empty items (pylibjpeg-data JPEGLosslessP14SV1_1s_1f_u_16_16.dcm); pydicom
    then raises TypeError. An empty item carries no transform, so ignoring it is the honest reading.
    """
    notes = []
    for seq in ("ModalityLUTSequence", "VOILUTSequence"):
        if seq not in ds:
            continue
        items = list(ds[seq].value or [])
        good = [it for it in items if _present(it, "LUTDescriptor") and _present(it, "LUTData")]
        if len(good) != len(items):
            notes.append(f"ignored {len(items) - len(good)} empty {seq} item(s)")
        if good:
            ds[seq].value = good
        else:
            del ds[seq]
    for kw in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "VOILUTFunction", "PresentationLUTShape"):
        if kw in ds and not _present(ds, kw):
            del ds[kw]
    if _present(ds, "WindowCenter") != _present(ds, "WindowWidth"):
        notes.append("ignored WindowCenter/WindowWidth: only one of them is present")
        for kw in ("WindowCenter", "WindowWidth"):
            if kw in ds:
                del ds[kw]
    if _present(ds, "RescaleSlope") != _present(ds, "RescaleIntercept"):
        notes.append("ignored RescaleSlope/RescaleIntercept: only one of them is present")
    return notes


def file_function(ds: Dataset) -> str:
    return str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()


def voi_options(ds: Dataset) -> list[VoiChoice]:
    """The VOI transforms the file offers: every VOI LUT Sequence item, then every window."""
    options = []
    for i, item in enumerate(ds.get("VOILUTSequence") or []):
        options.append(VoiChoice("lut", i, str(item.get("LUTExplanation") or "") or None))
    if _present(ds, "WindowCenter") and _present(ds, "WindowWidth"):
        centers, widths = _multi(ds.WindowCenter), _multi(ds.WindowWidth)
        explanations = _multi(ds.get("WindowCenterWidthExplanation"))
        for i in range(min(len(centers), len(widths))):
            expl = str(explanations[i]) if i < len(explanations) and explanations[i] else None
            options.append(VoiChoice("window", i, expl, file_function(ds), float(centers[i]), float(widths[i])))
    return options


def choose_voi(ds: Dataset, voi: int | str | None, voi_function: str | None, source: str) -> tuple[VoiChoice, list[str]]:
    """Resolve the ``voi`` selector against the file's options (see ``read_dicom`` for the forms)."""
    function = None
    if voi_function is not None:
        function = str(voi_function).strip().upper()
        if function not in VOI_FUNCTIONS:
            raise ConfigError("voi_function", f"{voi_function!r} is not one of {', '.join(VOI_FUNCTIONS)}")
    options = voi_options(ds)
    luts = [o for o in options if o.kind == "lut"]
    windows = [o for o in options if o.kind == "window"]
    available = ", ".join(o.name + (f" ({o.explanation})" if o.explanation else "") for o in options) or "none"

    kind: str | None = None
    selector: int | str | None
    if voi is None:
        kind, selector = "none", None
    elif isinstance(voi, str):
        head, colon, rest = voi.strip().partition(":")
        if head.lower() in ("none", "auto") and not colon:
            kind, selector = head.lower(), None
        elif head.lower() in ("lut", "window"):
            kind, selector = head.lower(), rest.strip() or "0"
        else:
            selector = voi.strip()
        if isinstance(selector, str) and selector.lstrip("-").isdigit():
            selector = int(selector)
    elif isinstance(voi, (int, np.integer)) and not isinstance(voi, bool):
        selector = int(voi)
    else:
        raise ConfigError("voi", f"expected an index, an explanation, 'lut:N', 'window:N', 'auto' or None, got {voi!r}")

    if kind in ("none", "auto"):
        if function is not None:
            raise ConfigError("voi_function", f"applies to windows only, not to voi={voi!r}")
        return VoiChoice(kind), []
    if kind is None:
        if isinstance(selector, str):  # an explanation, LUT items first unless a function asks for windows
            pool = windows if function is not None else options
        else:  # an index: into the LUT items when present (pydicom's convention), else the windows
            kind = "window" if (function is not None or not luts) else "lut"
            if not options and selector == 0 and function is None:
                return VoiChoice("none"), ["file has no VOI LUT or window: values scaled from the full modality range"]
    if kind is not None:
        pool = luts if kind == "lut" else windows
    if kind == "lut" and function is not None:
        raise ConfigError("voi_function", "applies to windows only, not to a VOI LUT Sequence item")

    if isinstance(selector, str):
        found = [o for o in pool if o.explanation and o.explanation.strip().lower() == selector.lower()]
        if not found:
            raise DicomError(source, f"no VOI {voi!r} in the file; available: {available}")
        choice = found[0]
    elif not 0 <= selector < len(pool):
        raise DicomError(source, f"no VOI {kind} {selector} in the file; available: {available}")
    else:
        choice = pool[selector]
    if choice.kind == "window" and function is not None:
        choice = VoiChoice("window", choice.index, choice.explanation, function, choice.center, choice.width)
    return choice, []


def inversion(ds: Dataset) -> tuple[bool, list[str]]:
    """Whether display values must be inverted (bright = dense).

    PresentationLUTShape, when present, decides (INVERSE = invert, IDENTITY = do not), so
    MONOCHROME1 + INVERSE is inverted once, not twice; without it MONOCHROME1 means invert.
    """
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    shape = str(ds.get("PresentationLUTShape") or "").strip().upper()
    if shape == "INVERSE":
        return True, []
    if shape == "IDENTITY":
        notes = ["PresentationLUTShape IDENTITY with MONOCHROME1: not inverted"] if photometric == "MONOCHROME1" else []
        return False, notes
    notes = [f"unknown PresentationLUTShape {shape!r} ignored"] if shape else []
    if "PresentationLUTSequence" in ds:
        notes.append("Presentation LUT Sequence ignored")
    return photometric == "MONOCHROME1", notes


def stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _window_range(ds: Dataset, index: int) -> tuple[float, float]:
    """pydicom's output range for this window, asked of pydicom itself (far below / far above)."""
    with np.errstate(over="ignore"):
        y = apply_windowing(np.array([-1e300, 1e300]), ds, index)
    return float(y[0]), float(y[1])


def _voi_unit(m: np.ndarray, ds: Dataset, choice: VoiChoice, m_range: tuple[float, float]) -> np.ndarray:
    """VOI output of modality values ``m``, scaled to [0, 1] (float64, small arrays only)."""
    if choice.kind == "lut":
        if not np.issubdtype(m.dtype, np.integer):
            m = np.floor(m).astype(np.int64)  # a LUT is indexed by integers
        bits = int(ds.VOILUTSequence[choice.index].LUTDescriptor[2])
        return apply_voi(m, ds, choice.index) / float(2**bits - 1)
    if choice.kind == "window":
        saved = ds.get("VOILUTFunction")
        ds.VOILUTFunction = choice.function  # pydicom reads the function from the dataset
        try:
            y_lo, y_hi = _window_range(ds, choice.index)
            y = apply_windowing(m, ds, choice.index)
        finally:
            if saved is None:
                del ds.VOILUTFunction
            else:
                ds.VOILUTFunction = saved
        return (y - y_lo) / (y_hi - y_lo)
    lo, hi = m_range  # none / auto: linear from this range
    return np.clip((m.astype(np.float64) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def display_pixels(ds: Dataset, stored: np.ndarray, choice: VoiChoice, invert: bool, valid: np.ndarray | None) -> tuple[np.ndarray, VoiChoice, list[str]]:
    """Display values in [0, 1] (float32) of a 2-D stored-value array; returns the final choice."""
    notes: list[str] = []
    lo, hi = stored_range(ds)
    table_ok = np.issubdtype(stored.dtype, np.integer) and int(ds.BitsStored) <= MAX_TABLE_BITS
    smin, smax = stored.min(), stored.max()
    if smin == smax:
        notes.append("image is constant")
    if table_ok and (int(smin) < lo or int(smax) > hi):
        n = int(np.count_nonzero((stored < lo) | (stored > hi)))
        notes.append(f"{n} stored values outside the BitsStored range [{lo}, {hi}] were clipped")

    domain = np.arange(lo, hi + 1, dtype=np.int64) if table_ok else stored
    m = apply_modality_lut(domain, ds)
    if table_ok:
        m_range = (float(m.min()), float(m.max()))
    else:
        ends = apply_modality_lut(np.array([lo, hi], dtype=np.int64), ds)
        m_range = (float(ends.min()), float(ends.max()))
    if choice.kind == "auto":  # window on the data's own modality range (valid pixels only)
        content = stored[valid] if valid is not None and valid.any() else stored
        a, b = (int(content.min()), int(content.max())) if table_ok else (float(content.min()), float(content.max()))
        if table_ok:
            mm = m[max(a, lo) - lo: min(b, hi) - lo + 1]
        else:
            mm = apply_modality_lut(np.array([a, b]), ds)
        m_range = (float(mm.min()), float(mm.max()))
        choice = VoiChoice("auto", None, "data min/max", "LINEAR_EXACT", (m_range[0] + m_range[1]) / 2, m_range[1] - m_range[0])
    unit = _voi_unit(m, ds, choice, m_range)
    if invert:
        unit = 1.0 - unit
    if not np.all(np.isfinite(unit)):
        raise ValueError("display values are not finite (invalid LUT or window)")
    unit = np.clip(unit, 0.0, 1.0).astype(np.float32)
    if not table_ok:
        return unit, choice, notes
    if lo == 0 and stored.dtype.kind == "u":
        index = stored
    else:
        index = np.subtract(stored, lo, dtype=np.int32)
    return np.take(unit, index, mode="clip"), choice, notes


def padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """``valid`` (False on pixel padding, compared on stored values), None when the file has none."""
    if not _present(ds, "PixelPaddingValue"):
        return None
    a = int(_multi(ds.PixelPaddingValue)[0])
    if _present(ds, "PixelPaddingRangeLimit"):
        b = int(_multi(ds.PixelPaddingRangeLimit)[0])
        lo, hi = min(a, b), max(a, b)
        return ~((stored >= lo) & (stored <= hi))
    return stored != a
