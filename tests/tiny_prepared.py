"""A tiny prepared dataset and training config for the training tests (built in a tmp dir).

Eight 96x80 16-bit "mammograms" (a half-ellipse breast on black, chest wall on the left) with one
bright disc lesion each, except every fourth image (normal, empty mask), go through the real
``prepare_dataset("folder", ...)`` at long side 64. The split is written by hand (6 train / 2 val,
one val image with a lesion) because ``make_splits`` needs more patients per label than 8 images give.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

TRAIN_IDS = ["img0", "img1", "img2", "img3", "img4", "img5"]
VAL_IDS = ["img6", "img7"]  # img6 has a lesion, img7 is normal


def make_tiny_prepared(root: Path) -> Path:
    from mammocad.datasets.prepared import prepare_dataset
    from mammocad.preprocess.pipeline import PreprocessSpec

    raw = root / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    rng = np.random.default_rng(0)
    h, w = 96, 80
    yy, xx = np.mgrid[:h, :w]
    breast = (xx / 70.0) ** 2 + ((yy - 48) / 44.0) ** 2 < 1
    for i in range(8):
        img = np.zeros((h, w), np.float32)
        img[breast] = 0.35 + 0.05 * rng.standard_normal(int(breast.sum()))
        cy, cx, r = rng.integers(25, 70), rng.integers(10, 45), rng.integers(6, 10)
        lesion = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r) & (i % 4 != 3)
        img[lesion] = 0.8
        cv2.imwrite(str(raw / "images" / f"img{i}.png"), (np.clip(img, 0, 1) * 65535).astype(np.uint16))
        cv2.imwrite(str(raw / "masks" / f"img{i}_mask.png"), lesion.astype(np.uint8) * 255)
    prepared = root / "prepared"
    report = prepare_dataset("folder", raw, prepared, spec=PreprocessSpec(long_side=64), workers=1, progress=False)
    assert report.n_done == 8, report.failures
    splits = {"version": 1, "seed": 0, "method": "manual", "folds": [{"train": TRAIN_IDS, "val": VAL_IDS, "test": []}]}
    (prepared / "splits.json").write_text(json.dumps(splits, indent=1) + "\n")
    return prepared


BASE_CONFIG: dict[str, Any] = {
    "data": {"prepared": "prepared", "fold": 0, "num_classes": 1},
    "model": {"name": "unet", "kwargs": {"base_channels": 4, "depth": 2}},
    "loss": {"name": "bce"},
    "sampling": {"kind": "balanced", "patch": 32, "n_per_epoch": 16, "batch_size": 4, "workers": 0},
    "augment": {"hflip_p": 0.5, "affine_p": 0.5, "degrees": 20, "brightness_p": 0, "contrast_p": 0, "blur_p": 0,
                "sharpen_p": 0, "noise_p": 0},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-3,
              "schedule": {"kind": "step", "every": 1, "gamma": 0.5}},
    "train": {"epochs": 2, "patience": 5, "amp": "none", "threads": 1, "seed": 3, "final_n_boot": 20},
    "inference": {"tile": 32, "overlap": 0.25, "batch_size": 4},
    "bundle": {"name": "tiny-unet", "description": "test model"},
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        deep = isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs"  # kwargs are replaced whole
        out[k] = merge(out[k], v) if deep else v
    return out


def write_config(folder: Path, name: str = "tiny.yaml", **sections: Any) -> Path:
    """BASE_CONFIG with ``sections`` merged in, written next to ``folder/prepared``."""
    path = folder / name
    path.write_text(yaml.safe_dump(merge(BASE_CONFIG, sections), sort_keys=False))
    return path
