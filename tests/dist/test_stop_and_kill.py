"""A running training is stopped by signals and killed by SIGKILL, in real processes under real launchers,
and the same command continues it as if nothing had happened.

- SIGTERM to a plain process, SIGUSR1 to `medscale train dist.nproc=2`, SIGUSR2 to the process group
  of the deepspeed launcher (started with USR1/USR2 ignored, as a batch script does), SIGUSR1 to
  torchrun told to handle it: every rank saves one checkpoint at the step the signal arrived (or the
  next), the run stops with exit code 75 (torchrun: see the test), nothing is left running, and the
  rerun ends with the uninterrupted run's losses.
- SIGKILL to the whole process group at three random steps of a 2-rank fp32 ZeRO-2 run, each time
  restarted with the same command: every step's loss and the final weights equal the uninterrupted
  run's bitwise, each step logged once.
- SIGKILL while a checkpoint is half written: the next start takes the previous complete one.
- SIGKILL of `medscale train dist.nproc=2`'s process group (what a user's kill -9 or the end of a job
  step does): the launchers, the ranks and their loader workers die within seconds and write nothing
  more; the same command then takes the dead run's lock over and resumes bitwise.
- One writer per run directory: a second `medscale train` on a run in progress exits 2 at once naming
  the holder, while the first finishes unharmed; two runs side by side on one machine both finish
  (each on a free rendezvous port).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import last_step as _last_step
from conftest import losses as _losses
from conftest import metric_rows as _rows
from conftest import subprocess_env, tiny_run
from medscale.dist import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 60
EXIT_REQUEUE = 75


@pytest.fixture(scope="module")
def shards(tiny_shards):
    return tiny_shards


def _config(tmp: Path, shards: Path, port: bool = True, **checkpoint) -> Path:
    return tiny_run(tmp / f"run{len(list(tmp.glob('run*.yaml')))}.yaml", shards,
                    train={"steps": STEPS, "micro_batch_size": 2, "warmup_steps": 2, "ema_decay": 0.9},
                    dist={"master_port": free_port()} if port else {},  # without one medscale picks a free one
                    checkpoint={"every_steps": 0, "keep": 2, **checkpoint})


def _start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    # A session of its own: the test signals or kills exactly this job's process group.
    return subprocess.Popen(cmd, cwd=ROOT, env=env or subprocess_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(out: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _last_step(out) >= step:
            return _last_step(out)
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _signal(out: Path, send) -> tuple[int, int]:
    """Send a signal (`send()`); the last logged step just before and just after: the step in flight
    when it arrived is after + 1 at most."""
    before = _last_step(out)
    send()
    return before, _last_step(out)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _left_running(marker: str) -> list[str]:
    """Processes whose command line names this run's config (ranks, launchers, loader workers)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if marker in cmdline and p.pid != os.getpid():
            found.append(f"{p.pid}: {cmdline[:200]}")
    return found


def _train_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medscale.cli", "train", "--config", str(config), f"out_dir={out}", *extra]


def _ds_cmd(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
            str(free_port()), "--no_local_rank", "--module", "medscale.cli", "train", "--config", str(config),
            f"out_dir={out}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    """Uninterrupted runs, one rank and two: losses and final weights."""
    tmp = tmp_path_factory.mktemp("reference")
    config = _config(tmp, shards)
    done = {}
    for world in (1, 2):
        out = tmp / f"world{world}"
        rc, log = _finish(_start(_train_cmd(config, out, f"dist.nproc={world}")))
        assert rc == 0, log[-4000:]
        done[world] = {"losses": _losses(out), "model": torch.load(out / "model.pt", weights_only=True)}
        assert sorted(done[world]["losses"]) == list(range(1, STEPS + 1))
    return done


def _check_stopped_then_rerun(proc: subprocess.Popen, sent: tuple[int, int], out: Path, config: Path, rerun: list[str],
                        reference: dict) -> None:
    rc, log = _finish(proc)
    assert rc == EXIT_REQUEUE, log[-4000:]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    assert len(ckpts) == 1, ckpts  # one checkpoint, written by every rank together
    saved = int(ckpts[0][4:])
    assert sent[0] <= saved <= sent[1] + 1, (sent, saved)  # the step in flight when the signal arrived
    assert (out / "checkpoints" / ckpts[0] / "complete.json").exists()
    stopped = json.loads((out / "stopped.json").read_text())
    assert stopped["step"] == saved and stopped["exit_code"] == EXIT_REQUEUE
    assert not (out / "model.pt").exists()
    assert not _left_running(str(config)), _left_running(str(config))
    rc, log = _finish(_start(rerun))
    assert rc == 0, log[-4000:]
    assert f"resumed from {out / 'checkpoints' / ckpts[0]}" in log
    assert _losses(out) == reference["losses"]
    assert not (out / "stopped.json").exists()


def test_sigterm_to_a_plain_process(tmp_path, shards, reference):
    config = _config(tmp_path, shards)
    out = tmp_path / "run"
    proc = _start(_train_cmd(config, out))
    _wait_for(out, 5, proc)
    sent = _signal(out, lambda: proc.send_signal(signal.SIGTERM))
    _check_stopped_then_rerun(proc, sent, out, config, _train_cmd(config, out), reference[1])
    b = torch.load(out / "model.pt", weights_only=True)
    for k, v in reference[1]["model"]["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_sigusr1_to_medscale_nproc2(tmp_path, shards, reference):
    config = _config(tmp_path, shards)
    out = tmp_path / "run"
    cmd = _train_cmd(config, out, "dist.nproc=2")
    proc = _start(cmd)
    _wait_for(out, 5, proc)
    sent = _signal(out, lambda: proc.send_signal(signal.SIGUSR1))  # medscale's own process: it relays
    _check_stopped_then_rerun(proc, sent, out, config, cmd, reference[2])


def test_sigusr2_to_the_deepspeed_launchers_process_group(tmp_path, shards, reference):
    config = _config(tmp_path, shards)
    out = tmp_path / "run"
    # As a batch script does it: the launchers inherit USR1/USR2 ignored, the ranks catch them.
    cmd = ["bash", "-c", 'trap "" USR1 USR2; exec "$@"', "bash", *_ds_cmd(config, out)]
    proc = _start(cmd)
    _wait_for(out, 5, proc)
    sent = _signal(out, lambda: os.killpg(proc.pid, signal.SIGUSR2))
    _check_stopped_then_rerun(proc, sent, out, config, cmd, reference[2])


def test_sigusr1_to_torchrun(tmp_path, shards, reference):
    """torchrun forwards USR1 to its workers when told to (``--signals-to-handle``); the workers stop
    cleanly with 75, but torchrun itself then exits 1 with a SignalException (its own rule, not
    medscale's), so what tells a batch script to requeue is RUN_DIR/stopped.json."""
    config = _config(tmp_path, shards)
    out = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2",
           "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "medscale.cli",
           "train", "--config", str(config), f"out_dir={out}"]
    env = subprocess_env()
    proc = _start(cmd, env)
    _wait_for(out, 5, proc)
    sent = _signal(out, lambda: proc.send_signal(signal.SIGUSR1))
    rc, log = _finish(proc)
    assert rc == 1 and "SignalException" in log, (rc, log[-3000:])
    stopped = json.loads((out / "stopped.json").read_text())
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    assert ckpts == [f"step{stopped['step']:08d}"] and sent[0] <= stopped["step"] <= sent[1] + 1
    assert not _left_running(str(config))
    rc, log = _finish(_start(cmd, env))
    assert rc == 0, log[-4000:]
    assert _losses(out) == reference[2]["losses"]


def test_sigkill_at_three_random_steps_resumes_bitwise(tmp_path, shards, reference):
    config = _config(tmp_path, shards, every_steps=3)
    out = tmp_path / "run"
    kills = sorted(random.Random(0).sample(range(4, STEPS - 4), 3))
    for step in kills:
        proc = _start(_ds_cmd(config, out))
        _wait_for(out, step, proc)
        os.killpg(proc.pid, signal.SIGKILL)  # the launchers, every rank and every loader worker
        proc.wait(timeout=60)
        time.sleep(0.5)
        assert not _left_running(str(config))
    rc, log = _finish(_start(_ds_cmd(config, out)))
    assert rc == 0, log[-4000:]
    assert _losses(out) == reference[2]["losses"]  # bitwise, each step once
    got = torch.load(out / "model.pt", weights_only=True)
    for part in ("model", "model_ema"):
        for k, v in reference[2]["model"][part].items():
            assert torch.equal(v, got[part][k]), (part, k)


def test_sigkill_while_a_checkpoint_is_written_resumes_from_the_previous(tmp_path, shards, reference):
    config = _config(tmp_path, shards, every_steps=4)
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    # Every rank holds after writing its files, before the checkpoint is complete.
    proc = _start(_ds_cmd(config, out), subprocess_env(MEDSCALE_TEST_SAVE_PAUSE="3"))
    deadline = time.time() + 240
    while not ((ckpts / "step00000004" / "complete.json").exists() and (ckpts / "step00000008").is_dir()):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the pause: both ranks' files of step 8 are on disk, no completion marker
    assert not (ckpts / "step00000008" / "complete.json").exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    rc, log = _finish(_start(_ds_cmd(config, out)))
    assert rc == 0, log[-4000:]
    assert f"resumed from {ckpts / 'step00000004'}" in log
    assert _losses(out) == reference[2]["losses"]


def test_every_minutes_and_keep_best_in_a_real_run(tmp_path, shards):
    """checkpoint.every_minutes saves by the clock (all ranks agree at a step); keep_best keeps the
    best-scored checkpoint of the eval split beside the newest."""
    out = tmp_path / "clock"
    config = _config(tmp_path, shards, every_minutes=0.0005, keep=50)  # 30 ms: a save every step or two
    rc, log = _finish(_start(_train_cmd(config, out, "train.steps=12")))
    assert rc == 0, log[-3000:]
    saved = sorted(int(p.name[4:]) for p in (out / "checkpoints").glob("step*"))
    assert len(saved) >= 4 and saved[-1] == 12, saved  # not only the final one (every_steps is 0)

    out = tmp_path / "best"
    config = _config(tmp_path, shards, every_steps=2, keep=1, keep_best="auroc")
    rc, log = _finish(_start(_train_cmd(config, out, "train.steps=12", "eval.every_steps=2")))
    assert rc == 0, log[-3000:]
    scores = {}
    for row in _rows(out):
        if "val/auroc" in row and row["val/auroc"] is not None:
            scores[row["step"]] = row["val/auroc"]
    kept = sorted(int(p.name[4:]) for p in (out / "checkpoints").glob("step*"))
    best = max(scores, key=lambda s: (scores[s], -s))  # the first of equal bests: max() keeps the first
    assert 12 in kept and best in kept and len(kept) <= 2, (kept, scores)
    recorded = json.loads((out / "checkpoints" / f"step{best:08d}" / "complete.json").read_text())["score"]
    assert recorded == scores[best]


def _tree(pid: int) -> list[psutil.Process]:
    return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]


def _files(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


def test_sigkill_of_medscale_nproc2_leaves_nothing_running_and_resumes(tmp_path, shards, reference):
    config = _config(tmp_path, shards, port=False, every_steps=3)
    out = tmp_path / "run"
    cmd = _train_cmd(config, out, "dist.nproc=2")
    proc = _start(cmd)
    _wait_for(out, 10, proc)
    tree = _tree(proc.pid)
    names = " ".join(" ".join(p.cmdline()) for p in tree)
    assert "medscale.leash" in names and "deepspeed.launcher.launch" in names and len(tree) >= 5, names
    os.killpg(proc.pid, signal.SIGKILL)  # the medscale train process's group, as kill -9 -PGID does
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, [" ".join(p.cmdline())[:150] for p in alive]
    assert not _left_running(str(config))
    before = _files(out)
    time.sleep(3)
    assert _files(out) == before  # nothing writes into the run directory any more

    rc, log = _finish(_start(cmd))
    assert rc == 0, log[-4000:]
    assert f"taking over the lock of pid {proc.pid}" in log and "is not running" in log
    assert _losses(out) == reference[2]["losses"]  # bitwise, each step once
    assert re.search(r"eval test: auroc \d\.\d{4}  auprc \d\.\d{4}  accuracy \d\.\d{4}  n \d+", log), log[-2000:]
    assert not (out / "run.lock").exists()


def test_one_writer_per_run_directory_and_runs_side_by_side(tmp_path, shards, reference):
    config = _config(tmp_path, shards, port=False)
    first, beside = tmp_path / "first", tmp_path / "beside"
    a = _start(_train_cmd(config, first, "dist.nproc=2"))
    c = _start(_train_cmd(config, beside, "dist.nproc=2"))  # another run on this machine: its own free port
    _wait_for(first, 3, a)
    started = time.time()
    second = subprocess.run(_train_cmd(config, first, "dist.nproc=2"), cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert time.time() - started < 30  # at once: no rank, no engine
    lines = [x for x in second.stderr.splitlines() if x.strip()]
    assert lines == [f"medscale train: error: run directory {first} is in use by pid {a.pid} on host "
                     f"{socket.gethostname()}, started {lines[0].split(', started ')[1]}"], second.stderr[-3000:]
    for proc, out in ((a, first), (c, beside)):
        rc, log = _finish(proc)
        assert rc == 0, log[-4000:]
        assert _losses(out) == reference[2]["losses"]  # the first run unharmed, the one beside it too
