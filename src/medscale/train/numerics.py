"""Numerics guard: no training on through NaN, and an fp16 loss-scale collapse stops with advice."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as torch_dist

from medscale.config import TrainConfig

__all__ = ["NumericsGuard"]

log = logging.getLogger("medscale.train.numerics")


class NumericsGuard:
    """Stops a run that trains on garbage, with a message that says what to do.

    - A non-finite loss on any rank skips that micro-batch on every rank (no backward, no step, so
      no collective is left half-done); `train.max_nonfinite` in a row stop the run.
    - fp16: optimizer steps skipped for gradient overflow are counted and logged with the loss
      scale; `train.max_overflow_steps` in a row, or DeepSpeed reaching its minimum loss scale,
      stop the run and suggest bf16.
    """

    def __init__(self, engine: Any, cfg: TrainConfig, world: int):
        self.engine, self.cfg, self.world = engine, cfg, world
        self.fp16 = bool(engine.fp16_enabled())
        self.nonfinite_run = self.nonfinite_total = 0
        self.overflow_run = self.overflow_total = 0

    def check_loss(self, loss: torch.Tensor) -> float | None:
        """The loss averaged over ranks, or None when any rank's loss is not finite (then skip)."""
        if self.world == 1:
            value = loss.item()  # note: a device sync point, once per micro-batch
            finite = math.isfinite(value)
        else:
            ok = torch.isfinite(loss.detach())
            t = torch.stack([torch.where(ok, loss.detach().float(), 0.0), (~ok).float()])
            torch_dist.all_reduce(t)  # one tiny collective: every rank takes the same decision
            value, finite = t[0].item() / self.world, t[1].item() == 0
        if finite:
            self.nonfinite_run = 0
            return value
        self.nonfinite_run += 1
        self.nonfinite_total += 1
        log.warning("non-finite loss at optimizer step %d: micro-batch skipped on every rank (%d in a row, limit %d)",
                    self.engine.global_steps, self.nonfinite_run, self.cfg.max_nonfinite)
        if self.nonfinite_run >= self.cfg.max_nonfinite:
            raise FloatingPointError(
                f"{self.nonfinite_run} non-finite losses in a row at optimizer step {self.engine.global_steps}: "
                "the model diverged. Lower train.lr, raise train.warmup_steps, set train.grad_clip, or with fp16 "
                "switch to train.precision=bf16; check the data with `medscale inspect --verify`")
        return None

    def optimizer_step(self) -> bool:
        """``engine.step()`` (DeepSpeed steps the optimizer at accumulation boundaries only), counting
        fp16 overflow steps. True if an optimizer step was reached (applied or skipped for overflow)."""
        engine = self.engine
        before = engine.global_steps
        try:
            engine.step()
        except Exception as e:
            if "loss scale" in str(e).lower():
                raise FloatingPointError(self._collapse_message()) from e
            raise
        if engine.global_steps == before:
            return False
        if engine.was_step_applied():
            self.overflow_run = 0
            return True
        self.overflow_run += 1
        self.overflow_total += 1
        log.warning("optimizer step %d skipped for gradient overflow (%d in a row), loss scale now %s",
                    engine.global_steps, self.overflow_run, self.loss_scale())
        if self.overflow_run >= self.cfg.max_overflow_steps:
            raise FloatingPointError(self._collapse_message())
        return True

    def loss_scale(self) -> float | None:
        if not self.fp16:
            return None
        scale = getattr(self.engine.optimizer, "loss_scale", None)
        return float(scale) if scale is not None else None

    def figures(self) -> dict[str, float | int | None]:
        """Counters for the log line and the tracker."""
        out: dict[str, float | int | None] = {"nonfinite_skipped": self.nonfinite_total}
        if self.fp16:
            out.update(overflow_steps=self.overflow_total, loss_scale=self.loss_scale())
        return out

    def _collapse_message(self) -> str:
        return (f"fp16 loss scale collapsed at optimizer step {self.engine.global_steps}: {self.overflow_run} steps in a "
                f"row overflowed ({self.overflow_total} in all), loss scale {self.loss_scale()}. The gradients do not "
                "fit fp16's range: switch to train.precision=bf16 with a bf16 DeepSpeed config (e.g. "
                "ds_configs/zero2_bf16.json; needs A100/H100-class GPUs), or lower train.lr, raise "
                "train.warmup_steps or set train.grad_clip")
