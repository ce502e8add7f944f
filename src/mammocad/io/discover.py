"""Input discovery: which files are images (plain or DICOM), which breast modality a DICOM file is,
and what a folder walk looked at but did not use, with the reason.

``predict`` and the ``folder`` adapter both find their images here, so that a file is an image for
one exactly when it is for the other. DICOM files are recognised by content, not by name: archives
and DICOMDIR trees name them ``IM0001`` or by UID (``1.2.840.113619.2.55.3``), and old ACR-NEMA
style files have no ``DICM`` preamble at all. Nothing a walk skips is skipped silently: every path
it passes over comes back in ``Discovery.not_used`` with its reason, for the caller to show.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mammocad.errors import DicomError
from mammocad.io.outdir import MARKER_FILE, is_output_dir

PLAIN_SUFFIXES = {".png", ".pgm", ".pnm", ".ppm", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
# DICOM storage classes that are mammography / ultrasound whatever the Modality tag says.
MG_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1"}
US_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1"}
MAMMO_VIEWS = {"CC", "MLO", "ML", "LM", "LMO", "FB", "XCC", "XCCL", "XCCM", "SIO", "ISO", "CV", "AT"}
# Explicit VRs (PS3.5 6.2): the two bytes after the first tag of an explicit-VR file are one of these.
_EXPLICIT_VRS = {vr.encode() for vr in (
    "AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV").split()}
# A preamble-less file is confirmed as DICOM when pydicom finds one of these in its header.
_IDENTIFYING_TAGS = ("SOPClassUID", "Modality", "Rows", "Columns")


# ---- what a file is -----------------------------------------------------------------------------
def _head(path: Path, n: int = 132) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _plausible_first_element(head: bytes) -> bool:
    """Does the file start like a DICOM data set without preamble (little endian, as ACR-NEMA files
    and some exports do)? Its first tag is then of group 0002 (File Meta) or 0008 (identification),
    followed by an explicit VR or, implicit, a 32-bit length far below any real file size."""
    if len(head) < 8:
        return False
    group, element = struct.unpack_from("<HH", head, 0)
    if group not in (0x0002, 0x0008) or element > 0x0100:
        return False
    if head[4:6] in _EXPLICIT_VRS:
        return True
    return struct.unpack_from("<I", head, 4)[0] < 0x10000


def _header_identifies_dicom(path: Path) -> bool:
    """pydicom, forced past the missing preamble, parses the header into identifying attributes
    (forced reading of a file that is not DICOM yields at most one bogus element)."""
    import pydicom

    from mammocad.io.dicom import _quiet_pydicom

    try:
        with _quiet_pydicom():  # a file that is not DICOM makes pydicom warn and log
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, specific_tags=list(_IDENTIFYING_TAGS))
            return any(ds.get(k) not in (None, "") for k in _IDENTIFYING_TAGS)
    except Exception:  # pydicom raises many types on non-DICOM bytes; any of them means "not DICOM"
        return False


def is_dicom_file(path: str | Path) -> bool:
    """Is ``path`` meant as DICOM? True for a Part-10 file ('DICM' at byte 128), for a preamble-less
    file whose first data element and parsed header are DICOM's, and for any ``.dcm``/``.dicom``/``.dic``
    file (named as DICOM: if it is broken, the reader says so, rather than the file being passed
    over). False for a file that cannot be read (``image_kind`` raises instead)."""
    try:
        return _is_dicom(Path(path))
    except OSError:
        return False


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    head = _head(path)
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    return _plausible_first_element(head) and _header_identifies_dicom(path)


def image_kind(path: str | Path) -> str | None:
    """``"plain"`` (PNG, PGM, JPEG, TIFF, BMP: by suffix), ``"dicom"`` (by content, see
    ``is_dicom_file``) or None (not an image). Raises OSError when the file cannot be read."""
    path = Path(path)
    if path.suffix.lower() in PLAIN_SUFFIXES:
        return "plain"
    return "dicom" if _is_dicom(path) else None


def image_stem(path: str | Path) -> str:
    """The name without its image suffix; a DICOM file named by UID (``1.2.840.113619.2.55.3``: its
    "suffix" is a number) or with an unknown suffix keeps its whole name."""
    path = Path(path)
    return path.stem if path.suffix.lower() in PLAIN_SUFFIXES | DICOM_SUFFIXES else path.name


# ---- the breast modality of a file --------------------------------------------------------------
class NonBreastModalityError(DicomError):
    """A readable DICOM image that is neither a mammogram nor a breast ultrasound (a CT, a chest DX)."""


def breast_modality(path: str | Path) -> str | None:
    """``"MG"`` or ``"US"`` from a DICOM file's header (Modality MG, or DX/CR/RG of the breast: a
    mammography view or BodyPartExamined BREAST -> MG; US, or an ultrasound SOP class -> US); None
    for a plain image, which carries no modality. Raises ``NonBreastModalityError`` for any other
    modality (a CT, a chest DX), ``DicomError`` for an unreadable header."""
    path = Path(path)
    if path.suffix.lower() in PLAIN_SUFFIXES:
        return None
    from mammocad.io.dicom import read_dicom_metadata

    meta = read_dicom_metadata(path)  # header only; a broken file fails here with the reader's own message
    modality = (meta.get("modality") or "").upper()
    sop = meta.get("sop_class_uid") or ""
    if modality == "US" or sop in US_SOP_CLASSES:
        return "US"
    if modality == "MG" or sop in MG_SOP_CLASSES:
        return "MG"
    if modality in ("DX", "CR", "RG") and ((meta.get("view") or "").upper() in MAMMO_VIEWS or _body_part(path) == "BREAST"):
        return "MG"
    raise NonBreastModalityError(path, f"modality {modality or 'not given'} is neither a mammogram (MG, or DX/CR/RG of the breast) "
                           "nor an ultrasound (US)")


def _body_part(path: Path) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["BodyPartExamined"], force=True)
    except Exception:  # pydicom raises many types; the header was readable a moment ago
        return ""
    return str(getattr(ds, "BodyPartExamined", "") or "").strip().upper()


# ---- identity of an input -----------------------------------------------------------------------
def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks: an input's identity by content, so that
    outputs can be matched to inputs whatever they are named."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---- folder walk --------------------------------------------------------------------------------
@dataclass(frozen=True)
class NotUsed:
    """A path a walk looked at and did not take as an image, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class Discovery:
    """What a walk found: image files (sorted) and everything it passed over."""

    files: list[Path] = field(default_factory=list)
    not_used: list[NotUsed] = field(default_factory=list)

    def skip(self, path: Path, reason: str) -> None:
        self.not_used.append(NotUsed(str(path), reason))


def _output_dir_reason(folder: Path) -> str:
    try:
        writer = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8")).get("written_by")
    except (OSError, ValueError, AttributeError):
        writer = None
    return f"a mammocad output folder ({writer or 'mammocad'}): its images are outputs, not inputs"


def _folder_refusal(folder: Path, excluded: set[Path]) -> str | None:
    """Why a folder is not searched at all (None: search it)."""
    resolved = folder.resolve()
    if any(resolved == e or resolved.is_relative_to(e) for e in excluded):
        return "the output folder of this run"
    if is_output_dir(folder):
        return _output_dir_reason(folder)
    return None


def _entry(found: Discovery, path: Path, entry: os.DirEntry, recursive: bool, excluded: set[Path]) -> Path | None:
    """Classify one folder entry: add it to ``found`` (image or not used); return it when it is a
    folder to search."""
    kind = "folder" if entry.is_dir() else "file"  # follows a symlink; a dangling one is a "file"
    if entry.name.startswith("."):
        found.skip(path, f"hidden {kind} (name starts with '.')")
        return None
    if entry.is_symlink():
        if not path.exists():
            found.skip(path, "broken symbolic link (its target does not exist)")
            return None
        if kind == "folder":
            found.skip(path, "symbolic link to a folder: not followed (name it as an input to include it)")
            return None
    if kind == "folder":
        if not recursive:
            found.skip(path, "subfolder: not searched (only the files directly in the folder are read)")
            return None
        why = _folder_refusal(path, excluded)
        if why:
            found.skip(path, why)
            return None
        return path
    if not entry.is_file():
        found.skip(path, "not a regular file")
    elif entry.name.upper() == "DICOMDIR":
        found.skip(path, "DICOMDIR index (the image files it lists are found on their own)")
    else:
        try:
            kind = image_kind(path)
        except OSError as exc:
            found.skip(path, f"cannot read ({exc.strerror or exc})")
            return None
        if kind is None:
            suffix = f"suffix {path.suffix!r}" if path.suffix else "no image suffix"
            found.skip(path, f"not an image ({suffix} and no DICOM header)")
        else:
            found.files.append(path)
    return None


def find_images(folder: str | Path, *, recursive: bool = True, exclude: Iterable[str | Path] = ()) -> Discovery:
    """Image files under ``folder`` (searched recursively unless ``recursive`` is False), sorted,
    and every path passed over with its reason: hidden files and folders, DICOMDIR indexes, files
    that are not images, broken symbolic links, symbolic links to folders (not followed: they can
    loop or lead out of the tree), unreadable folders, mammocad output folders (``is_output_dir``)
    and ``exclude`` (the caller's own output folder, which may not be marked yet)."""
    folder = Path(folder)
    excluded = {Path(e).resolve() for e in exclude}
    found = Discovery()
    why = _folder_refusal(folder, excluded)
    if why:
        found.skip(folder, why)
        return found
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            found.skip(current, f"cannot read folder ({exc.strerror or exc})")
            continue
        for entry in entries:
            sub = _entry(found, current / entry.name, entry, recursive, excluded)
            if sub is not None:
                pending.append(sub)
    found.files.sort()
    found.not_used.sort(key=lambda n: Path(n.path))
    return found
