"""Every process a command starts dies with it: a leash between a medscale command and a child tree.

A process killed with SIGKILL runs no code: it cannot stop the launchers and ranks it started,
and they would train on and write into the run directory (and a rerun of the same command would
meet them there). Linux's parent-death signal (``PR_SET_PDEATHSIG``) reaches only a direct child,
and it is cleared in every process that child forks. So a command starts its child tree through
a leash: a small process (``python -m medscale.leash``, no torch) that

- is told by the kernel when the command dies (its parent-death signal, and a poll of its parent
  for kernels without one), and then kills its child's whole process group with SIGKILL (the
  launchers, every rank and every data-loader worker: none of them calls setsid);
- forwards the stop signals it gets (SIGUSR1, SIGUSR2, SIGTERM, SIGINT, SIGHUP) to that group
  while the command lives, so a command relays a clean stop as before (`medscale.train.preemption`);
- when the child exits, kills what is left of its group (a stray worker) and exits with the
  child's exit code.

Only the command's death is a kill: the leash itself never decides to stop anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

from medscale.signals import STOP_SIGNALS

__all__ = ["popen_leashed", "die_with_parent", "main"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_FORWARDED = (*STOP_SIGNALS, signal.SIGHUP)
_POLL_S = 0.2


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Ask the kernel for `sig` when this process's parent dies (Linux; elsewhere nothing happens).

    `parent`: the pid the parent had; if it is already gone when this runs (it died between the fork
    and this call), `sig` is sent at once. Returns whether the kernel took the request.
    """
    try:
        import ctypes

        ok = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        ok = False  # not Linux
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return ok


def popen_leashed(cmd: Sequence[str], *, ignore_user_signals: bool = False, **kwargs: Any) -> subprocess.Popen:
    """Start `cmd` behind a leash: it and everything it starts die when this process dies, SIGKILL included.

    The leash leads a process group of its own (the returned Popen's pid), so ``os.killpg(p.pid, sig)``
    reaches it and it forwards `sig` to the command's group. `ignore_user_signals`: the command (and what
    it starts) inherits SIGUSR1/SIGUSR2 ignored, as launchers that have no handler for them must.
    """
    leash = [sys.executable, "-m", "medscale.leash", str(os.getpid()),
             "--ignore-user-signals" if ignore_user_signals else "--", "--", *cmd]
    return subprocess.Popen(leash, start_new_session=True, **kwargs)


class _Leash:
    def __init__(self, parent: int, cmd: list[str], ignore_user_signals: bool):
        self.parent, self.cmd, self.ignore = parent, cmd, ignore_user_signals
        self.child: subprocess.Popen | None = None
        self.cut = threading.Event()

    def _preexec(self) -> None:
        for sig in _FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        if self.ignore:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)

    def _kill_group(self) -> None:
        if self.child is not None:
            try:
                os.killpg(self.child.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _parent_gone(self) -> bool:
        return os.getppid() != self.parent

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._parent_gone():
            self.cut.set()
            self._kill_group()
            return
        if self.child is not None:
            try:
                os.killpg(self.child.pid, signum)
            except ProcessLookupError:
                pass

    def _watch(self) -> None:
        while not self.cut.is_set():
            if self._parent_gone():
                self.cut.set()
                self._kill_group()
                return
            time.sleep(_POLL_S)

    def run(self) -> int:
        for sig in _FORWARDED:
            signal.signal(sig, self._on_signal)
        die_with_parent(signal.SIGTERM)  # the kernel's word; _watch covers other kernels
        if self._parent_gone():
            return 128 + signal.SIGKILL  # the command died before its child could start
        self.child = subprocess.Popen(self.cmd, process_group=0, preexec_fn=self._preexec)
        threading.Thread(target=self._watch, name="leash", daemon=True).start()
        if self._parent_gone():  # died while the child was starting
            self._kill_group()
        code = self.child.wait()
        self.cut.set()
        self._kill_group()  # what is left of the child's group: nothing outlives the command's child
        return code if code >= 0 else 128 - code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medscale.leash PARENT_PID [--ignore-user-signals|--] -- CMD...``"""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4 or args[2] != "--" or not args[0].isdigit():
        print("usage: python -m medscale.leash PARENT_PID [--ignore-user-signals|--] -- CMD...", file=sys.stderr)
        return 2
    return _Leash(int(args[0]), args[3:], args[1] == "--ignore-user-signals").run()


if __name__ == "__main__":
    sys.exit(main())
