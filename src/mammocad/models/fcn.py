"""FCN-32s / FCN-16s / FCN-8s (Long, Shelhamer & Darrell 2015) on a VGG16 encoder.

Paper (full-size) setting: VGG16 widths 64-512 (``width_mult=1``), fc6 7x7 with 4096 channels and
fc7 1x1 with 4096 (``fc_channels=4096``), dropout 0.5, no normalisation, ImageNet initialisation,
trained in stages 32s -> 16s -> 8s, each initialised from the previous with the new skip score
layers zeroed (``create_model("fcn16", init_from=fcn32)`` or ``init_fcn_from``).

Defaults are CPU-sized: ``width_mult=0.25`` (16-128 channels), ``fc_channels=512`` and GroupNorm,
because without ImageNet weights a plain 15-layer VGG barely trains from scratch; ``norm="none"``
gives the paper's layout. fc6 is padded (``fc_kernel // 2``) instead of the paper's 100-pixel input
padding, so small tiles work and the output is aligned without cropping.

``encoder="resnet18"`` (any ``backbones.list_backbones()`` name, ``pretrained`` weights) replaces
VGG16 by that backbone: its stride-8/16/32 maps play pool3/pool4/pool5, a light "fc" block (3x3
conv to ``fc_channels``, dropout) replaces fc6/fc7, and the score, fusion and upsampling layers and
their names are the ones above, so ``init_from`` (32s -> 16s -> 8s) works the same way.
``encoder=None`` is exactly the VGG16 model above.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mammocad.errors import ConfigError
from mammocad.models.backbones import Pretrained
from mammocad.models.encoders import EncoderModel, check_no_weights_without_encoder
from mammocad.models.registry import check_input, kaiming_init, load_encoder_weights, make_norm, register_model

# torchvision's VGG16 configuration "D": conv widths, "M" = 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def scaled(width: int, width_mult: float) -> int:
    return max(2, int(round(width * width_mult)))


def vgg16_features(
    in_channels: int, width_mult: float, norm: str, conv5_dilation: int = 1, drop_pool45: bool = False
) -> tuple[nn.Sequential, list[int]]:
    """VGG16 ``features`` with torchvision's module indices (``norm="none"`` = vgg16 layout, a norm
    = vgg16_bn layout), so torchvision safetensors load by key. Returns the module and the indices
    of the five pooling layers. ``drop_pool45`` replaces pool4/pool5 by Identity (indices kept)."""
    layers: list[nn.Module] = []
    pools: list[int] = []
    c_in, block = in_channels, 1
    for v in VGG16_CFG:
        if v == "M":
            pools.append(len(layers))
            layers.append(nn.Identity() if drop_pool45 and block >= 4 else nn.MaxPool2d(2, 2))
            block += 1
            continue
        d = conv5_dilation if block == 5 else 1
        c_out = scaled(v, width_mult)
        layers.append(nn.Conv2d(c_in, c_out, 3, padding=d, dilation=d))
        if norm != "none":
            layers.append(make_norm(norm, c_out))
        layers.append(nn.ReLU(inplace=True))
        c_in = c_out
    return nn.Sequential(*layers), pools


def bilinear_kernel(channels: int, factor: int) -> torch.Tensor:
    """Per-channel bilinear upsampling kernel (``groups=channels``) of size 2*factor, as Long et al.
    initialise their deconvolution layers; with stride ``factor`` and padding ``factor // 2`` it is
    bilinear interpolation with half-pixel centres (zero beyond the border)."""
    size = 2 * factor
    center = factor - 0.5
    og = torch.arange(size, dtype=torch.float32)
    filt = 1 - (og - center).abs() / factor
    return (filt[:, None] * filt[None, :]).expand(channels, 1, size, size).clone()


class FixedBilinearDeconv(nn.Module):
    """The bilinear transposed convolution with a FIXED kernel: a buffer applied with
    ``F.conv_transpose2d``, not a parameter, so no optimizer, weight decay or ``requires_grad_(True)``
    (training re-enables every parameter at each stage) can change it. The buffer keeps the name
    ``weight`` and stays in the state dict, so bundles saved when it was a frozen ConvTranspose2d
    weight still load strictly."""

    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.factor, self.channels = factor, channels
        self.register_buffer("weight", bilinear_kernel(channels, factor).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.weight, stride=self.factor, padding=self.factor // 2, groups=self.channels)


class ScoreUpsample(nn.Module):
    """x``factor`` upsampling of score maps: bilinear-initialised transposed conv (learned, or a
    fixed buffer when not ``learnable``) or F.interpolate."""

    def __init__(self, channels: int, factor: int, mode: str, learnable: bool):
        super().__init__()
        self.factor, self.mode = factor, mode
        if mode == "transposed":
            if learnable:
                self.deconv = nn.ConvTranspose2d(
                    channels, channels, 2 * factor, stride=factor, padding=factor // 2, groups=channels, bias=False
                )
                with torch.no_grad():
                    self.deconv.weight.copy_(bilinear_kernel(channels, factor))
            else:
                self.deconv = FixedBilinearDeconv(channels, factor)
        elif mode != "bilinear":
            raise ConfigError("upsample", f"must be 'transposed' or 'bilinear', got {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "transposed":
            return self.deconv(x)
        return F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)


class FCN(nn.Module):
    """FCN-``variant``s; ``variant`` in (32, 16, 8). Output stride 32 internally, logits at input size.

    ``learnable_upsample`` applies to the x2 fusion layers (learned in the paper); the final
    upsampling stays fixed bilinear, as in the paper. Fixed kernels are buffers, not parameters."""

    def __init__(
        self,
        variant: int = 32,
        in_channels: int = 1,
        num_classes: int = 1,
        width_mult: float = 0.25,
        fc_channels: int = 512,
        fc_kernel: int = 7,
        norm: str = "group",
        dropout: float = 0.5,
        upsample: str = "transposed",
        learnable_upsample: bool = True,
    ):
        super().__init__()
        if variant not in (32, 16, 8):
            raise ConfigError("model fcn", f"variant must be 32, 16 or 8, got {variant!r}")
        if fc_kernel % 2 == 0:
            raise ConfigError("model fcn", "fc_kernel must be odd (padded 'same' convolution)")
        self.variant, self.in_channels, self.num_classes, self.size_divisor = variant, in_channels, num_classes, 32
        self.features, pools = vgg16_features(in_channels, width_mult, norm)
        self.pool3_index, self.pool4_index = pools[2], pools[3]
        c3, c45 = scaled(256, width_mult), scaled(512, width_mult)
        bias = norm == "none"
        # fc6 / fc7 of VGG16 as convolutions ("convolutionalised" classifier).
        self.fc = nn.Sequential(
            nn.Conv2d(c45, fc_channels, fc_kernel, padding=fc_kernel // 2, bias=bias),
            make_norm(norm, fc_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(fc_channels, fc_channels, 1, bias=bias),
            make_norm(norm, fc_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        add_score_layers(self, variant, c3, c45, fc_channels, num_classes, upsample, learnable_upsample)
        kaiming_init(self)
        zero_scores(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        h = x
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == self.pool3_index:
                pool3 = h
            elif i == self.pool4_index:
                pool4 = h
        return fuse_scores(self, pool3, pool4, h)


def add_score_layers(model: nn.Module, variant: int, c3: int, c4: int, fc_channels: int, num_classes: int,
                     upsample: str, learnable_upsample: bool) -> None:
    """FCN's scoring and fusion layers (names as Long et al.'s Caffe model), zero-initialised scores."""
    model.score_fr = nn.Conv2d(fc_channels, num_classes, 1)
    if variant <= 16:
        model.score_pool4 = nn.Conv2d(c4, num_classes, 1)
        model.upscore2 = ScoreUpsample(num_classes, 2, upsample, learnable_upsample)
    if variant == 8:
        model.score_pool3 = nn.Conv2d(c3, num_classes, 1)
        model.upscore_pool4 = ScoreUpsample(num_classes, 2, upsample, learnable_upsample)
    setattr(model, f"upscore{variant}", ScoreUpsample(num_classes, variant, upsample, learnable=False))


def zero_scores(model: nn.Module) -> None:
    for name in ("score_fr", "score_pool4", "score_pool3"):  # zero-initialised scoring, as Long et al.
        if hasattr(model, name):
            nn.init.zeros_(getattr(model, name).weight)
            nn.init.zeros_(getattr(model, name).bias)


def fuse_scores(model: nn.Module, pool3: torch.Tensor, pool4: torch.Tensor, pool5: torch.Tensor) -> torch.Tensor:
    """FCN-32s/16s/8s: score the stride-32 map, add the stride-16 and stride-8 scores, upsample."""
    score = model.score_fr(model.fc(pool5))
    if model.variant == 32:
        return model.upscore32(score)
    score = model.upscore2(score) + model.score_pool4(pool4)
    if model.variant == 16:
        return model.upscore16(score)
    score = model.upscore_pool4(score) + model.score_pool3(pool3)
    return model.upscore8(score)


def init_fcn_from(dst: FCN, src: FCN) -> FCN:
    """Initialise ``dst`` from a trained coarser FCN ``src`` (32s -> 16s -> 8s), as Long et al.:
    every tensor with the same name and shape is copied; skip score layers ``src`` lacks are zeroed,
    so ``dst`` starts from ``src``'s coarse predictions (upsampled in two steps instead of one)."""
    if not isinstance(dst, (FCN, EncoderFCN)) or not isinstance(src, (FCN, EncoderFCN)):
        raise ConfigError("init_from", "FCN initialisation needs two FCN models (fcn32/fcn16/fcn8)")
    src_state, dst_state = src.state_dict(), dst.state_dict()
    trunk = [k for k in src_state if k.startswith(("features.", "encoder.", "normalize.", "fc.", "score_fr."))]
    bad = [k for k in trunk if k not in dst_state or dst_state[k].shape != src_state[k].shape]
    if bad or src.in_channels != dst.in_channels:
        raise ConfigError("init_from", f"source FCN has a different architecture (first difference: {bad[:1]}); use the same kwargs")
    shared = {k: v for k, v in src_state.items() if k in dst_state and v.shape == dst_state[k].shape}
    dst.load_state_dict(shared, strict=False)
    for name in ("score_pool4", "score_pool3"):
        if hasattr(dst, name) and f"{name}.weight" not in src_state:
            nn.init.zeros_(getattr(dst, name).weight)
            nn.init.zeros_(getattr(dst, name).bias)
    return dst


class EncoderFCN(EncoderModel):
    """FCN-``variant``s on a pretrained backbone (see the module doc); stride-8/16/32 maps fused."""

    model_name = "fcn"

    def __init__(self, encoder: str, variant: int = 32, pretrained: Pretrained = True, in_channels: int = 1,
                 num_classes: int = 1, fc_channels: int = 256, norm: str = "group", dropout: float = 0.5,
                 upsample: str = "transposed", learnable_upsample: bool = True,
                 normalization: dict[str, Any] | None = None):
        super().__init__()
        if variant not in (32, 16, 8):
            raise ConfigError("model fcn", f"variant must be 32, 16 or 8, got {variant!r}")
        self.model_name, self.variant = f"fcn{variant}", variant
        self.setup_encoder(encoder, pretrained, in_channels, num_classes, normalization, out_indices=(2, 3, 4))
        c3, c4, c5 = self.encoder.out_channels
        self.fc = nn.Sequential(
            nn.Conv2d(c5, fc_channels, 3, padding=1, bias=norm == "none"),
            make_norm(norm, fc_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        add_score_layers(self, variant, c3, c4, fc_channels, num_classes, upsample, learnable_upsample)
        for name, child in self.named_children():
            if name not in ("encoder", "normalize"):
                kaiming_init(child)
        zero_scores(self)

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return fuse_scores(self, *features)


def _build(variant: int, init_from: nn.Module | None = None, weights_path: str | None = None,
           encoder: str | None = None, pretrained: Pretrained = True, **kwargs) -> nn.Module:
    if encoder is not None:
        if weights_path is not None:
            raise ConfigError(f"model fcn{variant}", "weights_path is for the VGG16 trunk; with an encoder use "
                                                     "pretrained: PATH")
        model = EncoderFCN(encoder, variant=variant, pretrained=pretrained, **kwargs)
        if init_from is not None:
            init_fcn_from(model, init_from)
        return model
    check_no_weights_without_encoder(f"fcn{variant}", pretrained)
    model = FCN(variant=variant, **kwargs)
    if weights_path is not None:
        load_encoder_weights(model, weights_path, model.in_channels)  # torchvision keys "features.N.*"
    if init_from is not None:
        init_fcn_from(model, init_from)
    return model


@register_model("fcn32")
def fcn32(encoder: str | None = None, pretrained: Pretrained = True, **kwargs) -> nn.Module:
    return _build(32, encoder=encoder, pretrained=pretrained, **kwargs)


@register_model("fcn16")
def fcn16(encoder: str | None = None, pretrained: Pretrained = True, **kwargs) -> nn.Module:
    return _build(16, encoder=encoder, pretrained=pretrained, **kwargs)


@register_model("fcn8")
def fcn8(encoder: str | None = None, pretrained: Pretrained = True, **kwargs) -> nn.Module:
    return _build(8, encoder=encoder, pretrained=pretrained, **kwargs)
