"""Resuming on another number of ranks, the parts that need no process group: the global batch kept by
the recomputed accumulation (and the message when it cannot be), the DeepSpeed config overrides, and
what marks a universal conversion finished. The real conversions and loads are in
tests/dist/test_universal_resume.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medscale.checkpoint import universal
from medscale.checkpoint.checkpointer import COMPLETE, Checkpointer, ResumePlan
from medscale.config import CheckpointConfig, ConfigError, RunConfig, TrainConfig, from_dict
from medscale.dist import DistInfo

ROOT = Path(__file__).resolve().parents[2]


def _saved(global_batch: int, world: int, micro: int = 4) -> universal.SavedRun:
    return universal.SavedRun(world, 2, micro, global_batch // (micro * world), global_batch)


def test_accumulation_keeps_the_global_batch():
    assert universal.grad_accum_for(_saved(32, 2), 4, 1, Path("ck")) == 8
    assert universal.grad_accum_for(_saved(32, 2), 4, 8, Path("ck")) == 1
    assert universal.grad_accum_for(_saved(32, 1, micro=8), 2, 4, Path("ck")) == 4


def test_a_global_batch_that_cannot_be_kept_names_what_can():
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=4 \(accumulation 2\)"):
        universal.grad_accum_for(_saved(24, 2), 5, 3, Path("ck"))  # 8 per rank: 4, 2 or 1
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=3 \(accumulation 2\)"):
        universal.grad_accum_for(_saved(24, 2), 4, 4, Path("ck"))  # 6 per rank: 3, 2 or 1
    with pytest.raises(ConfigError, match=r"resume on \[1, 2\] ranks"):
        universal.grad_accum_for(_saved(8, 2), 4, 3, Path("ck"))  # 3 ranks do not divide 8


def test_overrides_replace_the_accumulation_and_merge_the_rest():
    from medscale.train.engine import resolve_ds_config

    cfg = from_dict(RunConfig, {"train": {"micro_batch_size": 4, "grad_accum": 1, "precision": "fp32"}})
    plan = ResumePlan(Path("step00000002"), 2, Path("step00000002_universal"), 2)
    ds = resolve_ds_config(cfg, 1, ROOT / "ds_configs" / "cpu_zero2.json", overrides=plan.ds_overrides)
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 8
    assert ds["checkpoint"] == {"load_universal": True} and ds["zero_optimization"]["stage"] == 2
    assert ResumePlan(Path("step00000002"), 1).ds_overrides == {}


def test_a_json_that_fixes_the_accumulation_says_the_resume_needs_another(tmp_path):
    from medscale.train.engine import resolve_ds_config

    path = tmp_path / "fixed.json"
    path.write_text(json.dumps({"gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}}))
    cfg = from_dict(RunConfig, {"train": {"micro_batch_size": 4, "grad_accum": 1, "precision": "fp32"}})
    with pytest.raises(ConfigError, match="the resume, which keeps the checkpoint's global batch"):
        resolve_ds_config(cfg, 1, path, overrides={"gradient_accumulation_steps": 2})


def _checkpoint(root: Path, step: int, world: int, micro: int, accum: int, stage: int = 2) -> Path:
    """What prepare_resume reads of a checkpoint: complete.json and DeepSpeed's stored config."""
    path = root / "checkpoints" / f"step{step:08d}"
    path.mkdir(parents=True)
    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
          "train_batch_size": micro * accum * world, "zero_optimization": {"stage": stage}}
    torch.save({"ds_config": ds}, path / "mp_rank_00_model_states.pt")
    (path / COMPLETE).write_text(json.dumps({"step": step, "world": world}))
    return path


def test_same_ranks_keep_the_checkpoints_accumulation(tmp_path):
    """A checkpoint of a run that accumulated 2 micro-batches (on 1 rank, after a resume from 2) resumes
    on 1 rank with 2 again, whatever train.grad_accum says; nothing is converted."""
    _checkpoint(tmp_path, 3, world=1, micro=4, accum=2)
    ck = Checkpointer(CheckpointConfig(), tmp_path, DistInfo(0, 1, 0), last_step=10, config={"train": {"grad_accum": 1}})
    plan = ck.prepare_resume(TrainConfig(micro_batch_size=4, grad_accum=1))
    assert plan.grad_accum == 2 and plan.universal is None
    assert plan.ds_overrides == {"gradient_accumulation_steps": 2}
    assert ck.config["train"]["grad_accum"] == 2  # what later checkpoints store


def test_a_stage0_checkpoint_on_other_ranks_needs_no_conversion(tmp_path):
    _checkpoint(tmp_path, 4, world=2, micro=4, accum=1, stage=0)
    ck = Checkpointer(CheckpointConfig(), tmp_path, DistInfo(0, 1, 0), last_step=10)
    plan = ck.prepare_resume(TrainConfig(micro_batch_size=4, grad_accum=1))
    assert plan == ResumePlan(tmp_path / "checkpoints" / "step00000004", 2, None, 2)


def test_resume_without_a_plan_refuses_another_number_of_ranks(tmp_path):
    _checkpoint(tmp_path, 4, world=2, micro=4, accum=1)
    ck = Checkpointer(CheckpointConfig(), tmp_path, DistInfo(0, 1, 0), last_step=10)
    with pytest.raises(RuntimeError, match="call Checkpointer.prepare_resume before building the engine"):
        ck.resume(object(), {})


def test_checkpoints_that_change_while_a_run_starts_stop_it_with_what_to_do(tmp_path):
    """Another process wrote a newer checkpoint between the plan and the load (a second writer, or ranks
    that outlived their launcher): one line naming both checkpoints and what to do, not an internal error."""
    from medscale.errors import RunStateError, UserError

    _checkpoint(tmp_path, 4, world=1, micro=4, accum=1)
    ck = Checkpointer(CheckpointConfig(), tmp_path, DistInfo(0, 1, 0), last_step=10)
    assert ck.prepare_resume(TrainConfig(micro_batch_size=4, grad_accum=1)).path.name == "step00000004"
    _checkpoint(tmp_path, 6, world=1, micro=4, accum=1)
    with pytest.raises(RunStateError) as e:
        ck.resume(object(), {})
    assert isinstance(e.value, UserError)
    assert "planned to resume from step00000004, and the newest complete one is now step00000006" in str(e.value)
    assert "Another process is writing this run directory: stop it" in str(e.value)


def test_torn_checkpoints_after_the_resumed_one_are_removed(tmp_path):
    """A torn checkpoint left by a kill holds the shards of the run that wrote it: a resume on fewer ranks
    would write the same tag over it and leave the other ranks' shards mixed in."""
    _checkpoint(tmp_path, 2, world=1, micro=4, accum=2)
    torn = tmp_path / "checkpoints" / "step00000003"
    torn.mkdir()
    (torn / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"of a 2-rank run")
    ck = Checkpointer(CheckpointConfig(), tmp_path, DistInfo(0, 1, 0), last_step=10)
    assert ck.prepare_resume(TrainConfig(micro_batch_size=4, grad_accum=2)).path.name == "step00000002"
    assert not torn.exists()


def test_only_a_marked_conversion_counts_and_leftovers_are_dropped(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt = root / "step00000002"
    ckpt.mkdir(parents=True)
    out = universal.universal_dir(ckpt)
    assert out.name == "step00000002_universal"
    killed = out.with_name(out.name + ".partial") / out.name / "zero" / "fc1.weight"  # a kill mid-conversion
    killed.mkdir(parents=True)
    (killed / "fp32.pt").write_bytes(b"half")
    (out / "zero").mkdir(parents=True)  # a folder by that name without the marker: not finished either
    assert not universal.is_converted(out)
    (out / universal.MARKER).write_text("{}")
    assert universal.is_converted(out)
    orphan = root / "step00000001_universal"  # its checkpoint was pruned
    orphan.mkdir()
    universal.drop_orphans(root)
    assert out.exists() and not orphan.exists() and not killed.parents[2].exists()
