"""rasterize.py: mask files read on their STORED values (read_mask), and the pixel-centre rule for
boxes and circles (a box, the equal polygon and the bounding-box circle give the full-grid result)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mammocad.datasets.rasterize import read_mask, read_mask_values, rasterize_lesion
from mammocad.errors import AnnotationError
from mammocad.records import Lesion

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture: what ROI-mask DICOMs usually are
H, W = 40, 60


def block_mask(value: int, dtype=np.uint16) -> np.ndarray:
    """A 0/value mask: 10 x 20 block at rows 5..15, cols 8..28 (200 pixels)."""
    pixels = np.zeros((H, W), dtype=dtype)
    pixels[5:15, 8:28] = value
    return pixels


def write_mask_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", frames: int = 1,
                     window: tuple[float, float] | None = None) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SEG_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SEG_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(np.stack([pixels] * frames) if frames > 1 else pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# ---- read_mask: stored values, not display values --------------------------------------------------


def test_16_bit_dicom_mask_holding_0_255_is_read_on_stored_values(tmp_path):
    path = write_mask_dicom(tmp_path / "roi.dcm", block_mask(255))
    mask = read_mask(path)
    assert mask.dtype == np.bool_ and mask.shape == (H, W) and int(mask.sum()) == 200 and mask[5:15, 8:28].all()
    # rasterize_lesion draws the same pixels (thresholding the 0..1 display values at 0.5 gave 0 pixels)
    drawn = rasterize_lesion(Lesion(mask_path=str(path)), (H, W))
    assert np.array_equal(drawn, mask)


def test_window_in_the_header_does_not_empty_or_fill_a_mask(tmp_path):
    # A VOI window that puts 255 below the window (display 0) would empty the mask on display values.
    path = write_mask_dicom(tmp_path / "roi.dcm", block_mask(255), window=(30000.0, 1000.0))
    assert int(read_mask(path).sum()) == 200
    assert int(rasterize_lesion(Lesion(mask_path=str(path)), (H, W)).sum()) == 200


def test_monochrome1_mask_is_not_inverted(tmp_path):
    for dtype, value in ((np.uint8, 1), (np.uint16, 255)):
        path = write_mask_dicom(tmp_path / f"m1_{value}.dcm", block_mask(value, dtype), photometric="MONOCHROME1")
        mask = read_mask(path)
        assert int(mask.sum()) == 200 and mask[5:15, 8:28].all(), dtype  # display values gave all 2400 pixels
        assert np.array_equal(rasterize_lesion(Lesion(mask_path=str(path)), (H, W)), mask)


def test_label_value_selects_stored_values_of_a_dicom_label_mask(tmp_path):
    pixels = block_mask(3)
    pixels[20:30, 40:45] = 7
    path = write_mask_dicom(tmp_path / "labels.dcm", pixels, photometric="MONOCHROME1")
    assert sorted(np.unique(read_mask_values(path)).tolist()) == [0, 3, 7]
    assert int(rasterize_lesion(Lesion(mask_path=str(path), attributes={"label_value": 7}), (H, W)).sum()) == 50
    assert int(rasterize_lesion(Lesion(mask_path=str(path), attributes={"label_value": 3}), (H, W)).sum()) == 200


def test_png_mask_is_pixels_above_zero(tmp_path):
    path = tmp_path / "roi.png"
    pixels = block_mask(1, np.uint8)
    pixels[0, 0] = 255
    cv2.imwrite(str(path), pixels)
    mask = read_mask(path)
    assert int(mask.sum()) == 201 and mask[0, 0] and mask[5:15, 8:28].all()


def test_multi_frame_and_broken_dicom_masks_are_annotation_errors(tmp_path):
    multi = write_mask_dicom(tmp_path / "multi.dcm", block_mask(255), frames=3)
    with pytest.raises(AnnotationError, match=r"multi\.dcm: mask has 3 frames"):
        read_mask(multi)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(multi.read_bytes()[:400])  # header cut inside the pixel data
    with pytest.raises(AnnotationError, match=r"broken\.dcm: unreadable DICOM mask"):
        read_mask(broken)
    with pytest.raises(AnnotationError, match=r"broken\.dcm"):
        rasterize_lesion(Lesion(mask_path=str(broken)), (H, W))


# ---- boxes: the pixel-centre rule -----------------------------------------------------------------


def box_polygon(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def test_box_and_the_equal_polygon_give_the_same_mask():
    box = (0.6, 0.6, 3.4, 3.4)  # pixel centres 1.5 and 2.5 are inside: 2 x 2 pixels (floor/ceil gave 16)
    got = rasterize_lesion(Lesion(box=box), (H, W))
    assert int(got.sum()) == 4 and got[1:3, 1:3].all()
    assert np.array_equal(got, rasterize_lesion(Lesion(polygon=box_polygon(*box)), (H, W)))
    assert int(rasterize_lesion(Lesion(box=(10, 10, 30, 20)), (H, W)).sum()) == 200  # integer edges: exact
    rng = np.random.default_rng(0)
    for _ in range(50):  # fractional boxes, some over the border; centres never exactly on an edge
        x0, y0 = rng.uniform(-5, W - 5), rng.uniform(-5, H - 5)
        box = (x0, y0, x0 + rng.uniform(0.3, 25), y0 + rng.uniform(0.3, 25))
        assert np.array_equal(rasterize_lesion(Lesion(box=box), (H, W)),
                              rasterize_lesion(Lesion(polygon=box_polygon(*box)), (H, W))), box


# ---- circles: on the bounding box, identical to the full-grid formula -------------------------------


def full_grid_disc(cx: float, cy: float, r: float, shape: tuple[int, int]) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r**2


@pytest.mark.parametrize("circle", [
    (30.0, 20.0, 10.0),  # inside, centre on a pixel edge
    (30.5, 20.5, 10.0),  # centre on a pixel centre: boundary pixels exactly at distance r
    (2.3, 37.9, 8.7),  # crosses the left and bottom borders
    (58.0, 1.0, 15.25),  # crosses the right and top borders
    (-3.0, 20.0, 5.0),  # centre outside, disc reaches in
    (-30.0, -30.0, 5.0),  # entirely outside
    (10.2, 10.7, 0.4),  # smaller than a pixel
    (30.0, 20.0, 100.0),  # covers the whole image
])
def test_circle_on_its_bounding_box_equals_the_full_grid_formula(circle):
    got = rasterize_lesion(Lesion(circle=circle), (H, W))
    expected = full_grid_disc(*circle, (H, W))
    assert got.shape == (H, W) and got.dtype == np.bool_
    assert np.array_equal(got, expected)


def test_random_circles_equal_the_full_grid_formula():
    rng = np.random.default_rng(1)
    for _ in range(200):
        circle = (rng.uniform(-10, W + 10), rng.uniform(-10, H + 10), rng.uniform(0.1, 30))
        assert np.array_equal(rasterize_lesion(Lesion(circle=circle), (H, W)), full_grid_disc(*circle, (H, W))), circle
