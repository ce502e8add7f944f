"""Augmentation (mammocad.augment): image, mask and boxes move together; labels stay labels;
float images keep their 16-bit precision; probability-0 ops do nothing; seeded reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mammocad.augment import AugmentConfig, build_augment
from mammocad.datasets.rasterize import mask_to_box
from mammocad.errors import ConfigError

GEOMETRY_ONLY = dict(hflip_p=0.5, vflip_p=0.5, affine_p=1.0, degrees=30, scale=(0.8, 1.2),
                     brightness_p=0, contrast_p=0, blur_p=0, sharpen_p=0, noise_p=0)
EVERYTHING = dict(hflip_p=1, vflip_p=1, affine_p=1, brightness_p=1, contrast_p=1, blur_p=1, sharpen_p=1, noise_p=1)


def ellipse_mask(h=96, w=96, cy=40, cx=55, ry=18, rx=12) -> torch.Tensor:
    yy, xx = np.mgrid[:h, :w]
    return torch.from_numpy((((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1).astype(np.int64))


def bright_where_mask(mask: torch.Tensor, seed: int) -> torch.Tensor:
    noise = torch.from_numpy(np.random.default_rng(seed).uniform(0, 0.1, mask.shape).astype(np.float32))
    return (mask.float() * 0.8 + noise)[None]


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def test_mask_moves_with_image_under_flips_rotation_and_scale():
    aug = build_augment(GEOMETRY_ONLY)
    mask = ellipse_mask()
    moved = 0
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = aug(bright_where_mask(mask, seed), mask)
        assert image.shape == (1, 96, 96) and target.shape == (96, 96)
        assert iou(image[0] > 0.5, target == 1) >= 0.9, seed
        moved += iou(target == 1, mask == 1) < 0.8
    assert moved >= 8  # the transforms really moved the lesion (not a vacuous pass)


def test_boxes_follow_the_mask():
    aug = build_augment({**GEOMETRY_ONLY, "degrees": 25})
    mask = torch.zeros(96, 96, dtype=torch.int64)
    mask[30:50, 36:66] = 1  # a rectangle: the box of its rotated corners is the box of the rotated mask
    box = torch.tensor([[36.0, 30.0, 66.0, 50.0]])
    for seed in range(8):
        torch.manual_seed(seed)
        image, target, boxes = aug(bright_where_mask(mask, seed), mask, box)
        assert boxes.shape == (1, 4) and boxes.dtype == torch.float32
        from_mask = np.array(mask_to_box(target.numpy() == 1))
        assert np.abs(from_mask - boxes[0].numpy()).max() <= 2.0, (seed, from_mask, boxes)


def test_identity_config_and_probability_zero_leave_inputs_unchanged():
    image = torch.rand(1, 64, 64)
    target = (torch.rand(64, 64) > 0.7).long()
    box = torch.tensor([[3.0, 4.0, 20.0, 30.0]])
    out = build_augment(AugmentConfig.identity())(image, target, box)
    assert torch.equal(out[0], image) and torch.equal(out[1], target) and torch.equal(out[2], box)
    strong = dict(degrees=90, scale=(0.5, 2.0), brightness=0.9, contrast=0.9, blur_sigma=(2.0, 3.0),
                  sharpen_factor=5.0, noise_sigma=0.3)
    for p_name in ("hflip_p", "vflip_p", "affine_p", "brightness_p", "contrast_p", "blur_p", "sharpen_p", "noise_p"):
        cfg = {**AugmentConfig.identity().model_dump(), **strong, p_name: 0.0}
        torch.manual_seed(0)
        img, tgt = build_augment(cfg)(image, target)
        assert torch.equal(img, image) and torch.equal(tgt, target), p_name
        torch.manual_seed(0)
        changed, _ = build_augment({**cfg, p_name: 1.0})(image, target)
        assert not torch.equal(changed, image), p_name  # the same op at p=1 does change the image


def test_reproducible_under_torch_manual_seed():
    aug = build_augment(EVERYTHING)
    image, target = torch.rand(1, 48, 48), (torch.rand(48, 48) > 0.5).long()
    torch.manual_seed(3)
    a = aug(image, target)
    torch.manual_seed(3)
    b = aug(image, target)
    torch.manual_seed(4)
    c = aug(image, target)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_float_16bit_precision_range_and_dtypes_preserved():
    levels = np.arange(128 * 128, dtype=np.uint16).reshape(128, 128) * 3  # 16384 distinct 16-bit levels
    image = torch.from_numpy(levels.astype(np.float32) / 65535.0)[None]
    target = torch.zeros(128, 128, dtype=torch.uint8)
    target[40:80, 30:90] = 1
    torch.manual_seed(0)
    out, tgt = build_augment(EVERYTHING)(image, target)
    assert out.dtype == torch.float32 and tgt.dtype == torch.uint8
    assert out.unique().numel() > 5000  # far beyond the 256 an 8-bit round trip would leave
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    two_d, _ = build_augment(EVERYTHING)(image[0], target.long())
    assert two_d.shape == (128, 128)


def test_labels_stay_in_the_original_set():
    target = torch.zeros(80, 80, dtype=torch.int64)
    target[10:40, 10:40], target[45:70, 20:60], target[5:15, 50:75] = 1, 2, 255
    image = bright_where_mask((target > 0).long(), 0)
    aug = build_augment({**EVERYTHING, "mask_fill": 255})
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        _, tgt = aug(image, target)
        assert tgt.dtype == torch.int64
        seen |= set(tgt.unique().tolist())
    assert seen == {0, 1, 2, 255}  # no interpolated value such as 127 or 128


def test_intensity_ops_leave_target_and_boxes_alone():
    cfg = {**AugmentConfig.identity().model_dump(), "brightness_p": 1, "contrast_p": 1, "blur_p": 1,
           "sharpen_p": 1, "noise_p": 1}
    image, target, box = torch.rand(1, 40, 40), (torch.rand(40, 40) > 0.5).long(), torch.tensor([[1.0, 2.0, 9.0, 7.0]])
    img, tgt, bx = build_augment(cfg)(image, target, box)
    assert not torch.equal(img, image) and torch.equal(tgt, target) and torch.equal(bx, box)


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ConfigError, match="augment.hflip_p"):
        build_augment({"hflip_p": 1.5})
    with pytest.raises(ConfigError, match="scale"):
        build_augment({"scale": (1.2, 0.8)})
    with pytest.raises(ConfigError, match="augment.rotate"):
        build_augment({"rotate": 10})
    aug = build_augment()
    assert aug.cfg.vflip_p == 0.0 and aug.cfg.degrees == 30.0  # mammography defaults
    with pytest.raises(ValueError, match="float image"):
        aug((torch.rand(1, 8, 8) * 255).to(torch.uint8), torch.zeros(8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer label map"):
        aug(torch.rand(1, 8, 8), torch.zeros(8, 8))
