"""The training loop. Read `train()` top to bottom; the details live in the functions below it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from medscale.checkpoint.checkpointer import Checkpointer, TrainState
from medscale.checkpoint.weights import preprocess_record, save_weights
from medscale.config import RunConfig, save_config, to_dict
from medscale.data.device import to_device
from medscale.data.loader import ShardStream, make_loader
from medscale.dist import DistInfo, all_gather_objects, barrier, init_distributed
from medscale.eval.results import save_result
from medscale.files import atomic_write
from medscale.formats.manifest import load_manifest
from medscale.logs import Progress
from medscale.tasks.base import Task, build_task
from medscale.train.ema import ModelEma
from medscale.train.engine import build_engine, input_dtype
from medscale.train.numerics import NumericsGuard
from medscale.train.preemption import EXIT_REQUEUE, STOPPED_FILE, StopRequest
from medscale.train.runlock import HOLDER_ENV, RunLock, RunLocked
from medscale.train.throughput import Throughput, device_peak_tflops
from medscale.train.tracking import Tracker

__all__ = ["run", "train", "train_step", "MicroStep", "seed_everything", "EXIT_DONE", "EXIT_REQUEUE", "DONE_FILE"]

log = logging.getLogger("medscale.train")

EXIT_DONE = 0  # the run trained all its steps and evaluated
DONE_FILE = "done.json"
"""Written by rank 0 last, after eval.json: the run finished `step` steps. Batch scripts read it so
that a requeued or chained job never trains a finished run again."""


def run(cfg: RunConfig, stop: StopRequest | None = None) -> int:
    """`medscale train` on this rank: train, then return the process's exit code (EXIT_DONE, or
    EXIT_REQUEUE after a stop signal: a checkpoint was saved, run the same command again)."""
    return EXIT_DONE if train(cfg, stop) is not None else EXIT_REQUEUE


def train(cfg: RunConfig, stop: StopRequest | None = None) -> dict[str, Any] | None:
    """Train, evaluate on the held-out test split, write eval.json and done.json; returns the test
    metrics, or None when a stop signal ended the run early (after every rank saved the same
    checkpoint). `stop`: handlers installed earlier by the caller (else installed here)."""
    stop = stop or StopRequest(cfg.checkpoint.every_minutes).install()  # first: from now on a signal is a clean stop
    manifest = load_manifest(cfg.data.shards)  # a manifest that is not plain data is refused before anything starts
    dist = init_distributed(cfg.dist.timeout_minutes)
    stop.world = dist.world
    with _claim_run_dir(cfg, dist):  # one writer per run directory, from before its first write to the end
        return _train(cfg, stop, dist, manifest)


def _train(cfg: RunConfig, stop: StopRequest, dist: DistInfo, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """`train` in a run directory this run holds."""
    run_dir = _prepare_run_dir(cfg, dist)
    seed_everything(cfg.train.seed)  # same initial weights on every rank

    task = build_task(cfg, manifest)  # checks the shards against the objective before any work
    model = task.build_model()
    flops = task.flops_per_sample()  # forward FLOPs of one sample, for MFU
    checkpointer = Checkpointer(cfg.checkpoint, run_dir, dist, last_step=cfg.train.steps, config=to_dict(cfg))
    plan = checkpointer.prepare_resume(cfg.train)  # another number of ranks: same global batch, universal checkpoint
    engine = build_engine(model, cfg, dist.world, overrides=plan.ds_overrides)
    ema = (ModelEma(engine, cfg.train.ema_decay, cfg.train.ema_warmup_power if cfg.train.ema_warmup else None,
                    cfg.train.ema_warmup_gamma) if cfg.train.ema_decay else None)
    guard = NumericsGuard(engine, cfg.train, dist.world)
    stream = _stream(cfg, manifest, cfg.data.train_split, dist, task, train=True,
                     accumulation=engine.gradient_accumulation_steps())
    state = TrainState()
    tracker = Tracker(cfg.logging, run_dir, dist.is_main, to_dict(cfg))
    parts = {"train": state, "loader": stream, "ema": ema, "tracker": tracker}  # everything a resume needs
    resumed = checkpointer.resume(engine, parts)  # leaves everything as it is when there is no complete checkpoint
    tracker.start(resumed_at=checkpointer.completed_at(resumed) if resumed else None)
    meter = Throughput(cfg.train.micro_batch_size * dist.world, flops,
                       device_peak_tflops(cfg.train.precision, cfg.train.peak_tflops), dist.world)
    log.info("training %s on %d samples, %d ranks, %d batches/epoch, steps %d..%d", cfg.model.name,
             stream.samples, dist.world, stream.batches_per_epoch(), state.step, cfg.train.steps)

    losses: list[float] = []
    stopped = False
    bar = Progress(cfg.train.steps, initial=state.step, desc="train", unit="step", enabled=dist.is_main,
                   samples_per_unit=cfg.train.micro_batch_size * dist.world * engine.gradient_accumulation_steps())
    while state.step < cfg.train.steps and not stopped:
        stream.set_epoch(state.epoch)
        for batch in meter.batches(make_loader(stream, engine.device)):
            out = train_step(engine, batch, task, guard)
            if out.loss is not None:
                losses.append(out.loss)
            if not out.stepped:
                continue  # DeepSpeed steps the optimizer only at accumulation boundaries
            state.step += 1
            bar.update(loss=f"{losses[-1]:.4f}" if losses else "-")
            if ema is not None and engine.was_step_applied():
                ema.update()
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
                _log_step(tracker, engine, state, losses, meter, guard, stream, cfg)
            score = None
            if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0:
                result = _evaluate(task, engine, ema, cfg, manifest, dist, cfg.data.eval_split, tracker, state.step)
                score = result.get(cfg.checkpoint.keep_best) if cfg.checkpoint.keep_best else None
            decision = stop.decide()  # one tiny all-reduce: every rank stops or saves at the same step
            if checkpointer.due(state.step) or decision.save or decision.stop:
                checkpointer.save(engine, state.step, parts, score=score)
                stop.saved()
            if decision.stop or state.step >= cfg.train.steps:
                stopped = decision.stop
                break
        else:
            state.epoch += 1  # the epoch ran out (not a break at the last step)
    bar.close()

    if stopped:
        return _stop(stop, tracker, run_dir, dist, state.step, checkpointer.newest())

    save_weights(engine, ema, cfg, preprocess_record(cfg, task), run_dir, dist)
    result = _evaluate(task, engine, ema, cfg, manifest, dist, cfg.data.test_split, tracker, state.step)
    if dist.is_main:
        save_result(result, run_dir / "eval.json")
        atomic_write(run_dir / DONE_FILE, json.dumps({"step": state.step, "time": time.time()}))
    tracker.summary({f"test/{k}": v for k, v in result.items()})
    tracker.close()
    barrier()
    return result


def _stop(stop: StopRequest, tracker: Tracker, run_dir: Path, dist: DistInfo, step: int,
          checkpoint: Path | None) -> None:
    """After the agreed save: say where the run stopped and leave the rest to the rerun."""
    log.warning("stopped by %s at step %d after saving %s: run the same command to continue (exit code %d)",
                stop.describe(), step, checkpoint, EXIT_REQUEUE)
    if dist.is_main:
        stop.write_marker(run_dir, step, checkpoint)
    tracker.close()
    barrier()
    return None


class MicroStep(NamedTuple):
    """What one micro-batch did."""

    loss: float | None
    """Loss averaged over ranks; None when the micro-batch was skipped for a non-finite loss."""
    stepped: bool
    """An optimizer step (accumulation boundary) was reached."""


def train_step(engine: Any, batch: dict[str, Any], task: Task, guard: NumericsGuard) -> MicroStep:
    """One micro-batch forward/backward, and the optimizer step at accumulation boundaries."""
    # The move, and on data.transforms_on=gpu the batched transforms, on the model's device.
    loss = task.loss(engine, to_device(batch, engine.device, input_dtype(engine)))
    value = guard.check_loss(loss)  # the same decision on every rank
    if value is None:
        return MicroStep(None, False)  # skipped everywhere: no backward, so no collective is left half-done
    engine.backward(loss)
    return MicroStep(value, guard.optimizer_step())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _claim_run_dir(cfg: RunConfig, dist: DistInfo) -> Iterator[None]:
    """Rank 0 holds the run directory's lock (or checks that the launch that started it does, through
    `HOLDER_ENV`); every rank learns whether it may go on, so all stop together when it may not.

    Raises:
        RunLocked: another process trains this run directory (on every rank).
    """
    lock = RunLock(cfg.out_dir)
    refused = None
    if dist.is_main:
        held = os.environ.get(HOLDER_ENV)
        try:
            if held:
                lock.adopt(held)
            else:
                lock.acquire()
        except RunLocked as e:
            refused = str(e)
        except OSError as e:  # a read-only or missing file system: every rank must hear of it, not wait
            refused = f"cannot lock run directory {cfg.out_dir}: {e.strerror or e}"
    refused = all_gather_objects(refused)[0]
    if refused is not None:
        raise RunLocked(refused)
    try:
        yield
    finally:
        lock.release()


def _prepare_run_dir(cfg: RunConfig, dist: DistInfo) -> Path:
    run_dir = Path(cfg.out_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / STOPPED_FILE).unlink(missing_ok=True)  # this start continues whatever stopped before
        (run_dir / DONE_FILE).unlink(missing_ok=True)  # written again when this start finishes
    barrier()
    return run_dir


def _stream(cfg: RunConfig, manifest: dict[str, Any], split: str, dist: DistInfo, task: Task,
            train: bool, accumulation: int = 1) -> ShardStream:
    mb = cfg.train.micro_batch_size if train else cfg.eval.micro_batch_size
    return ShardStream(cfg.data.shards, split, cfg.data, micro_batch=mb, rank=dist.rank, world=dist.world,
                       train=train, seed=cfg.train.seed, manifest=manifest, labels=task.needs_labels,
                       accumulation=accumulation)


def _log_step(tracker: Tracker, engine: Any, state: TrainState, losses: list[float], meter: Throughput,
              guard: NumericsGuard, stream: ShardStream, cfg: RunConfig) -> None:
    loss = sum(losses) / len(losses) if losses else float("nan")
    losses.clear()
    grad_norm = engine.get_global_grad_norm()
    values: dict[str, Any] = {"loss": loss, "lr": engine.get_lr()[0], "epoch": state.epoch,
                              "grad_norm": float(grad_norm) if grad_norm is not None else None,
                              "corrupt_samples": stream.stats()["corrupt_samples"],
                              **meter.report(), **guard.figures()}
    tracker.log(state.step, values, prefix="train/")
    mfu = f"{values['mfu']:.1%}" if values["mfu"] is not None else "-"
    fp16 = f"  loss scale {values['loss_scale']} ({values['overflow_steps']} overflow steps)" if guard.fp16 else ""
    log.info("step %d/%d  loss %.4f  lr %.2e  %.1f samples/s  mfu %s  data wait %.0f%%  peak mem %.2f GB%s",
             state.step, cfg.train.steps, loss, values["lr"], values["samples_per_s"], mfu,
             100 * values["data_wait_frac"], values["peak_mem_gb"], fp16)


def _evaluate(task: Task, engine: Any, ema: ModelEma | None, cfg: RunConfig, manifest: dict[str, Any],
              dist: DistInfo, split: str, tracker: Tracker, step: int) -> dict[str, Any]:
    stream = _stream(cfg, manifest, split, dist, task, train=False)
    use_ema = ema is not None and cfg.eval.use_ema
    with ema.applied() if use_ema else contextlib.nullcontext():  # type: ignore[union-attr]
        result = task.evaluate(engine, stream, input_dtype(engine), engine.device)
    result["objective"] = task.name  # what the report and W&B ask to draw it
    result["weights"] = "ema" if use_ema else "trained"
    level = result.get(f"{cfg.eval.aggregate}_level", {})
    tracker.log(step, {**result, **{f"{cfg.eval.aggregate}_level/{k}": v for k, v in level.items()}},
                prefix=f"{split}/")
    tracker.log_figures(step, lambda wandb: task.wandb_figures(wandb, split, result))
    return result
