"""The training configuration: one YAML file per experiment, validated by pydantic.

``load_config(path)`` reads the YAML, resolves relative paths against the YAML file's folder (so a
config and its data can move together) and turns any mistake into ONE line naming the file and the
key: ``configs/mias_unet.yaml: optim.lr: Input should be greater than 0 (got -1)``.

Sections: ``data`` (prepared dataset, fold, classes), ``model`` (registered name + kwargs),
``loss``, ``sampling`` (patches and batches), ``augment`` (``AugmentConfig``; ``null`` = none),
``optim`` (SGD/AdamW + LR schedule), ``train`` (epochs, early stopping, AMP, seed, stages, time
budget), ``inference`` (tiling and thresholds, stored in the bundle), ``bundle`` (model-card text),
``classify`` (``task: classify`` only: target, patch context and size, class balance).
"""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path
from typing import Any, Iterator, Literal

import pydantic
import yaml
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from mammocad.augment import AugmentConfig
from mammocad.errors import ConfigError
from mammocad.models.card import MAX_BATCH, MAX_TILE, ClassifySettings, describe_validation_error


class _Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class DataConfig(_Section):
    prepared: Path  # prepared dataset folder (`mammocad prepare`); relative to the YAML file
    splits: Path | None = None  # default: PREPARED/splits.json
    fold: int = Field(0, ge=0)
    num_classes: Literal[1, 2, 3] = 1  # model outputs: 1 = lesion sigmoid, 2 = softmax bg/lesion, 3 = bg/benign/malignant
    unknown: str | None = None  # label of unknown-pathology lesions (sampling.load_samples' ``unknown``)

    @property
    def label_classes(self) -> int:
        """Classes of the label map (background included): 2 for a binary model, else num_classes."""
        return 2 if self.num_classes == 1 else self.num_classes

    @property
    def class_names(self) -> list[str]:
        return ["background", "lesion"] if self.label_classes == 2 else ["background", "benign", "malignant"]


class ModelConfig(_Section):
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = None  # a bundle (folder or shipped name) whose weights start the training


class LossConfig(_Section):
    name: str = "dice_ce"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class SamplingConfig(_Section):
    kind: Literal["balanced", "grid", "context"] = "balanced"
    patch: int = Field(256, ge=8, le=MAX_TILE)
    batch_size: int = Field(8, ge=1, le=1024)
    workers: int = Field(0, ge=0)
    # balanced
    fractions: dict[str, float] | None = None  # lesion / tissue / background, summing to 1
    mode: Literal["fractions", "class_pixel"] = "fractions"
    n_per_epoch: PositiveInt = 1000
    # grid
    stride: PositiveInt | None = None  # default patch // 2
    skip_background: bool = True
    # context
    context: float = Field(2.0, ge=1.0)
    fixed_size: PositiveInt | None = None
    pad_label: int = Field(0, ge=0, le=255)


class ScheduleConfig(_Section):
    kind: Literal["step", "cosine", "none"] = "step"
    every: PositiveInt = 10  # step: epochs between decays
    gamma: float = Field(0.3, gt=0.0, le=1.0)  # step: multiplier per decay
    min_lr: NonNegativeFloat = 0.0  # cosine: final learning rate


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.01
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 5e-3  # SGD: L2 penalty; AdamW: decoupled decay
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: PositiveFloat | None = None  # max gradient norm
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)


class StageConfig(_Section):
    """One training stage; the optimizer and schedule restart at each stage, early stopping too, and
    the next stage starts from this stage's best weights."""

    name: str
    epochs: PositiveInt
    model: str | None = None  # switch architecture, initialised from the previous stage (FCN-32s -> 16s -> 8s)
    model_stage: str | None = None  # ``model.set_stage(...)`` (Dilation10: front / context / global)
    freeze: list[str] = Field(default_factory=list)  # parameter-name prefixes kept fixed in this stage
    lr: PositiveFloat | None = None  # default optim.lr


class TrainSection(_Section):
    epochs: PositiveInt = 50  # ignored when ``stages`` is given (each stage has its own)
    patience: PositiveInt | None = 10  # validations without improvement of val Dice before a stage ends
    min_delta: NonNegativeFloat = 0.0  # an improvement must exceed this
    val_every: int = Field(1, ge=0)  # epochs between validations; 0 = never (the last epoch is kept)
    val_mode: Literal["image", "patch"] = "image"  # whole-image tiled prediction, or the fast patch Dice
    final_n_boot: int = Field(1000, ge=0)  # bootstrap resamples of the model card's validation CIs
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    seed: int = 0
    deterministic: bool = True
    threads: PositiveInt | None = None  # torch CPU threads per process (default: torch's choice)
    max_minutes: PositiveFloat | None = None  # time budget: no epoch starts that would end past it
    tensorboard: bool = True
    stages: list[StageConfig] = Field(default_factory=list)

    @pydantic.field_validator("stages")
    @classmethod
    def _unique_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return stages


class InferenceConfig(_Section):
    # bounded as the model card bounds them (models.card): the card is written from this section
    tile: int = Field(512, ge=1, le=MAX_TILE)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)  # fraction of the tile shared by neighbours
    batch_size: int = Field(4, ge=1, le=MAX_BATCH)
    threshold: float = Field(0.5, gt=0.0, lt=1.0)  # binary models: lesion when probability >= threshold
    min_area: int = Field(0, ge=0)  # pixels; smaller predicted components are dropped by the postprocessing
    # Gaussian-blended sliding window, the papers' 4 quadrants, or (detection) the whole image in one pass
    mode: Literal["sliding", "four", "whole"] = "sliding"
    # Keep only the k highest-scoring components per image (None = all). One lesion per frame is the
    # norm in breast ultrasound, where stray low-contrast blobs are the commonest false positive.
    max_lesions: PositiveInt | None = None
    tta: list[Literal["hflip"]] = Field(default_factory=list)  # test-time augmentation, averaged probabilities


class BundleConfig(_Section):
    name: str = "model"
    version: str = "0.1.0"
    description: str = ""
    reproduces: str = ""  # the paper setup this configuration reproduces
    intended_use: str = "Research use only; not a medical device."
    limitations: list[str] = Field(default_factory=list)


class ClassifyConfig(ClassifySettings):
    """``task: classify``: what is classified and how its patches are made (``ClassifySettings``,
    copied into the model card), plus how training meets class imbalance."""

    # sampler: class-balanced draws with replacement (every class equally often per epoch);
    # loss: cross-entropy weighted inversely to the class frequencies of the training split
    balance: Literal["sampler", "loss", "none"] = "sampler"
    background_per_image: int = Field(1, ge=0, le=64)  # kind_pathology: lesion-free patches per training image


# keys of other sections a classifier reads (the engine's loader); any other key set there is a mistake
CLASSIFY_SAMPLING_KEYS = {"batch_size", "workers"}


class TrainConfig(_Section):
    task: Literal["segment", "detect", "classify"] = "segment"  # the task module (mammocad.tasks) that trains; recorded in the card
    data: DataConfig
    model: ModelConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    augment: AugmentConfig | None = Field(default_factory=AugmentConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    bundle: BundleConfig = Field(default_factory=BundleConfig)
    classify: ClassifyConfig | None = None  # task classify only (absent: the defaults)

    _source: Path | None = pydantic.PrivateAttr(default=None)

    @property
    def source(self) -> str:
        """The YAML file this config came from (for error messages)."""
        return str(self._source) if self._source is not None else "config"

    @property
    def class_names(self) -> list[str]:
        """The model's classes as the card names them: a classifier's target classes, else the label map's."""
        from mammocad.datasets.targets import CLASSIFY_CLASSES

        if self.task == "classify":
            return list(CLASSIFY_CLASSES[self.classify.target])
        return self.data.class_names

    def stage_list(self) -> list[StageConfig]:
        """The stages to run: ``train.stages``, or one stage of ``train.epochs``."""
        return list(self.train.stages) or [StageConfig(name="train", epochs=self.train.epochs)]

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if data.get("classify") is None:  # segment / detect configs (and their resume keys) stay as they were
            data.pop("classify", None)
        return data

    def errors_in(self, section: str) -> contextlib.AbstractContextManager[None]:
        """``config_errors(self, section)``: for code below the training layer (task modules)."""
        return config_errors(self, section)


def parse_config(data: Any, source: str | Path = "config", base_dir: str | Path | None = None) -> TrainConfig:
    """Validate a config mapping; relative paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(source, f"expected a mapping of sections (data, model, ...), got {type(data).__name__}")
    try:
        cfg = TrainConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        key, msg = describe_validation_error(exc.errors()[0])
        raise ConfigError(source, f"{key}: {msg}") from None
    cfg._source = Path(source)
    if base_dir is not None:
        base = Path(base_dir)
        cfg.data.prepared = (base / cfg.data.prepared).resolve()
        if cfg.data.splits is not None:
            cfg.data.splits = (base / cfg.data.splits).resolve()
        weights = cfg.model.kwargs.get("weights_path")
        if isinstance(weights, str):
            cfg.model.kwargs["weights_path"] = str((base / weights).resolve())
        init = cfg.model.init_from
        if init is not None and ("/" in init or init.startswith(".")):  # a path, not a shipped bundle name
            cfg.model.init_from = str((base / init).resolve())
    if cfg.task == "classify":
        _check_classify_sections(cfg, source)
        return cfg
    if cfg.classify is not None:
        raise ConfigError(source, f"classify: only for task: classify (this config's task is {cfg.task})")
    kw_classes = cfg.model.kwargs.get("num_classes")
    if kw_classes is not None and kw_classes != cfg.data.num_classes:
        raise ConfigError(source, f"model.kwargs.num_classes: {kw_classes} disagrees with data.num_classes "
                                  f"{cfg.data.num_classes}; set it in data only")
    return cfg


def _check_classify_sections(cfg: TrainConfig, source: str | Path) -> None:
    """Fill in the ``classify`` defaults and refuse keys a classifier never reads: a ``loss`` or a
    patch size set for it would be silently ignored otherwise."""
    if cfg.classify is None:
        cfg.classify = ClassifyConfig()
    unused = [f"data.{k}" for k in ("num_classes", "unknown") if k in cfg.data.model_fields_set]
    unused += [f"sampling.{k}" for k in sorted(cfg.sampling.model_fields_set - CLASSIFY_SAMPLING_KEYS)]
    unused += [k for k in ("loss", "inference") if k in cfg.model_fields_set]
    if unused:
        raise ConfigError(source, f"{unused[0]}: not used by task classify (classes come from classify.target, the "
                                  "loss is cross-entropy, patches from classify.context and input_size); remove it")
    if cfg.classify.kinds is not None and cfg.classify.target == "image":
        raise ConfigError(source, "classify.kinds: selects lesions; target 'image' classifies whole images")
    kw_classes = cfg.model.kwargs.get("num_classes")
    if kw_classes is not None and kw_classes != len(cfg.class_names):
        raise ConfigError(source, f"model.kwargs.num_classes: {kw_classes} disagrees with classify.target "
                                  f"{cfg.classify.target!r} ({len(cfg.class_names)} classes); leave it out")


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML training config (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(path, f"invalid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"unreadable ({exc})") from None
    return parse_config(data, source=path, base_dir=path.parent)


def with_overrides(cfg: TrainConfig, epochs: int | None = None, max_minutes: float | None = None,
                   splits: str | Path | None = None, fold: int | None = None) -> TrainConfig:
    """Command-line overrides: ``epochs`` sets every stage's epochs (or train.epochs); ``splits`` and
    ``fold`` replace ``data.splits`` / ``data.fold`` (the final model of a cross-validated recipe
    trains on a train/val split of every development patient)."""
    out = cfg.model_copy(deep=True)
    out._source = cfg._source
    if splits is not None:
        out.data.splits = Path(splits).resolve()
    if fold is not None:
        if fold < 0:
            raise ConfigError("--fold", f"must be >= 0, got {fold}")
        out.data.fold = fold
    if epochs is not None:
        if epochs < 1:
            raise ConfigError("--epochs", f"must be at least 1, got {epochs}")
        out.train.epochs = epochs
        for stage in out.train.stages:
            stage.epochs = epochs
    if max_minutes is not None:
        if not max_minutes > 0:
            raise ConfigError("--max-minutes", f"must be positive, got {max_minutes}")
        out.train.max_minutes = max_minutes
    return out


@contextlib.contextmanager
def config_errors(cfg: TrainConfig, section: str) -> Iterator[None]:
    """Re-raise a ConfigError raised while building ``section`` so that it names the YAML file and key."""
    try:
        yield
    except ConfigError as err:
        if err.source is None or err.source == section:
            where = section
        elif re.fullmatch(r"\w+", err.source):  # a key inside the section: "fractions" -> "sampling.fractions"
            where = f"{section}.{err.source}"
        else:  # a file or a description ("model unet"): keep it
            where = f"{section}: {err.source}"
        raise ConfigError(cfg.source, f"{where}: {err.cause}") from None


def resume_key(cfg: TrainConfig) -> dict[str, Any]:
    """The parts of a config a resumed run must share with the run that wrote the checkpoint
    (epochs, patience and the time budget may change between runs)."""
    d = copy.deepcopy(cfg.to_json())
    for key in ("epochs", "patience", "max_minutes", "final_n_boot", "tensorboard", "threads"):
        d["train"].pop(key, None)
    for stage in d["train"]["stages"]:
        stage.pop("epochs", None)
    d.pop("bundle", None)
    d.pop("inference", None)
    return d
