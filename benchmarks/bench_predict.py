"""End-to-end ``predict`` latency and peak RSS with the default mammography model (a script, not a test).

Issue 3, 10a: the shipped ``mammo-lesion-seg`` bundle on (1) a prepared image (the model's own
input size) and (2) end to end on a synthetic 3328x4084 12-bit JPEG-Lossless MG DICOM: decode + VOI
+ preprocessing + tiled inference + post-processing + mapping back to the original grid, and then
the output files (`<stem>.json`, `_mask.png`, `_lesion<k>.png`, `_overlay.png`) at the original
size. One fresh process per measurement group so the peak RSS (VmHWM) is that of predict alone.
Targets: <= 1.0 s end to end on 2 cores, peak RSS <= 1.5 GB. The MONAI comparison on the same
network is ``benchmarks/bench_tiling.py``.

    .venv/bin/python benchmarks/bench_predict.py [--runs 5] [--threads 2] [--model mammo-lesion-seg]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from mammocad.inference.predict_run import write_outputs
    from mammocad.inference.predictor import Predictor
    from mammocad.io.images import read_image

    rss_import = _vmhwm_mb()
    predictor = Predictor(args.model, device="cpu")
    dicom = Path(args.work) / "mammo.dcm"
    out = Path(args.work) / "out"
    out.mkdir(exist_ok=True)
    # warm-up (first-call allocations, oneDNN kernel selection)
    predictor.predict_image(dicom)
    t_read, t_pred, t_write, t_prepared = [], [], [], []
    image = read_image(dicom)
    from mammocad.preprocess.pipeline import preprocess_image

    pre = preprocess_image(image, predictor.settings.spec, laterality=image.meta.get("laterality"))
    for _ in range(args.runs):
        t0 = time.perf_counter()
        img = read_image(dicom)
        t1 = time.perf_counter()
        result = predictor.predict_image(img)
        t2 = time.perf_counter()
        write_outputs(out, "mammo", img, result)
        t3 = time.perf_counter()
        probs = predictor.infer(pre.pixels, pre.breast_mask)
        predictor.lesions(probs, pre.breast_mask)
        t4 = time.perf_counter()
        t_read.append(t1 - t0), t_pred.append(t2 - t1), t_write.append(t3 - t2), t_prepared.append(t4 - t3)
    med = statistics.median
    print(json.dumps({
        "prepared_size": list(pre.pixels.shape), "original_size": list(image.shape),
        "prepared_image_s": med(t_prepared), "dicom_read_s": med(t_read),
        "predict_image_s": med(t_pred), "end_to_end_no_files_s": med(t_read) + med(t_pred),
        "write_outputs_s": med(t_write), "end_to_end_with_files_s": med(t_read) + med(t_pred) + med(t_write),
        "rss_after_imports_mb": rss_import, "peak_rss_mb": _vmhwm_mb(),
        "lesions": len(result.prediction.lesions), "threads": args.threads, "runs": args.runs,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="mammo-lesion-seg")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    import numpy as np

    from mammocad.synth import write_synthetic_dicom

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_synthetic_dicom(Path(tmp) / "mammo.dcm", np.random.default_rng(7), size=(4084, 3328),
                              transfer_syntax="jpeg-lossless")
        print(f"synthetic 3328x4084 12-bit JPEG-Lossless MG DICOM written in {time.perf_counter() - t:.1f} s")
        cmd = [sys.executable, __file__, "--worker", "--work", tmp, "--runs", str(args.runs),
               "--threads", str(args.threads), "--model", args.model]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(f"model {args.model}, {res['threads']} thread(s), median of {res['runs']} runs")
    print(f"  prepared image {res['prepared_size']}: inference + post-processing  {res['prepared_image_s']:.3f} s")
    print(f"  original {res['original_size']}: DICOM decode+VOI {res['dicom_read_s']:.3f} s, "
          f"predict_image {res['predict_image_s']:.3f} s")
    print(f"  end to end (read + predict, results in memory)   {res['end_to_end_no_files_s']:.3f} s  (target <= 1.0 s)")
    print(f"  writing JSON + masks + overlay at original size  {res['write_outputs_s']:.3f} s")
    print(f"  end to end with output files                     {res['end_to_end_with_files_s']:.3f} s")
    print(f"  peak RSS {res['peak_rss_mb']:.0f} MB (after imports {res['rss_after_imports_mb']:.0f} MB; target <= 1536 MB)")


if __name__ == "__main__":
    main()
