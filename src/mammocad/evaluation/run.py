"""``mammocad evaluate``: score a segmentation bundle, or the output folder of ``mammocad predict``,
on one split of a prepared dataset, and write ``metrics.json`` + ``metrics.md``.

Evaluation scores ``Prediction`` records only, and both routes make the same ones:

* ``--model``: the bundle predicts each case's ORIGINAL image, read as ``mammocad predict`` reads it
  (``Predictor.predict_image``): the Prediction ``predict`` would write, masks in memory;
* ``--predictions``: the JSONs ``mammocad predict`` wrote, matched to the cases by the SHA-256 of the
  image file they were made from (not by name: two images may share the last parts of their paths).

Each Prediction is then scored by ONE function (``score_prediction``): its lesions and candidates are
mapped forward onto the PREPARED grid with the case's Geometry, where the ground truth lives. The
lesions (the bundle's threshold, minimum area and max lesions) make the segmentation and the
detection operating point; the candidates (every component at a low probability threshold, each
with its score) make the FROC curve, so that it spans the whole range of scores instead of being a
plateau at the bundle's threshold.

Ground truth is the same for both routes: the label map training uses (``datasets.targets.build_target``)
with the unknown-pathology rule given to ``evaluate_prepared`` (one default, written into the
report). Cases with lesions whose outline is unknown (``PreparedCase.unlocated_lesions``) are left
out: their true foreground is unknown. Lesions preprocessing lost (``PreparedCase.lost_lesions``:
cropped away, empty annotation) are not scored and are counted with their reasons.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np

from mammocad.errors import ConfigError, InputError
from mammocad.evaluation.bootstrap import DEFAULT_N_BOOT, DEFAULT_SEED
from mammocad.evaluation.lesion_detection import HitRule
from mammocad.evaluation.predictions import ContentHashes, PredictionsFolder, is_predictions_folder
from mammocad.evaluation.segmentation import EvalItem, SegmentationReport, evaluate_segmentation
from mammocad.inference.postprocess import lesions_to_prepared
from mammocad.records import LesionComponent, Prediction
from mammocad.tasks.segment_lesions import DEFAULT_CANDIDATE_THRESHOLD, lesion_label_map

SPLITS = ("train", "val", "test", "all")
SOURCE_KINDS = ("auto", "model", "predictions")  # what ``source`` is: the CLI says it (--model | --predictions)


# ---- one scoring path ---------------------------------------------------------------------------
class PreparedPrediction(NamedTuple):
    """A Prediction mapped onto a case's prepared grid."""

    label_map: np.ndarray  # uint8 over the class names: the lesions painted with their classes
    lesions: list[LesionComponent]  # the model's output: the operating point
    candidates: list[LesionComponent]  # what the FROC curve is drawn from


def score_prediction(prediction: Prediction, pc: Any, class_names: list[str], use_candidates: bool = True,
                     source: str | Path | None = None) -> PreparedPrediction:
    """Map ``prediction`` (original grid; every lesion and candidate with its ``mask``) onto ``pc``'s
    prepared grid. Without ``use_candidates`` the lesions stand in for the candidates (predictions
    written before candidates existed: the curve then stops at the model's threshold)."""
    where = source or prediction.image_path
    if tuple(prediction.image_size) != tuple(pc.geometry.source_size):
        raise InputError(where, f"image size {list(prediction.image_size)} differs from the prepared case's "
                                f"original size {list(pc.geometry.source_size)}")
    try:
        lesions = lesions_to_prepared(prediction.lesions, pc.geometry)
        candidates = lesions_to_prepared(prediction.candidates, pc.geometry) if use_candidates else lesions
    except InputError as err:
        raise InputError(where, err.cause) from None
    return PreparedPrediction(lesion_label_map(lesions, pc.size, class_names), lesions, candidates)


def detection_settings(attributes: dict[str, Any], use_candidates: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the curve's components are, the model's operating post-processing) as the Prediction
    records state them: written into the report beside the curve and the operating point."""
    operating = {"probability_threshold": attributes.get("threshold"),
                 "min_area_prepared_pixels": attributes.get("min_area_prepared_pixels"),
                 # None: no cap; predictions written before the cap was recorded do not say
                 "max_lesions": attributes.get("max_lesions", "not recorded")}
    if not use_candidates:
        return {"source": "lesions", "probability_threshold": attributes.get("threshold"),
                "min_area_prepared_pixels": attributes.get("min_area_prepared_pixels")}, operating
    search = attributes.get("candidate_search") or {}
    return {"source": "candidates", "probability_threshold": search.get("probability_threshold"),
            "min_area_prepared_pixels": search.get("min_area_prepared_pixels"),
            "max_candidates_per_image": search.get("max_candidates")}, operating


# ---- the run -------------------------------------------------------------------------------------
def _case_ids(ds: Any, split: str, fold: int, splits_path: str | Path | None) -> list[str]:
    if split == "all":
        return [pc.case_id for pc in ds.cases]
    from mammocad.datasets.targets import split_case_ids

    return split_case_ids(ds, fold=fold, split=split, splits_path=splits_path)


def _resolve_unknown(unknown_pathology: str | None, n_classes: int) -> str:
    from mammocad.datasets.targets import DEFAULT_UNKNOWN, UNKNOWN_CHOICES

    rule = DEFAULT_UNKNOWN[n_classes] if unknown_pathology is None else str(unknown_pathology)
    if rule not in UNKNOWN_CHOICES[n_classes]:
        raise ConfigError("--unknown-pathology", f"{rule!r} is not a choice for {n_classes} classes: "
                                                 f"{', '.join(UNKNOWN_CHOICES[n_classes])}")
    return rule


def evaluate_prepared(source: Any, prepared_dir: str | Path, split: str = "val", fold: int = 0,
                      out_dir: str | Path | None = None, *, splits_path: str | Path | None = None,
                      device: str = "auto", batch_size: int | None = None, autocast: str = "auto",
                      n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED, progress: bool = True,
                      candidate_threshold: float | None = None,
                      unknown_pathology: str | None = None, source_kind: str = "auto",
                      hit: str | None = None) -> SegmentationReport:
    """Score ``source`` on ``split`` (train | val | test of ``fold`` in the splits file, or all cases).

    ``source``: a bundle name or folder, a loaded ``(model, card)``, a ``Predictor``, or a
    ``mammocad predict`` output folder. Writes ``metrics.json`` / ``metrics.md`` to ``out_dir`` when
    given (checked and claimed before any work). ``candidate_threshold``: the lesion probability the
    candidates of the FROC curve are cut at (default ``DEFAULT_CANDIDATE_THRESHOLD``; a predictions
    folder has its own, recorded by ``predict``). ``unknown_pathology``: the ground-truth value of
    lesions of unknown pathology (``datasets.targets.UNKNOWN_CHOICES``; default
    ``DEFAULT_UNKNOWN``: 'lesion' for 2 classes, 'ignore' for 3), the same for both routes.
    ``source_kind``: "model" or "predictions" says what a path ``source`` is (the command line always
    says); "auto" tells a predictions folder by its summary.json or output marker. ``hit``: the
    detection hit rule (``lesion_detection.HitRule``: iou0.1+centroid by default, iou0.1, iou0.5,
    centroid), written into the report.
    """
    from mammocad.io.outdir import claim_output_dir

    # arguments first: a typo must not leave an output folder behind
    if split not in SPLITS:
        raise ConfigError("--split", f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    if source_kind not in SOURCE_KINDS:
        raise ConfigError("source_kind", f"must be one of {', '.join(SOURCE_KINDS)}, got {source_kind!r}")
    if candidate_threshold is not None and not 0.0 < float(candidate_threshold) <= 1.0:
        raise ConfigError("--candidate-threshold", f"must be a lesion probability in (0, 1], got {candidate_threshold}")
    hit_rule = HitRule.parse(hit)
    classifier = _classifier_card(source, source_kind)
    with contextlib.ExitStack() as stack:
        if out_dir is not None:  # a bad --out fails here, before a model is loaded or an image read
            stack.enter_context(claim_output_dir(out_dir, "evaluate"))
        if classifier is not None:
            return _evaluate_classifier(source, classifier, prepared_dir, split, fold, splits_path=splits_path,
                                        device=device, autocast=autocast, n_boot=n_boot, seed=seed, out_dir=out_dir)
        report = _evaluate(source, prepared_dir, split, fold, splits_path=splits_path, device=device,
                           batch_size=batch_size, autocast=autocast, n_boot=n_boot, seed=seed, progress=progress,
                           candidate_threshold=candidate_threshold, unknown_pathology=unknown_pathology,
                           source_kind=source_kind, hit=hit_rule)
        if out_dir is not None:
            from mammocad.evaluation.report import write_report

            write_report(report, out_dir)
    return report


def _classifier_card(source: Any, source_kind: str) -> Any:
    """The card of ``source`` when it is a classifier bundle (task classify), else None."""
    from mammocad.models.bundle import read_card, resolve_bundle

    if source_kind == "predictions" or not isinstance(source, (str, Path)) or is_predictions_folder(source):
        return None
    try:
        card = read_card(resolve_bundle(source))
    except InputError:
        return None  # not a bundle: the lesion path says what is wrong with it
    return card if card.task == "classify" else None


def _evaluate_classifier(bundle: str | Path, card: Any, prepared_dir: str | Path, split: str, fold: int, *,
                         splits_path: str | Path | None, device: str, autocast: str, n_boot: int, seed: int,
                         out_dir: str | Path | None) -> Any:
    """A classifier scored on its items of a prepared split (lesion patches or whole images, cut from
    the PREPARED images as in training), with ``evaluation.classification``'s report, ROC and
    reliability curves."""
    from mammocad.datasets.prepared import PreparedDataset
    from mammocad.devices import resolve_device
    from mammocad.evaluation.classification import reliability_png, roc_png
    from mammocad.evaluation.report import RELIABILITY_PNG, ROC_PNG
    from mammocad.io.atomic import atomic_write_bytes
    from mammocad.models.bundle import load_bundle
    from mammocad.tasks import classify

    ds = PreparedDataset(prepared_dir)
    case_ids = _case_ids(ds, split, fold, splits_path)
    torch_device = resolve_device(device)
    model, card = load_bundle(bundle, device=torch_device, card=card)
    chosen = card.tiling.autocast if autocast == "auto" else autocast  # a card trained in fp32 says fp32
    report = classify.evaluate_split(model, card, ds, case_ids, split=split, n_boot=n_boot, seed=seed,
                                     autocast=chosen, device=torch_device)
    report.notes.append(f"evaluated: bundle {card.name} {card.version} on {ds.root} split {split}"
                        + ("" if split == "all" else f" fold {fold}") + "; inputs cut from the prepared images")
    if out_dir is not None:
        classify.write_classification_report(report, Path(out_dir))
        atomic_write_bytes(Path(out_dir) / ROC_PNG, roc_png(report))
        atomic_write_bytes(Path(out_dir) / RELIABILITY_PNG, reliability_png(report))
    return report


def _evaluate(source: Any, prepared_dir: str | Path, split: str, fold: int, *, splits_path: str | Path | None,
              device: str, batch_size: int | None, autocast: str, n_boot: int, seed: int, progress: bool,
              candidate_threshold: float | None, unknown_pathology: str | None,
              source_kind: str, hit: HitRule) -> SegmentationReport:
    from rich.console import Console

    from mammocad.console import progress_bar
    from mammocad.datasets.prepared import PreparedDataset
    from mammocad.datasets.targets import build_target
    from mammocad.inference.predictor import Predictor
    from mammocad.io.images import read_image

    ds = PreparedDataset(prepared_dir)  # the arguments were checked by evaluate_prepared
    as_folder = isinstance(source, (str, Path)) and (source_kind == "predictions" or
                                                     (source_kind == "auto" and is_predictions_folder(source)))
    if source_kind == "model" and isinstance(source, (str, Path)) and is_predictions_folder(source):
        raise InputError(source, "is the output folder of `mammocad predict`, not a model bundle: use --predictions")
    if as_folder and not Path(source).is_dir():
        raise InputError(source, "no such folder (expected the output folder of `mammocad predict`)")
    if as_folder and (Path(source) / "model.json").is_file():
        raise InputError(source, "is a model bundle, not the output folder of `mammocad predict`: use --model")
    case_ids = _case_ids(ds, split, fold, splits_path)
    notes = []
    if as_folder:
        folder, predictor = PredictionsFolder(source), None
        class_names = folder.class_names
        described = f"predictions in {folder.root} ({', '.join(folder.models)})"
        use_candidates = folder.use_candidates
        if candidate_threshold is not None and folder.use_candidates and candidate_threshold != folder.candidate_threshold:
            raise ConfigError("--candidate-threshold", f"the predictions in {folder.root} hold candidates at lesion "
                                                       f"probability >= {folder.candidate_threshold:g}, not "
                                                       f"{candidate_threshold:g}: predict again, or evaluate with --model")
    else:
        predictor = source if isinstance(source, Predictor) else Predictor(source, device=device, batch_size=batch_size,
                                                                            autocast=autocast)
        folder, class_names = None, list(predictor.settings.class_names)
        described = f"bundle {predictor.name} {predictor.version}"
        use_candidates = True
        candidate_threshold = DEFAULT_CANDIDATE_THRESHOLD if candidate_threshold is None else float(candidate_threshold)
    if len(class_names) not in (2, 3):
        raise ConfigError(described, f"segmentation evaluation needs 2 or 3 classes, got {class_names}")
    unknown = _resolve_unknown(unknown_pathology, len(class_names))

    cases = [ds.by_id(c) for c in case_ids]
    unlocated = [pc.case_id for pc in cases if pc.unlocated_lesions or (not pc.case.lesions and pc.label == "unknown")]
    if unlocated:
        notes.append(f"{len(unlocated)} case(s) left out: their lesions are not all outlined, so the true "
                     f"foreground is unknown (e.g. {unlocated[0]})")
    left_out = set(unlocated)
    cases = [pc for pc in cases if pc.case_id not in left_out]
    if not cases:
        raise InputError(ds.root, f"no case to evaluate in split {split!r} (fold {fold})")
    lost: dict[str, int] = {}
    for pc in cases:
        for why in pc.lost_lesions.values():
            lost[why] = lost.get(why, 0) + 1
    notes.append(f"evaluated: {described} on {ds.root} split {split}" + ("" if split == "all" else f" fold {fold}") +
                 f", {len(cases)} case(s), scored on the prepared grid")
    if predictor is not None:
        notes.append("the bundle predicted each case's ORIGINAL image as `mammocad predict` does (its own "
                     "preprocessing); lesions and candidates were mapped onto the prepared grid with the case's geometry")
        if predictor.settings.spec != ds.spec:
            notes.append(f"the bundle's preprocessing ({predictor.settings.spec.model_dump(mode='json')}) differs from "
                         f"the prepared dataset's ({ds.spec.model_dump(mode='json')}); the ground truth is the dataset's")
    elif not use_candidates:
        notes.append(f"{folder.n_without_candidates} prediction(s) hold no candidates (written before `mammocad predict` "
                     "recorded them): the FROC curve is drawn from the model's lesions and STOPS AT THE MODEL'S "
                     "THRESHOLD; predict again for the whole curve")
        if candidate_threshold is not None:
            notes.append(f"--candidate-threshold {candidate_threshold:g} cannot apply: these predictions hold no candidates")

    console = Console(stderr=True)
    hashes = ContentHashes()
    seen: dict[str, Any] = {"attributes": None, "highest_score_dropped": None}

    def predictions() -> Iterator[tuple[Any, Prediction, str]]:
        for pc in cases:
            if folder is not None:
                json_path, record = folder.match(pc, hashes)
                yield pc, folder.prediction(json_path, record), str(json_path)
            else:
                image = read_image(pc.case.image_path, voi=predictor.voi)
                result = predictor.predict_image(image, candidate_threshold=candidate_threshold)
                yield pc, result.prediction, str(pc.case.image_path)

    def items(bar: Any, task: Any) -> Iterator[EvalItem]:
        for pc, prediction, where in predictions():
            if seen["attributes"] is None:
                seen["attributes"] = prediction.attributes
            dropped = (prediction.attributes.get("candidate_search") or {}).get("highest_score_dropped")
            if use_candidates and dropped is not None:
                seen["highest_score_dropped"] = max(dropped, seen["highest_score_dropped"] or dropped)
            scored = score_prediction(prediction, pc, class_names, use_candidates, where)
            lesion_masks = ds.load_lesion_masks(pc)
            gt = build_target(pc.size, ds.load_union_mask(pc), lesion_masks, [les.pathology for les in pc.case.lesions],
                              len(class_names), unknown)
            bar.advance(task)
            yield EvalItem(case_id=pc.case_id, patient_id=pc.patient_id, gt=gt, pred=scored.label_map,
                           image_label=pc.label, breast_mask=ds.load_breast_mask(pc), lesion_masks=lesion_masks,
                           components=scored.candidates, operating_components=scored.lesions,
                           # predictions made before the task was recorded were all segmentation
                           coco_components=scored.lesions if prediction.attributes.get("task", "segment") == "segment"
                           else None,
                           lost_lesions=dict(pc.lost_lesions))

    with progress_bar(console, progress, remaining=False) as bar:
        task = bar.add_task(f"evaluate {split}", total=len(cases))
        report = evaluate_segmentation(items(bar, task), class_names, n_boot=n_boot, seed=seed, hit=hit, coco_ap=True)
    if folder is not None and folder.matched_by_path:
        notes.append(f"{len(folder.matched_by_path)} case(s) matched to their prediction by resolved path (and size) "
                     "only: the image could not be read here, or the prediction records no input hash "
                     f"(e.g. {folder.matched_by_path[0]})")
    _describe_detection(report, seen, use_candidates, notes)
    report.ground_truth = {
        "label_map": "datasets.targets.build_target on the prepared grid (the training target)",
        "unknown_pathology": unknown, "n_cases_left_out_unlocated": len(unlocated),
        "cases_left_out_unlocated": unlocated, "n_lesions_lost_in_preprocessing": sum(lost.values()),
        "lost_in_preprocessing": dict(sorted(lost.items())),
    }
    report.notes.extend(notes)
    return report


def _describe_detection(report: SegmentationReport, seen: dict[str, Any], use_candidates: bool, notes: list[str]) -> None:
    """Add to the detection report what its components were, as the Prediction records state it."""
    det = report.detection
    if det is None or seen["attributes"] is None:
        return
    scored, operating = detection_settings(seen["attributes"], use_candidates)
    if use_candidates:
        scored["highest_score_dropped_by_cap"] = seen["highest_score_dropped"]
        if seen["highest_score_dropped"] is not None:
            notes.append(f"the candidate cap dropped components scoring up to {seen['highest_score_dropped']:.4g}: "
                         "the curve is complete only for score thresholds above that")
    det.components_scored = {**scored, **det.components_scored}
    if det.model_operating_point is not None:
        det.model_operating_point = {**operating, **det.model_operating_point}


def print_headline(report: Any, console: Any = None) -> None:
    """The headline numbers as a small table (the full report is in metrics.md)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not isinstance(report, SegmentationReport):  # a classifier's ClassificationReport
        t = Table(title=f"classification: {report.n_images} items, {report.n_patients} patients")
        for col in ("metric", "value", "95% CI"):
            t.add_column(col)
        for key, m in report.headline.items():
            ci = "-" if m.ci is None or not np.isfinite(m.ci.low) else f"[{m.ci.low:.4f}, {m.ci.high:.4f}]"
            t.add_row(key, "n/a" if not np.isfinite(m.value) else f"{m.value:.4f}", ci)
        console.print(t)
        return
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
        op = report.detection.model_operating_point
        if op is not None and op.get("sensitivity") is not None:
            t.add_row("model operating point", f"sens {op['sensitivity']:.4f} at {op['fp_per_image']:.3g} FP/image",
                      "-", str(op["n_lesions"]))
    console.print(t)
