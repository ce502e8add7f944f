"""DICOM ingest against every file of ../shared/data/dicom (see its DATA.md) plus a few synthetic cases."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_windowing, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import shared_path
from mammocad.errors import ConfigError, DicomError, MammocadError
from mammocad.io import dicom as dicom_module
from mammocad.io.dicom import read_dicom, read_dicom_metadata
from mammocad.io.dicom_voi import inversion
from mammocad.io.images import read_image

pytestmark = pytest.mark.realdata

# Every file of shared/data/dicom: ("ok", (rows, cols), frames, inverted, voi applied by default)
# or ("error", cause substring). The table must list all 47 (checked below).
FILES = {
    "dcm4che/3gb-bulk-data-truncated": ("error", "invalid Rows value"),
    "dcm4che/NM-MONO2-16-13x-heart": ("ok", (64, 64), 13, False, "window:0"),
    "dicom-test-files/MG1_J2KI": ("ok", (4664, 3064), 1, False, "window:0"),
    "dicom-test-files/RG1_J2KI": ("ok", (1955, 1841), 1, True, "window:0"),
    "dicom-test-files/RG2_JPLY": ("error", "cannot decode JPEG Extended (Process 2 and 4) pixel data: pylibjpeg"),
    "dicom-test-files/RG3_J2KI": ("ok", (1760, 1760), 1, True, "window:0"),
    "dicom-test-files/RG3_J2KR": ("ok", (1760, 1760), 1, True, "window:0"),
    "dicom-test-files/RG3_JLSL": ("ok", (1760, 1760), 1, True, "window:0"),
    "dicom-test-files/RG3_JLSN": ("ok", (1760, 1760), 1, True, "window:0"),
    "dicom-test-files/RG3_JPLL": ("ok", (1760, 1760), 1, True, "window:0"),
    "dicom-test-files/RG3_JPLY": ("error", "misplaced marker segment"),
    "dicom-test-files/RG3_RLE": ("ok", (1760, 1760), 1, True, "window:0"),
    "fo-dicom/CR-MONO1-10-chest": ("ok", (440, 440), 1, True, "window:0"),
    "fo-dicom/CR-ModalitySequenceLUT.dcm": ("ok", (1576, 1976), 1, True, "none"),
    "fo-dicom/GH133.dcm": ("ok", (3062, 2394), 1, False, "lut:0"),
    "fo-dicom/GH177_D_CLUNIE_CT1_IVRLE_BigEndian_undefined_length.dcm": ("error", "unreadable DICOM (No tag to read"),
    "fo-dicom/HasFragmentSequence.dcm": ("ok", (512, 512), 96, False, "none"),
    "fo-dicom/OutOfBoundsOverlay.dcm": ("ok", (788, 1318), 1, False, "window:0"),
    "highdicom/dx_image.dcm": ("ok", (169, 211), 1, True, "window:0"),
    "pydicom/693_J2KI.dcm": ("ok", (512, 512), 1, False, "window:0"),
    "pydicom/CT_small.dcm": ("ok", (128, 128), 1, False, "none"),
    "pydicom/J2K_pixelrep_mismatch.dcm": ("ok", (512, 512), 1, False, "window:0"),
    "pydicom/JPEG-lossy.dcm": ("error", "cannot decode JPEG Extended"),
    "pydicom/JPEG2000-embedded-sequence-delimiter.dcm": ("error", "cannot decode JPEG 2000 Image Compression pixel data"),
    "pydicom/JPEGLSNearLossless_16.dcm": ("ok", (50, 10), 1, False, "none"),
    "pydicom/JPGExtended.dcm": ("ok", (1024, 256), 1, False, "none"),
    "pydicom/MR_truncated.dcm": ("error", "pixel data is less than expected (8130 vs 8192 bytes)"),
    "pydicom/badVR.dcm": ("error", "invalid NumberOfFrames value '1A'"),
    "pydicom/image_dfl.dcm": ("ok", (512, 512), 1, False, "none"),
    "pydicom/meta_missing_tsyntax.dcm": ("error", "missing Rows, Columns, BitsAllocated"),
    "pydicom/no_meta.dcm": ("error", "not a DICOM image"),
    "pydicom-data/JLSL_16_15_1_1F.dcm": ("ok", (128, 128), 1, False, "none"),
    "pydicom-data/bad_sequence.dcm": ("ok", (512, 512), 1, False, "window:0"),
    "pydicom-data/emri_small.dcm": ("ok", (64, 64), 10, False, "none"),
    "pydicom-data/emri_small_RLE.dcm": ("ok", (64, 64), 10, False, "none"),
    "pydicom-data/emri_small_jpeg_2k_lossless.dcm": ("ok", (64, 64), 10, False, "none"),
    "pydicom-data/emri_small_jpeg_2k_lossless_too_short.dcm": ("error", "truncated file: End of file reached"),
    "pydicom-data/emri_small_jpeg_ls_lossless.dcm": ("ok", (64, 64), 10, False, "none"),
    "pydicom-data/mlut_18.dcm": ("ok", (512, 512), 1, False, "none"),
    "pydicom-data/vlut_04.dcm": ("ok", (512, 512), 1, False, "lut:0"),
    "pylibjpeg-data/966_fixed.dcm": ("ok", (2128, 2000), 1, True, "window:0"),
    "pylibjpeg-data/JPEGBaseline_1s_1f_u_08_08.dcm": ("ok", (100, 100), 1, False, "none"),
    "pylibjpeg-data/JPEGLosslessP14SV1_1s_1f_u_16_16.dcm": ("ok", (535, 800), 1, False, "none"),
    "pylibjpeg-data/JPEGLossless_1s_1f_i_16_16_bad.dcm": ("error", "decoded pixels look like noise"),
    "pylibjpeg-data/JPEGLossless_1s_1f_u_16_12.dcm": ("ok", (1024, 1024), 1, False, "window:0"),
    "pylibjpeg-data/RG2_JPLY_fixed.dcm": ("ok", (2140, 1760), 1, False, "window:0"),
    "weasis-dicom-tools/jpeg2000-multiframe-multifragments.dcm": ("ok", (256, 256), 19, False, "none"),
}
META_KEYS = {
    "modality", "laterality", "view", "presentation_intent", "pixel_spacing", "pixel_spacing_tag", "manufacturer",
    "patient_id", "study_uid", "series_uid", "sop_uid", "photometric", "bits_stored", "transfer_syntax", "n_frames",
    "frame", "rows", "columns", "inverted", "voi", "voi_options", "notes",
}


def dicom(rel: str) -> Path:
    return shared_path("dicom", rel)


def test_table_lists_every_dicom_file():
    manifest = dicom("MANIFEST.sha256").read_text().split("\n")
    names = {line.split(None, 1)[1] for line in manifest if line.strip()}
    images = {n for n in names if not any(k in n.lower() for k in ("license", "readme"))}
    assert len(images) == 47
    assert images == set(FILES)


SLOW_FILES = {"dicom-test-files/MG1_J2KI", "pylibjpeg-data/966_fixed.dcm"}  # large JPEG 2000: 2-4 s each


@pytest.mark.parametrize("rel", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW_FILES else r for r in sorted(FILES)])
def test_every_file(rel):
    path = dicom(rel)
    expected = FILES[rel]
    if expected[0] == "error":
        with pytest.raises(DicomError) as info:
            read_dicom(path, frame=0)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "\n" not in message
        assert expected[1] in info.value.cause
        return
    _, shape, n_frames, inverted, voi_name = expected
    image = read_dicom(path, frame=n_frames // 2)
    px = image.pixels
    assert px.dtype == np.float32 and px.shape == shape == image.shape
    assert np.all(np.isfinite(px)) and px.min() >= 0.0 and px.max() <= 1.0
    assert float(np.ptp(px)) > 0.02 and float(px.std()) > 0.003  # non-constant
    assert META_KEYS <= set(image.meta)
    assert (image.meta["rows"], image.meta["columns"]) == shape
    assert image.meta["n_frames"] == n_frames and image.meta["frame"] == n_frames // 2
    assert image.meta["inverted"] is inverted
    assert image.meta["voi"]["name"] == voi_name
    assert image.valid is None or (image.valid.dtype == bool and image.valid.shape == shape)


HEADER_ERRORS = {  # files whose header itself is unusable; the others fail only on their pixels
    "dcm4che/3gb-bulk-data-truncated", "fo-dicom/GH177_D_CLUNIE_CT1_IVRLE_BigEndian_undefined_length.dcm",
    "pydicom/badVR.dcm", "pydicom/meta_missing_tsyntax.dcm", "pydicom/no_meta.dcm",
}


@pytest.mark.parametrize("rel", sorted(FILES))
def test_every_file_metadata(rel):
    path = dicom(rel)
    if rel in HEADER_ERRORS:
        with pytest.raises(DicomError, match=FILES[rel][1].replace("(", "\\(")):
            read_dicom_metadata(path)
        return
    meta = read_dicom_metadata(path)
    assert META_KEYS <= set(meta) and meta["frame"] is None
    if FILES[rel][0] == "ok":
        assert (meta["rows"], meta["columns"]) == FILES[rel][1] and meta["n_frames"] == FILES[rel][2]
        assert meta["voi"]["name"] == FILES[rel][4] and meta["inverted"] is FILES[rel][3]


# --- GH133: GE Senographe mammogram, 3 VOI LUTs + 3 SIGMOID windows + padding 0..30 -----------------


@pytest.fixture(scope="module")
def gh133():
    path = dicom("fo-dicom/GH133.dcm")
    ds = pydicom.dcmread(path)
    return path, ds, pixel_array(ds)


BREAST = (slice(1400, 1700), slice(1700, 2000))  # dense tissue in the middle of the breast (right side)
BACKGROUND = (slice(100, 400), slice(100, 400))  # air, top left


def test_gh133_default_is_first_voi_lut_item_and_breast_is_bright(gh133):
    path, ds, stored = gh133
    image = read_dicom(path)
    voi = image.meta["voi"]
    assert (voi["kind"], voi["index"], voi["explanation"]) == ("lut", 0, "NORMAL")
    px = image.pixels
    assert px[BREAST].mean() > 0.3 and px[BACKGROUND].max() == 0.0
    # value check: display = LUTData[stored - first_mapped] / (2**12 - 1), stored below 625 -> entry 0
    item = ds.VOILUTSequence[0]
    lut = np.asarray(item.LUTData, dtype=np.float64)
    first = item.LUTDescriptor[1]
    expect = lut[np.clip(stored[::97, ::89].astype(np.int64) - first, 0, len(lut) - 1)] / 4095.0
    np.testing.assert_allclose(px[::97, ::89], expect, atol=1e-6)
    assert not image.meta["inverted"] and image.meta["laterality"] == "R" and image.meta["view"] == "MLO"


def test_gh133_lists_all_voi_options(gh133):
    path, ds, _ = gh133
    options = read_dicom_metadata(path)["voi_options"]
    assert [o["name"] for o in options] == ["lut:0", "lut:1", "lut:2", "window:0", "window:1", "window:2"]
    assert [o["explanation"] for o in options] == ["NORMAL", "HARDER", "SOFTER"] * 2
    assert [(o["center"], o["width"], o["function"]) for o in options[3:]] == [
        (2653.0, 900.0, "SIGMOID"), (2713.0, 750.0, "SIGMOID"), (2569.0, 1050.0, "SIGMOID")]


def test_gh133_sigmoid_window(gh133):
    path, ds, stored = gh133
    image = read_dicom(path, voi_function="SIGMOID")
    voi = image.meta["voi"]
    assert (voi["kind"], voi["index"], voi["function"], voi["center"], voi["width"]) == ("window", 0, "SIGMOID", 2653.0, 900.0)
    px = image.pixels
    assert px.min() > 0.0 and px.max() < 1.0  # a sigmoid never reaches its asymptotes
    sample = stored[::53, ::47].astype(np.float64)
    np.testing.assert_allclose(px[::53, ::47], 1.0 / (1.0 + np.exp(-4.0 * (sample - 2653.0) / 900.0)), atol=2e-6)
    at_center = stored == 2653
    assert at_center.any() and np.allclose(px[at_center], 0.5, atol=1e-6)
    # S-curve: steepest at the centre, flat at the ends
    assert px[stored == 2653 + 450].mean() == pytest.approx(1 / (1 + np.exp(-2)), abs=1e-5)
    # GE's NORMAL VOI LUT item is this very sigmoid, tabulated to 12 bits: same picture, except that
    # the LUT reaches 0 on the background and the sigmoid does not
    default = read_dicom(path).pixels
    assert 0 < np.abs(default - px).max() < 2e-4 and default.min() == 0.0
    assert px[BREAST].mean() > 0.3 and px[BACKGROUND].max() < 1e-5
    softer = read_dicom(path, voi="window:SOFTER").pixels  # a wider window: less contrast in the breast
    assert softer[BREAST].std() < px[BREAST].std() and np.abs(softer - px).max() > 0.05


def test_gh133_voi_selection_forms(gh133):
    path, _, _ = gh133
    assert read_dicom_metadata(path)["voi"]["name"] == "lut:0"
    cases = {
        "SOFTER": "lut:2", "softer": "lut:2", 2: "lut:2", "2": "lut:2", "lut:HARDER": "lut:1", "lut:1": "lut:1",
        "window:1": "window:1", "window:softer": "window:2", "window": "window:0",
    }
    for voi, name in cases.items():
        assert dicom_module.choose_voi(pydicom.dcmread(path, stop_before_pixels=True), voi, None, "x")[0].name == name, voi
    # an explanation with a function goes to the window of that name; the file's SIGMOID is used by default
    image = read_dicom(path, voi="SOFTER", voi_function="LINEAR")
    assert (image.meta["voi"]["name"], image.meta["voi"]["function"]) == ("window:2", "LINEAR")
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0  # LINEAR saturates
    assert read_dicom(path, voi="window:0").meta["voi"]["function"] == "SIGMOID"


def test_gh133_voi_selection_errors(gh133):
    path, _, _ = gh133
    with pytest.raises(DicomError, match="no VOI 'BRIGHTER'.*available: lut:0 \\(NORMAL\\)"):
        read_dicom(path, voi="BRIGHTER")
    with pytest.raises(DicomError, match="no VOI lut 3"):
        read_dicom(path, voi=3)
    with pytest.raises(ConfigError, match="windows only"):
        read_dicom(path, voi="lut:0", voi_function="SIGMOID")
    with pytest.raises(ConfigError, match="not one of"):
        read_dicom(path, voi_function="GAMMA")
    with pytest.raises(ConfigError):
        read_dicom(path, voi=1.5)


def test_gh133_no_voi_scales_stored_range(gh133):
    path, _, stored = gh133
    for image in (read_dicom(path, voi=None), read_dicom(path, apply_voi=False)):
        assert image.meta["voi"]["kind"] == "none"
        np.testing.assert_allclose(image.pixels[::61, ::59], stored[::61, ::59] / 4095.0, atol=1e-6)
    auto = read_dicom(path, voi="auto")
    assert auto.meta["voi"]["kind"] == "auto" and auto.pixels.max() == 1.0
    assert auto.meta["voi"]["center"] == pytest.approx((31 + int(stored.max())) / 2)  # padding (0..30) excluded


def test_gh133_padding_mask(gh133):
    path, _, stored = gh133
    valid = read_dicom(path).valid
    padding = (stored >= 0) & (stored <= 30)  # PixelPaddingValue 0, PixelPaddingRangeLimit 30
    assert np.array_equal(~valid, padding) and padding.sum() > 1_000_000
    assert not valid[BACKGROUND].any() and valid[BREAST].all()


# --- polarity: MONOCHROME1, PresentationLUTShape ---------------------------------------------------


def _region(px, r0, r1, c0, c1):
    h, w = px.shape
    return float(px[int(r0 * h):int(r1 * h), int(c0 * w):int(c1 * w)].mean())


def test_dx_monochrome1_inverse_is_inverted_once():
    path = dicom("highdicom/dx_image.dcm")  # MONOCHROME1 + PresentationLUTShape INVERSE, dog thorax
    image = read_dicom(path)
    assert image.meta["inverted"] is True and image.meta["photometric"] == "MONOCHROME1"
    lung = _region(image.pixels, 0.35, 0.55, 0.5, 0.62)
    spine = _region(image.pixels, 0.2, 0.28, 0.6, 0.8)
    air = _region(image.pixels, 0.0, 0.05, 0.0, 1.0)
    assert air < lung < spine and spine - lung > 0.2
    ds = pydicom.dcmread(path)  # cross-check against pydicom's windowing applied to the whole image
    ref = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds) / 255.0
    np.testing.assert_allclose(image.pixels, 1.0 - ref, atol=1e-6)


@pytest.mark.parametrize("rel", [pytest.param("pylibjpeg-data/966_fixed.dcm", marks=pytest.mark.slow), "fo-dicom/CR-MONO1-10-chest"])
def test_chest_lungs_dark_mediastinum_bright(rel):
    image = read_dicom(dicom(rel))
    assert image.meta["inverted"] is True
    right_lung = _region(image.pixels, 0.3, 0.55, 0.12, 0.3)
    mediastinum = _region(image.pixels, 0.3, 0.55, 0.46, 0.54)
    assert mediastinum - right_lung > 0.15


def test_inversion_rule():
    def ds_of(photometric, shape=None):
        ds = Dataset()
        ds.PhotometricInterpretation = photometric
        if shape:
            ds.PresentationLUTShape = shape
        return ds

    assert inversion(ds_of("MONOCHROME1"))[0] is True
    assert inversion(ds_of("MONOCHROME1", "INVERSE"))[0] is True  # once, not twice
    assert inversion(ds_of("MONOCHROME2", "INVERSE"))[0] is True
    assert inversion(ds_of("MONOCHROME2", "IDENTITY"))[0] is False
    inverted, notes = inversion(ds_of("MONOCHROME1", "IDENTITY"))  # PresentationLUTShape decides
    assert inverted is False and "IDENTITY" in notes[0]


# --- compressed syntaxes, multi-frame, LUTs, mismatches ------------------------------------------


def test_rg3_encodings_agree():
    ref = read_dicom(dicom("dicom-test-files/RG3_RLE")).pixels
    for name in ("RG3_J2KR", "RG3_JLSL", "RG3_JPLL"):  # lossless: identical
        assert np.array_equal(read_dicom(dicom(f"dicom-test-files/{name}")).pixels, ref), name
    for name in ("RG3_J2KI", "RG3_JLSN"):  # lossy: close
        diff = np.abs(read_dicom(dicom(f"dicom-test-files/{name}")).pixels - ref)
        assert 0 < diff.mean() < 0.002 and diff.max() < 0.02, name


def test_fast_jpeg_lossless_matches_pydicom():
    pytest.importorskip("imagecodecs")
    for rel in ("fo-dicom/GH133.dcm", "fo-dicom/OutOfBoundsOverlay.dcm", "dicom-test-files/RG3_JPLL",
                "pylibjpeg-data/JPEGLossless_1s_1f_u_16_12.dcm", "pylibjpeg-data/JPEGLosslessP14SV1_1s_1f_u_16_16.dcm"):
        ds = pydicom.dcmread(dicom(rel))
        fast = dicom_module._fast_jpeg_lossless(ds, ds.file_meta.TransferSyntaxUID, 1, None)
        assert fast is not None and np.array_equal(fast, pixel_array(ds)), rel


def test_multiframe_needs_a_frame_and_decodes_only_that_frame(monkeypatch):
    path = dicom("fo-dicom/HasFragmentSequence.dcm")  # XA, 96 JPEG frames
    with pytest.raises(DicomError, match="has 96 frames: choose one with frame=0..95"):
        read_dicom(path)
    for bad in (96, -1):
        with pytest.raises(DicomError, match="out of range: the file has 96 frame"):
            read_dicom(path, frame=bad)
    calls = []

    def spy(ds, **kwargs):
        calls.append(kwargs.get("index"))
        return pixel_array(ds, **kwargs)

    monkeypatch.setattr(dicom_module, "pixel_array", spy)
    first, later = read_dicom(path, frame=0), read_dicom(path, frame=60)
    assert calls == [0, 60] and first.meta["frame"] == 0 and later.meta["frame"] == 60
    assert np.abs(first.pixels - later.pixels).mean() > 0.01


def test_multiframe_encodings_agree_per_frame():
    ds = pydicom.dcmread(dicom("pydicom-data/emri_small.dcm"))
    frames = ds.pixel_array  # 10 x 64 x 64, 12 bits, no VOI -> stored / 4095
    for rel in ("emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm"):
        for k in (0, 7):
            np.testing.assert_allclose(read_dicom(dicom(f"pydicom-data/{rel}"), frame=k).pixels, frames[k] / 4095.0, atol=1e-6)


def test_modality_lut_sequence_and_voi_lut_sequence():
    image = read_dicom(dicom("pydicom-data/mlut_18.dcm"))  # signed input, first mapped -2048, 16-bit output
    ds = pydicom.dcmread(dicom("pydicom-data/mlut_18.dcm"))
    np.testing.assert_allclose(image.pixels, apply_modality_lut(ds.pixel_array, ds) / 65535.0, atol=1e-6)
    vlut = read_dicom(dicom("pydicom-data/vlut_04.dcm"))  # 8-bit in, 16-bit LUT out
    assert vlut.meta["voi"]["name"] == "lut:0"
    assert vlut.pixels.min() == 0.0 and vlut.pixels.max() == 1.0
    cr = read_dicom(dicom("fo-dicom/CR-ModalitySequenceLUT.dcm"))
    assert cr.meta["inverted"] and cr.meta["voi"]["kind"] == "none"


def test_empty_lut_items_are_ignored_with_a_note():
    image = read_dicom(dicom("pylibjpeg-data/JPEGLosslessP14SV1_1s_1f_u_16_16.dcm"))
    assert "ignored 1 empty ModalityLUTSequence item(s)" in image.meta["notes"]
    assert "ignored 1 empty VOILUTSequence item(s)" in image.meta["notes"]
    assert image.meta["voi"]["kind"] == "none" and image.meta["voi_options"] == []


def test_j2k_header_codestream_mismatches_are_recorded():
    signed = read_dicom(dicom("pydicom/J2K_pixelrep_mismatch.dcm"))
    assert any("sign-corrected" in n for n in signed.meta["notes"])
    ds = pydicom.dcmread(dicom("pydicom/J2K_pixelrep_mismatch.dcm"))
    assert int(pixel_array(ds).min()) == -2000  # sign-corrected CT air, not 6192
    precision = read_dicom(dicom("pydicom/693_J2KI.dcm"))
    assert "J2K codestream precision 16 bits, BitsStored 14: header kept" in precision.meta["notes"]


def test_padding_on_signed_ct():
    image = read_dicom(dicom("pydicom/CT_small.dcm"))  # PixelPaddingValue -2000 (stored)
    stored = pydicom.dcmread(dicom("pydicom/CT_small.dcm")).pixel_array
    assert np.array_equal(image.valid, stored != -2000)
    overlay = read_dicom(dicom("fo-dicom/OutOfBoundsOverlay.dcm"))  # padding 0 declared, none present
    assert overlay.valid is not None and overlay.valid.all()
    assert read_dicom(dicom("fo-dicom/CR-MONO1-10-chest")).valid is None


def test_noise_check_accepts_images_and_rejects_noise(tmp_path):
    rng = np.random.default_rng(0)
    smooth = np.add.outer(np.arange(200), np.arange(300)).astype(np.uint16)
    dicom_module._reject_noise(smooth + rng.integers(0, 20, smooth.shape).astype(np.uint16), tmp_path / "a.dcm")
    with pytest.raises(DicomError, match="look like noise"):
        dicom_module._reject_noise(rng.integers(0, 4096, (200, 300)).astype(np.uint16), tmp_path / "b.dcm")


# --- metadata --------------------------------------------------------------------------------------


def test_metadata_has_the_same_keys_and_reads_mammography_tags():
    path = dicom("fo-dicom/GH133.dcm")
    meta = read_dicom_metadata(path)
    assert set(meta) == set(read_dicom(path).meta)
    assert meta["modality"] == "MG" and meta["laterality"] == "R" and meta["view"] == "MLO"
    assert meta["presentation_intent"] == "FOR PRESENTATION" and meta["manufacturer"] == "GE MEDICAL SYSTEMS"
    assert meta["pixel_spacing"] == pytest.approx([0.09409090909091] * 2) and meta["pixel_spacing_tag"] == "ImagerPixelSpacing"
    assert meta["transfer_syntax"] == "1.2.840.10008.1.2.4.70" and meta["bits_stored"] == 12
    assert meta["photometric"] == "MONOCHROME2" and meta["n_frames"] == 1 and meta["frame"] is None
    assert meta["sop_uid"] and meta["study_uid"] and meta["series_uid"] and meta["patient_id"]
    other = read_dicom_metadata(dicom("fo-dicom/OutOfBoundsOverlay.dcm"))
    assert (other["laterality"], other["view"]) == ("L", "CC")
    wg04 = read_dicom_metadata(dicom("dicom-test-files/MG1_J2KI"))  # Laterality, not ImageLaterality
    assert (wg04["laterality"], wg04["view"], wg04["pixel_spacing"]) == ("L", "MLO", None)
    dx = read_dicom_metadata(dicom("highdicom/dx_image.dcm"))
    assert dx["pixel_spacing"] == pytest.approx([1.2, 1.2012]) and dx["pixel_spacing_tag"] == "PixelSpacing"
    enhanced = read_dicom_metadata(dicom("weasis-dicom-tools/jpeg2000-multiframe-multifragments.dcm"))
    assert enhanced["n_frames"] == 19 and enhanced["pixel_spacing_tag"] == "SharedFunctionalGroups/PixelSpacing"


def test_view_from_view_code_sequence(tmp_path):
    ds = pydicom.dcmread(dicom("fo-dicom/OutOfBoundsOverlay.dcm"), stop_before_pixels=True)
    del ds.ViewPosition  # leaves ViewCodeSequence 'cranio-caudal'
    ds.ImageLaterality = ""
    ds.Laterality = "L"
    ds.save_as(tmp_path / "cc.dcm")
    meta = read_dicom_metadata(tmp_path / "cc.dcm")
    assert (meta["view"], meta["laterality"]) == ("CC", "L")


def test_pydicom_warnings_do_not_leak(caplog):
    path = dicom("pydicom-data/bad_sequence.dcm")  # invalid UI values -> pydicom warns on access
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG, logger="pydicom"):
        warnings.simplefilter("always")
        image = read_dicom(path)
    assert caught == [] and caplog.records == []
    assert any(n.startswith("Invalid value for VR UI") for n in image.meta["notes"])


# --- not DICOM, read_image, colour ------------------------------------------------------------


def test_non_dicom_inputs(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("this is not a DICOM file\n" * 20)
    png = tmp_path / "image.dcm"
    png.write_bytes(shared_path("mias", "images", "mdb001.png").read_bytes())
    for path in (text, png):
        with pytest.raises(DicomError) as info:
            read_dicom(path)
        assert str(info.value).startswith(str(path)) and isinstance(info.value, MammocadError)
    with pytest.raises(DicomError, match="file not found"):
        read_dicom(tmp_path / "missing.dcm")


def test_truncated_copies(tmp_path):
    data = dicom("pydicom/CT_small.dcm").read_bytes()  # native pixel data at the end of the file
    for cut, cause in ((len(data) - 1000, "less than expected"), (3000, "missing Rows, Columns, BitsAllocated")):
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(DicomError, match=cause) as info:
            read_dicom(path)
        assert str(info.value).startswith(str(path))


def test_read_image_dispatches_dicom():
    path = dicom("fo-dicom/CR-MONO1-10-chest")  # no extension, no preamble
    image = read_image(path)
    assert image.meta["format"] == "dicom" and image.shape == (440, 440) and image.meta["inverted"]
    assert read_image(dicom("fo-dicom/HasFragmentSequence.dcm"), frame=3).meta["frame"] == 3
    assert read_image(dicom("fo-dicom/GH133.dcm"), voi="SOFTER").meta["voi"]["name"] == "lut:2"


def test_rgb_dicom_becomes_luminance(tmp_path):
    rgb = np.zeros((16, 24, 3), dtype=np.uint8)
    rgb[:, :8, 0] = 255  # red
    rgb[:, 8:16, 1] = 255  # green
    rgb[:, 16:] = np.linspace(0, 255, 8).astype(np.uint8)[None, :, None]  # grey ramp
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 16, 24, 3, 0
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = "RGB", 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(tmp_path / "rgb.dcm", enforce_file_format=True)
    image = read_dicom(tmp_path / "rgb.dcm")
    assert image.pixels.dtype == np.float32 and image.shape == (16, 24) and image.valid is None
    assert image.pixels[0, 0] == pytest.approx(0.299, abs=1e-3) and image.pixels[0, 8] == pytest.approx(0.587, abs=1e-3)
    np.testing.assert_allclose(image.pixels[0, 16:], np.linspace(0, 255, 8).astype(np.uint8) / 255.0, atol=1e-3)
    assert any("luminance" in n for n in image.meta["notes"])
