"""Turn a training run's bundle into a shipped default model (src/mammocad/bundles/<name>/).

The card's validation section is recomputed with the bundle's own post-processing (the same code
path as `mammocad predict` / `mammocad evaluate`: threshold, minimum area, `max_lesions`, test-time
flips), on the validation split of the prepared dataset, with 95% bootstrap CIs resampled by patient;
a Markdown model card (README.md) is written beside the weights. The weights are copied unchanged.

    .venv/bin/python scripts/ship_bundle.py runs/us_lesion_seg/bundle configs/us_lesion_seg.yaml
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from mammocad.datasets.prepared import PreparedDataset
from mammocad.evaluation.run import evaluate_prepared
from mammocad.io.atomic import atomic_path, atomic_write_text
from mammocad.io.discover import file_sha256
from mammocad.models.card import validate_card
from mammocad.training.card import validation_summary
from mammocad.training.config import load_config

PACKAGE_BUNDLES = Path(__file__).resolve().parents[1] / "src" / "mammocad" / "bundles"


def _fmt(metric: dict | None) -> str:
    if not metric or metric.get("value") is None:
        return "n/a"
    ci = metric.get("ci") or {}
    if ci.get("low") is None:
        return f"{metric['value']:.3f}"
    return f"{metric['value']:.3f} (95% CI {ci['low']:.3f}-{ci['high']:.3f})"


def model_card_markdown(card: dict) -> str:
    v = card["validation"]
    h = v["headline"]
    td = card.get("training_data") or {}
    tr = card.get("training") or {}
    lines = [
        f"# {card['name']} {card['version']}", "", card.get("description", ""), "",
        f"- Task: {card['task']} ({card['modality']}), classes {card['class_names']}, output {card['output']}",
        f"- Architecture: `{card['architecture']['name']}` {json.dumps(card['architecture'].get('kwargs', {}))}",
        f"- Reproduces: {card.get('reproduces', '')}",
        f"- Preprocessing: {json.dumps(card['preprocessing'])}",
        f"- Post-processing: {json.dumps(card['thresholds'])}; tiling {json.dumps(card['tiling'])}",
        "", "## Training data and split", "",
        f"- Prepared dataset: {Path(str(td.get('prepared'))).name} (adapter {td.get('adapter')}, from ../shared/data only); "
        f"split {td.get('split_method')} seed {td.get('split_seed')}, splits.json sha256 {td.get('splits_sha256')}",
        f"- Cases/patients per split: {json.dumps(td.get('splits', {}))}",
        f"- Training: {json.dumps({k: tr.get(k) for k in ('epochs', 'stopped', 'seconds', 'device', 'amp', 'seed', 'patches_per_epoch')})}; "
        f"stages {json.dumps(tr.get('stages', []))}",
        "", "## Validation (development validation split, bundle post-processing, 95% bootstrap CI by patient)", "",
        "**Optimistic.** One small development validation split that also chose the checkpoint (the best epoch "
        "on it); nothing was held out from that choice, so these figures are not estimates for new patients "
        "(see the limitations for what was measured on patients the model never saw).", "",
        f"- images {v['n_images']}, patients {v['n_patients']}, counts {json.dumps(v['counts'])}",
        f"- Dice, lesion images (mean): {_fmt(h.get('dice_lesion_images_mean'))}; max {_fmt(h.get('dice_lesion_images_max'))}",
        f"- IoU, lesion images (mean): {_fmt(h.get('iou_lesion_images_mean'))}",
        f"- Dice, all images with a lesion or a prediction (mean): {_fmt(h.get('dice_all_images_mean'))}",
        f"- mean IoU over classes: {_fmt(h.get('mean_iou'))}; pixel accuracy {_fmt(h.get('pixel_accuracy'))}",
    ]
    det = v.get("detection")
    if det:
        scored = det.get("components_scored") or {}
        rates = ", ".join(f"{p['fp_per_image']:g}: {p['sensitivity']:.3f}" for p in det.get("operating_points", [])
                          if p.get("sensitivity") is not None)
        lines.append(f"- Lesion detection (hit rule {det.get('hit_rule', 'iou0.1+centroid')}), "
                     f"{det.get('n_lesions')} lesions: FROC over candidate components "
                     f"({json.dumps({k: scored.get(k) for k in ('source', 'probability_threshold', 'min_area_prepared_pixels', 'max_candidates_per_image', 'lowest_score', 'highest_score') if k in scored})}); "
                     f"sensitivity at 1 FP/image {_fmt(det.get('sensitivity_at_1fp'))}; at k FP/image {{{rates}}}")
        op = det.get("model_operating_point")
        if op:
            sens = "n/a" if op.get("sensitivity") is None else f"{op['sensitivity']:.3f}"
            lines.append(f"- The model's operating point (what `mammocad predict` outputs: "
                         f"{json.dumps({k: op.get(k) for k in ('probability_threshold', 'min_area_prepared_pixels', 'max_lesions') if k in op})}): "
                         f"{op['fp_per_image']:.3f} FP/image at sensitivity {sens}")
    lines += ["", "## Limitations", ""] + [f"- {x}" for x in card.get("limitations", [])]
    lines += ["", "The development validation split is small and chose the checkpoint; the CIs say how little a "
              "single figure means. Judge the model on your own data.", ""]
    return "\n".join(lines)


def _strip_local_paths(card: dict) -> None:
    """A shipped card names its training data, not this machine's folders (the split file's hash stays)."""
    td = card.get("training_data") or {}
    for key in ("prepared", "splits_file"):
        if td.get(key):
            td[key] = Path(str(td[key])).name
    cfg_data = (card.get("config") or {}).get("data") or {}
    for key in ("prepared", "splits"):
        if cfg_data.get(key):
            cfg_data[key] = Path(str(cfg_data[key])).name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("config", type=Path)
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args()
    cfg = load_config(args.config)
    card = json.loads((args.bundle / "model.json").read_text())
    inf = cfg.inference
    spec = PreparedDataset(cfg.data.prepared).spec  # the pipeline the training images really went through
    card["preprocessing"], card["modality"] = spec.model_dump(mode="json"), spec.modality
    card["task"] = cfg.task  # bundles trained before the card required it have none
    card["thresholds"] = {"probability": inf.threshold, "min_area": inf.min_area, "max_lesions": inf.max_lesions}
    card["tiling"] = {"tile": inf.tile, "overlap": inf.overlap, "mode": inf.mode, "batch_size": inf.batch_size,
                      "tta": list(inf.tta)}
    name = cfg.bundle.name
    target = PACKAGE_BUNDLES / name
    target.mkdir(parents=True, exist_ok=True)
    with atomic_path(target / "model.safetensors") as tmp:
        shutil.copyfile(args.bundle / "model.safetensors", tmp)
    # the hash of the file as shipped: loading refuses weights that differ from it
    card["weights_sha256"] = file_sha256(target / "model.safetensors")
    validate_card(card, target / "model.json")
    atomic_write_text(target / "model.json", json.dumps(card, indent=2) + "\n")
    report = evaluate_prepared(target, cfg.data.prepared, split="val", fold=cfg.data.fold,
                               out_dir=args.bundle.parent / "ship_eval", n_boot=args.n_boot, device="cpu")
    card["validation"] = validation_summary(report)
    card["validation_protocol"] = ("`mammocad evaluate --model`: the bundle predicts each validation case's original "
                                   "image exactly as `mammocad predict` does, masks are mapped onto the prepared grid "
                                   "and scored there; detection FROC over low-threshold candidates with the "
                                   "bundle's operating point marked; checkpoint chosen on this split (optimistic)")
    _strip_local_paths(card)
    validate_card(card, target / "model.json")
    atomic_write_text(target / "model.json", json.dumps(card, indent=2) + "\n")
    atomic_write_text(target / "README.md", model_card_markdown(card))
    print(model_card_markdown(card))


if __name__ == "__main__":
    main()
