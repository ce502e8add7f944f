"""Training throughput (patches/s) of the mammocad engine against a bare PyTorch loop (a script, not a test).

Both train the same model (same seed, same architecture), on the same data (the same ``PatchDataset``
over a synthetic prepared dataset: balanced patches, augmentation on), with the same batch size,
DataLoader workers, torch threads, optimizer and loss, for the same number of epochs. The bare loop is
the plain for-loop: forward, loss, zero_grad, backward, step. The engine's time is everything its
epochs take (progress, loss all-reduce, LR schedule, CSV + TensorBoard + PNG logs, checkpoint and
best-weights writes per epoch), without the one-time setup and the final validation/bundle; validation
during training is off (``val_every: 0``) because the bare loop has none. Runs alternate (who goes
first too) and the median of ``--repeats`` is compared, which damps the noise of a shared machine;
both wall-clock and CPU-time throughput are printed. Target: overhead <= 10 %.

    .venv/bin/python benchmarks/bench_train.py [--epochs 3] [--patches 256] [--patch 64] [--batch 8]
        [--threads 1] [--workers 0] [--amp none] [--repeats 5] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_prepared(root: Path, n: int = 8) -> Path:
    """Synthetic mammograms (folder layout) -> prepared at long side 256 + a hand-written split."""
    from mammocad.datasets.prepared import PreparedDataset, prepare_dataset
    from mammocad.preprocess.pipeline import PreprocessSpec
    from mammocad.synth import write_synthetic_study

    prepared = root / "prepared"
    if (prepared / "splits.json").is_file():
        return prepared
    write_synthetic_study(root / "raw", n=n, seed=0, size=(512, 416), layout="folder")
    prepare_dataset("folder", root / "raw" / "folder", prepared, spec=PreprocessSpec(long_side=256), workers=1,
                    progress=False)
    ids = [pc.case_id for pc in PreparedDataset(prepared).cases]
    lesion = [pc.case_id for pc in PreparedDataset(prepared).cases if pc.case.lesions]
    val = [lesion[-1]]
    split = {"version": 1, "folds": [{"train": [c for c in ids if c not in val], "val": val, "test": []}]}
    (prepared / "splits.json").write_text(json.dumps(split))
    return prepared


def make_config(prepared: Path, args: argparse.Namespace):
    from mammocad.training.config import parse_config

    return parse_config({
        "data": {"prepared": str(prepared), "num_classes": 1},
        "model": {"name": "unet", "kwargs": {"base_channels": 8, "depth": 3}},
        "loss": {"name": "bce"},
        "sampling": {"kind": "balanced", "patch": args.patch, "n_per_epoch": args.patches, "batch_size": args.batch,
                     "workers": args.workers, "fractions": {"lesion": 0.5, "tissue": 0.4, "background": 0.1}},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-3,
                  "schedule": {"kind": "step", "every": 10, "gamma": 0.3}},
        "train": {"epochs": args.epochs, "val_every": 0, "amp": args.amp, "threads": args.threads, "seed": 0,
                  "final_n_boot": 0},
        "inference": {"tile": 256},
    }, source="bench_train")


def run_engine(cfg, out: Path) -> tuple[float, float, float]:
    """(patches/s over whole epochs: wall clock, CPU time; patches/s of the batch loop alone)."""
    from mammocad.training.engine import train

    shutil.rmtree(out, ignore_errors=True)
    result = train(cfg, out, progress=False)
    patches = sum(int(r["patches"]) for r in result.history)
    loop_s = sum(float(r["train_seconds"]) for r in result.history)
    return patches / result.timings["epochs"], patches / result.timings["epochs_cpu"], patches / loop_s


def run_bare(cfg) -> tuple[float, float]:
    """The plain PyTorch loop on the same dataset, model, optimizer and loss."""
    from mammocad.datasets.prepared import PreparedDataset
    from mammocad.models import create_model
    from mammocad.tasks.segment import build_train_dataset, load_split
    from mammocad.training import builders as B

    torch.set_num_threads(cfg.train.threads)
    samples, _ = load_split(cfg, PreparedDataset(cfg.data.prepared), "train")
    dataset = build_train_dataset(cfg, samples)
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, num_classes=1, **cfg.model.kwargs)
    loss_fn = B.build_loss(cfg)  # the configured loss, as the engine builds it
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.sampling.batch_size, shuffle=True,
                                         num_workers=cfg.sampling.workers, generator=torch.Generator().manual_seed(0))
    autocast_dtype = torch.bfloat16 if cfg.train.amp == "bf16" else None
    model.train()
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    for epoch in range(1, cfg.train.epochs + 1):
        dataset.set_epoch(epoch)
        for image, target in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_dtype is not None):
                logits = model(image)
            loss = loss_fn(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += image.shape[0]
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--patches", type=int, default=256, help="patches per epoch")
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--amp", default="none", choices=["none", "bf16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()

    work = args.data or Path(tempfile.mkdtemp(prefix="bench_train_"))
    cfg = make_config(make_prepared(work), args)
    bare, bare_cpu, engine, engine_cpu, loop = [], [], [], [], []
    for i in range(args.repeats):
        for side in ("bare", "engine") if i % 2 == 0 else ("engine", "bare"):  # alternate who goes first
            if side == "bare":
                wall, cpu = run_bare(cfg)
                bare.append(wall)
                bare_cpu.append(cpu)
            else:
                wall, cpu, lp = run_engine(cfg, work / "run")
                engine.append(wall)
                engine_cpu.append(cpu)
                loop.append(lp)

    def runs(xs: list[float]) -> str:
        return ", ".join(f"{x:.1f}" for x in xs)

    print(f"model unet(base 8, depth 3), {args.patches} patches/epoch of {args.patch} px, batch {args.batch}, "
          f"{args.epochs} epochs, threads {args.threads}, workers {args.workers}, amp {args.amp}")
    med = statistics.median
    print(f"bare PyTorch loop : {med(bare):8.1f} patches/s wall, {med(bare_cpu):8.1f} per CPU-second   "
          f"(runs: {runs(bare)} / {runs(bare_cpu)})")
    print(f"mammocad engine   : {med(engine):8.1f} patches/s wall, {med(engine_cpu):8.1f} per CPU-second   "
          f"(runs: {runs(engine)} / {runs(engine_cpu)}; batch loop alone {med(loop):.1f} wall)")
    # Medians of the runs. CPU time is what a busy shared machine distorts least (with --workers 0 and
    # 1 thread it is all the work); wall clock is what a user waits for.
    for what, b, e in (("wall clock", med(bare), med(engine)), ("CPU time", med(bare_cpu), med(engine_cpu))):
        overhead = b / e - 1.0
        print(f"engine / bare ({what:10s}): {e / b:6.3f}   overhead {100 * overhead:+5.1f} %  (target <= 10 %: "
              f"{'PASS' if overhead <= 0.10 else 'FAIL'})")


if __name__ == "__main__":
    main()
