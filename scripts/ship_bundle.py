"""Turn a training run's bundle into a shipped default model (src/mammocad/bundles/<name>/).

The card gets the cross-validation table of the same config (``mammocad cv``'s cv.json, refused if it
cross-validated another version of the config): that is the estimate for new patients. The run's own
validation section (the split that chose its checkpoint) stays, labelled optimistic. The weights are
re-saved as fp16 (default) safetensors, so the repository holds half the bytes; a Markdown model card
(README.md) is written beside them.

    .venv/bin/python scripts/ship_bundle.py runs/us_lesion_seg_lite0/bundle configs/us_lesion_seg_lite0.yaml \
        --cv runs/cv_us_seg --cv-command "mammocad cv configs/us_lesion_seg_lite0.yaml --out runs/cv_us_seg --folds 3 --external prepared/busi256"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mammocad.io.atomic import atomic_write_text
from mammocad.io.discover import file_sha256
from mammocad.models.bundle import load_bundle, save_bundle
from mammocad.training.card import inference_autocast
from mammocad.training.config import load_config, parse_config, resume_key

PACKAGE_BUNDLES = Path(__file__).resolve().parents[1] / "src" / "mammocad" / "bundles"


def _fmt(metric: dict | None) -> str:
    if not metric or metric.get("value") is None:
        return "n/a"
    ci = metric.get("ci") or {}
    if ci.get("low") is None:
        return f"{metric['value']:.3f}"
    return f"{metric['value']:.3f} (95% CI {ci['low']:.3f}-{ci['high']:.3f})"


def _cv_rows(metrics: dict, names: tuple[str, ...]) -> list[str]:
    rows = []
    for name in names:
        m = metrics.get(name)
        if not m or m.get("mean") is None:
            continue
        ci = m.get("ci")
        folds = ", ".join("-" if v is None else f"{v:.3f}" for v in m["folds"])
        rows.append(f"| {name} | {m['mean']:.3f} | " + (f"{ci['low']:.3f} - {ci['high']:.3f}" if ci else "-") + f" | {folds} |")
    return rows


CV_HEADLINE = ("dice_lesion_images", "iou_lesion_images", "dice_all_images", "sensitivity_at_1fp",
               "sensitivity_at_0.5fp", "sensitivity_at_2fp", "operating_point_sensitivity", "operating_point_fp_per_image",
               "mask_ap", "mask_ap50", "box_ap", "box_ap50")


def model_card_markdown(card: dict) -> str:
    v = card.get("validation") or {}
    h = v.get("headline") or {}
    td = card.get("training_data") or {}
    tr = card.get("training") or {}
    cv = card.get("cross_validation")
    lines = [
        f"# {card['name']} {card['version']}", "", card.get("description", ""), "",
        f"- Task: {card['task']} ({card['modality']}), classes {card['class_names']}, output {card['output']}",
        f"- Architecture: `{card['architecture']['name']}` {json.dumps(card['architecture'].get('kwargs', {}))}",
        f"- Weights: {card.get('weights_dtype', 'float32')} safetensors (loaded into an fp32 model)",
        f"- Reproduces: {card.get('reproduces', '')}",
        f"- Preprocessing: {json.dumps(card['preprocessing'])}",
        f"- Post-processing: {json.dumps(card['thresholds'])}; tiling {json.dumps(card['tiling'])}",
    ]
    if cv:
        head = "| metric | mean over folds | 95% t-interval over folds (their spread) | per fold |"
        lines += ["", f"## Cross-validation: the estimate for new patients ({cv['n_folds']} folds, patient-grouped)", "",
                  f"{cv['protocol']}. Folds: {cv['splits']['method']} (seed {cv['splits']['seed']}); "
                  f"hit rule {cv.get('hit_rule')}. Reproduce: `{cv.get('command', '')}`.", "",
                  head, "|---|---|---|---|", *_cv_rows(cv["metrics"], CV_HEADLINE)]
        for name, src in (cv.get("by_source") or {}).items():
            lines += ["", f"### Source {name}: its {src['n_lesion_images']} lesion images, each scored in its test fold", "",
                      head, "|---|---|---|---|", *_cv_rows(src["metrics"], CV_HEADLINE)]
        for name, ext in (cv.get("external") or {}).items():
            lines += ["", f"### Another source: every fold's model scored on all of {name} (never trained on)", "",
                      head, "|---|---|---|---|", *_cv_rows(ext["metrics"], CV_HEADLINE)]
    lines += [
        "", "## Shipped weights: training data and split", "",
        f"- Prepared dataset: {Path(str(td.get('prepared'))).name} (adapter {td.get('adapter')}, from ../shared/data only); "
        f"split {td.get('split_method')} seed {td.get('split_seed')}, splits file sha256 {td.get('splits_sha256')}",
        f"- Cases/patients per split: {json.dumps(td.get('splits', {}))}",
        f"- Training: {json.dumps({k: tr.get(k) for k in ('epochs', 'stopped', 'seconds', 'device', 'amp', 'seed', 'patches_per_epoch')})}; "
        f"stages {json.dumps(tr.get('stages', []))}",
    ]
    if h:
        lines += ["", "## Checkpoint-selection split of the shipped run (optimistic)", "",
                  "This split chose the shipped checkpoint (early stopping), so its figures are optimistic; the "
                  "cross-validation above is the estimate." if cv else
                  "One small development validation split that also chose the checkpoint; not an estimate for new patients.",
                  "",
                  f"- images {v.get('n_images')}, patients {v.get('n_patients')}",
                  f"- Dice, lesion images (mean): {_fmt(h.get('dice_lesion_images_mean'))}"]
        det = v.get("detection")
        if det:
            lines.append(f"- sensitivity at 1 FP/image ({det.get('n_lesions')} lesions): {_fmt(det.get('sensitivity_at_1fp'))}")
    lines += ["", "## Limitations", ""] + [f"- {x}" for x in card.get("limitations", [])]
    lines += ["", "Judge the model on your own data: other scanners and populations differ.", ""]
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
    ap.add_argument("bundle", type=Path, help="the final training run's bundle (all development patients)")
    ap.add_argument("config", type=Path)
    ap.add_argument("--cv", type=Path, required=True, help="the `mammocad cv` folder of the same config (its cv.json)")
    ap.add_argument("--cv-command", default="", help="the command that made --cv (written into the card)")
    ap.add_argument("--weights-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--limitation", action="append", default=[], help="a measured limitation to add to the card")
    args = ap.parse_args()
    cfg = load_config(args.config)
    model, card_model = load_bundle(args.bundle)
    card = card_model.to_json()
    trained, wanted = resume_key(parse_config(card["config"])), resume_key(cfg)
    trained.pop("data"), wanted.pop("data")  # the final run trains on another split of the same data
    if trained != wanted:
        raise SystemExit(f"{args.bundle}: was not trained with the recipe of {args.config}")
    card["tiling"]["autocast"] = inference_autocast(cfg)  # runs that started before cards recorded it
    cv = json.loads((args.cv / "cv.json").read_text())
    if cv.get("config_sha256") != file_sha256(args.config):
        raise SystemExit(f"{args.cv}: cross-validated another version of {args.config} (config sha256 differs)")
    cv["command"] = args.cv_command
    cv["config"] = str(args.config)
    cv["splits"]["path"] = Path(cv["splits"]["path"]).name
    for ext in (cv.get("external") or {}).values():
        ext["prepared"] = Path(ext["prepared"]).name
    card["cross_validation"] = cv
    card["limitations"] = list(card.get("limitations") or []) + list(args.limitation)
    card["validation_protocol"] = ("cross_validation: patient-grouped k-fold (`mammocad cv`), every development image "
                                   "scored once by the model of the fold that never saw its patient, checkpoint chosen "
                                   "on a carve of the training patients, threshold fixed beforehand; validation: the "
                                   "shipped run's own checkpoint-selection split (optimistic)")
    _strip_local_paths(card)
    target = PACKAGE_BUNDLES / cfg.bundle.name
    save_bundle(target, model, card, weights_dtype=args.weights_dtype)
    atomic_write_text(target / "README.md", model_card_markdown(json.loads((target / "model.json").read_text())))
    print(model_card_markdown(json.loads((target / "model.json").read_text())))


if __name__ == "__main__":
    main()
