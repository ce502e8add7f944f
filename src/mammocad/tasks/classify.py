"""The classification task: lesion patches (benign vs malignant; or lesion-free tissue + kind x
pathology) or whole images (normal / benign / malignant) from a prepared split, trained by the one
engine (stages, resume, early stopping, AMP) and validated by ``evaluation.classification``.

What is classified (``classify.target``; classes in ``datasets.targets.CLASSIFY_CLASSES``):

- ``pathology``: one patch per lesion with an outline on the prepared grid. Lesions of unknown
  pathology are left out (they have no class), and so are lesions without a box (no outline, or
  lost in preprocessing); the counts are logged and written into the validation report's notes.
- ``kind_pathology``: the same lesion patches as calcification-/mass-benign/-malignant (every kind
  but calcification counts as a mass: distortions, asymmetries and "other" findings are soft-tissue
  findings, read like masses), plus ``background``: ``classify.background_per_image`` patches per
  image drawn inside the breast where the patch holds no pixel of any outlined lesion. Their side is
  drawn from the split's lesion-patch sides, so patch scale does not give the class away. Images
  with a lesion that has no outline give no background (its pixels are unknown).
- ``image``: the whole prepared image, zero-padded to a square at the bottom/right (the chest wall
  stays at the left of the canonical orientation) and resized; images labelled unknown are left out.

A lesion patch (``lesion_window``): the lesion box's centre, side = ``context`` x the box's long side
(1 = the box itself, 2 = twice its side), at least ``min_side`` prepared-grid pixels (a
calcification's box is a few pixels); the part outside the image is 0, what prepared images hold
outside the breast; then resized to ``input_size`` (area interpolation when shrinking, bilinear when
enlarging). The model card records these settings, so ``classify_patches`` rebuilds the patches of
new lesion boxes exactly as training did.

Class balance (``classify.balance``): ``sampler`` draws each epoch's items with replacement, every
class equally likely (torch's ``WeightedRandomSampler``, weights 1 / class count); its draws are
made per epoch from ``(seed, epoch)`` INSIDE the dataset, so that the engine's own
``DistributedSampler`` still shards and shuffles them and a resumed run draws the same items.
``loss``: cross-entropy weighted n / (K n_c) (the class weights of the training split); ``none``.
Augmentation is the configured ``augment`` pipeline (flips, affine, intensity) with an empty label map.

Validation scores the val split's items with the same patches (background positions fixed per
item): the monitored score is the ROC AUC of ``malignant`` against the rest (``pathology``,
``image``) or the macro one-vs-rest AUC (``kind_pathology``); when the validation split lacks a
class that score needs, balanced accuracy (said in the progress line). The final validation's
``ClassificationReport`` (patient-bootstrap CIs) goes into the model card.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mammocad.datasets.targets import CLASSIFY_CLASSES, split_case_ids
from mammocad.errors import ConfigError, InputError
from mammocad.sampling import crop_padded, item_seed
from mammocad.tasks import RunContext, ValidationResult, autocast_context

NAME = "classify"
POSITIVE = "malignant"  # the class whose AUC is monitored for the pathology and image targets
CALCIFICATION = "calcification"  # the one kind kept apart in kind_pathology; every other kind is a mass
BACKGROUND = "background"
INFERENCE_BATCH = 32
MIN_BACKGROUND_SIDE = 4  # pixels: the smallest background window drawn where larger ones do not fit
# item_seed streams (sampling uses 0..3): the epoch's balanced draws, background positions
_PLAN_STREAM, _BACKGROUND_STREAM, _AUGMENT_STREAM = 4, 5, 2
log = logging.getLogger("mammocad")


def class_names(target: str) -> tuple[str, ...]:
    return CLASSIFY_CLASSES[target]


def model_outputs(cfg: Any) -> int:
    """``num_classes`` of the model for a training config: the target's classes (softmax)."""
    return len(class_names(cfg.classify.target))


@dataclass(frozen=True, kw_only=True)
class PatchSettings:
    """How inputs are made and what the outputs are called; from a config's ``classify`` section
    or a model card's (the same ``models.card.ClassifySettings`` fields)."""

    name: str = "model"  # for error messages
    target: str
    class_names: tuple[str, ...]
    context: float
    min_side: int
    input_size: int
    batch_size: int = INFERENCE_BATCH

    @classmethod
    def from_section(cls, section: Any, name: str = "model") -> "PatchSettings":
        return cls(name=name, target=section.target, class_names=class_names(section.target),
                   context=float(section.context), min_side=int(section.min_side), input_size=int(section.input_size))

    @classmethod
    def from_card(cls, card: Any) -> "PatchSettings":
        """From a validated ``ModelCard``; a classifier's card must have its ``classify`` section."""
        if card.task != NAME or card.classify is None:
            raise ConfigError(card.name, f"model card has no 'classify' section (task {card.task}); it is not a "
                                         "classifier trained by this mammocad")
        return cls.from_section(card.classify, card.name)


def output_names(model: nn.Module, settings: PatchSettings) -> tuple[str, ...]:
    """The model's output classes (the card's names), checked against the model's width."""
    if int(getattr(model, "num_classes", -1)) != len(settings.class_names):
        raise ConfigError(settings.name, f"model has {getattr(model, 'num_classes', None)} output(s) but the card "
                                         f"names {list(settings.class_names)}")
    return settings.class_names


# ---- inputs from a prepared image ------------------------------------------------------------------
def lesion_window(box: Sequence[float], context: float, min_side: int) -> tuple[int, int, int]:
    """(top, left, side) of the square patch around ``box`` = (x0, y0, x1, y1) in pixel-edge
    coordinates: centred on the box, side = ceil(context x long side), at least ``min_side``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise InputError("box", f"expected (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {tuple(box)}")
    side = max(math.ceil(context * max(x1 - x0, y1 - y0) - 1e-9), int(min_side))  # -1e-9: 1.1 x 10 px is 11, not 12
    return math.floor((y0 + y1 - side) / 2 + 0.5), math.floor((x0 + x1 - side) / 2 + 0.5), side


def resize_square(patch: np.ndarray, size: int) -> np.ndarray:
    """A square float patch at ``size`` x ``size`` (area interpolation shrinking, bilinear enlarging)."""
    side = patch.shape[0]
    if side != size:
        patch = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)
    return np.clip(patch, 0.0, 1.0).astype(np.float32, copy=False)


def crop_window(pixels: np.ndarray, top: int, left: int, side: int, size: int) -> np.ndarray:
    """The square window, 0 outside the image, at ``size`` x ``size``."""
    return resize_square(crop_padded(np.asarray(pixels, np.float32), top, left, side, side, 0.0), size)


def lesion_patch(pixels: np.ndarray, box: Sequence[float], settings: PatchSettings) -> np.ndarray:
    return crop_window(pixels, *lesion_window(box, settings.context, settings.min_side), settings.input_size)


def image_input(pixels: np.ndarray, size: int) -> np.ndarray:
    """The whole image zero-padded to a square at the bottom/right, at ``size`` x ``size``."""
    side = max(pixels.shape)
    return crop_window(pixels, 0, 0, side, size)


def lesion_free_corners(lesion: np.ndarray, breast: np.ndarray, side: int) -> np.ndarray:
    """Bool map over top-left corners (H - side + 1, W - side + 1): True where the side x side
    window lies inside the image, holds no lesion pixel and has its centre in the breast."""
    h, w = lesion.shape
    if side > h or side > w:
        return np.zeros((0, 0), bool)
    sat = np.zeros((h + 1, w + 1), np.int64)  # summed-area table: lesion pixels of any window in O(1)
    sat[1:, 1:] = lesion.cumsum(0).cumsum(1)
    inside = sat[side:, side:] - sat[:-side, side:] - sat[side:, :-side] + sat[:-side, :-side]
    c = side // 2
    return (inside == 0) & breast[c:c + h - side + 1, c:c + w - side + 1]


def draw_background_window(lesion: np.ndarray, breast: np.ndarray, side: int, min_side: int,
                           rng: np.random.Generator) -> tuple[int, int, int] | None:
    """(top, left, side) of a random lesion-free breast window of ``side``; where none fits, of
    ``min_side``, then of halves of it down to ``MIN_BACKGROUND_SIDE`` (a small image crowded by
    lesions); None when not even that fits."""
    halves = [int(min_side) >> k for k in range(int(min_side).bit_length()) if int(min_side) >> k >= MIN_BACKGROUND_SIDE]
    for s in dict.fromkeys((int(side), *halves)):
        free = np.flatnonzero(lesion_free_corners(lesion, breast, s))
        if free.size:
            top, left = divmod(int(free[rng.integers(free.size)]), lesion.shape[1] - s + 1)
            return top, left, s
    return None


# ---- inference -----------------------------------------------------------------------------------
def as_model_input(x: torch.Tensor, in_channels: int) -> torch.Tensor:
    """(N, 1, S, S) grey inputs for a grey or an RGB (grey repeated) model."""
    return x.expand(-1, in_channels, -1, -1) if in_channels != x.shape[1] else x


def predict_inputs(model: nn.Module, inputs: np.ndarray, *, batch_size: int = INFERENCE_BATCH, autocast: str = "fp32",
                   device: torch.device | None = None) -> np.ndarray:
    """(N, K) softmax probabilities of (N, S, S) inputs. The model must be in eval mode (Inception
    returns its auxiliary logits in training mode); nothing on it is changed."""
    from mammocad.tasks.tiling import use_bf16

    if model.training:
        raise ConfigError(getattr(model, "mammocad_name", "model"), "classification needs the model in eval mode "
                                                                    "(model.eval())")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    bf16 = use_bf16(autocast, device)
    n_classes = int(model.num_classes)
    out = [np.zeros((0, n_classes), np.float32)]
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch_size], np.float32))[:, None].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(as_model_input(x, int(model.in_channels)))
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out)


def classify_patches(model: nn.Module, pixels: np.ndarray, boxes: Sequence[Sequence[float]], settings: PatchSettings,
                     *, batch_size: int | None = None, autocast: str = "fp32",
                     device: torch.device | None = None) -> np.ndarray:
    """(N, K) class probabilities of lesion ``boxes`` (x0, y0, x1, y1) on a prepared image,
    the patches made as in training (the card's context, min_side and input_size)."""
    if settings.target == "image":
        raise ConfigError(settings.name, "classifies whole images (target 'image'); use classify_image")
    if pixels.ndim != 2:
        raise InputError("image", f"expected an HxW prepared image, got shape {pixels.shape}")
    inputs = np.stack([lesion_patch(pixels, box, settings) for box in boxes]) if len(boxes) else \
        np.zeros((0, settings.input_size, settings.input_size), np.float32)
    return predict_inputs(model, inputs, batch_size=batch_size or settings.batch_size, autocast=autocast, device=device)


def classify_image(model: nn.Module, pixels: np.ndarray, settings: PatchSettings, *, autocast: str = "fp32",
                   device: torch.device | None = None) -> np.ndarray:
    """(K,) class probabilities of a whole prepared image (target ``image``)."""
    if settings.target != "image":
        raise ConfigError(settings.name, f"classifies lesion patches (target {settings.target!r}); "
                                         "use classify_patches with lesion boxes")
    if pixels.ndim != 2:
        raise InputError("image", f"expected an HxW prepared image, got shape {pixels.shape}")
    return predict_inputs(model, image_input(pixels, settings.input_size)[None], autocast=autocast, device=device)[0]


def infer(model: nn.Module, pixels: np.ndarray, breast_mask: np.ndarray | None, settings: PatchSettings, *,
          batch_size: int | None = None, autocast: str = "auto", device: torch.device | None = None) -> np.ndarray:
    """The task interface's inference on a prepared image: an image classifier's (K,)
    probabilities. A lesion classifier needs lesion boxes (``classify_patches``), which a whole
    image does not give."""
    return classify_image(model, pixels, settings, autocast=autocast, device=device)


# ---- data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifyItem:
    """One training or validation input: a lesion box, a background draw, or a whole image."""

    case_id: str
    patient_id: str
    label: int  # index into the target's class names
    box: tuple[float, float, float, float] | None = None  # lesion box (prepared grid); None: image or background
    background: bool = False


@dataclass
class ClassifySplit:
    """The inputs of one split, with the pixels they are cut from (in memory, read once)."""

    items: list[ClassifyItem]
    images: dict[str, np.ndarray]  # case id -> prepared image
    tissue: dict[str, tuple[np.ndarray, np.ndarray]]  # case id -> (lesion pixels, breast mask): background draws
    left_out: Counter = field(default_factory=Counter)  # why lesions / images were left out -> count

    def labels(self) -> np.ndarray:
        return np.array([it.label for it in self.items], np.int64)

    def notes(self, split: str) -> list[str]:
        return [f"{split} split: left out {n} {why}" for why, n in sorted(self.left_out.items())]


def lesion_class(pathology: str, kind: str, target: str) -> str:
    """A lesion's class name for a lesion target (see the module docstring for the kind mapping)."""
    if target == "pathology":
        return pathology
    return f"{CALCIFICATION if kind == CALCIFICATION else 'mass'}-{pathology}"


def _case_items(pc: Any, section: Any, names: tuple[str, ...], left_out: Counter) -> list[ClassifyItem]:
    """The items of one prepared case, counting what is left out and why."""
    if section.target == "image":
        if pc.label not in names:
            left_out["image(s) labelled unknown"] += 1
            return []
        return [ClassifyItem(pc.case_id, pc.patient_id, names.index(pc.label))]
    items = []
    for les, box in zip(pc.case.lesions, pc.boxes):
        if section.kinds is not None and les.kind not in section.kinds:
            left_out[f"lesion(s) of kinds not in classify.kinds ({les.kind})"] += 1
        elif box is None:
            left_out["lesion(s) without an outline on the prepared grid"] += 1
        elif les.pathology not in ("benign", "malignant"):
            left_out["lesion(s) of unknown pathology"] += 1
        else:
            label = names.index(lesion_class(les.pathology, les.kind, section.target))
            items.append(ClassifyItem(pc.case_id, pc.patient_id, label, tuple(float(v) for v in box)))
    if section.target == "kind_pathology" and getattr(section, "background_per_image", 0):
        if pc.unlocated_lesions:
            left_out["image(s) without background patches (a lesion there has no outline)"] += 1
        else:
            items += [ClassifyItem(pc.case_id, pc.patient_id, names.index(BACKGROUND), background=True)
                      ] * int(section.background_per_image)
    return items


def load_split(prepared: Any, case_ids: Sequence[str], section: Any) -> ClassifySplit:
    """The inputs of ``case_ids`` for ``section`` (a ``classify`` config section)."""
    names = class_names(section.target)
    out = ClassifySplit([], {}, {})
    for cid in dict.fromkeys(case_ids):
        pc = prepared.by_id(cid)
        items = _case_items(pc, section, names, out.left_out)
        if not items:
            continue
        out.items += items
        out.images[cid] = prepared.load_image(pc)
        if any(it.background for it in items):
            out.tissue[cid] = (prepared.load_union_mask(pc), prepared.load_breast_mask(pc))
    return out


def class_counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=n_classes).astype(np.int64)


def inverse_frequency_weights(counts: np.ndarray) -> np.ndarray:
    """n / (K c_k) per present class (sklearn's "balanced"), 0 for an absent one: every present
    class then weighs as much in the loss as any other."""
    present = counts > 0
    weights = np.zeros(len(counts), np.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def balanced_plan(labels: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """One epoch of item indices drawn with replacement, every class equally likely
    (``WeightedRandomSampler`` with weights 1 / class count), seeded by (seed, epoch)."""
    from torch.utils.data import WeightedRandomSampler

    counts = np.bincount(labels)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    generator = torch.Generator().manual_seed(item_seed(seed, epoch, _PLAN_STREAM, 0))
    return np.fromiter(WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator), np.int64)


def background_sides(split: ClassifySplit, settings: PatchSettings) -> list[int]:
    """The lesion patches' sides: what a background patch's side is drawn from."""
    sides = [lesion_window(it.box, settings.context, settings.min_side)[2] for it in split.items if it.box is not None]
    return sides or [settings.min_side]


def item_input(split: ClassifySplit, item: ClassifyItem, settings: PatchSettings, sides: Sequence[int],
               rng: np.random.Generator) -> np.ndarray:
    """The (S, S) input of ``item``; a background patch's side and position come from ``rng``."""
    image = split.images[item.case_id]
    if item.background:
        lesion, breast = split.tissue[item.case_id]
        window = draw_background_window(lesion, breast, int(sides[rng.integers(len(sides))]), settings.min_side, rng)
        if window is None:  # no lesion-free breast window even at min_side: a black (outside-the-breast) patch
            return np.zeros((settings.input_size, settings.input_size), np.float32)
        return crop_window(image, *window, settings.input_size)
    if item.box is None:
        return image_input(image, settings.input_size)
    return lesion_patch(image, item.box, settings)


class ClassifyDataset(torch.utils.data.Dataset):
    """``(image (1, S, S) float32, label int64)`` per index; ``set_epoch`` before each epoch. With
    ``balanced``, index i of an epoch is the i-th of that epoch's class-balanced draws; otherwise
    item i. Background positions and augmentation are seeded per (seed, epoch, index), so batches
    do not depend on workers or processes."""

    def __init__(self, split: ClassifySplit, settings: PatchSettings, balanced: bool, augment: Any = None,
                 seed: int = 0):
        if not split.items:
            raise ConfigError(None, "no training item (is the training split empty, or every lesion left out?)")
        self.split, self.settings, self.balanced, self.augment, self.seed = split, settings, balanced, augment, seed
        self.labels = split.labels()
        self.sides = background_sides(split, settings)
        self.epoch, self.plan = 0, np.arange(len(self.labels))
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.plan = balanced_plan(self.labels, self.seed, self.epoch) if self.balanced else np.arange(len(self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def item(self, index: int) -> ClassifyItem:
        return self.split.items[int(self.plan[index])]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.item(index)
        rng = np.random.default_rng(item_seed(self.seed, self.epoch, _BACKGROUND_STREAM, int(index)))
        image = torch.from_numpy(item_input(self.split, item, self.settings, self.sides, rng))[None]
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, self.epoch, _AUGMENT_STREAM, int(index)))
                # the augment pipeline moves a label map with the image; a classifier has none
                image, _ = self.augment(image, torch.zeros(image.shape[-2:], dtype=torch.uint8))
        return image, torch.tensor(item.label, dtype=torch.int64)


def validation_inputs(split: ClassifySplit, settings: PatchSettings, seed: int) -> np.ndarray:
    """(N, S, S) inputs of every validation item; background positions fixed per item."""
    sides = background_sides(split, settings)
    return np.stack([item_input(split, it, settings, sides, np.random.default_rng(item_seed(seed, 0, _BACKGROUND_STREAM, i)))
                     for i, it in enumerate(split.items)])


# ---- loss and validation ---------------------------------------------------------------------------
def classification_loss(outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor,
                        class_weights: torch.Tensor | None = None, aux_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Cross-entropy of the logits; a model with an auxiliary head (Inception-v3 in training mode:
    ``(logits, aux_logits)``) adds ``aux_weight`` x the auxiliary cross-entropy, as in its paper."""
    logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
    ce = F.cross_entropy(logits.float(), labels, weight=class_weights)
    if aux is None or not aux_weight:
        return {"loss": ce, "ce": ce.detach()}
    aux_ce = F.cross_entropy(aux.float(), labels, weight=class_weights)
    return {"loss": ce + float(aux_weight) * aux_ce, "ce": ce.detach(), "aux": aux_ce.detach()}


def monitored_score(target: str, labels: np.ndarray) -> str:
    """What validation maximises: the AUC its classes allow, else balanced accuracy."""
    names = class_names(target)
    present = set(np.unique(labels).tolist())
    if target == "kind_pathology":
        return "macro AUC" if present == set(range(len(names))) else "balanced accuracy"
    positive = names.index(POSITIVE)
    return "AUC (malignant)" if positive in present and len(present) > 1 else "balanced accuracy"


def score_report(probs: np.ndarray, split: ClassifySplit, target: str, n_boot: int) -> Any:
    from mammocad.evaluation.classification import classification_report

    return classification_report(split.labels(), None, probs, class_names(target), [it.patient_id for it in split.items],
                                 positive_class=None if target == "kind_pathology" else POSITIVE, n_boot=n_boot)


def validate_split(model: nn.Module, inputs: np.ndarray, split: ClassifySplit, target: str, score_name: str,
                   amp_dtype: torch.dtype | None = None, n_boot: int = 0) -> ValidationResult:
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        probs = predict_inputs(model, inputs, autocast="bf16" if amp_dtype == torch.bfloat16 else "fp32")
    finally:
        model.train(was_training)
    labels = split.labels()
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))
    report = score_report(probs, split, target, n_boot)
    auc = report.roc_auc["macro" if target == "kind_pathology" else POSITIVE].value
    balanced = report.headline["balanced_accuracy"].value
    metrics = {"val_loss": loss, "val_auc": auc, "val_balanced_accuracy": balanced,
               "val_accuracy": report.headline["accuracy"].value}
    score = balanced if score_name == "balanced accuracy" else auc
    return ValidationResult(score=score, metrics=metrics, report=report, seconds=time.perf_counter() - start)


def write_classification_report(report: Any, out_dir: Path) -> None:
    from mammocad.evaluation.report import JSON_NAME, MARKDOWN_NAME
    from mammocad.io.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(Path(out_dir) / JSON_NAME, report.to_dict(), strict=True)
    atomic_write_text(Path(out_dir) / MARKDOWN_NAME, report.to_markdown())


def check_input_size(model: nn.Module, input_size: int, source: str) -> None:
    """A model with an auxiliary head (Inception-v3) trains at its design size at least: the head
    pools the 17 x 17 map of a 299 px input with a 5 x 5 window and then a 5 x 5 convolution, which
    smaller inputs shrink to nothing. Other models take any size >= 32 (the card's bound)."""
    designed = getattr(model, "input_size", None)
    if getattr(model, "aux_weight", 0.0) and designed and input_size < designed:
        raise ConfigError(source, f"classify.input_size: {input_size} is too small for the auxiliary head of "
                                  f"{model.mammocad_config['name']} in training; set it to {designed}")
    if designed and designed != input_size:
        log.info("%s: %s was designed for %d px inputs; classify.input_size is %d", source,
                 model.mammocad_config["name"], designed, input_size)


# ---- one training run ------------------------------------------------------------------------------
class ClassifyTraining:
    """The classification side of one training run (``tasks.TaskTraining``)."""

    log_metrics = ("val_loss", "val_auc", "val_balanced_accuracy", "val_accuracy")
    collate = None  # (image, label) tensors: torch's default collate stacks them

    def __init__(self, cfg: Any, prepared: Any, run: RunContext, loss_fn: nn.Module | None = None):
        # loss_fn (the config's segmentation loss) is not used: parse_config refuses a loss section here
        self.cfg, self.prepared, self.run = cfg, prepared, run
        self.section = cfg.classify
        self.settings = PatchSettings.from_section(self.section, cfg.bundle.name)
        self.names = class_names(self.section.target)
        self.score_name = "AUC (malignant)" if self.section.target != "kind_pathology" else "macro AUC"
        self.train_split = self._load("train")
        counts = class_counts(self.train_split.labels(), len(self.names))
        if (counts > 0).sum() < 2:
            raise ConfigError(cfg.source, f"classify.target: fold {cfg.data.fold}'s training split has items of "
                                          f"{int((counts > 0).sum())} class(es) only ({self._counts_text(counts)})")
        absent = [n for n, c in zip(self.names, counts) if c == 0]
        if absent:
            log.warning("%s: no training item of class(es) %s", cfg.source, ", ".join(absent))
        log.info("%s: training items per class: %s", cfg.source, self._counts_text(counts))
        self.class_weights = (torch.as_tensor(inverse_frequency_weights(counts), dtype=torch.float32, device=run.device)
                              if self.section.balance == "loss" else None)
        with cfg.errors_in("classify"):
            self.train_dataset = ClassifyDataset(self.train_split, self.settings, self.section.balance == "sampler",
                                                 self._augment(), cfg.train.seed)
        self.val_split: ClassifySplit | None = None
        self.val_inputs = np.zeros((0, self.settings.input_size, self.settings.input_size), np.float32)
        self.in_channels, self.aux_weight = 1, 0.0  # the model's, set by check_model

    def _counts_text(self, counts: np.ndarray) -> str:
        return ", ".join(f"{n} {c}" for n, c in zip(self.names, counts))

    def _load(self, split: str) -> ClassifySplit:
        with self.cfg.errors_in("data"):
            ids = split_case_ids(self.prepared, self.cfg.data.fold, split, self.cfg.data.splits)
        out = load_split(self.prepared, ids, self.section)
        for note in out.notes(split):
            log.warning("%s: %s", self.prepared.root, note)
        return out

    def _augment(self) -> Any:
        if self.cfg.augment is None:
            return None
        from mammocad.augment import build_augment

        with self.cfg.errors_in("augment"):
            return build_augment(self.cfg.augment)

    def prepare_validation(self, patch_loader: bool) -> None:
        if patch_loader:
            raise ConfigError(self.cfg.source, "train.val_mode: a classifier validates its items (val_mode: image)")
        if not self.run.is_main:
            return
        self.val_split = self._load("val")
        if self.cfg.train.val_every > 0 and not self.val_split.items:
            raise ConfigError(self.cfg.source, f"data: fold {self.cfg.data.fold} has no validation item for target "
                                               f"{self.section.target!r}; re-split or set train.val_every: 0")
        self.score_name = monitored_score(self.section.target, self.val_split.labels())
        if self.val_split.items:
            self.val_inputs = validation_inputs(self.val_split, self.settings, self.cfg.train.seed)

    def check_model(self, model: nn.Module) -> None:
        from mammocad.models.registry import model_task

        name = model.mammocad_config["name"]
        if model_task(name) != NAME:
            raise ConfigError(self.cfg.source, f"model.name: {name} is a {model_task(name)} model; task classify "
                                               "trains classifiers (classifier, inception_v3)")
        if int(model.num_classes) != len(self.names):
            raise ConfigError(self.cfg.source, f"model.kwargs.num_classes: {model.num_classes} outputs for "
                                               f"{len(self.names)} classes of target {self.section.target!r}")
        check_input_size(model, self.settings.input_size, self.cfg.source)
        self.in_channels = int(model.in_channels)
        self.aux_weight = float(getattr(model, "aux_weight", 0.0))

    def train_step(self, net: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch
        device = self.run.device
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast_context(device, self.run.amp_dtype):
            outputs = net(as_model_input(images, self.in_channels))
        return classification_loss(outputs, labels, self.class_weights, self.aux_weight)

    def batch_items(self, batch: Any) -> int:
        return int(batch[0].shape[0])

    def validate(self, model: nn.Module) -> ValidationResult:
        if not self.run.is_main:
            return ValidationResult(score=math.nan)
        return validate_split(model, self.val_inputs, self.val_split, self.section.target, self.score_name,
                              self.run.amp_dtype)

    def final_validation(self, model: nn.Module, out_dir: Path, n_boot: int) -> tuple[Any, str | None]:
        if self.val_split is None or not self.val_split.items:
            return None, None
        val = validate_split(model, self.val_inputs, self.val_split, self.section.target, self.score_name,
                             self.run.amp_dtype, n_boot=n_boot)
        val.report.notes += self.train_split.notes("train") + self.val_split.notes("val")
        write_classification_report(val.report, out_dir)
        return val.report, (f"validation {self.score_name} {val.score:.4f} on {val.report.n_images} "
                            f"{'images' if self.section.target == 'image' else 'patches'} of "
                            f"{val.report.n_patients} patients")


def evaluate_split(model: nn.Module, card: Any, prepared: Any, case_ids: Sequence[str], *, split: str,
                   n_boot: int, seed: int = 0, autocast: str = "fp32", device: torch.device | None = None) -> Any:
    """A classifier bundle's ``ClassificationReport`` on prepared cases: its items (lesion patches or
    whole images, background draws fixed by ``seed``) made as training made them, from the card's
    settings and its training config's ``classify`` section (background patches per image)."""
    from types import SimpleNamespace

    settings = PatchSettings.from_card(card)
    trained = ((card.config or {}).get("classify") or {})
    section = SimpleNamespace(target=settings.target, kinds=card.classify.kinds,
                              background_per_image=int(trained.get("background_per_image", 1)))
    data = load_split(prepared, case_ids, section)
    if not data.items:
        raise InputError(prepared.root, f"no item to classify in split {split!r} for target {settings.target!r}")
    output_names(model, settings)
    probs = predict_inputs(model, validation_inputs(data, settings, seed), autocast=autocast, device=device)
    report = score_report(probs, data, settings.target, n_boot)
    report.notes += data.notes(split)
    return report


def training(cfg: Any, prepared: Any, run: RunContext, loss_fn: nn.Module | None = None) -> ClassifyTraining:
    return ClassifyTraining(cfg, prepared, run, loss_fn)
