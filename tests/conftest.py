"""Shared fixtures: tiny shard sets written with the real codec and tar writer (with indexes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medscale.formats.codec import encode_pixels, extension_for
from medscale.formats.manifest import MANIFEST_VERSION
from medscale.formats.tar import ShardSequence

NO_ROLLOVER = 1 << 62  # shard_bytes: one shard per count, whatever its size


def write_shards(root: Path, sizes: dict[str, list[int]], *, size: int = 16, classes=("normal", "lesion"),
                 seed: int = 0) -> dict:
    """Write shards with the given per-shard sample counts per split and a matching manifest.

    Shards are written by prep's writer (`medscale.formats.tar.ShardSequence`), so each has its
    member-offset index beside it, as prep's do.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    n = 0
    for split, counts in sizes.items():
        for i, count in enumerate(counts):
            seq = ShardSequence(root, split, i, NO_ROLLOVER)  # names it f"{split}-{i:06d}-00.tar"
            for _ in range(count):
                pixels = rng.integers(-1000, 1000, (size, size)).astype(np.int16)
                data, info = encode_pixels(pixels, "zstd")
                label = int(rng.integers(len(classes)))
                meta = {"pixels": info, "label": label, "patient": f"p{n // 3}", "split": split}
                seq.add(f"s{n:06d}", {"json": json.dumps(meta).encode(), extension_for("zstd"): data}, label)
                n += 1
            shards += seq.close()  # path, split, samples, bytes, sha256, label_counts ({}), index
    manifest = {"version": MANIFEST_VERSION, "task": "multiclass", "classes": list(classes), "shards": shards,
                "splits": {s: {"samples": sum(c)} for s, c in sizes.items()}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


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
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written
    return rows


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
