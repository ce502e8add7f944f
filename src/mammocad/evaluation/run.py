"""``mammocad evaluate``: score a segmentation bundle, or the output folder of ``mammocad predict``,
on one split of a prepared dataset, and write ``metrics.json`` + ``metrics.md``.

Everything is scored on the PREPARED grid, where the ground truth lives:

* a bundle is run on the prepared images themselves (tiled, breast-aware, with its threshold and
  minimum area: the same post-processing ``mammocad predict`` applies), so nothing goes back to
  the originals;
* a predictions folder holds masks on the ORIGINAL grid: each lesion mask is mapped forward with
  the case's Geometry (the prepared dataset recorded it) and matched to its case by image path.

Ground truth is the label map training uses (``datasets.targets.build_target``); cases whose lesions are
not all outlined are left out (their true foreground is unknown) and counted in the notes.
Detection (FROC, sensitivity at 1 FP/image) scores the predicted lesions against each lesion mask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mammocad.errors import ConfigError, InputError
from mammocad.evaluation.bootstrap import DEFAULT_N_BOOT, DEFAULT_SEED
from mammocad.evaluation.lesion_detection import Component
from mammocad.evaluation.segmentation import EvalItem, SegmentationReport, evaluate_segmentation

SPLITS = ("train", "val", "test", "all")


def is_predictions_folder(path: str | Path) -> bool:
    """A ``mammocad predict`` output folder (its summary.json), as opposed to a model bundle."""
    from mammocad.inference.predict_run import SUMMARY_FILE

    p = Path(path)
    return p.is_dir() and (p / SUMMARY_FILE).is_file() and not (p / "model.json").is_file()


def _path_keys(path: str | Path) -> list[str]:
    """Keys that identify an image file: its resolved path, then its last three components (a prepared
    dataset may have recorded the path relative to another working folder)."""
    p = Path(path)
    return [str(p.resolve()), "/".join(p.parts[-3:])]


class PredictionsFolder:
    """The per-image JSONs of a ``mammocad predict`` output, indexed by input image path."""

    def __init__(self, root: str | Path):
        from mammocad.inference.predict_run import SUMMARY_FILE

        self.root = Path(root)
        self.by_key: dict[str, tuple[Path, dict[str, Any]]] = {}
        for path in sorted(self.root.glob("*.json")):
            if path.name == SUMMARY_FILE:
                continue
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise InputError(path, f"unreadable prediction ({exc})") from None
            if not isinstance(record, dict) or "input" not in record or "lesions" not in record:
                continue  # not one of ours
            for key in _path_keys(record["input"]):
                self.by_key.setdefault(key, (path, record))
        if not self.by_key:
            raise InputError(self.root, "no prediction JSON files (expected the output folder of `mammocad predict`)")
        names = {tuple((r.get("attributes") or {}).get("class_names") or ("background", "lesion")) for _, r in self.by_key.values()}
        if len(names) != 1:
            raise InputError(self.root, f"predictions made with different class sets {sorted(names)}: evaluate them separately")
        self.class_names = list(names.pop())
        self.models = sorted({f"{r.get('model_name')} {r.get('model_version')}" for _, r in self.by_key.values()})

    def find(self, image_path: str) -> tuple[Path, dict[str, Any]] | None:
        for key in _path_keys(image_path):
            if key in self.by_key:
                return self.by_key[key]
        return None

    def prepared_prediction(self, pc: Any, class_names: list[str]) -> tuple[np.ndarray, list[Component]]:
        """Label map and components of one case on its prepared grid (masks mapped forward)."""
        from mammocad.io.images import read_plain_image

        found = self.find(pc.case.image_path)
        if found is None:
            raise InputError(self.root, f"no prediction for case {pc.case_id} ({pc.case.image_path})")
        json_path, record = found
        if tuple(record.get("image_size") or ()) != tuple(pc.geometry.source_size):
            raise InputError(json_path, f"image size {record.get('image_size')} differs from the prepared case's "
                                        f"original size {list(pc.geometry.source_size)}")
        pred = np.zeros(pc.size, dtype=np.uint8)
        components = []
        for lesion in record["lesions"]:
            mask_path = self.root / str(lesion.get("mask") or lesion.get("mask_path"))
            original = read_plain_image(mask_path).pixels > 0
            if original.shape != tuple(pc.geometry.source_size):
                raise InputError(mask_path, f"mask is {original.shape[1]}x{original.shape[0]}, the image "
                                            f"{pc.geometry.source_size[1]}x{pc.geometry.source_size[0]}")
            mask = pc.geometry.forward_array(original, kind="mask").astype(bool)
            if not mask.any():
                continue  # the lesion lies outside the prepared crop
            label = lesion.get("label")
            pred[mask] = class_names.index(label) if label in class_names else 1
            components.append(Component.from_mask(mask, float(lesion["score"])))
        return pred, components


def _bundle_prediction(predictor: Any, pixels: np.ndarray, breast: np.ndarray,
                       class_names: list[str]) -> tuple[np.ndarray, list[Component]]:
    probs = predictor.probabilities(pixels, breast)
    pred = np.zeros(pixels.shape, dtype=np.uint8)
    components = []
    for comp in predictor.lesions(probs, breast):
        value = class_names.index(comp.label) if comp.label in class_names else 1
        comp.mask.paste_into(pred, value)
        components.append(Component(comp.mask.mask, float(comp.score), tuple(int(v) for v in comp.box)))
    return pred, components


def split_case_ids(ds: Any, split: str, fold: int, splits_path: str | Path | None) -> list[str]:
    if split == "all":
        return [pc.case_id for pc in ds.cases]
    from mammocad.datasets.targets import split_case_ids

    return split_case_ids(ds, fold=fold, split=split, splits_path=splits_path)


def evaluate_prepared(source: Any, prepared_dir: str | Path, split: str = "val", fold: int = 0,
                      out_dir: str | Path | None = None, *, splits_path: str | Path | None = None,
                      device: str = "auto", batch_size: int | None = None, autocast: str = "auto",
                      n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED, progress: bool = True) -> SegmentationReport:
    """Score ``source`` on ``split`` (train | val | test of ``fold`` in the splits file, or all cases).

    ``source``: a bundle name or folder, a loaded ``(model, card)``, a ``Predictor``, or a
    ``mammocad predict`` output folder. Writes ``metrics.json`` / ``metrics.md`` to ``out_dir`` when given.
    """
    from rich.console import Console
    from mammocad.console import progress_bar

    from mammocad.datasets.prepared import PreparedDataset
    from mammocad.evaluation.report import write_report
    from mammocad.inference.predictor import Predictor
    from mammocad.datasets.targets import build_target

    if split not in SPLITS:
        raise ConfigError("--split", f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    ds = PreparedDataset(prepared_dir)
    case_ids = split_case_ids(ds, split, fold, splits_path)
    notes = []
    if isinstance(source, (str, Path)) and is_predictions_folder(source):
        folder, predictor = PredictionsFolder(source), None
        class_names = folder.class_names
        described = f"predictions in {folder.root} ({', '.join(folder.models)})"
    else:
        predictor = source if isinstance(source, Predictor) else Predictor(source, device=device, batch_size=batch_size,
                                                                            autocast=autocast)
        folder, class_names = None, list(predictor.settings.class_names)
        described = f"bundle {predictor.name} {predictor.version}"
        if predictor.settings.spec != ds.spec:
            notes.append(f"the bundle's preprocessing ({predictor.settings.spec.model_dump(mode='json')}) differs from "
                         f"the prepared dataset's ({ds.spec.model_dump(mode='json')}); scored on the dataset's images")
    if len(class_names) not in (2, 3):
        raise ConfigError(described, f"segmentation evaluation needs 2 or 3 classes, got {class_names}")
    unknown = None
    if predictor is not None:
        unknown = ((predictor.card.get("training_data") or {}).get("unknown_pathology_label"))

    cases = [ds.by_id(c) for c in case_ids]
    unlocated = [pc.case_id for pc in cases
                 if any(p is None for p in pc.lesion_mask_paths) or (not pc.case.lesions and pc.label == "unknown")]
    if unlocated:
        notes.append(f"{len(unlocated)} case(s) left out: their lesions are not all outlined, so the true "
                     f"foreground is unknown (e.g. {unlocated[0]})")
    left_out = set(unlocated)
    cases = [pc for pc in cases if pc.case_id not in left_out]
    if not cases:
        raise InputError(ds.root, f"no case to evaluate in split {split!r} (fold {fold})")
    notes.append(f"evaluated: {described} on {ds.root} split {split}" + ("" if split == "all" else f" fold {fold}") +
                 f", {len(cases)} case(s), on the prepared grid")
    if predictor is not None:
        s = predictor.settings
        notes.append(f"prediction = lesion probability >= {s.threshold:g}, components of >= {s.min_area} pixels inside "
                     "the breast (the bundle's post-processing, as `mammocad predict`)")

    console = Console(stderr=True)

    def items(bar: Any, task: Any) -> Iterator[EvalItem]:
        for pc in cases:
            breast = ds.load_breast_mask(pc)
            lesion_masks = ds.load_lesion_masks(pc)
            gt = build_target(pc.size, ds.load_union_mask(pc), lesion_masks, [les.pathology for les in pc.case.lesions],
                              len(class_names), unknown)
            if folder is not None:
                pred, components = folder.prepared_prediction(pc, class_names)
            else:
                pred, components = _bundle_prediction(predictor, ds.load_image(pc), breast, class_names)
            bar.advance(task)
            yield EvalItem(case_id=pc.case_id, patient_id=pc.patient_id, gt=gt, pred=pred, image_label=pc.label,
                           breast_mask=breast, lesion_masks=lesion_masks, components=components)

    with progress_bar(console, progress, remaining=False) as bar:
        task = bar.add_task(f"evaluate {split}", total=len(cases))
        report = evaluate_segmentation(items(bar, task), class_names, n_boot=n_boot, seed=seed)
    report.notes.extend(notes)
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def print_headline(report: SegmentationReport, console: Any = None) -> None:
    """The headline numbers as a small table (the full report is in metrics.md)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"segmentation: {report.n_images} images, {report.n_patients} patients")
    for col in ("metric", "value", "95% CI", "n"):
        t.add_column(col)
    for key in ("dice_lesion_images_mean", "iou_lesion_images_mean", "dice_all_images_mean", "mean_iou"):
        m = report.headline[key]
        ci = "-" if m.ci is None or not np.isfinite(m.ci.low) else f"[{m.ci.low:.4f}, {m.ci.high:.4f}]"
        t.add_row(key, "n/a" if not np.isfinite(m.value) else f"{m.value:.4f}", ci, str(m.n))
    if report.detection is not None:
        d = report.detection.sensitivity_at_1fp
        t.add_row("sensitivity_at_1fp", "n/a" if not np.isfinite(d.value) else f"{d.value:.4f}", "-", str(d.n))
    console.print(t)
