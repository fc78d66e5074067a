"""Shared fixtures: tiny shard sets written with the real codec and tar writer (with indexes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from medscale.synthetic import write_tiny_shards as write_shards  # noqa: F401 - every test's tiny shards
from medscale.train.tracking import read_metrics




@pytest.fixture
def shard_factory(tmp_path):
    def make(sizes, **kw):
        return write_shards(tmp_path / "shards", sizes, **kw), tmp_path / "shards"

    return make


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(drop_prefixes: tuple[str, ...] = ("SLURM_",), **extra: str) -> dict[str, str]:
    """This process's environment for a child run: no launcher or Slurm variables leaking in from
    outside, one thread per process (2 cores), unbuffered output; plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes) and k not in LAUNCHER_VARIABLES}
    return dict(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def read_wandb_run(wandb_dir: Path) -> dict[str, Any]:
    """The one offline run under `wandb_dir`, read with wandb's CLI: run id, config, history by step, summary."""
    runs = read_wandb_runs(wandb_dir)
    assert len(runs) == 1, [r["file"] for r in runs]
    return runs[0]


def read_wandb_runs(wandb_dir: Path) -> list[dict[str, Any]]:
    """Every offline run folder under `wandb_dir` (one per start of a run), oldest first, each read with
    wandb's CLI (``wandb leet inspect --json``): run id, config, history by step, summary."""
    runs = []
    for file in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(file)]
        records = [json.loads(line) for line in subprocess.run(cmd, capture_output=True, text=True, check=True,
                                                               timeout=60).stdout.splitlines() if line.strip()]
        # A start killed with -9 may leave a file with no records at all: its folder still names the id.
        run = next((r["run"] for r in records if r["type"] == "run"), {"run_id": file.stem.removeprefix("run-")})
        config = dict(run.get("config", {}).get("update", {}))
        summary: dict[str, Any] = {}
        for r in records:
            if r["type"] == "config":
                config.update(r["config"].get("update", {}))
            if r["type"] == "summary":
                summary.update(r["summary"].get("update", {}))
        history: dict[int, dict[str, Any]] = {}
        for r in records:
            if r["type"] == "history":
                history.setdefault(int(r["history"]["step"]["num"]), {}).update(r["history"]["item"])
        runs.append({"id": run["run_id"], "project": run.get("project"), "name": run.get("display_name"),
                     "group": run.get("run_group"), "config": config, "history": history, "summary": summary,
                     "file": file})
    return runs


ROOT = Path(__file__).resolve().parents[1]
TINY_SHARDS = {"train": [20, 20, 8], "val": [6], "test": [12]}
"""48 training samples in three shards of unequal size, 6 to evaluate during training, 12 to test."""
TINY_RUN: dict[str, Any] = {
    "data": {"image_size": 16, "channels": 1, "num_workers": 1, "shuffle_block": 16},
    "model": {"name": "test_vit", "patch_size": 8, "num_classes": 2},
    "train": {"micro_batch_size": 4, "warmup_steps": 1, "log_every": 1, "precision": "fp32"},
    "dist": {"deepspeed_config": "cpu_zero2.json"},
    "eval": {"micro_batch_size": 4, "bootstrap": 0},
}
"""The distributed tests' run: a 2-block ViT at 16 px on one channel, fp32, ZeRO-2 on the CPU; a test
merges in only what its case is about (`tiny_run`)."""


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """`TINY_SHARDS` written once a session (the tests read them, never write them)."""
    root = tmp_path_factory.mktemp("tiny") / "shards"
    write_shards(root, TINY_SHARDS, size=16)
    return root


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_run(path: Path, shards: Path, **sections: Any) -> Path:
    """Write `TINY_RUN` reading `shards`, with `sections` merged over it (``train={"steps": 6}``,
    ``out_dir=...``), as YAML at `path`; a DeepSpeed config given by file name is one of ds_configs/."""
    import yaml

    config = _merged(_merged(TINY_RUN, {"data": {"shards": str(shards)}}), sections)
    ds = config["dist"]["deepspeed_config"]
    if "/" not in ds:
        config["dist"]["deepspeed_config"] = str(ROOT / "ds_configs" / ds)
    path.write_text(yaml.safe_dump(config))
    return path


def simulate_kill_after(out: Path, step: int) -> None:
    """Leave a finished run as a kill after `step` would: later checkpoints gone (one torn: DeepSpeed's
    files written, the completion marker not), no final files, metrics rows up to `step` only."""
    import shutil

    ckpts = out / "checkpoints"
    for d in ckpts.glob("step*"):
        if int(d.name[4:12]) > step:
            shutil.rmtree(d)
    torn = ckpts / f"step{step + 1:08d}"
    shutil.copytree(ckpts / f"step{step:08d}", torn)
    (torn / "complete.json").unlink()
    for f in ("model.pt", "eval.json", "done.json"):
        (out / f).unlink()
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line).get("step", 0) <= step]
    (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of RUN_DIR/metrics.jsonl so far (a line still being written is skipped)."""
    return read_metrics(run_dir)[0]


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in metric_rows(run_dir) if "train/loss" in r), default=0)


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step from metrics.jsonl; each step must appear once."""
    rows = [r for r in metric_rows(run_dir) if "train/loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged more than once in {run_dir}: {sorted(steps)}"
    return {r["step"]: r["train/loss"] for r in rows}


# /dev/shm is RAM: DeepSpeed's CPU all-reduce buffers (66 MB a rank) left by runs filled 17 GB in
# one CI run and got it OOM-killed. Any left by this session's runs fail it (and are removed).
_SHM_GLOB = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"


def pytest_sessionstart(session):
    import glob

    session.config._shm_before = set(glob.glob(_SHM_GLOB))


def pytest_sessionfinish(session, exitstatus):
    import glob

    left = sorted(set(glob.glob(_SHM_GLOB)) - getattr(session.config, "_shm_before", set()))
    for f in left:
        os.unlink(f)
    if left:
        print(f"\nruns left DeepSpeed shared-memory buffers in /dev/shm (removed): {left}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
