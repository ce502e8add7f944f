"""The ``mammocad`` command line: one typer app, thin wrappers over the library.

Every user-facing failure is one line on stderr, ``mammocad: <file>: <cause>``, with exit status 1.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from mammocad.errors import MammocadError

MODALITY_ADAPTERS = ("folder", "via", "coco")  # the adapters whose images may be of either modality
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        from mammocad import __version__

        typer.echo(f"mammocad {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Breast-lesion detection, classification and segmentation (mammography, ultrasound)."""


def _check_run_options(device: str | None = None, autocast: str | None = None, out: Path | None = None) -> None:
    """Refuse a bad --device, --autocast or --out before any model is loaded or image read, so that a
    typo costs a one-line error, not the work done before the first use of the value."""
    if device is not None:
        from mammocad.devices import resolve_device

        resolve_device(device)
    if autocast is not None:
        from mammocad.tasks.tiling import AUTOCAST

        if autocast not in AUTOCAST:
            raise MammocadError("--autocast", f"must be one of {', '.join(AUTOCAST)}, got {autocast!r}")
    if out is not None:
        from mammocad.io.outdir import check_output_dir

        check_output_dir(out, create=False)  # nothing created before the other arguments are known good


def _parse_options(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise MammocadError("--option", f"expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


@app.command()
def prepare(
    dataset: str = typer.Argument(..., help="adapter name: cbis-ddsm, mias, busi, busbra, via, coco, folder"),
    raw_dir: Path = typer.Argument(..., help="the dataset as downloaded"),
    out_dir: Path = typer.Argument(..., help="where the prepared dataset goes"),
    size: str = typer.Option("1024", help="long side (e.g. 512, 1024) or HxW letterbox (1024x1024, 2750x1100)"),
    clahe: bool = typer.Option(False, help="CLAHE on the full bit depth"),
    intensity_percentile: Optional[float] = typer.Option(None, min=50, max=100, help="MG: percentile of the breast "
                                                         "pixels that becomes white (default 99.5; 100 = the "
                                                         "brightest pixel, the rule of datasets made before it)"),
    workers: int = typer.Option(2, min=1, help="worker processes"),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help="adapter option KEY=VALUE (repeatable)"),
    modality: Optional[str] = typer.Option(None, help="MG | US: the modality of every image (folder adapter); "
                                                      "without it, DICOM files are told by their header and "
                                                      "non-breast modalities (CT, ...) are refused"),
    allow_outside_root: bool = typer.Option(False, help="read annotation paths that point outside RAW_DIR "
                                                        "(absolute paths, '../'); refused by default"),
) -> None:
    """Read a dataset with its adapter, preprocess every case and write a prepared dataset."""
    from mammocad.datasets.prepared import prepare_dataset
    from mammocad.preprocess.pipeline import PreprocessSpec

    extra = {} if intensity_percentile is None else {"intensity_percentile": intensity_percentile}
    spec = PreprocessSpec.from_size_option(size, clahe=clahe, **extra)
    options = _parse_options(option)
    if modality is not None:
        if dataset not in MODALITY_ADAPTERS:  # the others know theirs (CBIS-DDSM, MIAS: MG; BUSI: US)
            raise MammocadError("--modality", f"the {dataset} adapter has a fixed modality; --modality is for "
                                              f"{', '.join(MODALITY_ADAPTERS)}")
        options["modality"] = modality.upper()
    if allow_outside_root:
        options["allow_outside_root"] = "true"
    report = prepare_dataset(dataset, raw_dir, out_dir, spec=spec, workers=workers, adapter_options=options)
    report.print_summary()
    if report.n_failed:
        raise typer.Exit(1)


@app.command()
def combine(
    out_dir: Path = typer.Argument(..., help="where the combined prepared dataset goes"),
    sources: list[Path] = typer.Argument(..., help="two or more prepared datasets, prepared with the same options"),
) -> None:
    """Combine prepared datasets (e.g. BUSI and BUS-BRA) into one, to train and split them together."""
    from mammocad.datasets.combine import combine_prepared

    combine_prepared(sources, out_dir).print_summary()


@app.command()
def split(
    prepared_dir: Path = typer.Argument(..., help="a prepared dataset"),
    val: float = typer.Option(0.15, help="validation fraction (by patient)"),
    test: float = typer.Option(0.15, help="test fraction (by patient); ignored with --official"),
    folds: int = typer.Option(0, help="k folds instead of fractions (0 = fractions)"),
    seed: int = typer.Option(0),
    official: bool = typer.Option(False, help="keep the source's own train/test split (CBIS-DDSM)"),
    keep_crossing: bool = typer.Option(False, help="with --official: keep the patients found in both official "
                                                   "splits (they leak; dropped by default)"),
    official_folds: Optional[str] = typer.Option(None, help="test = each of the source's own patient-grouped folds "
                                                            "(BUS-BRA: cv5, cv10); val = --val of the other patients"),
    cv: bool = typer.Option(False, "--cv", help="with --folds k: cross-validation folds; test = each fold in turn, "
                                                "val = --val of the other patients (what `mammocad cv` runs)"),
    out: Optional[Path] = typer.Option(None, help="output file (default PREPARED_DIR/splits.json)"),
) -> None:
    """Write a patient-grouped, label-stratified, seeded split (splits.json)."""
    from mammocad.datasets.splits import make_splits

    result = make_splits(prepared_dir, val=val, test=test, folds=folds, seed=seed, official=official,
                         keep_crossing=keep_crossing, out=out, official_folds=official_folds, cv=cv)
    result.print_summary()


@app.command()
def audit(
    prepared_dir: Path = typer.Argument(..., help="a prepared dataset"),
    splits: Optional[Path] = typer.Option(None, help="splits file (default PREPARED_DIR/splits.json)"),
    hash_distance: int = typer.Option(4, help="max perceptual-hash Hamming distance for near-duplicates"),
) -> None:
    """Fail (exit 1) when a patient or a near-duplicate image crosses splits."""
    from mammocad.datasets.splits import audit_splits

    report = audit_splits(prepared_dir, splits_path=splits, hash_distance=hash_distance)
    report.print_summary()
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def synth(
    out: Path = typer.Argument(..., help="output folder"),
    n: int = typer.Option(8, "--n", min=1, help="number of images"),
    seed: int = typer.Option(0),
    height: int = typer.Option(1024, help="image height in pixels"),
    width: int = typer.Option(832, help="image width in pixels"),
    layout: str = typer.Option("both", help="cbis-ddsm | folder | both"),
) -> None:
    """Generate synthetic mammograms with exact ground truth (DICOM + PNG, CBIS-DDSM and folder layouts)."""
    from mammocad.synth import write_synthetic_study

    summary = write_synthetic_study(out, n=n, seed=seed, size=(height, width), layout=layout)
    typer.echo(summary)


@app.command()
def train(
    config: Path = typer.Argument(..., help="training config (YAML), e.g. configs/mias_unet.yaml"),
    out: Optional[Path] = typer.Option(None, help="run folder (default runs/<config name>)"),
    resume: bool = typer.Option(False, help="continue from the run folder's checkpoint"),
    epochs: Optional[int] = typer.Option(None, min=1, help="override the epochs (of every stage)"),
    max_minutes: Optional[float] = typer.Option(None, help="time budget: no epoch starts that would end past it"),
    splits: Optional[Path] = typer.Option(None, help="override data.splits (a splits file of the prepared dataset)"),
    fold: Optional[int] = typer.Option(None, min=0, help="override data.fold"),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
) -> None:
    """Train a segmentation or detection model; writes logs, checkpoints and a model bundle (OUT/bundle).
    Multi-GPU / multi-node: launch the same command with torchrun."""
    from mammocad.training.config import load_config, with_overrides
    from mammocad.training.engine import train as run_training

    run_dir = out if out is not None else Path("runs") / config.stem
    cfg = with_overrides(load_config(config), epochs=epochs, max_minutes=max_minutes, splits=splits, fold=fold)
    _check_run_options(device=device, out=run_dir)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the first process holds the folder for all
        run_training(cfg, run_dir, resume=resume, device=device)
        return
    from mammocad.io.outdir import claim_output_dir

    with claim_output_dir(run_dir, "train"):  # a second training run into the same folder is refused
        run_training(cfg, run_dir, resume=resume, device=device)


@app.command()
def cv(
    config: Path = typer.Argument(..., help="training config (YAML): the recipe to cross-validate"),
    out: Path = typer.Option(..., "--out", help="cross-validation folder: splits.json, fold<i>/, cv.json, cv.md"),
    folds: int = typer.Option(5, min=2, help="k, when the folds are made here (no --splits, no data.splits in the config)"),
    fold: Optional[list[int]] = typer.Option(None, help="run only this fold (repeatable): folds as separate processes"),
    splits: Optional[Path] = typer.Option(None, help="a cross-validation splits file (`split --folds k --cv`, or "
                                                     "--official-folds); default: the config's data.splits, else made here"),
    seed: int = typer.Option(0, help="seed of the folds made here"),
    val: float = typer.Option(0.15, help="validation carve of each fold's TRAINING patients (early stopping)"),
    external: Optional[list[Path]] = typer.Option(None, help="a prepared dataset of another source, scored whole by "
                                                             "every fold's model (repeatable)"),
    hit: str = typer.Option("iou0.1+centroid", help="detection hit rule (see evaluate --hit)"),
    n_boot: int = typer.Option(1000, min=0, help="bootstrap resamples of each fold's CIs"),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
) -> None:
    """Patient-grouped k-fold cross-validation of a training config: train each fold, score its held-out
    patients (and --external datasets), write cv.json + cv.md (mean and 95% CI over folds). Resumable."""
    from mammocad.evaluation.cv import run_cv, table_markdown

    _check_run_options(device=device, out=out)
    result = run_cv(config, out, folds=folds, only=fold, splits=splits, seed=seed, val=val, external=external or [],
                    hit=hit, n_boot=n_boot, device=device)
    if result.table is None:
        typer.echo(f"folds scored: {result.done} of {result.n_folds}; the table is written when every fold is scored")
        return
    typer.echo(table_markdown(result.table))
    typer.echo(f"wrote {out / 'cv.json'} and {out / 'cv.md'}")


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(..., help="image files (DICOM, PNG, PGM, JPEG, TIFF) and/or folders (searched recursively)"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    model: Optional[str] = typer.Option(None, help="bundle name or folder (default: by modality, "
                                                   "mammo-lesion-seg for MG, us-lesion-seg for US); a pipeline "
                                                   "bundle also classifies each lesion and labels the image"),
    modality: Optional[str] = typer.Option(None, help="MG | US: the modality of plain images (PNG, JPEG, ...), which "
                                                      "carry none (without it MG is assumed, and the outputs say so); "
                                                      "DICOM files are told by their header"),
    overwrite: bool = typer.Option(False, help="redo inputs whose JSON already exists (default: skip them)"),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="tiles per forward pass (default: the bundle's)"),
    autocast: str = typer.Option("auto", help="auto (bf16 where the CPU/GPU computes it natively) | bf16 | fp32"),
    max_pixels: Optional[float] = typer.Option(None, help="refuse images with more megapixels than this before "
                                                          "decoding them (default: the library's limit)"),
) -> None:
    """Find lesions: per input <stem>.json, <stem>_mask.png, <stem>_lesion<k>.png and <stem>_overlay.png,
    all in the original image's pixels; summary.json at the end. Exit 1 if any input failed."""
    from mammocad.inference.predict_run import predict_files

    _check_run_options(device=device, autocast=autocast, out=out)
    extra = {} if max_pixels is None else {"max_pixels": int(max_pixels * 1e6)}
    report = predict_files(inputs, out, model=model, modality=modality, overwrite=overwrite, device=device,
                           batch_size=batch_size, autocast=autocast, **extra)
    report.print_summary()
    if report.n_failed:
        raise typer.Exit(1)


@app.command()
def evaluate(
    prepared_dir: Path = typer.Argument(..., help="a prepared dataset (with splits.json unless --split all)"),
    model: Optional[str] = typer.Option(None, help="bundle name or folder: run on each case's ORIGINAL image exactly as "
                                                   "`predict` does, then scored on the prepared grid"),
    predictions: Optional[Path] = typer.Option(None, help="or: the output folder of `mammocad predict` to score"),
    split: str = typer.Option("val", help="train | val | test | all"),
    fold: int = typer.Option(0, min=0),
    out: Path = typer.Option(Path("eval_out"), "--out", help="where metrics.json and metrics.md go"),
    splits: Optional[Path] = typer.Option(None, help="splits file (default PREPARED_DIR/splits.json)"),
    n_boot: int = typer.Option(2000, min=0, help="bootstrap resamples (patients) for the 95% CIs"),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
    autocast: str = typer.Option("auto", help="auto (bf16 where the CPU/GPU computes it natively) | bf16 | fp32"),
    candidate_threshold: Optional[float] = typer.Option(None, help="lesion probability from which candidates are "
                                                                   "kept for the FROC curve (default: the library's)"),
    hit: str = typer.Option("iou0.1+centroid", help="when a component finds a lesion: iou0.1+centroid (the MIAS "
                                                    "papers'), iou0.1, iou0.5, centroid; written into the report"),
    unknown_pathology: Optional[str] = typer.Option(None, help="ground truth of unknown-pathology lesions: "
                                                               "lesion|ignore|background (2 classes, default lesion), "
                                                               "ignore|background|benign|malignant (3, default ignore)"),
) -> None:
    """Score a segmentation or detection bundle, saved predictions, or a classifier bundle on a prepared
    split: Dice/IoU, mIoU, FP area, lesion detection (FROC, COCO AP); for a classifier confusion matrix,
    P/R/F1, ROC AUC, calibration; patient-bootstrap CIs -> metrics.json + metrics.md (+ PNG curves)."""
    from mammocad.evaluation.run import evaluate_prepared, print_headline

    if (model is None) == (predictions is None):
        raise MammocadError("evaluate", "give exactly one of --model and --predictions")
    _check_run_options(device=device, autocast=autocast, out=out)
    report = evaluate_prepared(model if model is not None else predictions, prepared_dir, split=split, fold=fold,
                               out_dir=out, splits_path=splits, device=device, autocast=autocast, n_boot=n_boot,
                               source_kind="model" if model is not None else "predictions", hit=hit,
                               candidate_threshold=candidate_threshold, unknown_pathology=unknown_pathology)
    print_headline(report)
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="output folder"),
    n: int = typer.Option(8, "--n", min=1, help="synthetic images (4 per patient)"),
) -> None:
    """Synthetic study -> prepared dataset -> preview PNGs and a printed summary."""
    from mammocad.demo import run_demo

    _check_run_options(out=out)
    run_demo(out, n=n)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="mammocad: %(message)s")
    try:
        code = app(args=argv, standalone_mode=False)  # without standalone mode a typer.Exit comes back as its code
    except MammocadError as err:
        typer.echo(f"mammocad: {err}", err=True)
        sys.exit(1)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("mammocad: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own message (typer vendors click: no `import click`)
        if isinstance(exc, typer.TyperException) and hasattr(exc, "show"):
            exc.show()
            sys.exit(getattr(exc, "exit_code", 2))
        raise
    if isinstance(code, int) and code:
        if code == 130:  # without standalone mode typer hands a Ctrl-C back as Exit(130), unsaid
            typer.echo("mammocad: interrupted", err=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
