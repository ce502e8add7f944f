"""Classification metrics: confusion matrix; per-class, macro and weighted precision, recall and F1;
accuracy and balanced accuracy; ROC AUC (binary, and one-vs-rest per class plus macro) with
patient-resampled bootstrap CIs and, for one binary score, DeLong's CI; sensitivity at fixed
specificity and specificity at fixed sensitivity; calibration (Brier score, ECE, reliability curve)
and temperature scaling.

Entry points: ``classification_report(y_true, y_pred, probabilities, class_names, patient_ids)`` ->
``ClassificationReport`` (``to_dict``, ``to_markdown``; ``roc_png`` and ``reliability_png`` draw it);
``confusion_metrics(matrix, class_names)`` for a confusion matrix alone (a published one);
``fit_temperature`` / ``apply_temperature``.

scikit-learn computes every point value it has (confusion_matrix, precision_recall_fscore_support,
accuracy_score, balanced_accuracy_score, roc_auc_score, roc_curve, brier_score_loss,
calibration_curve). The bootstrap re-evaluates the same definitions for all resamples at once from
patient draw counts (bootstrap.py's design); the tests check them against sklearn with sample
weights. Calling sklearn per resample gives the same numbers but ~60x slower: one AUC's 1000
resamples of 500 images (210 patients) took 3.3 s as a ``roc_auc_score(sample_weight=...)`` loop
and 0.05 s vectorised (2-core machine under load); a whole 3-class report at 1000 resamples, 0.6 s.

A published matrix checked against its own summary (issue 8): the CBIS-DDSM Mask R-CNN system's 3x3
matrix (rows = truth benign, malignant, normal; columns = predicted benign, malignant, normal:
30/5/5, 5/32/3, 4/3/33; 120 images) gives accuracy 95/120 = 0.792; precision benign 30/39,
malignant 32/40, normal 33/41 (macro 0.791); recall 30/40, 32/40, 33/40 (macro = balanced accuracy
0.792); F1 60/79, 64/80, 66/81 (macro 0.791). The paper's summary (accuracy 85%, precision 0.75,
recall 0.80, F1 0.825) does not follow from it: 85% of 120 images would be 102 correct, not 95; an
F1 of 0.825 cannot come from P 0.75 and R 0.80 (F1 is their harmonic mean, 0.774, never above both);
the three figures are the per-class RECALLS of benign (0.75), malignant (0.80) and normal (0.825).
``tests/test_classification_metrics.py`` pins the matrix's numbers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from scipy.stats import norm, rankdata
from sklearn.calibration import calibration_curve
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, brier_score_loss, confusion_matrix,
                             precision_recall_fscore_support, roc_auc_score, roc_curve)

from mammocad.errors import ConfigError, InputError
from mammocad.evaluation.bootstrap import (DEFAULT_CONFIDENCE, DEFAULT_N_BOOT, DEFAULT_SEED, SINGLE_GROUP_NOTE,
                                           MetricValue, bootstrap_ci, group_index,
                                           per_group_sum, ratio)
from mammocad.evaluation.formatting import ci_text, figure_png, fmt, md_table, new_figure
from mammocad.io.jsonutil import finite_or_none, json_clean

DEFAULT_N_BINS = 10
DEFAULT_TARGETS = (0.80, 0.90)  # fixed specificities (and sensitivities) of the operating points
PROBABILITY_SUM_TOLERANCE = 1e-3  # softmax outputs written with 4 decimals still pass
TEMPERATURE_BOUNDS = (0.05, 20.0)
_TARGET_TOLERANCE = 1e-9  # 1 - 9/10 is 0.09999999999999998 in floating point: it must meet a target of 0.1


# ---------------------------------------------------------------- inputs


def _check_class_names(class_names: Sequence[str]) -> list[str]:
    names = [str(c) for c in class_names]
    if len(names) < 2:
        raise ConfigError(None, f"need at least two classes, got {names}")
    if len(set(names)) != len(names):
        raise ConfigError(None, f"class names must be distinct, got {names}")
    return names


def _class_indices(labels: Sequence, class_names: list[str], what: str) -> np.ndarray:
    """Labels given as class names or as indices into ``class_names``, as int64 indices."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise InputError(None, f"{what} must hold one label per image, got shape {arr.shape}")
    if arr.dtype.kind in "biu":
        bad = (arr < 0) | (arr >= len(class_names))
        if bad.any():
            raise InputError(None, f"{what} holds class index {int(arr[bad][0])}, outside 0..{len(class_names) - 1} "
                                   f"({', '.join(class_names)})")
        return arr.astype(np.int64)
    if arr.dtype.kind in "UO":
        lookup = {name: k for k, name in enumerate(class_names)}
        out = np.empty(arr.size, dtype=np.int64)
        for k, label in enumerate(arr):
            index = lookup.get(str(label))
            if index is None:
                raise InputError(None, f"{what} holds class {str(label)!r}, not one of {', '.join(class_names)}")
            out[k] = index
        return out
    raise InputError(None, f"{what} must hold class names or integer class indices, got dtype {arr.dtype}")


def _probability_matrix(probabilities, n_images: int, class_names: list[str]) -> np.ndarray:
    """(images, classes) probabilities, rows renormalised to sum to 1; with two classes a 1-D array
    is P(class_names[1])."""
    p = np.asarray(probabilities, dtype=np.float64)
    n_cls = len(class_names)
    if p.ndim == 1 and n_cls == 2:
        p = np.column_stack([1.0 - p, p])
    if p.shape != (n_images, n_cls):
        binary = f", or one P({class_names[1]}) per image" if n_cls == 2 else ""
        raise InputError(None, f"probabilities must be {n_images} x {n_cls} (images x classes{binary}), "
                               f"got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise InputError(None, "probabilities must be finite and within [0, 1]")
    sums = p.sum(axis=1)
    off = np.abs(sums - 1.0) > PROBABILITY_SUM_TOLERANCE
    if off.any():
        k = int(np.argmax(off))
        raise InputError(None, f"probabilities of image {k} sum to {sums[k]:.6g}, not 1 (tolerance "
                               f"{PROBABILITY_SUM_TOLERANCE:g}): give softmax outputs (apply_temperature turns logits "
                               "into them)")
    # renormalised so that sklearn's own checks (roc_auc_score's one-vs-rest demands sums within 1e-5,
    # brier_score_loss warns beyond 1.5e-8) pass float32 softmax outputs too
    return p / sums[:, None]


def _check_fraction(x: float, what: str) -> float:
    if not 0 < x < 1:
        raise ConfigError(None, f"{what} must be in (0, 1), got {x}")
    return float(x)


# ---------------------------------------------------------------- confusion-matrix metrics


@dataclass(frozen=True)
class ConfusionMetrics:
    """Metrics of one confusion matrix (rows = truth, columns = prediction). Per-class arrays are
    NaN where undefined: precision of a class never predicted, recall of a class absent from the
    truth, F1 of a class in neither; averages leave NaN classes out (sklearn's zero_division=NaN)."""

    class_names: list[str]
    matrix: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray  # images of the class in the truth
    predicted: np.ndarray  # images predicted as the class
    macro: dict[str, float]  # precision, recall, f1: unweighted means over classes
    weighted: dict[str, float]  # the same weighted by support
    accuracy: float
    balanced_accuracy: float  # mean recall over classes present in the truth

    def per_class(self) -> list[dict]:
        return [{"class": name, "precision": finite_or_none(self.precision[c]),
                 "recall": finite_or_none(self.recall[c]), "f1": finite_or_none(self.f1[c]),
                 "support": int(self.support[c]), "predicted": int(self.predicted[c])}
                for c, name in enumerate(self.class_names)]

    def to_dict(self) -> dict:
        return {"class_names": self.class_names, "matrix": self.matrix.astype(int).tolist(),
                "per_class": self.per_class(), "macro": json_clean(self.macro), "weighted": json_clean(self.weighted),
                "accuracy": finite_or_none(self.accuracy), "balanced_accuracy": finite_or_none(self.balanced_accuracy)}


def _label_metrics(truth: np.ndarray, pred: np.ndarray, class_names: list[str]) -> ConfusionMetrics:
    """sklearn's metrics of class indices ``truth`` vs ``pred``."""
    labels = list(range(len(class_names)))
    matrix = confusion_matrix(truth, pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(truth, pred, labels=labels, zero_division=np.nan)
    averages = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(truth, pred, labels=labels, average=average, zero_division=np.nan)
        averages[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    with warnings.catch_warnings():
        # sklearn warns when a predicted class is absent from the truth; its recall is undefined and
        # left out of the mean, which the report's notes say
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(truth, pred))
    return ConfusionMetrics(class_names=list(class_names), matrix=matrix, precision=precision, recall=recall, f1=f1,
                            support=support, predicted=matrix.sum(axis=0), macro=averages["macro"],
                            weighted=averages["weighted"], accuracy=float(accuracy_score(truth, pred)),
                            balanced_accuracy=balanced)


def confusion_metrics(matrix, class_names: Sequence[str]) -> ConfusionMetrics:
    """Per-class precision/recall/F1/support, macro and weighted averages, accuracy and balanced
    accuracy of a confusion matrix (rows = truth, columns = predicted, counts of images). The
    matrix is expanded into its (truth, prediction) pairs so that sklearn computes every number, as
    ``classification_report`` does from labels."""
    names = _check_class_names(class_names)
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (len(names), len(names)):
        raise InputError(None, f"confusion matrix must be {len(names)} x {len(names)} (one row and column per "
                               f"class), got shape {m.shape}")
    if not np.isfinite(m).all() or (m < 0).any() or (m != np.round(m)).any():
        raise InputError(None, "confusion matrix must hold non-negative whole counts")
    if m.sum() == 0:
        raise InputError(None, "confusion matrix is all zeros: no images")
    counts = m.astype(np.int64).ravel()
    cells = np.arange(counts.size)
    truth, pred = np.repeat(cells // len(names), counts), np.repeat(cells % len(names), counts)
    return _label_metrics(truth, pred, names)


def _mean_of_defined(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    return ratio(np.where(ok, x, 0.0).sum(axis=-1), ok.sum(axis=-1))


def matrix_metrics(cms: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro precision/recall/F1 of a stack (..., C, C) of confusion
    matrices, by the same definitions as sklearn's (zero_division=NaN, undefined classes left out of
    the means): what the bootstrap evaluates for every resample at once."""
    cms = np.asarray(cms, dtype=np.float64)
    tp = np.diagonal(cms, axis1=-2, axis2=-1)
    support, predicted = cms.sum(axis=-1), cms.sum(axis=-2)
    recall = ratio(tp, support)
    return {"accuracy": ratio(tp.sum(axis=-1), cms.sum(axis=(-2, -1))), "balanced_accuracy": _mean_of_defined(recall),
            "macro_precision": _mean_of_defined(ratio(tp, predicted)), "macro_recall": _mean_of_defined(recall),
            "macro_f1": _mean_of_defined(ratio(2 * tp, support + predicted))}


# ---------------------------------------------------------------- ROC under patient resampling


@dataclass(frozen=True)
class RankedScores:
    """Images sorted by descending score, so that the ROC curve under any patient weighting (a
    bootstrap resample) is a cumulative sum: O(images) per resample instead of a sort."""

    patient: np.ndarray  # patient index of each image, in score order
    positive: np.ndarray  # bool, in score order
    level_end: np.ndarray  # index of the last image of each distinct score: one ROC point each


def rank_scores(scores: np.ndarray, positive: np.ndarray, patient_index: np.ndarray) -> RankedScores:
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    s = np.asarray(scores, dtype=np.float64)[order]
    level_end = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # tied scores are one threshold
    return RankedScores(patient=np.asarray(patient_index)[order], positive=np.asarray(positive, dtype=bool)[order],
                        level_end=level_end)


def weighted_roc(counts: np.ndarray, ranked: RankedScores) -> tuple[np.ndarray, np.ndarray]:
    """(TPR, FPR) per row of ``counts`` (B, patients): one point per distinct score taken as the
    threshold (score >= t is positive), descending, after the (0, 0) point: the points of sklearn's
    ``roc_curve(drop_intermediate=False)`` with each image weighted by its patient's count. Rows
    without a positive or a negative are NaN."""
    w = np.atleast_2d(np.asarray(counts, dtype=np.float64))[:, ranked.patient]
    tp = np.cumsum(w * ranked.positive, axis=1)[:, ranked.level_end]
    fp = np.cumsum(w * ~ranked.positive, axis=1)[:, ranked.level_end]
    zero = np.zeros((len(w), 1))
    tp, fp = np.hstack([zero, tp]), np.hstack([zero, fp])
    return ratio(tp, tp[:, -1:]), ratio(fp, fp[:, -1:])


def auc_of_curves(tpr: np.ndarray, fpr: np.ndarray) -> np.ndarray:
    """Trapezoid area under each row's (FPR, TPR) curve: the Mann-Whitney AUC with tied scores
    counted half, as ``roc_auc_score``."""
    return np.sum(np.diff(fpr, axis=-1) * (tpr[..., 1:] + tpr[..., :-1]) / 2.0, axis=-1)


def sensitivity_at_specificity(tpr: np.ndarray, fpr: np.ndarray, target: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the best sensitivity among thresholds whose specificity >= ``target``, and the index
    of the first (highest) threshold reaching it. The (0, 0) point always qualifies, so the value is
    defined wherever the curve is; NaN rows stay NaN."""
    ok = (1.0 - fpr) >= target - _TARGET_TOLERANCE
    index = np.argmax(np.where(ok, tpr, -1.0), axis=-1)
    return np.take_along_axis(tpr, index[..., None], axis=-1)[..., 0], index


def specificity_at_sensitivity(tpr: np.ndarray, fpr: np.ndarray, target: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the best specificity among thresholds whose sensitivity >= ``target``, and the index
    of the first (highest) threshold reaching it (the last point, all positive, always qualifies)."""
    ok = tpr >= target - _TARGET_TOLERANCE
    index = np.argmax(np.where(ok, 1.0 - fpr, -1.0), axis=-1)
    return 1.0 - np.take_along_axis(fpr, index[..., None], axis=-1)[..., 0], index


# ---------------------------------------------------------------- DeLong


# Hand-written: PyPI has no well-kept DeLong package (only mlstatkit 0.1 and rocauc-comparison 0.1,
# neither used by anything we depend on; R's pROC is the reference implementation), and the fast
# algorithm is a few lines on scipy's midranks.
def delong_components(scores, positive) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components by the fast algorithm of Sun & Xu (2014):
    V10[i] = fraction of negatives scored below positive i, V01[j] = fraction of positives scored
    above negative j (ties count half), from midranks in O(N log N) instead of the O(mn) pairwise
    Mann-Whitney kernel. The midrank of x_i among all scores minus its midrank among the positives
    is the number of negatives below it plus half those tied with it."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    x, y = scores[positive], scores[~positive]
    m, n = x.size, y.size
    if m == 0 or n == 0:
        raise InputError(None, f"DeLong needs positives and negatives, got {m} positive and {n} negative images")
    tz = rankdata(np.concatenate([x, y]))  # midranks: tied scores share their mean rank
    tx, ty = rankdata(x), rankdata(y)
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    auc = (tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)
    return float(auc), v10, v01


@dataclass(frozen=True)
class DelongAUC:
    """Binary ROC AUC with DeLong's variance and normal-approximation CI (clipped to [0, 1]); low and
    high are NaN with fewer than two positives or negatives (no variance to estimate)."""

    auc: float
    variance: float
    low: float
    high: float
    confidence: float
    n_positive: int
    n_negative: int

    def to_dict(self) -> dict:
        return {"auc": finite_or_none(self.auc), "variance": finite_or_none(self.variance),
                "standard_error": finite_or_none(math.sqrt(self.variance)) if np.isfinite(self.variance) else None,
                "low": finite_or_none(self.low), "high": finite_or_none(self.high), "confidence": self.confidence,
                "n_positive": self.n_positive, "n_negative": self.n_negative}


def delong_auc(scores, positive, confidence: float = DEFAULT_CONFIDENCE) -> DelongAUC:
    """DeLong's CI of the binary AUC: var = S10/m + S01/n with S10, S01 the sample variances of the
    structural components (DeLong, DeLong & Clarke-Pearson 1988). It treats images as independent."""
    confidence = _check_fraction(confidence, "confidence")
    auc, v10, v01 = delong_components(scores, positive)
    m, n = v10.size, v01.size
    if m < 2 or n < 2:
        return DelongAUC(auc, float("nan"), float("nan"), float("nan"), confidence, m, n)
    variance = float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
    half = float(norm.ppf(0.5 + confidence / 2.0)) * math.sqrt(variance)
    return DelongAUC(auc, variance, max(0.0, auc - half), min(1.0, auc + half), confidence, m, n)


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class ReliabilityBin:
    low: float  # bin edges: (low, high], the first bin [0, high]
    high: float
    mean_predicted: float
    observed_frequency: float
    count: int

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "mean_predicted": finite_or_none(self.mean_predicted),
                "observed_frequency": finite_or_none(self.observed_frequency), "count": self.count}


def reliability_curve(probability, outcome, n_bins: int = DEFAULT_N_BINS) -> list[ReliabilityBin]:
    """Non-empty equal-width bins of ``probability`` with the mean predicted probability and the
    observed frequency of ``outcome`` (sklearn's ``calibration_curve``, strategy 'uniform') and the
    number of images, counted with calibration_curve's own binning (it does not return counts)."""
    if n_bins < 1:
        raise ConfigError(None, f"calibration bins must be >= 1, got {n_bins}")
    probability = np.asarray(probability, dtype=np.float64)
    outcome = np.asarray(outcome).astype(np.int64)
    observed, predicted = calibration_curve(outcome, probability, n_bins=n_bins, strategy="uniform", pos_label=1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], probability), minlength=n_bins)
    nonempty = np.flatnonzero(counts)
    return [ReliabilityBin(float(edges[b]), float(edges[b + 1]), float(predicted[k]), float(observed[k]),
                           int(counts[b])) for k, b in enumerate(nonempty)]


def expected_calibration_error(probability, outcome, n_bins: int = DEFAULT_N_BINS) -> float:
    """ECE = sum over equal-width bins of (images in bin / images) x |observed frequency - mean
    predicted probability| (the L1 calibration error of torchmetrics; its bins are [low, high),
    these are sklearn's (low, high]: they differ only for a probability exactly on an edge)."""
    bins = reliability_curve(probability, outcome, n_bins)
    total = sum(b.count for b in bins)
    return float(sum(b.count / total * abs(b.observed_frequency - b.mean_predicted) for b in bins))


def top_class_confidence(probabilities: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multiclass calibration input: the probability of the most probable class and whether that
    class is the true one."""
    return probabilities.max(axis=1), (probabilities.argmax(axis=1) == truth)


# ---------------------------------------------------------------- temperature scaling


def _logit_matrix(logits) -> np.ndarray:
    """(images, classes) logits; a 1-D array is the logit of class 1 of two (softmax of [0, z] is
    [1 - sigmoid(z), sigmoid(z)])."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        z = np.column_stack([np.zeros_like(z), z])
    if z.ndim != 2 or z.shape[1] < 2 or not np.isfinite(z).all():
        raise InputError(None, f"logits must be finite, images x classes (or one binary logit per image), "
                               f"got shape {np.shape(logits)}")
    return z


def _label_vector(labels, n_images: int, n_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n_images,):
        raise InputError(None, f"need one label per image: {n_images} logits rows, labels of shape {y.shape}")
    if y.dtype.kind not in "biu" or (y < 0).any() or (y >= n_classes).any():
        raise InputError(None, f"labels must be class indices 0..{n_classes - 1}")
    return y.astype(np.int64)


def negative_log_likelihood(logits, labels, temperature: float = 1.0) -> float:
    """Mean cross-entropy of softmax(logits / temperature) against integer ``labels``."""
    z = _logit_matrix(logits)
    y = _label_vector(labels, len(z), z.shape[1])
    return float(-log_softmax(z / temperature, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(logits, labels, *, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on the FITTING set given: pass
    predictions of the training folds (out-of-fold predictions of cases outside the split being
    evaluated), never the evaluated split, else the calibration it reports is fitted to itself.
    Brent's bounded search over log T (the NLL is flat for large T: a log scale searches small and
    large T alike); a result at a bound means the bounds were too narrow."""
    z = _logit_matrix(logits)
    y = _label_vector(labels, len(z), z.shape[1])
    low, high = bounds
    if not 0 < low < high:
        raise ConfigError(None, f"temperature bounds must satisfy 0 < low < high, got {bounds}")
    rows = np.arange(len(y))
    result = minimize_scalar(lambda log_t: -log_softmax(z / math.exp(log_t), axis=1)[rows, y].mean(),
                             bounds=(math.log(low), math.log(high)), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Probabilities softmax(logits / temperature); a 1-D input (binary logits) gives 1-D P(class 1)."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ConfigError(None, f"temperature must be > 0, got {temperature}")
    p = softmax(_logit_matrix(logits) / temperature, axis=1)
    return p[:, 1] if np.ndim(logits) == 1 else p


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold chosen for a fixed specificity (or sensitivity): ``value`` is the best
    sensitivity (specificity) reached there, ``achieved`` the fixed measure actually reached
    (>= target), ``threshold`` the score from which an image is called positive (None: infinite,
    nothing is called positive)."""

    fixed: str  # "specificity" or "sensitivity"
    target: float
    value: MetricValue
    achieved: float
    threshold: float | None

    @property
    def reported(self) -> str:
        return "sensitivity" if self.fixed == "specificity" else "specificity"

    def to_dict(self) -> dict:
        return {"fixed": self.fixed, "target": self.target, self.reported: self.value.to_dict(),
                f"{self.fixed}_achieved": finite_or_none(self.achieved), "threshold": self.threshold}


def classification_rules(class_names: Sequence[str], positive_class: str | None, n_bins: int) -> list[str]:
    multiclass = len(class_names) > 2
    rules = [
        "Confusion matrix: rows = truth, columns = prediction (the given predicted class, else the most probable).",
        "Per class: precision = TP / predicted, recall = TP / support (images of the class in the truth), "
        "F1 = 2TP / (support + predicted); a zero denominator makes the value undefined (n/a), left out of every "
        "average (sklearn, zero_division=NaN).",
        "Macro = unweighted mean over classes; weighted = mean weighted by support. Accuracy = correct / images; "
        "balanced accuracy = macro recall (mean recall over classes present in the truth).",
    ]
    if multiclass:
        rules.append("ROC AUC one-vs-rest per class: P(class) ranks the images of that class against all others "
                     "(Mann-Whitney, tied scores count half; sklearn roc_auc_score); macro ROC AUC = unweighted mean "
                     "over classes, undefined when a class is absent from the truth.")
    else:
        rules.append(f"ROC AUC: P({positive_class}) ranks '{positive_class}' images against the others "
                     "(Mann-Whitney, tied scores count half; sklearn roc_auc_score); undefined with one class present.")
    if positive_class is not None:
        rules += [
            f"DeLong CI of the '{positive_class}' AUC: fast DeLong (Sun & Xu 2014), normal approximation clipped to "
            "[0, 1]. It treats IMAGES as independent: with several images per patient it is too narrow, so the "
            "patient bootstrap CI is the primary one; at AUC 0 or 1 its variance is 0.",
            f"Sensitivity at specificity s ('{positive_class}' positive when its probability >= threshold): the best "
            "sensitivity among the thresholds (distinct scores, sklearn roc_curve) whose specificity >= s, at the "
            "highest such threshold; specificity at sensitivity s likewise. The fixed measure actually reached is "
            "reported as 'achieved'.",
        ]
    rules += [
        ("Brier score: mean over images of sum over classes of (p - one-hot truth)^2 (range 0-2; sklearn)."
         if multiclass else f"Brier score: mean over images of (P({positive_class}) - truth)^2 (sklearn)."),
        f"ECE: {n_bins} equal-width bins of "
        + ("the top-class probability against whether the top class is correct" if multiclass
           else f"P({positive_class}) against whether the image is '{positive_class}'")
        + "; ECE = sum over bins of (images in bin / images) x |observed frequency - mean predicted| (torchmetrics' "
        "L1 calibration error; bins (low, high] as sklearn's calibration_curve). The reliability curve lists the "
        "same non-empty bins.",
        "95% CIs: percentile bootstrap resampling PATIENTS with replacement (all images of a drawn patient go in "
        "together), seeded; a resample where a metric is undefined (e.g. no image of a class drawn, for AUC) is left "
        "out and the CI says how many resamples were defined. ECE has no CI.",
    ]
    return rules


@dataclass
class ClassificationReport:
    class_names: list[str]
    n_images: int
    n_patients: int
    positive_class: str | None  # the class of the DeLong CI and operating points (binary: the positive class)
    confusion: ConfusionMetrics
    headline: dict[str, MetricValue]
    roc_auc: dict[str, MetricValue]  # per class (one-vs-rest; binary: the positive class) and "macro" (> 2 classes)
    delong: DelongAUC | None
    operating_points: list[OperatingPoint]
    calibration: dict
    roc_curves: dict[str, dict]  # class -> fpr, tpr, thresholds (sklearn roc_curve, intermediate points dropped)
    bootstrap: dict
    rules: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json_clean({
            "class_names": self.class_names, "n_images": self.n_images, "n_patients": self.n_patients,
            "positive_class": self.positive_class, "headline": {k: v.to_dict() for k, v in self.headline.items()},
            "confusion": self.confusion.to_dict(), "roc_auc": {k: v.to_dict() for k, v in self.roc_auc.items()},
            "delong": None if self.delong is None else self.delong.to_dict(),
            "operating_points": [p.to_dict() for p in self.operating_points],
            "calibration": ({**self.calibration, "reliability": [b.to_dict() for b in self.calibration["reliability"]]}
                            if self.calibration else None),
            "roc_curves": self.roc_curves, "bootstrap": self.bootstrap, "rules": self.rules, "notes": self.notes})

    def to_markdown(self) -> str:
        return "\n".join(_markdown(self))


_HEADLINE_NAMES = {
    "accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy (macro recall)",
    "macro_precision": "Macro precision", "macro_recall": "Macro recall", "macro_f1": "Macro F1",
    "roc_auc": "ROC AUC", "macro_roc_auc": "Macro ROC AUC (one-vs-rest)", "brier": "Brier score",
    "ece": "Expected calibration error",
}








def _auc_cells(auc: MetricValue | None) -> list[str]:
    """AUC and CI cells: blank where no AUC is scored (binary: only the positive class's row)."""
    return ["", ""] if auc is None else [fmt(auc.value), ci_text(auc.ci)]


def _markdown(rep: ClassificationReport) -> list[str]:
    conf = int(round(rep.bootstrap["confidence"] * 100))
    lines = ["# Classification evaluation", "",
             f"Images: {rep.n_images} from {rep.n_patients} patients; classes: {', '.join(rep.class_names)}"
             + (f"; positive class: {rep.positive_class}" if rep.positive_class else "") + ".", "",
             "## Headline metrics", ""]
    lines += md_table(["metric", "value", f"{conf}% CI", "n"],
                    [[_HEADLINE_NAMES.get(k, k), fmt(m.value), ci_text(m.ci), str(m.n)]
                     for k, m in rep.headline.items()])
    c = rep.confusion
    lines += ["", "## Per class", ""]
    rows = []
    for k, name in enumerate(rep.class_names):
        rows.append([name, fmt(c.precision[k]), fmt(c.recall[k]), fmt(c.f1[k]), str(int(c.support[k])),
                     str(int(c.predicted[k]))] + _auc_cells(rep.roc_auc.get(name)))
    for average in ("macro", "weighted"):
        a = getattr(c, average)
        rows.append([f"*{average}*", fmt(a["precision"]), fmt(a["recall"]), fmt(a["f1"]), "", ""]
                    + _auc_cells(rep.roc_auc.get(average)))
    lines += md_table(["class", "precision", "recall", "F1", "support", "predicted", "ROC AUC", f"{conf}% CI"], rows)
    lines += ["", "Confusion matrix (rows = truth, columns = prediction):", ""]
    lines += md_table(["truth \\ pred"] + rep.class_names,
                    [[name] + [str(int(v)) for v in row] for name, row in zip(rep.class_names, c.matrix)])
    if rep.delong is not None:
        d = rep.delong
        lines += ["", f"DeLong {int(round(d.confidence * 100))}% CI of the '{rep.positive_class}' ROC AUC "
                      f"{fmt(d.auc)}: [{fmt(d.low)}, {fmt(d.high)}] ({d.n_positive} positive, {d.n_negative} "
                      "negative images; images taken as independent)."]
    if rep.operating_points:
        lines += ["", f"## Operating points ('{rep.positive_class}' positive)", ""]
        lines += md_table(["fixed", "target", "achieved", "reported", "value", f"{conf}% CI", "threshold"],
                        [[p.fixed, f"{p.target:g}", fmt(p.achieved), p.reported, fmt(p.value.value),
                          ci_text(p.value.ci), "inf (none positive)" if p.threshold is None else fmt(p.threshold)]
                         for p in rep.operating_points])
    cal = rep.calibration
    if cal:
        lines += ["", "## Calibration", "",
                  f"Brier score {fmt(cal['brier'])}; ECE {fmt(cal['ece'])} over {cal['n_bins']} bins of "
                  f"{cal['probability']}.", ""]
        lines += md_table(["bin", "mean predicted", "observed frequency", "images"],
                        [[f"{b.low:.2f}-{b.high:.2f}", fmt(b.mean_predicted), fmt(b.observed_frequency), str(b.count)]
                         for b in cal["reliability"]])
    b = rep.bootstrap
    lines += ["", "## Rules", ""] + [f"- {r}" for r in rep.rules]
    lines += [f"- Bootstrap: {b['n_boot']} resamples of {b['n_patients']} patients, seed {b['seed']}, "
              f"{b['method']} intervals."]
    lines += [f"- Note: {n}" for n in rep.notes]
    return lines + [""]


def _metric(value: float, statistic: Callable[[np.ndarray], np.ndarray], n_groups: int, n: int,
            boot: dict) -> MetricValue:
    """A point value with its bootstrap CI (none for an undefined value)."""
    ci = bootstrap_ci(statistic, n_groups, **boot) if np.isfinite(value) else None
    return MetricValue(float(value), ci, n)


def _roc_auc(truth_is_class: np.ndarray, scores: np.ndarray, ranked: RankedScores, n_groups: int,
             boot: dict) -> MetricValue:
    n = len(scores)
    if truth_is_class.all() or not truth_is_class.any():
        return MetricValue(float("nan"), None, n)
    value = roc_auc_score(truth_is_class, scores)
    return _metric(value, lambda w: auc_of_curves(*weighted_roc(w, ranked)), n_groups, n, boot)


def _operating_points(is_positive: np.ndarray, scores: np.ndarray, ranked: RankedScores, n_groups: int, boot: dict,
                      specificities: Sequence[float], sensitivities: Sequence[float]) -> list[OperatingPoint]:
    """Operating points from sklearn's curve (same points as ``weighted_roc`` at all counts 1), CIs
    from the resampled curves."""
    fpr, tpr, thresholds = roc_curve(is_positive, scores, drop_intermediate=False)
    points = []
    for fixed, targets, pick in (("specificity", specificities, sensitivity_at_specificity),
                                 ("sensitivity", sensitivities, specificity_at_sensitivity)):
        for target in targets:
            value, index = pick(tpr[None], fpr[None], target)
            k = int(index[0])
            achieved = 1.0 - fpr[k] if fixed == "specificity" else tpr[k]
            metric = _metric(value[0], lambda w, pick=pick, target=target: pick(*weighted_roc(w, ranked), target)[0],
                             n_groups, len(scores), boot)
            points.append(OperatingPoint(fixed, float(target), metric, float(achieved), finite_or_none(thresholds[k])))
    return points


def _curve(is_positive: np.ndarray, scores: np.ndarray) -> dict:
    fpr, tpr, thresholds = roc_curve(is_positive, scores)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": [finite_or_none(t) for t in thresholds]}


def _brier(truth: np.ndarray, probs: np.ndarray, positive: int | None, index: np.ndarray, n_groups: int,
           boot: dict) -> MetricValue:
    """sklearn's Brier score; its CI from the per-image squared errors whose mean it is."""
    if positive is not None:  # binary
        y = (truth == positive).astype(np.int64)
        value = brier_score_loss(y, probs[:, positive], pos_label=1)
        per_image = (probs[:, positive] - y) ** 2
    else:
        value = brier_score_loss(truth, probs, labels=list(range(probs.shape[1])))
        per_image = ((probs - np.eye(probs.shape[1])[truth]) ** 2).sum(axis=1)
    sums = per_group_sum(per_image, index, n_groups)
    images = per_group_sum(np.ones(len(truth)), index, n_groups)
    return _metric(value, lambda w: ratio(w @ sums, w @ images), n_groups, len(truth), boot)


def _calibration(truth: np.ndarray, probs: np.ndarray, names: list[str], positive_class: str | None,
                 index: np.ndarray, n_groups: int, boot: dict, n_bins: int) -> tuple[MetricValue, dict]:
    """Brier score (with CI), ECE and reliability curve: binary on P(positive class), more classes on
    the top-class probability (whether the top class is right), as torchmetrics defines ECE."""
    positive = None if len(names) > 2 else names.index(positive_class)
    if positive is None:
        probability, outcome = top_class_confidence(probs, truth)
        what = "the top-class probability (outcome: top class correct)"
    else:
        probability, outcome = probs[:, positive], truth == positive
        what = f"P({positive_class}) (outcome: image is '{positive_class}')"
    brier = _brier(truth, probs, positive, index, n_groups, boot)
    return brier, {"brier": brier.value, "ece": expected_calibration_error(probability, outcome, n_bins),
                   "n_bins": n_bins, "probability": what,
                   "reliability": reliability_curve(probability, outcome, n_bins)}


def classification_report(y_true: Sequence, y_pred: Sequence | None, probabilities, class_names: Sequence[str],
                          patient_ids: Sequence[str], *, positive_class: str | None = None,
                          n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
                          confidence: float = DEFAULT_CONFIDENCE, n_bins: int = DEFAULT_N_BINS,
                          specificities: Sequence[float] = DEFAULT_TARGETS,
                          sensitivities: Sequence[float] = DEFAULT_TARGETS) -> ClassificationReport:
    """Score per-image class predictions. ``y_true``/``y_pred``: class names or indices into
    ``class_names``; ``y_pred`` None = the most probable class. ``probabilities``: images x classes
    (rows sum to 1), with two classes also one P(class_names[1]) per image; None = no AUC, operating
    points or calibration. ``patient_ids``: one per image, the bootstrap's resampling unit.
    ``positive_class``: the class of the DeLong CI and the operating points (binary: default
    class_names[1]; more classes: none unless given, e.g. 'malignant' against the rest)."""
    names = _check_class_names(class_names)
    if len(y_true) == 0:
        raise InputError(None, "no images to evaluate")
    truth = _class_indices(y_true, names, "y_true")
    n = len(truth)
    probs = None if probabilities is None else _probability_matrix(probabilities, n, names)
    if y_pred is None and probs is None:
        raise InputError(None, "give predicted classes (y_pred) or probabilities, or both")
    pred = probs.argmax(axis=1) if y_pred is None else _class_indices(y_pred, names, "y_pred")
    if len(pred) != n or len(patient_ids) != n:
        raise InputError(None, f"y_true has {n} images but y_pred has {len(pred)} and patient_ids {len(patient_ids)}")
    if positive_class is None and len(names) == 2:
        positive_class = names[1]
    if positive_class is not None and positive_class not in names:
        raise ConfigError(None, f"positive class {positive_class!r} is not one of {', '.join(names)}")
    for target in (*specificities, *sensitivities):
        _check_fraction(target, "operating-point targets")
    _check_fraction(confidence, "confidence")
    if n_bins < 1:
        raise ConfigError(None, f"calibration bins must be >= 1, got {n_bins}")

    boot = {"n_boot": n_boot, "seed": seed, "confidence": confidence}
    groups, index = group_index(patient_ids)
    n_groups = len(groups)
    notes = [SINGLE_GROUP_NOTE] if n_groups == 1 and n_boot > 0 else []

    confusion = _label_metrics(truth, pred, names)
    cm_by_patient = np.zeros((n_groups, len(names), len(names)))
    np.add.at(cm_by_patient, (index, truth, pred), 1.0)
    point = {"accuracy": confusion.accuracy, "balanced_accuracy": confusion.balanced_accuracy,
             "macro_precision": confusion.macro["precision"], "macro_recall": confusion.macro["recall"],
             "macro_f1": confusion.macro["f1"]}
    headline = {key: _metric(value, lambda w, key=key: matrix_metrics(np.tensordot(w, cm_by_patient, axes=1))[key],
                             n_groups, n, boot) for key, value in point.items()}
    absent = [name for k, name in enumerate(names) if confusion.support[k] == 0]
    if absent:
        notes.append(f"class(es) absent from the truth: {', '.join(absent)}: recall undefined, left out of macro "
                     "recall and balanced accuracy")
    never = [name for k, name in enumerate(names) if confusion.predicted[k] == 0]
    if never:
        notes.append(f"class(es) never predicted: {', '.join(never)}: precision undefined, left out of macro precision")

    roc_auc: dict[str, MetricValue] = {}
    delong, operating_points, calibration, curves = None, [], {}, {}
    if probs is None:
        notes.append("no probabilities given: no ROC AUC, DeLong CI, operating points or calibration")
    else:
        shown = [names.index(positive_class)] if len(names) == 2 else range(len(names))
        for c in shown:
            is_c = truth == c
            roc_auc[names[c]] = _roc_auc(is_c, probs[:, c], rank_scores(probs[:, c], is_c, index), n_groups, boot)
            if not np.isfinite(roc_auc[names[c]].value):
                notes.append(f"ROC AUC of '{names[c]}' undefined: "
                             + ("every image is" if is_c.all() else "no image is") + f" '{names[c]}'")
            else:
                curves[names[c]] = _curve(is_c, probs[:, c])
        if len(names) == 2:
            headline["roc_auc"] = roc_auc[positive_class]
        else:
            roc_auc["macro"] = _macro_auc(truth, probs, index, n_groups, roc_auc, names, boot)
            headline["macro_roc_auc"] = roc_auc["macro"]
        if positive_class is not None:
            p = names.index(positive_class)
            is_pos = truth == p
            if is_pos.all() or not is_pos.any():
                notes.append("no DeLong CI or operating points: " + ("every" if is_pos.all() else "no")
                             + f" image is '{positive_class}'")
            else:
                delong = delong_auc(probs[:, p], is_pos, confidence)
                if not np.isfinite(delong.variance):
                    notes.append("DeLong CI undefined: it needs at least two positive and two negative images")
                operating_points = _operating_points(is_pos, probs[:, p], rank_scores(probs[:, p], is_pos, index),
                                                     n_groups, boot, specificities, sensitivities)
        headline["brier"], calibration = _calibration(truth, probs, names, positive_class, index, n_groups, boot,
                                                      n_bins)
        headline["ece"] = MetricValue(calibration["ece"], None, n)

    return ClassificationReport(
        class_names=names, n_images=n, n_patients=n_groups, positive_class=positive_class, confusion=confusion,
        headline=headline, roc_auc=roc_auc, delong=delong, operating_points=operating_points, calibration=calibration,
        roc_curves=curves, bootstrap={"unit": "patient", "n_boot": n_boot, "seed": seed, "confidence": confidence,
                                      "n_patients": n_groups, "method": "percentile"},
        rules=classification_rules(names, positive_class, n_bins), notes=notes)


def _macro_auc(truth: np.ndarray, probs: np.ndarray, index: np.ndarray, n_groups: int,
               per_class: dict[str, MetricValue], names: list[str], boot: dict) -> MetricValue:
    """sklearn's macro one-vs-rest AUC; a resample missing a class is undefined (left out)."""
    n = len(truth)
    if any(not np.isfinite(per_class[name].value) for name in names):
        return MetricValue(float("nan"), None, n)
    value = roc_auc_score(truth, probs, multi_class="ovr", average="macro", labels=list(range(len(names))))
    ranked = [rank_scores(probs[:, c], truth == c, index) for c in range(len(names))]
    return _metric(value, lambda w: np.mean([auc_of_curves(*weighted_roc(w, r)) for r in ranked], axis=0),
                   n_groups, n, boot)


# ---------------------------------------------------------------- figures






def roc_png(rep: ClassificationReport) -> bytes:
    """PNG of the ROC curve of each scored class (one-vs-rest with more than two classes) with its
    AUC, and the operating points marked."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in rep.roc_curves.items():
        ax.plot(curve["fpr"], curve["tpr"], label=f"{name} (AUC {fmt(rep.roc_auc[name].value, 3)})")
    for p in rep.operating_points:
        sens, spec = (p.value.value, p.achieved) if p.fixed == "specificity" else (p.achieved, p.value.value)
        ax.plot([1.0 - spec], [sens], "o", markersize=5, label=f"{rep.positive_class}: {p.reported} at {p.fixed} {p.target:g}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC: {rep.n_images} images, {rep.n_patients} patients", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return figure_png(fig)


def reliability_png(rep: ClassificationReport) -> bytes:
    """PNG of the reliability curve: observed frequency against mean predicted probability per bin,
    marker area by the bin's images, the diagonal = perfect calibration."""
    cal = rep.calibration
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    bins = cal.get("reliability", [])
    largest = max([b.count for b in bins] + [1])
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.plot([b.mean_predicted for b in bins], [b.observed_frequency for b in bins], "-", color="C0")
    ax.scatter([b.mean_predicted for b in bins], [b.observed_frequency for b in bins],
               s=[20 + 180 * b.count / largest for b in bins], color="C0", label="bins (area ~ images)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"mean predicted: {cal.get('probability', '')}", fontsize=8)
    ax.set_ylabel("observed frequency")
    ax.set_title(f"Reliability: ECE {fmt(cal.get('ece'), 3)}, Brier {fmt(cal.get('brier'), 3)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return figure_png(fig)
