"""Models by name, like timm's ``@register_model``, each registered with its task, plus the
contract the segmentation models keep.

``register_model(name, task)``: ``task`` is ``"segment"`` (the default), ``"detect"`` or ``"classify"``;
``model_task(name)`` says which, ``list_models()`` lists the segmentation models (what the contract
below and ``tests/test_models.py`` iterate), ``list_models(None)`` every model. A detection model
(``maskrcnn``) keeps the config, size-bound and fixed-parameter rules below but not the logits
contract: it takes images and returns torchvision's detections (see ``models/maskrcnn.py``); the
classifiers (``classifier``, ``inception_v3``) return logits per image (see ``models/classifier.py``).

Contract of every registered segmentation model (checked by ``tests/test_models.py`` over ``list_models()``):

- input ``(N, in_channels, H, W)`` float, output logits ``(N, num_classes, H, W)`` at the input
  resolution; ``num_classes == 1`` is a binary sigmoid logit, ``>= 2`` softmax logits;
- ``H`` and ``W`` must be multiples of ``model.size_divisor`` (a clear ``ConfigError`` otherwise;
  the tiled inference picks tile sizes that are multiples of it);
- ``model.mammocad_config == {"name": ..., "kwargs": {...}}`` holds the JSON-able constructor
  arguments, so a bundle rebuilds the architecture from JSON (``model_from_config``) and loads its
  safetensors weights without pickle. Arguments that only *initialise* weights (``init_from``,
  ``weights_path``, an encoder's ``pretrained``) are not part of the architecture and are left out;
  a model that accepts ``pretrained`` is rebuilt with ``pretrained=False`` (the weights come from
  the bundle, the ImageNet file is never read again). Arguments a constructor resolves itself (an
  encoder's input ``normalization``) are added from ``model.recorded_kwargs``;
- fixed (never trained) tensors are buffers, not frozen parameters: training makes every parameter
  trainable at the start of each stage. A parameter that must stay one and stay fixed is named (a
  prefix) in ``model.fixed_parameters``; ``fixed_parameter_names`` lists them and training keeps
  them frozen. Right after construction every other parameter has ``requires_grad``.

The small helpers below (norm layers, input checks, local encoder weights) are shared by the
model modules so each of them stays a plain description of its paper's architecture.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mammocad.errors import ConfigError, InputError

ModelFactory = Callable[..., nn.Module]
_MODELS: dict[str, ModelFactory] = {}
_TASKS: dict[str, str] = {}  # model name -> its task ("segment", "detect", "classify")
INIT_ONLY_KWARGS = ("init_from", "weights_path", "pretrained")  # change weights, not the architecture
NORMS = ("batch", "group", "instance", "none")
# Bounds on architecture arguments, by name: a card or config asking for more is a typo or an attack
# (``base_channels: 4096`` took 23.5 GB before it was killed). Checked before anything is allocated,
# then the parameter count is measured on torch's "meta" device (no memory) and capped too.
MAX_PARAMETERS = 200_000_000  # FCN-8s with a full VGG-16 (the largest reproduced model) has ~134 M
SIZE_BOUNDS: tuple[tuple[str, float], ...] = (  # (name suffix, largest value); lists are checked per element
    ("num_classes", 256), ("channels", 4096), ("width", 4096), ("width_mult", 4.0), ("depth", 8),
    ("num_layers", 64), ("kernel", 31), ("kernel_size", 31), ("dilations", 256), ("rates", 256), ("scales", 64.0),
    ("output_stride", 32),
)


def register_model(name: str, task: str = "segment") -> Callable[[ModelFactory], ModelFactory]:
    def deco(fn: ModelFactory) -> ModelFactory:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        _TASKS[name] = task
        return fn

    return deco


# Which module registers each built-in model: building one model imports its module only. Importing
# them all (deeplab.py pulls in torchvision's segmentation models, maskrcnn.py its detection stack)
# cost ~1.4 s of a one-image `mammocad predict` with a U-Net bundle (issue 9.4).
BUILTIN_MODULES = {
    "unet": "unet", "fcn32": "fcn", "fcn16": "fcn", "fcn8": "fcn", "dilation10": "dilation", "deeplabv3": "deeplab",
    "logreg": "baselines", "shallow_cnn": "baselines", "maskrcnn": "maskrcnn", "classifier": "classifier",
    "inception_v3": "classifier",
}


def _load_builtin(name: str | None = None) -> None:
    """Import the module that registers ``name`` (every built-in module when None or unknown):
    importing registers the factories, so importing the registry itself stays cheap."""
    import importlib

    modules = [BUILTIN_MODULES[name]] if name in BUILTIN_MODULES else sorted(set(BUILTIN_MODULES.values()))
    for module in modules:
        importlib.import_module(f"mammocad.models.{module}")


def list_models(task: str | None = "segment") -> list[str]:
    """Registered models of ``task`` (default: the segmentation models); ``None``: every model."""
    _load_builtin()
    return sorted(n for n in _MODELS if task is None or _TASKS.get(n, "segment") == task)


def model_task(name: str) -> str:
    """The task model ``name`` was registered for ("segment", "detect", "classify")."""
    _load_builtin(name)
    if name not in _MODELS:
        raise ConfigError(name, f"unknown model; known: {', '.join(sorted(_MODELS))}")
    return _TASKS.get(name, "segment")


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; records its architecture kwargs in ``model.mammocad_config``."""
    _load_builtin(name)
    if name not in _MODELS:
        raise ConfigError(name, f"unknown model; known: {', '.join(sorted(_MODELS))}")
    arch_kwargs = {k: v for k, v in kwargs.items() if k not in INIT_ONLY_KWARGS}
    try:
        # JSON round trip: tuples become lists, so the stored config equals what a bundle reads back.
        arch_kwargs = json.loads(json.dumps(arch_kwargs))
    except TypeError as err:
        raise ConfigError(f"model {name}", f"arguments must be JSON values: {err}") from None
    check_sizes(name, arch_kwargs)
    try:
        with torch.device("meta"):  # the architecture without its memory: count before allocating
            probe = _MODELS[name](**arch_kwargs, **_no_pretrained(name))
        n_params = sum(p.numel() for p in probe.parameters())
        if n_params > MAX_PARAMETERS:
            raise ConfigError(f"model {name}", f"{n_params / 1e6:.0f} M parameters exceed the bound of "
                                               f"{MAX_PARAMETERS / 1e6:.0f} M; check the architecture arguments")
        del probe
        model = _MODELS[name](**kwargs)
    except TypeError as err:  # unknown / missing keyword: a config mistake, say which
        raise ConfigError(f"model {name}", str(err)) from None
    recorded = json.loads(json.dumps(getattr(model, "recorded_kwargs", {})))
    model.mammocad_config = {"name": name, "kwargs": {**arch_kwargs, **recorded}}
    return model


def _no_pretrained(name: str) -> dict[str, Any]:
    """``{"pretrained": False}`` for a factory that takes ``pretrained`` (initial encoder weights),
    else nothing: what rebuilding an architecture passes, so no weights file is read."""
    try:
        accepts = "pretrained" in inspect.signature(_MODELS[name]).parameters
    except (TypeError, ValueError):
        accepts = False
    return {"pretrained": False} if accepts else {}


def check_sizes(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse architecture arguments beyond ``SIZE_BOUNDS`` (one-line ConfigError naming the key)."""
    for key, value in kwargs.items():
        bound = next((b for suffix, b in SIZE_BOUNDS if key == suffix or key.endswith("_" + suffix)), None)
        values = value if isinstance(value, list) else [value]
        if bound is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue  # not a size, or not a number: the constructor says what is wrong with it
        if any(v > bound for v in values):
            raise ConfigError(f"model {name}", f"{key}: {value} exceeds the bound {bound:g}")


def model_config(model: nn.Module) -> dict[str, Any]:
    """The JSON-able ``{"name", "kwargs"}`` that rebuilds ``model``'s architecture."""
    cfg = getattr(model, "mammocad_config", None)
    if cfg is None:
        raise ConfigError(type(model).__name__, "model was not built by create_model; it has no mammocad_config")
    return copy.deepcopy(cfg)


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild an (untrained) model from ``model_config(...)``, e.g. read from a bundle's JSON."""
    if not isinstance(config, dict) or "name" not in config:
        raise ConfigError("model config", "expected an object with 'name' and 'kwargs'")
    _load_builtin(config["name"])
    name, kwargs = config["name"], dict(config.get("kwargs") or {})
    if name in _MODELS:  # the weights come from the bundle: never (re)read an encoder's ImageNet file
        kwargs.update(_no_pretrained(name))
    return create_model(name, **kwargs)


def fixed_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters ``model`` declares fixed (``model.fixed_parameters``: name prefixes)."""
    prefixes = [str(p).rstrip(".") for p in getattr(model, "fixed_parameters", ())]
    return {n for n, _ in model.named_parameters() if any(n == p or n.startswith(p + ".") for p in prefixes)}


# ---------------------------------------------------------------- shared helpers for the models


def check_input(model: nn.Module, x: torch.Tensor) -> None:
    """Raise a one-line ConfigError when ``x`` does not fit the model's contract."""
    name = getattr(model, "mammocad_config", {}).get("name", type(model).__name__)
    if x.ndim != 4 or x.shape[1] != model.in_channels:
        raise ConfigError(f"model {name}", f"expected input (N, {model.in_channels}, H, W), got {tuple(x.shape)}")
    d = model.size_divisor
    h, w = x.shape[-2:]
    if h % d or w % d:
        raise ConfigError(
            f"model {name}", f"input size {h}x{w} is not a multiple of size_divisor {d}; pad or tile to a multiple of {d}"
        )


def group_count(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups: as many as possible (<= max_groups) with >= 2 channels per group.

    Two channels per group at least, because a group of one channel over a 1x1 map (ASPP's image
    pooling branch) has zero variance and would output a constant."""
    for g in (32, 16, 8, 4, 2):
        if g <= max_groups and channels % g == 0 and channels // g >= 2:
            return g
    return 1


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ConfigError("norm", f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


def batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` (in place) by a GroupNorm of the same width.

    Used on torchvision building blocks that hard-code BatchNorm (DeepLab's ASPP): batch statistics
    are meaningless with the 2-8 image batches a CPU trains with."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(group_count(child.num_features), child.num_features))
        else:
            batchnorm_to_groupnorm(child)
    return module


def kaiming_init(module: nn.Module) -> None:
    """He init for convs (as torchvision's VGG/ResNet), unit/zero for norm affine parameters."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def load_encoder_weights(encoder: nn.Module, path: str | Path, in_channels: int) -> int:
    """Copy convolution weights from a local safetensors file (torchvision key names) into ``encoder``.

    Only tensors whose key exists in ``encoder`` with the same shape are copied, plus the first
    convolution when the file has 3 input channels and the model 1 (RGB kernels summed, the usual
    grey-scale adaptation). Returns how many tensors were copied; none is an error (wrong file).
    Never downloads anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "encoder weights file not found")
    try:
        source = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise InputError(path, f"not a readable safetensors file: {err}") from None
    target = encoder.state_dict()
    conv_keys = {
        f"{name}.{p}" for name, m in encoder.named_modules() if isinstance(m, nn.Conv2d) for p in ("weight", "bias")
    }
    copied: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        if key not in conv_keys or key not in target:
            continue  # norm layers differ (we use GroupNorm), classifiers differ: convs only
        want = target[key].shape
        if value.shape == want:
            copied[key] = value
        elif value.ndim == 4 and value.shape[1] == 3 and in_channels == 1 and value.shape[0] == want[0]:
            copied[key] = value.sum(dim=1, keepdim=True)
    if not copied:
        raise InputError(path, "no tensor in the file matches the encoder (wrong architecture or width?)")
    encoder.load_state_dict(copied, strict=False)
    return len(copied)
