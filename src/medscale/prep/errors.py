"""The exception prep stages raise for an input they refuse; the pipeline records it and goes on."""

from __future__ import annotations

__all__ = ["RejectedInput"]


class RejectedInput(Exception):
    """An input file that cannot or must not become a sample.

    Args:
        reason: A short machine-readable code (``"truncated"``, ``"too_large"``...), counted in
            the manifest.
        detail: A human-readable explanation for ``rejects.jsonl``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"
