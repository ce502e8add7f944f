"""Image and patch classifiers (task ``classify``): benign vs malignant lesion patches, 5-class
patches, normal / benign / malignant images (issue 8).

Two registered models:

- ``classifier``: a registered backbone (``efficientnet_lite0..2`` with the packaged ImageNet
  weights, the default; ``resnet18``/``resnet50``/``mobilenet_v2`` with weights from a local file)
  -> global average pooling of its last map -> dropout -> one linear layer. The backbone's stages
  are ``encoder.stages.<k>`` as in the segmentation encoders, so staged fine-tuning ("frozen
  backbone, then the last third, then two thirds") freezes the same prefixes. MobileNetV2's final
  1x1 convolution to 1280 channels is not part of the backbone (it ends at the 320-channel block,
  like timm's features); ``head_channels`` adds a trained 1x1 conv + BN + ReLU6 before pooling
  for the papers' width.
- ``inception_v3``: torchvision's Inception-v3 with its auxiliary head (the papers' setting; weights
  from a local torchvision state dict when the user has one). It expects 299 x 299 inputs
  (``input_size``; the task resizes patches to it) and in training mode returns
  ``(logits, aux_logits)``: the task adds ``aux_weight`` (0.4, as in the Inception paper's
  training) times the auxiliary loss. In eval mode it returns the logits only.

Contract of every classifier (``tests/test_classifier.py`` iterates ``list_models("classify")``):
input ``(N, in_channels, H, W)`` floats in [0, 1] (the ImageNet normalisation is a buffer inside
the model, recorded in the kwargs as ``normalization``), output logits ``(N, num_classes)`` in
eval mode; ``num_classes >= 2`` (softmax); ``input_size`` is the side the model was designed for
(``None``: any size >= 32); ``aux_weight`` is 0 without an auxiliary head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mammocad.errors import ConfigError
from mammocad.io.discover import file_sha256
from mammocad.models.backbones import (Pretrained, _is_meta, _load_strict, _provenance, _weights_path, normalization_for,
                                       read_state_dict, sum_input_channels)
from mammocad.models.encoders import InputNormalization, build_encoder
from mammocad.models.registry import register_model

INCEPTION_SIZE = 299
INCEPTION_AUX_WEIGHT = 0.4


def _check_classes(model: str, num_classes: int, in_channels: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"model {model}", f"num_classes must be >= 2 (softmax classes), got {num_classes!r}")
    if in_channels not in (1, 3):
        raise ConfigError(f"model {model}", f"in_channels must be 1 (grey) or 3, got {in_channels!r}")


def _check_input(model: nn.Module, x: torch.Tensor, smallest: int) -> None:
    if x.ndim != 4 or x.shape[1] != model.in_channels or min(x.shape[-2:]) < smallest:
        raise ConfigError(f"model {model.mammocad_name}", f"expected input (N, {model.in_channels}, H, W) with "
                                                          f"H, W >= {smallest}, got {tuple(x.shape)}")


class BackboneClassifier(nn.Module):
    """Backbone -> global average pool -> dropout -> linear (see the module docstring)."""

    mammocad_name = "classifier"
    aux_weight = 0.0
    input_size = None

    def __init__(self, backbone: str = "efficientnet_lite0", pretrained: Pretrained = True, in_channels: int = 1,
                 num_classes: int = 2, dropout: float = 0.2, head_channels: int = 0,
                 normalization: dict[str, Any] | None = None):
        super().__init__()
        _check_classes(self.mammocad_name, num_classes, in_channels)
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"model {self.mammocad_name}", f"dropout must be in [0, 1), got {dropout!r}")
        self.in_channels, self.num_classes, self.size_divisor = in_channels, num_classes, 1
        self.encoder, self.normalize, record = build_encoder(self.mammocad_name, backbone, pretrained, in_channels,
                                                             normalization, out_indices=(4,))
        width = self.encoder.out_channels[-1]
        self.head = (nn.Sequential(nn.Conv2d(width, head_channels, 1, bias=False), nn.BatchNorm2d(head_channels),
                                   nn.ReLU6(inplace=True)) if head_channels else nn.Identity())
        self.dropout = nn.Dropout(float(dropout))
        self.fc = nn.Linear(head_channels or width, num_classes)
        self.recorded_kwargs = {"backbone": backbone, "normalization": record}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x, 32)
        features = self.head(self.encoder(self.normalize(x))[-1])
        return self.fc(self.dropout(torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1)))


@register_model("classifier", task="classify")
def classifier(backbone: str = "efficientnet_lite0", pretrained: Pretrained = True, in_channels: int = 1,
               num_classes: int = 2, dropout: float = 0.2, head_channels: int = 0,
               normalization: dict[str, Any] | None = None) -> nn.Module:
    return BackboneClassifier(backbone, pretrained, in_channels, num_classes, dropout, head_channels, normalization)


class InceptionV3(nn.Module):
    """torchvision's Inception-v3 (auxiliary head kept) on grey or RGB input (see the module docstring)."""

    mammocad_name = "inception_v3"
    aux_weight = INCEPTION_AUX_WEIGHT
    input_size = INCEPTION_SIZE

    def __init__(self, pretrained: Pretrained = False, in_channels: int = 1, num_classes: int = 2,
                 dropout: float = 0.5, normalization: dict[str, Any] | None = None):
        super().__init__()
        import torchvision
        from torchvision.models import Inception_V3_Weights

        _check_classes(self.mammocad_name, num_classes, in_channels)
        self.in_channels, self.num_classes, self.size_divisor = in_channels, num_classes, 1
        # transform_input=False: the normalisation below is the model's own; init_weights only when
        # no ImageNet file follows (torchvision's truncated-normal init is slow and then overwritten)
        path = _weights_path(self.mammocad_name, pretrained)
        net = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=False,
                                              init_weights=path is None, dropout=float(dropout))
        self.weights = None
        if path is not None and not _is_meta(net):
            _load_strict(net, read_state_dict(path), path, "torchvision inception_v3")
            self.weights = _provenance(path, file_sha256(path), "local file", "as stated by the file's owner")
        if in_channels == 1:
            sum_input_channels(net.Conv2d_1a_3x3.conv)
        net.fc = nn.Linear(net.fc.in_features, num_classes)
        net.AuxLogits.fc = nn.Linear(net.AuxLogits.fc.in_features, num_classes)
        self.net = net
        preset = Inception_V3_Weights.IMAGENET1K_V1.transforms()  # statistics only, nothing downloaded
        record = dict(normalization or normalization_for(preset.mean, preset.std, in_channels))
        self.normalize = InputNormalization(record["mean"], record["std"])
        self.recorded_kwargs = {"normalization": record}

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        _check_input(self, x, 75)  # the smallest input Inception-v3's stem and reductions accept
        out = self.net(self.normalize(x))
        if self.training:
            return out.logits, out.aux_logits
        return out


@register_model("inception_v3", task="classify")
def inception_v3(pretrained: Pretrained = False, in_channels: int = 1, num_classes: int = 2, dropout: float = 0.5,
                 normalization: dict[str, Any] | None = None) -> nn.Module:
    return InceptionV3(pretrained, in_channels, num_classes, dropout, normalization)
