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
import yaml

from conftest import read_wandb_run, subprocess_env, write_shards

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def _env(wandb_dir: Path) -> dict[str, str]:
    return subprocess_env(("SLURM_", "WANDB_"), WANDB_MODE="offline", WANDB_DIR=str(wandb_dir),
                          WANDB_CONFIG_DIR=str(wandb_dir / "config"), WANDB_SILENT="true")


def test_train_with_offline_wandb(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, {"train": [12, 12], "val": [4], "test": [8]}, size=16)
    config = {
        "data": {"shards": str(shards), "image_size": 16, "channels": 1, "num_workers": 1, "shuffle_block": 8},
        "model": {"name": "test_vit3", "patch_size": 8, "num_classes": 2},
        "train": {"steps": STEPS, "micro_batch_size": 4, "warmup_steps": 1, "log_every": 1, "precision": "fp32"},
        "dist": {"nproc": 1, "deepspeed_config": str(ROOT / "ds_configs" / "cpu_zero1.json")},
        "eval": {"micro_batch_size": 4, "bootstrap": 10},
        "logging": {"wandb": True, "project": "medscale-test"},
    }
    cfg_yaml = tmp_path / "run.yaml"
    cfg_yaml.write_text(yaml.safe_dump(config))
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
    # the id also travels in the checkpoint, so a restart continues this W&B run
    parts = torch.load(out / "checkpoints" / f"step{STEPS:08d}" / "parts.pt", map_location="cpu", weights_only=True)
    assert parts["tracker"] == {"wandb_id": run_id}
