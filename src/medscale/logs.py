"""Console output of every command: one logging set-up with the rank in each line, and progress bars.

On a terminal, rank 0 draws tqdm bars (prep, training, evaluation) and log lines are written above
them. When output goes to a file (a Slurm log), there are no bars and no carriage returns: the
periodic log lines ("step 100/5000 loss ...") are the progress.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

__all__ = ["setup_logging", "rank_from_env", "Progress", "on_terminal", "metric_fields"]

_CHATTY = ("DeepSpeed", "torch.distributed", "wandb", "urllib3", "matplotlib", "PIL")
"""Libraries whose own INFO lines are kept out unless MEDSCALE_DEBUG is set."""
_LIBRARY_DEPRECATIONS = (r"`torch\.distributed\.all_gather_into_tensor` is deprecated",)
"""FutureWarnings raised inside DeepSpeed's ZeRO collectives (not medscale's calls), printed by every
rank at every start; a user can do nothing about them. Shown with MEDSCALE_DEBUG=1."""


def rank_from_env() -> int:
    """This process's rank as the launcher says it (before torch.distributed is up): RANK, or the
    Slurm task id inside an srun step, else 0."""
    for key in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit() and (key == "RANK" or "SLURM_STEP_ID" in os.environ or "SLURM_STEPID" in os.environ):
            return int(value)
    return 0


def metric_fields(**values: Any) -> str:
    """``name value`` pairs as in training's step lines: floats to 4 decimals, None as "-", two spaces
    between pairs (``auroc 0.6132  accuracy 0.7500  n 60``)."""
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    return "  ".join(f"{k} {fmt(v)}" for k, v in values.items())


def on_terminal() -> bool:
    """Progress bars only where a person watches: stderr is a terminal (never in a Slurm log file)."""
    return sys.stderr.isatty() and os.environ.get("MEDSCALE_PROGRESS", "1") != "0"


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is written (not the one at set-up: a caller may
    have replaced it since, as pytest's capture does)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _AboveTheBars(_Stderr):
    """Writes each line through tqdm, so that a bar on the terminal is redrawn below it, not torn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


def setup_logging(rank: int | None = None) -> None:
    """Configure logging once per process: rank 0 logs INFO, other ranks warnings only (a 64-GPU log
    stays readable); every line names its rank; DeepSpeed's and W&B's chatter is kept to warnings
    unless MEDSCALE_DEBUG=1."""
    rank = rank_from_env() if rank is None else rank
    handler: logging.Handler = _AboveTheBars() if on_terminal() else _Stderr()
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Stderr)]:  # a second call replaces ours only
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    debug = bool(os.environ.get("MEDSCALE_DEBUG"))
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        for pattern in _LIBRARY_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    os.environ.setdefault("WANDB_SILENT", "true")


class Progress:
    """A tqdm bar on rank 0 when output goes to a terminal; does nothing otherwise."""

    def __init__(self, total: int, *, initial: int = 0, desc: str = "", unit: str = "it", enabled: bool = True,
                 samples_per_unit: int = 0):
        self.bar: Any = None
        self.samples_per_unit = samples_per_unit  # > 0: show samples/s beside the bar's own rate
        if enabled and on_terminal():
            from tqdm import tqdm

            try:  # a terminal that reports no size (a bare pseudo-terminal) gets a fixed one: tqdm
                sized = os.get_terminal_size(sys.stderr.fileno()).lines > 0  # draws nothing in 0 rows
            except OSError:
                sized = False
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            rate = self.bar.format_dict.get("rate")
            if self.samples_per_unit and rate:
                postfix["samples/s"] = f"{rate * self.samples_per_unit:.1f}"
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
