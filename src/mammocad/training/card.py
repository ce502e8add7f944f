"""The model card written into a bundle's ``model.json`` at the end of training.

It says what the weights are and do (the task; architecture and weights' SHA-256 come from
``save_bundle``, which validates the card as ``models.card.ModelCard``), how to feed them
(preprocessing spec, classes, thresholds, tiling), what they were trained on (prepared dataset,
adapter, fold, cases and patients per split, the splits file's SHA-256), how (the config, epochs,
stages, device, time) and how well they did on the validation split (``evaluate_segmentation``
headline metrics with patient-bootstrap CIs).
"""

from __future__ import annotations

import datetime
import platform
from pathlib import Path
from typing import Any

import torch

from mammocad.io.discover import file_sha256
from mammocad.training.config import TrainConfig


def training_data(cfg: TrainConfig, prepared: Any) -> dict[str, Any]:
    """Where the training data came from and how it was split (counts read from the splits file)."""
    from mammocad.datasets.prepared import SPLITS_FILE

    splits_path = Path(cfg.data.splits) if cfg.data.splits is not None else prepared.root / SPLITS_FILE
    data = prepared.load_splits(cfg.data.splits)
    fold = data["folds"][cfg.data.fold]
    known = {pc.case_id: pc for pc in prepared.cases}
    counts = {}
    for name in ("train", "val", "test"):
        cases = [known[c] for c in fold[name] if c in known]
        counts[name] = {"cases": len(cases), "patients": len({pc.patient_id for pc in cases}),
                        "lesion_cases": sum(1 for pc in cases if pc.case.lesions)}
    record = prepared.spec_record
    return {
        "prepared": str(Path(prepared.root).resolve()),
        "adapter": record.get("adapter"),
        "adapter_options": record.get("adapter_options", {}),
        "datasets": sorted({pc.case.dataset for pc in prepared.cases}),
        "fold": cfg.data.fold,
        "n_folds": len(data["folds"]),
        "splits_file": str(splits_path.resolve()),
        "splits_sha256": file_sha256(splits_path),
        "split_method": data.get("method"),
        "split_seed": data.get("seed"),
        "splits": counts,
        "label_classes": cfg.class_names,
        "unknown_pathology_label": None if cfg.task == "classify" else cfg.data.unknown,
    }


def validation_summary(report: Any) -> dict[str, Any] | None:
    """The card's validation section: the report without its per-image rows."""
    if report is None:
        return None
    d = report.to_dict()
    d.pop("per_image", None)
    d.pop("rules", None)  # long text; the full report (with the rules) is in the run folder
    return d


def inference_autocast(cfg: TrainConfig) -> str:
    """The card's ``tiling.autocast``: a model trained in fp32 (``amp: none``) or fp16 (CUDA) was
    validated in fp32, so it predicts in fp32; bf16 / auto training validated under bf16 where available."""
    return "fp32" if cfg.train.amp in ("none", "fp16") else "auto"


def output_kind(cfg: TrainConfig) -> str:
    """What the model's outputs are: detection instances, or sigmoid / softmax scores."""
    if cfg.task == "detect":
        return "instances"
    return "softmax" if cfg.task == "classify" or cfg.data.num_classes > 1 else "sigmoid"


def classify_section(cfg: TrainConfig) -> dict[str, Any] | None:
    """A classifier's input settings (``models.card.ClassifySettings``): what inference needs to make
    its patches as training did; the training-only keys (balance) stay in the card's config."""
    from mammocad.models.card import ClassifySettings

    if cfg.task != "classify":
        return None
    return cfg.classify.model_dump(mode="json", include=set(ClassifySettings.model_fields))


def build_card(cfg: TrainConfig, prepared: Any, *, report: Any, training: dict[str, Any]) -> dict[str, Any]:
    from mammocad import __version__

    b = cfg.bundle
    card = {
        "name": b.name,
        "version": b.version,
        "description": b.description,
        "reproduces": b.reproduces,
        "intended_use": b.intended_use,
        "limitations": list(b.limitations),
        "task": cfg.task,
        "modality": prepared.spec.modality,
        "class_names": cfg.class_names,
        "output": output_kind(cfg),
        "preprocessing": prepared.spec.model_dump(mode="json"),
        "thresholds": {"probability": cfg.inference.threshold, "min_area": cfg.inference.min_area,
                       "max_lesions": cfg.inference.max_lesions},
        "tiling": {"tile": cfg.inference.tile, "overlap": cfg.inference.overlap, "mode": cfg.inference.mode,
                   "batch_size": cfg.inference.batch_size, "tta": list(cfg.inference.tta),
                   "autocast": inference_autocast(cfg)},
        "training_data": training_data(cfg, prepared),
        "training": training,
        "validation": validation_summary(report),
        "config": cfg.to_json(),
        "software": {"mammocad": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if cfg.task == "classify":
        card["classify"] = classify_section(cfg)
    return card
