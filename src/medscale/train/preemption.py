"""Stopping cleanly when the cluster asks: a signal sets a flag, all ranks agree at a step boundary.

SIGUSR1, SIGUSR2, SIGTERM and SIGINT only set a flag here: saving inside a signal handler could
run a collective while another rank is inside a different one, a deadlock. After every optimizer
step the ranks take one small all-reduce (MAX over ``[stop requested, save due by the clock]``), so
they take the same decision at the same step: every rank saves the same checkpoint, then the
process exits with `EXIT_REQUEUE` (75, EX_TEMPFAIL: "stopped cleanly, requeue me"). A second
signal during the save only sets the flag again: the save is never torn by it.

Launchers: a signal sent to the ranks (or to their whole process group, as Slurm's ``--signal``
without ``B:`` does) reaches them directly. ``medscale train dist.nproc=N`` starts the deepspeed
launcher in a process group of its own with USR1/USR2 ignored (so the launchers survive them)
and relays any of the four signals to the ranks as SIGUSR1 (`relay_signals`). The deepspeed
launcher forwards only TERM and INT itself, torchrun forwards USR1/USR2 only when
``TORCHELASTIC_SIGNALS_TO_HANDLE`` lists them; see docs/training.md.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable, NamedTuple

from medscale.files import atomic_write
from medscale.signals import STOP_SIGNALS

__all__ = ["EXIT_REQUEUE", "StopRequest", "Decision", "relay_signals", "STOPPED_FILE"]

log = logging.getLogger("medscale.train")

EXIT_REQUEUE = 75  # EX_TEMPFAIL (sysexits.h): a temporary stop, run the same command again
STOPPED_FILE = "stopped.json"
"""Written by rank 0 in the run directory when a signal stopped the run (removed when a run starts):
a launcher that does not pass exit codes through still leaves the reason on disk."""


class Decision(NamedTuple):
    """What all ranks agreed on at a step boundary."""

    stop: bool
    """A stop signal reached some rank: save and exit with EXIT_REQUEUE."""
    save: bool
    """checkpoint.every_minutes has passed since the last save on some rank's clock."""


class StopRequest:
    """Signal flags, and the per-step agreement of all ranks on them.

    Args:
        every_minutes: ask for a save when this many minutes have passed since the last one
            (0: never by the clock).
        world: number of ranks (1: no collective).
    """

    def __init__(self, every_minutes: float = 0.0, world: int = 1):
        self.every_s = every_minutes * 60.0
        self.world = world
        self.signum: int | None = None  # the first signal received
        self.count = 0
        self.last_save = time.monotonic()
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopRequest":
        """Install the handlers (main thread only; elsewhere nothing is installed and a warning logged)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("stop signals are handled only in the main thread; this run cannot be stopped cleanly")
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put the previous handlers back (for in-process callers and tests)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only flags here: no I/O, no collectives, no locks (the save happens at the step boundary).
        self.count += 1
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def saved(self) -> None:
        """A checkpoint was just written: the clock starts again."""
        self.last_save = time.monotonic()

    def decide(self) -> Decision:
        """The decision every rank takes after an optimizer step (a collective: every rank calls it)."""
        due = bool(self.every_s) and time.monotonic() - self.last_save >= self.every_s
        flags = [float(self.requested), float(due)]
        import torch  # here, not at the top: the CLI installs the handlers before torch is imported
        import torch.distributed as torch_dist

        if self.world > 1 and torch_dist.is_available() and torch_dist.is_initialized():
            from medscale.dist import cpu_group

            t = torch.tensor(flags)
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX, group=cpu_group())
            flags = t.tolist()
        return Decision(stop=flags[0] > 0, save=flags[1] > 0)

    def describe(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"

    def write_marker(self, run_dir: Path, step: int, checkpoint: Path | None) -> None:
        """Rank 0: leave why and where the run stopped (the launcher may not pass exit code 75 on)."""
        import json

        atomic_write(run_dir / STOPPED_FILE, json.dumps({
            "signal": self.describe(), "step": step, "checkpoint": checkpoint.name if checkpoint else None,
            "exit_code": EXIT_REQUEUE, "time": time.time()}))


def relay_signals(child: "Any", to: int = signal.SIGUSR1) -> Callable[[], None]:
    """In a process that started `child` (a Popen in its own process group), send `to` to that group
    whenever this process gets one of STOP_SIGNALS. Returns a function that restores the handlers."""
    previous = {}

    def forward(signum: int, frame: FrameType | None) -> None:
        try:
            os.killpg(child.pid, to)
        except ProcessLookupError:
            pass

    for sig in STOP_SIGNALS:
        previous[sig] = signal.signal(sig, forward)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
