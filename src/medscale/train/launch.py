"""`medscale train dist.nproc=N` outside a launcher: N local ranks under the deepspeed launcher.

This process takes the run directory's lock (`medscale.train.runlock`) and holds it for the whole
run; the ranks are told so. The launcher runs behind a leash (`medscale.leash`): if this process
dies, by any signal, SIGKILL included, the launchers and every rank die with it and write nothing
more. The rendezvous port is a free one unless ``dist.master_port`` names one, so runs side by side
on one machine do not collide.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from medscale.config import ConfigError, RunConfig, save_config
from medscale.dist import free_port
from medscale.leash import popen_leashed
from medscale.train.preemption import relay_signals
from medscale.train.runlock import HOLDER_ENV, RunLock

__all__ = ["relaunch", "rendezvous_port", "LAUNCH_CONFIG"]

LAUNCH_CONFIG = "launch_config.yaml"


def relaunch(cfg: RunConfig, command: list[str]) -> int:
    """Start `cfg.dist.nproc` local ranks of `medscale COMMAND` with the deepspeed launcher.

    The resolved config is written to the run directory and handed to every rank, so the ranks
    cannot disagree about it. Returns the launcher's exit code.

    Raises:
        RunLocked: another process trains this run directory.
        ConfigError: ``dist.master_port`` is set and another process on this machine has it.
    """
    with RunLock(cfg.out_dir).acquire() as lock:  # before anything is written into the run directory
        port = rendezvous_port(cfg.dist.master_port)
        resolved = Path(cfg.out_dir) / LAUNCH_CONFIG
        save_config(cfg, resolved)
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", str(cfg.dist.nproc),
               "--master_port", str(port), "--no_local_rank", "--module", "medscale.cli",
               *command, "--config", str(resolved)]
        print("launching:", " ".join(cmd), flush=True)
        assert lock.holder is not None  # acquire() names this process as the holder
        # The launchers inherit USR1/USR2 ignored (the deepspeed launcher has no handler for them and would
        # die of them; the ranks install their own): any stop signal this process gets is relayed to the
        # leash as SIGUSR1, and on to the ranks, which turn it into a clean stop while the launchers wait
        # for them and pass their exit code on.
        child = popen_leashed(cmd, ignore_user_signals=True, env={**os.environ, HOLDER_ENV: lock.holder.line()})
        restore = relay_signals(child)
        try:
            return child.wait()
        finally:
            restore()


def rendezvous_port(port: int | None) -> int:
    """The rendezvous port of a local launch: ``dist.master_port`` if set and free, else a free one.

    Raises:
        ConfigError: the port is set and taken (another run on this machine, say).
    """
    if port is None:
        return free_port()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to a listener
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise ConfigError(f"dist.master_port={port} is in use on this machine ({e.strerror}): another run may "
                              "hold it; choose another port, or leave dist.master_port unset for a free one") from None
    return port
