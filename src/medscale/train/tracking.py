"""Metrics out of a run: console lines, ``metrics.jsonl`` in the run directory, optional W&B.

Only rank 0 writes. W&B is imported lazily and works offline (``WANDB_MODE=offline``); the run
id is kept in the run directory so a restarted job continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from medscale.config import RunConfig, to_dict

__all__ = ["Tracker"]

log = logging.getLogger("medscale")


class Tracker:
    """Rank-0 sink for scalars; a no-op on other ranks."""

    def __init__(self, cfg: RunConfig, run_dir: Path, is_main: bool):
        self.is_main = is_main
        self.run_dir = run_dir
        self.wandb = None
        if not is_main:
            return
        self.file = open(run_dir / "metrics.jsonl", "a")
        if cfg.logging.wandb:
            import wandb

            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=cfg.logging.project, name=cfg.logging.run_name or run_dir.name,
                                    id=run_id, resume="allow", dir=str(run_dir), config=to_dict(cfg))

    def log(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        if not self.is_main:
            return
        flat = {f"{prefix}{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.file.write(json.dumps({"step": step, "time": time.time(), **flat}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(flat, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.is_main and self.wandb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.wandb.summary[k] = v

    def close(self) -> None:
        if not self.is_main:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO; other ranks only warnings, so a 64-GPU log stays readable."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        force=True)
    os.environ.setdefault("WANDB_SILENT", "true")
