"""Training patches from the TRAINING split of a prepared dataset: grid, balanced and lesion-context.

Disk and sampling are decoupled: ``load_samples`` reads the cases named by ``datasets.targets.split_case_ids``
into in-memory ``SegmentationSample``s once; the samplers only see those samples, so a val/test
case can never reach a training batch.

Every sampler answers ``patch(index, epoch)`` deterministically: the random draws of patch ``i`` in
epoch ``e`` come from a numpy Generator seeded with ``(seed, e, i)``. A patch therefore does not
depend on which DataLoader worker makes it, nor on how many workers there are, so no
``worker_init_fn`` is needed (``PatchDataset`` seeds torch the same way for augmentation).
``PatchDataset.set_epoch`` must be called before each epoch's iterator is created; with
``persistent_workers=True`` the workers keep the epoch they were started with.

Padding: patches reaching past the image border, and images smaller than a patch, are padded with
0 in the image (prepared images are already 0 outside the breast, so padding looks like the real
border) and with ``pad_label`` (default 0 = background) in the target; pass ``IGNORE_INDEX`` to
exclude padding from the loss instead.

Memory: a sample holds its image as float32 (4 bytes per pixel, ~3.3 MB at 1024x800) plus 2
bytes per pixel of target and breast mask.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Protocol

import cv2
import numpy as np
import torch

from mammocad.errors import ConfigError, InputError
from mammocad.datasets.targets import IGNORE_INDEX, build_target

if TYPE_CHECKING:
    from mammocad.datasets.prepared import PreparedDataset

log = logging.getLogger(__name__)

CATEGORIES = ("lesion", "tissue", "background")  # the balanced sampler's fraction keys
DEFAULT_FRACTIONS = {"lesion": 0.5, "tissue": 0.25, "background": 0.25}


@dataclass
class SegmentationSample:
    """One training image in memory, already reduced to what sampling needs."""

    image: np.ndarray  # float32 HxW in [0, 1]
    target: np.ndarray  # uint8 HxW: 0 background, 1.. classes, IGNORE_INDEX = not scored
    breast: np.ndarray  # bool HxW (ultrasound: the scan area)
    case_id: str
    patient_id: str
    num_classes: int = 2
    lesion_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # [x0, y0, x1, y1) per visible lesion

    def __post_init__(self) -> None:
        if self.image.ndim != 2 or self.target.shape != self.image.shape or self.breast.shape != self.image.shape:
            raise InputError(self.case_id, f"image {self.image.shape}, target {self.target.shape} and breast mask "
                                           f"{self.breast.shape} must be the same 2-D shape")


@dataclass
class Patch:
    image: np.ndarray  # float32 PxP
    target: np.ndarray  # uint8 PxP
    category: str  # what the patch was drawn for ("lesion", "tissue", "background", "class_1", ...)
    case_id: str
    box: tuple[int, int, int, int]  # [x0, y0, x1, y1) of the crop in the sample's pixels (may pass the border)


class PatchSampler(Protocol):
    def __len__(self) -> int: ...
    def patch(self, index: int, epoch: int = 0) -> Patch: ...
    def composition(self, epoch: int = 0) -> dict[str, int]: ...


# ---- reading the training split ----------------------------------------------------------------
def load_samples(prepared: "PreparedDataset", case_ids: Iterable[str], num_classes: int = 2,
                 unknown: str | None = None, skip_unlocated: bool = True) -> list[SegmentationSample]:
    """Read ``case_ids`` (take them from ``datasets.targets.split_case_ids``) into memory.

    ``unknown``: label of unknown-pathology lesions ("lesion" for 2 classes, "ignore" for 3 by default).
    ``skip_unlocated``: leave out cases whose target cannot be known (a lesion without an outline, or
    an unlabelled image without lesions); otherwise their unlocated parts count as background.
    """
    from mammocad.datasets.rasterize import mask_to_box

    samples, skipped = [], []
    for cid in dict.fromkeys(case_ids):
        pc = prepared.by_id(cid)
        lesions = pc.case.lesions
        # a lesion lost in preprocessing (cropped away) is known to be absent here: not unlocated
        unlocated = bool(pc.unlocated_lesions) or (not lesions and pc.label == "unknown")
        if unlocated and skip_unlocated:
            skipped.append(cid)
            continue
        image = prepared.load_image(pc)
        masks = prepared.load_lesion_masks(pc)
        target = build_target(image.shape, prepared.load_union_mask(pc), masks, [les.pathology for les in lesions],
                              num_classes, unknown)
        boxes = [tuple(int(v) for v in box) for m in masks if m is not None and (box := mask_to_box(m)) is not None]
        samples.append(SegmentationSample(image, target, prepared.load_breast_mask(pc), cid, pc.patient_id,
                                          num_classes, boxes))
    if skipped:
        log.warning("%s: skipped %d of %d cases whose lesions are not all outlined (e.g. %s)", prepared.root,
                    len(skipped), len(skipped) + len(samples), skipped[0])
    return samples


# ---- shared helpers ----------------------------------------------------------------------------
def crop_padded(array: np.ndarray, top: int, left: int, height: int, width: int, fill: float) -> np.ndarray:
    """``array[top:top+height, left:left+width]`` where the part outside the array is ``fill``."""
    out = np.full((height, width), fill, dtype=array.dtype)
    h, w = array.shape
    r0, r1, c0, c1 = max(top, 0), min(top + height, h), max(left, 0), min(left + width, w)
    if r0 < r1 and c0 < c1:
        out[r0 - top:r1 - top, c0 - left:c1 - left] = array[r0:r1, c0:c1]
    return out


def _crop_patch(s: SegmentationSample, top: int, left: int, size: int, category: str, pad_label: int) -> Patch:
    return Patch(crop_padded(s.image, top, left, size, size, 0.0), crop_padded(s.target, top, left, size, size, pad_label),
                 category, s.case_id, (left, top, left + size, top + size))


def _check_samples(samples: list[SegmentationSample], what: str) -> list[SegmentationSample]:
    samples = list(samples)
    if not samples:
        raise ConfigError(what, "no training samples (is the training split empty or were all cases skipped?)")
    if len({s.num_classes for s in samples}) > 1:
        raise ConfigError(what, "samples mix binary and 3-class targets")
    return samples


def _positive(value: float, name: str) -> None:
    if not value >= 1:
        raise ConfigError(name, f"must be at least 1, got {value}")


def category_mask(s: SegmentationSample, category: str, rows: slice | int = slice(None)) -> np.ndarray:
    """Pixels of ``category`` (in ``rows``): lesion = labelled class > 0; tissue = breast without
    lesion; background = outside the breast without lesion; ``class_k`` = label k. Ignored pixels
    belong to no category but ``class_255``."""
    t = s.target[rows]
    if category == "lesion":
        return (t > 0) & (t != IGNORE_INDEX)
    if category == "tissue":
        return s.breast[rows] & (t == 0)
    if category == "background":
        return ~s.breast[rows] & (t == 0)
    return t == int(category.removeprefix("class_"))


def format_composition(counts: dict[str, int]) -> str:
    """``lesion 500 (50.0%), tissue 250 (25.0%), ...`` for the training log."""
    total = sum(counts.values()) or 1
    return ", ".join(f"{k} {v} ({100.0 * v / total:.1f}%)" for k, v in counts.items())


# ---- samplers ----------------------------------------------------------------------------------
def grid_starts(length: int, patch: int, stride: int) -> list[int]:
    """Patch origins along one axis: every ``stride``, the last one aligned to the border."""
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch + 1, stride))
    return starts if starts[-1] == length - patch else [*starts, length - patch]


class GridPatchSampler:
    """Every grid position of every image (deterministic, no randomness).

    Images smaller than ``patch`` are padded at the bottom/right. ``skip_background`` drops patches
    without a single breast pixel. A patch's category is lesion (any lesion pixel), tissue (any
    breast pixel) or background.
    """

    def __init__(self, samples: list[SegmentationSample], patch: int = 256, stride: int = 128,
                 skip_background: bool = False, pad_label: int = 0):
        self.samples = _check_samples(samples, "GridPatchSampler")
        _positive(patch, "patch")
        _positive(stride, "stride")
        if stride > patch:
            raise ConfigError("stride", f"stride {stride} > patch {patch} would leave pixels unsampled")
        self.size, self.pad_label = patch, pad_label
        self.items: list[tuple[int, int, int, str]] = []  # (sample index, top, left, category)
        for i, s in enumerate(self.samples):
            h, w = s.image.shape
            for top in grid_starts(h, patch, stride):
                for left in grid_starts(w, patch, stride):
                    region = (slice(top, top + patch), slice(left, left + patch))
                    if category_mask(s, "lesion")[region].any():
                        cat = "lesion"
                    elif s.breast[region].any():
                        cat = "tissue"
                    elif skip_background:
                        continue
                    else:
                        cat = "background"
                    self.items.append((i, top, left, cat))

    def __len__(self) -> int:
        return len(self.items)

    def patch(self, index: int, epoch: int = 0) -> Patch:
        i, top, left, cat = self.items[index]
        return _crop_patch(self.samples[i], top, left, self.size, cat, self.pad_label)

    def composition(self, epoch: int = 0) -> dict[str, int]:
        return dict(Counter(item[3] for item in self.items))


class BalancedPatchSampler:
    """``n_per_epoch`` patches centred on random pixels of chosen categories.

    ``mode="fractions"``: category counts per epoch are ``fractions`` of ``n_per_epoch`` (rounded,
    then shuffled), then a random image having pixels of the category, then a uniform random pixel
    of it. ``mode="class_pixel"``: the same with the label classes present in the samples, equally
    often ("random pixel of a randomly chosen class"). Patch centre = pixel (P//2, P//2).

    Pixel draws are exact and cheap: per image and category only the cumulative pixel count per row
    is stored (H integers); a draw finds the row by binary search and the column in that one row.
    """

    def __init__(self, samples: list[SegmentationSample], patch: int = 256, fractions: dict[str, float] | None = None,
                 mode: str = "fractions", n_per_epoch: int = 1000, seed: int = 0, pad_label: int = 0):
        self.samples = _check_samples(samples, "BalancedPatchSampler")
        _positive(patch, "patch")
        _positive(n_per_epoch, "n_per_epoch")
        self.size, self.n, self.seed, self.pad_label, self.mode = patch, int(n_per_epoch), seed, pad_label, mode
        if mode == "fractions":
            weights = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
            bad = sorted(set(weights) - set(CATEGORIES))
            if bad or any(not v >= 0 for v in weights.values()) or abs(sum(weights.values()) - 1.0) > 1e-6:
                raise ConfigError("fractions", f"{weights} must give non-negative fractions of {', '.join(CATEGORIES)} "
                                               "summing to 1")
            weights = {k: float(v) for k, v in weights.items() if v > 0}
        elif mode == "class_pixel":
            present = set().union(*(np.unique(s.target).tolist() for s in self.samples)) - {IGNORE_INDEX}
            weights = {f"class_{k}": 1.0 / len(present) for k in sorted(present)}
        else:
            raise ConfigError("mode", f"unknown mode {mode!r}: expected 'fractions' or 'class_pixel'")
        self.categories = list(weights)
        self.weights = np.array([weights[c] for c in self.categories])
        # per category: indices of samples with such pixels, and their cumulative row counts
        self.holders: dict[str, np.ndarray] = {}
        self.row_cumsum: dict[str, dict[int, np.ndarray]] = {}
        for cat in self.categories:
            cums = {i: np.cumsum(category_mask(s, cat).sum(axis=1, dtype=np.int64)) for i, s in enumerate(self.samples)}
            self.row_cumsum[cat] = {i: c for i, c in cums.items() if c[-1] > 0}
            self.holders[cat] = np.array(sorted(self.row_cumsum[cat]), dtype=np.int64)
            if self.holders[cat].size == 0:
                raise ConfigError("fractions", f"no training image has {cat} pixels; set its fraction to 0")
        self._plan_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n

    def plan(self, epoch: int = 0) -> np.ndarray:
        """Category index of every patch of ``epoch``."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            exact = self.weights * self.n
            counts = np.floor(exact).astype(np.int64)
            counts[np.argsort(counts - exact)[: self.n - counts.sum()]] += 1  # largest remainders
            plan = np.repeat(np.arange(len(self.categories)), counts)
            np.random.default_rng([self.seed, epoch, 0]).shuffle(plan)
            self._plan_cache = (epoch, plan)
        return self._plan_cache[1]

    def centre(self, index: int, epoch: int = 0) -> tuple[int, int, int, str]:
        """(sample index, row, col, category) of patch ``index``."""
        if not 0 <= index < self.n:
            raise IndexError(index)
        cat = self.categories[self.plan(epoch)[index]]
        rng = np.random.default_rng([self.seed, epoch, 1, index])
        holders = self.holders[cat]
        i = int(holders[rng.integers(holders.size)])
        cum = self.row_cumsum[cat][i]
        k = int(rng.integers(cum[-1]))
        row = int(np.searchsorted(cum, k, side="right"))
        col = int(np.flatnonzero(category_mask(self.samples[i], cat, row))[k - (int(cum[row - 1]) if row else 0)])
        return i, row, col, cat

    def patch(self, index: int, epoch: int = 0) -> Patch:
        i, row, col, cat = self.centre(index, epoch)
        half = self.size // 2
        return _crop_patch(self.samples[i], row - half, col - half, self.size, cat, self.pad_label)

    def composition(self, epoch: int = 0) -> dict[str, int]:
        counts = np.bincount(self.plan(epoch), minlength=len(self.categories))
        return {c: int(n) for c, n in zip(self.categories, counts)}


class LesionContextSampler:
    """One square crop per lesion, resized to ``out_size``: side = ``context`` x the lesion box's long
    side (or ``fixed_size``), never less than ``out_size`` nor than the lesion, centred on the box.
    Image: area (shrinking) / bilinear (enlarging) interpolation; target: nearest."""

    def __init__(self, samples: list[SegmentationSample], context: float = 2.0, out_size: int = 256,
                 fixed_size: int | None = None, pad_label: int = 0):
        self.samples = _check_samples(samples, "LesionContextSampler")
        if not context >= 1:
            raise ConfigError("context", f"must be at least 1 (the crop must hold the lesion), got {context}")
        _positive(out_size, "out_size")
        if fixed_size is not None:
            _positive(fixed_size, "fixed_size")
        self.out_size, self.pad_label = out_size, pad_label
        self.items: list[tuple[int, int, int, int]] = []  # (sample index, top, left, side)
        for i, s in enumerate(self.samples):
            for x0, y0, x1, y1 in s.lesion_boxes:
                long_side = max(x1 - x0, y1 - y0)
                if fixed_size is None:
                    side = max(int(np.ceil(context * long_side)), out_size)
                else:
                    side = max(int(fixed_size), long_side)
                self.items.append((i, (y0 + y1 - side) // 2, (x0 + x1 - side) // 2, side))
        if not self.items:
            raise ConfigError("LesionContextSampler", "no training sample has a visible lesion")

    def __len__(self) -> int:
        return len(self.items)

    def patch(self, index: int, epoch: int = 0) -> Patch:
        i, top, left, side = self.items[index]
        s, out = self.samples[i], (self.out_size, self.out_size)
        image = crop_padded(s.image, top, left, side, side, 0.0)
        target = crop_padded(s.target, top, left, side, side, self.pad_label)
        if side != self.out_size:
            image = cv2.resize(image, out, interpolation=cv2.INTER_AREA if side > self.out_size else cv2.INTER_LINEAR)
            target = cv2.resize(target, out, interpolation=cv2.INTER_NEAREST_EXACT)
        return Patch(np.clip(image, 0.0, 1.0), target, "lesion", s.case_id, (left, top, left + side, top + side))

    def composition(self, epoch: int = 0) -> dict[str, int]:
        return {"lesion": len(self.items)}


# ---- torch ------------------------------------------------------------------------------------
def item_seed(seed: int, epoch: int, stream: int, index: int) -> int:
    """A 63-bit seed for one item, independent of worker and process."""
    return int(np.random.SeedSequence([seed, epoch, stream, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class PatchDataset(torch.utils.data.Dataset):
    """``(image (1,P,P) float32, target (P,P) int64)`` per index, for a DataLoader (any num_workers).

    ``augment(image, target) -> (image, target)`` runs under a torch seed made from
    ``(seed, epoch, index)`` (the global RNG is restored afterwards), so batches are the same with
    0 or N workers. Call ``set_epoch`` before each epoch; ``composition()`` gives its patch counts.
    """

    def __init__(self, sampler: PatchSampler, augment: Any = None, seed: int = 0):
        self.sampler, self.augment, self.seed, self.epoch = sampler, augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.sampler.patch(int(index), self.epoch)
        image = torch.from_numpy(np.ascontiguousarray(p.image, dtype=np.float32))[None]
        target = torch.from_numpy(p.target.astype(np.int64))
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, self.epoch, 2, int(index)))
                image, target = self.augment(image, target)
        return image, target

    def composition(self) -> dict[str, int]:
        return self.sampler.composition(self.epoch)
