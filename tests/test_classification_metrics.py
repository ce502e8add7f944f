"""Classification metrics (``evaluation/classification.py``, issue 8.3): a published confusion matrix
scored by hand, the resampled ROC machinery against sklearn with sample weights, DeLong against the
brute-force Mann-Whitney kernel and against the patient bootstrap, operating points against a
brute-force threshold sweep, ECE against torchmetrics, and temperature scaling."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support,
                             roc_auc_score, roc_curve)

from mammocad.errors import ConfigError, InputError
from mammocad.evaluation.classification import (apply_temperature, auc_of_curves, classification_report,
                                                confusion_metrics, delong_auc, delong_components,
                                                expected_calibration_error, fit_temperature, matrix_metrics,
                                                negative_log_likelihood, rank_scores, reliability_curve,
                                                reliability_png, roc_png, sensitivity_at_specificity, weighted_roc)

CLASSES3 = ["benign", "malignant", "normal"]
# The CBIS-DDSM Mask R-CNN system's published matrix: rows = truth, columns = predicted
PUBLISHED = [[30, 5, 5], [5, 32, 3], [4, 3, 33]]


def _labels_of(matrix):
    """(truth, prediction) class indices of every image a confusion matrix counts."""
    truth, pred = [], []
    for t, row in enumerate(matrix):
        for p, count in enumerate(row):
            truth += [t] * count
            pred += [p] * count
    return np.array(truth), np.array(pred)


def _scored(n, rng, shift=1.0):
    """n images, about half positive, a noisy score higher for positives."""
    positive = rng.random(n) < 0.5
    return rng.normal(size=n) + shift * positive, positive


# ---------------------------------------------------------------- confusion-matrix metrics


def test_published_cbis_ddsm_matrix_by_hand():
    m = confusion_metrics(PUBLISHED, CLASSES3)
    assert m.accuracy == 95 / 120  # 30 + 32 + 33 correct of 120
    precision = [30 / 39, 32 / 40, 33 / 41]  # column sums 39, 40, 41
    recall = [30 / 40, 32 / 40, 33 / 40]  # row sums 40 each
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    assert m.precision == pytest.approx(precision, rel=1e-12)
    assert m.recall == pytest.approx(recall, rel=1e-12)
    assert m.f1 == pytest.approx(f1, rel=1e-12)
    assert m.f1 == pytest.approx([60 / 79, 64 / 80, 66 / 81], rel=1e-12)  # 2TP / (row + column)
    assert m.support.tolist() == [40, 40, 40] and m.predicted.tolist() == [39, 40, 41]
    assert m.macro["precision"] == pytest.approx(np.mean(precision), rel=1e-12)
    assert m.macro["recall"] == pytest.approx(np.mean(recall), rel=1e-12)
    assert m.macro["f1"] == pytest.approx(np.mean(f1), rel=1e-12)
    assert m.balanced_accuracy == pytest.approx(np.mean(recall), rel=1e-12)
    assert m.weighted["f1"] == pytest.approx(m.macro["f1"], rel=1e-12)  # equal supports
    assert round(m.accuracy, 4) == 0.7917 and round(m.macro["f1"], 4) == 0.7914
    # the paper's summary does not follow from its matrix (module docstring)
    assert m.accuracy != pytest.approx(0.85, abs=0.01)
    assert (m.macro["precision"], m.macro["recall"], m.macro["f1"]) != pytest.approx((0.75, 0.80, 0.825), abs=0.01)
    assert m.recall == pytest.approx([0.75, 0.80, 0.825])  # what those figures are


def test_report_from_labels_reproduces_the_published_matrix():
    truth, pred = _labels_of(PUBLISHED)
    rep = classification_report([CLASSES3[t] for t in truth], [CLASSES3[p] for p in pred], None, CLASSES3,
                                [f"p{k}" for k in range(len(truth))], n_boot=200)
    assert rep.confusion.matrix.tolist() == PUBLISHED
    assert rep.headline["accuracy"].value == 95 / 120
    assert rep.headline["macro_f1"].value == pytest.approx(np.mean([60 / 79, 64 / 80, 66 / 81]), rel=1e-12)
    ci = rep.headline["accuracy"].ci
    assert ci.low < 95 / 120 < ci.high and ci.n_valid == 200
    assert "no probabilities" in " ".join(rep.notes) and not rep.roc_auc and rep.calibration == {}


def test_matrix_metrics_match_sklearn_with_undefined_classes():
    """The bootstrap's vectorised definitions equal sklearn's, including a class never predicted
    (precision undefined) and a class absent from the truth (recall undefined)."""
    rng = np.random.default_rng(1)
    truth = rng.choice([0, 1, 2], size=80)  # class 3 absent from the truth
    pred = rng.choice([0, 1, 3], size=80)  # class 2 never predicted
    got = matrix_metrics(confusion_matrix(truth, pred, labels=[0, 1, 2, 3]))
    p, r, f, _ = precision_recall_fscore_support(truth, pred, labels=[0, 1, 2, 3], average="macro",
                                                 zero_division=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(truth, pred)
    assert float(got["macro_precision"]) == pytest.approx(p, rel=1e-12)
    assert float(got["macro_recall"]) == pytest.approx(r, rel=1e-12)
    assert float(got["macro_f1"]) == pytest.approx(f, rel=1e-12)
    assert float(got["balanced_accuracy"]) == pytest.approx(balanced, rel=1e-12)
    assert float(got["accuracy"]) == pytest.approx(np.mean(truth == pred), rel=1e-12)

    rep = classification_report(truth, pred, None, ["a", "b", "c", "d"], np.arange(80) // 2, n_boot=0)
    per_class = rep.confusion.to_dict()["per_class"]
    assert per_class[2]["precision"] is None and per_class[3]["recall"] is None
    assert any("never predicted: c" in n for n in rep.notes) and any("absent from the truth: d" in n for n in rep.notes)


# ---------------------------------------------------------------- ROC under resampling


def test_weighted_roc_matches_sklearn_with_sample_weights():
    rng = np.random.default_rng(2)
    scores, positive = _scored(120, rng)
    scores = np.round(scores, 1)  # ties: one threshold per distinct score
    patient = rng.integers(0, 50, 120)
    ranked = rank_scores(scores, positive, patient)
    tpr, fpr = weighted_roc(np.ones((1, 50)), ranked)  # the original sample
    ref_fpr, ref_tpr, _ = roc_curve(positive, scores, drop_intermediate=False)
    np.testing.assert_allclose(tpr[0], ref_tpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fpr[0], ref_fpr, rtol=0, atol=1e-12)
    counts = rng.multinomial(50, np.full(50, 1 / 50), size=20).astype(float)
    tpr, fpr = weighted_roc(counts, ranked)
    aucs = auc_of_curves(tpr, fpr)
    sens = sensitivity_at_specificity(tpr, fpr, 0.8)[0]
    for k, w in enumerate(counts):
        weight = w[patient]
        assert aucs[k] == pytest.approx(roc_auc_score(positive, scores, sample_weight=weight), abs=1e-12)
        # sklearn drops zero-weight images' thresholds; the best sensitivity is the same
        f, t, _ = roc_curve(positive, scores, sample_weight=weight, drop_intermediate=False)
        assert sens[k] == pytest.approx(t[(1 - f) >= 0.8 - 1e-9].max(), abs=1e-12)


def _brute_operating_point(scores, positive, fixed, target):
    """(value, achieved, threshold) by sweeping every threshold, highest first."""
    best = None
    for t in sorted(set(scores.tolist()) | {math.inf}, reverse=True):
        called = scores >= t
        sens = (called & positive).sum() / positive.sum()
        spec = (~called & ~positive).sum() / (~positive).sum()
        achieved, value = (spec, sens) if fixed == "specificity" else (sens, spec)
        if achieved >= target - 1e-12 and (best is None or value > best[0]):
            best = (value, achieved, None if t == math.inf else t)
    return best


def test_operating_points_against_a_threshold_sweep():
    negatives = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    positives = [0.25, 0.45, 0.5, 0.55, 0.65, 0.75, 0.85, 0.95, 0.97, 0.99]  # 0.5 ties a negative
    scores = np.array(negatives + positives)
    positive = np.array([False] * 10 + [True] * 10)
    rep = classification_report(positive.astype(int), None, scores, ["benign", "malignant"],
                                [f"p{k}" for k in range(20)], n_boot=100)
    by_target = {(p.fixed, p.target): p for p in rep.operating_points}
    assert set(by_target) == {("specificity", 0.8), ("specificity", 0.9), ("sensitivity", 0.8), ("sensitivity", 0.9)}
    # by hand: at threshold 0.75 two negatives (0.8, 0.9) are called, specificity exactly 0.8; 5 positives
    p = by_target[("specificity", 0.8)]
    assert (p.value.value, p.achieved, p.threshold) == (0.5, 0.8, 0.75)
    for (fixed, target), p in by_target.items():
        assert (p.value.value, p.achieved, p.threshold) == pytest.approx(
            _brute_operating_point(scores, positive, fixed, target))
        assert p.value.ci is not None and p.value.ci.low <= p.value.ci.high


# ---------------------------------------------------------------- DeLong


def _brute_structural_components(x, y):
    """V10, V01 from the Mann-Whitney kernel psi(x, y) = 1 if x > y, 1/2 if tied, 0 else: O(mn)."""
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)


def test_delong_matches_the_brute_force_kernel_and_sklearn():
    rng = np.random.default_rng(3)
    scores, positive = _scored(70, rng, shift=0.8)
    scores = np.round(scores, 1)  # with ties
    auc, v10, v01 = delong_components(scores, positive)
    b10, b01 = _brute_structural_components(scores[positive], scores[~positive])
    np.testing.assert_allclose(v10, b10, rtol=0, atol=1e-12)
    np.testing.assert_allclose(v01, b01, rtol=0, atol=1e-12)
    assert auc == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    m, n = positive.sum(), (~positive).sum()
    result = delong_auc(scores, positive)
    assert result.variance == pytest.approx(np.var(b10, ddof=1) / m + np.var(b01, ddof=1) / n, rel=1e-12)
    half = 1.959963984540054 * math.sqrt(result.variance)
    assert (result.low, result.high) == pytest.approx((auc - half, auc + half), rel=1e-9)


def test_delong_perfect_separation_and_too_few_images():
    perfect = delong_auc([0.1, 0.2, 0.3, 0.8, 0.9], [False, False, False, True, True])
    assert (perfect.auc, perfect.variance, perfect.low, perfect.high) == (1.0, 0.0, 1.0, 1.0)
    one_positive = delong_auc([0.1, 0.2, 0.9], [False, False, True])
    assert one_positive.auc == 1.0 and math.isnan(one_positive.low) and one_positive.to_dict()["low"] is None


def test_delong_agrees_with_the_patient_bootstrap_on_independent_images():
    """The cross-check on one example: one image per patient, DeLong's and the bootstrap's 95%
    intervals have about the same width."""
    rng = np.random.default_rng(4)
    scores, positive = _scored(400, rng)
    probability = 1 / (1 + np.exp(-scores))
    rep = classification_report(positive.astype(int), None, probability, ["no", "yes"],
                                [f"p{k}" for k in range(400)], n_boot=1000)
    boot, delong = rep.roc_auc["yes"].ci, rep.delong
    assert delong.auc == pytest.approx(rep.roc_auc["yes"].value, abs=1e-12)
    ratio = (boot.high - boot.low) / (delong.high - delong.low)
    assert 0.85 < ratio < 1.15, ratio


def test_bootstrap_resamples_patients_not_images():
    """Every image three times under its patient: the patient bootstrap gives the same AUC interval
    as one image per patient, while DeLong (images independent) narrows by about sqrt(3)."""
    rng = np.random.default_rng(5)
    scores, positive = _scored(80, rng)
    probability = 1 / (1 + np.exp(-scores))
    ids = [f"p{k:02d}" for k in range(80)]
    single = classification_report(positive.astype(int), None, probability, ["no", "yes"], ids, n_boot=300)
    triple = classification_report(np.repeat(positive.astype(int), 3), None, np.repeat(probability, 3), ["no", "yes"],
                                   np.repeat(ids, 3), n_boot=300)
    a, b = single.roc_auc["yes"], triple.roc_auc["yes"]
    assert b.value == pytest.approx(a.value, abs=1e-12)
    assert (b.ci.low, b.ci.high) == pytest.approx((a.ci.low, a.ci.high), abs=1e-12)
    width = lambda d: d.high - d.low
    assert width(triple.delong) < 0.7 * width(single.delong)


# ---------------------------------------------------------------- multiclass AUC


def test_one_vs_rest_auc_and_resamples_missing_a_class():
    rng = np.random.default_rng(6)
    n = 150
    truth = rng.integers(0, 2, n)
    truth[:3] = 2  # the only 'normal' images, all of patient 'rare'
    patients = np.array(["rare"] * 3 + [f"p{k}" for k in range(n - 3)])
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), truth] += 1.0
    probs = apply_temperature(logits, 1.0)
    rep = classification_report(truth, None, probs, CLASSES3, patients, n_boot=300)
    for c, name in enumerate(CLASSES3):
        assert rep.roc_auc[name].value == pytest.approx(roc_auc_score(truth == c, probs[:, c]), abs=1e-12)
    assert rep.roc_auc["macro"].value == pytest.approx(roc_auc_score(truth, probs, multi_class="ovr"), abs=1e-12)
    assert rep.headline["macro_roc_auc"] is rep.roc_auc["macro"]
    # a resample without patient 'rare' has no 'normal' image: that AUC and the macro are undefined there
    normal, macro = rep.roc_auc["normal"].ci, rep.roc_auc["macro"].ci
    assert 0 < macro.n_valid < 300 and macro.n_valid == normal.n_valid
    assert rep.roc_auc["benign"].ci.n_valid == 300
    assert set(rep.roc_curves) == set(CLASSES3)


def test_auc_of_a_single_class_is_none_with_a_note():
    probability = np.linspace(0.1, 0.9, 12)
    rep = classification_report(np.zeros(12, dtype=int), None, probability, ["benign", "malignant"],
                                np.arange(12) // 2, n_boot=50)
    d = rep.to_dict()
    assert d["headline"]["roc_auc"]["value"] is None and d["headline"]["roc_auc"]["ci"] is None
    assert d["delong"] is None and d["operating_points"] == []
    assert any("ROC AUC of 'malignant' undefined" in n for n in rep.notes)
    assert d["headline"]["brier"]["value"] == pytest.approx(np.mean(probability ** 2))


# ---------------------------------------------------------------- calibration


def _miscalibrated(rng, n=500):
    p = rng.beta(2, 2, n)
    return p, (rng.random(n) < p ** 1.5).astype(int)


def test_reliability_curve_matches_sklearn_with_counts():
    p, y = _miscalibrated(np.random.default_rng(7))
    bins = reliability_curve(p, y, 10)
    observed, predicted = calibration_curve(y, p, n_bins=10)
    assert [b.observed_frequency for b in bins] == pytest.approx(observed.tolist())
    assert [b.mean_predicted for b in bins] == pytest.approx(predicted.tolist())
    hist = np.histogram(p, bins=10, range=(0, 1))[0]
    assert [b.count for b in bins] == hist[hist > 0].tolist()


def test_ece_matches_torchmetrics():
    """torchmetrics' L1 calibration error (binary: P(positive) against the label; multiclass: top-class
    probability against correctness). Importing torchmetrics takes most of this test's time."""
    torch = pytest.importorskip("torch")
    from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

    rng = np.random.default_rng(7)
    p, y = _miscalibrated(rng)
    ours = expected_calibration_error(p, y, 10)
    theirs = BinaryCalibrationError(n_bins=10, norm="l1")(torch.tensor(p), torch.tensor(y)).item()
    assert ours == pytest.approx(theirs, abs=1e-5) and ours > 0.02

    logits = rng.normal(size=(500, 3)) * 2
    truth = rng.integers(0, 3, 500)
    probs = apply_temperature(logits, 1.0)
    rep = classification_report(truth, None, probs, CLASSES3, np.arange(500) // 2, n_boot=0)
    theirs = MulticlassCalibrationError(num_classes=3, n_bins=10, norm="l1")(torch.tensor(probs),
                                                                             torch.tensor(truth)).item()
    assert rep.calibration["ece"] == pytest.approx(theirs, abs=1e-5) and rep.calibration["ece"] > 0.1
    brier = np.mean(((probs - np.eye(3)[truth]) ** 2).sum(axis=1))
    assert rep.headline["brier"].value == pytest.approx(brier, rel=1e-12)


def test_temperature_fitted_on_training_predictions_undoes_over_confidence():
    rng = np.random.default_rng(8)
    logits = rng.normal(scale=1.5, size=(6000, 3))
    p = apply_temperature(logits, 1.0)
    labels = (rng.random(6000)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)  # drawn from p: calibrated
    over = 3.0 * logits
    train, test = slice(0, 3000), slice(3000, None)
    t = fit_temperature(over[train], labels[train])  # fitted on the training half only
    assert 2.7 < t < 3.3, t
    nll = lambda temperature: negative_log_likelihood(over[test], labels[test], temperature)
    assert nll(t) < 0.9 * nll(1.0)
    top = lambda q: (q.max(axis=1), q.argmax(axis=1) == labels[test])
    before = expected_calibration_error(*top(apply_temperature(over[test], 1.0)))
    after = expected_calibration_error(*top(apply_temperature(over[test], t)))
    assert after < 0.03 and before > 0.1

    binary = np.array([2.0, -1.0, 0.5])
    np.testing.assert_allclose(apply_temperature(binary, 2.0), 1 / (1 + np.exp(-binary / 2.0)), rtol=1e-12)


# ---------------------------------------------------------------- inputs and the report


@pytest.mark.parametrize("kwargs, error, message", [
    ({"y_pred": ["benign"] * 3}, InputError, "y_pred has 3"),
    ({"y_true": ["benign", "malignant", "cyst", "normal"]}, InputError, "class 'cyst', not one of"),
    ({"y_true": [0, 1, 3, 2]}, InputError, "class index 3, outside 0..2"),
    ({"probabilities": [[0.5, 0.3, 0.3]] * 4}, InputError, "sum to 1.1, not 1"),
    ({"probabilities": [[0.5, 0.5]] * 4}, InputError, "must be 4 x 3"),
    ({"patient_ids": ["a", "b"]}, InputError, "patient_ids 2"),
    ({"positive_class": "cyst"}, ConfigError, "positive class 'cyst'"),
    ({"y_pred": None, "probabilities": None}, InputError, "give predicted classes"),
])
def test_bad_inputs_raise_one_line_errors(kwargs, error, message):
    args = {"y_true": ["benign", "malignant", "normal", "normal"], "y_pred": [0, 1, 2, 1],
            "probabilities": [[0.6, 0.2, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.3, 0.4, 0.3]],
            "class_names": CLASSES3, "patient_ids": ["a", "a", "b", "c"], "n_boot": 0, **kwargs}
    with pytest.raises(error, match=message):
        classification_report(**args)


def test_confusion_matrix_must_be_square_counts():
    with pytest.raises(InputError, match="must be 3 x 3"):
        confusion_metrics([[1, 2], [3, 4]], CLASSES3)
    with pytest.raises(InputError, match="whole counts"):
        confusion_metrics([[1, 0.5], [0, 1]], ["a", "b"])


def test_report_is_deterministic_json_markdown_and_png():
    rng = np.random.default_rng(9)
    scores, positive = _scored(60, rng)
    probability = 1 / (1 + np.exp(-scores))
    make = lambda: classification_report(positive.astype(int), None, probability, ["benign", "malignant"],
                                         np.arange(60) // 2, n_boot=200, seed=3)
    rep = make()
    d = rep.to_dict()
    assert json.dumps(d, allow_nan=False) == json.dumps(make().to_dict(), allow_nan=False)
    assert d["bootstrap"] == {"unit": "patient", "n_boot": 200, "seed": 3, "confidence": 0.95, "n_patients": 30,
                              "method": "percentile"}
    assert d["roc_curves"]["malignant"]["thresholds"][0] is None  # sklearn's first threshold is +inf
    md = rep.to_markdown()
    assert "| ROC AUC | " in md and "DeLong 95% CI" in md and "resampling PATIENTS" in md
    assert "200 resamples of 30 patients, seed 3" in md
    for png in (roc_png(rep), reliability_png(rep)):
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
