"""The training loop. Read `train()` top to bottom; the details live in the functions below it."""

from __future__ import annotations

import contextlib
import json
import logging
import random
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from medscale.checkpoint.checkpointer import Checkpointer, TrainState
from medscale.config import ConfigError, RunConfig, save_config, to_dict
from medscale.data.loader import ShardStream, load_manifest, make_loader
from medscale.dist import DistInfo, barrier, init_distributed
from medscale.train.ema import ModelEma
from medscale.train.engine import build_engine, input_dtype
from medscale.train.numerics import NumericsGuard
from medscale.eval.evaluate import evaluate
from medscale.train.losses import ClassificationLoss, build_loss
from medscale.models import create_model
from medscale.train.throughput import Throughput, device_peak_tflops, flops_per_sample
from medscale.train.tracking import Tracker, setup_logging

__all__ = ["train", "train_step", "MicroStep", "save_model", "seed_everything"]

log = logging.getLogger("medscale.train")


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train, evaluate on the held-out test split, write eval.json; returns the test metrics."""
    dist = init_distributed(cfg.dist.timeout_minutes)
    setup_logging(dist.rank)
    run_dir = _prepare_run_dir(cfg, dist)
    seed_everything(cfg.train.seed)  # same initial weights on every rank

    manifest = load_manifest(cfg.data.shards)
    _check_against_manifest(cfg, manifest)
    model = create_model(cfg.model, img_size=cfg.data.image_size, in_chans=cfg.data.channels)
    flops = flops_per_sample(cfg.model, in_chans=cfg.data.channels, img_size=cfg.data.image_size)
    engine = build_engine(model, cfg, dist.world)
    ema = ModelEma(engine, cfg.train.ema_decay) if cfg.train.ema_decay else None
    loss_fn = build_loss(cfg.train, manifest, cfg.data.train_split)
    guard = NumericsGuard(engine, cfg.train, dist.world)
    stream = _stream(cfg, manifest, cfg.data.train_split, dist, train=True)
    checkpointer = Checkpointer(cfg, run_dir, dist)
    state = checkpointer.resume(engine, stream, ema)  # a fresh state when there is no complete checkpoint
    tracker = Tracker(cfg, run_dir, dist.is_main)
    meter = Throughput(cfg.train.micro_batch_size * dist.world, flops,
                       device_peak_tflops(cfg.train.precision, cfg.train.peak_tflops), dist.world)
    log.info("training %s on %d samples, %d ranks, %d batches/epoch, steps %d..%d", cfg.model.name,
             stream.samples, dist.world, stream.batches_per_epoch(), state.step, cfg.train.steps)

    losses: list[float] = []
    while state.step < cfg.train.steps:
        stream.set_epoch(state.epoch)
        for batch in meter.batches(make_loader(stream)):
            out = train_step(engine, batch, loss_fn, guard)
            if out.loss is not None:
                losses.append(out.loss)
            if not out.stepped:
                continue  # DeepSpeed steps the optimizer only at accumulation boundaries
            state.step += 1
            if ema is not None and engine.was_step_applied():
                ema.update()
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
                _log_step(tracker, engine, state, losses, meter, guard, stream, cfg)
            if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0:
                _evaluate(engine, ema, cfg, manifest, dist, cfg.data.eval_split, tracker, state.step)
            if checkpointer.due(state.step):
                checkpointer.save(engine, state, stream, ema)
            if state.step >= cfg.train.steps:
                break
        else:
            state.epoch += 1  # the epoch ran out (not a break at the last step)

    save_model(engine, ema, cfg, run_dir, dist)
    result = _evaluate(engine, ema, cfg, manifest, dist, cfg.data.test_split, tracker, state.step)
    if dist.is_main:
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    tracker.summary({f"test/{k}": v for k, v in result.items()})
    tracker.close()
    barrier()
    return result


class MicroStep(NamedTuple):
    """What one micro-batch did."""

    loss: float | None
    """Loss averaged over ranks; None when the micro-batch was skipped for a non-finite loss."""
    stepped: bool
    """An optimizer step (accumulation boundary) was reached."""


def train_step(engine: Any, batch: dict[str, Any], loss_fn: ClassificationLoss, guard: NumericsGuard) -> MicroStep:
    """One micro-batch forward/backward, and the optimizer step at accumulation boundaries."""
    device = engine.device
    logits = engine(batch["image"].to(device=device, dtype=input_dtype(engine), non_blocking=True))
    loss = loss_fn(logits, batch["target"].to(device), batch["valid"].to(device))
    value = guard.check_loss(loss)  # the same decision on every rank
    if value is None:
        return MicroStep(None, False)  # skipped everywhere: no backward, so no collective is left half-done
    engine.backward(loss)
    return MicroStep(value, guard.optimizer_step())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _prepare_run_dir(cfg: RunConfig, dist: DistInfo) -> Path:
    run_dir = Path(cfg.out_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    barrier()
    return run_dir


def _check_against_manifest(cfg: RunConfig, manifest: dict[str, Any]) -> None:
    """The run config and the shards must agree on the task and the number of classes."""
    task = manifest.get("task", "multiclass")
    if task != cfg.train.task:
        raise ConfigError(f"train.task={cfg.train.task} but the manifest of {cfg.data.shards} says task {task}")
    classes = manifest.get("classes") or []
    if classes and len(classes) != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the manifest of {cfg.data.shards} lists "
                          f"{len(classes)} classes {classes[:10]}")


def _stream(cfg: RunConfig, manifest: dict[str, Any], split: str, dist: DistInfo, train: bool) -> ShardStream:
    mb = cfg.train.micro_batch_size if train else cfg.eval.micro_batch_size
    return ShardStream(cfg.data.shards, split, cfg.data, micro_batch=mb, rank=dist.rank, world=dist.world,
                       train=train, seed=cfg.train.seed, manifest=manifest)


def _log_step(tracker: Tracker, engine: Any, state: TrainState, losses: list[float], meter: Throughput,
              guard: NumericsGuard, stream: ShardStream, cfg: RunConfig) -> None:
    loss = sum(losses) / len(losses) if losses else float("nan")
    losses.clear()
    grad_norm = engine.get_global_grad_norm()
    values: dict[str, Any] = {"loss": loss, "lr": engine.get_lr()[0], "epoch": state.epoch,
                              "grad_norm": float(grad_norm) if grad_norm is not None else None,
                              **meter.report(), **guard.figures()}
    if hasattr(stream, "stats"):
        values["corrupt_samples"] = stream.stats()["corrupt_samples"]
    tracker.log(state.step, values, prefix="train/")
    mfu = f"{values['mfu']:.1%}" if values["mfu"] is not None else "-"
    fp16 = f"  loss scale {values['loss_scale']} ({values['overflow_steps']} overflow steps)" if guard.fp16 else ""
    log.info("step %d/%d  loss %.4f  lr %.2e  %.1f samples/s  mfu %s  data wait %.0f%%  peak mem %.2f GB%s",
             state.step, cfg.train.steps, loss, values["lr"], values["samples_per_s"], mfu,
             100 * values["data_wait_frac"], values["peak_mem_gb"], fp16)


def _evaluate(engine: Any, ema: ModelEma | None, cfg: RunConfig, manifest: dict[str, Any], dist: DistInfo,
              split: str, tracker: Tracker, step: int) -> dict[str, Any]:
    stream = _stream(cfg, manifest, split, dist, train=False)
    use_ema = ema is not None and cfg.eval.use_ema
    with ema.applied() if use_ema else contextlib.nullcontext():  # type: ignore[union-attr]
        result = evaluate(engine, stream, cfg, input_dtype(engine), engine.device)
    result["weights"] = "ema" if use_ema else "trained"
    level = result.get(f"{cfg.eval.aggregate}_level", {})
    tracker.log(step, {**result, **{f"{cfg.eval.aggregate}_level/{k}": v for k, v in level.items()}},
                prefix=f"{split}/")
    log.info("eval %s at step %d (%s weights): auroc %s  accuracy %.4f  n=%d", split, step, result["weights"],
             result.get("auroc"), result["accuracy"], result["n_samples"])
    return result


def save_model(engine: Any, ema: ModelEma | None, cfg: RunConfig, run_dir: Path, dist: DistInfo) -> None:
    """Write consolidated weights (``model.pt``: ``model``, ``model_ema`` if any, ``config``).

    Called on every rank: under ZeRO-3 gathering the full weights is a collective.
    """
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # None on ranks other than 0
    else:
        state = engine.module.state_dict()
    ema_state = ema.model_state_dict(state or {}) if ema is not None else None
    if dist.is_main:
        out = {"model": {k: v.detach().float().cpu() for k, v in state.items()}, "config": to_dict(cfg)}
        if ema_state is not None:
            out["model_ema"] = {k: v.detach().float().cpu() for k, v in ema_state.items()}
        torch.save(out, run_dir / "model.pt")
    barrier()
