"""A prep job: what one `medscale prep` invocation (or one Slurm array task) does, picklable for its workers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medscale.errors import InputError
from medscale.formats.manifest import PREP_LOG_SUFFIX
from medscale.prep.config import PrepConfig

__all__ = ["PrepJob", "PrepIncomplete", "default_log_dir"]


class PrepIncomplete(InputError, RuntimeError):
    """`merge` was asked for before every chunk is finished (rerun the missing tasks)."""


@dataclass
class PrepJob:
    """Everything one prep invocation needs; picklable so worker processes get a copy."""

    inputs: list[str]
    out: Path
    cfg: PrepConfig
    key: bytes
    labels_csv: str | None = None
    workers: int = 1
    task_index: int = 0
    num_tasks: int = 1
    chunk_files: int = 1000
    log_dir: Path | None = None
    """Where logs that name source files go (rejects); None: `default_log_dir(out)`."""

    @property
    def logs(self) -> Path:
        return Path(self.log_dir) if self.log_dir is not None else default_log_dir(self.out)


def default_log_dir(out: str | os.PathLike) -> Path:
    """``<out>.logs``, beside the output directory, never inside it (it names source files)."""
    out = Path(out).resolve()
    return out.parent / (out.name + PREP_LOG_SUFFIX)
