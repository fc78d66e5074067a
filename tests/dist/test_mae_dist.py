"""MAE pretraining (``train.objective=mae``) in real processes on unlabeled shards.

- 2 ranks of ZeRO-2 (micro-batch 2) train the same losses as one process (micro-batch 4): the same
  global batch, the same per-sample masks (drawn from ``batch["seed"]``), within float tolerance.
- SIGKILL to the 2-rank job's process group mid-run, then the same command: every step's loss equals
  the uninterrupted run's bitwise.
- One process, ZeRO-3 bf16 with EMA and offline W&B: the reconstruction figure goes to the report
  and to W&B; ``medscale export --encoder-only`` writes the encoder under the plain timm key names,
  and a classification fine-tuning run with ``model.weights=`` that file and layer decay loads it
  (head and attention pool fresh) and trains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import last_step, losses, subprocess_env, tiny_run, write_shards
from medscale.dist import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS = 30


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Labeled shards (for the fine-tuning run) and the same images as an unlabeled corpus."""
    base = tmp_path_factory.mktemp("mae")
    labeled = base / "labeled"
    manifest = write_shards(labeled, {"train": [20, 20, 8], "val": [6], "test": [12]}, size=32)
    unlabeled = base / "unlabeled"
    unlabeled.mkdir()
    for tar in labeled.iterdir():
        if tar.name != "manifest.json":
            (unlabeled / tar.name).symlink_to(tar)
    (unlabeled / "manifest.json").write_text(json.dumps(dict(manifest, task="unlabeled", classes=[])))
    return {"labeled": labeled, "unlabeled": unlabeled}


def _config(tmp: Path, shards: Path, **train) -> Path:
    train = {"objective": "mae", "steps": STEPS, "warmup_steps": 2, **train}
    # The mae section belongs to the mae objective: a fine-tuning config has none (it would be refused).
    mae = {"mask_ratio": 0.75, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "samples": 4}
    return tiny_run(tmp / f"run{len(list(tmp.glob('run*.yaml')))}.yaml", shards, data={"image_size": 32},
                    model={"name": "test_vit3", "num_classes": 2}, train=train,
                    **({"mae": mae} if train["objective"] == "mae" else {}),
                    dist={"master_port": free_port()}, eval={"every_steps": 10, "bootstrap": 200},
                    checkpoint={"every_steps": 4, "keep": 2})


def _cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medscale.cli", "train", "--config", str(config), f"out_dir={out}", *extra]


def _run(cmd: list[str], env: dict | None = None) -> str:
    r = subprocess.run(cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return r.stdout + r.stderr


def test_two_ranks_match_one_process_and_sigkill_resumes_exactly(tmp_path, shards):
    one = tmp_path / "one"
    _run(_cmd(_config(tmp_path, shards["unlabeled"]), one))
    two_cmd = _cmd(_config(tmp_path, shards["unlabeled"], micro_batch_size=2), tmp_path / "two", "dist.nproc=2")
    log = _run(two_cmd)
    assert "2 ranks" in log
    a, b = losses(one), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    first = range(1, 11)  # the first steps, before float differences of the reduction order can grow
    assert [b[s] for s in first] == pytest.approx([a[s] for s in first], rel=1e-4, abs=1e-5)
    assert a[STEPS] < a[1]  # it learns
    for run in (one, tmp_path / "two"):
        result = json.loads((run / "eval.json").read_text())
        assert result["objective"] == "mae" and result["n_samples"] == 12 and result["duplicates_dropped"] == 0
    assert json.loads((one / "eval.json").read_text())["loss"] == pytest.approx(
        json.loads((tmp_path / "two" / "eval.json").read_text())["loss"], rel=1e-3)

    # SIGKILL the 2-rank job (launcher, ranks, loader workers) mid-run; the same command continues it
    killed = tmp_path / "killed"
    cmd = [c.replace(str(tmp_path / "two"), str(killed)) for c in two_cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while last_step(killed) < 9:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "done.json").exists()
    log = _run(cmd)
    assert "resumed from" in log
    assert losses(killed) == b  # bitwise, each step once


def test_zero3_bf16_ema_export_encoder_then_fine_tune(tmp_path, shards):
    wandb_dir = tmp_path / "wandb_home"
    wandb_dir.mkdir()
    env = subprocess_env(("SLURM_", "WANDB_"), WANDB_MODE="offline", WANDB_DIR=str(wandb_dir),
                         WANDB_CONFIG_DIR=str(wandb_dir / "config"), WANDB_SILENT="true")
    pre = tmp_path / "pretrain"
    config = _config(tmp_path, shards["unlabeled"], steps=10, precision="bf16", ema_decay=0.8)
    _run(_cmd(config, pre, f"dist.deepspeed_config={ROOT / 'ds_configs' / 'cpu_zero3.json'}", "logging.wandb=true",
              "checkpoint.every_steps=5"), env)
    result = json.loads((pre / "eval.json").read_text())
    assert result["weights"] == "ema" and result["loss"] > 0
    images = list((wandb_dir / "wandb").glob("offline-run-*/files/media/images/**/reconstructions*.png"))
    assert len(images) >= 4, images  # 4 strips per evaluation: val at step 10, then test
    r = subprocess.run([sys.executable, "-m", "medscale.cli", "report", str(pre)], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (pre / "report" / "reconstructions.png").exists(), r.stderr[-2000:]
    # `medscale eval` evaluates the run with its own objective: the reconstruction loss, no labels read
    r = subprocess.run([sys.executable, "-m", "medscale.cli", "eval", "--run", str(pre)], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    again = json.loads((pre / "eval_test.json").read_text())
    assert again["objective"] == "mae" and again["n_samples"] == result["n_samples"]
    assert again["loss"] == pytest.approx(result["loss"], rel=0.05)  # fp32 here, bf16 in training; same masks

    # the encoder alone, under the plain timm model's names, from model.pt and from a ZeRO-3 checkpoint
    enc = tmp_path / "encoder"
    cmd = [sys.executable, "-m", "medscale.cli", "export", str(pre), "--out"]
    r = subprocess.run([*cmd, str(enc)], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--encoder-only" in r.stderr, r.stderr[-2000:]  # an MAE run exports its encoder
    # --encoder-only is --part encoder (the objective's part): both spellings, for real
    for out, extra in ((enc, ["--encoder-only"]), (tmp_path / "encoder_ckpt", ["--part", "encoder", "--checkpoint",
                                                                              "latest", "--no-ema"])):
        r = subprocess.run([*cmd, str(out), *extra], cwd=ROOT, env=subprocess_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    import timm

    exported = load_file(str(enc / "model.safetensors"))
    saved = torch.load(pre / "model.pt", weights_only=True)["model_ema"]
    plain = timm.create_model("test_vit3", num_classes=0, global_pool="", in_chans=1, img_size=32, patch_size=8)
    assert set(exported) == set(plain.state_dict())  # nothing of the decoder, nothing missing
    for k, v in exported.items():
        assert torch.equal(v, saved[f"encoder.{k}"]), k
    trained = load_file(str(tmp_path / "encoder_ckpt" / "model.safetensors"))
    saved = torch.load(pre / "model.pt", weights_only=True)["model"]
    for k, v in trained.items():
        assert torch.equal(v, saved[f"encoder.{k}"]), k

    # fine-tune a classifier from it with layer decay, at another image size (pos-embed resized)
    ft = tmp_path / "finetune"
    config = _config(tmp_path, shards["labeled"], objective="classification", steps=2, layer_decay=0.75)
    log = _run(_cmd(config, ft, f"model.weights={enc / 'model.safetensors'}", "model.num_classes=2",
                    "data.image_size=48", "eval.every_steps=0", "checkpoint.every_steps=0"))
    assert "resized pos_embed to grid (6, 6)" in log and "missing" in log
    assert 0 <= json.loads((ft / "eval.json").read_text())["auroc"] <= 1
    tuned = torch.load(ft / "model.pt", weights_only=True)["config"]
    assert tuned["model"]["weights"].endswith("model.safetensors")
