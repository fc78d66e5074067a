"""Distributed evaluation that counts every held-out sample exactly once.

Each rank predicts its share (padding samples flagged ``valid=False`` are dropped), the
predictions are gathered with their sample keys, duplicates are removed by key and counted,
and the metrics (AUROC, AUPRC, sensitivity/specificity, calibration, bootstrap CIs by patient)
are computed once on the full set, optionally also with predictions pooled per patient or study.
The result also carries curve data (`medscale.eval.curves`) and a few sample images per class as
the model saw them, for reports and dashboards; neither keeps a sample key or patient id.
`run_eval` is `medscale eval`: a finished run's weights (the EMA when there is one) on a split,
the result saved to the run directory; printing it is the caller's business (`medscale.report`).
"""

from __future__ import annotations

import bisect
import io
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from medscale.config import ConfigError, EvalConfig, RunConfig
from medscale.errors import CorruptShards, RunStateError
from medscale.data.device import to_device
from medscale.data.loader import ShardStream, make_loader
from medscale.files import atomic_write
from medscale.dist import all_gather_objects
from medscale.logs import Progress
from medscale.eval.curves import curve_data
from medscale.eval.metrics import aggregate_by_group, classification_metrics

__all__ = ["predict", "evaluate", "gather_split", "SplitRows", "save_result", "samples_path", "display_image", "run_eval"]

log = logging.getLogger("medscale.eval.evaluate")

SAMPLES_PER_CLASS = 4
"""Sample images kept per class by `evaluate` (the first by sample key, so every run keeps the same)."""


def display_image(x: torch.Tensor) -> np.ndarray:
    """A model input (C, H, W) as a displayable uint8 image, min-max scaled: (H, W), or (H, W, 3) for C == 3.

    Other channel counts (stacked CT windows) show their first channel: two or four windows have no
    colour meaning.
    """
    a = x.detach().float().cpu().numpy()
    a = a.transpose(1, 2, 0) if a.shape[0] == 3 else a[0]
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
    return np.round(scaled).astype(np.uint8)


class _Candidates:
    """This rank's first `per_class` samples of each class by key: only those can be the split's first.

    Holding a few per class (not every image) keeps memory and the gather small whatever the split size.
    """

    def __init__(self, per_class: int):
        self.per_class = per_class
        self.by_class: dict[int, list[str]] = {}
        self.images: dict[str, np.ndarray] = {}

    def offer(self, key: str, classes: list[int], image: torch.Tensor) -> None:
        took = False
        for c in classes:
            keys = self.by_class.setdefault(c, [])
            if len(keys) < self.per_class or key < keys[-1]:
                bisect.insort(keys, key)
                del keys[self.per_class:]
                took = took or key in keys
        if took and key not in self.images:
            self.images[key] = display_image(image)

    def prune(self) -> None:
        kept = {k for keys in self.by_class.values() for k in keys}
        self.images = {k: v for k, v in self.images.items() if k in kept}


@torch.no_grad()
def predict(model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device,
            samples_per_class: int = 0) -> dict[str, Any]:
    """This rank's predictions for the valid samples of `stream` (all ranks must call it).

    With `samples_per_class`, ``sample_images`` maps the keys of this rank's first samples of each
    (true) class to their model input as `display_image`; without, it is empty.
    """
    was_training = model.training
    model.eval()
    keys: list[str] = []
    patients: list[str] = []
    studies: list[str] | None = []
    probs, targets = [], []
    corrupt_before = stream.corrupt_count
    candidates = _Candidates(samples_per_class)
    bar = Progress(stream.batches_per_epoch(), desc=f"eval {stream.split}", unit="batch", enabled=stream.rank == 0)
    for batch in make_loader(stream, device):
        bar.update()
        image = to_device(batch, device, dtype)["image"]  # on data.transforms_on=gpu, transformed there
        logits = model(image).float()
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
        if samples_per_class:
            target = batch["target"]
            for i in np.flatnonzero(mask):
                classes = target[i].nonzero().flatten().tolist() if target.ndim == 2 else [int(target[i])]
                candidates.offer(batch["key"][i], classes, image[i])
            candidates.prune()
    bar.close()
    model.train(was_training)
    return {"keys": keys, "patients": patients, "studies": studies, "corrupt": stream.corrupt_count - corrupt_before,
            "sample_images": candidates.images,
            "probs": torch.cat(probs).numpy() if probs else np.zeros((0, 0), np.float32),
            "targets": torch.cat(targets).numpy() if targets else np.zeros((0,), np.int64)}


class SplitRows(NamedTuple):
    """Which gathered rows make up a split, each sample once (see `gather_split`)."""

    rows: list[tuple[int, int]]
    """(part, index) of each distinct sample, in the order its key was first seen."""
    keys: list[str]
    """The samples' keys, in the same order."""
    duplicates: int
    corrupt: int


def gather_split(parts: list[dict[str, Any]], stream: ShardStream) -> SplitRows:
    """Every rank's evaluation of a split (``parts``: one dict per rank with ``keys`` and ``corrupt``,
    as all-gathered), each sample taken once, and the checks that it covers the split.

    Raises:
        CorruptShards: more corrupt samples than ``data.max_corrupt_fraction`` allows, or no sample at all.
        RunStateError: another number of distinct samples than the manifest holds for the split,
            corrupt ones included (shards that changed, or a loader bug, must not hide in the figures).
    """
    seen: dict[str, tuple[int, int]] = {}
    duplicates = 0
    for j, part in enumerate(parts):
        for i, key in enumerate(part["keys"]):
            if key in seen:
                duplicates += 1  # should never happen; counted so a loader bug cannot hide
                continue
            seen[key] = (j, i)
    corrupt = sum(part["corrupt"] for part in parts)
    if corrupt > stream.max_corrupt_fraction * stream.samples:
        raise CorruptShards(f"{corrupt} corrupt samples in split {stream.split!r} ({stream.root}) exceed "
                           f"data.max_corrupt_fraction={stream.max_corrupt_fraction} of its {stream.samples}; "
                           "the log names each one; check the shards with `medscale inspect --verify`")
    if corrupt:
        log.warning("%d corrupt samples of split %r left out of the evaluation", corrupt, stream.split)
    if not seen:
        raise CorruptShards(f"evaluation of split {stream.split!r} ({stream.root}) saw no readable sample; check the "
                            "shards with `medscale inspect --verify`")
    if len(seen) + corrupt != stream.samples:
        raise RunStateError(f"evaluation saw {len(seen)} distinct samples of split {stream.split!r} and {corrupt} "
                            f"corrupt ones; the manifest says {stream.samples}: the shards in {stream.root} do not "
                            "match their manifest (check them with `medscale inspect --verify`, or prep them again)")
    return SplitRows(list(seen.values()), list(seen), duplicates, corrupt)


def evaluate(model: Any, stream: ShardStream, cfg: EvalConfig, dtype: torch.dtype,
             device: torch.device, seed: int = 0, samples_per_class: int = SAMPLES_PER_CLASS) -> dict[str, Any]:
    """Metrics over the whole split, identical on every rank (all ranks must call it).

    Besides the metrics of `classification_metrics`, ``curves`` holds `curve_data` at the operating
    threshold and ``samples`` the first `samples_per_class` samples of each class by key, as
    ``{"image": uint8 array, "label": str, "pred": str, "prob": float}`` (see `_samples`).

    Corrupt samples (undecodable; the loader logs each and passes padding in their place) are
    left out of the metrics and reported as ``corrupt_samples``, up to the stream's limit
    (``data.max_corrupt_fraction`` of the split). `seed` seeds the bootstrap.

    Raises:
        RunStateError: the ranks together saw another number of distinct samples than the
            manifest holds for the split, corrupt ones included (a loader bug must not hide in
            the metrics).
        CorruptShards: more corrupt samples than ``data.max_corrupt_fraction`` allows.
    """
    mine = predict(model, stream, dtype, device, samples_per_class)
    images = mine.pop("sample_images")  # only the chosen few travel, in a second gather below
    mine["sample_keys"] = list(images)
    parts = all_gather_objects(mine)
    split = gather_split(parts, stream)
    have_studies = all(part["studies"] is not None for part in parts)
    probs = [parts[j]["probs"][i] for j, i in split.rows]
    targets = [parts[j]["targets"][i] for j, i in split.rows]
    patients = [parts[j]["patients"][i] for j, i in split.rows]
    studies = [parts[j]["studies"][i] for j, i in split.rows] if have_studies else []
    seen = split.keys
    duplicates, corrupt = split.duplicates, split.corrupt
    p, t = np.stack(probs), np.stack(targets)
    options = dict(task=stream.task, class_names=stream.manifest.get("classes") or None,
                   threshold=cfg.threshold, at_specificity=cfg.at_specificity or None, n_bootstrap=cfg.bootstrap,
                   seed=seed)
    result = classification_metrics(p, t, groups=patients, **options)
    result.update({"split": stream.split, "n_patients": len(set(patients)), "duplicates_dropped": duplicates,
                   "expected_samples": stream.samples, "corrupt_samples": corrupt})
    names = list(result["per_class"])
    # The curves' operating points are the metrics': a common threshold, argmax, or per class at a specificity.
    thresholds = [result["per_class"][n]["threshold"] for n in names] if cfg.at_specificity else None
    result["curves"] = curve_data(p, t, task=stream.task, class_names=names, class_thresholds=thresholds,
                                  threshold=result["operating_point"].get("threshold"))
    candidates = {k for part in parts for k in part["sample_keys"]}
    rows = {k: i for i, k in enumerate(seen) if k in candidates}  # seen: keys in the order of p and t
    result["samples"] = _samples(rows, p, t, result, images, samples_per_class)
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


def _samples(row: dict[str, int], probs: np.ndarray, targets: np.ndarray, result: dict[str, Any],
             images: dict[str, np.ndarray], per_class: int) -> list[dict[str, Any]]:
    """The first `per_class` samples of each class by key, chosen from the ranks' candidates (`row`:
    key -> row of probs/targets) and gathered with this rank's `images`; no key or id is kept.

    Multiclass: ``label`` is the true class, ``pred`` the decision of the operating point (class 1 at
    its threshold for a binary task, else argmax) and ``prob`` its probability. Multilabel: a sample
    is shown for each finding it has: ``label`` is that finding, ``pred`` the finding or "not
    <finding>" at its threshold, ``prob`` the finding's probability. Every rank must call it.
    """
    names = list(result["per_class"])
    thr = [result["per_class"][n]["threshold"] for n in names]
    multilabel = result["task"] == "multilabel"
    chosen = []
    for c in range(len(names)):
        has = [k for k in row if (targets[row[k], c] if multilabel else targets[row[k]] == c)]
        chosen += [(c, k) for k in sorted(has)[:per_class]]
    wanted = {k for _, k in chosen}
    shown: dict[str, np.ndarray] = {}
    for part in all_gather_objects({k: v for k, v in images.items() if k in wanted}):
        shown.update(part)
    out = []
    for c, key in chosen:
        p = probs[row[key]]
        if multilabel:
            called = thr[c] is not None and p[c] >= thr[c]
            label, pred, prob = names[c], names[c] if called else f"not {names[c]}", p[c]
        else:
            k = int(p[1] >= thr[1]) if len(names) == 2 and thr[1] is not None else int(p.argmax())
            label, pred, prob = names[c], names[k], p[k]
        out.append({"image": shown[key], "label": label, "pred": pred, "prob": float(prob)})
    return out


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


def samples_path(path: Path) -> Path:
    """Where `save_result` puts the sample images of the result saved at `path`: ``<stem>_samples.npz``."""
    return Path(path).with_name(f"{Path(path).stem}_samples.npz")


def save_result(result: dict[str, Any], path: Path) -> Path:
    """Write an evaluation result as JSON (atomically: a reader never sees half a file).

    The ``samples`` (images) go to `samples_path` instead, as arrays ``images`` (N, H, W[, 3]) uint8,
    ``labels``, ``preds`` (str) and ``probs`` (float32): images have no place in a JSON file.
    """
    path = Path(path)
    samples = result.get("samples")
    atomic_write(path, json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if samples is not None:
        buf = io.BytesIO()
        images = np.stack([s["image"] for s in samples]) if samples else np.zeros((0, 0, 0), np.uint8)
        np.savez_compressed(buf, images=images,
                            labels=np.array([s["label"] for s in samples], dtype=str),
                            preds=np.array([s["pred"] for s in samples], dtype=str),
                            probs=np.array([s["prob"] for s in samples], dtype=np.float32))
        atomic_write(samples_path(path), buf.getvalue())
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
    from medscale.formats.manifest import load_manifest
    from medscale.train.tasks import build_task

    run = Path(run)
    cfg = load_config(RunConfig, run / "config.yaml", overrides)
    manifest = load_manifest(cfg.data.shards)  # first: a manifest that is not plain data is refused at once
    dist = init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model, _ = load_run_model(run, use_ema=cfg.eval.use_ema)
    model = model.to(device)
    split = split or cfg.data.test_split
    task = build_task(cfg, manifest)  # the run's own objective evaluates it (an MAE run: reconstruction)
    stream = ShardStream(cfg.data.shards, split, cfg.data, micro_batch=cfg.eval.micro_batch_size,
                         rank=dist.rank, world=dist.world, train=False, seed=cfg.train.seed, manifest=manifest,
                         labels=task.needs_labels)
    result = task.evaluate(model, stream, torch.float32, device)
    path = save_result(result, Path(output or run / f"eval_{split}.json")) if dist.is_main else None
    return result, path
