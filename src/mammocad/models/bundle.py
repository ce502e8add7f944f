"""Model bundles: ``model.safetensors`` (weights) + ``model.json`` (the model card).

The card holds the architecture (registered name + kwargs), the preprocessing spec, class names,
thresholds and tiling, the training data and split, validation metrics, versions and dates. A
bundle is loaded with ``json`` and ``safetensors`` only -- no pickle, no ``torch.load`` -- so
opening a bundle from elsewhere cannot run code.

A bundle is named by its folder, or by the name of one shipped inside the package
(``mammocad/bundles/<name>/``, listed by ``list_bundles()``).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mammocad.errors import ConfigError, InputError
from mammocad.io.atomic import atomic_path, atomic_write_text
from mammocad.io.jsonutil import json_clean
from mammocad.models.registry import model_config, model_from_config

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
BUNDLE_FORMAT = "mammocad-model-bundle"
BUNDLE_FORMAT_VERSION = 1


def save_bundle(directory: str | Path, model: nn.Module, card: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``card`` (+ its architecture) to ``directory``; returns it.

    Both files are written atomically; the card last, so a card always describes complete weights."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, **card,
            "architecture": model_config(model)}
    try:
        text = json.dumps(json_clean(full), indent=2, allow_nan=False) + "\n"
    except TypeError as err:
        raise ConfigError(directory / CARD_FILE, f"model card is not JSON: {err}") from None
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        # save_model (not save_file) de-duplicates shared tensors, which save_file refuses.
        save_model(model, str(tmp), metadata={"format": BUNDLE_FORMAT, "architecture": model_config(model)["name"]})
    atomic_write_text(directory / CARD_FILE, text)
    return directory


def shipped_bundles_dir() -> Path:
    return Path(str(resources.files("mammocad").joinpath("bundles")))


def list_bundles() -> list[str]:
    """Names of the bundles shipped inside the package."""
    root = shipped_bundles_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CARD_FILE).is_file() and (p / WEIGHTS_FILE).is_file())


def resolve_bundle(name_or_dir: str | Path) -> Path:
    """A bundle folder from a path or a shipped bundle's name."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    shipped = shipped_bundles_dir() / str(name_or_dir)
    if "/" not in str(name_or_dir) and "\\" not in str(name_or_dir) and shipped.is_dir():
        return shipped
    known = ", ".join(list_bundles()) or "none"
    raise InputError(name_or_dir, f"no such bundle folder, and not a shipped bundle name (shipped: {known})")


def read_card(name_or_dir: str | Path) -> dict[str, Any]:
    """The model card of a bundle, checked for its format."""
    path = resolve_bundle(name_or_dir) / CARD_FILE
    if not path.is_file():
        raise InputError(path.parent, f"not a model bundle: {CARD_FILE} is missing")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable model card ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != BUNDLE_FORMAT:
        raise InputError(path, f"not a mammocad model card (expected \"format\": \"{BUNDLE_FORMAT}\")")
    if card.get("format_version", 0) > BUNDLE_FORMAT_VERSION:
        raise InputError(path, f"bundle format {card.get('format_version')} is newer than this mammocad reads "
                               f"({BUNDLE_FORMAT_VERSION}); upgrade mammocad")
    if not isinstance(card.get("architecture"), dict):
        raise InputError(path, "model card has no 'architecture'")
    return card


def load_bundle(name_or_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode, card)``; the architecture is rebuilt from the card, the weights come
    from safetensors (strict: every tensor must match)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    directory = resolve_bundle(name_or_dir)
    card = read_card(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(directory, f"not a model bundle: {WEIGHTS_FILE} is missing")
    try:
        model = model_from_config(card["architecture"])
    except ConfigError as err:
        raise InputError(directory / CARD_FILE, f"architecture cannot be built: {err}") from None
    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except (SafetensorError, OSError) as exc:
        raise InputError(weights, f"unreadable weights ({exc})") from None
    except RuntimeError as exc:  # missing / unexpected / mis-shaped tensors
        raise InputError(weights, f"weights do not fit the card's architecture ({str(exc).splitlines()[0]})") from None
    model.to(device).eval()
    return model, card
