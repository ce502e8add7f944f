"""Writing synthetic mammograms to disk: MG DICOM files, a CBIS-DDSM-style tree, a plain folder.

DICOM: Digital Mammography X-Ray Image - For Presentation, 12-bit stored values in 16-bit words,
MONOCHROME2 or MONOCHROME1 (stored inverted, with PresentationLUTShape INVERSE, so that the display
after inversion is the same image), a linear VOI window over the breast. JPEG Lossless is encoded
with ``imagecodecs.ljpeg_encode`` (pydicom has no JPEG Lossless encoder); it writes predictor 6, so
the transfer syntax is read from the codestream's SOS marker rather than assumed: selection value
1 -> 1.2.840.10008.1.2.4.70, any other -> 1.2.840.10008.1.2.4.57 (Process 14).

CBIS-DDSM layout (what ``mammocad.datasets.cbis_ddsm`` reads): the four official case-description
CSVs with the official headers and quirks (CRLF line ends; the mass CSV's ROI-mask path and the calc
CSV's cropped-image path end with a newline inside quotes; CSV paths in the old TCIA layout), and the
DICOM tree in the current NBIA download layout. CBIS-DDSM has no normal images: images without
lesions appear only in the folder layout. Every 4th patient (P_00002, P_00006, ...) is official test.

Folder layout (what ``mammocad.datasets.folder`` reads): images/<id>.png as 16-bit PNG holding the
12-bit values scaled to the full 16-bit range (png = round(v * 65535 / 4095), v = round(png * 4095 /
65535)), masks/<id>_<k>.png (0/255, one per lesion, k from 1), labels.csv and ground_truth.json.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (JPEG2000Lossless, JPEGLossless, JPEGLosslessSV1, RLELossless, ExplicitVRLittleEndian, UID,
                         generate_uid)

from mammocad.datasets.rasterize import mask_to_box
from mammocad.errors import ConfigError, InputError
from mammocad.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from mammocad.io.images import write_png
from mammocad.synth import SyntheticMammogram, synthesize_mammogram

MG_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")
TRANSFER_SYNTAXES = {"jpeg-lossless": JPEGLossless, "explicit-little": ExplicitVRLittleEndian, "rle": RLELossless,
                     "jpeg2000-lossless": JPEG2000Lossless}
PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1")
LAYOUTS = ("cbis-ddsm", "folder", "both")
BITS_STORED = 12
MAX_STORED = 2**BITS_STORED - 1
VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
# PatientOrientation (row direction \ column direction) in the display convention of mammocad.synth.
PATIENT_ORIENTATION = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"], ("L", "MLO"): ["A", "F"], ("R", "MLO"): ["P", "F"]}
DDSM_UID_ROOT = "1.3.6.1.4.1.9590.100.1.2."  # the root of the UIDs in the real CBIS-DDSM CSV paths
MASS_HEADER = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id", "abnormality type",
               "mass shape", "mass margins", "assessment", "pathology", "subtlety", "image file path",
               "cropped image file path", "ROI mask file path"]
CALC_HEADER = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id", "abnormality type",
               "calc type", "calc distribution", "assessment", "pathology", "subtlety", "image file path",
               "cropped image file path", "ROI mask file path"]  # sic: "breast density" here, "breast_density" for masses
STUDY_DATE = "20160720"
# Image sides the generator accepts: below 64 pixels there is no room for a breast with lesions;
# 8192 is beyond every mammography detector (the finest, 50 um over 24 x 30 cm, is 4800 x 6000)
# and a float32 image of 8192^2 already takes 256 MiB, several such buffers while drawing.
MIN_SIDE, MAX_SIDE = 64, 8192
MAX_IMAGES = 100_000  # more is a typo, not a test set (at 1024 x 832 it would fill ~170 GB)


# ------------------------------------------------------------------------------------ DICOM


def jpeg_lossless_predictor(codestream: bytes) -> int:
    """The predictor (selection value, Ss of the SOS marker) of a JPEG Lossless codestream."""
    i = 2
    while i + 4 <= len(codestream):
        if codestream[i] != 0xFF:
            raise ValueError(f"not a JPEG marker at byte {i}")
        marker, length = codestream[i + 1], int.from_bytes(codestream[i + 2:i + 4], "big")
        if marker == 0xDA:
            n_components = codestream[i + 4]
            return int(codestream[i + 5 + 2 * n_components])
        i += 2 + length
    raise ValueError("no SOS marker in the JPEG codestream")


def _encode_jpeg_lossless(pixels: np.ndarray, bits: int) -> tuple[bytes, UID]:
    import imagecodecs

    frame = imagecodecs.ljpeg_encode(np.ascontiguousarray(pixels), bitspersample=bits)
    return frame, (JPEGLosslessSV1 if jpeg_lossless_predictor(frame) == 1 else JPEGLossless)


def _set_pixels(ds: Dataset, pixels: np.ndarray, bits_stored: int, transfer_syntax: str) -> None:
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ConfigError("transfer_syntax", f"must be one of {', '.join(TRANSFER_SYNTAXES)}, got {transfer_syntax!r}")
    pixels = np.ascontiguousarray(pixels)
    bits_allocated = pixels.dtype.itemsize * 8
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_allocated, bits_stored, bits_stored - 1, 0
    if transfer_syntax == "jpeg-lossless":
        frame, uid = _encode_jpeg_lossless(pixels, bits_stored)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = uid
        ds.LossyImageCompression = "00"
        return
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
    if transfer_syntax != "explicit-little":  # RLE / JPEG 2000: pydicom's own encoders
        ds.compress(TRANSFER_SYNTAXES[transfer_syntax], pixels, encoding_plugin="pylibjpeg" if "2000" in transfer_syntax else "",
                    generate_instance_uid=False)


@dataclass
class DicomIdentity:
    """Who and what one file is: the header fields that differ between files of a study."""

    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    series_description: str = "full mammogram images"
    series_number: int = 1
    instance_number: int = 1


def uid_from(*parts: Any) -> str:
    """A reproducible UID under pydicom's root (generate_uid hashes the entropy sources)."""
    return generate_uid(entropy_srcs=["mammocad-synth", *map(str, parts)])


def ddsm_uid(*parts: Any) -> str:
    """A reproducible UID shaped like those in the CBIS-DDSM CSV paths (root + 36 digits)."""
    digest = int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest(), "big")
    digits = str(digest)[:36]
    return DDSM_UID_ROOT + ("1" + digits[1:] if digits[0] == "0" else digits)


def window_for(stored: np.ndarray, breast: np.ndarray) -> tuple[float, float]:
    """(center, width) of a linear window covering the breast's stored values (MONOCHROME2 values)."""
    values = stored[breast] if breast.any() else stored.ravel()
    lo, hi = float(np.percentile(values, 0.5)), float(values.max())
    lo = max(0.0, lo - 0.05 * (hi - lo))
    width = max(hi - lo + 1.0, 2.0)
    return round(lo + width / 2.0, 1), round(width, 1)


def mammogram_dataset(stored: np.ndarray, ident: DicomIdentity, laterality: str, view: str, spacing_mm: float,
                      photometric: str = "MONOCHROME2", window: tuple[float, float] | None = None,
                      transfer_syntax: str = "jpeg-lossless", bits_stored: int = BITS_STORED) -> Dataset:
    """An MG For-Presentation dataset around ``stored`` (MONOCHROME2 values; inverted for MONOCHROME1)."""
    if photometric not in PHOTOMETRICS:
        raise ConfigError("photometric", f"must be MONOCHROME2 or MONOCHROME1, got {photometric!r}")
    top = 2**bits_stored - 1
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = ident.sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID, ds.SOPInstanceUID = MG_FOR_PRESENTATION, ident.sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.ContentTime = "120000"
    ds.AccessionNumber, ds.StudyID = "", "1"
    ds.Modality = "MG"
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "mammocad-synth", "synthetic", "1"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = ident.series_description
    ds.PatientName, ds.PatientID = f"SYNTHETIC^{ident.patient_id}", ident.patient_id
    ds.PatientBirthDate, ds.PatientSex = "", "F"
    ds.BodyPartExamined = "BREAST"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ident.study_uid, ident.series_uid
    ds.SeriesNumber, ds.InstanceNumber = ident.series_number, ident.instance_number
    ds.PatientOrientation = PATIENT_ORIENTATION[(laterality, view)]
    ds.ImageLaterality, ds.ViewPosition = laterality, view
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = VIEW_CODES[view][0], "SCT", VIEW_CODES[view][1]
    code.ViewModifierCodeSequence = Sequence()
    ds.ViewCodeSequence = Sequence([code])
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelSpacing = ds.ImagerPixelSpacing = [round(spacing_mm, 6)] * 2
    ds.BreastImplantPresent = "NO"
    ds.BurnedInAnnotation = "NO"
    ds.PhotometricInterpretation = photometric
    # Display: tissue bright. Stored MONOCHROME1 values are inverted, so their sign flips too.
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    pixels = stored if photometric == "MONOCHROME2" else (top - stored.astype(np.int32)).astype(stored.dtype)
    if window is not None:
        center, width = window
        # MONOCHROME1: c' = 2^bits - c makes (window, then invert) equal the MONOCHROME2 display exactly.
        ds.WindowCenter = center if photometric == "MONOCHROME2" else round(top + 1 - center, 1)
        ds.WindowWidth = width
        ds.WindowCenterWidthExplanation = "NORMAL"
        ds.VOILUTFunction = "LINEAR"
    _set_pixels(ds, pixels, bits_stored, transfer_syntax)
    return ds


def save_dataset(ds: Dataset, path: str | Path) -> None:
    """Write a Part-10 file atomically."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(path, buffer.getvalue())


def stored_values(image: np.ndarray) -> np.ndarray:
    """Display image in [0, 1] -> 12-bit stored values (MONOCHROME2)."""
    return np.round(np.clip(image, 0.0, 1.0) * MAX_STORED).astype(np.uint16)


def check_size(size: Any) -> tuple[int, int]:
    """(height, width) as ints within [MIN_SIDE, MAX_SIDE]; a one-line ConfigError naming the side
    otherwise (not a traceback from deep inside the generator, nor hours of work for a typo)."""
    try:
        h, w = size
    except (TypeError, ValueError):
        raise ConfigError("size", f"expected (height, width), got {size!r}") from None
    out = []
    for name, value in (("height", h), ("width", w)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (isinstance(value, float) and value.is_integer()):
            raise ConfigError(name, f"must be a whole number of pixels, got {value!r}")
        if not MIN_SIDE <= int(value) <= MAX_SIDE:
            raise ConfigError(name, f"must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {int(value)}")
        out.append(int(value))
    return out[0], out[1]


def write_synthetic_dicom(path: str | Path, rng: np.random.Generator, size: tuple[int, int] = (4084, 3328),
                          photometric: str = "MONOCHROME2", transfer_syntax: str = "jpeg-lossless",
                          laterality: str | None = None, view: str | None = None) -> SyntheticMammogram:
    """Draw one mammogram and write it as one MG DICOM file (benchmarks, demos); returns it."""
    size = check_size(size)
    laterality = laterality or str(rng.choice(["L", "R"]))
    view = view or str(rng.choice(["CC", "MLO"]))
    mammo = synthesize_mammogram(rng, size=size, laterality=laterality, view=view)
    key = int(rng.integers(2**62))
    ident = DicomIdentity(patient_id=f"SYNTH{key % 100000:05d}", study_uid=uid_from(key, "study"), series_uid=uid_from(key, "series"),
                          sop_uid=uid_from(key, "sop"))
    stored = stored_values(mammo.image)
    ds = mammogram_dataset(stored, ident, laterality, view, mammo.pixel_spacing_mm, photometric,
                           window_for(stored, mammo.breast_mask), transfer_syntax)
    save_dataset(ds, path)
    return mammo


def mask_dataset(mask: np.ndarray, ident: DicomIdentity, laterality: str, view: str, spacing_mm: float) -> Dataset:
    """A CBIS-DDSM-style ROI mask file: 8-bit MONOCHROME2, 0/255, uncompressed, the image's size."""
    ds = mammogram_dataset(np.where(mask, 255, 0).astype(np.uint8), ident, laterality, view, spacing_mm,
                           "MONOCHROME2", None, "explicit-little", bits_stored=8)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    del ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign
    return ds


# ------------------------------------------------------------------------------------ study


@dataclass
class StudyImage:
    index: int
    patient: int  # 1-based patient number
    laterality: str
    view: str
    mammo: SyntheticMammogram

    @property
    def patient_id(self) -> str:
        return f"P_{self.patient:05d}"

    @property
    def side(self) -> str:
        return "LEFT" if self.laterality == "L" else "RIGHT"

    @property
    def image_id(self) -> str:
        return f"{self.patient_id}_{self.side}_{self.view}"

    @property
    def split(self) -> str:
        return "test" if self.patient % 4 == 2 else "train"


def plan_views(rng: np.random.Generator, n: int) -> list[tuple[int, str, str]]:
    """(patient number, laterality, view) for n images: 1, 2 (CC + MLO of one breast) or 4 views a patient."""
    plan: list[tuple[int, str, str]] = []
    patient = 0
    while len(plan) < n:
        patient += 1
        k = int(rng.choice([1, 2, 4], p=[0.35, 0.45, 0.2]))
        side = str(rng.choice(["L", "R"]))
        if k == 1:
            views = [(side, str(rng.choice(["CC", "MLO"])))]
        elif k == 2:
            views = [(side, "CC"), (side, "MLO")]
        else:
            views = [(s, v) for s in ("R", "L") for v in ("CC", "MLO")]
        plan += [(patient, s, v) for s, v in views[: n - len(plan)]]
    return plan


def _crop_box(mask: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    margin = max(16, int(0.25 * max(rows[-1] - rows[0], cols[-1] - cols[0])))
    return (max(0, rows[0] - margin), min(shape[0], rows[-1] + 1 + margin), max(0, cols[0] - margin), min(shape[1], cols[-1] + 1 + margin))


def _nbia_digits(*parts: Any) -> str:
    return f"{int(hashlib.sha256('/'.join(map(str, parts)).encode()).hexdigest(), 16) % 100000:05d}"


def _write_cbis(root: Path, images: list[StudyImage], seed: int, photometric: str | None, transfer_syntax: str) -> dict[str, int]:
    """The CBIS-DDSM tree + CSVs; returns counts; records file paths in each lesion's attributes."""
    rows: dict[tuple[str, str], list[list[str]]] = {(k, s): [] for k in ("mass", "calc") for s in ("train", "test")}
    date_folder = f"{STUDY_DATE[4:6]}-{STUDY_DATE[6:]}-{STUDY_DATE[:4]}-DDSM-NA"
    rng = np.random.default_rng([seed, 7])  # BENIGN_WITHOUT_CALLBACK draws, independent of the images
    n_files = 0
    for img in images:
        m = img.mammo
        stored = stored_values(m.image)
        window = window_for(stored, m.breast_mask)
        phot = photometric or PHOTOMETRICS[img.index % 2]
        for kind, prefix in (("mass", "Mass"), ("calcification", "Calc")):
            lesions = [les for les in m.lesions if les.kind == kind]
            if not lesions:
                continue
            case = f"{prefix}-{'Training' if img.split == 'train' else 'Test'}_{img.patient_id}_{img.side}_{img.view}"
            study, series = ddsm_uid(seed, case, "study"), ddsm_uid(seed, case, "series")
            ident = DicomIdentity(case, study, series, ddsm_uid(seed, case, "sop"))
            full_path = root / case / f"{date_folder}-{_nbia_digits(seed, study)}" / f"1.000000-full mammogram images-{_nbia_digits(seed, series)}" / "1-1.dcm"
            save_dataset(mammogram_dataset(stored, ident, img.laterality, img.view, m.pixel_spacing_mm, phot, window, transfer_syntax), full_path)
            n_files += 1
            for k, les in enumerate(lesions, start=1):
                roi_case = f"{case}_{k}"
                roi_study, roi_series = ddsm_uid(seed, roi_case, "study"), ddsm_uid(seed, roi_case, "series")
                study_dir = root / roi_case / f"{date_folder}-{_nbia_digits(seed, roi_study)}"
                mask_ident = DicomIdentity(roi_case, roi_study, roi_series, ddsm_uid(seed, roi_case, "mask"), "ROI mask images")
                mask_path = study_dir / f"1.000000-ROI mask images-{_nbia_digits(seed, roi_series, 'mask')}" / "1-1.dcm"
                save_dataset(mask_dataset(les.mask, mask_ident, img.laterality, img.view, m.pixel_spacing_mm), mask_path)
                r0, r1, c0, c1 = _crop_box(les.mask, les.mask.shape)
                crop_ident = DicomIdentity(roi_case, roi_study, roi_series, ddsm_uid(seed, roi_case, "crop"), "cropped images")
                crop_path = study_dir / f"1.000000-cropped images-{_nbia_digits(seed, roi_series, 'crop')}" / "1-1.dcm"
                save_dataset(mammogram_dataset(stored[r0:r1, c0:c1], crop_ident, img.laterality, img.view, m.pixel_spacing_mm, phot,
                                               window, transfer_syntax), crop_path)
                n_files += 2
                les.attributes.setdefault("cbis_files", []).append(
                    {"image": str(full_path.relative_to(root.parent)), "roi_mask": str(mask_path.relative_to(root.parent)),
                     "cropped": str(crop_path.relative_to(root.parent)), "abnormality_id": k, "case": case})
                # Old TCIA paths as in the real CSVs; which of 000000/000001 is the mask differs between them.
                old_image = f"{case}/{study}/{series}/000000.dcm"
                old_roi = f"{roi_case}/{roi_study}/{roi_series}"
                pathology = les.pathology.upper()
                if pathology == "BENIGN" and rng.random() < 0.2:
                    pathology = "BENIGN_WITHOUT_CALLBACK"
                a = les.attributes
                common = [img.patient_id, str(m.density), img.side, img.view, str(k)]
                tail = [str(a["assessment"]), pathology, str(a["subtlety"]), old_image]
                if kind == "mass":
                    row = common + ["mass", a["mass_shape"], a["mass_margins"]] + tail + [f"{old_roi}/000000.dcm", f"{old_roi}/000001.dcm\n"]
                else:
                    row = common + ["calcification", a["calc_type"], a["calc_distribution"]] + tail + [f"{old_roi}/000001.dcm\n", f"{old_roi}/000000.dcm"]
                rows[("mass" if kind == "mass" else "calc", img.split)].append(row)
    for (kind, split), body in rows.items():
        header = MASS_HEADER if kind == "mass" else CALC_HEADER
        text = io.StringIO(newline="")
        csv.writer(text, lineterminator="\r\n").writerows([header] + body)
        atomic_write_text(root / f"{kind}_case_description_{split}_set.csv", text.getvalue())
    return {"files": n_files, "rows": sum(len(b) for b in rows.values())}


def _to_png16(stored: np.ndarray) -> np.ndarray:
    return np.round(stored.astype(np.float64) * (65535.0 / MAX_STORED)).astype(np.uint16)


def _write_folder(root: Path, images: list[StudyImage]) -> None:
    lines = [["image", "label", "patient_id", "laterality", "view", "modality", "pathology"]]
    for img in images:
        m = img.mammo
        write_png(root / "images" / f"{img.image_id}.png", _to_png16(stored_values(m.image)))
        for k, les in enumerate(m.lesions, start=1):
            write_png(root / "masks" / f"{img.image_id}_{k}.png", les.mask)
        pathologies = {les.pathology for les in m.lesions}
        # The folder adapter gives the CSV pathology to every lesion of the image: only write it when they agree.
        lines.append([f"{img.image_id}.png", m.label, img.patient_id, img.laterality, img.view, "MG",
                      pathologies.pop() if len(pathologies) == 1 else ""])
    text = io.StringIO(newline="")
    csv.writer(text, lineterminator="\n").writerows(lines)
    atomic_write_text(root / "labels.csv", text.getvalue())


def _ground_truth(images: list[StudyImage], seed: int, size: tuple[int, int], layouts: list[str]) -> dict[str, Any]:
    entries = []
    for img in images:
        m = img.mammo
        lesions = []
        for k, les in enumerate(m.lesions, start=1):
            entry = {"index": k, "kind": les.kind, "pathology": les.pathology, "source_label": les.source_label,
                     "box": [int(v) for v in mask_to_box(les.mask)], "area": int(les.mask.sum()),
                     "attributes": {key: v for key, v in les.attributes.items() if key != "cbis_files"}}
            if "folder" in layouts:
                entry["mask"] = f"folder/masks/{img.image_id}_{k}.png"
            if les.attributes.get("cbis_files"):
                entry["cbis_ddsm"] = les.attributes["cbis_files"][-1]
            lesions.append(entry)
        entries.append({"image_id": img.image_id, "patient_id": img.patient_id, "laterality": img.laterality, "view": img.view,
                        "label": m.label, "breast_density": m.density, "official_split": img.split,
                        "png": f"folder/images/{img.image_id}.png" if "folder" in layouts else None,
                        "pixel_spacing_mm": m.pixel_spacing_mm, "lesions": lesions})
    return {"generator": "mammocad.synth", "seed": seed, "size": list(size), "coordinates": "pixel edges, box [x0, y0, x1, y1) (mammocad.records)",
            "png_encoding": "12-bit stored values scaled to 16 bit: png = round(v * 65535 / 4095)",
            "display": "left breast: chest wall on the image's left; right breast mirrored", "images": entries}


def write_synthetic_study(out: str | Path, n: int = 8, seed: int = 0, size: tuple[int, int] = (1024, 832), layout: str = "both",
                          transfer_syntax: str = "jpeg-lossless", photometric: str | None = None) -> str:
    """Write n synthetic mammograms as a CBIS-DDSM tree (OUT/cbis-ddsm/) and/or a folder dataset
    (OUT/folder/), plus OUT/ground_truth.json. ``photometric`` None alternates MONOCHROME2 and
    MONOCHROME1 between images. Same arguments, same bytes. Returns a one-line summary."""
    if layout not in LAYOUTS:
        raise ConfigError("layout", f"must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ConfigError("transfer_syntax", f"must be one of {', '.join(TRANSFER_SYNTAXES)}, got {transfer_syntax!r}")
    if photometric is not None and photometric not in PHOTOMETRICS:
        raise ConfigError("photometric", f"must be MONOCHROME2, MONOCHROME1 or unset, got {photometric!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_IMAGES:
        raise ConfigError("n", f"must be a whole number from 1 to {MAX_IMAGES}, got {n!r}")
    size = check_size(size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    layouts = ["cbis-ddsm", "folder"] if layout == "both" else [layout]
    images = []
    for i, (patient, lat, view) in enumerate(plan_views(np.random.default_rng([seed, 1]), int(n))):
        # One generator per image: image i is the same whatever n is.
        mammo = synthesize_mammogram(np.random.default_rng([seed, 100 + i]), size=size, laterality=lat, view=view)
        images.append(StudyImage(i, patient, lat, view, mammo))
    parts = []
    if "cbis-ddsm" in layouts:
        _write_cbis(out / "cbis-ddsm", images, seed, photometric, transfer_syntax)
        parts.append("cbis-ddsm/")
    if "folder" in layouts:
        _write_folder(out / "folder", images)
        parts.append("folder/")
    atomic_write_json(out / "ground_truth.json", _ground_truth(images, seed, size, layouts), indent=1, sort_keys=True)
    n_lesions = sum(len(img.mammo.lesions) for img in images)
    n_abnormal = sum(1 for img in images if img.mammo.lesions)
    n_patients = len({img.patient for img in images})
    return (f"wrote {len(images)} synthetic mammograms of {n_patients} patients ({n_abnormal} with lesions, {n_lesions} lesions) "
            f"to {out}: {', '.join(parts)}, ground_truth.json")
