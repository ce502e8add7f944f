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

import numpy as np

PATHOLOGIES = ("benign", "malignant", "unknown")
IMAGE_LABELS = ("normal", "benign", "malignant", "unknown")
LESION_KINDS = ("mass", "calcification", "distortion", "asymmetry", "other")
MODALITIES = ("MG", "US")
# ``Case.attributes`` key of a case an adapter refuses (e.g. a CT among mammograms): the one-line
# error ``prepare`` reports as that case's failure instead of preparing it
REFUSED = "refused"


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
class CroppedMask:
    """A bool mask stored as its bounding region: ``full()[y0:y0+h, x0:x0+w] == mask``, zero elsewhere.

    A lesion covers a tiny part of a mammogram: a full 3328 x 4084 bool mask per lesion would cost
    13.6 MB for nothing. It lives here, beside ``PredictedLesion`` which carries one in memory."""

    mask: np.ndarray  # bool (h, w)
    x0: int
    y0: int
    image_size: tuple[int, int]  # (H, W) of the grid the mask lives on

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Tight [x0, y0, x1, y1] (pixel edges, exclusive end) of the set pixels."""
        rows, cols = np.flatnonzero(self.mask.any(axis=1)), np.flatnonzero(self.mask.any(axis=0))
        if rows.size == 0:
            return (self.x0, self.y0, self.x0, self.y0)
        return (self.x0 + int(cols[0]), self.y0 + int(rows[0]), self.x0 + int(cols[-1]) + 1, self.y0 + int(rows[-1]) + 1)

    def paste_into(self, canvas: np.ndarray, value: int | bool = True) -> np.ndarray:
        h, w = self.mask.shape
        canvas[self.y0:self.y0 + h, self.x0:self.x0 + w][self.mask] = value
        return canvas

    def full(self) -> np.ndarray:
        return self.paste_into(np.zeros(self.image_size, dtype=bool))

    @classmethod
    def from_full(cls, mask: np.ndarray) -> "CroppedMask":
        """The bounding region of a full-size mask (an empty mask keeps a 0 x 0 region)."""
        mask = np.asarray(mask, dtype=bool)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            return cls(np.zeros((0, 0), dtype=bool), 0, 0, (int(mask.shape[0]), int(mask.shape[1])))
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        return cls(mask[y0:y1, x0:x1].copy(), x0, y0, (int(mask.shape[0]), int(mask.shape[1])))

    def to_rle(self) -> dict[str, Any]:
        """COCO compressed RLE (``{"size": [H, W], "counts": str}``) of the full-size mask.

        The runs are counted on the mask's column band only (COCO runs go down the columns, so the
        columns left and right of the band are one run of zeros each) and pycocotools compresses them:
        no full-size copy of the image per mask."""
        from pycocotools import mask as coco_mask

        big_h, big_w = self.image_size
        h, w = self.mask.shape
        band = np.zeros((big_h, w), dtype=np.int8)
        band[self.y0:self.y0 + h] = self.mask
        flat = band.T.ravel()  # column-major: the band's slice of the full image's run order
        edges = np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))
        runs = np.diff(edges).tolist()
        if flat.size and flat[0]:
            runs.insert(0, 0)  # COCO counts start with a run of zeros
        lead, trail = self.x0 * big_h, (big_w - self.x0 - w) * big_h
        runs = runs or [0]
        runs[0] += lead
        if len(runs) % 2:  # ends on zeros
            runs[-1] += trail
        elif trail:
            runs.append(trail)
        rle = coco_mask.frPyObjects({"counts": runs, "size": [big_h, big_w]}, big_h, big_w)
        return {"size": [int(big_h), int(big_w)], "counts": rle["counts"].decode("ascii")}

    @classmethod
    def from_rle(cls, rle: dict[str, Any]) -> "CroppedMask":
        """Inverse of ``to_rle`` (also takes uncompressed COCO RLE)."""
        from pycocotools import mask as coco_mask

        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
        if isinstance(counts, list):
            coded = coco_mask.frPyObjects({"counts": counts, "size": [h, w]}, h, w)
        else:
            coded = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        return cls.from_full(coco_mask.decode(coded).astype(bool))


@dataclass
class LesionComponent:
    """One predicted lesion on the PREPARED (model) grid: a connected component of a thresholded
    probability map (``tasks.segment_lesions.probability_to_lesions``), or an original-grid
    ``PredictedLesion`` mapped forward for scoring. Its twin on the original grid is ``PredictedLesion``."""

    mask: CroppedMask
    box: tuple[int, int, int, int]  # [x0, y0, x1, y1] pixel edges, exclusive end
    area: int  # pixels
    score: float  # mean of the top 10 % lesion probabilities inside the component
    label: str  # class name
    class_probabilities: dict[str, float] = field(default_factory=dict)  # foreground classes, sum to 1

    @classmethod
    def from_mask(cls, mask: np.ndarray, score: float, label: str = "lesion",
                  class_probabilities: dict[str, float] | None = None) -> "LesionComponent":
        """A component from a full-size boolean mask of its grid (kept cropped to its bounding box)."""
        cropped = CroppedMask.from_full(mask)
        if cropped.area == 0:
            raise ValueError("empty component mask")
        return cls(mask=cropped, box=cropped.box, area=cropped.area, score=float(score), label=label,
                   class_probabilities=dict(class_probabilities or {}))


@dataclass
class PredictedLesion:
    """One lesion found by a model, in the original image's pixel coordinates.

    ``mask`` is the lesion's pixels on the original grid, held in memory only (``to_dict`` leaves it
    out unless ``mask_rle=True``; ``mammocad predict`` writes lesion masks as PNG files, candidates
    as RLE): the one predicted-lesion type of the original grid, for writing and for scoring."""

    box: tuple[float, float, float, float]
    score: float
    label: str = "lesion"  # class name, e.g. "lesion", "benign", "malignant"
    class_probabilities: dict[str, float] = field(default_factory=dict)
    area: float = 0.0  # pixels in the original image
    mask_path: str | None = None
    mask: CroppedMask | None = field(default=None, compare=False, repr=False)
    # A pipeline's lesion classifier (``inference.compose``): P(benign), P(malignant) of this lesion,
    # and the call at the pipeline's threshold. Empty / None from a lesion model alone.
    pathology_probabilities: dict[str, float] = field(default_factory=dict)
    pathology: str | None = None

    def __post_init__(self) -> None:
        self.box = tuple(float(v) for v in self.box)  # type: ignore[assignment]
        self.score = float(self.score)
        _check(self.pathology, PATHOLOGIES, "pathology")

    def to_dict(self, mask_rle: bool = False) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "mask"}
        d["box"] = list(self.box)
        d["class_probabilities"] = dict(self.class_probabilities)
        d["pathology_probabilities"] = dict(self.pathology_probabilities)
        if mask_rle and self.mask is not None:
            d["mask_rle"] = self.mask.to_rle()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PredictedLesion":
        known = {f.name for f in fields(cls)} - {"mask"}
        rle = d.get("mask_rle")
        return cls(**{k: v for k, v in d.items() if k in known}, mask=None if rle is None else CroppedMask.from_rle(rle))


@dataclass
class Prediction:
    """What a model said about one image.

    ``lesions`` are what the model outputs at its operating point (threshold, minimum area, max
    lesions); ``candidates`` are every component found at a low probability threshold, each with its
    score (``attributes["candidate_search"]`` says which threshold and cap): what a FROC curve needs,
    since the lesions alone give one point of it.

    A pipeline (``inference.compose``) adds the image-level verdict: ``label_probabilities`` (normal,
    benign, malignant; sum 1), the ``label`` they decide, and the ``decision_thresholds`` that
    decided it and each lesion's pathology call. A lesion model alone leaves them empty."""

    image_path: str
    image_size: tuple[int, int]  # (height, width) of the original image
    model_name: str
    model_version: str
    lesions: list[PredictedLesion] = field(default_factory=list)
    # named after ``Case.label`` (the image-level label); was ``image_probabilities``, never filled
    label_probabilities: dict[str, float] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    candidates: list[PredictedLesion] = field(default_factory=list)
    label: str | None = None
    decision_thresholds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.label, IMAGE_LABELS, "label")
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        self.lesions = [p if isinstance(p, PredictedLesion) else PredictedLesion.from_dict(p) for p in self.lesions]
        self.candidates = [p if isinstance(p, PredictedLesion) else PredictedLesion.from_dict(p) for p in self.candidates]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; candidates carry their masks as COCO RLE (they have no mask files)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["image_size"] = list(self.image_size)
        d["lesions"] = [p.to_dict() for p in self.lesions]
        d["candidates"] = [p.to_dict(mask_rle=True) for p in self.candidates]
        d["label_probabilities"] = dict(self.label_probabilities)
        d["decision_thresholds"] = dict(self.decision_thresholds)
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
