"""``mammocad demo``: the whole data path on a synthetic study, with outputs a person can look at.

synthetic MG DICOMs (CBIS-DDSM layout) -> cbis-ddsm adapter -> preprocessing -> prepared dataset
-> patient split -> preview PNGs (prepared image with ground-truth contours) -> the shipped default
mammography model (`mammo-lesion-seg`) on the synthetic DICOMs, with the `mammocad predict` outputs.

The output folder is claimed (``io.outdir``) for the whole run; a re-run into it redoes the study
and resumes the rest (prepare and predict skip what is done). A study of one patient (n <= 4
images) gets no validation split: a patient split needs two patients.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mammocad.errors import ConfigError
from mammocad.io.images import write_png
from mammocad.io.outdir import claim_output_dir

IMAGES_PER_PATIENT = 4  # the synthetic study's layout: CC and MLO of both breasts


def run_demo(out: Path, n: int = 8, seed: int = 0, console: Console | None = None) -> dict:
    """Run the demo into ``out`` (see the module docstring); returns where things went."""
    if int(n) < 1:
        raise ConfigError("--n", f"must be at least 1, got {n}")
    console = console or Console()
    with claim_output_dir(out, "demo") as claimed:
        return _run_demo(claimed, int(n), seed, console)


def _run_demo(out: Path, n: int, seed: int, console: Console) -> dict:
    from mammocad.datasets.prepared import PreparedDataset, prepare_dataset
    from mammocad.datasets.splits import make_splits
    from mammocad.preprocess.pipeline import PreprocessSpec
    from mammocad.synth import write_synthetic_study
    from mammocad.visualize import draw_overlay

    raw = out / "raw"
    console.print(f"[bold]1/5[/] synthetic study -> {raw}")
    console.print(write_synthetic_study(raw, n=n, seed=seed, layout="cbis-ddsm"))

    prepared_dir = out / "prepared"
    console.print(f"[bold]2/5[/] prepare (cbis-ddsm adapter, long side 1024, CLAHE) -> {prepared_dir}")
    spec = PreprocessSpec.from_size_option("1024", clahe=True)
    report = prepare_dataset("cbis-ddsm", raw / "cbis-ddsm", prepared_dir, spec=spec,
                             workers=max(1, min(2, os.cpu_count() or 1)), adapter_options={})
    report.print_summary()

    ds = PreparedDataset(prepared_dir)
    n_patients = len({pc.case.patient_id for pc in ds.cases})
    console.print("[bold]3/5[/] patient-level split")
    # A demo study is a handful of patients: half of them for validation, no test split; with one
    # patient there is nothing to hold out (sklearn cannot split one sample), so all of it is train.
    val = 0.5 if n_patients >= 2 else 0.0
    if not val:
        console.print(f"one patient ({n} images): no validation split (use --n {2 * IMAGES_PER_PATIENT} or more for one)")
    split = make_splits(prepared_dir, val=val, test=0.0, seed=seed, official=False)
    split.print_summary()

    previews = out / "previews"
    console.print(f"[bold]4/5[/] preview PNGs -> {previews}")
    table = Table(title="demo cases")
    for col in ("case", "patient", "side/view", "label", "lesions", "preview"):
        table.add_column(col)
    for pc in ds.cases:
        masks = [m for m in ds.load_lesion_masks(pc) if m is not None]
        labels = [les.pathology for les in pc.case.lesions if les.has_geometry]
        texts = [f"{les.pathology} {les.kind}" for les in pc.case.lesions if les.has_geometry]
        path = previews / f"{pc.case.case_id}.png"
        write_png(path, draw_overlay(ds.load_image(pc), masks, labels, texts))
        table.add_row(pc.case.case_id, pc.case.patient_id, f"{pc.case.laterality}/{pc.case.view}", pc.case.label,
                      str(len(pc.case.lesions)), str(path))
    console.print(table)

    from mammocad.inference.predict_run import predict_files

    predictions = out / "predictions"
    images = sorted({Path(pc.case.image_path) for pc in ds.cases})
    console.print(f"[bold]5/5[/] default model on the {len(images)} synthetic DICOMs (chosen by modality) -> {predictions}")
    report = predict_files(images, predictions)
    report.print_summary()
    return {"prepared": str(prepared_dir), "previews": str(previews), "n_cases": len(ds.cases),
            "predictions": str(predictions), "n_predicted": len(images) - report.n_failed}
