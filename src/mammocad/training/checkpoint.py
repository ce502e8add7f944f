"""Resume checkpoints without pickle: ``checkpoint.safetensors`` + ``checkpoint.json``.

The tensors (model weights, optimizer buffers such as SGD momentum or Adam moments) go to
safetensors under flat keys (``model.<name>``, ``optim.<param index>.<buffer>``); everything else
(epoch counters, early-stopping state, optimizer hyper-parameters, LR scheduler and GradScaler
state, logged history) goes to JSON. ``torch.save`` would be simpler but pickles, and loading a
pickle runs code; keeping checkpoints pickle-free means a run folder is safe to open anywhere.

Each file is written atomically, tensors first; both carry the same ``epoch`` so a crash between
the two writes is detected instead of resuming from a mismatched pair. ``best.safetensors`` holds
the weights of the best validation so far (what the bundle ships).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mammocad.errors import InputError
from mammocad.io.atomic import atomic_path, atomic_write_json
from mammocad.io.jsonutil import json_clean

CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"
BEST_WEIGHTS = "best.safetensors"
CHECKPOINT_VERSION = 1


def _module_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share memory (tied weights), and we want CPU copies
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors under flat keys, JSON rest) of ``optimizer.state_dict()``."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict[str, Any]] = {}
    for index, entries in sd["state"].items():
        meta[str(index)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                meta[str(index)][name] = value
    return tensors, {"state": meta, "param_groups": json_clean(sd["param_groups"])}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``split_optimizer_state``: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {int(i): dict(entries) for i, entries in meta["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(_module_state(model), str(tmp), metadata=metadata)


def load_weights(path: Path, model: nn.Module) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InputError(path, f"unreadable weights ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(path, f"weights do not fit the model ({str(exc).splitlines()[0]})") from None


def save_checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Write the resume pair; ``state`` is JSON (must hold ``epoch``) and gets the optimizer's JSON part."""
    from safetensors.torch import save_file

    opt_tensors, opt_meta = split_optimizer_state(optimizer)
    tensors = {f"model.{k}": v for k, v in _module_state(model).items()} | opt_tensors
    epoch = str(int(state["epoch"]))
    with atomic_path(out_dir / CHECKPOINT_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"epoch": epoch, "version": str(CHECKPOINT_VERSION)})
    record = {"version": CHECKPOINT_VERSION, **state, "optimizer": opt_meta}
    atomic_write_json(out_dir / CHECKPOINT_STATE, record, indent=1, strict=True)


def read_checkpoint_state(out_dir: Path) -> dict[str, Any] | None:
    """The JSON half of the checkpoint, or None when there is none."""
    path = out_dir / CHECKPOINT_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "epoch" not in state:
        raise InputError(path, f"not a mammocad checkpoint (version {CHECKPOINT_VERSION})")
    return state


def load_checkpoint_tensors(out_dir: Path, epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model state, optimizer tensors) of the checkpoint written at ``epoch``."""
    from safetensors import SafetensorError, safe_open

    path = out_dir / CHECKPOINT_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise InputError(path, f"unreadable checkpoint weights ({exc})") from None
    if meta.get("epoch") != str(epoch):
        raise InputError(path, f"written at epoch {meta.get('epoch')} but {CHECKPOINT_STATE} says epoch {epoch} "
                               "(the run was killed between the two writes); start a fresh run")
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return model_state, {k: v for k, v in tensors.items() if k.startswith("optim.")}
