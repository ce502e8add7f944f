"""``mammocad cv CONFIG --out DIR``: patient-grouped k-fold cross-validation of one training recipe.

The number a model card reports must come from images whose patients the model never saw, with
every choice (checkpoint, early stopping, threshold, post-processing) made without them. Here:

* the folds are a splits file whose entries each TEST one fold (``method`` "cv", made here by
  ``make_splits(cv=True)`` unless given, or "official_folds", e.g. BUS-BRA's own): the test sets partition the
  cases, so every image is scored exactly once, by the model of the one fold that never saw its
  patient. Each entry's ``val`` is carved from the TRAINING patients: early stopping and the best
  checkpoint are chosen there (nested), and the bundle's threshold and post-processing come from
  the config (fixed beforehand), never from the test fold;
* fold i trains the unchanged config with ``data.splits`` = that file and ``data.fold`` = i into
  ``DIR/fold<i>/train`` (the ordinary run folder: checkpoints, resume, bundle) and is scored by
  ``evaluate_prepared`` on its test fold into ``DIR/fold<i>/eval`` (``metrics.json``); each
  ``--external`` prepared dataset (another source: the closest thing to a new hospital) is scored
  whole by every fold's model into ``DIR/fold<i>/external-<name>``;
* the folds are scored as the bundle will predict (fp32 for a model trained without bf16: its card's
  ``tiling.autocast``), and ``scored.json`` beside each ``metrics.json`` records which weights and
  settings made it, so a retrained fold is scored again; ``recipe.json`` records the config the
  first fold trained, and a changed config is refused (every fold must be the same recipe);
* a fold whose bundle and metrics exist is skipped, an interrupted one resumes from its checkpoint,
  and ``--fold i`` runs one fold, so folds can run as separate processes (a fold another process is
  training is skipped and reported); whichever process finds every fold scored writes the table: ``DIR/cv.json``
  and ``DIR/cv.md``, each metric per fold with the mean, the standard deviation and a 95%
  t-interval over the folds.

It lives in the evaluation layer because it scores (it imports training, a lower layer).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mammocad.errors import ConfigError, InputError

log = logging.getLogger(__name__)

CV_METHODS = ("cv", "official_folds")  # splits whose entries each test one fold
CV_FILE, CV_MARKDOWN, SPLITS_NAME, RECIPE_NAME = "cv.json", "cv.md", "splits.json", "recipe.json"
SCORED_NAME = "scored.json"  # beside each metrics.json: which weights, how (a retrained fold is scored again)
LOCK_NAME = ".cv.lock"
DEFAULT_FOLDS = 5

# (name in the table, path in metrics.json): what a lesion model is judged by
METRICS: tuple[tuple[str, tuple[str | int, ...]], ...] = (
    ("dice_lesion_images", ("headline", "dice_lesion_images_mean", "value")),
    ("iou_lesion_images", ("headline", "iou_lesion_images_mean", "value")),
    ("dice_all_images", ("headline", "dice_all_images_mean", "value")),
    ("sensitivity_at_1fp", ("detection", "sensitivity_at_1fp", "value")),
    *((f"sensitivity_at_{rate}fp", ("detection", "operating_points", i, "sensitivity"))
      for i, rate in enumerate(("0.125", "0.25", "0.5", "1", "2", "4", "8")) if rate != "1"),
    ("operating_point_sensitivity", ("detection", "model_operating_point", "sensitivity")),
    ("operating_point_fp_per_image", ("detection", "model_operating_point", "fp_per_image")),
    ("mask_ap", ("detection", "coco", "mask", "AP")),
    ("mask_ap50", ("detection", "coco", "mask", "AP50")),
    ("box_ap", ("detection", "coco", "box", "AP")),
    ("box_ap50", ("detection", "coco", "box", "AP50")),
    # a classifier's (task classify)
    *((name, ("headline", name, "value")) for name in ("roc_auc", "macro_roc_auc", "balanced_accuracy", "accuracy",
                                                        "macro_f1")),
    ("n_images", ("n_images",)),
    ("n_lesions", ("detection", "n_lesions")),
)


def fold_dir(out: Path, fold: int) -> Path:
    return out / f"fold{fold}"


def _dig(data: Any, path: tuple[str | int, ...]) -> float | None:
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return float(data) if isinstance(data, (int, float)) and not isinstance(data, bool) else None


def summarize(values: list[float | None], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, sample SD and a t-interval over the folds (the folds are the replicates); NaN/None
    values (a fold where the metric is undefined) are left out and counted."""
    from scipy import stats

    vals = [v for v in values if v is not None and math.isfinite(v)]
    out: dict[str, Any] = {"folds": values, "n_folds": len(vals), "mean": None, "sd": None, "ci": None}
    if not vals:
        return out
    mean = sum(vals) / len(vals)
    out["mean"] = mean
    if len(vals) >= 2:
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        half = stats.t.ppf(0.5 + confidence / 2, len(vals) - 1) * sd / math.sqrt(len(vals))
        out.update(sd=sd, ci={"low": mean - half, "high": mean + half, "confidence": confidence,
                              "method": f"t-interval over {len(vals)} fold figures (their spread)"})
    return out


def source_metrics(metrics: dict[str, Any], dataset_of: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per source dataset of a combined prepared dataset: the mean Dice / IoU over its lesion images,
    from the report's per-image rows (``dataset_of``: case id -> ``Case.dataset``)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in metrics.get("per_image", []):
        if r.get("category") == "lesion" and r.get("dice") is not None:
            rows.setdefault(dataset_of.get(r["case_id"], "?"), []).append(r)
    return {name: {"headline": {"dice_lesion_images_mean": {"value": sum(r["dice"] for r in rs) / len(rs)},
                                "iou_lesion_images_mean": {"value": sum(r["iou"] for r in rs) / len(rs)}},
                   "n_lesion_images": len(rs)}
            for name, rs in sorted(rows.items())}


def fold_table(fold_metrics: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{metric: summarize(its value in each fold)} for the metrics present in at least one fold."""
    table = {}
    for name, path in METRICS:
        values = [_dig(m, path) for m in fold_metrics]
        if any(v is not None for v in values):
            table[name] = summarize(values)
    return table


# ---- the folds -----------------------------------------------------------------------------------
def check_cv_splits(data: dict[str, Any], case_ids: list[str], source: str | Path) -> None:
    """The splits must be a cross-validation: entries that each test one fold, the test folds
    disjoint and together every case (but those the split itself dropped, e.g. crossing patients)."""
    method = data.get("method")
    if method not in CV_METHODS:
        raise ConfigError(source, f"method {method!r} is not a cross-validation (each fold must TEST its own patients): "
                                  "make one with `mammocad split PREPARED --folds 5 --cv`, or give no splits and "
                                  "`mammocad cv` makes its own")
    seen: dict[str, int] = {}
    for i, fold in enumerate(data["folds"]):
        for cid in fold.get("test", []):
            if cid in seen:
                raise ConfigError(source, f"case {cid} is tested in folds {seen[cid]} and {i}; the test folds must be disjoint")
            seen[cid] = i
    dropped = set(data.get("dropped", {}).get("patients") or [])
    missing = [c for c in case_ids if c not in seen]
    if missing and not dropped:
        raise ConfigError(source, f"{len(missing)} prepared case(s) are in no test fold (e.g. {missing[0]}); "
                                  "the splits belong to another dataset or version")


def resolve_splits(cfg: Any, out: Path, splits: str | Path | None, folds: int, seed: int, val: float) -> Path:
    """The splits file of the cross-validation: ``splits`` (must be a cross-validation), else the
    config's ``data.splits`` when it is one (BUS-BRA's official folds), else ``OUT/splits.json``, made
    once (``make_splits(cv=True)``) and reused. A config's other splits (the final model's train/val
    of all development patients) are not used here."""
    from mammocad.datasets.prepared import PreparedDataset
    from mammocad.datasets.splits import make_splits
    from mammocad.io.outdir import locked_file

    ds = PreparedDataset(cfg.data.prepared)
    ids = [pc.case_id for pc in ds.cases]
    if splits is not None:
        check_cv_splits(ds.load_splits(splits), ids, splits)
        return Path(splits).resolve()
    if cfg.data.splits is not None and ds.load_splits(cfg.data.splits).get("method") in CV_METHODS:
        check_cv_splits(ds.load_splits(cfg.data.splits), ids, cfg.data.splits)
        return Path(cfg.data.splits).resolve()
    path = out / SPLITS_NAME
    with locked_file(out / LOCK_NAME):
        if not path.is_file():
            make_splits(cfg.data.prepared, val=val, test=0.0, folds=folds, seed=seed, out=path, cv=True)
        data = ds.load_splits(path)
        want = {"folds": folds, "seed": seed, "val": val}
        have = {"folds": data["parameters"].get("folds"), "seed": data.get("seed"), "val": data["parameters"].get("val")}
        if have != want:
            raise ConfigError(path, f"was made with {have}, this run asks for {want}; use another --out or the same options")
    check_cv_splits(data, ids, path)
    return path.resolve()


def _external_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).resolve().name) or "external"


@dataclass
class CVResult:
    out: Path
    n_folds: int
    done: list[int] = field(default_factory=list)  # folds scored (this run or earlier)
    busy: list[int] = field(default_factory=list)  # folds another process was training
    table: dict[str, Any] | None = None  # written when every fold is scored


def run_cv(config: str | Path, out: str | Path, *, folds: int = DEFAULT_FOLDS, only: list[int] | None = None,
           splits: str | Path | None = None, seed: int = 0, val: float = 0.15, external: list[str | Path] = (),
           hit: str | None = None, n_boot: int = 1000, device: str = "auto", progress: bool = True) -> CVResult:
    """Train and score the folds (all, or ``only`` these) of ``config``; write the table once every
    fold is scored. See the module docstring."""
    from mammocad.datasets.prepared import PreparedDataset
    from mammocad.io.outdir import check_output_dir, locked_file
    from mammocad.training.card import inference_autocast
    from mammocad.training.config import load_config, resume_key, with_overrides

    cfg = load_config(config)
    if folds < 2:
        raise ConfigError("--folds", f"must be at least 2, got {folds}")
    externals = [Path(p) for p in external]
    for p in externals:
        if not (p / "cases.jsonl").is_file():
            raise InputError(p, "is not a prepared dataset (no cases.jsonl); --external takes `mammocad prepare` output")
    out = check_output_dir(out)
    splits_path = resolve_splits(cfg, out, splits, folds, seed, val)
    with locked_file(out / LOCK_NAME):  # every fold trains the same recipe: a changed config is refused
        check_recipe(out / RECIPE_NAME, resume_key(with_overrides(cfg, splits=splits_path, fold=0)), config)
    n = len(PreparedDataset(cfg.data.prepared).load_splits(splits_path)["folds"])
    todo = list(range(n)) if only is None else list(dict.fromkeys(only))
    bad = [i for i in todo if not 0 <= i < n]
    if bad:
        raise ConfigError("--fold", f"fold {bad[0]} does not exist: {splits_path} has folds 0..{n - 1}")
    # scored as the bundle will predict: a model trained in fp32 is scored in fp32, not under bf16
    how = {"autocast": inference_autocast(cfg), "hit": hit, "n_boot": n_boot}
    result = CVResult(out=out, n_folds=n)
    for i in todo:
        try:
            bundle = _train_fold(with_overrides(cfg, splits=splits_path, fold=i), fold_dir(out, i) / "train", device,
                                 progress)
        except FoldBusy as busy:  # another process trains it (`--fold i`): go on, it writes its own results
            result.busy.append(i)
            log.warning("%s", busy)
            continue
        _score(bundle, cfg.data.prepared, fold_dir(out, i) / "eval", how, device, progress, split="test", fold=i,
               splits_path=splits_path)
        for ext in externals:
            _score(bundle, ext, fold_dir(out, i) / f"external-{_external_name(ext)}", how, device, progress, split="all")
    result.done = [i for i in range(n) if (fold_dir(out, i) / "eval" / "metrics.json").is_file()]
    if len(result.done) == n:
        with locked_file(out / LOCK_NAME):
            result.table = write_table(cfg, config, out, splits_path, n, externals, how)
    return result


class FoldBusy(InputError):
    """Another process holds this fold's run folder."""


def check_recipe(path: Path, key: dict[str, Any], config: str | Path) -> None:
    """Record the recipe (the config's resume key) the first time; refuse another one later."""
    from mammocad.io.atomic import atomic_write_json

    if not path.is_file():
        atomic_write_json(path, {"config": str(config), "resume_key": key}, indent=1)
        return
    import json

    old = json.loads(path.read_text(encoding="utf-8"))["resume_key"]
    diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
    if diff:
        raise ConfigError(config, f"{diff[0]}: differs from the recipe this cross-validation ran ({path}); "
                                  "use another --out, or put the config back")


def _train_fold(cfg: Any, run_dir: Path, device: str, progress: bool) -> Path:
    """The fold's bundle: trained here (resumed from a checkpoint) unless it exists."""
    from mammocad.io.outdir import claim_output_dir
    from mammocad.models.bundle import CARD_FILE
    from mammocad.training.checkpoint import CHECKPOINT_STATE
    from mammocad.training.engine import BUNDLE_DIR
    from mammocad.training.engine import train as run_training

    bundle = run_dir / BUNDLE_DIR
    if (bundle / CARD_FILE).is_file():
        return bundle
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(claim_output_dir(run_dir, "train"))
        except InputError as err:
            raise FoldBusy(run_dir, err.cause) from None
        if not (bundle / CARD_FILE).is_file():  # finished by another process since the check above
            run_training(cfg, run_dir, resume=(run_dir / CHECKPOINT_STATE).is_file(), device=device, progress=progress)
    if not (bundle / CARD_FILE).is_file():
        raise InputError(run_dir, f"fold {cfg.data.fold} wrote no bundle (interrupted, or the time budget ended before "
                                  "an epoch); run `mammocad cv` again to resume it")
    return bundle


def _score(bundle: Path, prepared: Path, out: Path, how: dict[str, Any], device: str, progress: bool, **where: Any) -> None:
    """``metrics.json`` of ``bundle`` on ``prepared`` in ``out``, unless it is there for these very
    weights and settings (``scored.json``): a retrained fold is scored again."""
    import json

    from mammocad.evaluation.run import evaluate_prepared
    from mammocad.io.atomic import atomic_write_json
    from mammocad.models.bundle import read_card

    record = {"weights_sha256": read_card(bundle).weights_sha256, **how}
    scored = out / SCORED_NAME
    if (out / "metrics.json").is_file() and scored.is_file() and json.loads(scored.read_text(encoding="utf-8")) == record:
        return
    try:
        evaluate_prepared(bundle, prepared, out_dir=out, device=device, n_boot=how["n_boot"], hit=how["hit"],
                          autocast=how["autocast"], source_kind="model", progress=progress, **where)
    except InputError as err:
        if "another mammocad run is writing" in err.cause:  # a parallel process scores it
            log.warning("%s: %s", out, err.cause)
            return
        raise
    atomic_write_json(scored, record, indent=1)


def write_table(cfg: Any, config: str | Path, out: Path, splits_path: Path, n: int, externals: list[Path],
                how: dict[str, Any]) -> dict[str, Any]:
    """``cv.json`` and ``cv.md`` from the folds' metrics and training records."""
    import json

    from mammocad.datasets.combine import case_datasets
    from mammocad.datasets.prepared import PreparedDataset
    from mammocad.io.atomic import atomic_write_json, atomic_write_text
    from mammocad.io.discover import file_sha256
    from mammocad.models.bundle import CARD_FILE
    from mammocad.training.engine import BUNDLE_DIR

    def read_json(path: Path) -> Any:
        return json.loads(Path(path).read_text(encoding="utf-8"))

    metrics = [read_json(fold_dir(out, i) / "eval" / "metrics.json") for i in range(n)]
    splits = read_json(splits_path)
    training = []
    for i in range(n):
        card = read_json(fold_dir(out, i) / "train" / BUNDLE_DIR / CARD_FILE)
        t = card.get("training") or {}
        training.append({"weights_sha256": card.get("weights_sha256"),
                         **{k: t.get(k) for k in ("stopped", "epochs", "seconds", "stages") if k in t}})
    table: dict[str, Any] = {
        "config": str(Path(config)), "config_sha256": file_sha256(Path(config)),
        "splits": {"path": str(splits_path), "sha256": file_sha256(splits_path), "method": splits.get("method"),
                   "seed": splits.get("seed"), "parameters": splits.get("parameters"),
                   "official_fold_numbers": splits.get("official_fold_numbers")},
        "n_folds": n,
        "protocol": ("patient-grouped k-fold: every image scored once by the model of the fold that never saw its "
                     "patient; early stopping and checkpoint choice on a validation carve of the TRAINING patients; "
                     "threshold and post-processing fixed in the config beforehand. The interval is a t-interval over "
                     "the fold figures: it shows their spread, and is narrower than the true uncertainty (the folds' "
                     "training sets overlap; for an external set every fold scores the same images)"),
        "scoring": how,
        "hit_rule": (metrics[0].get("detection") or {}).get("hit_rule"),
        "metrics": fold_table(metrics),
        "training": training,
        "external": {},
        "by_source": {},
    }
    dataset_of = case_datasets(PreparedDataset(cfg.data.prepared))
    if len(set(dataset_of.values())) > 1:  # a combined dataset: each source's figure too (issue 7.8's floors)
        per_source = [source_metrics(m, dataset_of) for m in metrics]
        for name in sorted({k for ps in per_source for k in ps}):
            folds = [ps.get(name, {}) for ps in per_source]
            table["by_source"][name] = {
                "metrics": {k: v for k, v in fold_table(folds).items() if k in ("dice_lesion_images", "iou_lesion_images")},
                "n_lesion_images": sum(f.get("n_lesion_images", 0) for f in folds)}
    for ext in externals:
        name = _external_name(ext)
        per_fold = [read_json(fold_dir(out, i) / f"external-{name}" / "metrics.json") for i in range(n)
                    if (fold_dir(out, i) / f"external-{name}" / "metrics.json").is_file()]
        if len(per_fold) == n:
            table["external"][name] = {"prepared": str(ext), "split": "all", "metrics": fold_table(per_fold)}
    atomic_write_json(out / CV_FILE, table, indent=1)
    atomic_write_text(out / CV_MARKDOWN, table_markdown(table))
    return table


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}" if isinstance(v, float) else str(v)


def _rows(metrics: dict[str, Any], n: int) -> list[str]:
    rows = ["| metric | " + " | ".join(f"fold {i}" for i in range(n)) + " | mean | SD | 95% t-interval over folds |",
            "|---" * (n + 4) + "|"]
    for name, s in metrics.items():
        ci = "-" if s["ci"] is None else f"{s['ci']['low']:.3f} - {s['ci']['high']:.3f}"
        rows.append(f"| {name} | " + " | ".join(_fmt(v) for v in s["folds"]) + f" | {_fmt(s['mean'])} | {_fmt(s['sd'])} | {ci} |")
    return rows


def table_markdown(table: dict[str, Any]) -> str:
    n = table["n_folds"]
    lines = [f"# Cross-validation of {table['config']}", "",
             f"{n} folds ({table['splits']['method']}, splits {table['splits']['path']}). {table['protocol']}.", "",
             *_rows(table["metrics"], n), ""]
    for name, src in table.get("by_source", {}).items():
        lines += [f"## Source {name}: its {src['n_lesion_images']} lesion images, scored in their folds", "",
                  *_rows(src["metrics"], n), ""]
    for name, ext in table["external"].items():
        lines += [f"## Scored on all of {ext['prepared']} (another source) by each fold's model", "",
                  *_rows(ext["metrics"], n), ""]
    return "\n".join(lines)
