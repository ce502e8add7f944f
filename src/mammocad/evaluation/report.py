"""Write an evaluation report as ``metrics.json`` (everything, machine-readable), ``metrics.md``
(the headline numbers with CIs, the counts, and the rules that define them) and, when it scores
detection, ``froc.png`` (the FROC curve with the model's operating point marked) and ``pr.png`` (the
lesion-level precision-recall curve of the same decisions)."""

from __future__ import annotations

from pathlib import Path

from mammocad.evaluation.lesion_detection import DetectionReport
from mammocad.evaluation.segmentation import SegmentationReport
from mammocad.evaluation.formatting import ci_text, figure_png, fmt, md_table, new_figure
from mammocad.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

JSON_NAME, MARKDOWN_NAME, FROC_PNG, PR_PNG = "metrics.json", "metrics.md", "froc.png", "pr.png"
ROC_PNG, RELIABILITY_PNG = "roc.png", "reliability.png"  # a classifier's (evaluation.run)

_HEADLINE_NAMES = {
    "dice_lesion_images_mean": "Dice, lesion images, mean",
    "dice_lesion_images_max": "Dice, lesion images, max",
    "iou_lesion_images_mean": "IoU, lesion images, mean",
    "iou_lesion_images_max": "IoU, lesion images, max",
    "dice_all_images_mean": "Dice, all images (FP images = 0), mean",
    "dice_all_images_max": "Dice, all images (FP images = 0), max",
    "iou_all_images_mean": "IoU, all images (FP images = 0), mean",
    "iou_all_images_max": "IoU, all images (FP images = 0), max",
    "mean_iou": "Mean IoU over classes (dataset confusion matrix)",
    "pixel_accuracy": "Pixel accuracy",
    "mean_class_accuracy": "Mean per-class accuracy",
}








def _value(x: object, none: str = "not recorded") -> str:
    return none if x is None else (f"{x:g}" if isinstance(x, float) else str(x))


def components_text(scored: dict) -> str:
    """What the curve was drawn from and the range of score thresholds it covers."""
    source = scored.get("source")
    if source == "candidates":
        text = (f"candidates: every component of lesion probability >= {_value(scored.get('probability_threshold'))} "
                f"with >= {_value(scored.get('min_area_prepared_pixels'))} prepared pixels, no max-lesions cut, at most "
                f"{_value(scored.get('max_candidates_per_image'))} per image")
    elif source == "lesions":
        text = (f"the model's lesions only (probability >= {_value(scored.get('probability_threshold'))}): "
                "the curve STOPS AT THE MODEL'S THRESHOLD")
    else:
        text = "the given components"
    return (f"{text}; {scored.get('n_components', 0)} components, scores from {fmt(scored.get('lowest_score'))} "
            f"to {fmt(scored.get('highest_score'))}")


def detection_markdown(det: DetectionReport, level: str = "##") -> list[str]:
    lines = [f"{level} Lesion detection from the segmentation", "",
             f"Images: {det.n_images} ({det.n_patients} patients); scorable lesions: {det.n_lesions}; "
             f"lesions without geometry (not scored): {det.n_lesions_without_geometry}; "
             f"lesions lost in preprocessing (not scored): {det.n_lesions_lost}"
             + (f" ({'; '.join(f'{n}: {why}' for why, n in det.lost_in_preprocessing.items())})" if det.n_lesions_lost else "")
             + ".", "",
             f"Hit rule: **{det.hit_rule}** (see the rules below).", "",
             *([f"COCO AP of {det.coco.get('ranked') or 'the same components'} (class-agnostic, pycocotools): boxes AP {fmt((det.coco['box'] or {}).get('AP'))}, "
                f"AP50 {fmt((det.coco['box'] or {}).get('AP50'))}, AP75 {fmt((det.coco['box'] or {}).get('AP75'))}; masks AP "
                f"{fmt((det.coco['mask'] or {}).get('AP'))}, AP50 {fmt((det.coco['mask'] or {}).get('AP50'))}, AP75 "
                f"{fmt((det.coco['mask'] or {}).get('AP75'))}.", ""] if det.coco else []),
             f"Components scored: {components_text(det.components_scored)}.", "",
             f"**Sensitivity at 1 FP/image: {fmt(det.sensitivity_at_1fp.value)}**, 95% CI "
             f"{ci_text(det.sensitivity_at_1fp.ci)}, threshold {fmt(det.threshold_at_1fp)}", ""]
    lines += md_table(["FP/image ≤", "sensitivity", "score threshold"],
                    [[f"{p['fp_per_image']:g}", fmt(p["sensitivity"]), fmt(p["threshold"])] for p in det.operating_points])
    op = det.model_operating_point
    if op is not None:
        lines += ["", f"**Model operating point** (probability threshold {_value(op.get('probability_threshold'))}, "
                      f"min area {_value(op.get('min_area_prepared_pixels'))} prepared pixels, max lesions "
                      f"{_value(op.get('max_lesions'), 'none')}: what `mammocad predict` outputs): "
                      f"{fmt(op['fp_per_image'])} FP/image, sensitivity {fmt(op['sensitivity'])} "
                      f"({op['n_detected']}/{op['n_lesions']} lesions, {op['n_false_positives']} false positives)."]
    lines += ["", f"FROC curve: {len(det.froc)} points in {JSON_NAME} (`detection.froc`).", "", "Rules:", ""]
    lines += [f"- {r}" for r in det.rules]
    lines += [f"- Note: {n}" for n in det.notes]
    return lines + [""]


def segmentation_markdown(rep: SegmentationReport) -> list[str]:
    c = rep.counts
    lines = ["# Segmentation evaluation", "",
             f"Images: {rep.n_images} from {rep.n_patients} patients; classes: {', '.join(rep.class_names)}.", "",
             f"Lesion images (G non-empty): {c['lesion_images']}; **both empty: {c['both_empty']}** (not averaged in); "
             f"false-positive images (G empty, P non-empty): {c['false_positive_images']}; "
             f"scored pixels: {c['scored_pixels']}; ignored pixels: {c['ignored_pixels']}.", "",
             "## Headline metrics", ""]
    rows = [[_HEADLINE_NAMES.get(k, k), fmt(m.value), ci_text(m.ci), str(m.n)] for k, m in rep.headline.items()]
    lines += md_table(["metric", "value", f"{int(rep.bootstrap['confidence'] * 100)}% CI", "n"], rows)
    gt = rep.ground_truth
    if gt:
        lost = gt.get("lost_in_preprocessing") or {}
        lines += ["", f"Ground truth: {gt.get('label_map')}; lesions of unknown pathology: "
                      f"**{gt.get('unknown_pathology')}**; cases left out (lesions not all outlined): "
                      f"{gt.get('n_cases_left_out_unlocated', 0)}; lesions lost in preprocessing (not scored): "
                      f"{gt.get('n_lesions_lost_in_preprocessing', 0)}"
                      + (f" ({'; '.join(f'{n}: {why}' for why, n in lost.items())})" if lost else "") + "."]
    lines += ["", "## Per class (dataset-level confusion matrix)", ""]
    lines += md_table(["class", "IoU", "accuracy (recall)", "GT pixels", "predicted pixels"],
                    [[p["class"], fmt(p["iou"]), fmt(p["accuracy"]), str(p["gt_pixels"]), str(p["pred_pixels"])]
                     for p in rep.per_class])
    lines += ["", "Confusion matrix (rows = ground truth, columns = prediction):", ""]
    lines += md_table(["GT \\ pred"] + rep.class_names,
                    [[name] + [str(v) for v in row] for name, row in zip(rep.class_names, rep.confusion_matrix)])
    if rep.class_dice:
        lines += ["", "## Per-class Dice (images where the class is in the ground truth)", ""]
        lines += md_table(["class", "mean", "95% CI", "max", "n images"],
                        [[name, fmt(d["mean"].value), ci_text(d["mean"].ci), fmt(d["max"].value), str(d["mean"].n)]
                         for name, d in rep.class_dice.items()])
    fp = rep.false_positive_area
    lines += ["", "## False-positive area on images without lesion", "",
              f"Images without lesion: {fp['n_images_without_lesion']}; with a prediction: "
              f"{fp['n_false_positive_images']} (rate {fmt(fp['false_positive_image_rate'])}); "
              f"FP pixels: {fp['total_fp_pixels']} (mean per image without lesion "
              f"{fmt(fp['mean_fp_pixels_per_image_without_lesion'], 1)}); "
              f"mean fraction of the image on FP images: {fmt(fp['mean_fp_fraction_of_image'])} "
              f"(max {fmt(fp['max_fp_fraction_of_image'])}); mean fraction of the breast: "
              f"{fmt(fp['mean_fp_fraction_of_breast'])}.", ""]
    if rep.by_image_label:
        lines += ["## By image label", ""]
        lines += md_table(["label", "images", "lesion images", "FP images", "Dice mean", "IoU mean"],
                        [[k, str(v["n_images"]), str(v["n_lesion_images"]), str(v["n_false_positive_images"]),
                          fmt(v["dice_mean"]), fmt(v["iou_mean"])] for k, v in rep.by_image_label.items()])
        lines.append("")
    if rep.detection is not None:
        lines += detection_markdown(rep.detection)
    b = rep.bootstrap
    lines += ["## Rules", ""] + [f"- {r}" for r in rep.rules]
    lines += [f"- Bootstrap: {b['n_boot']} resamples of {b['n_patients']} patients, seed {b['seed']}, "
              f"{b['method']} intervals."]
    lines += [f"- Note: {n}" for n in rep.notes]
    return lines + [""]


def write_report(report: SegmentationReport | DetectionReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.md`` into ``out_dir`` (atomically); return both paths."""
    out = Path(out_dir)
    json_path, md_path = out / JSON_NAME, out / MARKDOWN_NAME
    if isinstance(report, SegmentationReport):
        md = segmentation_markdown(report)
    elif isinstance(report, DetectionReport):
        md = ["# Lesion detection evaluation", ""] + detection_markdown(report)
    else:
        raise TypeError(f"cannot write a report of type {type(report).__name__}")
    atomic_write_json(json_path, report.to_dict(), strict=True)
    atomic_write_text(md_path, "\n".join(md))
    det = report if isinstance(report, DetectionReport) else report.detection
    if det is not None and det.n_lesions:
        atomic_write_bytes(out / FROC_PNG, froc_png(det))
        atomic_write_bytes(out / PR_PNG, pr_png(det))
    return json_path, md_path


def pr_points(det: DetectionReport) -> list[tuple[float, float, float]]:
    """(recall, precision, threshold) along the FROC curve: recall = lesion sensitivity, precision =
    lesions found / (lesions found + false-positive components), the same hits (one per lesion) as the
    FROC curve, so both plots describe one set of decisions."""
    out = []
    for p in det.froc:
        found, fp = p.n_detected, p.n_false_positives
        if found + fp:
            out.append((p.sensitivity, found / (found + fp), p.threshold))
    return out






def pr_png(det: DetectionReport) -> bytes:
    """PNG of the lesion-level precision-recall curve (``pr_points``), with the COCO AP of the same
    components in the title when it was computed."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    pts = pr_points(det)
    ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", label="candidates, score threshold lowered")
    op = det.model_operating_point
    if op is not None and op.get("sensitivity") is not None and (op["n_detected"] + op["n_false_positives"]):
        ax.plot([op["sensitivity"]], [op["n_detected"] / (op["n_detected"] + op["n_false_positives"])], "r*",
                markersize=12, label="model operating point")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (lesion sensitivity)")
    ax.set_ylabel("precision (lesions found / (found + FP components))")
    coco = det.coco or {}
    ap = "".join(f", {kind} AP {(coco.get(kind) or {}).get('AP'):.3f}" for kind in ("box", "mask")
                 if (coco.get(kind) or {}).get("AP") is not None)
    ax.set_title(f"PR: {det.n_lesions} lesions, hit rule {det.hit_rule}{ap}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return figure_png(fig)


def froc_png(det: DetectionReport) -> bytes:
    """PNG of the FROC curve (sensitivity against false positives per image, log axis as in the CAD
    literature), the sensitivities at the standard rates, and the model's operating point: one marked
    point that need not lie on the curve (see the rules). matplotlib's object API on the Agg canvas:
    no global backend is touched."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    xs = [p.fp_per_image for p in det.froc]
    ys = [p.sensitivity for p in det.froc]
    floor = min([x for x in xs if x > 0] + [0.125]) / 2  # where FP/image 0 is drawn on the log axis
    ax.step([max(x, floor) for x in xs], ys, where="post", label="FROC (candidates)")
    rates = [(p["fp_per_image"], p["sensitivity"]) for p in det.operating_points if p["sensitivity"] is not None]
    ax.plot([r[0] for r in rates], [r[1] for r in rates], "o", markersize=4, label="sensitivity at k FP/image")
    op = det.model_operating_point
    if op is not None and op.get("sensitivity") is not None:
        ax.plot([max(op["fp_per_image"], floor)], [op["sensitivity"]], "r*", markersize=12,
                label=f"model operating point ({op['fp_per_image']:.2f} FP/image, {op['sensitivity']:.2f})")
    ax.set_xscale("log")
    ax.set_xlim(floor, max([8.0] + xs) * 1.2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title(f"FROC: {det.n_lesions} lesions, {det.n_images} images, hit rule {det.hit_rule}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return figure_png(fig)
