"""The task seam: objectives are registered, check their data before training, and own the loss."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from medscale.config import ConfigError, RunConfig, from_dict
from medscale.formats.manifest import has_labels
from medscale.tasks import registry
from medscale.tasks.base import TaskBase, build_task
from medscale.tasks.classification import ClassificationTask


def _cfg(**train: Any) -> RunConfig:
    return from_dict(RunConfig, {"data": {"shards": "/data/ct"}, "train": train, "model": {"num_classes": 2}})


def test_classification_refuses_unlabeled_shards_with_what_to_do():
    for manifest in ({"task": "unlabeled", "classes": []},
                     {"task": "multiclass", "classes": [], "splits": {"train": {"label_counts": {}}}}):
        assert not has_labels(manifest)
        with pytest.raises(ConfigError, match="needs labeled shards.*/data/ct.*--labels"):
            build_task(_cfg(), manifest)


def test_classification_checks_task_and_class_count():
    with pytest.raises(ConfigError, match="train.label_kind=multilabel.*multiclass"):
        build_task(_cfg(label_kind="multilabel"), {"task": "multiclass", "classes": ["a", "b"]})
    with pytest.raises(ConfigError, match="model.num_classes=2.*3 classes"):
        build_task(_cfg(), {"task": "multiclass", "classes": ["a", "b", "c"]})
    task = build_task(_cfg(), {"task": "multiclass", "classes": ["a", "b"]})
    assert isinstance(task, ClassificationTask) and task.needs_labels and task.class_names == ["a", "b"]


class _Engine:
    """Just enough of a DeepSpeed engine for train_step: forward, backward, step at boundaries."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.module = torch.nn.Linear(4, 2)
        self.global_steps = 0
        self.backwards = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def bfloat16_enabled(self) -> bool:
        return False

    def fp16_enabled(self) -> bool:
        return False

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.backwards += 1

    def step(self) -> None:
        self.global_steps += 1

    def was_step_applied(self) -> bool:
        return True


class _Reconstruct:
    """An objective without labels: its batches carry no "target" at all."""

    needs_labels: ClassVar[bool] = False
    class_names: list[str] = []

    def loss(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        return (model(batch["image"]) - batch["image"][:, :2]).pow(2).mean()


def test_train_step_runs_any_objective():
    from medscale.train.loop import train_step
    from medscale.train.numerics import NumericsGuard

    engine = _Engine()
    guard = NumericsGuard(engine, _cfg().train, world=1)
    batch = {"image": torch.randn(3, 4), "valid": torch.ones(3, dtype=torch.bool), "key": ["a", "b", "c"]}
    out = train_step(engine, batch, _Reconstruct(), guard)
    assert out.stepped and out.loss is not None and engine.backwards == 1


class _ReconstructTask(TaskBase):
    """A plug-in objective: TaskBase's defaults and the four methods every objective writes."""

    needs_labels: ClassVar[bool] = False

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(4, 4)

    loss = _Reconstruct.loss

    def predict(self, model: Any, stream: Any, dtype: Any, device: Any) -> dict[str, Any]:
        return {}

    def evaluate(self, model: Any, stream: Any, dtype: Any, device: Any) -> dict[str, Any]:
        return {}


def test_objectives_are_registered_by_name(monkeypatch):
    monkeypatch.setitem(registry._REGISTERED, "reconstruct", _ReconstructTask)
    cfg = _cfg(objective="reconstruct")  # checked against the registry when the config is built
    task = build_task(cfg, {})
    assert isinstance(task, _ReconstructTask) and task.name == "reconstruct" and not task.needs_labels
    with pytest.raises(ConfigError, match="train.objective='nope' is not a known objective.*classification"):
        _cfg(objective="nope")
    monkeypatch.setitem(registry._REGISTERED, "broken", _Reconstruct)  # lacks what an objective must have
    with pytest.raises(ConfigError, match="is not a medscale objective .*lacks build_model"):
        _cfg(objective="broken")
