"""Tiled inference: ``predict_tiled`` vs MONAI's ``sliding_window_inference`` (a script, not a test).

Same network (the shipped ``mammo-lesion-seg`` bundle when present, else a random-init
``unet(base_channels=16, depth=4)``), same window size, overlap, Gaussian blending and batch size, on
the input ``predict_tiled`` really gets: a synthetic 2048x1664 mammogram prepared by
``preprocess_image`` (cropped to the breast, long side 1024; the bundle's spec, else the default)
with its breast mask. Timing: both engines in one process, variants interleaved round by round so
a busy machine slows all alike; median / min wall time and median process CPU time (all threads) of
``--runs`` runs after one warm-up. Peak RSS: one clean process per engine (MONAI is not imported by
ours), VmHWM reset through /proc/self/clear_refs before each run, next to the RSS before any run
(torch + model). Dice between each variant's thresholded output and MONAI's (inside the breast,
where lesions are kept, and over the whole image), plus the Dice against the synthetic ground truth
when the model is trained. ``--uncropped`` skips the crop to the breast (about half the image is
air then, as in a raw mammogram): that is where skipping windows without breast pays.

    .venv/bin/python benchmarks/bench_tiling.py [--tile 256] [--overlap 0.25] [--batch-size 4] [--runs 10] [--threads 2] [--uncropped]

On a machine shared with other jobs, ``--threads 1`` gives steady figures (two OpenMP threads stall
whenever one is descheduled: medians then swing 5x between runs).

Targets (issue 3, 10a): >= 2x faster than MONAI at equal Dice, peak RSS <= 1.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BUNDLE = "mammo-lesion-seg"
OURS = ("ours fp32", "ours bf16", "ours fp32 NCHW", "ours fp32 no mask")
MONAI = ("monai fp32", "monai bf16", "monai fp32 ch-last", "monai bf16 ch-last")


# ------------------------------------------------------------------------------ worker process


def _memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _load_model(work: Path):
    from safetensors.torch import load_model

    from mammocad.models import model_from_config

    model = model_from_config(json.loads((work / "arch.json").read_text()))
    load_model(model, str(work / "model.safetensors"))
    return model.eval()


def _runners(engine: str, model, image: np.ndarray, breast: np.ndarray, args: argparse.Namespace) -> dict:
    """variant -> (callable returning the (C, H, W) probabilities, (windows run, windows in the layout))."""
    import torch

    from mammocad.tasks.tiling import plan_tiles, predict_tiled

    plan = plan_tiles(image.shape, args.tile, args.overlap, size_divisor=model.size_divisor, breast_mask=breast)
    total, kept = len(plan.starts), int(plan.keep.sum())
    runners = {}
    if engine in ("ours", "both"):
        import copy

        # predict_tiled converts no weights (threads share the model): channels-last weights are the caller's job
        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        for v in OURS:
            def run(v=v):
                return predict_tiled(model if "NCHW" in v else cl_model, image, tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
                                     breast_mask=None if "no mask" in v else breast,
                                     autocast="bf16" if "bf16" in v else "fp32", channels_last="NCHW" not in v)
            runners[v] = (run, (total if "no mask" in v else kept, total))
    if engine in ("monai", "both"):
        import copy

        from monai.inferers import sliding_window_inference

        nets = {"nchw": model, "cl": copy.deepcopy(model).to(memory_format=torch.channels_last)}
        for v in MONAI:
            def run(v=v):
                x = torch.from_numpy(image)[None, None]
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in v):
                    logits = sliding_window_inference(x, args.tile, args.batch_size, nets["cl" if "ch-last" in v else "nchw"],
                                                      overlap=args.overlap, mode="gaussian").float()
                prob = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
                return prob[0].numpy()
            runners[v] = (run, (total, total))
    return runners


def worker(engine: str, work: Path, args: argparse.Namespace) -> None:
    """``both``: all variants interleaved round by round (timing, outputs); ``ours`` / ``monai``: a clean
    process per engine for its peak RSS (MONAI's import alone adds ~150 MB)."""
    import torch

    torch.set_num_threads(args.threads)
    image = np.load(work / "image.npy")
    breast = np.load(work / "breast.npy")
    runners = _runners(engine, _load_model(work), image, breast, args)
    runs = args.runs if engine == "both" else 2
    times: dict[str, list[float]] = {v: [] for v in runners}
    cpu: dict[str, list[float]] = {v: [] for v in runners}
    peaks: dict[str, int] = {v: 0 for v in runners}
    baseline = _memory_kb("VmRSS")
    for v, (run, _) in runners.items():  # warm-up: oneDNN builds its kernels for each shape / dtype once
        out = run()
        if engine == "both":
            np.save(work / f"{v}.npy", out)
        del out
    for _ in range(runs):
        for v, (run, _) in runners.items():
            _reset_peak()
            t, c = time.perf_counter(), time.process_time()
            run()
            times[v].append(time.perf_counter() - t)
            cpu[v].append(time.process_time() - c)
            peaks[v] = max(peaks[v], _memory_kb("VmHWM"))
    result = {v: {"times": times[v], "cpu": cpu[v], "peak_kb": peaks[v], "baseline_kb": baseline,
                  "windows": runners[v][1]} for v in runners}
    (work / f"{engine}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------ parent process


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def prepare_inputs(work: Path, seed: int, uncropped: bool) -> tuple[float | None, str]:
    """Write image/breast/ground truth/model for the workers; returns (trained threshold or None, model words)."""
    import torch
    from safetensors.torch import save_model

    from mammocad.io.images import LoadedImage
    from mammocad.models import create_model, model_config
    from mammocad.preprocess.pipeline import PreprocessSpec, preprocess_image
    from mammocad.synth import synthesize_mammogram

    mg = synthesize_mammogram(np.random.default_rng(seed), size=(2048, 1664), n_masses=2, n_calc_clusters=1)
    truth = np.zeros(mg.image.shape, bool)
    for les in mg.lesions:
        truth |= les.mask
    threshold, words, spec = None, "random-init unet(base_channels=16, depth=4)", PreprocessSpec()
    from mammocad.models.bundle import list_bundles, load_bundle

    if BUNDLE in list_bundles():
        model, card = load_bundle(BUNDLE)
        spec, threshold = card.preprocessing, card.thresholds.probability  # a validated ModelCard
        words = f"shipped bundle {BUNDLE} ({card.architecture.name})"
    else:
        torch.manual_seed(seed)
        model = create_model("unet", in_channels=1, num_classes=1, base_channels=16, depth=4)
    if uncropped:
        spec = spec.model_copy(update={"crop_to_breast": False})
    pre = preprocess_image(LoadedImage(pixels=mg.image, path="synthetic", meta={"modality": "MG"}), spec,
                           laterality=mg.laterality)
    np.save(work / "image.npy", pre.pixels.astype(np.float32))
    np.save(work / "breast.npy", pre.breast_mask)
    np.save(work / "truth.npy", pre.geometry.forward_array(truth, kind="mask"))
    (work / "arch.json").write_text(json.dumps(model_config(model)))
    save_model(model, str(work / "model.safetensors"))
    return threshold, words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--uncropped", action="store_true", help="prepare without cropping to the breast (more air)")
    ap.add_argument("--worker", choices=("both", "ours", "monai"), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.work, args)
        return

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_tiling_") as tmp:
        work = Path(tmp)
        threshold, words = prepare_inputs(work, args.seed, args.uncropped)
        passthrough = [f"--tile={args.tile}", f"--overlap={args.overlap}", f"--batch-size={args.batch_size}",
                       f"--runs={args.runs}", f"--threads={args.threads}"]
        for engine in ("both", "ours", "monai"):
            subprocess.run([sys.executable, __file__, "--worker", engine, "--work", str(work), *passthrough], check=True)
        results = json.loads((work / "both.json").read_text())
        clean = {**json.loads((work / "ours.json").read_text()), **json.loads((work / "monai.json").read_text())}
        breast, truth = np.load(work / "breast.npy"), np.load(work / "truth.npy")
        outputs = {v: np.load(work / f"{v}.npy") for v in results}

    def lesion(p: np.ndarray) -> np.ndarray:
        return p[0] if p.shape[0] == 1 else 1.0 - p[0]

    # A random-init net has no meaningful 0.5: threshold at MONAI fp32's median inside the breast, so half
    # the breast is "lesion" and every near-threshold pixel can flip (the hardest case for agreement).
    ref = lesion(outputs["monai fp32"])
    thr = threshold if threshold is not None else float(np.median(ref[breast]))
    masks = {v: lesion(p) >= thr for v, p in outputs.items()}
    print(f"model: {words}; image {breast.shape[0]}x{breast.shape[1]}, breast {breast.mean():.0%} of it; "
          f"tile {args.tile}, overlap {args.overlap}, batch {args.batch_size}, {args.threads} threads, "
          f"{args.runs} runs; threshold {thr:.4f}; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    header = f"{'variant':20s} {'windows':>8s} {'median s':>9s} {'min s':>6s} {'CPU s':>6s} {'peak RSS MB':>11s} " \
             f"{'Dice vs MONAI breast/image':>26s} {'Dice truth':>10s} {'speed-up wall/CPU':>18s}"
    print(header)
    print("-" * len(header))
    base, base_cpu = (float(np.median(results["monai fp32"][k])) for k in ("times", "cpu"))
    for v, r in results.items():
        ref_name = "monai bf16" if "bf16" in v else "monai fp32"
        m, mr = masks[v], masks[ref_name]
        med, med_cpu = float(np.median(r["times"])), float(np.median(r["cpu"]))
        gt = f"{dice(m & breast, truth):.3f}" if threshold is not None else "n/a"
        print(f"{v:20s} {r['windows'][0]:>3d}/{r['windows'][1]:<4d} {med:9.3f} {min(r['times']):6.3f} {med_cpu:6.2f} "
              f"{clean[v]['peak_kb'] / 1024:11.0f} {dice(m[breast], mr[breast]):>17.4f} / {dice(m, mr):.4f} {gt:>10s} "
              f"{base / med:10.2f}x/{base_cpu / med_cpu:.2f}x")
    print(f"peak RSS: each engine in its own process; RSS before any run (torch + model loaded): "
          f"ours {clean['ours fp32']['baseline_kb'] / 1024:.0f} MB, MONAI {clean['monai fp32']['baseline_kb'] / 1024:.0f} MB")
    for ours, theirs in (("ours bf16", "monai fp32"), ("ours bf16", "monai bf16 ch-last"), ("ours fp32", "monai fp32 ch-last")):
        a, b = results[ours], results[theirs]
        print(f"{ours} vs {theirs}: wall {np.median(b['times']) / np.median(a['times']):.2f}x, "
              f"min wall {min(b['times']) / min(a['times']):.2f}x, CPU {np.median(b['cpu']) / np.median(a['cpu']):.2f}x")


if __name__ == "__main__":
    main()
