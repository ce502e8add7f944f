"""mini-MIAS adapter: ``Info.txt`` + ``mdbNNN.pgm`` as distributed (PNG copies and an ``images/``
subfolder are accepted too).

Info.txt is free text (a header copied from the README, separator lines, CRLF endings, trailing
blanks) around whitespace-separated data lines::

    mdb001 G CIRC B 535 425 197      refnum, tissue, class, severity, x, y, radius
    mdb003 D NORM                    normal film: 3 fields
    mdb059 F CIRC B                  abnormality without coordinates
    mdb216 D CALC M *NOTE 3*         widely distributed calcifications, no coordinates

(x, y) has its origin at the BOTTOM-left, so in our pixel-edge convention the circle centre is
``(x + 0.5, height - y + 0.5)``: the disc over pixel centres ``(c - x)^2 + (row - (height - y))^2
<= r^2`` that the MIAS masks in shared/data were made with. A film with several abnormalities has
several lines with the same refnum. No parser for this format exists in a maintained library, hence
the hand-written one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mammocad.datasets.common import check_options
from mammocad.datasets.registry import register_adapter
from mammocad.errors import AnnotationError, InputError
from mammocad.records import Case, Lesion, label_from_lesions

log = logging.getLogger(__name__)

TISSUES = {"F": "fatty", "G": "fatty-glandular", "D": "dense-glandular"}
CLASS_TO_KIND = {
    "CALC": "calcification",
    "CIRC": "mass",
    "SPIC": "mass",
    "MISC": "mass",
    "ARCH": "distortion",
    "ASYM": "asymmetry",
}
SEVERITY_TO_PATHOLOGY = {"B": "benign", "M": "malignant"}
IMAGE_SUFFIXES = (".pgm", ".png")  # preference order: the original PGM first
_REFNUM = re.compile(r"^mdb(\d+)$", re.IGNORECASE)
_SEPARATOR = re.compile(r"^=+$")


@dataclass
class InfoRow:
    """One data line of Info.txt, already validated."""

    refnum: str  # "mdb001"
    number: int  # 1
    tissue: str  # F | G | D
    abnormality: str  # CALC ... ASYM, or NORM
    severity: str | None  # B | M | None
    xy_radius: tuple[float, float, float] | None  # as written (origin bottom-left), None without coordinates
    line_no: int
    note: str = ""


@dataclass
class _Film:
    rows: list[InfoRow] = field(default_factory=list)


def find_info_txt(raw_dir: Path) -> Path:
    """Info.txt in ``raw_dir`` (name matched case-insensitively: some copies have info.txt)."""
    if not raw_dir.is_dir():
        raise InputError(raw_dir, "folder not found")
    for p in sorted(raw_dir.iterdir()):
        if p.is_file() and p.name.lower() == "info.txt":
            return p
    raise InputError(raw_dir, "no Info.txt in this folder (expected the mini-MIAS distribution: Info.txt + mdbNNN.pgm)")


def _parse_number(token: str, info: Path, line_no: int, what: str) -> float:
    try:
        return float(token)
    except ValueError:
        raise AnnotationError(f"{info}:{line_no}", f"line {line_no}: {what} {token!r} is not a number") from None


def parse_data_line(tokens: list[str], info: Path, line_no: int) -> InfoRow:
    """Validate one whitespace-split data line; AnnotationError ``<Info.txt>:<line>`` otherwise."""
    where = f"{info}:{line_no}"
    text = " ".join(tokens)
    m = _REFNUM.match(tokens[0])
    if m is None:
        raise AnnotationError(where, f"cannot parse line {line_no} {text!r}: expected a refnum like mdb001")
    if len(tokens) < 3:
        raise AnnotationError(where, f"cannot parse line {line_no} {text!r}: expected refnum, tissue, class")
    refnum, number = f"mdb{int(m.group(1)):03d}", int(m.group(1))
    tissue, abnormality = tokens[1].upper(), tokens[2].upper()
    if tissue not in TISSUES:
        raise AnnotationError(where, f"line {line_no} {text!r}: background tissue {tokens[1]!r} is not one of F, G, D")
    if abnormality == "NORM":
        if len(tokens) > 3:
            raise AnnotationError(where, f"line {line_no} {text!r}: a NORM line has extra fields")
        return InfoRow(refnum, number, tissue, "NORM", None, None, line_no)
    if abnormality not in CLASS_TO_KIND:
        raise AnnotationError(where, f"line {line_no} {text!r}: class {tokens[2]!r} is not one of {', '.join([*CLASS_TO_KIND, 'NORM'])}")
    rest = tokens[3:]
    severity = None
    if rest and rest[0].upper() in SEVERITY_TO_PATHOLOGY:
        severity, rest = rest[0].upper(), rest[1:]
    if rest and rest[0].startswith("*"):  # "*NOTE 3*": widely distributed calcifications, no coordinates
        return InfoRow(refnum, number, tissue, abnormality, severity, None, line_no, note=" ".join(rest))
    if not rest:
        return InfoRow(refnum, number, tissue, abnormality, severity, None, line_no)
    if severity is None or len(rest) != 3:
        raise AnnotationError(where, f"cannot parse line {line_no} {text!r}: expected refnum tissue class severity [x y radius]")
    x, y, r = (_parse_number(t, info, line_no, n) for t, n in zip(rest, ("x", "y", "radius")))
    if r <= 0:
        raise AnnotationError(where, f"line {line_no} {text!r}: radius must be positive")
    return InfoRow(refnum, number, tissue, abnormality, severity, (x, y, r), line_no)


def parse_info_txt(info: Path) -> list[InfoRow]:
    """All data lines of Info.txt in file order.

    Lines before the first data line are the free-text header and are skipped; after it, only data
    lines, blank lines and ``=====`` separators may appear, so a mangled data line (a typo in the
    refnum, a missing field) is reported instead of silently dropping a film.
    """
    try:
        text = info.read_text(encoding="latin-1")  # 1995 ASCII file; latin-1 never fails to decode
    except OSError as exc:
        raise InputError(info, f"cannot read ({exc.strerror or exc})") from None
    rows: list[InfoRow] = []
    in_data = False
    for line_no, line in enumerate(text.splitlines(), start=1):  # splitlines handles CRLF
        tokens = line.split()
        if not tokens or _SEPARATOR.match(tokens[0]):
            continue
        if _REFNUM.match(tokens[0]):
            in_data = True
        elif not in_data:
            continue  # header text
        rows.append(parse_data_line(tokens, info, line_no))
    if not rows:
        raise AnnotationError(info, "no data lines (expected lines like 'mdb001 G CIRC B 535 425 197')")
    return rows


def _group_by_film(rows: list[InfoRow], info: Path) -> dict[str, _Film]:
    films: dict[str, _Film] = {}
    for row in rows:
        film = films.setdefault(row.refnum, _Film())
        if film.rows:
            first = film.rows[0]
            where = f"{info}:{row.line_no}"
            if row.tissue != first.tissue:
                raise AnnotationError(where, f"{row.refnum}: background tissue {row.tissue} contradicts {first.tissue} on line {first.line_no}")
            if "NORM" in (row.abnormality, first.abnormality):
                raise AnnotationError(where, f"{row.refnum}: listed as NORM and again on line {first.line_no}")
        film.rows.append(row)
    return films


def _index_images(raw_dir: Path) -> dict[str, Path]:
    """Lower-case file name -> path for images in raw_dir and raw_dir/images (first one wins)."""
    found: dict[str, Path] = {}
    for folder in (raw_dir, raw_dir / "images"):
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                    found.setdefault(p.name.lower(), p)
    return found


def _image_height(path: Path) -> int | None:
    """Rows of the image from its header only (PIL opens lazily); None when unreadable."""
    try:
        with Image.open(path) as im:
            return int(im.size[1])
    except (OSError, UnidentifiedImageError) as exc:
        log.warning("%s: unreadable image header (%s); film skipped", path, exc)
        return None


def _lesion(row: InfoRow, height: int) -> Lesion:
    circle = None
    if row.xy_radius is not None:
        x, y, r = row.xy_radius
        circle = (x + 0.5, height - y + 0.5, r)  # bottom-left origin -> top-left pixel-edge coordinates
    source_label = row.abnormality if row.severity is None else f"{row.abnormality} {row.severity}"
    attributes: dict[str, object] = {"info_txt_line": row.line_no}
    if row.note:
        attributes["note"] = row.note
    return Lesion(
        pathology=SEVERITY_TO_PATHOLOGY.get(row.severity or "", "unknown"),
        kind=CLASS_TO_KIND[row.abnormality],
        source_label=source_label,
        circle=circle,
        attributes=attributes,
    )


@register_adapter("mias")
def read_mias(raw_dir: Path, **options: str) -> list[Case]:
    """Cases of a mini-MIAS folder, one per film listed in Info.txt and present on disk.

    Patients are film pairs (mdb001+mdb002 = ``mias_p001``); per the MIAS README even-numbered films
    are left breasts and odd-numbered right ones. All films are MLO.
    """
    check_options("mias", options, ())
    raw_dir = Path(raw_dir)
    info = find_info_txt(raw_dir)
    films = _group_by_film(parse_info_txt(info), info)
    images = _index_images(raw_dir)
    cases: list[Case] = []
    for refnum, film in films.items():
        path = next((images[refnum + s] for s in IMAGE_SUFFIXES if refnum + s in images), None)
        if path is None:
            log.warning("%s: %s is listed (line %d) but neither %s.pgm nor %s.png exists; film skipped", info, refnum, film.rows[0].line_no, refnum, refnum)
            continue
        height = _image_height(path)
        if height is None:
            continue
        first = film.rows[0]
        lesions = [] if first.abnormality == "NORM" else [_lesion(row, height) for row in film.rows]
        for les in lesions:
            if les.circle is not None and not (0 <= les.circle[1] <= height):
                log.warning("%s: %s line %s: centre lies outside the %d-row image", info, refnum, les.attributes["info_txt_line"], height)
        cases.append(
            Case(
                case_id=refnum,
                patient_id=f"mias_p{(first.number + 1) // 2:03d}",
                dataset="mias",
                modality="MG",
                image_path=str(path),
                laterality="L" if first.number % 2 == 0 else "R",
                view="MLO",
                label="normal" if first.abnormality == "NORM" else label_from_lesions(lesions),
                lesions=lesions,
                attributes={"background_tissue": first.tissue, "background_tissue_name": TISSUES[first.tissue]},
            )
        )
    if not cases:
        raise InputError(raw_dir, f"none of the {len(films)} films listed in {info.name} has an image (mdbNNN.pgm/.png here or in images/)")
    return cases
