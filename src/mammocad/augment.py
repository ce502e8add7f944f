"""Training augmentation of image + label map (+ boxes) with ``torchvision.transforms.v2``.

The image, target and boxes are wrapped as ``tv_tensors.Image`` / ``Mask`` / ``BoundingBoxes`` and
go through ONE transform call, so every geometric draw (flip, rotation, scale) moves all three
together; v2 resamples masks with nearest neighbour, so no interpolated label ever appears, and
leaves masks and boxes alone in the intensity transforms. Images stay float32 in [0, 1] from start
to end (never uint8: prepared images carry 16-bit precision): v2's brightness/contrast, blur,
sharpness and noise kernels all accept 1-channel float tensors and clamp floats to [0, 1].

Defaults are for mammography patches: horizontal flips (left/right breasts are mirror images) but
no vertical flip (upside-down MLO views, with the pectoral muscle at the bottom, do not occur; the
same holds for ultrasound, probe at the top), rotation up to 30 degrees, scale 0.8-1.2, mild
brightness/contrast, rare blur/sharpening, and noise of about 1% of the range. Areas the rotation
brings in from outside are 0 in the image (what prepared images hold outside the breast) and
``mask_fill`` in the target (0 = background by default; ``IGNORE_INDEX`` to leave them unscored).
"""

from __future__ import annotations

import math
from typing import Any

import pydantic
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from mammocad.errors import ConfigError

Probability = pydantic.confloat(ge=0.0, le=1.0)


class AugmentConfig(pydantic.BaseModel):
    """Every op has a probability (``*_p``) and a strength. ``AugmentConfig.identity()`` does nothing."""

    model_config = pydantic.ConfigDict(extra="forbid")

    hflip_p: Probability = 0.5
    vflip_p: Probability = 0.0  # anatomically implausible for MG (and US); enable for other data
    affine_p: Probability = 0.5
    degrees: float = pydantic.Field(30.0, ge=0.0, le=180.0)  # rotation drawn from [-degrees, degrees]
    scale: tuple[pydantic.PositiveFloat, pydantic.PositiveFloat] = (0.8, 1.2)
    translate: float = pydantic.Field(0.0, ge=0.0, le=1.0)  # fraction of the patch; sampling already moves patches
    brightness_p: Probability = 0.5
    brightness: float = pydantic.Field(0.1, ge=0.0, lt=1.0)  # multiplicative factor in [1-b, 1+b]: black stays black
    contrast_p: Probability = 0.5
    contrast: float = pydantic.Field(0.2, ge=0.0, lt=1.0)  # factor in [1-c, 1+c] around the patch mean
    blur_p: Probability = 0.1
    blur_sigma: tuple[pydantic.PositiveFloat, pydantic.PositiveFloat] = (0.1, 1.0)  # pixels
    sharpen_p: Probability = 0.1
    sharpen_factor: float = pydantic.Field(2.0, ge=0.0)  # 1 = unchanged, 2 = twice as sharp
    noise_p: Probability = 0.25
    noise_sigma: float = pydantic.Field(0.01, ge=0.0)  # Gaussian noise std on the [0, 1] scale
    mask_fill: int = pydantic.Field(0, ge=0, le=255)  # target value of areas rotated in from outside

    @pydantic.model_validator(mode="after")
    def _ranges(self) -> "AugmentConfig":
        for name in ("scale", "blur_sigma"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}")
        return self

    @classmethod
    def identity(cls) -> "AugmentConfig":
        """All probabilities 0: inputs come back unchanged."""
        return cls(hflip_p=0, vflip_p=0, affine_p=0, brightness_p=0, contrast_p=0, blur_p=0, sharpen_p=0, noise_p=0)


def _maybe(p: float, transform: Any) -> Any:
    return transform if p >= 1.0 else v2.RandomApply([transform], p=p)


class Augment:
    """``augment(image, target[, boxes])`` -> the same, transformed together (a class, not a closure,
    so that DataLoader workers can pickle it).

    image: float tensor (C,H,W) or (H,W) in [0, 1]; target: integer tensor (H,W) or (1,H,W);
    boxes: float tensor (N, 4) [x0, y0, x1, y1] in pixel-edge coordinates (as in ``records``).
    Boxes come back as the box around the transformed corners, clamped to the patch.
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        c = cfg
        ops: list[Any] = []
        if c.hflip_p > 0:
            ops.append(v2.RandomHorizontalFlip(p=c.hflip_p))
        if c.vflip_p > 0:
            ops.append(v2.RandomVerticalFlip(p=c.vflip_p))
        if c.affine_p > 0:
            ops.append(_maybe(c.affine_p, v2.RandomAffine(
                degrees=c.degrees, translate=(c.translate, c.translate) if c.translate > 0 else None, scale=c.scale,
                interpolation=v2.InterpolationMode.BILINEAR,  # images only: v2 always uses nearest for masks
                fill={tv_tensors.Image: 0.0, tv_tensors.Mask: c.mask_fill})))
        if c.brightness_p > 0 and c.brightness > 0:
            ops.append(_maybe(c.brightness_p, v2.ColorJitter(brightness=c.brightness)))
        if c.contrast_p > 0 and c.contrast > 0:
            ops.append(_maybe(c.contrast_p, v2.ColorJitter(contrast=c.contrast)))
        if c.blur_p > 0:
            kernel = 2 * math.ceil(3 * c.blur_sigma[1]) + 1  # +-3 sigma of the widest blur
            ops.append(_maybe(c.blur_p, v2.GaussianBlur(kernel_size=kernel, sigma=c.blur_sigma)))
        if c.sharpen_p > 0:
            ops.append(v2.RandomAdjustSharpness(sharpness_factor=c.sharpen_factor, p=c.sharpen_p))
        if c.noise_p > 0 and c.noise_sigma > 0:
            ops.append(_maybe(c.noise_p, v2.GaussianNoise(mean=0.0, sigma=c.noise_sigma, clip=True)))
        self.transform = v2.Compose(ops) if ops else None

    def __call__(self, image: torch.Tensor, target: torch.Tensor, boxes: torch.Tensor | None = None) -> tuple:
        if not torch.is_floating_point(image):
            raise ValueError(f"augment needs a float image in [0, 1], got {image.dtype} (never quantise to uint8)")
        if torch.is_floating_point(target):
            raise ValueError(f"augment needs an integer label map, got {target.dtype}")
        if self.transform is None:
            return (image, target) if boxes is None else (image, target, boxes)
        h, w = image.shape[-2:]
        inputs: list[Any] = [tv_tensors.Image(image), tv_tensors.Mask(target)]
        if boxes is not None:
            inputs.append(tv_tensors.BoundingBoxes(boxes.reshape(-1, 4).float(), format="XYXY", canvas_size=(h, w)))
        out = self.transform(*inputs)
        image_out = out[0].as_subclass(torch.Tensor).reshape(image.shape)
        target_out = out[1].as_subclass(torch.Tensor).reshape(target.shape)
        if boxes is None:
            return image_out, target_out
        return image_out, target_out, out[2].as_subclass(torch.Tensor)


def build_augment(cfg: AugmentConfig | dict[str, Any] | None = None) -> Augment:
    """The augmentation for ``cfg`` (an ``AugmentConfig``, a dict of its fields, or None = defaults)."""
    if not isinstance(cfg, AugmentConfig):
        try:
            cfg = AugmentConfig.model_validate(cfg or {})
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "augment"
            raise ConfigError(f"augment.{where}", err["msg"]) from None
    return Augment(cfg)
