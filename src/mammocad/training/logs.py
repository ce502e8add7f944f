"""Training logs: one CSV row per epoch, TensorBoard scalars, and PNG curves (loss, Dice, LR).

Curves are redrawn at most every ``curve_every_s`` seconds and when the log is closed: drawing
two figures costs ~0.2 s of CPU, which is nothing per real epoch but a measurable overhead when
epochs take seconds (benchmarks/bench_train.py).

The history (list of row dicts) is also stored in the checkpoint, so a resumed run rewrites the
CSV from it: rows of epochs after the checkpoint (an interrupted epoch) disappear instead of
appearing twice. Figures use matplotlib's object API with the Agg canvas, which draws to PNG
without touching the global backend (safe on a headless machine and inside other programs).
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any

from mammocad.io.atomic import atomic_write_bytes, atomic_write_text
from mammocad.io.jsonutil import finite_or_none

LOG_CSV = "log.csv"
LOSS_PNG = "curves_loss.png"
METRIC_PNG = "curves_dice.png"
TENSORBOARD_DIR = "tensorboard"
COLUMNS = ["epoch", "stage", "lr", "train_loss", "val_loss", "val_dice", "val_iou", "best_val_dice", "patches",
           "train_seconds", "patches_per_s", "epoch_seconds", "val_seconds"]


def _number(value: Any) -> float | None:
    return finite_or_none(value) if isinstance(value, (int, float)) else None


class TrainingLog:
    """Writes the logs of the main process; other ranks get ``enabled=False`` and write nothing."""

    def __init__(self, out_dir: Path, history: list[dict[str, Any]] | None = None, enabled: bool = True,
                 tensorboard: bool = True, curve_every_s: float = 60.0):
        self.out_dir, self.enabled = Path(out_dir), enabled
        # the first drawing waits curve_every_s too: importing matplotlib alone takes seconds
        self.curve_every_s, self.last_curves = curve_every_s, time.monotonic()
        self.history: list[dict[str, Any]] = list(history or [])
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events of epochs after the checkpoint (left by an interrupted run)
            self.writer = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=len(self.history) + 1)

    def add(self, row: dict[str, Any]) -> None:
        self.history.append(dict(row))
        if not self.enabled:
            return
        self.write_csv()
        if self.writer is not None:
            step = int(row["epoch"])
            extra = [k for k in row if k.startswith("val_") and k not in COLUMNS]
            for key in ("lr", "train_loss", "val_loss", "val_dice", "val_iou", "patches_per_s", *extra):
                value = _number(row.get(key))
                if value is not None:
                    self.writer.add_scalar(key if key == "lr" else key.replace("_", "/", 1), value, step)
            self.writer.flush()
        if time.monotonic() - self.last_curves >= self.curve_every_s:
            self.write_curves()

    def columns(self) -> list[str]:
        """COLUMNS, with the task's own validation metrics (detection: val_froc, ...) before best_val_dice."""
        extra = list(dict.fromkeys(k for row in self.history for k in row if k not in COLUMNS))
        at = COLUMNS.index("best_val_dice")
        return COLUMNS[:at] + extra + COLUMNS[at:]

    def write_csv(self) -> None:
        buf = io.StringIO()
        columns = self.columns()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
        atomic_write_text(self.out_dir / LOG_CSV, buf.getvalue())

    def write_curves(self) -> None:
        self.last_curves = time.monotonic()
        epochs = [int(r["epoch"]) for r in self.history]
        if not epochs:
            return
        self._plot(LOSS_PNG, "Loss", [("train loss", "train_loss"), ("val loss", "val_loss")], epochs,
                   lr=[_number(r.get("lr")) for r in self.history])
        self._plot(METRIC_PNG, "Validation Dice", [("val Dice", "val_dice"), ("val IoU", "val_iou")], epochs)

    def _plot(self, name: str, title: str, series: list[tuple[str, str]], epochs: list[int],
              lr: list[float | None] | None = None) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for label, key in series:
            points = [(e, _number(r.get(key))) for e, r in zip(epochs, self.history)]
            points = [(e, v) for e, v in points if v is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
        for i in range(1, len(self.history)):  # stage boundaries
            if self.history[i].get("stage") != self.history[i - 1].get("stage"):
                ax.axvline(epochs[i] - 0.5, color="grey", linestyle=":", linewidth=1)
        if lr and any(v is not None for v in lr):
            ax2 = ax.twinx()
            ax2.plot(epochs, [math.nan if v is None else v for v in lr], color="grey", linewidth=1, label="lr")
            ax2.set_ylabel("learning rate")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write_bytes(self.out_dir / name, buf.getvalue())

    def close(self) -> None:
        if self.enabled:
            self.write_curves()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
