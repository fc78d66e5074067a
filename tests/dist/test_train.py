"""`medscale train` end to end in real processes: exact resume from the newest complete checkpoint
(one process, and 2 ZeRO-3 ranks with EMA), non-finite losses skipped on the real engine, and
`medscale eval` (medscale.commands.evaluate) on a finished run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medscale.dist import free_port
from conftest import simulate_kill_after, subprocess_env, tiny_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent




@pytest.fixture(scope="module")
def shards(tiny_shards):
    return tiny_shards


def _config(tmp: Path, shards: Path, **train) -> Path:
    return tiny_run(tmp / f"run{len(list(tmp.glob('run*.yaml')))}.yaml", shards,
                    train={"steps": 6, "warmup_steps": 2, "ema_decay": 0.7, **train},
                    eval={"bootstrap": 10, "aggregate": "patient"}, checkpoint={"every_steps": 2, "keep": 3})


def _train(config: Path, out: Path, *extra: str, launcher: list[str] | None = None) -> str:
    cmd = [*(launcher or [sys.executable, "-m"]), "medscale.cli", "train", "--config", str(config), f"out_dir={out}",
           *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return r.stdout + r.stderr


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}




def test_resume_continues_exactly(tmp_path, shards):
    """Killed after step 4 (a torn checkpoint 5 on disk), the rerun of the same command continues from
    checkpoint 4 and trains steps 5-6 exactly as the uninterrupted run did: weights, optimizer,
    schedule, EMA, loader position and RNG all came back."""
    config = _config(tmp_path, shards)
    whole = tmp_path / "whole"
    _train(config, whole)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    simulate_kill_after(resumed, 4)
    log = _train(config, resumed)
    assert "resumed from" in log and "step00000004" in log
    assert _losses(resumed) == _losses(whole)
    a = torch.load(whole / "model.pt", weights_only=True)
    b = torch.load(resumed / "model.pt", weights_only=True)
    for part in ("model", "model_ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    result = json.loads((resumed / "eval.json").read_text())
    assert result == json.loads((whole / "eval.json").read_text())
    assert result["weights"] == "ema" and result["patient_level"]["n_groups"] == result["n_patients"]

    # `medscale eval` on the finished run: the EMA weights, the same metrics as at the end of training
    out = tmp_path / "eval_test.json"
    code = (f"from medscale.commands import evaluate; evaluate({str(whole)!r}, output={str(out)!r})")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(out.read_text())
    assert again["auroc"] == pytest.approx(result["auroc"]) and again["n_samples"] == result["n_samples"]


def test_zero3_two_ranks_resume_with_ema(tmp_path, shards):
    """2 ZeRO-3 ranks under torchrun: each rank's EMA partition goes into the checkpoint consolidated and
    comes back into the partitions on resume."""
    config = _config(tmp_path, shards, steps=4)
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m"]
    zero3 = f"dist.deepspeed_config={ROOT / 'ds_configs' / 'cpu_zero3.json'}"
    whole = tmp_path / "whole"
    assert "2 ranks" in _train(config, whole, zero3, launcher=torchrun)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    simulate_kill_after(resumed, 2)
    torchrun[4] = str(free_port())
    assert "step00000002" in _train(config, resumed, zero3, launcher=torchrun)
    assert _losses(resumed) == pytest.approx(_losses(whole), rel=1e-6, abs=1e-7)
    a = torch.load(whole / "model.pt", weights_only=True)["model_ema"]
    b = torch.load(resumed / "model.pt", weights_only=True)["model_ema"]
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-6, msg=k)


NONFINITE = r"""
import torch
from medscale.config import RunConfig, from_dict
from medscale.dist import init_distributed
from medscale.train.engine import build_engine, resolve_ds_config
from medscale.train.numerics import NumericsGuard
from medscale.tasks.base import build_task
from medscale.models import create_model
from medscale.train.loop import train_step

init_distributed()
cfg = from_dict(RunConfig, {"model": {"name": "test_vit", "patch_size": 8, "num_classes": 2},
                            "train": {"micro_batch_size": 4, "grad_accum": 2, "precision": "fp32", "max_nonfinite": 2}})
engine = build_engine(create_model(cfg.model, img_size=16, in_chans=1), cfg, 1,
                      resolve_ds_config(cfg, 1, "ds_configs/cpu_zero2.json"))
guard = NumericsGuard(engine, cfg.train, 1)
task = build_task(cfg, {"task": "multiclass", "classes": ["a", "b"]})
good = {"image": torch.randn(4, 1, 16, 16), "target": torch.tensor([0, 1, 0, 1]), "valid": torch.ones(4, dtype=torch.bool)}
bad = dict(good, image=torch.full((4, 1, 16, 16), float("nan")))
before = [p.detach().clone() for p in engine.module.parameters()]
r1 = train_step(engine, good, task, guard)      # first micro-batch of the step
r2 = train_step(engine, bad, task, guard)       # skipped: no backward, no step
assert r1.loss is not None and not r1.stepped and r2 == (None, False), (r1, r2)
assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
r3 = train_step(engine, good, task, guard)      # completes the accumulation: one clean step
assert r3.stepped and engine.global_steps == 1 and engine.was_step_applied()
assert all(torch.isfinite(p).all() for p in engine.module.parameters())
train_step(engine, bad, task, guard)
try:
    train_step(engine, bad, task, guard)
except FloatingPointError as e:
    print("STOPPED:", e)
"""


def test_nonfinite_loss_skips_micro_batch_then_stops(tmp_path):
    r = subprocess.run([sys.executable, "-c", NONFINITE], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "STOPPED: 2 non-finite losses in a row" in r.stdout
