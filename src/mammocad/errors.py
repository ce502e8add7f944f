"""One error family. A user-facing failure prints as ``mammocad: <file>: <cause>``."""

from __future__ import annotations

from pathlib import Path


class MammocadError(Exception):
    """Any failure we can explain to the user in one line.

    ``source`` names the file (or folder, or config key) at fault; ``cause`` says what is wrong
    with it. ``str(err)`` is ``"<source>: <cause>"`` so that the CLI can print
    ``mammocad: <source>: <cause>``.
    """

    def __init__(self, source: str | Path | None, cause: str):
        self.source = None if source is None else str(source)
        self.cause = " ".join(str(cause).split())  # always one line
        super().__init__(self.cause if self.source is None else f"{self.source}: {self.cause}")


class InputError(MammocadError):
    """An input file or folder is unreadable, missing, empty or malformed."""


class DicomError(InputError):
    """A DICOM file cannot be turned into a meaningful image."""


class AnnotationError(InputError):
    """Annotations (CSV, JSON, masks) are inconsistent with themselves or with the image."""


class ConfigError(MammocadError):
    """A configuration value is invalid."""
