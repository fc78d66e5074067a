"""Training losses: cross-entropy with label smoothing, BCE with per-class positive weights, focal.

Every loss is a per-sample value averaged over the *valid* samples of the micro-batch: a stand-in
for a corrupt sample (``batch["valid"] == False``) keeps the batch shape equal on every rank but
never contributes to the gradient.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medscale.config import ConfigError, TrainConfig

__all__ = ["ClassificationLoss", "build_loss", "pos_weight_from_manifest"]

log = logging.getLogger("medscale.tasks.losses")


class ClassificationLoss(nn.Module):
    """Mean loss over the valid samples of a micro-batch.

    Args:
        task: "multiclass" (softmax cross-entropy over class ids) or "multilabel" (sigmoid BCE over
            0/1 targets, averaged over classes).
        label_smoothing: multiclass label smoothing.
        pos_weight: multilabel weight of the positive term per class (None: 1).
        focal_gamma: > 0 multiplies each term by (1 - p_t)^gamma (Lin et al., 2017), p_t being the
            predicted probability of the true label.
    """

    def __init__(self, task: str, *, label_smoothing: float = 0.0, pos_weight: torch.Tensor | None = None,
                 focal_gamma: float = 0.0):
        super().__init__()
        if task not in ("multiclass", "multilabel"):
            raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")
        self.task, self.label_smoothing, self.focal_gamma = task, label_smoothing, focal_gamma
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of each sample, shape (N,), in float32."""
        logits = logits.float()
        if self.task == "multiclass":
            loss = F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
            if self.focal_gamma:
                p_true = torch.softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
                loss = (1 - p_true).pow(self.focal_gamma) * loss
            return loss
        target = target.float()
        pw = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction="none")
        if self.focal_gamma:
            p = torch.sigmoid(logits)
            p_true = p * target + (1 - p) * (1 - target)
            loss = (1 - p_true).pow(self.focal_gamma) * loss
        return loss.mean(1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.per_sample(logits, target)
        if valid is None:
            return loss.mean()
        w = valid.to(loss.device, loss.dtype)
        # A micro-batch with no valid sample gives 0 (and zero gradients), never 0/0.
        return (loss * w).sum() / w.sum().clamp_min(1.0)


def pos_weight_from_manifest(manifest: dict[str, Any], split: str) -> list[float]:
    """Negatives / positives per class from the manifest's label counts of `split`.

    Raises:
        ConfigError: the manifest has no counts for the split, or a class has no positives.
    """
    classes = manifest.get("classes") or []
    info = manifest.get("splits", {}).get(split, {})
    counts, n = info.get("label_counts"), info.get("samples")
    if not classes or not counts or not n:
        raise ConfigError(f"train.auto_pos_weight needs classes and label_counts of split {split!r} in the "
                          "manifest; set train.pos_weight instead")
    missing = [c for c in classes if not counts.get(c)]
    if missing:
        raise ConfigError(f"train.auto_pos_weight: classes {missing} have no positives in split {split!r}")
    return [(n - counts[c]) / counts[c] for c in classes]


def build_loss(cfg: TrainConfig, manifest: dict[str, Any], split: str = "train") -> ClassificationLoss:
    """The loss the run config asks for (the manifest supplies counts for auto_pos_weight)."""
    weights = pos_weight_from_manifest(manifest, split) if cfg.auto_pos_weight else cfg.pos_weight
    if weights:
        log.info("BCE positive weights per class: %s", [round(w, 3) for w in weights])
    return ClassificationLoss(cfg.label_kind, label_smoothing=cfg.label_smoothing, focal_gamma=cfg.focal_gamma,
                              pos_weight=torch.tensor(weights, dtype=torch.float32) if weights else None)
