"""Stop signals only set a flag; the per-step decision stops or saves; the clock asks for saves."""

from __future__ import annotations

import os
import signal

import pytest

from medscale.train import preemption
from medscale.signals import STOP_SIGNALS
from medscale.train.preemption import EXIT_REQUEUE, StopRequest


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_sets_the_flag_and_nothing_else(sig):
    stop = StopRequest().install()
    try:
        assert stop.decide() == (False, False)
        os.kill(os.getpid(), sig)  # the handler runs before the next bytecode: no exception, no exit
        os.kill(os.getpid(), sig)  # a second signal (e.g. during the save) changes nothing
        assert stop.requested and stop.count == 2 and stop.describe() == signal.Signals(sig).name
        assert stop.decide() == (True, False)
    finally:
        stop.uninstall()
    assert signal.getsignal(sig) is not stop._handle


def test_every_minutes_asks_for_a_save_by_the_clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: now[0])
    stop = StopRequest(every_minutes=2)
    assert stop.decide() == (False, False)
    now[0] += 119
    assert not stop.decide().save
    now[0] += 2
    assert stop.decide() == (False, True)
    stop.saved()
    assert not stop.decide().save
    assert StopRequest(every_minutes=0).decide() == (False, False)


def test_stop_marker_says_why_and_where(tmp_path):
    import json

    stop = StopRequest()
    stop._handle(signal.SIGUSR2, None)
    stop.write_marker(tmp_path, 17, tmp_path / "checkpoints" / "step00000017")
    marker = json.loads((tmp_path / preemption.STOPPED_FILE).read_text())
    assert marker["signal"] == "SIGUSR2" and marker["step"] == 17 and marker["checkpoint"] == "step00000017"
    assert marker["exit_code"] == EXIT_REQUEUE == 75
