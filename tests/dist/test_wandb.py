"""`medscale train` with W&B on, offline, through the real CLI in a real process; the run it wrote is read
back with wandb's own reader (``wandb leet inspect --json``): id, resolved config and loss history.

W&B-enabled code must run in a test: wandb renames its API often (0.31 dropped ``wandb.util.generate_id``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import read_wandb_run, subprocess_env, tiny_run, write_shards

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def _env(wandb_dir: Path) -> dict[str, str]:
    return subprocess_env(("SLURM_", "WANDB_"), WANDB_MODE="offline", WANDB_DIR=str(wandb_dir),
                          WANDB_CONFIG_DIR=str(wandb_dir / "config"), WANDB_SILENT="true")


def test_train_with_offline_wandb(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, {"train": [12, 12], "val": [4], "test": [8]}, size=16)
    cfg_yaml = _run_config(tmp_path, "run", shards, STEPS)
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb_home"
    wandb_dir.mkdir()
    cmd = [sys.executable, "-m", "medscale.cli", "train", "--config", str(cfg_yaml), f"out_dir={out}"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(wandb_dir), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]

    run_id = (out / "wandb_id").read_text().strip()
    run = read_wandb_run(wandb_dir)
    assert run["id"] == run_id and run["project"] == "medscale-test" and run["name"] == "run"
    assert run["config"]["train"]["steps"] == STEPS and run["config"]["model"]["name"] == "test_vit3"
    assert run["config"]["out_dir"] == str(out)  # the resolved config, command-line override included
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert {s: h["train/loss"] for s, h in run["history"].items() if "train/loss" in h} == pytest.approx(losses)
    assert "test/accuracy" in run["summary"]
    # every training figure, the test metrics with their bootstrap intervals, and the figures as tables
    trained = run["history"][STEPS]
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "data_wait_frac", "peak_mem_gb", "corrupt_samples",
                "nonfinite_skipped", "epoch"):
        assert f"train/{key}" in trained, (key, sorted(trained))
    result = json.loads((out / "eval.json").read_text())
    assert run["summary"]["test/ci95/auroc"] == pytest.approx(result["ci95"]["auroc"]) and len(result["ci95"]["auroc"]) == 2
    for key in ("roc_curve_table", "pr_curve_table", "confusion_matrix", "calibration_table", "samples"):
        assert trained.get(f"test/{key}._type") == "table-file", (key, sorted(trained))
    tables = {p.name.split("_")[0] for p in (wandb_dir / "wandb").glob("offline-run-*/files/media/table/test/*.json")}
    assert {"roc", "pr", "confusion", "calibration", "samples"} <= tables, tables
    images = list((wandb_dir / "wandb").glob("offline-run-*/files/media/images/**/*.png"))
    assert images, "the sample table's images were not written"
    # the id also travels in the checkpoint, so a restart continues this W&B run
    parts = torch.load(out / "checkpoints" / f"step{STEPS:08d}" / "parts.pt", map_location="cpu", weights_only=True)
    assert parts["tracker"] == {"wandb_id": run_id}


def _run_config(tmp_path: Path, name: str, shards: Path, steps: int, **checkpoint) -> Path:
    return tiny_run(tmp_path / f"{name}.yaml", shards, data={"shuffle_block": 8}, model={"name": "test_vit3"},
                    train={"steps": steps}, dist={"deepspeed_config": "cpu_zero1.json"}, eval={"bootstrap": 10},
                    checkpoint={"every_steps": 0, "keep": 2, **checkpoint},
                    logging={"wandb": True, "project": "medscale-test"}, out_dir=str(tmp_path / name))


def test_sigkill_and_resume_continue_one_wandb_run_with_each_step_once(tmp_path):
    import os
    import signal
    import time

    from conftest import last_step, read_wandb_runs

    steps = 40
    shards = tmp_path / "shards"
    write_shards(shards, {"train": [12, 12], "val": [4], "test": [8]}, size=16)
    histories = {}
    for name in ("ref", "killed"):
        cfg = _run_config(tmp_path, name, shards, steps, every_steps=5)
        wandb_dir = tmp_path / f"wandb_{name}"
        wandb_dir.mkdir()
        cmd = [sys.executable, "-m", "medscale.cli", "train", "--config", str(cfg)]
        if name == "killed":  # SIGKILL mid-run, between two checkpoints, then the same command again
            proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(wandb_dir), start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 240
            while last_step(tmp_path / name) < 18 and time.time() < deadline and proc.poll() is None:
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            assert 18 <= last_step(tmp_path / name) < steps, "the kill should land mid-run"
        r = subprocess.run(cmd, cwd=ROOT, env=_env(wandb_dir), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
        histories[name] = read_wandb_runs(wandb_dir)
    (ref,), fragments = histories["ref"], histories["killed"]
    assert len(fragments) == 2 and {f["id"] for f in fragments} == {(tmp_path / "killed" / "wandb_id").read_text()}
    # The killed start's fragment keeps what wandb-core wrote before it died with the trainer (often
    # nothing); the next start sends what W&B lacks again from metrics.jsonl, and nothing it has.
    trained = [sorted(s for s, h in f["history"].items() if "train/loss" in h) for f in fragments]
    assert trained[1] and (not trained[0] or max(trained[0]) < min(trained[1])), "fragments overlap"
    assert sorted(trained[0] + trained[1]) == list(range(1, steps + 1))  # each step once across the fragments
    combined = {s: h["train/loss"] for f in fragments for s, h in f["history"].items() if "train/loss" in h}
    assert combined == {s: h["train/loss"] for s, h in ref["history"].items() if "train/loss" in h}
    assert fragments[1]["summary"]["test/accuracy"] == ref["summary"]["test/accuracy"]
    assert fragments[1]["group"] == "killed" and fragments[0]["group"] in (None, "killed")  # the run directory's name


def test_no_api_key_and_no_network_trains_offline_in_bounded_time(tmp_path):
    import time

    shards = tmp_path / "shards"
    write_shards(shards, {"train": [12, 12], "val": [4], "test": [8]}, size=16)
    cfg = _run_config(tmp_path, "run", shards, 3)
    home = tmp_path / "home"
    home.mkdir()
    env = subprocess_env(("SLURM_", "WANDB_"), HOME=str(home), WANDB_BASE_URL="http://127.0.0.1:9",
                         WANDB_CONFIG_DIR=str(home / "wandb_config"), NETRC=str(home / ".netrc"))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "medscale.cli", "train", "--config", str(cfg)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    assert elapsed < 180, f"took {elapsed:.0f} s"
    assert "logging offline" in r.stderr and "wandb sync" in r.stderr
    run = read_wandb_run(tmp_path / "run")  # W&B's files in the run directory (no WANDB_DIR)
    assert sorted(s for s, h in run["history"].items() if "train/loss" in h) == [1, 2, 3]
