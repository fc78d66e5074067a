"""The task seam: what an objective supplies to the training loop, chosen by ``train.objective``.

The loop knows batches, an engine and a loss tensor, nothing about labels or heads. An objective
(a `Task`) supplies the rest: whether the data must carry labels (checked against the manifest
before any process trains), the plain model for it, the loss over one micro-batch, and its
evaluation. Only ``classification`` is registered today; a self-supervised objective registers
itself the same way and the loop stays as it is.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar, Protocol

import torch
from torch import nn

from medscale.config import ConfigError, RunConfig
from medscale.data.loader import ShardStream
from medscale.formats.manifest import has_labels

__all__ = ["Task", "ClassificationTask", "TASKS", "register_task", "build_task"]

log = logging.getLogger("medscale.train")


class Task(Protocol):
    """One training objective. Methods are called on every rank."""

    needs_labels: ClassVar[bool]
    """The data must carry a label per sample (streams are built with ``labels=needs_labels``)."""
    class_names: list[str]
    """Names of the outputs, for the preprocessing record saved with the weights (may be empty)."""

    def build_model(self) -> nn.Module:
        """The plain model (no DeepSpeed), on the CPU."""

    def loss(self, model: Callable[[torch.Tensor], torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """Scalar loss of one micro-batch already on the model's device (``batch["valid"]`` marks
        samples that count; the others are stand-ins that keep batch shapes equal on every rank)."""

    def evaluate(self, model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """Metrics over a whole split, identical on every rank (a collective: all ranks call it)."""


TASKS: dict[str, Callable[[RunConfig, dict[str, Any]], Task]] = {}


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: make a task available as ``train.objective=<name>``."""

    def add(cls: type) -> type:
        TASKS[name] = cls
        return cls

    return add


def build_task(cfg: RunConfig, manifest: dict[str, Any]) -> Task:
    """The objective ``cfg.train.objective`` asks for, checked against the shards' manifest.

    Raises:
        ConfigError: an unknown objective, or data that the objective cannot train on (for
            example unlabeled shards for classification); the message says what to change.
    """
    try:
        factory = TASKS[cfg.train.objective]
    except KeyError:
        raise ConfigError(f"train.objective={cfg.train.objective!r} is not registered; "
                          f"known: {sorted(TASKS)}") from None
    return factory(cfg, manifest)


@register_task("classification")
class ClassificationTask:
    """Image classification: multiclass (softmax cross-entropy) or multilabel (sigmoid BCE per finding),
    focal and positive weights as `train.*` asks; evaluated with AUROC/AUPRC and bootstrap CIs."""

    needs_labels: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig, manifest: dict[str, Any]):
        from medscale.train.losses import build_loss

        self.cfg = cfg
        shards = cfg.data.shards
        if not has_labels(manifest):
            raise ConfigError(
                f"train.objective=classification needs labeled shards, but {shards} holds none (prepped without "
                "a labels CSV): prep again with --labels LABELS.csv (or a recipe's labels_csv / label_from_dir)")
        task = manifest.get("task", "multiclass")
        if task != cfg.train.task:
            raise ConfigError(f"train.task={cfg.train.task} but the manifest of {shards} says task {task}")
        classes = manifest.get("classes") or []
        if classes and len(classes) != cfg.model.num_classes:
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the manifest of {shards} lists "
                              f"{len(classes)} classes {classes[:10]}")
        self.class_names: list[str] = list(classes)
        self.loss_fn = build_loss(cfg.train, manifest, cfg.data.train_split)

    def build_model(self) -> nn.Module:
        from medscale.models import create_model

        return create_model(self.cfg.model, img_size=self.cfg.data.image_size, in_chans=self.cfg.data.channels)

    def loss(self, model: Callable[[torch.Tensor], torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        return self.loss_fn(model(batch["image"]), batch["target"], batch["valid"])

    def evaluate(self, model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        from medscale.eval.evaluate import evaluate

        result = evaluate(model, stream, self.cfg.eval, dtype, device, seed=self.cfg.train.seed)
        log.info("eval %s: auroc %s  accuracy %.4f  n=%d", stream.split, result.get("auroc"), result["accuracy"],
                 result["n_samples"])
        return result
