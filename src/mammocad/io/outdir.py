"""Output folders: checked before any work, marked as ours, and locked while a run writes to them.

Every command that writes a folder (``prepare``, ``predict``, ``evaluate``, ``train``, ``demo``)
calls ``claim_output_dir`` first, so that

* a bad ``--out`` (an existing file, a read-only or unwritable folder) is a one-line error before
  any model is loaded or any image is read, not a traceback after the work;
* two runs into one folder cannot interleave: the second is refused while the first holds the lock
  (an advisory ``flock`` on ``.mammocad.lock``, released by the kernel when the process dies, so a
  crashed run never leaves a stale lock behind);
* the folder carries a marker (``.mammocad-output``) naming the command that wrote it, so input
  discovery never reads a mammocad output folder as input images (``is_output_dir``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from mammocad.errors import InputError

LOCK_FILE = ".mammocad.lock"
MARKER_FILE = ".mammocad-output"


def check_output_dir(path: str | Path, create: bool = True) -> Path:
    """Create ``path`` (and its parents) if needed and prove it writable by writing a probe file.
    Raises a one-line ``InputError`` naming the folder otherwise. ``create=False`` checks without
    leaving anything behind: the folder if it exists, else its nearest existing parent (a command
    line checks ``--out`` this way before it knows the rest of its arguments are good)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "exists and is not a folder; choose another --out")
    probe_dir = path
    if not create:
        while not probe_dir.exists() and probe_dir != probe_dir.parent:
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise InputError(path, f"cannot be created: {probe_dir} is not a folder; choose another --out")
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mammocad-probe.", suffix=".part", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(path, f"cannot write here ({exc.strerror or exc}); choose another --out") from None
    return path


def is_output_dir(path: str | Path) -> bool:
    """A folder written by a mammocad command (its marker file); input discovery skips these."""
    return (Path(path) / MARKER_FILE).is_file()


def _lock(fh) -> bool:
    """Non-blocking exclusive lock on an open file; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def locked_file(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed), WAITING for another process that holds
    it: for a short shared step (``mammocad cv`` making its splits or writing its table once)."""
    import time

    with open(path, "a+", encoding="utf-8") as fh:
        while not _lock(fh):
            time.sleep(0.2)
        yield  # closing the file releases the lock


@contextlib.contextmanager
def claim_output_dir(path: str | Path, command: str) -> Iterator[Path]:
    """``check_output_dir``, then hold the folder's lock for the duration of the ``with`` block and
    mark it as written by ``command``. A second run into the same folder gets a one-line error."""
    from mammocad import __version__

    # only a folder this run creates, or finds empty, becomes "a mammocad output": a user's own folder
    # given as --out (holding their images, say) must stay visible to later input discovery
    path = Path(path)
    fresh = not path.exists() or (path.is_dir() and not any(p.name != LOCK_FILE for p in path.iterdir()))
    path = check_output_dir(path)
    lock_path = path / LOCK_FILE
    fh = open(lock_path, "a+", encoding="utf-8")
    try:
        if not _lock(fh):
            fh.seek(0)
            holder = fh.read().strip()
            raise InputError(path, f"another mammocad run is writing to this folder ({holder or 'lock held'}); "
                                   "wait for it to finish or choose another --out")
        fh.seek(0)
        fh.truncate()
        fh.write(f"{command} pid {os.getpid()}\n")
        fh.flush()
        marker = path / MARKER_FILE
        if fresh and not marker.is_file():
            marker.write_text(json.dumps({"written_by": f"mammocad {command}", "mammocad_version": __version__}) + "\n",
                              encoding="utf-8")
        yield path
    finally:
        fh.close()  # closing releases the lock
