"""Human-facing output: console tables of manifests and evaluation results, `medscale inspect`,
and `write_report` (figures and one self-contained HTML page of a run, `medscale report`)."""

from __future__ import annotations

from typing import Any

__all__ = ["write_report"]


def __getattr__(name: str) -> Any:
    # Lazy: `medscale inspect` and `medscale eval` import medscale.report.console and should not pay
    # for the report's imports (the evaluation module, torch).
    if name == "write_report":
        from medscale.report.html import write_report

        return write_report
    raise AttributeError(f"module 'medscale.report' has no attribute {name!r}")
