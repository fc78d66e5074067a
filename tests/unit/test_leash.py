"""Every process a command starts dies with it (`medscale.leash`), with real process trees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from medscale.leash import popen_leashed

# A command that starts a tree: a shell with a background child and a grandchild, each writing a
# heartbeat file while alive (a stand-in for launchers, ranks and loader workers writing checkpoints).
TREE = """
import subprocess, sys, time
from medscale.leash import popen_leashed
beat = sys.argv[1]
cmd = ["bash", "-c", f"(while true; do date +%s%N >> {beat}.grandchild; sleep 0.1; done) & "
                     f"while true; do date +%s%N >> {beat}.child; sleep 0.1; done"]
p = popen_leashed(cmd)
print(p.pid, flush=True)
p.wait()
"""


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigkill_of_the_command_kills_its_whole_tree(tmp_path):
    beat = tmp_path / "beat"
    top = subprocess.Popen([sys.executable, "-c", TREE, str(beat)], stdout=subprocess.PIPE, text=True)
    leash = int(top.stdout.readline())
    deadline = time.time() + 20
    while not (beat.with_suffix(".child").exists() and beat.with_suffix(".grandchild").exists()):
        assert time.time() < deadline
        time.sleep(0.05)
    tree = [leash] + [c.pid for c in psutil.Process(leash).children(recursive=True)]
    assert len(tree) >= 3, tree  # the leash, the shell, its background subshell (and their sleeps)
    top.send_signal(signal.SIGKILL)
    top.wait()
    deadline = time.time() + 5
    while _alive(tree) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(tree), [psutil.Process(p).cmdline() for p in _alive(tree)]
    sizes = [beat.with_suffix(s).stat().st_size for s in (".child", ".grandchild")]
    time.sleep(1.0)
    assert [beat.with_suffix(s).stat().st_size for s in (".child", ".grandchild")] == sizes  # nothing more written


def test_exit_code_and_forwarded_signals():
    assert popen_leashed(["bash", "-c", "exit 3"]).wait() == 3
    # A stop signal sent to the leash's group reaches the command's group, as a relay needs.
    p = popen_leashed(["bash", "-c", "trap 'exit 7' USR1; while true; do sleep 0.05; done"])
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGUSR1)
    assert p.wait(timeout=10) == 7
    # ignore_user_signals: the command inherits USR1 ignored and lives on
    p = popen_leashed(["bash", "-c", "sleep 0.8; exit 5"], ignore_user_signals=True)
    time.sleep(0.3)
    os.killpg(p.pid, signal.SIGUSR1)
    assert p.wait(timeout=10) == 5


def test_nothing_outlives_a_finished_command(tmp_path):
    """A stray background process of a command that exited is killed with what is left of its group."""
    p = popen_leashed(["bash", "-c", f"sleep 300 & echo $! > {tmp_path / 'stray'}; exit 0"])
    assert p.wait(timeout=10) == 0
    stray = int((tmp_path / "stray").read_text())
    deadline = time.time() + 5
    while _alive([stray]) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive([stray])
