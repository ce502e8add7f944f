"""Pipeline bundles: a lesion model, a classifier on each lesion's patch, and one image-level verdict,
declared in one card (``model.json``) and run by ``inference.compose``.

A pipeline bundle is a folder holding a ``model.json`` and NO weights: its stages are bundles of
their own, named by a folder relative to the pipeline folder or by a shipped bundle's name::

    {"format": "mammocad-model-bundle", "format_version": 1, "task": "pipeline",
     "name": "mammo-pathology", "version": "1.0", "description": "...",
     "pipeline": {
       "lesions":    {"bundle": "mammo-lesion-det", "name": "mammo-lesion-det", "version": "1.0",
                      "weights_sha256": "<64 hex>"},
       "classifier": {"bundle": "../cbis-pathology", "name": ..., "version": ..., "weights_sha256": ...},
       "image_classifier": null,
       "aggregation": "max",
       "thresholds": {"lesion_malignant": 0.5, "image_malignant": 0.5, "image_abnormal": 0.5}}}

``lesions`` is a segment or detect bundle, ``classifier`` a classify bundle of target ``pathology``
(benign / malignant), ``image_classifier`` (optional) one of target ``image``; all of one modality.
Each stage records the name, version and weights SHA-256 of the bundle the pipeline was composed
with, and a stage whose card now says otherwise is refused: the thresholds were chosen for the old
one. What ``aggregation`` and ``thresholds`` mean is ``inference.compose``'s docstring.

``models.card.validate_card`` refuses a pipeline card, so ``read_card`` / ``load_bundle`` never take
one for a model; ``is_pipeline`` tells which reader a bundle needs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import Field

from mammocad.errors import ConfigError, InputError
from mammocad.models.bundle import CARD_FILE, read_card, resolve_bundle, shipped_bundles_dir
from mammocad.models.card import (BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, PIPELINE_TASK, ModelCard,
                                  describe_validation_error)

ROLES = ("lesions", "classifier", "image_classifier")
LESION_TASKS = ("segment", "detect")


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class StageRef(_Strict):
    """One stage: where its bundle is, and which bundle it was when the pipeline was composed."""

    bundle: str = Field(min_length=1)  # folder relative to the pipeline folder, or a shipped bundle's name
    name: str = Field(min_length=1)
    version: str
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DecisionThresholds(_Strict):
    """The calls made from the probabilities (``inference.compose``): a lesion is malignant when
    P(malignant | lesion) >= ``lesion_malignant``, else benign; an image is malignant when its
    P(malignant) >= ``image_malignant``, else benign when P(benign) + P(malignant) >= ``image_abnormal``,
    else normal."""

    lesion_malignant: float = Field(0.5, gt=0.0, lt=1.0)
    image_malignant: float = Field(0.5, gt=0.0, lt=1.0)
    image_abnormal: float = Field(0.5, gt=0.0, lt=1.0)


class PipelineSection(_Strict):
    lesions: StageRef
    classifier: StageRef
    image_classifier: StageRef | None = None
    aggregation: Literal["max"] = "max"  # the one rule so far; named so that another can be added
    thresholds: DecisionThresholds = Field(default_factory=DecisionThresholds)


class PipelineCard(pydantic.BaseModel):
    """A pipeline bundle's ``model.json``; unknown top-level keys (description, notes) are kept."""

    model_config = pydantic.ConfigDict(extra="allow")

    format: Literal["mammocad-model-bundle"] = BUNDLE_FORMAT
    format_version: int = Field(BUNDLE_FORMAT_VERSION, ge=1, le=BUNDLE_FORMAT_VERSION)
    name: str = Field(min_length=1)
    version: str = "unknown"
    task: Literal["pipeline"] = PIPELINE_TASK
    pipeline: PipelineSection


@dataclass(frozen=True)
class Stage:
    role: str
    folder: Path
    card: ModelCard


@dataclass(frozen=True)
class Pipeline:
    """A pipeline card with its stages' folders and cards, every check passed (no weights read yet)."""

    folder: Path
    card: PipelineCard
    lesions: Stage
    classifier: Stage
    image_classifier: Stage | None

    @property
    def stages(self) -> list[Stage]:
        return [s for s in (self.lesions, self.classifier, self.image_classifier) if s is not None]


def _card_data(name_or_dir: str | Path) -> tuple[Path, Any]:
    path = resolve_bundle(name_or_dir) / CARD_FILE
    if not path.is_file():
        raise InputError(path.parent, f"not a model bundle: {CARD_FILE} is missing")
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable model card ({exc})") from None


def is_pipeline(name_or_dir: str | Path) -> bool:
    """Whether the bundle's card is a pipeline's (False for anything else, broken bundles included:
    the single-model reader then says what is wrong with them)."""
    try:
        _, data = _card_data(name_or_dir)
    except InputError:
        return False
    return isinstance(data, dict) and data.get("task") == PIPELINE_TASK


def stage_problem(role: str, card: ModelCard) -> str | None:
    """Why ``card`` cannot fill ``role`` (None: it can)."""
    if role == "lesions":
        return None if card.task in LESION_TASKS else f"is a {card.task} model, not a segment or detect model"
    want = "pathology" if role == "classifier" else "image"
    if card.task != "classify" or card.classify is None:
        return f"is a {card.task} model, not a classifier (task classify, target {want!r})"
    if card.classify.target != want:
        return f"classifies target {card.classify.target!r}; this stage needs target {want!r}"
    return None


def stage_folder(pipeline_dir: Path, bundle: str, source: Any, role: str) -> Path:
    """A stage's bundle folder: relative to the pipeline folder, else a shipped bundle's name."""
    folder = pipeline_dir / bundle
    if folder.is_dir():
        return folder
    shipped = shipped_bundles_dir() / bundle
    if "/" not in bundle and "\\" not in bundle and shipped.is_dir():
        return shipped
    raise InputError(source, f"pipeline.{role}.bundle: no bundle folder {folder} and no shipped bundle {bundle!r}")


def _changed(ref: StageRef, card: ModelCard) -> str | None:
    for key, now in (("name", card.name), ("version", card.version), ("weights_sha256", card.weights_sha256)):
        if getattr(ref, key) != now:
            return f"{key} is now {now!r}, the pipeline was composed with {getattr(ref, key)!r}"
    return None


def read_stage(pipeline_dir: Path, role: str, ref: StageRef, source: Any) -> Stage:
    """A stage's folder and card, refused (one line naming the pipeline card and the stage) when the
    bundle is missing, cannot fill the role, or is not the one the pipeline was composed with."""
    folder = stage_folder(pipeline_dir, ref.bundle, source, role)
    try:
        card = read_card(folder)
    except InputError as err:
        raise InputError(source, f"pipeline.{role}: {err}") from None
    problem = stage_problem(role, card)
    if problem:
        raise InputError(source, f"pipeline.{role}: bundle {card.name} {problem}")
    changed = _changed(ref, card)
    if changed:
        raise InputError(source, f"pipeline.{role}: bundle {folder} changed since the pipeline was composed "
                                 f"({changed}); compose the pipeline again")
    return Stage(role, folder, card)


def validate_pipeline_card(data: Any, source: str | Path) -> PipelineCard:
    """``data`` (a parsed ``model.json``) as a ``PipelineCard``; a mistake is one line ``<source>: <key>: <cause>``."""
    if not isinstance(data, dict) or data.get("task") != PIPELINE_TASK:
        raise InputError(source, f"not a pipeline card (expected \"task\": \"{PIPELINE_TASK}\")")
    version = data.get("format_version", BUNDLE_FORMAT_VERSION)
    if isinstance(version, int) and version > BUNDLE_FORMAT_VERSION:
        raise InputError(source, f"bundle format {version} is newer than this mammocad reads "
                                 f"({BUNDLE_FORMAT_VERSION}); upgrade mammocad")
    try:
        return PipelineCard.model_validate(data)
    except pydantic.ValidationError as exc:
        key, msg = describe_validation_error(exc.errors()[0])
        raise InputError(source, f"{key}: {msg}") from None


def read_stages(pipeline_dir: Path, section: PipelineSection, source: Any) -> dict[str, Stage | None]:
    """Every stage of ``section`` read and checked (``read_stage``), all of one modality."""
    stages = {role: None if getattr(section, role) is None else read_stage(pipeline_dir, role, getattr(section, role), source)
              for role in ROLES}
    modalities = {s.role: s.card.preprocessing.modality for s in stages.values() if s is not None}
    if len(set(modalities.values())) > 1:
        raise InputError(source, "pipeline: stages of different modalities ("
                                 + ", ".join(f"{r} {m}" for r, m in modalities.items()) + ")")
    return stages


def read_pipeline(name_or_dir: str | Path) -> Pipeline:
    """A pipeline bundle with its stages read and checked (roles, identities, one modality)."""
    path, data = _card_data(name_or_dir)
    card = validate_pipeline_card(data, path)
    stages = read_stages(path.parent, card.pipeline, path)
    return Pipeline(path.parent, card, stages["lesions"], stages["classifier"], stages["image_classifier"])


def stage_ref(pipeline_dir: Path, role: str, bundle: str | Path) -> StageRef:
    """The reference to record for ``bundle`` (a folder, written relative to the pipeline folder, or
    a shipped bundle's name) in ``role``, from its card as it is now."""
    bundle = str(bundle)
    folder = Path(bundle) if Path(bundle).is_dir() else stage_folder(pipeline_dir, bundle, bundle, role)
    card = read_card(folder)
    problem = stage_problem(role, card)
    if problem:
        raise ConfigError(folder / CARD_FILE, f"cannot be the pipeline's {role} stage: bundle {card.name} {problem}")
    if card.weights_sha256 is None:
        raise ConfigError(folder / CARD_FILE, f"cannot be the pipeline's {role} stage: no weights_sha256 to pin it by")
    shipped = folder.resolve().parent == shipped_bundles_dir().resolve()
    written = folder.name if shipped else Path(os.path.relpath(folder.resolve(), pipeline_dir.resolve())).as_posix()
    return StageRef(bundle=written, name=card.name, version=card.version, weights_sha256=card.weights_sha256)


def write_pipeline_bundle(directory: str | Path, name: str, lesions: str | Path, classifier: str | Path,
                          image_classifier: str | Path | None = None, *, version: str = "1.0",
                          thresholds: dict[str, float] | None = None, description: str = "") -> Path:
    """Compose a pipeline bundle in ``directory`` from stage bundles (folders or shipped names),
    pinning each stage's name, version and weights SHA-256; the card is validated and read back
    (stages and modalities checked) before it is written, atomically."""
    from mammocad.io.atomic import atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    section = {"lesions": stage_ref(directory, "lesions", lesions),
               "classifier": stage_ref(directory, "classifier", classifier),
               "image_classifier": None if image_classifier is None else
               stage_ref(directory, "image_classifier", image_classifier),
               "aggregation": "max", "thresholds": dict(thresholds or {})}
    data = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, "task": PIPELINE_TASK, "name": name,
            "version": version, "description": description,
            "pipeline": {k: v.model_dump(mode="json") if isinstance(v, StageRef) else v for k, v in section.items()}}
    try:
        card = validate_pipeline_card(data, directory / CARD_FILE)
        read_stages(directory, card.pipeline, directory / CARD_FILE)  # as a reader will see them
    except InputError as err:
        raise ConfigError(err.source, err.cause) from None
    atomic_write_text(directory / CARD_FILE, json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return directory
