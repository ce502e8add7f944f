"""The records every module speaks: Lesion, Case, Prediction. Plain dataclasses with JSON round-trip.

Coordinate convention (used by every record, adapter and by ``Geometry``): continuous pixel-edge
coordinates in the image's own pixel grid, x to the right, y down, origin at the top-left corner of
the top-left pixel. Pixel (row r, column c) covers ``[c, c+1) x [r, r+1)``; its centre is
``(c + 0.5, r + 0.5)``. Boxes are ``[x0, y0, x1, y1]`` with x1/y1 exclusive (a box covering columns
0..9 has x0=0, x1=10), as in COCO.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

PATHOLOGIES = ("benign", "malignant", "unknown")
IMAGE_LABELS = ("normal", "benign", "malignant", "unknown")
LESION_KINDS = ("mass", "calcification", "distortion", "asymmetry", "other")
MODALITIES = ("MG", "US")


def _check(value: str | None, allowed: tuple[str, ...], what: str) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


@dataclass
class Lesion:
    """One annotated finding. At most one of mask_path / polygon / circle / box is the outline;
    a lesion may also have none (an abnormality the source lists without coordinates)."""

    pathology: str = "unknown"
    kind: str = "other"
    source_label: str = ""  # the dataset's raw words, e.g. "BENIGN_WITHOUT_CALLBACK", "SPIC"
    mask_path: str | None = None  # binary mask file (DICOM or image) in the image's pixel grid
    polygon: list[tuple[float, float]] | None = None  # [(x, y), ...]
    circle: tuple[float, float, float] | None = None  # (cx, cy, radius)
    box: tuple[float, float, float, float] | None = None  # (x0, y0, x1, y1)
    attributes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.pathology, PATHOLOGIES, "pathology")
        _check(self.kind, LESION_KINDS, "kind")
        if self.polygon is not None:
            self.polygon = [(float(x), float(y)) for x, y in self.polygon]
        if self.circle is not None:
            self.circle = tuple(float(v) for v in self.circle)  # type: ignore[assignment]
        if self.box is not None:
            self.box = tuple(float(v) for v in self.box)  # type: ignore[assignment]

    @property
    def has_geometry(self) -> bool:
        return any(v is not None for v in (self.mask_path, self.polygon, self.circle, self.box))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["polygon"] is not None:
            d["polygon"] = [list(p) for p in d["polygon"]]
        for k in ("circle", "box"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Lesion":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Case:
    """One image with its annotations: the unit every adapter yields and preprocessing consumes."""

    case_id: str
    patient_id: str
    dataset: str
    modality: str
    image_path: str
    laterality: str | None = None  # "L" | "R"
    view: str | None = None  # "CC", "MLO", ...
    label: str = "unknown"  # image-level: normal | benign | malignant | unknown
    lesions: list[Lesion] = field(default_factory=list)
    split: str | None = None  # split given by the source itself (CBIS-DDSM official train/test)
    attributes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.modality, MODALITIES, "modality")
        _check(self.label, IMAGE_LABELS, "label")
        _check(self.laterality, ("L", "R"), "laterality")
        self.lesions = [les if isinstance(les, Lesion) else Lesion.from_dict(les) for les in self.lesions]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["lesions"] = [les.to_dict() for les in self.lesions]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Case":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def label_from_lesions(lesions: Iterable[Lesion]) -> str:
    """Image label as the datasets define it: malignant if any lesion is, benign if all are,
    normal without lesions, unknown otherwise."""
    pathologies = [les.pathology for les in lesions]
    if not pathologies:
        return "normal"
    if "malignant" in pathologies:
        return "malignant"
    if all(p == "benign" for p in pathologies):
        return "benign"
    return "unknown"


@dataclass
class PredictedLesion:
    """One lesion found by a model, in the original image's pixel coordinates."""

    box: tuple[float, float, float, float]
    score: float
    label: str = "lesion"  # class name, e.g. "lesion", "benign", "malignant"
    class_probabilities: dict[str, float] = field(default_factory=dict)
    area: float = 0.0  # pixels in the original image
    mask_path: str | None = None

    def __post_init__(self) -> None:
        self.box = tuple(float(v) for v in self.box)  # type: ignore[assignment]
        self.score = float(self.score)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["box"] = list(self.box)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PredictedLesion":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Prediction:
    """What a model said about one image."""

    image_path: str
    image_size: tuple[int, int]  # (height, width) of the original image
    model_name: str
    model_version: str
    lesions: list[PredictedLesion] = field(default_factory=list)
    image_probabilities: dict[str, float] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        self.lesions = [p if isinstance(p, PredictedLesion) else PredictedLesion.from_dict(p) for p in self.lesions]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["image_size"] = list(self.image_size)
        d["lesions"] = [p.to_dict() for p in self.lesions]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Prediction":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """Write records (anything with ``to_dict`` or plain dicts) as JSON lines, atomically."""
    from mammocad.io.atomic import atomic_write_text

    lines = [json.dumps(r.to_dict() if hasattr(r, "to_dict") else r, sort_keys=True) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
