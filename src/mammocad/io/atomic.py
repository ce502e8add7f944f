"""Atomic file writes: write to a temporary file in the same folder, then rename over the target.

A crash (or a killed worker) leaves either the old file or the new one, never half a file; the
temporary name starts with '.' and ends with '.part' so that resuming code can ignore and clean it.

``mkstemp`` creates the temporary file with mode 0600 whatever the umask (it is meant for secrets);
outputs are not secrets, so the file gets the mode ``open()`` would have given it (0666 less the
umask) before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mammocad.io.jsonutil import json_clean


def _umask_at_import() -> int:
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it: done once, at import
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux 4.7+); elsewhere
    the umask the process had when this module was imported."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # as open() would create it, not mkstemp's 0600
    finally:
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
