"""HTML pieces of the report that objectives use for their own tables (no figure, no run access)."""

from __future__ import annotations

import html
from typing import Any, Sequence

__all__ = ["fmt", "ci", "table"]


def fmt(v: Any) -> str:
    """A value for a table cell: floats to 4 decimals, None as "-", anything else escaped."""
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def ci(interval: Any) -> str:
    """A 95% CI cell, ``[low, high]`` ("" when there is none)."""
    return f"[{fmt(interval[0])}, {fmt(interval[1])}]" if interval else ""


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table; `rows` hold cell HTML (use `fmt` for values)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
