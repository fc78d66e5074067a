"""Metrics out of a run: console lines, ``metrics.jsonl`` in the run directory, optional W&B.

Only rank 0 writes. W&B is imported lazily and works offline (``WANDB_MODE=offline``). The W&B run
id is part of the tracker's state: it goes into every checkpoint and into ``RUN_DIR/wandb_id``, so
a restarted job continues the same W&B run (online; offline each restart writes a new folder).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from medscale.config import LoggingConfig
from medscale.errors import InputError
from medscale.files import atomic_write

__all__ = ["Tracker", "WANDB_ID_FILE", "METRICS_FILE", "read_metrics"]

log = logging.getLogger("medscale")

WANDB_ID_FILE = "wandb_id"
_WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""File in the run directory holding the W&B run id."""
WANDB_INIT_TIMEOUT_S = 90.0
"""wandb.init waits no longer than this for W&B's servers; then the run logs offline."""
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
        self._wandb_floor = -1  # steps up to here were sent to W&B by an earlier start

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
        kept = self._drop_rows_after(resumed_at)
        self._file = open(self.run_dir / METRICS_FILE, "a")
        if self.cfg.wandb:
            try:
                self._start_wandb()
                self._backfill_wandb(kept)
            except Exception as e:  # noqa: BLE001 - W&B must never stop a run; metrics.jsonl has it all
                self._run = None
                self._wandb_failed(e)

    def _drop_rows_after(self, resumed_at: float | None) -> list[str]:
        """Keep the rows written before the checkpoint this start resumed from; returns them."""
        path = self.run_dir / METRICS_FILE
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        kept = [line for line in lines if resumed_at is not None and _row_time(line) <= resumed_at]
        if len(kept) != len(lines):
            log.info("metrics.jsonl: dropped %d rows of steps that run again after the resume", len(lines) - len(kept))
            atomic_write(path, "".join(line + "\n" for line in kept))
        return kept

    def _start_wandb(self) -> None:
        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        file_id = id_file.read_text().strip() if id_file.exists() else None
        if self.wandb_id and file_id and file_id != self.wandb_id:
            log.warning("W&B run id %s from the checkpoint differs from %s in %s; continuing the checkpoint's run",
                        self.wandb_id, file_id, id_file)
        # One id for every start, chosen here (not by wandb) so that it is in RUN_DIR before the first
        # step: offline fragments of one run then share it.
        run_id = self.wandb_id or file_id or os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)
        if not _WANDB_ID.fullmatch(run_id):
            # The id names W&B's run folder: one read from a file or a checkpoint must not name a path.
            raise InputError(f"W&B run id {run_id!r} (from the checkpoint, {id_file} or WANDB_RUN_ID) is not "
                             "letters, digits, '_' and '-'; delete that file or unset WANDB_RUN_ID")
        mode = None if os.environ.get("WANDB_MODE") else _mode_without_setting()
        wandb_dir = os.environ.get("WANDB_DIR") or str(self.run_dir)
        # Arguments to wandb.init override W&B's environment variables, so pass only what the
        # environment does not already set: WANDB_PROJECT, WANDB_NAME and WANDB_DIR win over the defaults.
        kwargs = dict(project=os.environ.get("WANDB_PROJECT") or self.cfg.project,
                      name=self.cfg.run_name or os.environ.get("WANDB_NAME") or self.run_dir.name,
                      group=os.environ.get("WANDB_RUN_GROUP") or self.cfg.group or self.run_dir.name,
                      dir=wandb_dir, id=run_id, resume="allow", config={**self.config, "launch": _launch_info()},
                      allow_val_change=True,
                      settings=wandb.Settings(init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT")
                                                                 or WANDB_INIT_TIMEOUT_S)))
        try:
            self._run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # noqa: BLE001 - no network, servers down, a bad key: log offline instead
            if mode == "offline":
                raise
            log.warning("W&B could not start online (%s: %s); logging offline instead", type(e).__name__, e)
            mode = "offline"
            wandb.teardown()  # the failed attempt still holds the run id in wandb's service process
            self._run = wandb.init(mode=mode, **kwargs)
        if self._run.disabled:  # WANDB_MODE=disabled: the id names no run
            return
        self.wandb_id = self._run.id
        if self.wandb_id != file_id:
            atomic_write(id_file, self.wandb_id)
        if self._run.settings.mode == "offline" or mode == "offline":
            log.info("W&B run %s logs offline under %s: upload it later with `wandb sync %s/wandb/offline-run-*-%s` "
                     "(each start of the run is one folder: sync them in order)", self.wandb_id, wandb_dir,
                     wandb_dir, self.wandb_id)
        else:
            log.info("W&B run %s (project %s)", self.wandb_id, self._run.project)

    def _backfill_wandb(self, kept: list[str]) -> None:
        """Give W&B the steps it lost, from the kept rows of metrics.jsonl, and never a step it has.

        After a kill -9, W&B holds a different set of steps than the checkpoint covers: offline,
        wandb-core dies with the trainer and loses what it had not written (often the whole
        fragment); online, the server may hold steps past the checkpoint. So the steps W&B really
        holds are read back (online: the resumed run's starting step; offline: this run id's earlier
        fragments, read record by record); the kept rows above them are sent again now, and later
        steps up to them are skipped (they run again identically).
        """
        if self._run is None or self._run.disabled:
            return
        self._wandb_floor = self._wandb_has()
        pending: dict[int, dict[str, Any]] = {}
        for line in kept:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            step = int(row.pop("step"))
            row.pop("time", None)
            if step > self._wandb_floor:
                pending.setdefault(step, {}).update(row)
        for step in sorted(pending):
            self._run.log(pending[step], step=step)
        if pending:
            log.info("W&B: sent steps %d-%d again from metrics.jsonl (lost by an earlier start)", min(pending),
                     max(pending))
            self._wandb_floor = max(pending)

    def _wandb_has(self) -> int:
        """The highest step W&B holds for this run from earlier starts (-1: none)."""
        if self._run.settings.mode != "offline":
            return int(getattr(self._run, "starting_step", 0) or 0) - 1
        this = Path(self._run.dir).parent  # .../wandb/offline-run-<time>-<id>/files
        best = -1
        # offline-run-<time>-<id>, or offline-run-<time>-<id>-1 for a second start in the same second
        for fragment in sorted(this.parent.glob(f"offline-run-*/run-{self.wandb_id}.wandb")):
            if fragment.parent != this:
                best = max(best, _offline_max_step(fragment))
        return best

    def log(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        """Write the int and float entries of `values` (keys prefixed) as the figures of `step`."""
        if not self.is_main:
            return
        if self._file is None:
            raise RuntimeError("Tracker.log called before Tracker.start (or after close)")
        flat = {f"{prefix}{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._file.write(json.dumps({"step": step, "time": time.time(), **flat}) + "\n")
        self._file.flush()
        if self._run is not None and step > self._wandb_floor:  # a step run again is identical: W&B has it
            try:
                self._run.log(flat, step=step)
            except Exception as e:  # noqa: BLE001 - losing W&B must not stop a run; metrics.jsonl has it all
                self._wandb_failed(e)

    def log_figures(self, step: int, figures: Callable[[Any], dict[str, Any]]) -> None:
        """W&B only: log what ``figures(wandb)`` builds (an evaluation's charts, tables and images, which
        its objective draws: `medscale.tasks.base.Task.wandb_figures`). metrics.jsonl keeps the
        scalars; the report (`medscale report`) draws the same results from eval.json. Without a W&B
        run, `figures` is never called and wandb is never imported."""
        if not self.is_main or self._run is None or step <= self._wandb_floor:
            return
        try:
            import wandb

            out = figures(wandb)
            if out:
                self._run.log(out, step=step)
        except Exception as e:  # noqa: BLE001 - as in log
            self._wandb_failed(e)

    def summary(self, values: dict[str, Any]) -> None:
        """Set the W&B run's summary from the numbers of `values` and their confidence intervals
        (``*_ci``: [low, high]); nested dicts (per class, patient level) become dotted keys."""
        if not self.is_main or self._run is None:
            return
        try:
            for k, v in _flatten(values).items():
                if _number(v) or (isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v)):
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


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k.rsplit("/", 1)[-1] in ("curves", "samples"):
            continue  # figures, logged by log_figures
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


_LOG_BLOCK = 32768  # W&B's transaction log: LevelDB log framing, 32 KiB blocks
_LOG_HEADER = 7  # per chunk: crc32 (4), length (2), type (1); the file starts with a 7-byte header too


def _offline_max_step(path: Path) -> int:
    """The highest history step written to an offline W&B run file (-1 when none, or unreadable).

    Reads the LevelDB-log framing of W&B's transaction log and parses each record with W&B's own
    protocol (wandb.proto); a file cut short by a kill is read up to its last whole record.
    """
    try:
        from wandb.proto import wandb_internal_pb2 as pb

        data = path.read_bytes()
    except (ImportError, OSError):
        return -1
    best, pos, chunks = -1, _LOG_HEADER, b""
    while pos + _LOG_HEADER <= len(data):
        room = _LOG_BLOCK - pos % _LOG_BLOCK
        if room < _LOG_HEADER:  # block trailer: zero padding
            pos += room
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        body = data[pos + _LOG_HEADER:pos + _LOG_HEADER + length]
        if kind == 0 or len(body) < length:
            break  # padding to the end, or a torn record
        pos += _LOG_HEADER + length
        chunks = body if kind in (1, 2) else chunks + body  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            try:
                record.ParseFromString(chunks)
            except Exception:  # noqa: BLE001 - a record we cannot read ends what we trust
                break
            if record.HasField("history"):
                best = max(best, record.history.step.num)
    return best


def _mode_without_setting() -> str | None:
    """W&B's mode when WANDB_MODE is not set: offline when no API key is at hand (WANDB_API_KEY or a
    netrc entry for the W&B host), so that a run never stops at a login prompt; else W&B decides."""
    if os.environ.get("WANDB_API_KEY"):
        return None
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or None)
        if rc.authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    log.info("W&B: no API key (WANDB_API_KEY or ~/.netrc for %s): logging offline", host)
    return "offline"


def _launch_info() -> dict[str, Any]:
    """Where this start runs, for the W&B config: Slurm job id, restart count, array task, node list."""
    keys = {"SLURM_JOB_ID": "slurm_job_id", "SLURM_RESTART_COUNT": "slurm_restart_count",
            "SLURM_ARRAY_JOB_ID": "slurm_array_job_id", "SLURM_JOB_NODELIST": "slurm_nodes",
            "SLURM_JOB_NAME": "slurm_job_name"}
    info: dict[str, Any] = {v: os.environ[k] for k, v in keys.items() if k in os.environ}
    if "SLURM_JOB_ID" in os.environ:
        info.setdefault("slurm_restart_count", "0")
    return info


def _row_time(line: str) -> float:
    """A metrics.jsonl row's time; a torn last line (a kill mid-write) counts as after any checkpoint."""
    try:
        return float(json.loads(line)["time"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of ``RUN_DIR/metrics.jsonl`` so far, and how many lines are not JSON (a line being
    written, or torn by a kill); none when the file is not there."""
    path = Path(run_dir) / METRICS_FILE
    rows, bad = [], 0
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return rows, bad
