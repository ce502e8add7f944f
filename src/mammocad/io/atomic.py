"""Atomic file writes: write to a temporary file in the same folder, then rename over the target.

A crash (or a killed worker) leaves either the old file or the new one, never half a file; the
temporary name starts with '.' and ends with '.part' so that resuming code can ignore and clean it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mammocad.io.jsonutil import json_clean


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, *, sort_keys: bool = False,
                      strict: bool = False) -> None:
    """Write ``obj`` as JSON plus a final newline. ``strict`` first maps NaN/inf to null (and numpy
    values to Python ones) so the file is valid JSON; without it a NaN is written as ``NaN``."""
    if strict:
        obj = json_clean(obj)
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=not strict) + "\n")
