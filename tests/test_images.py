"""Plain image files keep their precision; bad files give one-line errors; writes are atomic."""

from __future__ import annotations

import os
import stat

import cv2
import numpy as np
import pytest
import tifffile

from conftest import shared_path
from mammocad.errors import InputError
from mammocad.io.atomic import atomic_write_json
from mammocad.io.images import DEFAULT_MAX_PIXELS, float_to_uint16, read_image, write_png


def _ramp16() -> np.ndarray:
    return (np.arange(40 * 30, dtype=np.uint32).reshape(40, 30) * 53 % 65536).astype(np.uint16)


@pytest.mark.parametrize("suffix", [".png", ".pgm", ".tif"])
def test_16_bit_files_are_read_losslessly(tmp_path, suffix):
    a = _ramp16()
    path = tmp_path / f"img{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, a)
    else:
        assert cv2.imwrite(str(path), a)
    img = read_image(path)
    assert img.pixels.dtype == np.uint16 and np.array_equal(img.pixels, a)
    assert img.meta["bits_stored"] == 16 and img.shape == (40, 30)
    assert len(np.unique(img.as_float())) > 256


def test_8_bit_png_and_jpeg(tmp_path):
    a = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (20, 1))
    cv2.imwrite(str(tmp_path / "a.png"), a)
    cv2.imwrite(str(tmp_path / "a.jpg"), a, [cv2.IMWRITE_JPEG_QUALITY, 100])
    png, jpg = read_image(tmp_path / "a.png"), read_image(tmp_path / "a.jpg")
    assert png.pixels.dtype == np.uint8 and np.array_equal(png.pixels, a)
    assert jpg.pixels.dtype == np.uint8 and np.abs(jpg.pixels.astype(int) - a).max() <= 3
    assert png.as_float().max() == pytest.approx(240 / 255)


def test_colour_images_become_grey(tmp_path):
    grey = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "same.png"), np.dstack([grey] * 3))
    assert np.array_equal(read_image(tmp_path / "same.png").pixels, grey)  # equal channels: taken as is
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 200  # pure red in OpenCV's BGR order
    lum = read_image(tmp_path / "red.png") if cv2.imwrite(str(tmp_path / "red.png"), bgr) else None
    assert lum.pixels.ndim == 2 and abs(int(lum.pixels[0, 0]) - round(0.299 * 200)) <= 1


def test_real_mias_film_and_busi_scan():
    mias = read_image(shared_path("mias", "images", "mdb001.png"))
    assert mias.shape == (1024, 1024) and mias.pixels.dtype == np.uint8 and mias.pixels.max() > 200
    busi = read_image(shared_path("busi", "benign", "benign (16).png"))  # RGB file with equal channels
    assert busi.pixels.ndim == 2 and busi.pixels.dtype == np.uint8


@pytest.mark.parametrize("content, name, cause", [
    (b"", "empty.png", "unreadable or empty"),
    (b"not an image at all", "junk.png", "unreadable"),
    (b"II*\x00garbage", "junk.tif", "unreadable TIFF"),
    (b"hello", "notes.txt", "unsupported file type"),
])
def test_bad_files_give_one_line_errors(tmp_path, content, name, cause):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        read_image(path)
    assert str(err.value).startswith(str(path)) and cause in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="is a folder"):
        read_image(tmp_path)


def test_write_png_is_atomic_and_round_trips(tmp_path, monkeypatch):
    a = float_to_uint16(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64))
    write_png(tmp_path / "x.png", a)
    assert np.array_equal(read_image(tmp_path / "x.png").pixels, a)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        write_png(tmp_path / "y.png", a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no half file, no temp file left


def _huge_blank_png(path, width: int, height: int) -> None:
    """A valid 8-bit greyscale PNG of zeros, compressed row by row: a few hundred KB on disk,
    width x height bytes once decoded (without ever holding them in memory here)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_huge_png_is_refused_from_its_header(tmp_path, monkeypatch):
    """A 20000x20000 PNG took 7.6 GB to decode and preprocess: it is refused before decoding."""
    path = tmp_path / "huge.png"
    _huge_blank_png(path, 20000, 20000)
    assert path.stat().st_size < 2_000_000
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: pytest.fail("decoded a refused image"))
    with pytest.raises(InputError) as err:
        read_image(path)
    # (over ~179 MP Pillow names only the pixel count, not the dimensions)
    assert str(err.value) == (f"{path}: 400000000 pixels = 400.0 megapixels, over the limit of "
                              f"{DEFAULT_MAX_PIXELS / 1e6:g} megapixels (raise it with --max-pixels)")
    _huge_blank_png(path, 12000, 10000)  # under Pillow's own limit: the dimensions are named
    with pytest.raises(InputError, match=r"huge\.png: 12000x10000 pixels = 120\.0 megapixels, over the limit"):
        read_image(path)
    assert DEFAULT_MAX_PIXELS >= 5000 * 6000  # every real mammography detector fits


def test_pixel_limit_of_each_format(tmp_path):
    a = np.zeros((40, 30), np.uint8)
    for suffix in (".png", ".jpg", ".pgm", ".tif", ".bmp"):
        path = tmp_path / f"a{suffix}"
        tifffile.imwrite(path, a) if suffix == ".tif" else cv2.imwrite(str(path), a)
        assert read_image(path, max_pixels=1200).shape == (40, 30)  # at the limit: read
        with pytest.raises(InputError, match=r"30x40 pixels = 0\.0 megapixels, over the limit of 0\.001199"):
            read_image(path, max_pixels=1199)
    stack = tmp_path / "stack.tif"  # imread reads every page of the first series: all of them count
    tifffile.imwrite(stack, np.zeros((5, 40, 30), np.uint8))
    with pytest.raises(InputError, match=r"30x40 pixels x 5 frames"):
        read_image(stack, max_pixels=3000)
    assert read_image(tmp_path / "a.png", max_pixels=None).shape == (40, 30)  # no limit


@pytest.mark.realdata
def test_pixel_limit_of_dicom_counts_every_frame():
    nm = shared_path("dicom", "dcm4che", "NM-MONO2-16-13x-heart")  # 64x64, 13 frames, no suffix
    with pytest.raises(InputError, match=r"64x64 pixels x 13 frames = 0\.1 megapixels"):
        read_image(nm, max_pixels=13 * 64 * 64 - 1, frame=0)
    assert read_image(nm, max_pixels=13 * 64 * 64, frame=0).shape == (64, 64)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_get_the_mode_the_umask_allows(tmp_path, umask, mode):
    """mkstemp makes 0600 files whatever the umask: outputs must be readable as the umask allows."""
    old = os.umask(umask)
    try:
        write_png(tmp_path / "x.png", np.zeros((4, 4), np.uint8))
        atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.png").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == mode
