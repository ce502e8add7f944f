"""The ``mammocad`` command line: one typer app, thin wrappers over the library.

Every user-facing failure is one line on stderr, ``mammocad: <file>: <cause>``, with exit status 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from mammocad.errors import MammocadError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Breast-lesion detection, classification and segmentation (mammography, ultrasound).")


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
    dataset: str = typer.Argument(..., help="adapter name: cbis-ddsm, mias, busi, via, coco, folder"),
    raw_dir: Path = typer.Argument(..., help="the dataset as downloaded"),
    out_dir: Path = typer.Argument(..., help="where the prepared dataset goes"),
    size: str = typer.Option("1024", help="long side (e.g. 512, 1024) or HxW letterbox (1024x1024, 2750x1100)"),
    clahe: bool = typer.Option(False, help="CLAHE on the full bit depth"),
    workers: int = typer.Option(2, min=1, help="worker processes"),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help="adapter option KEY=VALUE (repeatable)"),
) -> None:
    """Read a dataset with its adapter, preprocess every case and write a prepared dataset."""
    from mammocad.datasets.prepared import prepare_dataset
    from mammocad.preprocess.pipeline import PreprocessSpec

    spec = PreprocessSpec.from_size_option(size, clahe=clahe)
    report = prepare_dataset(dataset, raw_dir, out_dir, spec=spec, workers=workers, adapter_options=_parse_options(option))
    report.print_summary()
    if report.n_failed:
        raise typer.Exit(1)


@app.command()
def split(
    prepared_dir: Path = typer.Argument(..., help="a prepared dataset"),
    val: float = typer.Option(0.15, help="validation fraction (by patient)"),
    test: float = typer.Option(0.15, help="test fraction (by patient); ignored with --official"),
    folds: int = typer.Option(0, help="k folds instead of fractions (0 = fractions)"),
    seed: int = typer.Option(0),
    official: bool = typer.Option(False, help="keep the source's own train/test split (CBIS-DDSM)"),
    drop_crossing: bool = typer.Option(False, help="with --official: remove patients found in both official splits"),
    out: Optional[Path] = typer.Option(None, help="output file (default PREPARED_DIR/splits.json)"),
) -> None:
    """Write a patient-grouped, label-stratified, seeded split (splits.json)."""
    from mammocad.datasets.splits import make_splits

    result = make_splits(prepared_dir, val=val, test=test, folds=folds, seed=seed, official=official,
                         drop_crossing=drop_crossing, out=out)
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
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
) -> None:
    """Train a segmentation model; writes logs, checkpoints and a model bundle (OUT/bundle).
    Multi-GPU / multi-node: launch the same command with torchrun."""
    from mammocad.training.config import load_config, with_overrides
    from mammocad.training.engine import train as run_training

    cfg = with_overrides(load_config(config), epochs=epochs, max_minutes=max_minutes)
    run_training(cfg, out if out is not None else Path("runs") / config.stem, resume=resume, device=device)


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(..., help="image files (DICOM, PNG, PGM, JPEG, TIFF) and/or folders (searched recursively)"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    model: Optional[str] = typer.Option(None, help="bundle name or folder (default: by modality, "
                                                   "mammo-lesion-seg for MG, us-lesion-seg for US)"),
    modality: str = typer.Option("MG", help="MG | US: the modality of plain images (PNG, JPEG, ...), which carry "
                                            "none; DICOM files are told by their header"),
    overwrite: bool = typer.Option(False, help="redo inputs whose JSON already exists (default: skip them)"),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="tiles per forward pass (default: the bundle's)"),
    autocast: str = typer.Option("auto", help="auto (bf16 where the CPU/GPU computes it natively) | bf16 | fp32"),
) -> None:
    """Find lesions: per input <stem>.json, <stem>_mask.png, <stem>_lesion<k>.png and <stem>_overlay.png,
    all in the original image's pixels; summary.json at the end. Exit 1 if any input failed."""
    from mammocad.inference.predict_run import predict_files

    report = predict_files(inputs, out, model=model, modality=modality, overwrite=overwrite, device=device,
                           batch_size=batch_size, autocast=autocast)
    report.print_summary()
    if report.n_failed:
        raise typer.Exit(1)


@app.command()
def evaluate(
    prepared_dir: Path = typer.Argument(..., help="a prepared dataset (with splits.json unless --split all)"),
    model: Optional[str] = typer.Option(None, help="bundle name or folder to run on the split's prepared images"),
    predictions: Optional[Path] = typer.Option(None, help="or: the output folder of `mammocad predict` to score"),
    split: str = typer.Option("val", help="train | val | test | all"),
    fold: int = typer.Option(0, min=0),
    out: Path = typer.Option(Path("eval_out"), "--out", help="where metrics.json and metrics.md go"),
    splits: Optional[Path] = typer.Option(None, help="splits file (default PREPARED_DIR/splits.json)"),
    n_boot: int = typer.Option(2000, min=0, help="bootstrap resamples (patients) for the 95% CIs"),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
    autocast: str = typer.Option("auto", help="auto (bf16 where the CPU/GPU computes it natively) | bf16 | fp32"),
) -> None:
    """Score a segmentation bundle or saved predictions on a prepared split: Dice/IoU, mIoU, FP area,
    lesion detection (FROC), patient-bootstrap CIs -> metrics.json + metrics.md."""
    from mammocad.evaluation.run import evaluate_prepared, print_headline

    if (model is None) == (predictions is None):
        raise MammocadError("evaluate", "give exactly one of --model and --predictions")
    report = evaluate_prepared(model if model is not None else predictions, prepared_dir, split=split, fold=fold,
                               out_dir=out, splits_path=splits, device=device, autocast=autocast, n_boot=n_boot)
    print_headline(report)
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="output folder"),
    n: int = typer.Option(8, "--n", min=1, help="synthetic images (4 per patient)"),
) -> None:
    """Synthetic study -> prepared dataset -> preview PNGs and a printed summary."""
    from mammocad.demo import run_demo

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
        sys.exit(code)


if __name__ == "__main__":
    main()
