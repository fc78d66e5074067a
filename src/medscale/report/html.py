"""`medscale report`: one self-contained HTML page of a run, with its figures as PNG files beside it.

It reads only what a run directory holds: ``config.yaml``, ``metrics.jsonl``, the evaluation
(``eval.json``, else the first ``eval_<split>.json``) and its sample images (``<stem>_samples.npz``).
The training curves are everyone's; the evaluation's figures and table are the run's objective's
(`medscale.tasks.base.Task.report_figures`, ``metrics_html``).
Every figure is embedded as a base64 data URI, so the page can be mailed or archived alone. A
figure whose inputs are missing is replaced by a note naming them.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from medscale.errors import InputNotFound
from medscale.eval.results import load_result, samples_path
from medscale.report import figures
from medscale.tasks.base import Figure
from medscale.tasks.registry import DEFAULT_OBJECTIVE, task_class
from medscale.train.tracking import METRICS_FILE, read_metrics

__all__ = ["write_report", "REPORT_FILE"]

REPORT_FILE = "report.html"
_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:85%}
img{max-width:100%}.note{color:#a60}figure{margin:1.5em 0}"""


def _find_eval(run_dir: Path) -> Path | None:
    if (run_dir / "eval.json").is_file():
        return run_dir / "eval.json"
    return next(iter(sorted(run_dir.glob("eval_*.json"))), None)


def _objective(run_dir: Path, result: dict[str, Any]) -> Any:
    """The objective class that wrote the run: the result names it, else the run's record or config."""
    name = result.get("objective")
    if not name:
        for read in (_recorded_objective, _configured_objective):
            name = read(run_dir)
            if name:
                break
    return task_class(name or DEFAULT_OBJECTIVE)


def _recorded_objective(run_dir: Path) -> str | None:
    path = run_dir / "preprocess.json"
    return json.loads(path.read_text()).get("objective") if path.is_file() else None


def _configured_objective(run_dir: Path) -> str | None:
    import yaml

    path = run_dir / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() else None
    return ((config or {}).get("train") or {}).get("objective")


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
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        rows, bad = read_metrics(run_dir)
        if bad:
            notes.append(f"{metrics}: {bad} lines are not JSON (a torn line after a kill?) and were skipped")
    else:
        notes.append(f"no {metrics}: no training curves")
    eval_path = _find_eval(run_dir)
    result, samples = load_result(eval_path) if eval_path else ({}, None)
    if eval_path is None:
        notes.append(f"no eval.json or eval_<split>.json in {run_dir}: no test metrics")
    objective = _objective(run_dir, result)

    plots: list[Figure] = [
        Figure("Training loss and learning rate", "loss_lr", lambda p: figures.loss_lr(rows, p)),
        Figure("Throughput and data wait", "throughput", lambda p: figures.throughput(rows, p)),
        Figure("Evaluation metrics over steps", "eval_metrics", lambda p: figures.eval_metrics(rows, p)),
    ]
    if eval_path is not None:  # the rest is the objective's to say
        plots += objective.report_figures(result, samples, str(samples_path(eval_path)))
    else:
        plots.append(Figure("Evaluation figures", "", "no evaluation"))

    parts = []
    for fig in plots:
        if isinstance(fig.draw, str):
            parts.append(_figure_html(fig.title, None, fig.draw))
            continue
        try:
            parts.append(_figure_html(fig.title, fig.draw(out / f"{fig.name}.png"), ""))
        except figures.FigureSkipped as e:
            parts.append(_figure_html(fig.title, None, str(e)))

    metrics_html = objective.metrics_html(result) if result else '<p class="note">no evaluation result</p>'
    notes_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    title = f"medscale run {html.escape(run_dir.resolve().name)}"
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{_STYLE}</style>"
            f"</head><body><h1>{title}</h1>{notes_html}"
            f"<h2>Test metrics{f' ({html.escape(eval_path.name)})' if eval_path else ''}</h2>{metrics_html}"
            f"<h2>Figures</h2>{''.join(parts)}<h2>Config</h2>{config_html}</body></html>\n")
    path = out / REPORT_FILE
    path.write_text(page)
    return path
