"""DeepLabv3 (Chen et al. 2017) on a ResNet-18 trunk, GroupNorm throughout.

Trunk: torchvision's ``BasicBlock`` assembled in the ResNet-18 layout with torchvision's module
names (so a local torchvision resnet18 safetensors file loads by key). torchvision's
``replace_stride_with_dilation`` only works with Bottleneck blocks, so the atrous last stages are
built here: the layer keeps stride 1 and its 3x3 convolutions get the dilation, following
torchvision's convention (first block keeps the previous dilation). Output stride 16: layer4
dilated 2; output stride 8: layer3 dilated 2 and layer4 dilated 4.
Head: torchvision's ASPP (1x1, three 3x3 atrous branches, image pooling; rates 6/12/18 at OS16,
doubled at OS8) converted to GroupNorm, then 3x3 conv + 1x1 classifier (torchvision's
DeepLabHead layout) and bilinear upsampling to the input size.

Paper/spec (full-size) setting: ``base_width=64`` (ResNet-18), ``aspp_channels=256``, output
stride 16: 15.9M parameters. Default here: ``base_width=32``, ``aspp_channels=64`` (3.3M, CPU). GroupNorm instead of BatchNorm everywhere because CPU batches are 2-8 images.

``encoder="efficientnet_lite0"`` (any ``backbones.list_backbones()`` name, ``pretrained`` weights)
replaces the trunk by that backbone, whole (output stride 32: its stages are not made atrous, so
the ImageNet features are used as trained); the same ASPP head (rates 3/6/9 by default, half of
OS16's because the map is half as large) on the stride-32 map, then bilinear upsampling.
``encoder=None`` is exactly the model above.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.models.segmentation.deeplabv3 import ASPP

from mammocad.errors import ConfigError
from mammocad.models.backbones import Pretrained
from mammocad.models.encoders import EncoderModel, check_no_weights_without_encoder
from mammocad.models.registry import (
    batchnorm_to_groupnorm,
    check_input,
    group_count,
    kaiming_init,
    load_encoder_weights,
    register_model,
)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels), channels)


def set_dilation_(block: BasicBlock, dilation: int) -> None:
    """Make a BasicBlock atrous (torchvision refuses dilation > 1 for BasicBlock in its constructor)."""
    for conv in (block.conv1, block.conv2):
        conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)


class ResNet18Trunk(nn.Module):
    def __init__(self, in_channels: int, base_width: int, output_stride: int):
        super().__init__()
        w = base_width
        self.conv1 = nn.Conv2d(in_channels, w, 7, stride=2, padding=3, bias=False)  # adapted to in_channels
        self.bn1 = group_norm(w)  # torchvision's name, GroupNorm inside
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        dilate = {16: (False, False, True), 8: (False, True, True)}[output_stride]
        self.inplanes, self.dilation = w, 1
        self.layer1 = self._make_layer(w, 1, False)
        self.layer2 = self._make_layer(2 * w, 2, dilate[0])
        self.layer3 = self._make_layer(4 * w, 2, dilate[1])
        self.layer4 = self._make_layer(8 * w, 2, dilate[2])
        self.out_channels = 8 * w

    def _make_layer(self, planes: int, stride: int, dilate: bool) -> nn.Sequential:
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), group_norm(planes))
        first = BasicBlock(self.inplanes, planes, stride, downsample, norm_layer=group_norm)
        second = BasicBlock(planes, planes, norm_layer=group_norm)
        set_dilation_(first, previous)
        set_dilation_(second, self.dilation)
        self.inplanes = planes
        return nn.Sequential(first, second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class DeepLabV3(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        base_width: int = 32,
        output_stride: int = 16,
        aspp_channels: int = 64,
        atrous_rates: list[int] | None = None,
        dropout: float = 0.5,
    ):
        super().__init__()
        if output_stride not in (8, 16):
            raise ConfigError("model deeplabv3", f"output_stride must be 8 or 16, got {output_stride!r}")
        self.in_channels, self.num_classes, self.size_divisor = in_channels, num_classes, output_stride
        self.backbone = ResNet18Trunk(in_channels, base_width, output_stride)
        rates = list(atrous_rates or ([6, 12, 18] if output_stride == 16 else [12, 24, 36]))
        self.head = aspp_head(self.backbone.out_channels, num_classes, aspp_channels, rates, dropout)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def aspp_head(c_in: int, num_classes: int, aspp_channels: int, rates: list[int], dropout: float) -> nn.Sequential:
    """torchvision's ASPP (GroupNorm inside) + 3x3 conv + 1x1 classifier (its DeepLabHead layout)."""
    aspp = batchnorm_to_groupnorm(ASPP(c_in, rates, aspp_channels))
    aspp.project[-1].p = dropout
    return nn.Sequential(
        aspp,
        nn.Conv2d(aspp_channels, aspp_channels, 3, padding=1, bias=False),
        group_norm(aspp_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(aspp_channels, num_classes, 1),
    )


class EncoderDeepLabV3(EncoderModel):
    """DeepLabv3's ASPP head on the stride-32 map of a pretrained backbone (see the module doc)."""

    model_name = "deeplabv3"

    def __init__(self, encoder: str, pretrained: Pretrained = True, in_channels: int = 1, num_classes: int = 1,
                 aspp_channels: int = 64, atrous_rates: list[int] | None = None, dropout: float = 0.5,
                 normalization: dict[str, Any] | None = None):
        super().__init__()
        self.setup_encoder(encoder, pretrained, in_channels, num_classes, normalization, out_indices=(4,))
        self.head = aspp_head(self.encoder.out_channels[-1], num_classes, aspp_channels,
                              list(atrous_rates or [3, 6, 9]), dropout)
        kaiming_init(self.head)

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.head(features[-1]), size=size, mode="bilinear", align_corners=False)


@register_model("deeplabv3")
def deeplabv3(weights_path: str | None = None, encoder: str | None = None, pretrained: Pretrained = True,
              **kwargs) -> nn.Module:
    """DeepLabv3 on its ResNet-18 trunk, or with ``encoder`` on that pretrained backbone."""
    if encoder is not None:
        if weights_path is not None:
            raise ConfigError("model deeplabv3", "weights_path is for the ResNet-18 trunk; with an encoder use "
                                                 "pretrained: PATH")
        return EncoderDeepLabV3(encoder, pretrained=pretrained, **kwargs)
    check_no_weights_without_encoder("deeplabv3", pretrained)
    model = DeepLabV3(**kwargs)
    if weights_path is not None:
        load_encoder_weights(model.backbone, weights_path, model.in_channels)  # torchvision resnet18 keys
    return model
