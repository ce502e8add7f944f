"""Plain image files keep their precision; bad files give one-line errors; writes are atomic."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tifffile

from conftest import shared_path
from mammocad.errors import InputError
from mammocad.io.images import float_to_uint16, read_image, write_png


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
