"""One writer per run directory: ``RUN/run.lock`` names the process that trains the run.

Two `medscale train` processes writing one run directory (a second start of the same command,
a run whose launcher outlived its parent, a job requeued while the old one still runs) would
plan a resume from one checkpoint while the other writes the next, and interleave metrics. So a
run directory holds ``run.lock`` for the whole run: a JSON line naming its holder (host, pid,
process start, wall-clock start, the Slurm job when there is one), and an exclusive ``flock``
on it that the kernel drops when the holder dies, SIGKILL included.

- A second writer finds the flock taken and stops at once (`RunLocked`, exit code 2), naming
  the holder.
- A lock left by a dead holder is taken over with a log line: the flock is free, and the holder
  is gone (same host and its pid is not running, or runs another process now), or was an
  earlier start of this very Slurm job (a requeued job runs once at a time), or its Slurm job is
  no longer running (``squeue``). A holder on another host that none of this can vindicate is
  refused, with the command to clear it.
- On a launch by ``medscale train dist.nproc=N`` the top process holds the lock and the ranks
  are told so (`HOLDER_ENV`); under srun, torchrun or the deepspeed launcher rank 0 takes it, so
  on a file system shared by many nodes one process per run holds it.
- The holder removes it when the run ends. `medscale eval`, `export` and `report` take no lock.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medscale.errors import UserError

__all__ = ["RunLock", "RunLocked", "Holder", "LOCK_FILE", "HOLDER_ENV"]

log = logging.getLogger("medscale.train")

LOCK_FILE = "run.lock"
HOLDER_ENV = "MEDSCALE_RUN_LOCK_HOLDER"
"""Set by the process that holds the lock for the ranks it launches: the holder's JSON line."""


class RunLocked(UserError):
    """Another process trains this run directory."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory."""

    host: str
    pid: int
    started: float
    """Wall-clock start of the lock (seconds since the epoch)."""
    proc_start: str = ""
    """The kernel's start time of the pid (/proc/PID/stat field 22): a reused pid has another."""
    slurm_job: str = ""

    @classmethod
    def me(cls) -> "Holder":
        job = os.environ.get("SLURM_JOB_ID", "")
        return cls(socket.gethostname(), os.getpid(), time.time(), _proc_start(os.getpid()), job)

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), float(d["started"]), str(d.get("proc_start", "")),
                       str(d.get("slurm_job", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def line(self) -> str:
        return json.dumps(asdict(self))

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"pid {self.pid} on host {self.host}{job}, started {when}"

    def gone(self) -> str | None:
        """Why this holder can no longer be running, or None when it may be."""
        if self.host == socket.gethostname():
            if not _running(self.pid):
                return f"pid {self.pid} is not running"
            if self.proc_start and _proc_start(self.pid) not in ("", self.proc_start):
                return f"pid {self.pid} is another process now"
            return None
        job = os.environ.get("SLURM_JOB_ID", "")
        if self.slurm_job and self.slurm_job == job:
            return f"it was an earlier start of this Slurm job ({job}), which runs once at a time"
        if self.slurm_job and _slurm_job_ended(self.slurm_job):
            return f"Slurm job {self.slurm_job} is no longer running"
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _proc_start(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 (starttime), counted after the command name


def _slurm_job_ended(job: str) -> bool:
    """True when squeue says the job is not pending or running (False when it cannot tell)."""
    if not re.fullmatch(r"\d+(_\d+)?", job):  # read from a file: only a job id reaches the command
        return False
    try:
        r = subprocess.run(["squeue", "--noheader", "--jobs", job, "--format", "%T"], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    if r.returncode != 0:
        return "Invalid job id" in r.stderr  # gone from the controller's memory
    return not r.stdout.strip()


class RunLock:
    """The lock of one run directory, held from `acquire` to `release` (a context manager too)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.holder: Holder | None = None
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock, or take over a dead holder's.

        Raises:
            RunLocked: a live holder has it (the message names it and says what to do).
        """
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = Holder.me()
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                text = _read(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._locked(Holder.parse(text), text) from None
                if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
                    raise
                fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)  # no flock here: the holder line decides
            if not _same_file(fd, self.path):
                os.close(fd)  # the holder removed it between our open and our flock: try the new one
                continue
            text = _read(fd)
            old = Holder.parse(text) if text.strip() else None
            if old is not None and (old.host, old.pid) != (me.host, me.pid):
                why = old.gone()
                if why is None:
                    os.close(fd)
                    raise self._locked(old, text, stale=old.host != me.host)
                log.warning("%s: taking over the lock of %s (%s)", self.path, old.describe(), why)
            elif text.strip() and old is None:
                log.warning("%s held %r, not a holder line: taking it over", self.path, text[:200])
            os.ftruncate(fd, 0)
            os.pwrite(fd, (me.line() + "\n").encode(), 0)
            os.fsync(fd)
            self._fd, self.holder = fd, me
            return self
        raise RunLocked(f"{self.path} keeps changing while this run tries to lock it: another process is starting "
                        "on this run directory; start one at a time")

    def _locked(self, holder: Holder | None, text: str, stale: bool = False) -> RunLocked:
        who = holder.describe() if holder is not None else f"a process that wrote {text[:200]!r}"
        if stale:
            return RunLocked(f"run directory {self.run_dir} is locked by {who} and this host cannot tell whether it "
                             f"still runs; if it does not, remove {self.path} and start again")
        stop = f"kill {holder.pid}" if holder is not None else "stop it"
        return RunLocked(f"run directory {self.run_dir} is in use by {who}: wait for that run to end, or stop it "
                         f"({stop}) and run this command again to resume")

    def adopt(self, line: str) -> "RunLock":
        """In a rank launched by the lock's holder (`HOLDER_ENV`): check the lock names it; take nothing.

        Raises:
            RunLocked: the lock names another process (or none).
        """
        theirs = Holder.parse(line)
        text = self.path.read_text() if self.path.exists() else ""
        if theirs is None or Holder.parse(text) != theirs:
            raise RunLocked(f"{self.path} does not name the process that launched this rank (it holds "
                            f"{text.strip()[:200]!r}): another run took this directory; stop the other run first")
        self.holder = theirs
        return self

    def release(self) -> None:
        """Remove the lock file (only while holding it) and drop the flock."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self if self.held or self.holder is not None else self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
