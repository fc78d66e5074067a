"""``train.compile``: the same training with torch.compile (inductor, on the CPU here) as without it.

Real runs of `medscale train` in one process each (DeepSpeed ZeRO-2, fp32, EMA, checkpoints, the
final evaluation): the compiled run's losses match the eager run's, its ``model.pt`` has the plain
parameter names and loads into the plain model, and an eager run's checkpoint resumes under
compile and continues as the eager run did (checkpoints are interchangeable both ways).

Inductor's first compilation costs about 30-40 s on 2 cores (later runs hit its on-disk cache).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import losses, simulate_kill_after, subprocess_env, write_shards

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None, reason="inductor on the CPU needs g++")


def _config(tmp: Path, shards: Path) -> Path:
    config = {
        "data": {"shards": str(shards), "image_size": 16, "channels": 1, "num_workers": 0, "shuffle_block": 16},
        "model": {"name": "test_vit3", "patch_size": 8, "num_classes": 2},
        "train": {"steps": STEPS, "micro_batch_size": 4, "warmup_steps": 1, "log_every": 1, "precision": "fp32",
                  "ema_decay": 0.7},
        "dist": {"nproc": 1, "deepspeed_config": str(ROOT / "ds_configs" / "cpu_zero2.json")},
        "eval": {"micro_batch_size": 4, "bootstrap": 0},
        "checkpoint": {"every_steps": 2, "keep": 3},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(config: Path, out: Path, compile_: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "medscale.cli", "train", "--config", str(config), f"out_dir={out}",
           f"train.compile={str(compile_).lower()}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-5000:]
    return out


@needs_cxx
def test_compiled_training_matches_eager_and_keeps_parameter_names(tmp_path):
    from medscale.checkpoint.weights import load_run_model

    shards = tmp_path / "shards"
    write_shards(shards, {"train": [12, 12], "val": [4], "test": [8]}, size=16)
    config = _config(tmp_path, shards)
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    # Side by side: the compiled run spends most of its time in inductor, the eager one is short.
    runs = [_start(config, eager, False), _start(config, compiled, True)]
    logs = [_finish(p) for p in runs]
    assert "compiled with torch.compile" in logs[1] and "compiled with torch.compile" not in logs[0]

    a, b = losses(eager), losses(compiled)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    # Inductor fuses and reorders fp32 reductions: the same numbers up to rounding.
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)

    plain = torch.load(eager / "model.pt", weights_only=True)
    comp = torch.load(compiled / "model.pt", weights_only=True)
    for part in ("model", "model_ema"):
        assert list(comp[part]) == list(plain[part]), part
        assert not [k for k in comp[part] if "_orig_mod" in k], part
        for k, v in plain[part].items():
            torch.testing.assert_close(comp[part][k], v, rtol=1e-3, atol=1e-4, msg=f"{part} {k}")
    # What export and `medscale eval` do: the plain timm model, strict load of the EMA weights.
    model, record = load_run_model(compiled)
    assert record["model"]["name"] == "test_vit3"
    assert set(model.state_dict()) == set(comp["model_ema"])
    ckpt = next((compiled / "checkpoints").glob("step*/**/mp_rank_00_model_states.pt"))
    states = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert set(states["module"]) == set(plain["model"]), "DeepSpeed checkpoint names differ under compile"

    # An eager run's checkpoint resumes under compile and trains on as the eager run did.
    resumed = tmp_path / "resumed"
    shutil.copytree(eager, resumed)
    simulate_kill_after(resumed, 2)
    log = _finish(_start(config, resumed, True))
    assert "resumed from" in log and "step00000002" in log
    assert losses(resumed) == pytest.approx(a, rel=1e-4, abs=1e-5)


def test_compile_on_cpu_without_a_compiler_is_a_clear_error(monkeypatch):
    from medscale.config import ConfigError
    from medscale.train import engine as engine_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(engine_mod.shutil, "which", lambda name: None)

    class NeverCompiled:
        def compile(self, **kw):
            raise AssertionError("compile() must not be reached without a compiler")

    with pytest.raises(ConfigError, match="train.compile=true on a CPU needs a C\\+\\+ compiler"):
        engine_mod._compile(NeverCompiled())
