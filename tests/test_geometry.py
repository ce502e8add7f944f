"""Geometry: exact point/box maps, array maps that invert each other, JSON round trip."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from mammocad.preprocess.geometry import Geometry


def random_geometry(rng: np.random.Generator, source: tuple[int, int]) -> Geometry:
    """2-5 random steps: flips, crops keeping >= 60% per side, pads, resizes from x0.25 to x2."""
    g = Geometry(source)
    for _ in range(int(rng.integers(2, 6))):
        h, w = g.size
        op = rng.choice(["flip", "crop", "pad", "resize"])
        if op == "flip":
            g.flip()
        elif op == "crop":
            ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            g.crop(x0, y0, x0 + cw, y0 + ch)
        elif op == "pad":
            g.pad(*(int(v) for v in rng.integers(0, max(2, h // 5), size=4)))
        else:
            s = min(rng.uniform(0.25, 2.0), 1800 / max(h, w))  # keep arrays small enough for a quick test
            g.resize(max(8, round(h * s * rng.uniform(0.9, 1.1))), max(8, round(w * s * rng.uniform(0.9, 1.1))))
    return g


def scale_of(g: Geometry) -> float:
    """Smallest pixels-per-source-pixel factor reached anywhere along the chain (x or y): detail
    lost in an intermediate downscale does not come back with a later upscale."""
    smallest = 1.0
    for i in range(1, len(g.steps) + 1):
        p = Geometry(g.source_size, [dict(s) for s in g.steps[:i]]).forward_points([[0.0, 0.0], [1.0, 1.0]])
        smallest = min(smallest, float(np.min(np.abs(p[1] - p[0]))))
    return smallest


def surviving_box(g: Geometry) -> tuple[float, float, float, float]:
    """Source-coordinate box of what is still in the output: the intersection of every crop."""
    sh, sw = g.source_size
    x0, y0, x1, y1 = 0.0, 0.0, float(sw), float(sh)
    for i, step in enumerate(g.steps):
        if step["op"] == "crop":
            before = Geometry(g.source_size, [dict(s) for s in g.steps[:i]])
            bx0, by0, bx1, by1 = before.inverse_boxes([step["box"]])[0]
            x0, y0, x1, y1 = max(x0, bx0), max(y0, by0), min(x1, bx1), min(y1, by1)
    return x0, y0, x1, y1


def blob(shape: tuple[int, int], box: tuple[float, float, float, float], min_radius: float, rng) -> np.ndarray:
    """A union of 2 random ellipses inside ``box``, every radius >= ``min_radius`` source pixels."""
    mask = np.zeros(shape, dtype=np.uint8)
    x0, y0, x1, y1 = box
    for _ in range(2):
        rx = rng.uniform(min_radius, max(min_radius, (x1 - x0) / 3))
        ry = rng.uniform(min_radius, max(min_radius, (y1 - y0) / 3))
        r = max(rx, ry)  # a rotated ellipse reaches this far in x and in y
        if x1 - x0 < 2 * r + 6 or y1 - y0 < 2 * r + 6:
            rx = ry = r = min(rx, ry)
        cx = rng.uniform(x0 + r + 2, x1 - r - 2)
        cy = rng.uniform(y0 + r + 2, y1 - r - 2)
        cv2.ellipse(mask, (round(cx), round(cy)), (round(rx), round(ry)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("seed", range(24))
def test_random_geometry_round_trips_masks_points_and_boxes(seed):
    rng = np.random.default_rng(seed)
    # Blobs at least 50 pixels in radius on every grid of the chain (a thresholded boundary moves by
    # ~1/4 pixel per resize, so IoU >= 0.99 needs that), inside what survives the crops; draw again
    # until the random chain leaves room for one.
    while True:
        source = (int(rng.integers(300, 1200)), int(rng.integers(300, 1200)))
        g = random_geometry(rng, source)
        x0, y0, x1, y1 = surviving_box(g)
        min_r = max(10.0, 50.0 / scale_of(g))
        if min(x1 - x0, y1 - y0) >= 2 * min_r + 8:
            break
    mask = blob(source, (x0, y0, x1, y1), min_r, rng)

    out = g.forward_array(mask, kind="mask")
    assert out.shape == g.size and out.dtype == np.bool_
    back = g.inverse_array(out, kind="mask")
    assert back.shape == source
    assert iou(mask, back) >= 0.99, (g.steps, iou(mask, back))

    # The array map and the point map agree: the blob's centroid lands where the points say.
    ys, xs = np.nonzero(mask)
    centroid = [[xs.mean() + 0.5, ys.mean() + 0.5]]
    oys, oxs = np.nonzero(out)
    np.testing.assert_allclose(g.forward_points(centroid)[0], [oxs.mean() + 0.5, oys.mean() + 0.5], atol=1.0)

    pts = rng.uniform([0, 0], [source[1], source[0]], size=(50, 2))
    np.testing.assert_allclose(g.inverse_points(g.forward_points(pts)), pts, atol=1e-6)
    boxes = np.sort(rng.uniform(0, min(source), size=(20, 2, 2)), axis=1).reshape(20, 4)  # [[x0,y0],[x1,y1]]
    np.testing.assert_allclose(g.inverse_boxes(g.forward_boxes(boxes)), boxes, atol=1e-6)


def test_mammogram_sized_downscale_round_trip():
    """The real case: crop a 4084x3328 mammogram and shrink it to a 1024 long side, then flip."""
    g = Geometry((4084, 3328)).crop(400, 100, 3328, 4000).resize(1024, 769).flip()
    assert g.size == (1024, 769) and g.flipped
    mask = np.zeros((4084, 3328), dtype=np.uint8)
    cv2.ellipse(mask, (2500, 2000), (300, 180), 30, 0, 360, 1, -1)  # a 600-pixel mass: 150 output pixels
    mask = mask.astype(bool)
    out = g.forward_array(mask, kind="mask")
    assert abs(out.sum() / mask.sum() - (1024 / 3900) * (769 / 2928)) < 0.01 * (1024 / 3900) * (769 / 2928)
    assert iou(g.inverse_array(out, kind="mask"), mask) >= 0.99
    # Known values: source x=400 (crop edge) -> right edge after the flip; x=3328 -> 0.
    np.testing.assert_allclose(g.forward_points([[400, 100], [3328, 4000]]), [[769, 0], [0, 1024]], atol=1e-9)


def test_known_step_values():
    g = Geometry((10, 20)).flip()
    np.testing.assert_allclose(g.forward_points([[0.5, 3.0]]), [[19.5, 3.0]])
    g = Geometry((10, 20)).crop(5, 2, 15, 10).pad(top=1, left=3)
    assert g.size == (9, 13)
    np.testing.assert_allclose(g.forward_points([[5, 2]]), [[3, 1]])
    np.testing.assert_allclose(g.forward_boxes([[5, 2, 15, 10]]), [[3, 1, 13, 9]])
    img = np.arange(200, dtype=np.float32).reshape(10, 20)
    out = g.forward_array(img)
    assert out.shape == (9, 13) and out[1, 3] == img[2, 5] and out[0, 0] == 0
    back = g.inverse_array(out, fill=-1)
    assert back[2, 5] == img[2, 5] and back[0, 0] == -1


def test_arrays_with_wrong_shape_raise():
    g = Geometry((100, 80)).crop(10, 10, 70, 90).resize(40, 30)
    with pytest.raises(ValueError, match="does not match source size"):
        g.forward_array(np.zeros((80, 100)))
    with pytest.raises(ValueError, match="does not match geometry output size"):
        g.inverse_array(np.zeros((100, 80)))


def test_invalid_steps_raise():
    with pytest.raises(ValueError):
        Geometry((10, 10)).crop(0, 0, 11, 5)
    with pytest.raises(ValueError):
        Geometry((10, 10)).crop(5, 0, 5, 5)
    with pytest.raises(ValueError):
        Geometry((10, 10)).pad(left=-1)
    with pytest.raises(ValueError):
        Geometry((10, 10)).resize(0, 5)


def test_mask_dtypes_and_channels_are_kept():
    g = Geometry((64, 64)).resize(16, 16)
    m255 = np.zeros((64, 64), dtype=np.uint8)
    m255[16:48, 16:48] = 255
    out = g.forward_array(m255, kind="mask")
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 255} and (out == 255).sum() == 64
    labels = np.zeros((64, 64), dtype=np.int64)
    labels[:32] = 7
    assert set(np.unique(g.forward_array(labels, kind="nearest"))) == {0, 7}
    prob = np.random.default_rng(0).random((64, 64, 1)).astype(np.float32)
    assert g.forward_array(prob).shape == (16, 16, 1)
    assert g.inverse_array(g.forward_array(prob)).shape == (64, 64, 1)


def test_json_round_trip():
    rng = np.random.default_rng(7)
    g = random_geometry(rng, (300, 250))
    g2 = Geometry.from_dict(json.loads(json.dumps(g.to_dict())))
    assert g2.source_size == g.source_size and g2.size == g.size and g2.steps == g.steps and g2.flipped == g.flipped
    pts = rng.uniform(0, 250, size=(10, 2))
    np.testing.assert_array_equal(g2.forward_points(pts), g.forward_points(pts))
    img = rng.random((300, 250)).astype(np.float32)
    np.testing.assert_array_equal(g2.forward_array(img), g.forward_array(img))
