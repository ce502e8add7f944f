"""What the segmentation models with a pretrained encoder share (``unet``/``deeplabv3``/``fcn*``
with ``encoder="efficientnet_lite0"`` etc.): the backbone, the input normalisation and the padding.

Why the normalisation is inside the model: the predictor, the tiling and the trainer all feed
prepared images in [0, 1]; the ImageNet weights expect their own statistics. A buffer applied in
``forward`` keeps every caller unchanged and makes a bundle self-contained (the buffer is in its
safetensors, the values also in its architecture kwargs as ``normalization``).

Why ``pretrained`` is not architecture: it only chooses the *initial* weights. ``create_model``
leaves it out of ``mammocad_config`` (``registry.INIT_ONLY_KWARGS``) and ``model_from_config``
builds with ``pretrained=False``, so loading a bundle never reads (or needs) the ImageNet file: the
trained weights come from the bundle.

Any input size works: the encoder needs sides that are multiples of its stride (32), so the
normalised image is zero-padded at the bottom/right (zero = the mean grey, what the convolutions'
own padding sees) and the logits are cropped back. ``size_divisor`` is therefore 1; tiles that are
multiples of ``encoder_stride`` avoid the padding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mammocad.errors import ConfigError
from mammocad.models.backbones import Backbone, Pretrained, create_backbone
from mammocad.models.registry import check_input


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel with fixed statistics (buffers, saved in the state dict)."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_encoder(model: str, encoder: str, pretrained: Pretrained, in_channels: int,
                  normalization: dict[str, Any] | None, out_indices: tuple[int, ...] = (0, 1, 2, 3, 4),
                  ) -> tuple[Backbone, InputNormalization, dict[str, Any]]:
    """The backbone, its input normalisation module and the normalisation record to store.

    ``normalization`` (from a bundle's kwargs) wins over the backbone's own, so a bundle keeps the
    statistics it was trained with even if a backbone's defaults change later."""
    if not isinstance(encoder, str):
        raise ConfigError(f"model {model}", f"encoder must be a backbone name, got {encoder!r}")
    backbone = create_backbone(encoder, pretrained=pretrained, in_chans=in_channels, out_indices=out_indices)
    record = dict(normalization if normalization is not None else backbone.normalization)
    mean, std = record.get("mean"), record.get("std")
    if (not isinstance(mean, list) or not isinstance(std, list) or len(mean) != in_channels
            or len(std) != in_channels or any(not isinstance(s, (int, float)) or s <= 0 for s in std)):
        raise ConfigError(f"model {model}", f"normalization needs 'mean' and 'std' lists of {in_channels} "
                                            f"value(s), std > 0; got {normalization!r}")
    return backbone, InputNormalization(mean, std), record


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the bottom/right of ``x`` so both sides are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def check_no_weights_without_encoder(model: str, pretrained: Pretrained) -> None:
    """``pretrained`` is accepted without an encoder only as a plain flag (``model_from_config``
    passes False to every model that takes it); a weights path there would be silently ignored."""
    if not isinstance(pretrained, bool):
        raise ConfigError(f"model {model}", f"pretrained={pretrained!r} needs an encoder (e.g. encoder: "
                                            "efficientnet_lite0)")


class EncoderModel(nn.Module):
    """Base of the encoder variants: normalise, pad to the encoder stride, run the encoder; the
    subclass decodes ``features`` (strides 2..32, or the ``out_indices`` it asked for) and the
    result is cropped to the input size. ``encoder.stages`` is what staged fine-tuning freezes
    (parameter names ``encoder.stages.<k>.``)."""

    model_name = "encoder model"

    def setup_encoder(self, encoder: str, pretrained: Pretrained, in_channels: int, num_classes: int,
                      normalization: dict[str, Any] | None, out_indices: tuple[int, ...] = (0, 1, 2, 3, 4)) -> None:
        if num_classes < 1:
            raise ConfigError(f"model {self.model_name}", "need num_classes >= 1")
        self.in_channels, self.num_classes, self.size_divisor = in_channels, num_classes, 1
        self.encoder, self.normalize, record = build_encoder(self.model_name, encoder, pretrained, in_channels,
                                                             normalization, out_indices)
        self.encoder_stride = self.encoder.size_divisor
        # create_model adds these resolved arguments to the recorded config (see registry.create_model)
        self.recorded_kwargs = {"encoder": encoder, "normalization": record}

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)  # size_divisor 1: any size, the padding below handles the stride
        h, w = x.shape[-2:]
        padded = pad_to_multiple(self.normalize(x), self.encoder_stride)
        logits = self.decode(self.encoder(padded), tuple(padded.shape[-2:]))
        return logits[..., :h, :w]
