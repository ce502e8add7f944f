"""Throughput and peak memory of ``prepare_dataset`` on full-size mammograms (a script, not a test).

Generates N synthetic 3328x4084 12-bit JPEG-Lossless MG DICOMs (``mammocad.synth.write_synthetic_dicom``)
with their lesion masks in the folder-adapter layout, then prepares them (long side 1024, CLAHE)
with 2 worker processes and prints images/s and the peak resident memory summed over the main
process and all its children (sampled every 20 ms; ``getrusage(RUSAGE_CHILDREN)`` would give only
the largest single child). Targets: >= 2 images/s, peak RSS <= 1.5 GB.

    .venv/bin/python benchmarks/bench_prepare.py [--n 20] [--workers 2] [--data DIR]
"""

from __future__ import annotations

import argparse
import csv
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil


def make_dataset(root: Path, n: int, seed: int = 0) -> None:
    """images/<k>.dcm + masks/<k>_mask[_i].png + labels.csv; reused when already complete."""
    from mammocad.synth import write_synthetic_dicom

    if (root / "labels.csv").is_file() and len(list((root / "images").glob("*.dcm"))) == n:
        return
    shutil.rmtree(root, ignore_errors=True)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        stem = f"synth{k:03d}"
        mammo = write_synthetic_dicom(root / "images" / f"{stem}.dcm", rng, size=(4084, 3328), transfer_syntax="jpeg-lossless")
        for i, lesion in enumerate(mammo.lesions):
            name = f"{stem}_mask.png" if i == 0 else f"{stem}_mask_{i}.png"
            cv2.imwrite(str(root / "masks" / name), lesion.mask.astype(np.uint8) * 255)
        rows.append({"image": f"{stem}.dcm", "label": mammo.label, "patient_id": f"p{k:03d}", "laterality": mammo.laterality})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


class PeakRss:
    """Samples RSS of this process + all descendants in a background thread."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_total, self.peak_single = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = []
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:  # a child that just exited
                    pass
            self.peak_total = max(self.peak_total, sum(rss))
            self.peak_single = max(self.peak_single, max(rss))
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, default=None, help="where the synthetic DICOMs go (kept and reused)")
    args = ap.parse_args()

    from mammocad.datasets.prepared import prepare_dataset
    from mammocad.preprocess.pipeline import PreprocessSpec

    data = args.data or Path(tempfile.gettempdir()) / f"mammocad_bench_prepare_{args.n}"
    t = time.perf_counter()
    make_dataset(data, args.n)
    print(f"data: {args.n} synthetic 3328x4084 JPEG-Lossless DICOMs in {data} ({time.perf_counter() - t:.1f} s to make or check)")
    out = Path(tempfile.mkdtemp(prefix="mammocad_bench_out_"))
    try:
        spec = PreprocessSpec(long_side=1024, clahe=True)
        cpu0 = cpu_seconds()
        with PeakRss() as mem:
            t = time.perf_counter()
            report = prepare_dataset("folder", data, out, spec=spec, workers=args.workers, progress=False)
            wall = time.perf_counter() - t
        cpu = cpu_seconds() - cpu0  # workers have exited and been waited for: RUSAGE_CHILDREN has them
        print(f"prepared {report.n_done} images ({report.n_failed} failed) with {args.workers} workers in {wall:.2f} s "
              f"(worker start-up included)")
        print(f"throughput: {report.n_done / wall:.2f} images/s   (target >= 2)")
        print(f"CPU time: {cpu / max(report.n_done, 1):.2f} CPU-s per image (main + workers, start-up included) -> "
              f"{args.workers * report.n_done / cpu:.2f} images/s on {args.workers} otherwise idle cores")
        print(f"peak RSS, main + workers summed: {mem.peak_total / 2**30:.2f} GiB   (target <= 1.5 GB); "
              f"largest single process {mem.peak_single / 2**30:.2f} GiB")
        print(f"machine: {psutil.cpu_count()} CPUs, load average {', '.join(f'{x:.1f}' for x in psutil.getloadavg())}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
