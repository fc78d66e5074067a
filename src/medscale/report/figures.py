"""PNG figures of a run: training curves, evaluation metrics over steps, ROC/PR, calibration,
confusion and sample images; for an MAE pretraining run, its reconstructions.

matplotlib is imported lazily (a training process never pays for it) and used through its
object-oriented API on the Agg canvas: no pyplot, so no global figure state and no display needed.
Each function draws one figure of a fixed size (`SIZES`, `DPI`; the sample grid grows with its
images) or raises `FigureSkipped` saying which input is missing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["FigureSkipped", "DPI", "SIZES", "sample_grid_size", "loss_lr", "throughput", "eval_metrics",
           "roc", "pr", "calibration", "confusion", "sample_grid", "reconstruction_grid"]

DPI = 100
SIZES = {"loss_lr": (10.0, 4.0), "throughput": (10.0, 4.0), "eval_metrics": (8.0, 4.5), "roc": (7.0, 6.0),
         "pr": (7.0, 6.0), "calibration": (6.0, 6.0), "confusion": (7.0, 6.0)}
"""Figure sizes in inches; at `DPI` every PNG is exactly SIZES[name] x DPI pixels."""
EVAL_METRICS = ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "ece", "top5_accuracy", "loss")
"""Metrics drawn over steps; counts (n_samples, ...) in the same rows would crush their scale."""
_GRID_COLUMNS = 8
_CELL = (1.8, 2.2)  # inches per sample image, room for a two-line title


class FigureSkipped(Exception):
    """A figure's inputs are missing; the message says which (the report shows it in its place)."""


def _figure(size: tuple[float, float], cols: int = 1, rows: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
    return [s for s, _ in points], [float(v) for _, v in points]


def _line(ax: Any, rows: Sequence[dict[str, Any]], key: str, ylabel: str) -> bool:
    steps, values = _series(rows, key)
    if steps:
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
    else:
        ax.text(0.5, 0.5, f"no {key} in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    return bool(steps)


def _two_panels(rows: Sequence[dict[str, Any]], path: Path, name: str, panels: list[tuple[str, str]]) -> Path:
    if not any(_series(rows, key)[0] for key, _ in panels):
        raise FigureSkipped(f"no {' or '.join(k for k, _ in panels)} rows in metrics.jsonl")
    fig, axes = _figure(SIZES[name], cols=2)
    for ax, (key, label) in zip(axes[0], panels):
        _line(ax, rows, key, label)
    return _save(fig, path)


def loss_lr(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Training loss and learning rate over steps."""
    return _two_panels(rows, path, "loss_lr", [("train/loss", "loss"), ("train/lr", "learning rate")])


def throughput(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Samples per second and the fraction of time spent waiting for data."""
    return _two_panels(rows, path, "throughput", [("train/samples_per_s", "samples / s"),
                                                  ("train/data_wait_frac", "data wait fraction")])


def eval_metrics(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Every "<split>/.../<metric>" series of `EVAL_METRICS` (splits other than train) over steps."""
    keys = sorted({k for r in rows for k in r if "/" in k and not k.startswith("train/")
                   and k.rsplit("/", 1)[1] in EVAL_METRICS})
    if not keys:
        raise FigureSkipped("no evaluation rows (<split>/auroc, ...) in metrics.jsonl: "
                            "eval.every_steps=0 evaluates only at the end")
    fig, axes = _figure(SIZES["eval_metrics"])
    ax = axes[0, 0]
    for key in keys:
        steps, values = _series(rows, key)
        ax.plot(steps, values, marker="o", label=key)
    ax.set(xlabel="step", ylabel="value")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _curve_classes(curves: dict[str, Any], field: str) -> list[tuple[str, dict[str, Any]]]:
    per = [(name, d) for name, d in curves["per_class"].items() if all(d[field].values())]
    if not per:
        raise FigureSkipped(f"no class has both labels present, so there is no {field.upper()} curve")
    return per


def _curve_figure(curves: dict[str, Any], path: Path, field: str) -> Path:
    roc_plot = field == "roc"
    x_key, y_key, op_x, op_y, area = (("fpr", "tpr", "fpr", "tpr", "auroc") if roc_plot else
                                      ("recall", "precision", "recall", "precision", "auprc"))
    fig, axes = _figure(SIZES[field])
    ax = axes[0, 0]
    for name, d in _curve_classes(curves, field):
        (line,) = ax.plot(d[field][x_key], d[field][y_key], label=f"{name} ({area} {d[area]:.3f})")
        op = d["operating_point"]
        if op[op_x] is not None and op[op_y] is not None:
            ax.plot(op[op_x], op[op_y], marker="o", color=line.get_color(), markeredgecolor="black")
    if roc_plot:
        ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(xlabel="false positive rate" if roc_plot else "recall", ylabel="true positive rate" if roc_plot else
           "precision", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
           title=f"{field.upper()} per class (dot: operating point)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right" if roc_plot else "lower left")
    return _save(fig, path)


def roc(curves: dict[str, Any], path: Path) -> Path:
    """ROC curve of every class with its operating point, from an evaluation's ``curves``."""
    return _curve_figure(curves, path, "roc")


def pr(curves: dict[str, Any], path: Path) -> Path:
    """Precision-recall curve of every class with its operating point."""
    return _curve_figure(curves, path, "pr")


def calibration(curves: dict[str, Any], path: Path) -> Path:
    """Reliability diagram: observed accuracy against mean confidence per bin, counts as marker size."""
    cal = curves.get("calibration") or {}
    if not cal.get("count"):
        raise FigureSkipped("the evaluation has no calibration bins")
    fig, axes = _figure(SIZES["calibration"])
    ax = axes[0, 0]
    count = np.asarray(cal["count"], dtype=float)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    ax.plot(cal["confidence"], cal["accuracy"], color="tab:blue")
    ax.scatter(cal["confidence"], cal["accuracy"], s=20 + 200 * count / count.max(), color="tab:blue",
               label="bins (size: samples)")
    what = "predicted class" if curves["task"] == "multiclass" else "every (sample, finding) pair"
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability, {cal['bins']} bins, {what}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    return _save(fig, path)


def confusion(curves: dict[str, Any], path: Path) -> Path:
    """Confusion matrix, rows true and columns argmax-predicted, shaded by row share."""
    cm = curves.get("confusion")
    if not cm:
        raise FigureSkipped("a multilabel task has no K x K confusion matrix; the per-class table "
                            "has each finding's counts at the operating threshold")
    m = np.asarray(cm["matrix"], dtype=float)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, axes = _figure(SIZES["confusion"])
    ax = axes[0, 0]
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    k = len(cm["labels"])
    ax.set_xticks(range(k), cm["labels"], rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), cm["labels"])
    if k <= 20:  # beyond, the numbers would overlap
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(m[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted (argmax)", ylabel="true", title="Confusion matrix")
    return _save(fig, path)


def sample_grid_size(n: int) -> tuple[int, int]:
    """Pixel size (width, height) of the sample grid of `n` images."""
    cols = min(n, _GRID_COLUMNS)
    return round(_CELL[0] * cols * DPI), round(_CELL[1] * math.ceil(n / cols) * DPI)


def sample_grid(samples: dict[str, np.ndarray], path: Path) -> Path:
    """The evaluation's sample images with true label, prediction and probability (red: wrong).

    `samples` holds arrays ``images``, ``labels``, ``preds``, ``probs`` as `save_result` writes them.
    """
    n = len(samples.get("labels", ()))
    if n == 0:
        raise FigureSkipped("the evaluation kept no sample images")
    cols = min(n, _GRID_COLUMNS)
    rows = math.ceil(n / cols)
    fig, axes = _figure((_CELL[0] * cols, _CELL[1] * rows), cols=cols, rows=rows)
    titles = []
    for label, pred, prob in zip(samples["labels"], samples["preds"], samples["probs"]):
        label, pred = str(label), str(pred)
        titles.append((f"true: {label}\npred: {pred} ({float(prob):.2f})", "black" if label == pred else "tab:red"))
    _draw_images(axes, samples["images"], titles)
    return _save(fig, path)


def _draw_images(axes: Any, images: Any, titles: list[tuple[str, str]]) -> None:
    """One 8-bit image per axis with its (title, colour); axes beyond the images stay blank."""
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(titles):
            continue
        image = images[i]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(titles[i][0], fontsize=8, color=titles[i][1])


_RECON_COLUMNS = 2
_RECON_WIDTH = 4.2  # inches per original | masked | reconstruction strip


def reconstruction_grid(samples: dict[str, np.ndarray], path: Path, mask_ratio: float | None = None) -> Path:
    """An MAE evaluation's images, each one strip original | masked | reconstruction, titled with the
    sample's reconstruction loss (MSE over its masked patches).

    `samples` holds arrays ``images`` (the strips) and ``probs`` (the losses) as `save_result` writes them.
    """
    n = len(samples.get("images", ()))
    if n == 0:
        raise FigureSkipped("the evaluation kept no reconstructions (mae.samples=0?)")
    cols = min(n, _RECON_COLUMNS)
    rows = math.ceil(n / cols)
    h, w = samples["images"][0].shape[:2]
    cell = (_RECON_WIDTH, _RECON_WIDTH * h / w + 0.35)  # room for the title
    fig, axes = _figure((cell[0] * cols, cell[1] * rows + 0.4), cols=cols, rows=rows)
    masked = f"masked {mask_ratio:.0%}" if mask_ratio is not None else "masked"
    fig.suptitle(f"original | {masked} (hidden patches blue) | reconstruction; a row per channel", fontsize=10)
    _draw_images(axes, samples["images"], [(f"loss {float(p):.4f}", "black") for p in samples["probs"]])
    return _save(fig, path)
