"""Medical classification metrics in pure numpy.

Exact AUROC/AUPRC with ties, calibration, operating points at a fixed specificity, patient-
or study-level aggregation and (cluster) bootstrap confidence intervals. Every metric is
computed from per-sample weights, so a bootstrap resample is just a row of counts: scores are
sorted once per class and a thousand resamples cost a few array passes, not a thousand sorts.

Inputs must hold each sample once. A padded duplicate from a distributed sampler is counted
twice and shifts every metric, so the evaluator de-duplicates by sample key before calling.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = [
    "roc_auc",
    "average_precision",
    "expected_calibration_error",
    "threshold_at_specificity",
    "aggregate_by_group",
    "classification_metrics",
]

_TASKS = ("multiclass", "multilabel")
# Resamples x samples per bootstrap block: bounds memory to ~32 MB per float64 array.
_BLOCK_ELEMENTS = 4_000_000
_HEADLINE = ("auroc", "auprc", "accuracy", "sensitivity", "specificity")


def _binary_inputs(y_true: Any, score: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    y, s = np.asarray(y_true), np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y_true and {name} must be 1-D of equal length, got shapes {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must hold only 0/1, got values {np.unique(y)[:10].tolist()}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} has NaN or inf at index {int(np.flatnonzero(~np.isfinite(s))[0])}")
    return y.astype(bool), s


def _weights(sample_weight: Any, n: int) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n)
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"sample_weight must be ({n},) finite and >= 0, got shape {w.shape}")
    return w


def _tie_groups(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending sort order of `score` and the start index of each run of tied scores."""
    order = np.argsort(score, kind="stable")
    s = score[order]
    return order, np.flatnonzero(np.r_[True, s[1:] != s[:-1]])


def _rank_metrics(w: np.ndarray, pos: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AP for each row of weights `w` (B, N); samples are in ascending score order."""
    tot = np.add.reduceat(w, starts, axis=1)  # weight per distinct score
    pw = np.add.reduceat(w * pos, starts, axis=1)
    nw = tot - pw
    n_pos, n_neg = pw.sum(1), nw.sum(1)
    neg_below = np.cumsum(nw, axis=1) - nw
    pos_at_or_above = n_pos[:, None] - (np.cumsum(pw, axis=1) - pw)
    with np.errstate(invalid="ignore", divide="ignore"):
        # Mann-Whitney: a positive beats each lower-scored negative and half of those tied with it.
        auc = (pw * (neg_below + 0.5 * nw)).sum(1) / (n_pos * n_neg)
        # Step-wise AP: the precision at each distinct threshold, weighted by the recall it adds.
        precision = pos_at_or_above / (pos_at_or_above + n_neg[:, None] - neg_below)
        ap = (pw * np.where(pw > 0, precision, 0.0)).sum(1) / n_pos
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    ap[n_pos == 0] = np.nan
    return auc, ap


def _binary_rank_metric(y_true: Any, score: Any, sample_weight: Any, which: int) -> float:
    y, s = _binary_inputs(y_true, score, "score")
    w = _weights(sample_weight, y.size)
    if y.size == 0:
        return float("nan")
    order, starts = _tie_groups(s)
    return float(_rank_metrics(w[None, order], y[order], starts)[which][0])


def roc_auc(y_true: np.ndarray, score: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """Exact binary AUROC (ties count one half); nan if only one class is present."""
    return _binary_rank_metric(y_true, score, sample_weight, 0)


def average_precision(y_true: np.ndarray, score: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """Step-wise average precision (sklearn's definition), tied scores as one threshold; nan without positives."""
    return _binary_rank_metric(y_true, score, sample_weight, 1)


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> float:
    """Binary ECE over `n_bins` equal-width bins: sum over bins of share x |observed rate - mean prob|."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _binary_inputs(y_true, prob, "prob")
    if p.size == 0:
        return float("nan")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"prob must lie in [0, 1], got range [{p.min()}, {p.max()}]")
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)  # bins [k/n, (k+1)/n); 1.0 in the last
    gap = np.bincount(b, weights=y, minlength=n_bins) - np.bincount(b, weights=p, minlength=n_bins)
    return float(np.abs(gap).sum() / p.size)


def threshold_at_specificity(y_true: np.ndarray, score: np.ndarray, specificity: float) -> float:
    """Smallest observed score t with specificity >= `specificity` when predicting `score >= t`.

    Returns a value just above the largest score if only "all negative" reaches it, nan without negatives.
    """
    if not 0.0 <= specificity <= 1.0:
        raise ValueError(f"specificity must lie in [0, 1], got {specificity}")
    y, s = _binary_inputs(y_true, score, "score")
    neg = np.sort(s[~y])
    if neg.size == 0:
        return float("nan")
    candidates = np.unique(s)
    # Predicting positive at score >= t, the true negatives are the negatives strictly below t.
    ok = np.searchsorted(neg, candidates, side="left") / neg.size >= specificity
    return float(candidates[np.argmax(ok)]) if ok.any() else float(np.nextafter(s.max(), np.inf))


def aggregate_by_group(probs: np.ndarray, targets: np.ndarray, groups: Sequence[str],
                       how: str = "mean") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pool image predictions to one row per study or patient.

    Args:
        probs: (N, C) probabilities.
        targets: (N,) class ids (multiclass: must agree within a group) or (N, C) 0/1 (multilabel: OR).
        groups: N group ids.
        how: "mean" (average probabilities) or "max" (max-pool; rows then need not sum to 1).

    Returns:
        Pooled probs (G, C), pooled targets, and the G group ids in sorted order.
    """
    if how not in ("mean", "max"):
        raise ValueError(f"how must be 'mean' or 'max', got {how!r}")
    p, t = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    n = p.shape[0] if p.ndim == 2 else -1
    if n < 1 or len(groups) != n or t.shape[:1] != (n,) or t.ndim not in (1, 2) or (t.ndim == 2 and t.shape != p.shape):
        raise ValueError(f"need probs (N, C) with N >= 1, targets (N,) or (N, C) and N groups; got probs {p.shape}, "
                         f"targets {t.shape}, {len(groups)} groups")
    names, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
    ends = np.r_[starts[1:], n]
    p, t = p[order], t[order]
    if how == "mean":
        pooled = np.add.reduceat(p, starts, axis=0) / (ends - starts)[:, None]
    else:
        pooled = np.maximum.reduceat(p, starts, axis=0)
    t_max = np.maximum.reduceat(t, starts, axis=0)
    if t.ndim == 1:
        bad = np.flatnonzero(np.minimum.reduceat(t, starts) != t_max)
        if bad.size:
            g = bad[0]
            raise ValueError(f"group {names[g]!r} has inconsistent labels {np.unique(t[starts[g]:ends[g]]).tolist()}")
    return pooled, t_max, [str(x) for x in names]


def _num(x: Any) -> float | None:
    return float(x) if np.isfinite(x) else None


def _ci(values: np.ndarray) -> list[float] | None:
    v = values[np.isfinite(values)]
    return [float(x) for x in np.percentile(v, [2.5, 97.5])] if v.size else None


def _validate(probs: Any, targets: Any, task: str, class_names: Sequence[str] | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
    p, t = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    min_c = 2 if task == "multiclass" else 1
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < min_c:
        raise ValueError(f"probs must be (N, C) with N >= 1 and C >= {min_c} for {task}, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError(f"probs has NaN or inf at index {tuple(int(i) for i in np.argwhere(~np.isfinite(p))[0])}")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"probs must lie in [0, 1], got range [{p.min()}, {p.max()}]")
    n, c = p.shape
    if task == "multiclass":
        if t.shape != (n,) or t.dtype.kind not in "iu":
            raise ValueError(f"multiclass targets must be ({n},) integer class ids, "
                             f"got shape {t.shape} dtype {t.dtype}")
        if t.min() < 0 or t.max() >= c:
            raise ValueError(f"targets must lie in [0, {c}), got {np.unique(t[(t < 0) | (t >= c)])[:10].tolist()}")
        y = np.eye(c, dtype=bool)[t]
    else:
        if t.shape != (n, c):
            raise ValueError(f"multilabel targets must have the shape of probs {(n, c)}, got {t.shape}")
        if not np.isin(t, (0, 1)).all():
            raise ValueError(f"multilabel targets must hold only 0/1, got values {np.unique(t)[:10].tolist()}")
        y = t.astype(bool)
    names = [str(i) for i in range(c)] if class_names is None else [str(x) for x in class_names]
    if len(names) != c or len(set(names)) != c:
        raise ValueError(f"class_names must be {c} distinct names, got {names}")
    return p, t, y, names


def classification_metrics(
    probs: np.ndarray,
    targets: np.ndarray,
    *,
    task: str,
    class_names: Sequence[str] | None = None,
    threshold: float | None = None,
    at_specificity: float | None = None,
    n_bootstrap: int = 0,
    groups: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Headline and per-class metrics of one evaluation split, as a JSON-ready dict (nan -> None).

    Args:
        probs: (N, C) softmax (multiclass) or sigmoid (multilabel) outputs; for C == 2 multiclass,
            class 1 is the positive class and the headline numbers are its one-vs-rest numbers.
        targets: (N,) class ids (multiclass) or (N, C) 0/1 (multilabel). Each sample exactly once.
        task: "multiclass" or "multilabel".
        class_names: C names for `per_class`; defaults to "0".."C-1".
        threshold: fixed probability threshold for every class, default 0.5. Exception: multiclass
            with C > 2 and neither option given uses the argmax decision (per-class threshold None).
        at_specificity: choose each class's threshold as the smallest reaching this specificity.
        n_bootstrap: percentile bootstrap resamples for 95% CIs (`ci95`); 0 for none.
        groups: N patient/study ids: resample whole groups (cluster bootstrap), since images of one
            patient are correlated and an image-level bootstrap gives too narrow intervals.
        seed: seed of the bootstrap.

    Returns:
        n_samples, accuracy (multiclass top-1; multilabel mean per-label accuracy at the operating
        point), top5_accuracy (multiclass, C > 5), auroc/auprc/sensitivity/specificity (macro over
        classes with both labels present), ece (multiclass top-label; binary class 1; multilabel mean
        per label), per_class, and with bootstrapping ci95 and bootstrap (unit, valid resamples).
    """
    p, t, y, names = _validate(probs, targets, task, class_names)
    n, c = p.shape
    binary = task == "multiclass" and c == 2
    if threshold is not None and at_specificity is not None:
        raise ValueError("give threshold or at_specificity, not both")
    n_groups = n if groups is None else len(groups)
    if n_bootstrap < 0 or n_groups != n:
        raise ValueError(f"need n_bootstrap >= 0 and {n} groups, got {n_bootstrap} and {n_groups} groups")

    if at_specificity is not None:
        thr = np.array([threshold_at_specificity(y[:, k], p[:, k], at_specificity) for k in range(c)])
        pred = p >= thr  # a class without negatives has a nan threshold and predicts nothing
    elif task == "multiclass" and c > 2 and threshold is None:
        thr, pred = np.full(c, np.nan), np.eye(c, dtype=bool)[p.argmax(1)]
    else:
        thr = np.full(c, 0.5 if threshold is None else float(threshold))
        if not 0.0 <= thr[0] <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        pred = p >= thr
    correct = (p.argmax(1) == t) if task == "multiclass" else (pred == y).mean(1)
    yf, tp_mask, tn_mask = y.astype(np.float64), (pred & y).astype(np.float64), (~pred & ~y).astype(np.float64)
    ranked = [_tie_groups(p[:, k]) for k in range(c)]

    def stats(w: np.ndarray) -> dict[str, np.ndarray]:
        """Per-class metrics (B, C) and accuracy (B,) for each row of sample weights w (B, N)."""
        auc, ap = np.empty((w.shape[0], c)), np.empty((w.shape[0], c))
        for k, (order, starts) in enumerate(ranked):
            auc[:, k], ap[:, k] = _rank_metrics(w[:, order], y[order, k], starts)
        n_pos = w @ yf
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"auroc": auc, "auprc": ap, "sensitivity": (w @ tp_mask) / n_pos,
                    "specificity": (w @ tn_mask) / (w.sum(1)[:, None] - n_pos),
                    "accuracy": (w @ correct) / w.sum(1)}

    # Macro averages use the classes with both labels present; a binary task reports class 1 alone.
    macro = np.arange(c) == 1 if binary else y.any(0) & ~y.all(0)

    def headline(values: np.ndarray) -> np.ndarray:
        return values[:, macro].mean(1) if macro.any() else np.full(values.shape[0], np.nan)

    point = stats(np.ones((1, n)))
    ece_k = [expected_calibration_error(y[:, k], p[:, k]) for k in range(c)]
    if binary or task == "multilabel":
        ece = ece_k[1] if binary else float(np.mean(ece_k))
    else:
        ece = expected_calibration_error(p.argmax(1) == t, p.max(1))
    out: dict[str, Any] = {"n_samples": n, "task": task, "n_classes": c, "accuracy": float(point["accuracy"][0])}
    if task == "multiclass" and c > 5:
        # Rank of the true class = number of classes scored strictly higher (ties favour the truth).
        out["top5_accuracy"] = float(((p > p[np.arange(n), t][:, None]).sum(1) < 5).mean())
    for m in ("auroc", "auprc", "sensitivity", "specificity"):
        out[m] = _num(headline(point[m])[0])
    out["ece"] = _num(ece)
    out["operating_point"] = ({"at_specificity": float(at_specificity)} if at_specificity is not None else
                              {"decision": "argmax"} if np.isnan(thr[0]) else {"threshold": float(thr[0])})
    out["per_class"] = {
        name: {"auroc": _num(point["auroc"][0, k]), "auprc": _num(point["auprc"][0, k]),
               "sensitivity": _num(point["sensitivity"][0, k]), "specificity": _num(point["specificity"][0, k]),
               "threshold": _num(thr[k]), "prevalence": float(y[:, k].mean()), "n_pos": int(y[:, k].sum()),
               "ece": _num(ece_k[k])}
        for k, name in enumerate(names)}
    if n_bootstrap == 0:
        return out

    # Cluster bootstrap: draw whole groups with replacement; a sample's weight is its group's count.
    # Thresholds stay fixed: the intervals describe the reported operating point, not its selection.
    rng = np.random.default_rng(seed)
    unit_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1] if groups is not None else np.arange(n)
    n_units = int(unit_of.max()) + 1
    block = max(1, _BLOCK_ELEMENTS // max(n, n_units))
    parts = []
    for start in range(0, n_bootstrap, block):
        b = min(block, n_bootstrap - start)
        draws = rng.integers(0, n_units, size=(b, n_units)) + n_units * np.arange(b)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n_units).reshape(b, n_units).astype(np.float64)
        parts.append(stats(counts[:, unit_of]))
    boot = {m: np.concatenate([part[m] for part in parts]) for m in _HEADLINE}
    # A resample in which an averaged class has a single label (or a class no positives, for
    # sensitivity) leaves that metric undefined: it is skipped for that metric (nan in the macro
    # mean), so every kept value averages the same classes as the point estimate. Counts reported.
    macro_boot = {m: boot[m] if m == "accuracy" else headline(boot[m]) for m in _HEADLINE}
    out["ci95"] = {m: _ci(v) for m, v in macro_boot.items()}
    out["bootstrap"] = {"n": int(n_bootstrap), "unit": "group" if groups is not None else "sample", "n_units": n_units,
                        "valid": {m: int(np.isfinite(v).sum()) for m, v in macro_boot.items()}}
    for k, name in enumerate(names):
        out["per_class"][name]["ci95"] = {m: _ci(boot[m][:, k]) for m in _HEADLINE if m != "accuracy"}
    return out
