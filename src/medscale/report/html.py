"""`medscale report`: one self-contained HTML page of a run, with its figures as PNG files beside it.

It reads only what a run directory holds: ``config.yaml``, ``metrics.jsonl``, the evaluation
(``eval.json``, else the first ``eval_<split>.json``) and its sample images (``<stem>_samples.npz``;
an MAE pretraining run's: its reconstructions).
Every figure is embedded as a base64 data URI, so the page can be mailed or archived alone. A
figure whose inputs are missing is replaced by a note naming them.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medscale.errors import InputError, InputNotFound
from medscale.eval.evaluate import samples_path
from medscale.report import figures

__all__ = ["write_report", "REPORT_FILE"]

REPORT_FILE = "report.html"
_HEADLINE = ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "ece", "top5_accuracy")
_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:85%}
img{max-width:100%}.note{color:#a60}figure{margin:1.5em 0}"""


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of metrics.jsonl and the number of lines that are not JSON (a torn last line after a kill)."""
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return rows, bad


def _find_eval(run_dir: Path) -> Path | None:
    if (run_dir / "eval.json").is_file():
        return run_dir / "eval.json"
    return next(iter(sorted(run_dir.glob("eval_*.json"))), None)


def _load_eval(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e}); rerun `medscale eval` to rewrite it") from e
    npz = samples_path(path)
    if not npz.is_file():
        return result, None
    with np.load(npz, allow_pickle=False) as data:  # no pickles: a report must not run a file's code
        return result, {k: data[k] for k in data.files}


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def _ci(ci: Any) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _mae_table(result: dict[str, Any]) -> str:
    """An MAE evaluation: the reconstruction loss over the split's masked patches."""
    rows = [["reconstruction loss (MSE, masked patches)", _fmt(result.get("loss"))],
            ["mask ratio", _fmt(result.get("mask_ratio"))],
            ["samples / patients", f"{result.get('n_samples', '-')} / {result.get('n_patients', '-')}"]]
    return (f"<p>split {_fmt(result.get('split'))}: masked-autoencoder pretraining</p>"
            + _table(["metric", "value"], rows))


def _metrics_tables(result: dict[str, Any]) -> str:
    """Headline metrics with their 95% CIs, then one row per class (CIs and counts at the operating point)."""
    if result.get("objective") == "mae":
        return _mae_table(result)
    ci = result.get("ci95") or {}
    rows = [[m, _fmt(result[m]), _ci(ci.get(m))] for m in _HEADLINE if m in result]
    rows.append(["samples / patients", f"{result.get('n_samples', '-')} / {result.get('n_patients', '-')}", ""])
    boot = result.get("bootstrap")
    unit = f" ({boot['n']} bootstrap resamples by {boot['unit']})" if boot else " (no bootstrap)"
    out = [f"<p>split {_fmt(result.get('split'))}, operating point "
           f"{html.escape(json.dumps(result.get('operating_point', {})))}{unit}</p>",
           _table(["metric", "value", "95% CI"], rows)]
    per = result.get("per_class") or {}
    conf = {name: d["confusion"] for name, d in ((result.get("curves") or {}).get("per_class") or {}).items()}
    if per:
        prow = []
        for name, d in per.items():
            c = d.get("ci95") or {}
            tn_fp_fn_tp = " / ".join(str(x) for pair in conf[name] for x in pair) if name in conf else "-"
            prow.append([html.escape(name), _fmt(d.get("auroc")), _ci(c.get("auroc")), _fmt(d.get("auprc")),
                         _ci(c.get("auprc")), _fmt(d.get("sensitivity")), _fmt(d.get("specificity")),
                         _fmt(d.get("threshold")), _fmt(d.get("n_pos")), tn_fp_fn_tp])
        out.append(_table(["class", "auroc", "95% CI", "auprc", "95% CI", "sensitivity", "specificity",
                           "threshold", "positives", "tn / fp / fn / tp"], prow))
    return "\n".join(out)


def _figure_html(title: str, path: Path | None, note: str) -> str:
    if path is None:
        return f'<figure><h3>{html.escape(title)}</h3><p class="note">skipped: {html.escape(note)}</p></figure>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><h3>{html.escape(title)}</h3><img alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{data}"></figure>')


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write PNG figures and a self-contained ``report.html`` of a run; returns the HTML's path.

    Args:
        run_dir: a run directory written by ``medscale train`` (or holding at least one of its files).
        out_dir: where to write (default RUN_DIR/report); created if needed.

    Raises:
        InputNotFound: `run_dir` is not a directory.
        InputError: its evaluation JSON cannot be read.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputNotFound(f"run directory {run_dir} does not exist")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    config = run_dir / "config.yaml"
    config_html = (f"<pre>{html.escape(config.read_text())}</pre>" if config.is_file()
                   else f'<p class="note">no {html.escape(str(config))}</p>')
    rows: list[dict[str, Any]] = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows, bad = _read_rows(metrics)
        if bad:
            notes.append(f"{metrics}: {bad} lines are not JSON (a torn line after a kill?) and were skipped")
    else:
        notes.append(f"no {metrics}: no training curves")
    eval_path = _find_eval(run_dir)
    result, samples = _load_eval(eval_path) if eval_path else ({}, None)
    if eval_path is None:
        notes.append(f"no eval.json or eval_<split>.json in {run_dir}: no test metrics")
    curves = result.get("curves")
    missing_curves = f"{eval_path} has no curves (written before medscale kept them?)"

    plots: list[tuple[str, str, Callable[[Path], Path] | str]] = [
        ("Training loss and learning rate", "loss_lr", lambda p: figures.loss_lr(rows, p)),
        ("Throughput and data wait", "throughput", lambda p: figures.throughput(rows, p)),
        ("Evaluation metrics over steps", "eval_metrics", lambda p: figures.eval_metrics(rows, p)),
    ]
    if result.get("objective") == "mae":
        ratio = result.get("mask_ratio")
        plots.append(("Reconstructions (original | masked | reconstruction)", "reconstructions",
                      (lambda p: figures.reconstruction_grid(samples, p, ratio)) if samples is not None else
                      f"no {samples_path(eval_path)}" if eval_path else "no evaluation"))
    elif curves:
        plots += [("ROC curves", "roc", lambda p: figures.roc(curves, p)),
                  ("Precision-recall curves", "pr", lambda p: figures.pr(curves, p)),
                  ("Calibration", "calibration", lambda p: figures.calibration(curves, p)),
                  ("Confusion matrix", "confusion", lambda p: figures.confusion(curves, p))]
    else:
        plots.append(("ROC, PR, calibration, confusion", "", missing_curves if eval_path else "no evaluation"))
    if result.get("objective") != "mae":
        plots.append(("Sample images", "samples", (lambda p: figures.sample_grid(samples, p)) if samples is not None
                      else f"no {samples_path(eval_path)}" if eval_path else "no evaluation"))

    parts = []
    for title, name, draw in plots:
        if isinstance(draw, str):
            parts.append(_figure_html(title, None, draw))
            continue
        try:
            parts.append(_figure_html(title, draw(out / f"{name}.png"), ""))
        except figures.FigureSkipped as e:
            parts.append(_figure_html(title, None, str(e)))

    metrics_html = (_metrics_tables(result) if result else '<p class="note">no evaluation result</p>')
    notes_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    title = f"medscale run {html.escape(run_dir.resolve().name)}"
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{_STYLE}</style>"
            f"</head><body><h1>{title}</h1>{notes_html}"
            f"<h2>Test metrics{f' ({html.escape(eval_path.name)})' if eval_path else ''}</h2>{metrics_html}"
            f"<h2>Figures</h2>{''.join(parts)}<h2>Config</h2>{config_html}</body></html>\n")
    path = out / REPORT_FILE
    path.write_text(page)
    return path
