"""DICOM ingest: one frame of a DICOM file -> float32 display values in [0, 1] + metadata.

Pipeline (PS3.4 N.2.1): stored values -> Modality LUT Sequence or RescaleSlope/Intercept -> VOI
(a VOI LUT Sequence item or a window with its VOILUTFunction) -> inversion (PresentationLUTShape
INVERSE, or MONOCHROME1 without a PresentationLUTShape) applied after the VOI. See
``dicom_voi`` for the pipeline and ``read_dicom`` for the choices.

Every failure is a one-line ``DicomError`` naming the file: pydicom is permissive (it returns an
EMPTY dataset with only a warning for some truncated files, and parses a file without File Meta
into one bogus element with ``force=True``), so the image attributes are checked here, and
decoded pixels that look like noise (a corrupt codestream that "decodes") are rejected.

Colour images (RGB, YBR_*) are converted to grayscale luminance (ITU-R BT.601 weights) so that a
screenshot or secondary capture can still be read; PALETTE COLOR is rejected.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLossless, JPEGLosslessSV1

from mammocad.errors import DicomError
from mammocad.io.dicom_voi import choose_voi, display_pixels, drop_empty_luts, inversion, padding_mask, voi_options
from mammocad.io.images import LoadedImage

REQUIRED = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PhotometricInterpretation")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
# Lag-1 neighbour correlation of real images is >= 0.73 on every decodable file of the shared test
# set (a SMPTE test pattern is the lowest, radiographs are > 0.85); the corrupt JPEG Lossless file
# that "decodes" into noise gives 0.46. Below this the pixels are rejected as noise.
MIN_NEIGHBOUR_CORRELATION = 0.6
# Code meanings of View Code Sequence (CID 4014 and DX views) -> ViewPosition abbreviations.
VIEW_CODES = {
    "cranio-caudal": "CC", "medio-lateral oblique": "MLO", "medio-lateral": "ML", "latero-medial": "LM",
    "latero-medial oblique": "LMO", "caudo-cranial (from below)": "FB", "exaggerated cranio-caudal": "XCC",
    "cranio-caudal exaggerated laterally": "XCCL", "cranio-caudal exaggerated medially": "XCCM",
    "superolateral to inferomedial oblique": "SIO", "inferomedial to superolateral oblique": "ISO",
    "cleavage": "CV", "axillary tail": "AT", "postero-anterior": "PA", "antero-posterior": "AP",
}
_TRUNCATION_WARNINGS = ("end of file reached", "unexpected end of file")  # pydicom EOFError texts


def read_dicom(path: str | Path, voi: int | str | None = 0, voi_function: str | None = None,
               frame: int | None = None, apply_voi: bool = True) -> LoadedImage:
    """Read one frame of a DICOM file as display values in [0, 1] (float32, never cut to 8 bit).

    ``voi`` picks the VOI transform: an int indexes the VOI LUT Sequence items when the file has
    any (pydicom's convention), else the windows; ``"lut:N"`` / ``"window:N"`` pick a kind
    explicitly (N may also be an explanation: ``"window:SOFTER"``); any other string matches a
    LUT/window explanation, case-insensitive (LUT items first); ``None`` (or ``apply_voi=False``)
    applies no VOI and scales the modality values from their full possible range; ``"auto"``
    windows linearly on the data's own min/max (valid pixels). ``voi_function`` (LINEAR,
    LINEAR_EXACT, SIGMOID) overrides the file's VOILUTFunction and implies a window. What was applied
    is in ``meta["voi"]``, what else the file offers in ``meta["voi_options"]``. ``frame`` is
    0-based and required for multi-frame files. ``valid`` is False on pixel padding.
    """
    path = Path(path)
    with _quiet_pydicom() as messages:
        image = _read_dicom(path, voi, voi_function, frame, apply_voi, messages)
    image.meta["notes"] = list(dict.fromkeys(image.meta["notes"] + _notes_from(messages)))
    return image


def _read_dicom(path: Path, voi: int | str | None, voi_function: str | None, frame: int | None,
                apply_voi: bool, messages: list[str]) -> LoadedImage:
    notes: list[str] = []
    ds = _read_dataset(path, notes, messages, stop_before_pixels=False)
    n_frames = _n_frames(ds, path)
    if frame is None and n_frames > 1:
        raise DicomError(path, f"has {n_frames} frames: choose one with frame=0..{n_frames - 1}")
    if frame is not None and not 0 <= int(frame) < n_frames:
        raise DicomError(path, f"frame {frame} out of range: the file has {n_frames} frame(s) (0..{n_frames - 1})")
    notes += drop_empty_luts(ds)
    meta = dicom_meta(ds, path, n_frames, 0 if frame is None else int(frame))
    photometric = meta["photometric"]
    if photometric == "PALETTE COLOR" or photometric not in ("MONOCHROME1", "MONOCHROME2", *COLOUR):
        raise DicomError(path, f"unsupported PhotometricInterpretation {photometric!r} (expected monochrome, RGB or YBR)")
    colour = photometric in COLOUR
    if not colour:  # resolve the VOI before decoding: a bad selector should not cost a decode
        choice, more = choose_voi(ds, voi if apply_voi else None, voi_function, str(path))
        notes += more
        invert, more = inversion(ds)
        notes += more

    stored = _decode(ds, path, n_frames, frame, notes)
    expected = (meta["rows"], meta["columns"], 3) if colour else (meta["rows"], meta["columns"])
    if stored.shape != expected:
        raise DicomError(path, f"decoded pixel array has shape {stored.shape}, header says {expected}")
    _reject_noise(stored if not colour else stored[..., 1], path)

    if colour:
        pixels = np.clip((stored.astype(np.float32) @ LUMA) / float(2 ** int(ds.BitsStored) - 1), 0.0, 1.0)
        valid, applied, invert = None, None, False
        notes.append(f"{photometric} converted to grayscale luminance (BT.601); VOI not applicable")
        meta["voi"], meta["voi_options"] = {"name": "none", "kind": "none"}, []
    else:
        valid = padding_mask(ds, stored)
        try:
            pixels, applied, more = display_pixels(ds, stored, choice, invert, valid)
        except (ValueError, TypeError, IndexError, KeyError, NotImplementedError, AttributeError) as exc:
            raise DicomError(path, f"cannot apply {choice.name} VOI: {_short(exc)}") from None
        notes += more
        meta["voi"] = applied.as_meta()
    meta["inverted"] = bool(invert)
    meta["notes"] = notes
    return LoadedImage(pixels=pixels, path=str(path), meta=meta, valid=valid)


def read_dicom_metadata(path: str | Path) -> dict[str, Any]:
    """The header of a DICOM file (pixels not read): the same keys as ``read_dicom``'s meta.

    ``voi`` and ``inverted`` say what ``read_dicom`` would apply with its defaults; ``frame`` is None.
    """
    path = Path(path)
    notes: list[str] = []
    with _quiet_pydicom() as messages:
        ds = _read_dataset(path, notes, messages, stop_before_pixels=True)
        n_frames = _n_frames(ds, path)
        notes += drop_empty_luts(ds)
        meta = dicom_meta(ds, path, n_frames, None)
        if meta["photometric"] in ("MONOCHROME1", "MONOCHROME2"):
            choice, more = choose_voi(ds, 0, None, str(path))
            invert, more2 = inversion(ds)
            meta["voi"], meta["inverted"] = choice.as_meta(), invert
            notes += more + more2
        else:
            meta["voi"], meta["voi_options"], meta["inverted"] = {"name": "none", "kind": "none"}, [], False
    meta["notes"] = list(dict.fromkeys(notes + _notes_from(messages)))
    return meta


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[list[str]]:
    """Collect pydicom's warnings and log records (live, in the yielded list) instead of printing them.

    pydicom warns lazily (invalid values are reported when an element is first accessed), so the
    whole read runs inside this.
    """
    logger = logging.getLogger("pydicom")
    messages: list[str] = []

    class _Collect(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            messages.append(record.getMessage())
            return False

    collect = _Collect()
    logger.addFilter(collect)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *args, **kwargs: messages.append(str(message))
            yield messages
    finally:
        logger.removeFilter(collect)


def _notes_from(messages: list[str]) -> list[str]:
    """pydicom's messages, shortened to their first sentence and deduplicated."""
    return [m.split(" Please see")[0].split(" - the dataset may be")[0].strip() for m in messages]


def _short(exc: BaseException | str, limit: int = 200) -> str:
    """A one-line cause: the first plugin's error of pydicom's multi-plugin report, without advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Unable to decode as exceptions were raised"):
        lines = lines[1:2]
    text = " ".join(" ".join(lines).split()).split(" - the dataset may be")[0].split(" in file ")[0]
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_dataset(path: Path, notes: list[str], messages: list[str], stop_before_pixels: bool) -> Dataset:
    if not path.is_file():
        raise DicomError(path, "file not found" if not path.exists() else "is not a file")
    forced = False
    seen = len(messages)
    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:  # no 'DICM' preamble: an ACR-NEMA style file, or not DICOM
            forced = True
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    except Exception as exc:  # pydicom raises OSError, ValueError, struct.error, ... on broken files
        raise DicomError(path, f"unreadable DICOM ({_short(exc)})") from None
    # pydicom returns what it parsed so far, with only a warning, when the file ends early
    truncated = [m for m in messages[seen:] if any(k in m.lower() for k in _TRUNCATION_WARNINGS)]
    if truncated:
        raise DicomError(path, f"truncated file: {_short(truncated[0])}")
    missing = [k for k in REQUIRED if k not in ds or ds[k].value in (None, "")]
    if not stop_before_pixels and "PixelData" not in ds:
        missing.append("PixelData")
    if missing:
        if forced and len(missing) >= 4:
            raise DicomError(path, "not a DICOM image (no DICOM header, and no image attributes could be parsed)")
        raise DicomError(path, f"not a usable DICOM image: missing {', '.join(missing)} (truncated, or not an image?)")
    for key in ("Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel"):
        value = ds.get(key, 1)
        if isinstance(value, (list, tuple)) or not isinstance(value, int) or value <= 0:
            raise DicomError(path, f"invalid {key} value {value!r} (corrupt or truncated header)")
    if ds.BitsStored > ds.BitsAllocated:
        raise DicomError(path, f"BitsStored {ds.BitsStored} > BitsAllocated {ds.BitsAllocated}")
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        # ACR-NEMA style (no File Meta): decode with the encoding pydicom detected while parsing
        implicit, little = ds.original_encoding
        if little is False:
            raise DicomError(path, "no File Meta and big-endian encoding: transfer syntax unknown")
        ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
        notes.append(f"no Transfer Syntax UID: assumed {ds.file_meta.TransferSyntaxUID.name}")
    return ds


def _n_frames(ds: Dataset, path: Path) -> int:
    raw = ds["NumberOfFrames"].value if "NumberOfFrames" in ds else 1
    try:
        n = int(raw if raw not in (None, "") else 1)
    except (TypeError, ValueError):
        raise DicomError(path, f"invalid NumberOfFrames value {raw!r}") from None
    if n < 1:
        raise DicomError(path, f"invalid NumberOfFrames value {raw!r}")
    return n


def _decode(ds: Dataset, path: Path, n_frames: int, frame: int | None, notes: list[str]) -> np.ndarray:
    """Decode only the requested frame (pydicom decodes one frame when given ``index``)."""
    tsyntax = UID(ds.file_meta.TransferSyntaxUID)
    fast = _fast_jpeg_lossless(ds, tsyntax, n_frames, frame)
    if fast is not None:
        return fast
    try:
        arr = pixel_array(ds, index=None if n_frames == 1 else int(frame))
    except Exception as exc:  # decoders raise RuntimeError, ValueError, ...; say which syntax failed
        name = tsyntax.name if tsyntax.is_transfer_syntax else str(tsyntax)
        raise DicomError(path, f"cannot decode {name} pixel data: {_short(exc)}") from None
    if tsyntax in JPEG2000TransferSyntaxes:
        notes += _j2k_notes(ds, n_frames, frame)
    return arr


def _fast_jpeg_lossless(ds: Dataset, tsyntax: UID, n_frames: int, frame: int | None) -> np.ndarray | None:
    """Unsigned grayscale JPEG Lossless via libjpeg-turbo (imagecodecs), or None to use pydicom.

    Why: pydicom's JPEG Lossless plugin (pylibjpeg-libjpeg) takes ~0.6 s for a 3328x4084 12-bit
    mammogram, libjpeg-turbo ~0.1 s, and JPEG Lossless is how most mammograms are stored. Only the
    simple, common case is taken (unsigned, one sample); anything unexpected falls back to pydicom.
    """
    if tsyntax not in (JPEGLossless, JPEGLosslessSV1) or int(ds.get("SamplesPerPixel") or 1) != 1:
        return None
    if int(ds.get("PixelRepresentation") or 0) != 0 or int(ds.BitsAllocated) not in (8, 16):
        return None
    try:
        import imagecodecs

        codestream = pydicom.encaps.get_frame(ds.PixelData, frame or 0, number_of_frames=n_frames)
        arr = imagecodecs.jpeg8_decode(codestream)
    except Exception:  # missing package or a codestream libjpeg-turbo refuses: pydicom decides
        return None
    expected = np.uint8 if int(ds.BitsAllocated) == 8 else np.uint16
    if arr.shape != (int(ds.Rows), int(ds.Columns)) or arr.dtype != expected:
        return None
    return arr


def _j2k_notes(ds: Dataset, n_frames: int, frame: int | None) -> list[str]:
    """Record header/codestream disagreements; pydicom corrects the sign (apply_j2k_sign_correction)."""
    try:
        codestream = pydicom.encaps.get_frame(ds.PixelData, frame or 0, number_of_frames=n_frames)
    except Exception:  # only for notes; decoding already succeeded
        return []
    info = get_j2k_parameters(codestream)
    notes = []
    if info and bool(info["is_signed"]) != bool(ds.PixelRepresentation):
        notes.append(f"J2K codestream is {'signed' if info['is_signed'] else 'unsigned'} but PixelRepresentation is "
                     f"{ds.PixelRepresentation}: values sign-corrected to the header (pydicom)")
    if info and info["precision"] != ds.BitsStored:
        notes.append(f"J2K codestream precision {info['precision']} bits, BitsStored {ds.BitsStored}: header kept")
    return notes


def _reject_noise(arr: np.ndarray, path: Path) -> None:
    """Raise when neighbouring pixels are uncorrelated: a corrupt codestream that still decoded."""
    if min(arr.shape) < 8:
        return
    step = max(1, min(arr.shape) // 256)  # a subsample of rows/columns is plenty and cheap
    corr = []
    for a, b in ((arr[::step, :-1], arr[::step, 1:]), (arr[:-1, ::step], arr[1:, ::step])):
        a, b = a.astype(np.float32), b.astype(np.float32)
        a -= a.mean()
        b -= b.mean()
        denom = float(np.sqrt(np.mean(a * a) * np.mean(b * b)))
        corr.append(1.0 if denom == 0 else float(np.mean(a * b)) / denom)
    if max(corr) < MIN_NEIGHBOUR_CORRELATION:
        raise DicomError(path, f"decoded pixels look like noise (neighbour correlation {max(corr):.2f}): corrupt pixel data?")


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # an invalid value must not stop the ingest; the tag is just unknown
        return None
    value = str(value).strip() if value not in (None, "") else ""
    return value or None


def _laterality(ds: Dataset) -> str | None:
    for value in (_text(ds, "ImageLaterality"), _text(ds, "Laterality"), _frame_laterality(ds)):
        if value and value.upper()[0] in "LR" and len(value) == 1:
            return value.upper()
    return None


def _frame_laterality(ds: Dataset) -> str | None:
    """Enhanced objects put laterality in the shared Frame Anatomy functional group."""
    try:
        return _text(ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0], "FrameLaterality")
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def _view(ds: Dataset) -> str | None:
    view = _text(ds, "ViewPosition")
    if view:
        return view.upper()
    try:
        meaning = str(ds.ViewCodeSequence[0].CodeMeaning).strip().lower()
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    return VIEW_CODES.get(meaning)


def _spacing(ds: Dataset) -> tuple[list[float] | None, str | None]:
    candidates = [(k, k, ds) for k in ("PixelSpacing", "ImagerPixelSpacing")]
    try:  # enhanced (multi-frame functional group) objects
        shared = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        candidates.append(("SharedFunctionalGroups/PixelSpacing", "PixelSpacing", shared))
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    for name, keyword, holder in candidates:
        try:
            value = [float(v) for v in holder.get(keyword) or []]
        except (TypeError, ValueError):
            continue
        if len(value) == 2 and all(v > 0 for v in value):
            return value, name
    return None, None


def dicom_meta(ds: Dataset, path: Path, n_frames: int, frame: int | None) -> dict[str, Any]:
    """The ``meta`` dict of a LoadedImage read from DICOM (voi/inverted/notes added by the caller)."""
    spacing, spacing_tag = _spacing(ds)
    tsyntax = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", Dataset()) else None
    return {
        "format": "dicom",
        "modality": _text(ds, "Modality"),
        "laterality": _laterality(ds),
        "view": _view(ds),
        "presentation_intent": _text(ds, "PresentationIntentType"),
        "pixel_spacing": spacing,
        "pixel_spacing_tag": spacing_tag,
        "manufacturer": _text(ds, "Manufacturer"),
        "patient_id": _text(ds, "PatientID"),
        "study_uid": _text(ds, "StudyInstanceUID"),
        "series_uid": _text(ds, "SeriesInstanceUID"),
        "sop_uid": _text(ds, "SOPInstanceUID"),
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "photometric": (_text(ds, "PhotometricInterpretation") or "").upper(),
        "bits_stored": int(ds.BitsStored),
        "transfer_syntax": tsyntax,
        "n_frames": n_frames,
        "frame": frame,
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "voi_options": [o.as_meta() for o in voi_options(ds)],
    }
