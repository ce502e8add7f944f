"""Pixel-segmentation baselines of the MIAS / CBIS-DDSM pixel-classification papers.

- ``logreg``: per-pixel logistic regression on fixed local intensity features (intensity, Gaussian
  local means and standard deviations, gradient magnitude, scale-normalised Laplacian of Gaussian,
  at a few scales), computed by fixed convolution buffers, followed by one learnable 1x1 conv.
  It is an ``nn.Module`` so the same training loop, losses and bundles serve it.
- ``shallow_cnn``: a few full-resolution 3x3 convolutions and a 1x1 head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mammocad.errors import ConfigError
from mammocad.models.registry import check_input, kaiming_init, make_norm, register_model


def _gaussian_1d(sigma: float, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled 1-D Gaussian (sum 1) and sigma^2 times its second derivative (sum 0), float64."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    d2 = (r**2 / sigma**2 - 1) * g  # sigma^2 * g''
    return g, d2 - d2.mean()  # zero sum: flat regions give exactly 0


class LocalFeatures(nn.Module):
    """Fixed (non-learned) feature maps per input channel, computed with separable convolutions
    whose kernels are non-persistent buffers (derived from ``scales``, not stored in bundles).

    Per scale s: Gaussian local mean, local standard deviation sqrt(E[x^2] - E[x]^2) and the
    scale-normalised Laplacian of Gaussian s^2 (G_xx + G_yy); plus the intensity and the Sobel
    gradient magnitude. Borders are replicate-padded. Computed in fp32 even under autocast."""

    def __init__(self, scales: list[float]):
        super().__init__()
        self.radius = max(1, math.ceil(3 * max(scales)))
        gs, d2s = zip(*(_gaussian_1d(s, self.radius) for s in scales))
        n = len(scales)
        # horizontal pass on [x, x^2]: [g_s * x, d2_s * x, g_s * x^2]
        self.register_buffer("row_kernels", torch.stack(gs + d2s + gs)[:, None, None, :].float(), persistent=False)
        # vertical pass, one group per row result: mean = g*(g x), G_yy = d2*(g x), G_xx = g*(d2 x), E[x^2] = g*(g x^2)
        self.register_buffer("col_kernels", torch.stack(gs + d2s + gs + gs)[:, None, :, None].float(), persistent=False)
        sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 8
        self.register_buffer("sobel", torch.stack([sobel, sobel.T])[:, None], persistent=False)
        self.num_scales = n
        self.features_per_channel = 1 + 3 * n + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Always fp32, whatever autocast is active: the std is a difference of two near-equal means
        # (E[x^2] - E[x]^2) and the LoG a difference of smoothed values; in bf16 (8 bits of mantissa)
        # both cancel to rounding noise on bright mammogram tissue (0.7 +- 0.01 texture).
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._features(x.float())

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        n_img, c, h, w = x.shape
        s, r = self.num_scales, self.radius
        flat = x.reshape(n_img * c, 1, h, w)
        padded = F.pad(flat, (r, r, r, r), mode="replicate")
        rows_x = F.conv2d(padded, self.row_kernels[: 2 * s])  # (B, 2s, H+2r, W)
        rows_sq = F.conv2d(padded * padded, self.row_kernels[2 * s :])  # (B, s, H+2r, W)
        g_x, d2_x = rows_x[:, :s], rows_x[:, s:]
        cols = F.conv2d(torch.cat([g_x, g_x, d2_x, rows_sq], 1), self.col_kernels, groups=4 * s)
        means, g_yy, g_xx, mean_sq = cols[:, :s], cols[:, s : 2 * s], cols[:, 2 * s : 3 * s], cols[:, 3 * s :]
        stds = (mean_sq - means * means).clamp_min(0).add(1e-6).sqrt()
        grads = F.conv2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), self.sobel)
        grad = grads.square().sum(1, keepdim=True).add(1e-6).sqrt()
        feats = torch.cat([flat, means, stds, grad, g_xx + g_yy], dim=1)
        return feats.reshape(n_img, c * self.features_per_channel, h, w)


class PixelLogisticRegression(nn.Module):
    """Logistic (softmax for C >= 2) regression per pixel on ``LocalFeatures``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 1, scales: list[float] = (1.0, 2.0, 4.0)):
        super().__init__()
        if not scales or min(scales) <= 0:
            raise ConfigError("model logreg", f"scales must be positive, got {scales!r}")
        self.in_channels, self.num_classes, self.size_divisor = in_channels, num_classes, 1
        self.features = LocalFeatures(list(scales))
        self.classifier = nn.Conv2d(in_channels * self.features.features_per_channel, num_classes, 1)
        nn.init.zeros_(self.classifier.weight)  # the convex problem needs no random start
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        return self.classifier(self.features(x))


class ShallowCNN(nn.Module):
    """``num_layers`` padded 3x3 conv + ReLU layers of ``channels`` width, then a 1x1 head; no pooling."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        channels: int = 16,
        num_layers: int = 3,
        kernel_size: int = 3,
        norm: str = "none",
    ):
        super().__init__()
        if num_layers < 1 or kernel_size % 2 == 0:
            raise ConfigError("model shallow_cnn", "need num_layers >= 1 and an odd kernel_size")
        self.in_channels, self.num_classes, self.size_divisor = in_channels, num_classes, 1
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(num_layers):
            layers += [nn.Conv2d(c, channels, kernel_size, padding=kernel_size // 2), make_norm(norm, channels), nn.ReLU(inplace=True)]
            c = channels
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, num_classes, 1)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        return self.head(self.body(x))


@register_model("logreg")
def logreg(**kwargs) -> PixelLogisticRegression:
    return PixelLogisticRegression(**kwargs)


@register_model("shallow_cnn")
def shallow_cnn(**kwargs) -> ShallowCNN:
    return ShallowCNN(**kwargs)
