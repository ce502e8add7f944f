"""Patient-resampled (grouped) bootstrap confidence intervals.

Hand-written because ``scipy.stats.bootstrap`` resamples observations independently: it cannot
keep all images of one patient together, and images of one patient are correlated (two views of
the same breast), so an image-level bootstrap gives intervals that are too narrow.

A resample draws the patients with replacement; that is the same as giving every patient a
count (how many times it was drawn) from a multinomial. A statistic is therefore written as a
function of the count vector, which lets every metric here be computed for all resamples at once
with one matrix product (per-patient sums weighted by the counts). The interval is the percentile
interval of the resampled statistic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from mammocad.io.jsonutil import finite_or_none

DEFAULT_N_BOOT = 2000
DEFAULT_SEED = 0
DEFAULT_CONFIDENCE = 0.95
_CHUNK = 500  # resamples drawn per block: bounds memory at _CHUNK x n_groups counts

SINGLE_GROUP_NOTE = ("only one patient: every resample is that patient, so the interval is degenerate "
                     "(zero width) and says nothing about uncertainty")


@dataclass(frozen=True)
class ConfidenceInterval:
    low: float
    high: float
    confidence: float
    n_boot: int  # resamples drawn
    n_valid: int  # resamples where the statistic was defined (e.g. at least one lesion image drawn)
    n_groups: int  # patients resampled
    degenerate: bool  # True with a single patient (the interval cannot reflect uncertainty)

    def to_dict(self) -> dict:
        return {"low": finite_or_none(self.low), "high": finite_or_none(self.high), "confidence": self.confidence,
                "n_boot": self.n_boot, "n_valid": self.n_valid, "n_groups": self.n_groups,
                "degenerate": self.degenerate}


def group_index(group_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Sorted unique groups and, per item, the index of its group (sorted so a seed is reproducible
    whatever order the items came in)."""
    groups, index = np.unique(np.asarray([str(g) for g in group_ids]), return_inverse=True)
    return [str(g) for g in groups], index.astype(np.int64)


def per_group_sum(values: np.ndarray, index: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum of item values per group; ``values`` may have trailing dimensions (e.g. confusion matrices)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros((n_groups,) + values.shape[1:], dtype=np.float64)
    np.add.at(out, index, values)
    return out


def bootstrap_ci(statistic: Callable[[np.ndarray], np.ndarray], n_groups: int, *, n_boot: int = DEFAULT_N_BOOT,
                 seed: int = DEFAULT_SEED, confidence: float = DEFAULT_CONFIDENCE) -> ConfidenceInterval | None:
    """Percentile CI of ``statistic`` over ``n_boot`` resamples of ``n_groups`` patients.

    ``statistic(counts)`` gets a (B, n_groups) array of draw counts (each row sums to n_groups; a
    row of all ones is the original sample) and returns B values; NaN marks a resample where the
    statistic is undefined, which is left out (``n_valid`` says how many remained). Returns None
    when ``n_boot`` is 0 or no resample was valid. The same seed gives the same draws for every
    statistic, so intervals of different metrics come from the same resamples.
    """
    if n_boot <= 0 or n_groups <= 0:
        return None
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    p = np.full(n_groups, 1.0 / n_groups)
    values = []
    for start in range(0, n_boot, _CHUNK):
        counts = rng.multinomial(n_groups, p, size=min(_CHUNK, n_boot - start)).astype(np.float64)
        values.append(np.asarray(statistic(counts), dtype=np.float64).reshape(-1))
    stats = np.concatenate(values)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return None
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return ConfidenceInterval(low=float(low), high=float(high), confidence=confidence, n_boot=n_boot,
                              n_valid=int(stats.size), n_groups=n_groups, degenerate=n_groups == 1)


def grouped_mean_ci(values: Sequence[float], group_ids: Sequence[str], **kwargs) -> ConfidenceInterval | None:
    """CI of the mean of per-item values (NaN items are not counted), resampling the groups."""
    values = np.asarray(values, dtype=np.float64)
    groups, index = group_index(group_ids)
    defined = np.isfinite(values)
    sums = per_group_sum(np.where(defined, values, 0.0), index, len(groups))
    counts = per_group_sum(defined.astype(np.float64), index, len(groups))
    return bootstrap_ci(lambda w: ratio(w @ sums, w @ counts), len(groups), **kwargs)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN where den is 0 (an undefined resample), without warnings."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


@dataclass(frozen=True)
class MetricValue:
    """A point estimate with its bootstrap CI (None where none was computed) and how many items
    (images, lesions) it is computed over."""

    value: float
    ci: ConfidenceInterval | None = None
    n: int = 0

    def to_dict(self) -> dict:
        return {"value": finite_or_none(self.value), "n": self.n, "ci": None if self.ci is None else self.ci.to_dict()}
