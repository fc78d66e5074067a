"""The training loop. Read `train()` top to bottom; the details live in the functions below it."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medscale.config import RunConfig, save_config
from medscale.data.loader import ShardStream, load_manifest, make_loader
from medscale.dist import DistInfo, barrier, init_distributed
from medscale.engine import build_engine, input_dtype
from medscale.evaluate import evaluate
from medscale.models import create_model
from medscale.tracking import Tracker, setup_logging

__all__ = ["train", "train_step", "compute_loss"]

log = logging.getLogger("medscale.train")


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train, evaluate on the held-out test split, write eval.json; returns the test metrics."""
    dist = init_distributed()
    setup_logging(dist.rank)
    run_dir = Path(cfg.out_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    barrier()
    seed_everything(cfg.train.seed)  # same initial weights on every rank

    manifest = load_manifest(cfg.data.shards)
    model = create_model(cfg.model, img_size=cfg.data.image_size, in_chans=cfg.data.channels)
    engine = build_engine(model, cfg, dist.world)
    dtype, device = input_dtype(engine), engine.device
    stream = _stream(cfg, manifest, cfg.data.train_split, dist, train=True)
    tracker = Tracker(cfg, run_dir, dist.is_main)
    log.info("training %s on %d samples, %d ranks, %d batches/epoch, %d steps",
             cfg.model.name, stream.samples, dist.world, stream.batches_per_epoch(), cfg.train.steps)

    step, epoch, micro = 0, 0, 0
    timer = time.perf_counter()
    while step < cfg.train.steps:
        stream.set_epoch(epoch)
        for batch in make_loader(stream):
            loss = train_step(engine, batch, cfg, dtype, device)
            micro += 1
            if micro % cfg.train.grad_accum:
                continue  # DeepSpeed steps the optimizer only at accumulation boundaries
            step += 1
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                timer = _log_step(tracker, engine, step, epoch, loss, cfg, dist, timer)
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                _evaluate(engine, cfg, manifest, dist, cfg.data.eval_split, tracker, step, dtype, device)
            if step >= cfg.train.steps:
                break
        epoch += 1

    save_model(engine, cfg, run_dir, dist)
    result = _evaluate(engine, cfg, manifest, dist, cfg.data.test_split, tracker, step, dtype, device)
    if dist.is_main:
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    tracker.summary({f"test/{k}": v for k, v in result.items()})
    tracker.close()
    barrier()
    return result


def train_step(engine: Any, batch: dict[str, Any], cfg: RunConfig, dtype: torch.dtype, device: torch.device) -> float:
    """One micro-batch forward/backward (and the optimizer step at accumulation boundaries)."""
    logits = engine(batch["image"].to(device=device, dtype=dtype))
    loss = compute_loss(logits.float(), batch["target"].to(device), cfg)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at a training step; refusing to train on through NaN")
    engine.backward(loss)
    engine.step()
    return loss.item()  # note: a device sync point, once per micro-batch


def compute_loss(logits: torch.Tensor, target: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """Cross-entropy (with label smoothing) for multiclass, BCE for multilabel."""
    if cfg.train.task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, target.float())
    return F.cross_entropy(logits, target, label_smoothing=cfg.train.label_smoothing)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _stream(cfg: RunConfig, manifest: dict[str, Any], split: str, dist: DistInfo, train: bool) -> ShardStream:
    mb = cfg.train.micro_batch_size if train else cfg.eval.micro_batch_size
    return ShardStream(cfg.data.shards, split, cfg.data, micro_batch=mb, rank=dist.rank, world=dist.world,
                       train=train, seed=cfg.train.seed, manifest=manifest)


def _log_step(tracker: Tracker, engine: Any, step: int, epoch: int, loss: float, cfg: RunConfig,
              dist: DistInfo, since: float) -> float:
    now = time.perf_counter()
    samples = cfg.train.log_every * cfg.train.micro_batch_size * cfg.train.grad_accum * dist.world
    values = {"loss": loss, "lr": engine.get_lr()[0], "epoch": epoch, "samples_per_s": samples / (now - since)}
    tracker.log(step, values, prefix="train/")
    log.info("step %d/%d  loss %.4f  lr %.2e  %.1f samples/s", step, cfg.train.steps, loss,
             values["lr"], values["samples_per_s"])
    return now


def _evaluate(engine: Any, cfg: RunConfig, manifest: dict[str, Any], dist: DistInfo, split: str,
              tracker: Tracker, step: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    result = evaluate(engine, _stream(cfg, manifest, split, dist, train=False), cfg, dtype, device)
    tracker.log(step, result, prefix=f"{split}/")
    log.info("eval %s at step %d: auroc %s  accuracy %.4f  n=%d", split, step, result.get("auroc"),
             result["accuracy"], result["n_samples"])
    return result


def save_model(engine: Any, cfg: RunConfig, run_dir: Path, dist: DistInfo) -> None:
    """Write consolidated weights (``model.pt``) with the resolved config, for eval and export.

    Called on every rank: under ZeRO-3 gathering the full weights is a collective.
    """
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if dist.is_main:
        state = {k: v.detach().float().cpu() for k, v in state.items()}
        from medscale.config import to_dict

        torch.save({"model": state, "config": to_dict(cfg)}, run_dir / "model.pt")
    barrier()
