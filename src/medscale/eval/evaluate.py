"""Distributed evaluation that counts every held-out sample exactly once.

Each rank predicts its share (padding samples flagged ``valid=False`` are dropped), the
predictions are gathered with their sample keys, duplicates are removed by key and counted,
and the metrics (AUROC, AUPRC, sensitivity/specificity, calibration, bootstrap CIs by patient)
are computed once on the full set, optionally also with predictions pooled per patient or study.
`run_eval` is `medscale eval`: a finished run's weights (the EMA when there is one) on a split,
the result saved to the run directory; printing it is the caller's business (`medscale.report`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medscale.config import ConfigError, EvalConfig, RunConfig
from medscale.data.loader import ShardStream, make_loader
from medscale.files import atomic_write
from medscale.dist import all_gather_objects
from medscale.eval.metrics import aggregate_by_group, classification_metrics

__all__ = ["predict", "evaluate", "save_result", "run_eval"]

log = logging.getLogger("medscale.eval.evaluate")


@torch.no_grad()
def predict(model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """This rank's predictions for the valid samples of `stream` (all ranks must call it)."""
    was_training = model.training
    model.eval()
    keys: list[str] = []
    patients: list[str] = []
    studies: list[str] | None = []
    probs, targets = [], []
    corrupt_before = stream.corrupt_count
    for batch in make_loader(stream):
        logits = model(batch["image"].to(device=device, dtype=dtype)).float()
        p = torch.sigmoid(logits) if stream.task == "multilabel" else torch.softmax(logits, dim=-1)
        valid = batch["valid"]
        mask = valid.tolist()
        probs.append(p.cpu()[valid])
        targets.append(batch["target"][valid])
        keys += [k for k, v in zip(batch["key"], mask) if v]
        patients += [k for k, v in zip(batch["patient"], mask) if v]
        if studies is not None and "study" in batch:
            studies += [k for k, v in zip(batch["study"], mask) if v]
        else:
            studies = None  # the loader does not pass study ids
    model.train(was_training)
    return {"keys": keys, "patients": patients, "studies": studies, "corrupt": stream.corrupt_count - corrupt_before,
            "probs": torch.cat(probs).numpy() if probs else np.zeros((0, 0), np.float32),
            "targets": torch.cat(targets).numpy() if targets else np.zeros((0,), np.int64)}


def evaluate(model: Any, stream: ShardStream, cfg: EvalConfig, dtype: torch.dtype,
             device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Metrics over the whole split, identical on every rank (all ranks must call it).

    Corrupt samples (undecodable; the loader logs each and passes padding in their place) are
    left out of the metrics and reported as ``corrupt_samples``, up to the stream's limit
    (``data.max_corrupt_fraction`` of the split). `seed` seeds the bootstrap.

    Raises:
        RuntimeError: the ranks together saw another number of distinct samples than the
            manifest holds for the split, corrupt ones included (a loader bug must not hide in
            the metrics), or more corrupt samples than ``data.max_corrupt_fraction`` allows.
    """
    parts = all_gather_objects(predict(model, stream, dtype, device))
    seen: dict[str, int] = {}
    probs, targets, patients, studies = [], [], [], []
    have_studies = all(part["studies"] is not None for part in parts)
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
            if have_studies:
                studies.append(part["studies"][i])
    corrupt = sum(part["corrupt"] for part in parts)
    if corrupt > stream.max_corrupt_fraction * stream.samples:
        raise RuntimeError(f"{corrupt} corrupt samples in split {stream.split!r} ({stream.root}) exceed "
                           f"data.max_corrupt_fraction={stream.max_corrupt_fraction} of its {stream.samples}; "
                           "the log names each one; check the shards with `medscale inspect --verify`")
    if corrupt:
        log.warning("%d corrupt samples of split %r left out of the metrics", corrupt, stream.split)
    if not probs:
        raise RuntimeError(f"evaluation of split {stream.split!r} saw no samples")
    if len(seen) + corrupt != stream.samples:
        raise RuntimeError(f"evaluation saw {len(seen)} distinct samples of split {stream.split!r} and {corrupt} "
                           f"corrupt ones; the manifest says {stream.samples}")
    p, t = np.stack(probs), np.stack(targets)
    options = dict(task=stream.task, class_names=stream.manifest.get("classes") or None,
                   threshold=cfg.threshold, at_specificity=cfg.at_specificity or None, n_bootstrap=cfg.bootstrap,
                   seed=seed)
    result = classification_metrics(p, t, groups=patients, **options)
    result.update({"split": stream.split, "n_patients": len(set(patients)), "duplicates_dropped": duplicates,
                   "expected_samples": stream.samples, "corrupt_samples": corrupt})
    if cfg.aggregate != "none":
        if cfg.aggregate == "study" and not have_studies:
            raise ConfigError("eval.aggregate=study needs a study id per sample, and the loader passes none; "
                             "use eval.aggregate=patient")
        groups = studies if cfg.aggregate == "study" else patients
        pooled, pooled_t, names = _pool(p, t, groups, stream.task, cfg.aggregate, cfg.aggregate_how)
        level = classification_metrics(pooled, pooled_t, **options)  # each group is its own bootstrap unit
        level.update({"n_groups": len(names), "pooling": cfg.aggregate_how})
        result[f"{cfg.aggregate}_level"] = level
    return result


def _pool(probs: np.ndarray, targets: np.ndarray, groups: list[str], task: str, level: str,
          how: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Predictions pooled per group. A binary task's group is positive if any of its images is."""
    binary = task == "multiclass" and probs.shape[1] == 2
    t = np.eye(2, dtype=np.int64)[targets] if binary else targets  # one-hot: pooled as "any positive"
    try:
        pooled, pooled_t, names = aggregate_by_group(probs, t, groups, how=how)
    except ValueError as e:
        raise ConfigError(f"eval.aggregate={level}: {e}; {level}-level metrics need one label per {level} "
                         "(or a binary or multilabel task)") from e
    return pooled, (pooled_t[:, 1] if binary else pooled_t), names


def save_result(result: dict[str, Any], path: Path) -> Path:
    """Write an evaluation result as JSON (atomically: a reader never sees half a file)."""
    atomic_write(path, json.dumps(result, indent=1))
    return path


def run_eval(run: str | Path, overrides: list[str] | tuple[str, ...] = (), split: str | None = None,
             output: str | Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """`medscale eval`: evaluate a finished run on a split, on every rank of the launcher (or one).

    The model comes from the run's weights and their preprocessing record (`medscale.checkpoint.weights`);
    the shards and evaluation options from the run's config with `overrides`. Writes
    ``RUN/eval_<split>.json`` (or `output`) on rank 0; returns the metrics and that path (None on
    other ranks).
    """
    from medscale.checkpoint.weights import load_run_model
    from medscale.config import load_config
    from medscale.dist import init_distributed

    run = Path(run)
    cfg = load_config(RunConfig, run / "config.yaml", overrides)
    dist = init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model, _ = load_run_model(run, use_ema=cfg.eval.use_ema)
    model = model.to(device)
    split = split or cfg.data.test_split
    stream = ShardStream(cfg.data.shards, split, cfg.data, micro_batch=cfg.eval.micro_batch_size,
                         rank=dist.rank, world=dist.world, train=False, seed=cfg.train.seed)
    result = evaluate(model, stream, cfg.eval, torch.float32, device, seed=cfg.train.seed)
    path = save_result(result, Path(output or run / f"eval_{split}.json")) if dist.is_main else None
    return result, path
