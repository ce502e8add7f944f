"""Builds a tiny CBIS-DDSM download (CSVs + synthetic DICOMs) in either layout, for tests.

Rows come from the real case-description CSVs (selected at test time, never copied into the
repository) or are written by hand; the DICOMs are synthetic: a 64x48 16-bit full image per image
folder, a 0/255 ROI mask of the same size and a small 16-bit cropped image per abnormality.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation
FULL_SHAPE = (64, 48)  # rows, columns
CROP_SHAPE = (12, 10)


def write_dicom(path: Path, pixels: np.ndarray, *, patient_id: str = "P_00000", series: str = "", modality: str = "MG") -> Path:
    """A minimal valid Part-10 MONOCHROME2 file (uint8 or uint16 pixels)."""
    pixels = np.ascontiguousarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MG_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.Modality = modality
    ds.SeriesDescription = series
    ds.Rows, ds.Columns = pixels.shape
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def read_real_rows(csv_path: Path, keys: set[tuple[str, str, str]]) -> tuple[list[str], list[list[str]]]:
    """Header and the rows of ``csv_path`` whose (patient, side, view) is in ``keys``, fields as written."""
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [r for r in reader if (r[0], r[2], r[3]) in keys]
    return header, rows


def _column(header: list[str], name: str) -> int:
    return [h.strip().lower().replace("_", " ") for h in header].index(name)


def mask_pixels(abnormality_id: int, shape: tuple[int, int] = FULL_SHAPE) -> np.ndarray:
    """The 0/255 mask written for an abnormality: a rectangle whose place depends on the id."""
    mask = np.zeros(shape, np.uint8)
    top = 4 * abnormality_id
    mask[top : top + 8, 4:10] = 255  # even-aligned, so a 2x downsample resizes back exactly
    return mask


def write_cbis_tree(
    raw_dir: Path,
    tables: dict[str, tuple[list[str], list[list[str]]]],
    layout: str = "csv",
    nbia_root: str = "",
    write_csvs: bool = True,
) -> dict[str, dict[str, Path]]:
    """Write CSVs (``tables``: file name -> (header, rows)) and the DICOMs they name.

    ``layout="csv"``: files at the CSV paths; the mask goes to the ``ROI mask file path`` of mass rows
    and to the ``cropped image file path`` of calc rows (the real calc CSVs swap them), so the
    adapter must tell them apart. ``layout="nbia"``: NBIA download names under ``raw_dir/nbia_root``;
    odd abnormality ids get one series holding 1-1.dcm (crop) and 1-2.dcm (mask), even ids two series.
    Returns {"images": folder -> path, "masks": roi folder -> path, "crops": roi folder -> path}.
    """
    rng = np.random.default_rng(0)
    made: dict[str, dict[str, Path]] = {"images": {}, "masks": {}, "crops": {}}
    base = raw_dir / nbia_root if layout == "nbia" else raw_dir
    for name, (header, rows) in tables.items():
        if write_csvs:
            raw_dir.mkdir(parents=True, exist_ok=True)
            with open(raw_dir / name, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows([header, *rows])
        col = {k: _column(header, k) for k in ("patient id", "abnormality id", "image file path", "roi mask file path", "cropped image file path")}
        for n, row in enumerate(rows):
            patient, abn_id = row[col["patient id"]], int(row[col["abnormality id"]])
            image_rel = row[col["image file path"]].strip()
            folder = image_rel.split("/")[0]
            roi_folder = f"{folder}_{abn_id}"
            full = (np.arange(FULL_SHAPE[0] * FULL_SHAPE[1], dtype=np.uint16).reshape(FULL_SHAPE) * 7)
            crop = rng.integers(100, 4000, CROP_SHAPE, dtype=np.uint16)
            if layout == "csv":
                image_path = base / image_rel
                roi_rel, crop_rel = row[col["roi mask file path"]].strip(), row[col["cropped image file path"]].strip()
                if folder.lower().startswith("calc"):
                    roi_rel, crop_rel = crop_rel, roi_rel
                mask_path, crop_path = base / roi_rel, base / crop_rel
            else:
                image_path = base / folder / f"07-20-2016-DDSM-NA-{10000 + n}" / f"1.000000-full mammogram images-{20000 + n}" / "1-1.dcm"
                study = base / roi_folder / f"08-29-2017-DDSM-NA-{30000 + n}"
                if abn_id % 2:
                    series = study / f"1.000000-ROI mask images-{40000 + n}"
                    crop_path, mask_path = series / "1-1.dcm", series / "1-2.dcm"
                else:
                    crop_path = study / f"1.000000-cropped images-{50000 + n}" / "1-1.dcm"
                    mask_path = study / f"1.000000-ROI mask images-{60000 + n}" / "1-1.dcm"
            if folder not in made["images"]:
                made["images"][folder] = write_dicom(image_path, full, patient_id=patient, series="full mammogram images")
            made["masks"][roi_folder] = write_dicom(mask_path, mask_pixels(abn_id), patient_id=patient, series="ROI mask images")
            made["crops"][roi_folder] = write_dicom(crop_path, crop, patient_id=patient, series="cropped images")
    return made
