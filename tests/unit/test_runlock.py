"""One writer per run directory (`medscale.train.runlock`), with real processes holding and losing the lock."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from medscale.train.runlock import LOCK_FILE, Holder, RunLock, RunLocked

HOLD = """
import sys, time
from medscale.train.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def _holder(run_dir) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunLocked) as e:
            RunLock(tmp_path / "run").acquire()
        msg = str(e.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and "started 20" in msg
        assert f"kill {holder.pid}" in msg
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == holder.pid  # untouched
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_with_a_log_line(tmp_path, caplog):
    holder = _holder(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)  # the kernel drops its flock; its line stays in the file
    holder.wait()
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="medscale.train"):
        lock = RunLock(tmp_path / "run").acquire()
    assert f"taking over the lock of pid {holder.pid}" in caplog.text and "is not running" in caplog.text
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # a finished run leaves no lock behind


def test_a_reused_pid_is_not_the_holder(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    me = Holder.me()
    # This very pid, but another process start: the holder it names is gone.
    other = Holder(me.host, os.getppid(), time.time(), proc_start="1")
    (run / LOCK_FILE).write_text(other.line())
    with caplog.at_level(logging.WARNING, logger="medscale.train"):
        RunLock(run).acquire().release()
    assert "is another process now" in caplog.text


def test_a_holder_on_another_host_is_refused_unless_slurm_vouches(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(Holder("node-b", 4242, time.time(), "77", slurm_job="9001").line())
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue: nothing can tell whether node-b still runs it
    with pytest.raises(RunLocked, match=f"cannot tell whether it still runs; if it does not, remove {run / LOCK_FILE}"):
        RunLock(run).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "9001")  # a requeued job, now on this node: its earlier start is over
    with caplog.at_level(logging.WARNING, logger="medscale.train"):
        RunLock(run).acquire().release()
    assert "earlier start of this Slurm job (9001)" in caplog.text


def test_a_launched_rank_adopts_its_launchers_lock_and_nobody_elses(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run).acquire()
    line = lock.holder.line()
    assert RunLock(run).adopt(line).holder == lock.holder
    with pytest.raises(RunLocked, match="does not name the process that launched this rank"):
        RunLock(run).adopt(Holder("h", 1, 0.0).line())
    lock.release()
    with pytest.raises(RunLocked, match="does not name the process that launched this rank"):
        RunLock(run).adopt(line)  # the launcher's lock is gone


def test_only_a_job_id_reaches_squeue(tmp_path, monkeypatch, caplog):
    """The holder's Slurm job is read from the lock file: it reaches `squeue` only as a job id."""
    calls = tmp_path / "squeue_calls"
    squeue = tmp_path / "bin" / "squeue"
    squeue.parent.mkdir()
    squeue.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')  # prints no state: the job is not running
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{squeue.parent}:/usr/bin:/bin")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(Holder("node-b", 4242, time.time(), "77", slurm_job="1;touch pwned").line())
    with pytest.raises(RunLocked, match="cannot tell whether it still runs"):
        RunLock(run).acquire()
    assert not calls.exists() and not (tmp_path / "pwned").exists()  # never asked: not a job id
    (run / LOCK_FILE).write_text(Holder("node-b", 4242, time.time(), "77", slurm_job="9001").line())
    with caplog.at_level(logging.WARNING, logger="medscale.train"):
        RunLock(run).acquire().release()
    assert calls.read_text().split() == ["--noheader", "--jobs", "9001", "--format", "%T"]
    assert "Slurm job 9001 is no longer running" in caplog.text
