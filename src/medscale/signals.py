"""The signals that ask a run to stop cleanly: Slurm's warning (``--signal``), ``scancel`` and time
limits (SIGTERM), a preemption, Ctrl-C. `medscale.train.preemption` turns them into a checkpoint at
the next step; loader workers ignore them (the rank decides); the leash (`medscale.leash`) forwards
them to the launcher's process group."""

from __future__ import annotations

import signal

__all__ = ["STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
