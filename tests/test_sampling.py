"""Patch sampling (mammocad.sampling) on synthetic samples, a stub prepared dataset and one real
prepared dataset made by ``prepare_dataset("folder", ...)``.

Synthetic images are 0 outside the breast and > 0 inside (as prepared images are), so a patch's
category can be read back from its own centre pixel: target > 0 lesion, image > 0 tissue, else background.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mammocad.datasets.rasterize import mask_to_box
from mammocad.errors import ConfigError, InputError
from mammocad.records import Case, Lesion
from mammocad.datasets.targets import IGNORE_INDEX, build_target, split_case_ids
from mammocad.sampling import (BalancedPatchSampler, GridPatchSampler, LesionContextSampler, PatchDataset,
                               SegmentationSample, format_composition, grid_starts, load_samples)


def disc(shape, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r


def breast_of(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy + 0.5 - h / 2) / (0.45 * h)) ** 2 + ((xx + 0.5) / (0.7 * w)) ** 2 <= 1  # chest wall on the left


def make_sample(case_id: str, h: int = 200, w: int = 160, lesions=((90, 40, 12),), seed: int = 0,
                patient_id: str | None = None) -> SegmentationSample:
    rng = np.random.default_rng(seed)
    breast = breast_of(h, w)
    image = np.where(breast, rng.uniform(0.2, 0.9, (h, w)), 0.0).astype(np.float32)
    masks = [disc((h, w), *les) & breast for les in lesions]
    target = build_target((h, w), None, masks, ["malignant"] * len(masks))
    boxes = [tuple(int(v) for v in mask_to_box(m)) for m in masks]
    return SegmentationSample(image, target, breast, case_id, patient_id or case_id, 2, boxes)


def category_at_centre(patch) -> str:
    c = patch.image.shape[0] // 2
    if patch.target[c, c] > 0:
        return "lesion"
    return "tissue" if patch.image[c, c] > 0 else "background"


# ---- targets ------------------------------------------------------------------------------------
def test_build_target_classes_unknown_and_priority():
    shape = (10, 10)
    a, b, u = np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape, bool)
    a[0:4, 0:4], b[2:6, 2:6], u[7:9, 7:9] = True, True, True  # a/b overlap on [2:4, 2:4]
    union = a | b | u
    union[0, 9] = True  # a union pixel no lesion mask covers
    paths = ["benign", "malignant", "unknown"]
    binary = build_target(shape, union, [a, b, u], paths)
    assert binary.dtype == np.uint8 and binary.sum() == (a | b | u).sum() + 1 and set(np.unique(binary)) == {0, 1}
    three = build_target(shape, union, [a, b, u, None], paths + ["benign"], num_classes=3)
    assert three[0, 0] == 1 and three[3, 3] == 2 and three[5, 5] == 2  # malignant wins the overlap
    assert three[8, 8] == IGNORE_INDEX and three[0, 9] == IGNORE_INDEX  # unknown -> ignored by default
    assert (three == 1).sum() == 12 and (three == 2).sum() == 16
    assert build_target(shape, union, [a, b, u], paths, 3, unknown="malignant")[8, 8] == 2
    assert build_target(shape, union, [a, b, u], paths, 2, unknown="background")[8, 8] == 0
    with pytest.raises(ConfigError, match="unknown"):
        build_target(shape, union, [a], ["benign"], 3, unknown="lesion")
    with pytest.raises(ConfigError, match="num_classes"):
        build_target(shape, union, [a], ["benign"], 4)


# ---- grid ---------------------------------------------------------------------------------------
def test_grid_covers_every_pixel_and_pads_small_images():
    samples = [make_sample("big", 300, 220), make_sample("small", 50, 70, lesions=((25, 20, 6),))]
    grid = GridPatchSampler(samples, patch=128, stride=96)
    assert grid_starts(300, 128, 96) == [0, 96, 172] and grid_starts(220, 128, 96) == [0, 92]
    assert len(grid) == 3 * 2 + 1
    cover = {s.case_id: np.zeros(s.image.shape, int) for s in samples}
    for i in range(len(grid)):
        p = grid.patch(i)
        assert p.image.shape == (128, 128) and p.target.shape == (128, 128) and p.image.dtype == np.float32
        x0, y0, x1, y1 = p.box
        src = next(s for s in samples if s.case_id == p.case_id)
        h, w = src.image.shape
        np.testing.assert_array_equal(p.image[: min(y1, h) - y0, : min(x1, w) - x0], src.image[y0:y1, x0:x1])
        cover[p.case_id][y0:y1, x0:x1] += 1
    assert all(c.min() >= 1 for c in cover.values())  # every pixel of every image is in some patch
    small = grid.patch(len(grid) - 1)
    assert small.box == (0, 0, 128, 128) and small.image[50:].max() == 0 and small.target[:, 70:].max() == 0
    assert grid.composition() == {"lesion": 3, "tissue": 4}  # the 300x220 breast reaches every grid cell
    padded = GridPatchSampler(samples[1:], patch=128, pad_label=IGNORE_INDEX).patch(0)
    assert (padded.target[50:] == IGNORE_INDEX).all() and (padded.target[:50, :70] != IGNORE_INDEX).all()


def test_grid_skip_background_drops_only_patches_without_breast():
    s = make_sample("wide", 120, 400)  # breast covers the left ~280 columns
    full, kept = GridPatchSampler([s], 64, 64), GridPatchSampler([s], 64, 64, skip_background=True)
    assert full.composition()["background"] > 0 and "background" not in kept.composition()
    assert len(full) - len(kept) == full.composition()["background"]
    assert all(s.breast[p.box[1]:p.box[3], p.box[0]:p.box[2]].any() for p in map(kept.patch, range(len(kept))))
    with pytest.raises(ConfigError, match="stride"):
        GridPatchSampler([s], patch=64, stride=65)


# ---- balanced -----------------------------------------------------------------------------------
def test_balanced_fractions_met_and_centre_pixels_have_the_drawn_category():
    samples = [make_sample(f"c{i}", lesions=((90, 40, 12),) if i < 3 else (), seed=i) for i in range(5)]
    sampler = BalancedPatchSampler(samples, patch=64, n_per_epoch=4000, seed=1)
    drawn, seen, lesion_cases, centres = Counter(), Counter(), Counter(), set()
    for i in range(len(sampler)):
        p = sampler.patch(i)
        drawn[p.category] += 1
        seen[category_at_centre(p)] += 1
        assert category_at_centre(p) == p.category, i
        if p.category == "lesion":
            lesion_cases[p.case_id] += 1
        centres.add((p.case_id, p.box[0], p.box[1]))
    assert drawn == {"lesion": 2000, "tissue": 1000, "background": 1000} == seen == sampler.composition()
    assert set(lesion_cases) == {"c0", "c1", "c2"}  # only images with lesion pixels, about equally often
    assert all(abs(n / 2000 - 1 / 3) < 0.05 for n in lesion_cases.values())
    assert len(centres) > 2500  # distinct pixels, not a few repeated ones
    assert "lesion 2000 (50.0%)" in format_composition(sampler.composition())
    custom = BalancedPatchSampler(samples, 64, {"lesion": 0.8, "tissue": 0.2}, n_per_epoch=50)
    assert custom.composition() == {"lesion": 40, "tissue": 10}


def test_class_pixel_mode_chooses_classes_uniformly():
    samples = [make_sample(f"c{i}", seed=i) for i in range(3)]
    sampler = BalancedPatchSampler(samples, patch=32, mode="class_pixel", n_per_epoch=600, seed=0)
    assert sampler.composition() == {"class_0": 300, "class_1": 300}
    for i in range(0, 600, 7):
        p = sampler.patch(i)
        assert p.target[16, 16] == int(p.category[-1])


def test_balanced_is_seeded_and_independent_of_draw_order():
    samples = [make_sample(f"c{i}", seed=i) for i in range(3)]
    a = BalancedPatchSampler(samples, patch=48, n_per_epoch=200, seed=5)
    b = BalancedPatchSampler(samples, patch=48, n_per_epoch=200, seed=5)
    forward = [a.centre(i) for i in range(200)]
    assert [b.centre(i) for i in reversed(range(200))][::-1] == forward
    np.testing.assert_array_equal(a.patch(17).image, b.patch(17).image)
    assert [a.centre(i, epoch=1) for i in range(200)] != forward
    assert [BalancedPatchSampler(samples, 48, n_per_epoch=200, seed=6).centre(i) for i in range(200)] != forward


def test_balanced_refuses_bad_fractions_and_absent_categories():
    s = [make_sample("c0")]
    with pytest.raises(ConfigError, match="fractions"):
        BalancedPatchSampler(s, fractions={"lesion": 0.5, "tissue": 0.6})
    with pytest.raises(ConfigError, match="fractions"):
        BalancedPatchSampler(s, fractions={"lesion": 0.5, "edge": 0.5})
    with pytest.raises(ConfigError, match="no training image has lesion pixels"):
        BalancedPatchSampler([make_sample("n", lesions=())])
    with pytest.raises(ConfigError, match="mode"):
        BalancedPatchSampler(s, mode="uniform")
    with pytest.raises(ConfigError, match="no training samples"):
        BalancedPatchSampler([])


# ---- lesion context -----------------------------------------------------------------------------
def test_context_crops_contain_the_whole_lesion():
    samples = [make_sample("a", 400, 300, lesions=((200, 60, 80), (60, 40, 6))), make_sample("b", lesions=((90, 20, 10),))]
    assert samples[0].lesion_boxes[0] == (0, 120, 140, 280)  # cut by the image's left edge: 140 x 160
    ctx = LesionContextSampler(samples, context=2.0, out_size=128)
    assert len(ctx) == 3 and ctx.composition() == {"lesion": 3}
    lesions = [(samples[0], 0), (samples[0], 1), (samples[1], 0)]
    for i, (s, k) in enumerate(lesions):
        p = ctx.patch(i)
        x0, y0, x1, y1 = p.box
        lx0, ly0, lx1, ly1 = s.lesion_boxes[k]
        assert p.case_id == s.case_id and x0 <= lx0 and y0 <= ly0 and lx1 <= x1 and ly1 <= y1
        assert x1 - x0 == y1 - y0 == [320, 128, 128][i]  # 2 x the long side, at least out_size
        assert p.image.shape == p.target.shape == (128, 128) and p.image.dtype == np.float32
        assert p.target.dtype == np.uint8 and set(np.unique(p.target)) == {0, 1}
        # all lesion pixels of the source crop survive the resize in proportion to the area
        source = (s.target[max(y0, 0):y1, max(x0, 0):x1] > 0).sum() / (x1 - x0) ** 2
        assert (p.target > 0).mean() == pytest.approx(source, rel=0.05)
    fixed = LesionContextSampler(samples, out_size=64, fixed_size=100)
    assert [fixed.patch(i).box[2] - fixed.patch(i).box[0] for i in range(3)] == [160, 100, 100]  # never cuts a lesion
    assert fixed.patch(0).image.shape == (64, 64)
    with pytest.raises(ConfigError, match="context"):
        LesionContextSampler(samples, context=0.5)


# ---- torch dataset ------------------------------------------------------------------------------
def test_patch_dataset_tensors_composition_and_workers_agree():
    from mammocad.augment import build_augment

    samples = [make_sample(f"c{i}", seed=i) for i in range(3)]
    sampler = BalancedPatchSampler(samples, patch=32, n_per_epoch=16, seed=2)
    ds = PatchDataset(sampler, augment=build_augment({"noise_p": 1.0, "affine_p": 1.0}), seed=9)
    image, target = ds[3]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert target.shape == (32, 32) and target.dtype == torch.int64
    assert ds.composition() == {"lesion": 8, "tissue": 4, "background": 4}
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    np.testing.assert_array_equal(ds[3][0], image)  # seeded per item ...
    assert torch.equal(torch.rand(1), before)  # ... without disturbing the caller's RNG

    def batches(workers: int):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers, shuffle=False)
        return [b for b in loader]

    single, multi = batches(0), batches(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(single, multi))
    ds.set_epoch(1)
    assert not torch.equal(batches(0)[0][0], single[0][0])


# ---- prepared datasets: the training split only -------------------------------------------------
class StubPrepared:
    """Same reading API as PreparedDataset, on in-memory arrays."""

    def __init__(self, root: Path, samples: dict[str, tuple[Case, list]], splits: dict):
        self.root, self._data, self._splits = root, samples, splits
        self.cases = [SimpleNamespace(case=c, case_id=c.case_id, patient_id=c.patient_id, label=c.label,
                                      lesion_mask_paths=[None if m is None else Path(f"{c.case_id}/{k}.png")
                                                         for k, m in enumerate(masks)],
                                      unlocated_lesions=[k for k, m in enumerate(masks) if m is None])
                      for c, masks in samples.values()]

    def by_id(self, cid):
        for pc in self.cases:
            if pc.case_id == cid:
                return pc
        raise InputError(self.root / "cases.jsonl", f"no case {cid!r}")

    def load_splits(self, path=None):
        return self._splits

    def load_image(self, pc):
        return breast_of(60, 50).astype(np.float32) * 0.5

    def load_breast_mask(self, pc):
        return breast_of(60, 50)

    def load_lesion_masks(self, pc):
        return self._data[pc.case_id][1]

    def load_union_mask(self, pc):
        return np.logical_or.reduce([m for m in self._data[pc.case_id][1] if m is not None] + [np.zeros((60, 50), bool)])


def stub_dataset(root: Path) -> StubPrepared:
    m = disc((60, 50), 30, 15, 5)
    data = {}
    for i in range(10):
        path = ["benign", "malignant", "unknown"][i % 3]
        lesions = [Lesion(pathology=path, kind="mass")] if i < 8 else []
        masks = [m] if i < 8 else []
        if i == 7:
            lesions.append(Lesion(pathology="benign"))  # listed without an outline
            masks.append(None)
        label = "unknown" if i == 9 else ("normal" if i == 8 else "benign")
        data[f"c{i}"] = (Case(f"c{i}", f"p{i // 2}", "t", "MG", f"/x/{i}.png", label=label, lesions=lesions), masks)
    splits = {"version": 1, "folds": [{"train": ["c0", "c1", "c2", "c3", "c7", "c8", "c9"], "val": ["c4", "c5"], "test": ["c6"]}]}
    return StubPrepared(root, data, splits)


def test_training_split_only_and_leaks_refused(tmp_path, caplog):
    prepared = stub_dataset(tmp_path)
    ids = split_case_ids(prepared)
    assert ids == ["c0", "c1", "c2", "c3", "c7", "c8", "c9"]
    assert split_case_ids(prepared, split="val") == ["c4", "c5"]
    assert "1 patient(s) of train also appear" in caplog.text  # p3 (c6 test, c7 train): warned, not refused
    samples = load_samples(prepared, ids, num_classes=3)
    assert [s.case_id for s in samples] == ["c0", "c1", "c2", "c3", "c8"]  # c7: unoutlined lesion, c9: unlabelled
    assert "skipped 2 of 7" in caplog.text
    assert [int(s.target.max()) for s in samples] == [1, 2, IGNORE_INDEX, 1, 0]
    assert [len(s.lesion_boxes) for s in samples] == [1, 1, 1, 1, 0]
    binary = load_samples(prepared, ids, num_classes=2, skip_unlocated=False)
    assert [int(s.target.max()) for s in binary] == [1, 1, 1, 1, 1, 0, 0]
    sampler = BalancedPatchSampler(binary, patch=16, n_per_epoch=300)
    assert {sampler.patch(i).case_id for i in range(300)} <= set(ids)

    prepared._splits["folds"][0]["test"].append("c2")
    with pytest.raises(ConfigError, match="1 case\\(s\\) in both train and test"):
        split_case_ids(prepared)
    prepared._splits["folds"][0]["test"].remove("c2")
    prepared._splits["folds"][0]["val"].append("ghost")
    with pytest.raises(InputError, match="not in the prepared dataset"):
        split_case_ids(prepared, split="val")
    with pytest.raises(ConfigError, match="fold 2 does not exist"):
        split_case_ids(prepared, fold=2)
    with pytest.raises(ConfigError, match="split"):
        split_case_ids(prepared, split="holdout")


@pytest.mark.slow
def test_real_prepared_folder_dataset(tmp_path):
    from mammocad.datasets.prepared import PreparedDataset, prepare_dataset
    from mammocad.datasets.splits import make_splits
    from mammocad.io.images import write_png
    from mammocad.preprocess.pipeline import PreprocessSpec

    raw, h, w = tmp_path / "raw", 160, 128
    rng = np.random.default_rng(0)
    breast = breast_of(h, w)
    rows = ["image,label,patient_id,pathology"]
    for i in range(8):
        write_png(raw / "images" / f"c{i}.png", np.where(breast, rng.integers(20000, 40000, (h, w)), 0).astype(np.uint16))
        lesion = np.zeros((h, w), np.uint8)
        path = ("benign", "malignant", "")[i % 3]
        if path:
            lesion[60 + i * 5:80 + i * 5, 20:40] = 255
        write_png(raw / "masks" / f"c{i}_mask.png", lesion)
        rows.append(f"c{i}.png,{path or 'normal'},P{i // 2},{path}")
    (raw / "labels.csv").write_text("\n".join(rows) + "\n")
    prepare_dataset("folder", raw, tmp_path / "prep", spec=PreprocessSpec(long_side=None), progress=False)
    split = make_splits(tmp_path / "prep", val=0.25, test=0.25, seed=0).data["folds"][0]
    prepared = PreparedDataset(tmp_path / "prep")
    ids = split_case_ids(prepared)
    assert ids == split["train"] and len(ids) == 4
    samples = load_samples(prepared, ids, num_classes=3)
    assert [s.case_id for s in samples] == ids
    by_id = {pc.case_id: pc for pc in prepared.cases}
    for s in samples:
        pc = by_id[s.case_id]
        assert s.image.dtype == np.float32 and s.image.shape == pc.size and s.breast.mean() > 0.5
        lesion_px = int((s.target > 0).sum())
        expected = {"benign": 1, "malignant": 2, "normal": 0}[pc.label]
        assert int(s.target.max()) == expected and lesion_px == (400 if expected else 0)
    sampler = BalancedPatchSampler(samples, patch=32, n_per_epoch=200, seed=0)
    drawn = {sampler.patch(i).case_id for i in range(200)}
    assert drawn <= set(split["train"]) and not drawn & set(split["val"] + split["test"])
