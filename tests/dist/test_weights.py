"""The final weights of a bf16 run are the fp32 master weights, at every ZeRO stage, and they travel with
their preprocessing record; `medscale eval` builds its model from that record alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import subprocess_env, tiny_run, write_shards

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]



@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights") / "shards"
    write_shards(root, {"train": [16, 16], "val": [4], "test": [8]}, size=16)
    return root


def _train(tmp: Path, shards: Path, stage: int) -> Path:
    out = tmp / f"zero{stage}"
    path = tiny_run(tmp / f"zero{stage}.yaml", shards, out_dir=str(out), data={"num_workers": 0},
                    train={"steps": 4, "lr": 1e-3, "log_every": 2, "precision": "bf16", "ema_decay": 0.5},
                    dist={"deepspeed_config": f"cpu_zero{stage}.json"})
    r = subprocess.run([sys.executable, "-m", "medscale.cli", "train", "--config", str(path)], cwd=tmp, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards):
    """One finished bf16 run per ZeRO stage, trained on first use."""
    tmp, done = tmp_path_factory.mktemp("runs"), {}

    def get(stage: int) -> Path:
        if stage not in done:
            done[stage] = _train(tmp, shards, stage)
        return done[stage]

    return get


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_run_saves_fp32_master_weights(runs, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = runs(stage)
    saved = torch.load(out / "model.pt", weights_only=True)
    weights = saved["model"]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    if stage > 1:
        # DeepSpeed's own consolidation of the final checkpoint's fp32 partitions is the reference.
        # (bf16 at ZeRO-1 runs DeepSpeed's BF16_Optimizer, whose files zero_to_fp32 does not read.)
        master = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)
        for name, value in master.items():
            assert value.dtype == torch.float32
            assert torch.equal(weights[name], value), name
    else:
        # The bf16 module DeepSpeed checkpointed is the fp32 master rounded to bf16.
        module = torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        for name, value in module.items():
            assert value.dtype == torch.bfloat16
            assert torch.equal(weights[name].bfloat16(), value), name
    # bf16-rounded weights (what the module holds) would all survive a round trip through bf16.
    matrices = [v for k, v in weights.items() if v.ndim == 2]
    off_grid = sum(int((v != v.bfloat16().float()).sum()) for v in matrices)
    assert off_grid > 0.5 * sum(v.numel() for v in matrices)
    assert saved["model_ema"].keys() == weights.keys()

    record = json.loads((out / "preprocess.json").read_text())
    assert record == saved["preprocess"]
    assert record["model"]["name"] == "test_vit" and record["image_size"] == 16 and record["channels"] == 1
    assert record["class_names"] == ["normal", "lesion"] and record["task"] == "multiclass"


def test_eval_builds_the_model_from_the_preprocess_record(tmp_path, runs):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(runs(2), out)
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace("test_vit", "no_such_model"))
    from medscale.checkpoint.weights import load_run_model

    model, record = load_run_model(out)
    assert type(model).__name__ == "VisionTransformer" and record["model"]["patch_size"] == 8
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert model(x).shape == (2, 2)
