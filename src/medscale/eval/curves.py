"""Curve data of one evaluation: ROC and PR curves, operating points, confusion and reliability bins.

Everything is computed exactly with numpy from the probabilities evaluation already holds, then
made small: each curve keeps at most `MAX_POINTS` points (first and last included), so the dict
travels cheaply into eval.json, a report or a dashboard. Values are plain lists, floats and ints.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from medscale.eval.metrics import _validate

__all__ = ["curve_data", "roc_curve", "pr_curve", "subsample_curve", "MAX_POINTS"]

MAX_POINTS = 200
"""Most points kept per curve (W&B subsamples its own plots to 10k rows; reports want far fewer)."""


def _counts(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positives when predicting `score >= t`, t down the distinct scores."""
    order = np.argsort(-score, kind="stable")
    s, yy = score[order], y[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # tied scores are one threshold
    tp = np.cumsum(yy)[last_of_tie]
    return tp, (np.arange(1, yy.size + 1) - np.cumsum(yy))[last_of_tie]


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact ROC points (fpr, tpr) from (0, 0) to (1, 1); empty without positives or negatives."""
    y = np.asarray(y, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return np.zeros(0), np.zeros(0)
    tp, fp = _counts(y, np.asarray(score, dtype=np.float64))
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def pr_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact PR points (precision, recall) by rising recall, from (1, 0) as sklearn; empty as `roc_curve`."""
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return np.zeros(0), np.zeros(0)
    tp, fp = _counts(y, np.asarray(score, dtype=np.float64))
    return np.r_[1.0, tp / (tp + fp)], np.r_[0.0, tp / n_pos]


def subsample_curve(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` points of the polyline (x, y), first and last kept.

    Points inside a straight run add nothing and go first (exact); if still too many, points are
    taken evenly along the curve's length, so steep corners keep as many points as long flat runs.
    """
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    if x.size <= 2:
        return x, y
    d1 = np.c_[x[1:-1] - x[:-2], y[1:-1] - y[:-2]]
    d2 = np.c_[x[2:] - x[1:-1], y[2:] - y[1:-1]]
    bend = np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]) > 1e-12
    keep = np.flatnonzero(np.r_[True, bend, True])
    x, y = x[keep], y[keep]
    if x.size <= max_points:
        return x, y
    arc = np.r_[0.0, np.cumsum(np.hypot(np.diff(x), np.diff(y)))]
    idx = np.unique(np.searchsorted(arc, np.linspace(0.0, arc[-1], max_points), side="left").clip(0, x.size - 1))
    idx[0], idx[-1] = 0, x.size - 1
    return x[idx], y[idx]


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _class_curves(y: np.ndarray, score: np.ndarray, pred: np.ndarray, max_points: int) -> dict[str, Any]:
    fpr, tpr = roc_curve(y, score)
    precision, recall = pr_curve(y, score)
    # Areas from the exact curves: the ROC trapezoid counts ties one half (Mann-Whitney), the PR
    # step sum is the average precision of metrics.py.
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) if fpr.size else None
    auprc = float(np.sum(np.diff(recall) * precision[1:])) if recall.size else None
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    fpr_s, tpr_s = subsample_curve(fpr, tpr, max_points)
    prec_s, rec_s = subsample_curve(precision, recall, max_points)
    return {"roc": {"fpr": fpr_s.tolist(), "tpr": tpr_s.tolist()},
            "pr": {"precision": prec_s.tolist(), "recall": rec_s.tolist()},
            "auroc": auroc, "auprc": auprc,
            "operating_point": {"fpr": _ratio(fp, fp + tn), "tpr": _ratio(tp, tp + fn),
                                "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn)},
            "confusion": [[tn, fp], [fn, tp]]}


def _reliability(confidence: np.ndarray, correct: np.ndarray, bins: int) -> dict[str, Any]:
    """Mean confidence, observed accuracy and count of each non-empty equal-width bin."""
    b = np.minimum((confidence * bins).astype(np.int64), bins - 1)  # as expected_calibration_error
    count = np.bincount(b, minlength=bins)
    full = count > 0
    conf = np.bincount(b, weights=confidence, minlength=bins)[full] / count[full]
    acc = np.bincount(b, weights=correct.astype(np.float64), minlength=bins)[full] / count[full]
    return {"confidence": conf.tolist(), "accuracy": acc.tolist(), "count": count[full].tolist(), "bins": bins}


def curve_data(probs: np.ndarray, targets: np.ndarray, *, task: str, class_names: Sequence[str] | None = None,
               threshold: float | None = 0.5, class_thresholds: Sequence[float | None] | None = None,
               bins: int = 15, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """ROC/PR curves, operating points and confusion per class, a confusion matrix and reliability bins.

    Args:
        probs: (N, C) softmax (multiclass) or sigmoid (multilabel) outputs.
        targets: (N,) class ids (multiclass) or (N, C) 0/1 (multilabel).
        task: "multiclass" or "multilabel".
        class_names: C names; defaults to "0".."C-1".
        threshold: operating threshold of every class, one-vs-rest (`score >= threshold`); None:
            the argmax decision (multiclass only), as `classification_metrics` without a threshold.
        class_thresholds: per-class thresholds overriding `threshold` (chosen at a specificity);
            None or nan in it: the class predicts nothing.
        bins: equal-width reliability bins over [0, 1].
        max_points: most points kept per curve.

    Returns:
        A JSON-ready dict: task, classes, threshold (None with argmax or per-class thresholds),
        per_class (curves, areas, and operating point and confusion at the decision), confusion
        (multiclass K x K, rows true and columns argmax-predicted; None for multilabel) and
        calibration (multiclass: the predicted class's probability against top-1 correctness;
        multilabel: every (sample, finding) pair's probability against its label). A class with a
        single label present gets empty curves and auroc/auprc None.
    """
    p, t, y, names = _validate(probs, targets, task, class_names)
    c = p.shape[1]
    if class_thresholds is not None and len(class_thresholds) != c:
        raise ValueError(f"class_thresholds must hold {c} values, got {len(class_thresholds)}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if class_thresholds is not None:
        thr = np.array([np.nan if x is None else x for x in class_thresholds], dtype=np.float64)
        decided = p >= np.nan_to_num(thr, nan=np.inf)  # an undefined threshold predicts nothing
    elif threshold is None:
        if task != "multiclass":
            raise ValueError("a multilabel task needs a threshold (argmax picks one class of several)")
        decided = np.eye(c, dtype=bool)[p.argmax(1)]
    else:
        decided = p >= float(threshold)
    per_class = {name: _class_curves(y[:, k], p[:, k], decided[:, k], max_points) for k, name in enumerate(names)}
    if task == "multiclass":
        pred = p.argmax(1)
        matrix = np.bincount(t * c + pred, minlength=c * c).reshape(c, c)
        confusion: dict[str, Any] | None = {"labels": names, "matrix": matrix.tolist()}
        calibration = _reliability(p.max(1), pred == t, bins)
    else:
        confusion = None
        calibration = _reliability(p.ravel(), y.ravel(), bins)
    common = None if threshold is None or class_thresholds is not None else float(threshold)
    return {"task": task, "classes": names, "threshold": common, "per_class": per_class,
            "confusion": confusion, "calibration": calibration}
