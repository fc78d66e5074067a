"""Under bf16 the EMA averages the fp32 master weights (not their bf16 rounding), on 1 and 2 real ranks,
at ZeRO-2 (fragments of the master) and ZeRO-3 (partitions of it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medscale.dist import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS, DECAY = 5, 0.6

RANK = r"""
import json, sys, torch
from deepspeed.utils import safe_get_full_fp32_param
from medscale.config import RunConfig, from_dict
from medscale.dist import init_distributed, shutdown
from medscale.models import create_model
from medscale.train.ema import ModelEma
from medscale.train.engine import build_engine, resolve_ds_config

stage, out = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
dist = init_distributed(timeout_minutes=2)
torch.manual_seed(0)
cfg = from_dict(RunConfig, {"model": {"name": "test_vit", "patch_size": 8, "num_classes": 2},
                            "train": {"micro_batch_size": 2, "precision": "bf16", "lr": 3e-3, "warmup_steps": 1}})
engine = build_engine(create_model(cfg.model, img_size=16, in_chans=1), cfg, dist.world,
                      resolve_ds_config(cfg, dist.world, f"ds_configs/cpu_zero{stage}.json"))
ema = ModelEma(engine, DECAY)
ref = {n: safe_get_full_fp32_param(p).float().clone() for n, p in engine.module.named_parameters()}
old = {n: v.clone() for n, v in ref.items()}  # an EMA of what the bf16 module holds: the masters rounded
g = torch.Generator().manual_seed(1)
for step in range(STEPS):
    x = torch.randn(2 * dist.world, 1, 16, 16, generator=g)[2 * dist.rank:2 * dist.rank + 2]
    engine.backward(engine(x.bfloat16()).float().pow(2).mean())
    engine.step()
    ema.update()
    for n, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p).float()
        ref[n].lerp_(master, 1 - DECAY)
        old[n].lerp_(master.bfloat16().float(), 1 - DECAY)
got = ema.state_dict()["params"]
err = max((got[n] - ref[n]).abs().max().item() for n in ref)
rounded = max((got[n] - old[n]).abs().max().item() for n in ref)
if dist.is_main:
    json.dump({"err": err, "rounded": rounded}, open(out, "w"))
shutdown()
""".replace("DECAY", repr(DECAY)).replace("STEPS", repr(STEPS))



@pytest.mark.parametrize("stage,world", [(2, 1), (2, 2), (3, 2)])
def test_bf16_ema_averages_fp32_master_weights(tmp_path, stage, world):
    out, port = tmp_path / "r.json", free_port()
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(stage), str(out)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for r in range(world)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [log[-3000:] for log in logs]
    r = json.loads(out.read_text())
    assert r["err"] < 1e-6, r  # the EMA of the fp32 masters, up to float rounding of the lerp
    assert r["rounded"] > 1e-4, r  # ...and measurably not the EMA of the bf16-rounded weights
