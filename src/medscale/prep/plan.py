"""The plan of a prep (``OUT/plan.json``) and the output directory it resumes in.

The plan names the inputs by a keyed hash of their sorted paths (an unkeyed hash could be
confirmed by whoever can guess them), with the chunk size, the config (path fields by their
contents' hash) and the key's fingerprint: a resume continues only the same prep.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
from pathlib import Path
from typing import Any

from medscale.config import to_dict
from medscale.errors import ConfigError
from medscale.prep.convert import labels_kind
from medscale.prep.deid import Pseudonymizer
from medscale.prep.discover import Source
from medscale.prep.job import PrepJob, default_log_dir
from medscale.prep.labels import LabelTable

__all__ = ["build_plan", "check_plan", "prepare_output", "PLAN_FILE"]

PLAN_FILE = "plan.json"


def build_plan(job: PrepJob, sources: list[Source], labels: LabelTable | None) -> dict[str, Any]:
    # Keyed: an unkeyed hash of the paths could be confirmed by whoever can guess them.
    h = hmac.new(job.key, b"medscale-prep-inputs", hashlib.sha256)
    for s in sources:
        h.update(s.path.encode() + b"\0")
    return {
        "inputs": len(sources),
        "inputs_hmac": h.hexdigest(),
        "chunk_files": job.chunk_files,
        "chunks": (len(sources) + job.chunk_files - 1) // job.chunk_files,
        "config": _config_record(job),
        "labels_sha256": _file_sha256(job.labels_csv) if job.labels_csv else None,
        "task": labels_kind(job.cfg, labels),
        "classes": labels.classes if labels else list(job.cfg.classes) if job.cfg.label_from_dir else [],
        "key_fingerprint": Pseudonymizer(job.key)("fingerprint", "medscale"),
    }


PLAN_CHECKS = {"inputs_hmac": "inputs", "chunk_files": "chunk files", "config": "config",
                "labels_sha256": "labels CSV contents", "key_fingerprint": "key fingerprint"}
# Config fields that hold paths: recorded by their contents' hash, never by name.
_PATH_FIELDS = ("labels_csv", "redact_rules")


def _config_record(job: PrepJob) -> dict[str, Any]:
    cfg = to_dict(job.cfg)
    for name in _PATH_FIELDS:
        if cfg.get(name):
            path = job.labels_csv if name == "labels_csv" and job.labels_csv else cfg[name]
            cfg[name] = f"sha256:{_file_sha256(path)}" if os.path.isfile(path) else "set"
    return cfg


def _file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_plan(path: Path, plan: dict[str, Any]) -> None:
    """Refuse to resume a prep in an output written by another one (other inputs, recipe, chunk size, key).

    Raises:
        ConfigError: naming what differs.
    """
    if not path.exists():
        return
    old = json.loads(path.read_text())
    for k in PLAN_CHECKS:
        if old.get(k) != plan.get(k):
            raise ConfigError(f"{path} was written for different {PLAN_CHECKS[k]}; resume only with the same "
                              "inputs, recipe, chunk size and key, or use --overwrite")


def prepare_output(out: Path, *, resume: bool, overwrite: bool, log_dir: Path | None = None,
                   dry_run: bool = False) -> None:
    """Refuse a non-empty output directory unless resuming or overwriting; check the log directory.

    The log directory (default `default_log_dir`) may not lie inside the output: it names sources.
    Creates nothing (`run_prep` does, once its inputs are checked); ``overwrite`` deletes the output
    and its reject logs, so check the job first (`check_prep`). `dry_run`: only the checks.
    """
    logs = Path(log_dir) if log_dir is not None else default_log_dir(out)
    if logs.resolve().is_relative_to(Path(out).resolve()):
        raise ConfigError(f"--log-dir {logs} is inside --out {out}: the reject log names source files and "
                          "must stay out of the shard directory; choose a directory beside it")
    if out.exists() and any(out.iterdir()):
        if overwrite:
            if not dry_run:
                shutil.rmtree(out)
                shutil.rmtree(logs / "rejects", ignore_errors=True)
        elif not resume:
            raise ConfigError(
                f"output directory {out} is not empty; pass --resume to continue an interrupted prep "
                "or --overwrite to start again"
            )
