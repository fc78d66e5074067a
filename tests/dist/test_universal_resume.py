"""Resuming on another number of ranks, for real: ZeRO-1/2/3 checkpoints written by 2 ranks resumed on 1
and written by 1 resumed on 2, through DeepSpeed's universal checkpoint (converted once, beside the
original), with the global batch kept by recomputing the gradient accumulation.

Two levels:

- the engine (`STATE`): a model with a frozen parameter and BatchNorm buffers, which DeepSpeed's
  universal load leaves out; parameters, buffers and frozen weights come back exactly, the next
  optimizer step matches, a save after the universal resume is a normal checkpoint (a plain
  resume of it continues bit for bit), and that save resumes on 2 ranks again;
- `medscale train` end to end (test_vit, fp32): killed after a step on 2 ranks and rerun on 1, and
  a checkpoint the 1-rank rerun wrote rerun on 2. The losses of the following steps match the
  uninterrupted run within rel 1e-5 (measured: at most 8e-8; the reduction order differs, two ranks
  average their gradients and losses by all-reduce where one rank accumulates two micro-batches), and
  the samples of every step, read from the batches the training loop received, are those of the
  uninterrupted run: over the epoch none repeated, none skipped.
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
from conftest import simulate_kill_after, subprocess_env, tiny_run, write_shards

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STAGES = (1, 2, 3)


def _torchrun(n: int) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(free_port())]


def _run(cmd: list[str], timeout: int = 240) -> str:
    r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    return out


# -- the engine: frozen parameters, buffers, optimizer groups, saves after a universal resume ----------

STATE = r'''
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn
from deepspeed.runtime.zero.partition_parameters import GatheredParameters

from medscale.checkpoint.checkpointer import Checkpointer, TrainState
from medscale.config import CheckpointConfig, RunConfig, from_dict
from medscale.dist import init_distributed
from medscale.train.engine import build_engine, resolve_ds_config

mode, root = sys.argv[1], Path(sys.argv[2])
dist = init_distributed()
logging.basicConfig(level=logging.INFO if dist.rank == 0 else logging.WARNING)
cfg = from_dict(RunConfig, {"train": {"micro_batch_size": 4, "grad_accum": 1, "precision": "fp32", "lr": 0.01,
                                       "weight_decay": 0.1, "warmup_steps": 1, "steps": 10}})
GLOBAL = 8  # samples per optimizer step, on any number of ranks


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)  # running statistics: buffers
        self.frozen = nn.Linear(32, 32)
        self.frozen.requires_grad_(False)  # not the optimizer's: universal loading skips it
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        return self.head(torch.relu(self.frozen(torch.relu(self.bn(self.fc1(x))))))


def build(stage, overrides=None):
    torch.manual_seed(0)
    model = Net()
    if mode == "save":  # weights the frozen layer has nowhere else: a resume must read them back
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():
            model.frozen.weight.copy_(torch.randn(32, 32, generator=g) / 6)
    ds = resolve_ds_config(cfg, dist.world, f"ds_configs/cpu_zero{stage}.json", overrides=overrides)
    return build_engine(model, cfg, dist.world, ds)


def step(engine, n):
    """Optimizer step `n`: the same 8 samples on any number of ranks (2 x 4, or 1 x 4 x 2 micro-batches)."""
    g = torch.Generator().manual_seed(1000 + n)
    x, y = torch.randn(GLOBAL, 16, generator=g), torch.randint(0, 2, (GLOBAL,), generator=g)
    per_rank = GLOBAL // dist.world
    total = torch.zeros(())
    for m in range(per_rank // 4):
        lo = dist.rank * per_rank + 4 * m
        loss = nn.functional.cross_entropy(engine(x[lo:lo + 4]), y[lo:lo + 4])
        engine.backward(loss)
        engine.step()
        total += loss.detach()
    torch_dist.all_reduce(total)
    return float(total) / (GLOBAL // 4)


def snapshot(engine):
    """Whole fp32 parameters (gathered under ZeRO-3), buffers, and each optimizer group's hyperparameters."""
    module = engine.module
    with GatheredParameters(list(module.parameters())):
        params = {n: p.detach().float().clone() for n, p in module.named_parameters()}
    groups = [{k: v for k, v in grp.items() if k in ("weight_decay", "lr")} for grp in engine.optimizer.param_groups]
    return {"params": params, "buffers": {n: b.clone() for n, b in module.named_buffers()}, "groups": groups}


def same(a, b, what, exact=True):
    """Equal snapshots; or, after a step on another number of ranks, parameters within reduction-order
    noise (BatchNorm statistics are per rank: rank 0 saw 4 samples of the step on 2 ranks, 8 on 1)."""
    for part in ("params", "buffers") if exact else ("params",):
        for k, v in a[part].items():
            if exact:
                assert torch.equal(v, b[part][k]), (what, part, k, (v - b[part][k]).abs().max())
            else:
                torch.testing.assert_close(b[part][k], v, rtol=1e-5, atol=1e-7, msg=f"{what} {part} {k}")
    assert a["groups"] == b["groups"], (what, a["groups"], b["groups"])


def checkpointer(stage):
    return Checkpointer(CheckpointConfig(every_steps=1, keep=5), root / f"zero{stage}", dist, last_step=10,
                        config={"train": {"grad_accum": 1}})


for stage in (1, 2, 3):
    ck = checkpointer(stage)
    plan = ck.prepare_resume(cfg.train)
    engine = build(stage, plan.ds_overrides)
    state = TrainState()
    if mode == "save":  # 2 ranks: steps 1-2, checkpoint 2, then what step 3 gives
        assert plan.path is None
        for n in (1, 2):
            step(engine, n)
        state.step = 2
        ck.save(engine, 2, {"train": state})
        saved = snapshot(engine)
        loss3 = step(engine, 3)
        after = snapshot(engine)
        if dist.is_main:
            torch.save({"saved": saved, "loss3": loss3, "after3": after}, root / f"zero{stage}" / "expect_2.pt")
    elif mode == "resume":  # 1 rank: from the 2-rank checkpoint, through its universal form
        expect = torch.load(root / f"zero{stage}" / "expect_2.pt", weights_only=False)
        assert plan.saved_world == 2 and plan.grad_accum == 2 and plan.universal.name == "step00000002_universal"
        assert engine.gradient_accumulation_steps() == 2 and engine.train_batch_size() == GLOBAL
        assert ck.resume(engine, {"train": state}).name == "step00000002" and state.step == 2
        assert not engine._config.load_universal_checkpoint and "load_universal" not in engine.config.get("checkpoint", {})
        same(expect["saved"], snapshot(engine), f"zero{stage} universal resume")
        loss3 = step(engine, 3)
        assert abs(loss3 - expect["loss3"]) <= 1e-6 * abs(expect["loss3"]), (loss3, expect["loss3"])
        same(expect["after3"], snapshot(engine), f"zero{stage} step 3 after the universal resume", exact=False)
        state.step = 3
        ck.save(engine, 3, {"train": state})  # written by 1 rank, by an engine that loaded a universal checkpoint
        saved3 = snapshot(engine)
        loss4 = step(engine, 4)
        after4 = snapshot(engine)
        torch.save({"saved": saved3, "loss4": loss4, "after4": after4}, root / f"zero{stage}" / "expect_1.pt")
        # a plain resume of that save, on the same number of ranks, continues it bit for bit (and keeps
        # its global batch: train.grad_accum=1 is recomputed to the 2 the checkpoint ran with)
        plain = checkpointer(stage)
        plan2 = plain.prepare_resume(cfg.train)
        assert plan2.universal is None and plan2.grad_accum == 2, plan2
        again = build(stage, plan2.ds_overrides)
        state2 = TrainState()
        assert plain.resume(again, {"train": state2}).name == "step00000003" and state2.step == 3
        same(saved3, snapshot(again), f"zero{stage} plain resume after the universal one")
        assert step(again, 4) == loss4
        same(after4, snapshot(again), f"zero{stage} step 4 after the plain resume")
    else:  # "grow", 2 ranks: from the 1-rank checkpoint 3
        expect = torch.load(root / f"zero{stage}" / "expect_1.pt", weights_only=False)
        assert plan.saved_world == 1 and plan.grad_accum is None and plan.universal.name == "step00000003_universal"
        assert engine.gradient_accumulation_steps() == 1 and engine.train_batch_size() == GLOBAL
        assert ck.resume(engine, {"train": state}).name == "step00000003" and state.step == 3
        same(expect["saved"], snapshot(engine), f"zero{stage} universal resume on 2 ranks")
        loss4 = step(engine, 4)
        assert abs(loss4 - expect["loss4"]) <= 1e-6 * abs(expect["loss4"]), (loss4, expect["loss4"])
        same(expect["after4"], snapshot(engine), f"zero{stage} step 4 on 2 ranks", exact=False)
    del engine
print("OK", mode)
'''


def test_engine_state_survives_a_change_of_ranks(tmp_path):
    """Parameters, BatchNorm buffers, a frozen layer and per-group weight decay come back exactly on 1 rank
    from 2 and on 2 from 1, under ZeRO-1, -2 and -3; the next step matches; a save after a universal
    resume is a normal checkpoint."""
    script = tmp_path / "state.py"
    script.write_text(STATE)
    assert "OK save" in _run([*_torchrun(2), str(script), "save", str(tmp_path)])
    # what a conversion killed half-way leaves (under ZeRO-1): never taken for a finished one
    ckpts = tmp_path / "zero1" / "checkpoints"
    half = ckpts / "step00000002_universal.partial" / "step00000002_universal" / "zero" / "fc1.weight"
    half.mkdir(parents=True)
    torch.save({"param": torch.zeros(32, 16)}, half / "fp32.pt")
    shutil.copytree(half.parents[1], ckpts / "step00000002_universal")  # even under the final name, unmarked
    log = _run([sys.executable, str(script), "resume", str(tmp_path)])
    assert "OK resume" in log and log.count("converted step00000002 to step00000002_universal") == 3
    assert "restored 3 buffers and 2 frozen parameters" in log
    assert "OK grow" in _run([*_torchrun(2), str(script), "grow", str(tmp_path)])
    for stage in STAGES:
        folder = tmp_path / f"zero{stage}" / "checkpoints"
        assert (folder / "step00000002_universal" / "medscale_universal.json").exists()
        assert (folder / "latest_universal").read_text() == "step00000003_universal"
        assert not list(folder.glob("*.partial"))


# -- medscale train end to end: killed on 2 ranks, rerun on 1; a 1-rank checkpoint rerun on 2 ---------

# The batches the training loop received, as they left the real loader (the keys of every sample and
# the stream position after the batch), one JSON line per batch, per rank. Everything else is
# `medscale train` as the CLI runs it.
KEYLOG = r'''
import json
import os
import sys

from medscale.data import loader

_iter = loader.StreamLoader.__iter__


def _logged(self):
    path = f"{os.environ['MEDSCALE_TEST_KEYLOG']}.rank{os.environ.get('RANK', '0')}"
    for batch in _iter(self):
        if self.stream.train:
            with open(path, "a") as f:
                f.write(json.dumps({"epoch": self.stream.epoch, "end": self.stream.position, "keys": batch["key"],
                                    "valid": batch["valid"].tolist()}) + "\n")
        yield batch


loader.StreamLoader.__iter__ = _logged
from medscale.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
'''

GLOBAL_BATCH = 8  # micro-batch 4 x 2 ranks, or 4 x 2 accumulated on 1 rank
STEPS = 4  # the 32 training samples make one epoch of 4 steps


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("universal") / "shards"
    write_shards(root, {"train": [12, 12, 8], "val": [6], "test": [8]}, size=16)
    return root


def _config(tmp: Path, shards: Path, stage: int) -> Path:
    return tiny_run(tmp / f"zero{stage}.yaml", shards,
                    train={"steps": STEPS, "grad_accum": 1, "warmup_steps": 2, "ema_decay": 0.7},
                    dist={"deepspeed_config": f"cpu_zero{stage}.json"}, eval={"bootstrap": 10, "aggregate": "patient"},
                    checkpoint={"every_steps": 1, "keep": 5})


def _train(config: Path, out: Path, ranks: int, keylog: Path) -> str:
    script = out.parent / "keylog.py"
    script.write_text(KEYLOG)
    launcher = _torchrun(ranks) if ranks > 1 else [sys.executable]
    cmd = [*launcher, str(script), "train", "--config", str(config), f"out_dir={out}"]
    r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(MEDSCALE_TEST_KEYLOG=str(keylog)), capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return r.stdout + r.stderr




def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def _steps(keylog: Path) -> dict[int, list[str]]:
    """The sample keys of every optimizer step, over all ranks, from the logged batches."""
    steps: dict[int, list[str]] = {}
    for f in sorted(keylog.parent.glob(keylog.name + ".rank*")):
        for line in f.read_text().splitlines():
            b = json.loads(line)
            assert all(b["valid"]), b
            step = b["epoch"] * STEPS + -(-b["end"] // GLOBAL_BATCH)  # the step this batch's samples went into
            steps.setdefault(step, []).extend(b["keys"])
    return steps


def _close(a: dict[int, float], b: dict[int, float]) -> None:
    for step, loss in b.items():
        assert abs(loss - a[step]) <= 1e-5 * abs(a[step]), (step, loss, a[step])


@pytest.mark.parametrize("stage", STAGES)
def test_train_resumes_on_another_number_of_ranks(tmp_path, shards, stage):
    """ZeRO-`stage`: 2 ranks killed after step 2, rerun on 1 rank; that rerun killed after step 3 (a
    checkpoint written by 1 rank, by an engine that loaded a universal checkpoint), rerun on 2 ranks.
    Both reruns continue the uninterrupted 2-rank run: the same samples in every step, the losses within
    rel 1e-5 (measured: 8e-8), final weights and EMA within reduction-order noise."""
    config = _config(tmp_path, shards, stage)
    whole = tmp_path / "whole"
    _train(config, whole, 2, tmp_path / "keys_whole")
    full = _steps(tmp_path / "keys_whole")
    assert sorted(full) == [1, 2, 3, 4] and all(len(v) == GLOBAL_BATCH for v in full.values())
    epoch = [k for v in full.values() for k in v]
    assert len(set(epoch)) == len(epoch) == 32  # the whole split, once

    one = tmp_path / "one"  # killed after step 2 on 2 ranks, rerun on 1
    shutil.copytree(whole, one)
    simulate_kill_after(one, 2)
    log = _train(config, one, 1, tmp_path / "keys_one")
    assert "converted step00000002 to step00000002_universal" in log, log[-3000:]
    assert "gradient accumulation 2 (train.grad_accum=1 recomputed" in log
    assert "through step00000002_universal" in log
    seen = _steps(tmp_path / "keys_one")
    assert sorted(seen) == [3, 4] and all(sorted(seen[s]) == sorted(full[s]) for s in seen)
    _close(_losses(whole), _losses(one))
    assert sorted(_losses(one)) == [1, 2, 3, 4]

    two = tmp_path / "two"  # the 1-rank rerun killed after step 3, rerun on 2
    shutil.copytree(one, two)
    simulate_kill_after(two, 3)
    log = _train(config, two, 2, tmp_path / "keys_two")
    assert "converted step00000003 to step00000003_universal" in log, log[-3000:]
    assert "through step00000003_universal" in log
    seen = _steps(tmp_path / "keys_two")
    assert sorted(seen) == [4] and sorted(seen[4]) == sorted(full[4])
    _close(_losses(whole), _losses(two))

    # atol 1e-5 is 1% of one Adam step at train.lr=1e-3: the attention key bias gets a true gradient of
    # zero (softmax ignores a shift), so Adam, which normalises the gradient, moves it by rounding noise
    # that depends on the reduction order (measured: up to 2e-6 under ZeRO-3; every other tensor < 1e-6).
    a = torch.load(whole / "model.pt", weights_only=True)
    for run in (one, two):
        b = torch.load(run / "model.pt", weights_only=True)
        for part in ("model", "model_ema"):
            for k, v in a[part].items():
                torch.testing.assert_close(b[part][k], v, rtol=1e-5, atol=1e-5, msg=f"{run.name} {part} {k}")
