"""Distributed evaluation that counts every held-out sample exactly once.

Each rank predicts its share (padding samples flagged ``valid=False`` are dropped), the
predictions are gathered with their sample keys, duplicates are removed by key and counted,
and the metrics (AUROC, AUPRC, sensitivity/specificity, calibration, bootstrap CIs by patient)
are computed once on the full set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medscale.config import RunConfig
from medscale.data.loader import ShardStream, make_loader
from medscale.dist import all_gather_objects
from medscale.metrics import classification_metrics

__all__ = ["predict", "evaluate"]


@torch.no_grad()
def predict(model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """This rank's predictions for the valid samples of `stream` (all ranks must call it)."""
    was_training = model.training
    model.eval()
    keys: list[str] = []
    patients: list[str] = []
    probs, targets = [], []
    for batch in make_loader(stream):
        logits = model(batch["image"].to(device=device, dtype=dtype)).float()
        p = torch.sigmoid(logits) if stream.task == "multilabel" else torch.softmax(logits, dim=-1)
        valid = batch["valid"]
        probs.append(p.cpu()[valid])
        targets.append(batch["target"][valid])
        keys += [k for k, v in zip(batch["key"], valid.tolist()) if v]
        patients += [k for k, v in zip(batch["patient"], valid.tolist()) if v]
    model.train(was_training)
    return {"keys": keys, "patients": patients,
            "probs": torch.cat(probs).numpy() if probs else np.zeros((0, 0), np.float32),
            "targets": torch.cat(targets).numpy() if targets else np.zeros((0,), np.int64)}


def evaluate(model: Any, stream: ShardStream, cfg: RunConfig, dtype: torch.dtype,
             device: torch.device) -> dict[str, Any]:
    """Metrics over the whole split, identical on every rank."""
    parts = all_gather_objects(predict(model, stream, dtype, device))
    seen: dict[str, int] = {}
    probs, targets, patients = [], [], []
    duplicates = 0
    for part in parts:
        for i, key in enumerate(part["keys"]):
            if key in seen:
                duplicates += 1  # should never happen; counted so a loader bug cannot hide
                continue
            seen[key] = 1
            probs.append(part["probs"][i])
            targets.append(part["targets"][i])
            patients.append(part["patients"][i])
    if not probs:
        raise RuntimeError(f"evaluation of split {stream.split!r} saw no samples")
    result = classification_metrics(
        np.stack(probs), np.stack(targets), task=stream.task,
        class_names=stream.manifest.get("classes") or None,
        at_specificity=cfg.eval.at_specificity or None,
        n_bootstrap=cfg.eval.bootstrap, groups=patients, seed=cfg.train.seed,
    )
    result.update({"split": stream.split, "n_patients": len(set(patients)), "duplicates_dropped": duplicates,
                   "expected_samples": stream.samples})
    if len(seen) != stream.samples:
        raise RuntimeError(f"evaluation saw {len(seen)} distinct samples of split {stream.split!r}, manifest says {stream.samples}")
    return result
