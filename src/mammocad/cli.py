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
def demo(
    out: Path = typer.Option(Path("demo_out"), help="output folder"),
    n: int = typer.Option(4, "--n", min=1, help="synthetic images"),
) -> None:
    """Synthetic study -> prepared dataset -> preview PNGs and a printed summary."""
    from mammocad.demo import run_demo

    run_demo(out, n=n)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="mammocad: %(message)s")
    try:
        app(args=argv, standalone_mode=False)
    except MammocadError as err:
        typer.echo(f"mammocad: {err}", err=True)
        sys.exit(1)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("mammocad: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own message
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
