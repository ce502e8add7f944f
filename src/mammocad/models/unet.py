"""Padded ("same") U-Net (Ronneberger et al. 2015), as used in the U-Net/FCN/Dilation/DeepLab
mammography comparisons.

Hand-written (about 80 lines) because the library U-Nets do not fit: MONAI's ``BasicUNet`` has a
fixed depth and ``UNet`` uses residual units and strided convolutions instead of the paper's
double-conv + max-pool; segmentation_models_pytorch is not a dependency.

``encoder="efficientnet_lite0"`` (or any ``backbones.list_backbones()`` name) gives the U-Net of
segmentation_models_pytorch's ``Unet`` layout instead: the pretrained backbone's feature pyramid
(strides 2..32) as the contracting path and a light decoder (``decoder_channels``, one double conv
per x2 upsampling, skips at strides 16..2, the last block at full resolution without a skip).
``encoder=None`` is exactly the paper's U-Net above (same class, same state dict keys).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mammocad.errors import ConfigError
from mammocad.models.backbones import Pretrained
from mammocad.models.encoders import EncoderModel, check_no_weights_without_encoder
from mammocad.models.registry import check_input, kaiming_init, make_norm, register_model


def double_conv(c_in: int, c_out: int, norm: str) -> nn.Sequential:
    bias = norm == "none"  # a bias before a normalisation layer is redundant
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias),
        make_norm(norm, c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias),
        make_norm(norm, c_out),
        nn.ReLU(inplace=True),
    )


class UpBlock(nn.Module):
    """Upsample x2, concatenate the encoder skip, double conv."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, norm: str, upsample: str):
        super().__init__()
        if upsample == "transposed":
            self.up = nn.ConvTranspose2d(c_in, c_in // 2, 2, stride=2)
        else:  # bilinear then 1x1 conv to halve the channels, the usual "bilinear U-Net"
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(c_in, c_in // 2, 1)
            )
        self.conv = double_conv(c_in // 2 + c_skip, c_out, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """Padded U-Net with ``depth`` poolings; channels ``base * 2**level``.

    Full-size (paper) setting: ``base_channels=64, depth=4`` (5 levels; 31.0M parameters with
    ``upsample="transposed"`` as in the paper, 28.9M bilinear) or depth 5 (116M). The default
    ``base_channels=16, depth=4`` (1.8M parameters) trains on a 2-core CPU.
    ``size_divisor = 2**depth``: any H, W divisible by it keeps every skip aligned.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        base_channels: int = 16,
        depth: int = 4,
        norm: str = "batch",
        upsample: str = "bilinear",
        dropout: float = 0.0,
    ):
        super().__init__()
        if depth < 1 or base_channels < 2 or num_classes < 1:
            raise ConfigError("model unet", "need depth >= 1, base_channels >= 2, num_classes >= 1")
        if upsample not in ("bilinear", "transposed"):
            raise ConfigError("model unet", f"upsample must be 'bilinear' or 'transposed', got {upsample!r}")
        self.in_channels, self.num_classes, self.size_divisor = in_channels, num_classes, 2**depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.inc = double_conv(in_channels, widths[0], norm)
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), double_conv(widths[i], widths[i + 1], norm)) for i in range(depth)
        )
        # Dropout at the end of the contracting path, as in the original U-Net.
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], widths[i], norm, upsample) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = self.dropout(skips.pop())
        for up in self.up:
            y = up(y, skips.pop())
        return self.head(y)


class EncoderUNet(EncoderModel):
    """U-Net on a pretrained backbone: decoder block ``i`` upsamples x2 (bilinear), concatenates the
    encoder map of the same stride (none for the last block, at full resolution) and applies a
    double conv to ``decoder_channels[i]`` channels. Lite0 with the default (256, 128, 64, 32, 16):
    3.0 M encoder + 2.2 M decoder parameters. Only the decoder is He-initialised."""

    model_name = "unet"

    def __init__(self, encoder: str, pretrained: Pretrained = True, in_channels: int = 1, num_classes: int = 1,
                 decoder_channels: list[int] | tuple[int, ...] = (256, 128, 64, 32, 16), norm: str = "batch",
                 dropout: float = 0.0, normalization: dict[str, Any] | None = None):
        super().__init__()
        self.setup_encoder(encoder, pretrained, in_channels, num_classes, normalization)
        channels = list(decoder_channels)
        skips = self.encoder.out_channels[-2::-1]  # strides 16, 8, 4, 2
        if len(channels) != len(skips) + 1 or any(not isinstance(c, int) or c < 1 for c in channels):
            raise ConfigError("model unet", f"decoder_channels must be {len(skips) + 1} positive integers (strides "
                                            f"16 .. 1), got {decoder_channels!r}")
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        c_in = self.encoder.out_channels[-1]
        blocks = []
        for c_out, c_skip in zip(channels, skips + [0]):
            blocks.append(double_conv(c_in + c_skip, c_out, norm))
            c_in = c_out
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(channels[-1], num_classes, 1)
        kaiming_init(self.decoder)
        kaiming_init(self.head)

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        y = self.dropout(features[-1])
        skips = features[-2::-1] + [None]
        for block, skip in zip(self.decoder, skips):
            y = F.interpolate(y, size=size if skip is None else skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(y if skip is None else torch.cat([y, skip], dim=1))
        return self.head(y)


@register_model("unet")
def unet(encoder: str | None = None, pretrained: Pretrained = True, **kwargs) -> nn.Module:
    """The paper's U-Net, or with ``encoder`` a U-Net on that pretrained backbone (``pretrained``:
    True = packaged ImageNet weights, False = random, a path = a local state dict; init only)."""
    if encoder is None:
        check_no_weights_without_encoder("unet", pretrained)
        return UNet(**kwargs)
    return EncoderUNet(encoder, pretrained=pretrained, **kwargs)
