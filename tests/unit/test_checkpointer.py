"""The checkpointer saves and restores a dict of stateful parts it knows nothing about."""

from __future__ import annotations

import json
from typing import Any

import torch

from medscale.checkpoint.checkpointer import COMPLETE, PARTS, Checkpointer, TrainState
from medscale.config import CheckpointConfig
from medscale.dist import DistInfo


class _Engine:
    """DeepSpeed's side of a checkpoint, reduced to the client state it hands back."""

    def __init__(self) -> None:
        self.client: dict[str, Any] = {}

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        assert not save_latest  # medscale writes `latest` itself, after every rank has finished
        self.client = client_state

    def load_checkpoint(self, root: str, tag: str) -> tuple[str, dict]:
        return f"{root}/{tag}", self.client

    def zero_optimization_stage(self) -> int:
        return 2


class _Counter:
    def __init__(self) -> None:
        self.n, self.resets = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "t": torch.arange(3) * self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = state["n"]
        assert torch.equal(state["t"], torch.arange(3) * self.n)

    def reset(self) -> None:
        self.resets += 1


def test_parts_round_trip_and_a_new_part_is_reset(tmp_path):
    engine = _Engine()
    ck = Checkpointer(CheckpointConfig(every_steps=2), tmp_path, DistInfo(0, 1, 0), last_step=10,
                      config={"train": {"steps": 10}})
    state, counter = TrainState(step=4, epoch=1), _Counter()
    counter.n = 7
    path = ck.save(engine, 4, {"train": state, "counter": counter, "ema": None})
    assert json.loads((path / COMPLETE).read_text())["parts"] == ["counter", "train"]
    assert (path / PARTS).exists() and (tmp_path / "checkpoints" / "latest").read_text() == "step00000004"
    assert engine.client["medscale"]["config"] == {"train": {"steps": 10}}

    fresh_state, fresh_counter, added = TrainState(), _Counter(), _Counter()
    assert ck.resume(engine, {"train": fresh_state, "counter": fresh_counter, "added": added}) == path
    assert (fresh_state.step, fresh_state.epoch, fresh_counter.n) == (4, 1, 7)
    assert added.resets == 1 and fresh_counter.resets == 0


def test_no_checkpoint_or_resume_off_leaves_parts_alone(tmp_path):
    engine, state = _Engine(), TrainState(step=0)
    ck = Checkpointer(CheckpointConfig(), tmp_path, DistInfo(0, 1, 0), last_step=5)
    assert ck.resume(engine, {"train": state}) is None
    ck.save(engine, 3, {"train": TrainState(step=3)})
    off = Checkpointer(CheckpointConfig(resume=False), tmp_path, DistInfo(0, 1, 0), last_step=5)
    assert off.resume(engine, {"train": state}) is None and state.step == 0
    assert ck.due(5) and not ck.due(3)


def test_keep_best_keeps_the_best_scored_checkpoint_beside_the_newest(tmp_path):
    engine = _Engine()
    for mode, best in (("max", "step00000004"), ("min", "step00000002")):
        root = tmp_path / mode
        ck = Checkpointer(CheckpointConfig(keep=1, keep_best="auroc", best_mode=mode), root, DistInfo(0, 1, 0),
                          last_step=10)
        for step, score in ((2, 0.6), (4, 0.9), (6, None), (8, 0.7)):
            ck.save(engine, step, {"train": TrainState(step=step)}, score=score)
        assert ck.best().name == best
        assert sorted(p.name for p in ck.root.glob("step*")) == sorted({best, "step00000008"})
    plain = Checkpointer(CheckpointConfig(keep=1), tmp_path / "plain", DistInfo(0, 1, 0), last_step=10)
    plain.save(engine, 2, {"train": TrainState(step=2)}, score=0.99)
    plain.save(engine, 4, {"train": TrainState(step=4)}, score=0.1)
    assert plain.best() is None and [p.name for p in plain.root.glob("step*")] == ["step00000004"]
