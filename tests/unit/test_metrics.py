"""Unit tests of medscale.eval.metrics: exact values by hand and brute force, sklearn as a reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medscale.eval.metrics import (
    aggregate_by_group,
    average_precision,
    classification_metrics,
    expected_calibration_error,
    roc_auc,
    threshold_at_specificity,
)


def brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    """AUROC as the share of (positive, negative) pairs ordered right, ties one half."""
    sp, sn = s[y == 1][:, None], s[y == 0][None, :]
    return float(((sp > sn) + 0.5 * (sp == sn)).mean())


def brute_ap(y: np.ndarray, s: np.ndarray) -> float:
    """AP as sum over distinct thresholds of (recall gained) x precision at that threshold."""
    ap, prev_recall = 0.0, 0.0
    for t in np.unique(s)[::-1]:
        hit = s >= t
        recall = (hit & (y == 1)).sum() / (y == 1).sum()
        ap += (recall - prev_recall) * (hit & (y == 1)).sum() / hit.sum()
        prev_recall = recall
    return ap


def tied_data(rng: np.random.Generator, n: int, prevalence: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < prevalence).astype(int)
    return y, np.round(rng.normal(size=n) + y, 1)  # one decimal: many ties, also across classes


# --- roc_auc / average_precision -------------------------------------------------------------------

def test_hand_computed_cases() -> None:
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(y, s) == pytest.approx(0.75)
    assert average_precision(y, s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # A tie between a positive and a negative counts one half; tied scores are one threshold.
    y, s = np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9])
    assert roc_auc(y, s) == pytest.approx(3.5 / 4)
    assert average_precision(y, s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_with_ties(seed: int) -> None:
    y, s = tied_data(np.random.default_rng(seed), 300, prevalence=0.1 + 0.15 * seed)
    assert roc_auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(brute_ap(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_with_ties_and_weights(seed: int) -> None:
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    y, s = tied_data(rng, 2000, prevalence=0.02 + 0.2 * seed)
    assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    w = rng.integers(0, 4, size=y.size).astype(float)
    assert roc_auc(y, s, w) == pytest.approx(skm.roc_auc_score(y, s, sample_weight=w), abs=1e-12)
    assert average_precision(y, s, w) == pytest.approx(skm.average_precision_score(y, s, sample_weight=w), abs=1e-12)


def test_count_weights_equal_explicit_resample() -> None:
    # The bootstrap rests on this: weighting by draw counts equals computing on the drawn samples.
    rng = np.random.default_rng(1)
    y, s = tied_data(rng, 500)
    idx = rng.integers(0, y.size, size=y.size)
    counts = np.bincount(idx, minlength=y.size)
    assert roc_auc(y, s, counts) == pytest.approx(roc_auc(y[idx], s[idx]), abs=1e-12)
    assert average_precision(y, s, counts) == pytest.approx(average_precision(y[idx], s[idx]), abs=1e-12)


def test_perfect_inverted_constant_single_class() -> None:
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert roc_auc(y, s) == 1.0 and average_precision(y, s) == 1.0
    assert roc_auc(y, -s) == 0.0
    assert average_precision(y, -s) == pytest.approx((1 / 4 + 2 / 5) / 2)
    assert roc_auc(y, np.full(5, 0.3)) == 0.5
    assert average_precision(y, np.full(5, 0.3)) == pytest.approx(0.4)  # the prevalence
    assert math.isnan(roc_auc(np.ones(5), s)) and math.isnan(roc_auc(np.zeros(5), s))
    assert math.isnan(average_precision(np.zeros(5), s))


def test_binary_input_validation() -> None:
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="shapes"):
        roc_auc(np.array([0, 1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="0/1"):
        average_precision(np.array([0, 2]), np.array([0.1, 0.2]))


# --- calibration, operating point, aggregation -----------------------------------------------------

def test_ece() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = rng.random(p.size) < p  # calibrated by construction
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, p**3) > 0.1
    assert expected_calibration_error(np.array([0, 1, 0, 1]), np.full(4, 0.8)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(np.array([0, 1]), np.array([0.5, 1.5]))


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 0.99, 1.0])
def test_threshold_at_specificity_is_smallest_reaching_it(target: float) -> None:
    y, s = tied_data(np.random.default_rng(3), 1000)
    t = threshold_at_specificity(y, s, target)
    spec = lambda thr: ((s < thr) & (y == 0)).sum() / (y == 0).sum()  # noqa: E731
    assert spec(t) >= target
    smaller = np.unique(s)[np.unique(s) < t]
    assert smaller.size == 0 or spec(smaller[-1]) < target


def test_threshold_at_specificity_edges() -> None:
    y, s = np.array([0, 1, 0]), np.array([0.2, 0.5, 0.9])  # a negative holds the top score
    t = threshold_at_specificity(y, s, 1.0)
    assert t > 0.9 and not (s >= t).any()
    assert threshold_at_specificity(y, s, 0.5) == 0.5
    assert math.isnan(threshold_at_specificity(np.ones(3), s, 0.9))


def test_aggregate_by_group_mean_max_or() -> None:
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9], [0.3, 0.7]])
    groups = ["b", "a", "b", "a"]
    mean, t, names = aggregate_by_group(probs, np.array([1, 0, 1, 0]), groups)
    assert names == ["a", "b"]
    np.testing.assert_allclose(mean, [[0.45, 0.55], [0.15, 0.85]])
    np.testing.assert_array_equal(t, [0, 1])
    mx, _, _ = aggregate_by_group(probs, np.array([1, 0, 1, 0]), groups, how="max")
    np.testing.assert_allclose(mx, [[0.6, 0.7], [0.2, 0.9]])
    multilabel = np.array([[0, 1], [0, 0], [1, 0], [0, 0]])
    _, t, _ = aggregate_by_group(probs, multilabel, groups)
    np.testing.assert_array_equal(t, [[0, 0], [1, 1]])  # a study is positive if any image is


def test_aggregate_by_group_inconsistent_label() -> None:
    with pytest.raises(ValueError, match="'p7'.*inconsistent"):
        aggregate_by_group(np.full((3, 2), 0.5), np.array([0, 1, 0]), ["p1", "p7", "p7"])
    with pytest.raises(ValueError, match="how"):
        aggregate_by_group(np.full((3, 2), 0.5), np.array([0, 1, 0]), ["a", "b", "c"], how="median")


# --- classification_metrics ------------------------------------------------------------------------

def multiclass_data(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    t = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[t]
    e = np.exp(logits)
    return np.round(e / e.sum(1, keepdims=True), 3), t


def multilabel_data(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random((n, c)) < rng.uniform(0.02, 0.4, c)).astype(int)
    return np.round(1 / (1 + np.exp(-(rng.normal(size=(n, c)) + 2 * y - 1.5))), 2), y


def test_binary_multiclass_reports_class_one() -> None:
    p, t = multiclass_data(np.random.default_rng(0), 500, 2)
    r = classification_metrics(p, t, task="multiclass", class_names=["normal", "tumour"])
    assert r["auroc"] == pytest.approx(roc_auc(t, p[:, 1]))
    assert r["auprc"] == pytest.approx(average_precision(t, p[:, 1]))
    assert r["sensitivity"] == pytest.approx(((p[:, 1] >= 0.5) & (t == 1)).sum() / (t == 1).sum())
    assert r["accuracy"] == pytest.approx((p.argmax(1) == t).mean())
    assert r["ece"] == pytest.approx(expected_calibration_error(t, p[:, 1]))
    assert r["per_class"]["tumour"]["threshold"] == 0.5 and "top5_accuracy" not in r
    json.dumps(r, allow_nan=False)


def test_multiclass_four_and_seven_classes() -> None:
    p, t = multiclass_data(np.random.default_rng(1), 800, 4)
    r = classification_metrics(p, t, task="multiclass")
    per = [roc_auc(t == k, p[:, k]) for k in range(4)]
    assert r["auroc"] == pytest.approx(np.mean(per))
    assert [r["per_class"][str(k)]["n_pos"] for k in range(4)] == np.bincount(t).tolist()
    # Default multiclass operating point is the argmax decision: sensitivity is per-class recall.
    recall = [((p.argmax(1) == k) & (t == k)).sum() / (t == k).sum() for k in range(4)]
    assert r["sensitivity"] == pytest.approx(np.mean(recall))
    assert r["per_class"]["0"]["threshold"] is None
    assert r["operating_point"] == {"decision": "argmax"}
    p7, t7 = multiclass_data(np.random.default_rng(2), 300, 7)
    r7 = classification_metrics(p7, t7, task="multiclass")
    assert r["accuracy"] <= 1.0 and r7["accuracy"] <= r7["top5_accuracy"] <= 1.0


def test_multiclass_against_sklearn() -> None:
    skm = pytest.importorskip("sklearn.metrics")
    p, t = multiclass_data(np.random.default_rng(4), 1000, 4)
    r = classification_metrics(p, t, task="multiclass")
    assert r["auroc"] == pytest.approx(skm.roc_auc_score(np.eye(4)[t], p, average="macro"), abs=1e-12)
    assert r["auprc"] == pytest.approx(skm.average_precision_score(np.eye(4)[t], p, average="macro"), abs=1e-12)


def test_multilabel_fourteen_labels_at_specificity() -> None:
    p, y = multilabel_data(np.random.default_rng(5), 3000, 14)
    y[:, 13] = 0  # a label absent from the split: reported, left out of the macro averages
    names = [f"finding{k}" for k in range(14)]
    r = classification_metrics(p, y, task="multilabel", class_names=names, at_specificity=0.9)
    assert r["per_class"]["finding13"]["auroc"] is None
    assert r["auroc"] == pytest.approx(np.mean([roc_auc(y[:, k], p[:, k]) for k in range(13)]))
    for k, name in enumerate(names[:13]):
        pc = r["per_class"][name]
        assert pc["specificity"] >= 0.9 and pc["threshold"] == threshold_at_specificity(y[:, k], p[:, k], 0.9)
        assert pc["prevalence"] == pytest.approx(y[:, k].mean())
    thr = np.array([r["per_class"][nm]["threshold"] for nm in names])
    assert r["accuracy"] == pytest.approx(((p >= thr) == y).mean())
    assert r["operating_point"] == {"at_specificity": 0.9}
    json.dumps(r, allow_nan=False)


def test_classification_metrics_validation() -> None:
    p, t = multiclass_data(np.random.default_rng(0), 10, 3)
    bad = p.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*\(2, 1\)"):
        classification_metrics(bad, t, task="multiclass")
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(p, t[:-1], task="multiclass")
    with pytest.raises(ValueError, match=r"\[0, 3\).*\[5\]"):
        classification_metrics(p, np.r_[t[:-1], 5], task="multiclass")
    with pytest.raises(ValueError, match="shape of probs"):
        classification_metrics(p, np.zeros((10, 2), int), task="multilabel")
    with pytest.raises(ValueError, match="task"):
        classification_metrics(p, t, task="binary")
    with pytest.raises(ValueError, match="not both"):
        classification_metrics(p, t, task="multiclass", threshold=0.3, at_specificity=0.9)
    with pytest.raises(ValueError, match="class_names"):
        classification_metrics(p, t, task="multiclass", class_names=["a", "b"])
    with pytest.raises(ValueError, match="groups"):
        classification_metrics(p, t, task="multiclass", n_bootstrap=10, groups=np.array(["a", "b"]))


# --- bootstrap ------------------------------------------------------------------------------------

def test_bootstrap_contains_point_and_narrows_with_data() -> None:
    rng = np.random.default_rng(6)
    widths = []
    for n in (200, 5000):
        p, y = multilabel_data(rng, n, 5)
        r = classification_metrics(p, y, task="multilabel", n_bootstrap=300, seed=1)
        for m in ("auroc", "auprc", "accuracy", "sensitivity", "specificity"):
            low, high = r["ci95"][m]
            assert low <= r[m] <= high, m
        assert r["bootstrap"]["unit"] == "sample" and r["bootstrap"]["valid"]["accuracy"] == 300
        widths.append(np.diff(r["ci95"]["auroc"])[0])
    assert widths[1] < widths[0] / 2
    again = classification_metrics(p, y, task="multilabel", n_bootstrap=300, seed=1)
    assert again["ci95"] == r["ci95"]  # seeded, reproducible


def test_bootstrap_skips_resamples_without_both_labels() -> None:
    p, y = multilabel_data(np.random.default_rng(7), 100, 3)
    y[:, 2] = 0
    y[0, 2] = 1  # one positive: about a third of the resamples miss it
    r = classification_metrics(p, y, task="multilabel", n_bootstrap=200)
    valid = r["bootstrap"]["valid"]
    assert 100 < valid["auroc"] < 180 and valid["accuracy"] == 200
    assert r["ci95"]["auroc"] is not None


def test_cluster_bootstrap_wider_for_correlated_images() -> None:
    p, t = multiclass_data(np.random.default_rng(8), 300, 2)
    rep = 5  # each patient's image five times: perfectly correlated within a patient
    p5, t5 = np.repeat(p, rep, axis=0), np.repeat(t, rep)
    patients = [f"patient{i}" for i in np.repeat(np.arange(300), rep)]
    image = classification_metrics(p5, t5, task="multiclass", n_bootstrap=400)
    cluster = classification_metrics(p5, t5, task="multiclass", n_bootstrap=400, groups=patients)
    assert cluster["auroc"] == image["auroc"]
    assert (cluster["bootstrap"]["unit"], cluster["bootstrap"]["n_units"]) == ("group", 300)
    for m in ("auroc", "accuracy", "sensitivity"):
        assert np.diff(cluster["ci95"][m])[0] >= 1.5 * np.diff(image["ci95"][m])[0], m  # about sqrt(5)


def test_padded_duplicates_change_metrics() -> None:
    # Distributed samplers pad the last batch with repeated samples; counted, they bias every
    # metric. This is why the evaluator de-duplicates by key before calling classification_metrics.
    p, t = multiclass_data(np.random.default_rng(9), 101, 2)
    clean = classification_metrics(p, t, task="multiclass")
    pad = np.arange(3)  # 101 samples over 8 ranks of 13: the first 3 appear twice
    padded = classification_metrics(np.r_[p, p[pad]], np.r_[t, t[pad]], task="multiclass")
    assert padded["n_samples"] == 104
    for m in ("auroc", "auprc", "accuracy", "sensitivity", "specificity"):
        assert padded[m] != pytest.approx(clean[m], abs=1e-9), m
