"""Dataset adapters by name, like timm's model registry.

An adapter is a function ``read(raw_dir: Path, **options) -> list[Case]``. It reads the layout users
download, raises ``MammocadError`` for problems that stop the whole dataset (missing CSV column,
empty folder) and logs a warning (``logging``) for a single bad annotation it skips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mammocad.errors import ConfigError
from mammocad.records import Case

Adapter = Callable[..., list[Case]]
_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(name: str) -> Callable[[Adapter], Adapter]:
    def deco(fn: Adapter) -> Adapter:
        if name in _ADAPTERS:
            raise ValueError(f"adapter {name!r} registered twice")
        _ADAPTERS[name] = fn
        return fn

    return deco


def _load_builtin() -> None:
    # Importing the modules registers them; kept lazy so that importing the registry is cheap.
    from mammocad.datasets import busbra, busi, cbis_ddsm, coco, folder, mias, via  # noqa: F401


def list_adapters() -> list[str]:
    _load_builtin()
    return sorted(_ADAPTERS)


def get_adapter(name: str) -> Adapter:
    _load_builtin()
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise ConfigError(name, f"unknown dataset adapter; known: {', '.join(sorted(_ADAPTERS))}") from None


def read_cases(name: str, raw_dir: str | Path, **options: Any) -> list[Case]:
    return get_adapter(name)(Path(raw_dir), **options)
