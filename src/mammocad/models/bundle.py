"""Model bundles: ``model.safetensors`` (weights) + ``model.json`` (the model card, ``models.card``).

The card holds the task, the architecture (registered name + kwargs), the preprocessing spec, class
names, thresholds and tiling, the training data and split, validation metrics, the weights' SHA-256,
versions and dates. A bundle is loaded with ``json`` and ``safetensors`` only -- no pickle, no
``torch.load`` -- so opening a bundle from elsewhere cannot run code; the card is validated (sizes
bounded) before any model is built, and weights that are not the ones the card was written for
(``weights_sha256``) are refused.

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
from mammocad.io.discover import file_sha256
from mammocad.io.jsonutil import json_clean
from mammocad.models.card import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, ModelCard, validate_card
from mammocad.models.registry import model_config, model_from_config

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
__all__ = ["BUNDLE_FORMAT", "BUNDLE_FORMAT_VERSION", "CARD_FILE", "WEIGHTS_FILE", "ModelCard", "list_bundles",
           "load_bundle", "read_card", "resolve_bundle", "save_bundle"]


WEIGHTS_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_bundle(directory: str | Path, model: nn.Module, card: dict[str, Any] | ModelCard,
                weights_dtype: str = "float32") -> Path:
    """Write ``model``'s weights and ``card`` (+ its architecture and the weights' SHA-256) to
    ``directory``; returns it.

    ``weights_dtype``: "float16" or "bfloat16" store the floating tensors at half the size (shipped
    bundles: the repository holds them); ``load_bundle`` casts them back into the fp32 model, so
    inference runs in fp32 on rounded weights (``card["weights_dtype"]`` says so; the tests bound
    what the rounding changes). Integer buffers are kept as they are.

    The card is validated first (an invalid card is never written); both files are written
    atomically, the card last, so a card always describes complete weights."""
    import copy

    from safetensors.torch import save_model

    if weights_dtype not in WEIGHTS_DTYPES:
        raise ConfigError("weights_dtype", f"must be one of {', '.join(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
    directory = Path(directory)
    fields = card.to_json() if isinstance(card, ModelCard) else dict(card)
    full = {**fields, "format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION,
            "architecture": model_config(model), "weights_sha256": "0" * 64, "weights_dtype": weights_dtype}
    try:
        full = json_clean(full)
        json.dumps(full, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(directory / CARD_FILE, f"model card is not JSON: {err}") from None
    try:
        validate_card(full, directory / CARD_FILE)
    except InputError as err:
        raise ConfigError(err.source, err.cause) from None
    directory.mkdir(parents=True, exist_ok=True)
    stored = model if weights_dtype == "float32" else copy.deepcopy(model).to(WEIGHTS_DTYPES[weights_dtype])
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        # save_model (not save_file) de-duplicates shared tensors, which save_file refuses.
        save_model(stored, str(tmp), metadata={"format": BUNDLE_FORMAT, "architecture": model_config(model)["name"]})
        full["weights_sha256"] = file_sha256(tmp)
    text = json.dumps(validate_card(full, directory / CARD_FILE).to_json(), indent=2, allow_nan=False) + "\n"
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


def read_card(name_or_dir: str | Path) -> ModelCard:
    """The validated model card of a bundle (see ``models.card``)."""
    path = resolve_bundle(name_or_dir) / CARD_FILE
    if not path.is_file():
        raise InputError(path.parent, f"not a model bundle: {CARD_FILE} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable model card ({exc})") from None
    if not isinstance(data, dict) or "format" not in data:  # a file must say what it is; in-memory cards need not
        raise InputError(path, f"not a mammocad model card (expected \"format\": \"{BUNDLE_FORMAT}\")")
    return validate_card(data, path)


def check_weights(weights: Path, card: ModelCard) -> None:
    """Refuse weights that are not the ones the card was written for (swapped or damaged files)."""
    if card.weights_sha256 is not None and file_sha256(weights) != card.weights_sha256:
        raise InputError(weights, "weights do not match the card's weights_sha256 (a different or damaged file)")


def load_bundle(name_or_dir: str | Path, device: str | torch.device = "cpu",
                card: ModelCard | None = None) -> tuple[nn.Module, ModelCard]:
    """``(model in eval mode, card)``; the card is validated and the weights' hash checked before the
    architecture is rebuilt from the card (with its size bounds); the weights come from
    safetensors (strict: every tensor must match). ``card``: this bundle's card already read with
    ``read_card`` (a caller that checks the card first need not parse and validate it twice)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    directory = resolve_bundle(name_or_dir)
    card = read_card(directory) if card is None else card
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(directory, f"not a model bundle: {WEIGHTS_FILE} is missing")
    check_weights(weights, card)
    try:
        model = model_from_config(card.architecture.model_dump())
    except ConfigError as err:
        raise InputError(directory / CARD_FILE, f"architecture cannot be built: {err}") from None
    try:  # load_state_dict copies into the fp32 parameters: fp16/bf16 weights are cast back
        load_model(model, str(weights), strict=True, device=str(device))
    except (SafetensorError, OSError) as exc:
        raise InputError(weights, f"unreadable weights ({exc})") from None
    except RuntimeError as exc:  # missing / unexpected / mis-shaped tensors
        raise InputError(weights, f"weights do not fit the card's architecture ({str(exc).splitlines()[0]})") from None
    model.to(device).eval()
    return model, card
