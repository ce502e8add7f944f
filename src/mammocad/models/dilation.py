"""Dilation10 (Yu & Koltun 2016, "Multi-scale context aggregation by dilated convolutions").

Front-end: VGG16 with pool4 and pool5 removed, conv5 dilated 2 and fc6 dilated 4 (output stride
8), fc7 and a 1x1 classifier. Context module: 3x3 convolutions with growing dilation on the C
class-score maps, each followed by ReLU, then a 1x1 layer; initialised to the identity (paper eq.
"k^b(t, a) = 1[t=0] 1[a=b]", generalised to C/c_out blocks when widths differ), then x8 bilinear
upsampling. Training stages: "front" (front-end + plain classifier head), "context" (front-end
frozen, context trained), "global" (everything) -- ``set_stage``.

Paper (full-size) setting: ``width_mult=1`` (64-512), ``fc_channels=4096``, no normalisation,
ImageNet-initialised front-end, basic context (dilations 1,1,2,4,8,16,1; C channels) or large
(2C..32C channels). Defaults here are CPU-sized (``width_mult=0.25``, ``fc_channels=512``,
GroupNorm in the front-end because it trains from scratch). Convolutions are padded ("same")
instead of the paper's reflection-padded input with valid convolutions.

Note: as in the paper the module's layers truncate at zero, so the identity initialisation passes
non-negative score maps through unchanged and truncates negative ones. The classifier therefore
starts with small positive scores, and binary models score two maps (background, lesion) whose
difference is the sigmoid logit. Measured: lr 1e-3 (Adam) overfits a tiny batch reliably, 3e-3 can
kill context channels for good -- train in the paper's stages and/or with a small learning rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mammocad.errors import ConfigError
from mammocad.models.fcn import scaled, vgg16_features
from mammocad.models.registry import check_input, kaiming_init, load_encoder_weights, make_norm, register_model

CONTEXT_PRESETS = {
    # name: (dilations of the 3x3 layers, width multipliers of num_classes per layer)
    "basic": ((1, 1, 2, 4, 8, 16, 1), (1, 1, 1, 1, 1, 1, 1)),
    "large": ((1, 1, 2, 4, 8, 16, 16, 32, 1, 1), (2, 2, 4, 8, 16, 32, 32, 32, 32, 32)),
}
STAGES = ("front", "context", "global")


def identity_init_(conv: nn.Conv2d, num_classes: int, noise: float) -> None:
    """Paper's identity initialisation for a layer c_in -> c_out: weight C/c_out at the kernel centre
    where floor(a*C/c_in) == floor(b*C/c_out), zero elsewhere (+ N(0, (noise*C/c_out)^2), which
    breaks the symmetry between duplicated channels of the large module)."""
    c_out, c_in, kh, kw = conv.weight.shape
    with torch.no_grad():
        w = torch.zeros_like(conv.weight)
        a = torch.arange(c_in) * num_classes // c_in
        b = torch.arange(c_out) * num_classes // c_out
        w[:, :, kh // 2, kw // 2] = (b[:, None] == a[None, :]).float() * (num_classes / c_out)
        if noise > 0:
            w += torch.randn_like(w) * noise * num_classes / c_out
        conv.weight.copy_(w)
        if conv.bias is not None:
            conv.bias.zero_()


class ContextModule(nn.Module):
    def __init__(self, num_classes: int, dilations: list[int], widths: list[int], noise: float):
        super().__init__()
        if len(dilations) != len(widths):
            raise ConfigError("context_channels", f"need one width per dilation ({len(dilations)}), got {len(widths)}")
        bad = [w for w in widths if w % num_classes]
        if bad:
            raise ConfigError("context_channels", f"widths must be multiples of the {num_classes} score maps (identity init), got {bad}")
        layers: list[nn.Module] = []
        c_in = num_classes
        for d, c_out in zip(dilations, widths):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, num_classes, 1))
        self.layers = nn.Sequential(*layers)
        for m in self.layers:
            if isinstance(m, nn.Conv2d):
                identity_init_(m, num_classes, noise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Dilation10(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        width_mult: float = 0.25,
        fc_channels: int = 512,
        fc_kernel: int = 7,
        norm: str = "group",
        dropout: float = 0.5,
        context: str = "basic",
        context_dilations: list[int] | None = None,
        context_channels: int | list[int] | None = None,
        identity_noise: float | None = None,
        stage: str = "global",
    ):
        super().__init__()
        if context not in CONTEXT_PRESETS:
            raise ConfigError("model dilation10", f"context must be one of {sorted(CONTEXT_PRESETS)}, got {context!r}")
        self.in_channels, self.num_classes, self.size_divisor = in_channels, num_classes, 8
        self.features, _ = vgg16_features(in_channels, width_mult, norm, conv5_dilation=2, drop_pool45=True)
        c5, bias, pad = scaled(512, width_mult), norm == "none", 4 * (fc_kernel // 2)
        self.fc = nn.Sequential(
            nn.Conv2d(c5, fc_channels, fc_kernel, padding=pad, dilation=4, bias=bias),  # fc6, dilation 4
            make_norm(norm, fc_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(fc_channels, fc_channels, 1, bias=bias),  # fc7
            make_norm(norm, fc_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        # Binary models score two maps (background, lesion) and return their difference, which is
        # the 2-class softmax as one sigmoid logit: the context module works on class-score maps and
        # truncates at zero, so a single signed map would lose its whole negative (background) half.
        self.score_channels = max(2, num_classes)
        self.head = nn.Conv2d(fc_channels, self.score_channels, 1)  # the front-end's plain classifier
        kaiming_init(self)
        # Scores start small and positive: the context module truncates at zero, so zero or negative
        # scores would pass no gradient back through it. Softmax gradients leave the sum of a pixel's
        # scores nearly unchanged, so it stays positive and some channel stays alive while training.
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.constant_(self.head.bias, 1.0)

        preset_dilations, multipliers = CONTEXT_PRESETS[context]
        dilations = list(context_dilations or preset_dilations)
        if context_channels is None:
            if context_dilations is not None and len(dilations) != len(multipliers):
                multipliers = (multipliers[-1],) * len(dilations)
            widths = [m * self.score_channels for m in multipliers]
        elif isinstance(context_channels, int):
            widths = [context_channels] * len(dilations)
        else:
            widths = list(context_channels)
        if identity_noise is None:  # exact identity where no channel is duplicated, paper's noise otherwise
            identity_noise = 0.0 if all(w == self.score_channels for w in widths) else 0.01
        self.context = ContextModule(self.score_channels, dilations, widths, identity_noise)
        self.stage = "global"
        self.set_stage(stage)

    def front_modules(self) -> list[nn.Module]:
        return [self.features, self.fc, self.head]

    def set_stage(self, stage: str) -> None:
        """Freeze/unfreeze for the paper's stages; recorded in ``mammocad_config`` (the "front"
        stage bypasses the context module, so the stage is part of the architecture)."""
        if stage not in STAGES:
            raise ConfigError("stage", f"must be one of {', '.join(STAGES)}, got {stage!r}")
        self.stage = stage
        for m in self.front_modules():
            m.requires_grad_(stage in ("front", "global"))
        self.context.requires_grad_(stage in ("context", "global"))
        cfg = getattr(self, "mammocad_config", None)
        if cfg is not None:
            cfg["kwargs"]["stage"] = stage
        self.train(self.training)

    def train(self, mode: bool = True) -> "Dilation10":
        super().train(mode)
        if mode and self.stage == "context":  # a frozen front-end: no dropout, fixed norm statistics
            for m in self.front_modules():
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage != "context"):
            scores = self.head(self.fc(self.features(x)))
        if self.stage != "front":
            scores = self.context(scores)
        if self.num_classes == 1:
            scores = scores[:, 1:] - scores[:, :1]
        return F.interpolate(scores, scale_factor=8, mode="bilinear", align_corners=False)


@register_model("dilation10")
def dilation10(weights_path: str | None = None, **kwargs) -> Dilation10:
    model = Dilation10(**kwargs)
    if weights_path is not None:
        load_encoder_weights(model, weights_path, model.in_channels)  # torchvision keys "features.N.*"
    return model
