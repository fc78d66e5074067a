"""Metrics out of a run: console lines, ``metrics.jsonl`` in the run directory, optional W&B.

Only rank 0 writes. W&B is imported lazily and works offline (``WANDB_MODE=offline``). The W&B run
id is part of the tracker's state: it goes into every checkpoint and into ``RUN_DIR/wandb_id``, so
a restarted job continues the same W&B run (online; offline each restart writes a new folder).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from medscale.config import LoggingConfig
from medscale.files import atomic_write

__all__ = ["Tracker", "setup_logging", "WANDB_ID_FILE", "METRICS_FILE"]

log = logging.getLogger("medscale")

WANDB_ID_FILE = "wandb_id"
"""File in the run directory holding the W&B run id."""
METRICS_FILE = "metrics.jsonl"
"""File in the run directory with one JSON row of scalars per `Tracker.log` call."""


class Tracker:
    """Rank-0 sink for scalars (``metrics.jsonl`` and W&B); a no-op on other ranks.

    Construction is cheap and opens nothing: a checkpoint's state is loaded first
    (`load_state_dict`), then `start` opens the outputs.

    Args:
        cfg: logging section of the run config (W&B on/off, default project, run name).
        run_dir: the run directory (``metrics.jsonl``, ``wandb_id``; W&B's files unless ``WANDB_DIR`` is set).
        is_main: this process is rank 0, the only one that writes.
        config: the resolved run config, stored as the W&B run's config.
    """

    def __init__(self, cfg: LoggingConfig, run_dir: Path, is_main: bool, config: dict[str, Any]):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.config = config
        self.wandb_id: str | None = None
        self._file: Any = None
        self._run: Any = None
        self._started = False
        self._wandb_warned = False

    def state_dict(self) -> dict[str, Any]:
        """``{"wandb_id": str | None}``: the W&B run to continue after a restart."""
        return {"wandb_id": self.wandb_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt a checkpoint's W&B run id; call before `start`."""
        if self._started:
            raise RuntimeError("Tracker.load_state_dict must be called before Tracker.start")
        self.wandb_id = state.get("wandb_id") or None

    def start(self, resumed_at: float | None = None) -> None:
        """Rank 0: open ``metrics.jsonl`` and, when enabled, start or continue the W&B run.

        Rows written after the checkpoint this run resumed from was completed (`resumed_at`, its
        completion time) belong to steps that run again now: they are dropped, so every step appears
        once. Without a checkpoint (None) the run starts over and keeps no old rows.
        """
        if self._started:
            raise RuntimeError("Tracker.start called twice")
        self._started = True
        if not self.is_main:
            return
        self._drop_rows_after(resumed_at)
        self._file = open(self.run_dir / METRICS_FILE, "a")
        if self.cfg.wandb:
            self._start_wandb()

    def _drop_rows_after(self, resumed_at: float | None) -> None:
        path = self.run_dir / METRICS_FILE
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if resumed_at is not None and _row_time(line) <= resumed_at]
        if len(kept) != len(lines):
            log.info("metrics.jsonl: dropped %d rows of steps that run again after the resume", len(lines) - len(kept))
            atomic_write(path, "".join(line + "\n" for line in kept))

    def _start_wandb(self) -> None:
        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        file_id = id_file.read_text().strip() if id_file.exists() else None
        if self.wandb_id and file_id and file_id != self.wandb_id:
            log.warning("W&B run id %s from the checkpoint differs from %s in %s; continuing the checkpoint's run",
                     self.wandb_id, file_id, id_file)
        run_id = self.wandb_id or file_id  # None: wandb picks one (or takes WANDB_RUN_ID)
        # Arguments to wandb.init override W&B's environment variables, so pass only what the
        # environment does not already set: WANDB_PROJECT, WANDB_NAME and WANDB_DIR win over the defaults.
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or self.cfg.project,
            name=self.cfg.run_name or os.environ.get("WANDB_NAME") or self.run_dir.name,
            dir=os.environ.get("WANDB_DIR") or str(self.run_dir),
            id=run_id, resume="allow", config=self.config)
        if self._run.disabled:  # WANDB_MODE=disabled: the id names no run
            return
        self.wandb_id = self._run.id
        if self.wandb_id != file_id:
            id_file.write_text(self.wandb_id)
        log.info("W&B run %s (project %s)", self.wandb_id, self._run.project)

    def log(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        """Write the int and float entries of `values` (keys prefixed) as the figures of `step`."""
        if not self.is_main:
            return
        if self._file is None:
            raise RuntimeError("Tracker.log called before Tracker.start (or after close)")
        flat = {f"{prefix}{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._file.write(json.dumps({"step": step, "time": time.time(), **flat}) + "\n")
        self._file.flush()
        if self._run is not None:
            try:
                self._run.log(flat, step=step)
            except Exception as e:  # noqa: BLE001 - losing W&B must not stop a run; metrics.jsonl has it all
                self._wandb_failed(e)

    def summary(self, values: dict[str, Any]) -> None:
        """Set the W&B run's summary from the int and float entries of `values`."""
        if not self.is_main or self._run is None:
            return
        try:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._run.summary[k] = v
        except Exception as e:  # noqa: BLE001 - as in log
            self._wandb_failed(e)

    def close(self) -> None:
        """Close ``metrics.jsonl`` and finish the W&B run; a second call does nothing."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._run is not None:
            run, self._run = self._run, None
            try:
                run.finish()
            except Exception as e:  # noqa: BLE001 - the run's results are already on disk
                self._wandb_failed(e)

    def _wandb_failed(self, e: Exception) -> None:
        if not self._wandb_warned:
            self._wandb_warned = True
            log.warning("W&B failed (%s: %s); training goes on, metrics.jsonl has every figure "
                        "(further W&B errors are not reported)", type(e).__name__, e)


def _row_time(line: str) -> float:
    """A metrics.jsonl row's time; a torn last line (a kill mid-write) counts as after any checkpoint."""
    try:
        return float(json.loads(line)["time"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO; other ranks only warnings, so a 64-GPU log stays readable."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        force=True)
    os.environ.setdefault("WANDB_SILENT", "true")
