"""The model card (a bundle's ``model.json``), validated by pydantic like the training config.

A card was a free dict read with ``.get(...)`` defaults, so a card without a task ran as
segmentation and a typo in ``tiling`` silently fell back to a default. ``ModelCard`` types every key
inference reads (task, architecture, preprocessing, classes, thresholds, tiling, weights hash) and
bounds the sizes that decide memory and time (tile, batch, image side), so a hostile or mistyped
card fails here, in one line naming the key, before a model or an image is ever allocated. Keys
nobody reads (description, training data, validation figures, ...) are kept as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import Field, PositiveInt

from mammocad.errors import InputError
from mammocad.preprocess.pipeline import PreprocessSpec

BUNDLE_FORMAT = "mammocad-model-bundle"
BUNDLE_FORMAT_VERSION = 1
TASKS = ("segment", "detect", "classify")  # what a model does; picks the task module (mammocad.tasks)
PIPELINE_TASK = "pipeline"  # a card of stage bundles (``models.pipeline``), never a model of its own
# Size bounds. The largest real inputs: full-field mammograms up to ~5900 px on the long side; tiles
# and batches far beyond these only ever come from a typo (``long_side: 30000`` ran for minutes).
MAX_IMAGE_SIDE = 8192
MAX_TILE = 2048
MAX_BATCH = 64


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class Architecture(_Strict):
    """A registered model name and its constructor arguments (``models.registry.model_config``)."""

    name: str = Field(min_length=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class Thresholds(_Strict):
    probability: float = Field(0.5, gt=0.0, lt=1.0)  # lesion when probability >= this
    min_area: int = Field(16, ge=0)  # prepared-grid pixels; smaller components are dropped
    max_lesions: PositiveInt | None = None  # keep the k highest-scoring components (None = all)


class Tiling(_Strict):
    tile: int = Field(256, ge=1, le=MAX_TILE)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    mode: Literal["sliding", "four", "whole"] = "sliding"  # whole: detection only
    batch_size: int = Field(4, ge=1, le=MAX_BATCH)
    tta: list[Literal["hflip"]] = Field(default_factory=list)
    # what "auto" means for this model: "fp32" when it was trained and validated without bf16 (a
    # pretrained EfficientNet-Lite shifts 4-5 % under bf16); "auto" = bf16 where the device has it
    autocast: Literal["auto", "fp32"] = "auto"


class ClassifySettings(_Strict):
    """How a classifier's inputs are made from a prepared image (``tasks.classify``): what it
    classifies, and the patch around a lesion box (side = ``context`` x the box's long side, at
    least ``min_side``, resized to ``input_size``). Shared by the training config and the card, so
    inference rebuilds patches exactly as training made them."""

    target: Literal["pathology", "kind_pathology", "image"] = "pathology"
    context: float = Field(1.0, ge=1.0, le=16.0)  # 1 = the lesion box itself ("small context"); 2 = twice its side
    min_side: int = Field(32, ge=1, le=MAX_TILE)  # prepared-grid pixels: a calcification's box can be a few pixels
    # CPU-friendly default for every model: a 299 px Inception-v3 input costs ~5.5x the FLOPs of 128 px
    input_size: int = Field(128, ge=32, le=MAX_TILE)
    kinds: list[Literal["mass", "calcification", "distortion", "asymmetry", "other"]] | None = None  # None: every kind


class ModelCard(pydantic.BaseModel):
    """What a bundle's ``model.json`` must hold; unknown top-level keys are kept (free text, figures)."""

    model_config = pydantic.ConfigDict(extra="allow")

    format: Literal["mammocad-model-bundle"] = BUNDLE_FORMAT
    format_version: int = Field(BUNDLE_FORMAT_VERSION, ge=1, le=BUNDLE_FORMAT_VERSION)
    name: str = Field(min_length=1)
    version: str = "unknown"
    task: Literal["segment", "detect", "classify"]  # required: never guessed
    architecture: Architecture
    preprocessing: PreprocessSpec
    class_names: list[str] = Field(default_factory=lambda: ["background", "lesion"], min_length=2)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    tiling: Tiling = Field(default_factory=Tiling)
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # checked at load when present
    training_data: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    # task classify only: how its inputs are made. Optional here, so that a lesion command refuses a
    # classifier by its task; the classify task's readers demand it (``tasks.classify.PatchSettings``).
    classify: ClassifySettings | None = None

    @pydantic.field_validator("classify")
    @classmethod
    def _classify_settings(cls, value: ClassifySettings | None, info: pydantic.ValidationInfo) -> ClassifySettings | None:
        from mammocad.datasets.targets import CLASSIFY_CLASSES

        if value is None:
            return value
        task = info.data.get("task")
        if task != "classify":
            raise ValueError(f"only a classify model's card has this section, not a {task} model's")
        expected = list(CLASSIFY_CLASSES[value.target])
        names = info.data.get("class_names")
        if names is not None and names != expected:
            raise ValueError(f"class_names {names} are not those of target {value.target!r}: {expected}")
        return value

    @pydantic.field_validator("preprocessing", mode="before")
    @classmethod
    def _as_recorded(cls, value: Any) -> Any:
        """A card written before a preprocessing field existed meant that field's old behaviour
        (``PreprocessSpec.from_record``), not today's default."""
        return PreprocessSpec.from_record(value) if isinstance(value, dict) else value

    @pydantic.field_validator("preprocessing")
    @classmethod
    def _bounded_image(cls, spec: PreprocessSpec) -> PreprocessSpec:
        sides = [spec.long_side] if spec.size is None else list(spec.size)
        if any(s is not None and s > MAX_IMAGE_SIDE for s in sides):
            raise ValueError(f"image size {sides} exceeds the {MAX_IMAGE_SIDE}-pixel bound")
        return spec

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if data.get("classify") is None:  # segment and detect cards stay as they were
            data.pop("classify", None)
        return data


def describe_validation_error(err: dict[str, Any]) -> tuple[str, str]:
    """(dotted key, one-line cause) of one pydantic error; shared with the training config."""
    key = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
    if err.get("type") == "extra_forbidden":
        return key, "unknown key"
    if err.get("type") == "missing":
        return key, "required key is missing"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if "input" in err and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return key, msg


def validate_card(data: Any, source: str | Path) -> ModelCard:
    """``data`` (a parsed ``model.json``) as a ``ModelCard``; any mistake is one InputError line
    ``<source>: <key>: <cause>``."""
    if not isinstance(data, dict) or data.get("format", BUNDLE_FORMAT) != BUNDLE_FORMAT:
        raise InputError(source, f"not a mammocad model card (expected \"format\": \"{BUNDLE_FORMAT}\")")
    version = data.get("format_version", BUNDLE_FORMAT_VERSION)
    if isinstance(version, int) and version > BUNDLE_FORMAT_VERSION:
        raise InputError(source, f"bundle format {version} is newer than this mammocad reads "
                                 f"({BUNDLE_FORMAT_VERSION}); upgrade mammocad")
    if "task" not in data:  # cards written before the task was required: all of them were segmentation
        raise InputError(source, "task: required key is missing; a segmentation model's card needs "
                                 "\"task\": \"segment\" (add it to the card)")
    if data["task"] == "segmentation":
        raise InputError(source, "task: 'segmentation' is the old name; write \"task\": \"segment\"")
    if data["task"] == PIPELINE_TASK:  # no weights of its own: its stages are bundles (models.pipeline)
        raise InputError(source, "is a pipeline bundle (it names its stage bundles and holds no weights), not one "
                                 "model; run it with `mammocad predict --model`")
    try:
        return ModelCard.model_validate(data)
    except pydantic.ValidationError as exc:
        key, msg = describe_validation_error(exc.errors()[0])
        raise InputError(source, f"{key}: {msg}") from None
