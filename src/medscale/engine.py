"""The one place where a plain model meets DeepSpeed: ZeRO, precision, optimizer, schedule, numerics.

The run config is the single source of batch sizes, learning rate, clipping and precision. A
DeepSpeed JSON leaves those as ``"auto"`` and gets them filled in here; a JSON value that
contradicts the run config is an error naming both, never a silent override.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from medscale.config import ConfigError, RunConfig, TrainConfig

__all__ = ["resolve_ds_config", "param_groups", "lr_factor", "build_optimizer", "build_engine", "input_dtype",
           "NumericsGuard"]

log = logging.getLogger("medscale.engine")

# DeepSpeed keeps these; medscale builds the optimizer and schedule itself (param groups, LLRD).
_FORBIDDEN = ("optimizer", "scheduler")


def _fill(ds: dict[str, Any], key: str, value: Any, source: str, path: str) -> None:
    have = ds.get(key, "auto")
    if have == "auto":
        ds[key] = value
    elif have != value:
        raise ConfigError(f"{path}: '{key}' is {have!r} but {source} gives {value!r}; set it to \"auto\" or make them agree")


def resolve_ds_config(cfg: RunConfig, world: int, path: str | Path | None = None) -> dict[str, Any]:
    """Read the DeepSpeed JSON and fill its "auto" values from the run config.

    Raises:
        ConfigError: unreadable JSON, an optimizer/scheduler section, fp16 without a GPU, a value
            that contradicts the run config (the message names both), or a combination DeepSpeed
            would run wrongly (LAMB on partitioned tensors, bf16 accumulation without ZeRO).
    """
    path = Path(path or cfg.dist.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"dist.deepspeed_config: cannot read {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"dist.deepspeed_config: {path} is not valid JSON: {e}") from e
    for k in _FORBIDDEN:
        if k in ds:
            raise ConfigError(f"{path}: remove the '{k}' section; medscale builds it from train.* (lr, weight_decay, warmup_steps)")
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, f"train.micro_batch_size={t.micro_batch_size}", str(path))
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, f"train.grad_accum={t.grad_accum}", str(path))
    _fill(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * world,
          f"micro_batch_size x grad_accum x world ({t.micro_batch_size} x {t.grad_accum} x {world})", str(path))
    _fill(ds, "gradient_clipping", t.grad_clip, f"train.grad_clip={t.grad_clip}", str(path))
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        _fill(section, "enabled", t.precision == name, f"train.precision={t.precision}", f"{path} [{name}]")
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator refuses fp16); use bf16 or fp32")
    zero = ds.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if ds["bf16"]["enabled"]:
        if stage == 0 and t.grad_accum > 1:
            raise ConfigError(f"{path}: bf16 without ZeRO (stage 0) accumulates gradients in bf16, which diverges over "
                              f"train.grad_accum={t.grad_accum} micro-batches; use ZeRO stage >= 1 (fp32 accumulation)")
        if stage > 0:
            # Accumulate gradients in fp32: bf16 accumulation over many micro-batches diverges.
            ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    if t.optimizer == "lamb":
        _check_lamb(ds, stage, offload, world, str(path))
        ds["zero_allow_untested_optimizer"] = True
    if not torch.cuda.is_available():
        # With a client optimizer on CPU, offload would otherwise insist on DeepSpeedCPUAdam.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def _check_lamb(ds: dict[str, Any], stage: int, offload: bool, world: int, path: str) -> None:
    """LAMB's trust ratio is a per-tensor norm: it needs each tensor whole on one rank."""
    if offload:
        raise ConfigError(f"{path}: train.optimizer=lamb cannot run with optimizer offload (DeepSpeed offloads Adam only)")
    low_precision = ds["bf16"]["enabled"] or ds["fp16"]["enabled"]
    if world > 1 and (stage > 0 or low_precision):
        raise ConfigError(f"{path}: train.optimizer=lamb with {world} ranks needs ZeRO stage 0 and fp32 (got stage "
                          f"{stage}, bf16/fp16={low_precision}): DeepSpeed then splits tensors across ranks and each "
                          "rank's trust ratio would see only its slice; use train.optimizer=adamw")


def _layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Depth index of each parameter (stem 0 ... head last) from timm's group_matcher."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        raise ConfigError(f"train.layer_decay needs a model with timm's group_matcher(); {type(model).__name__} has none")
    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    return layer_of, max(layer_of.values()) + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 per_tensor: bool = False) -> list[dict[str, Any]]:
    """Optimizer parameter groups with weight decay and layer-wise LR scales.

    No weight decay for biases, norms (any 1-D tensor), position embeddings and class/register
    tokens. With ``layer_decay < 1`` block i of L gets ``lr_scale = layer_decay ** (L - i)``: the
    head and final norm train at the full rate, the patch embedding slowest (BEiT-style fine-tuning).

    Args:
        model: the plain model.
        weight_decay: decay of the weight matrices.
        layer_decay: LR decay per block from the head down; 1.0 disables.
        per_tensor: one group per tensor (LAMB needs each tensor's own trust ratio).

    Returns:
        Groups with ``params``, ``weight_decay``, ``lr_scale`` and ``names``.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    layer_of, n_layers = _layer_ids(model) if layer_decay < 1.0 else ({}, 1)
    groups: dict[Any, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip or "pos_embed" in name or "token" in name
        decay = 0.0 if no_decay else weight_decay
        layer = layer_of.get(name, n_layers - 1)  # unmatched (the head) counts as the top layer
        scale = layer_decay ** (n_layers - 1 - layer)
        key = name if per_tensor else (layer, decay)
        group = groups.setdefault(key, {"params": [], "weight_decay": decay, "lr_scale": scale, "names": []})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Multiplier of train.lr at optimizer step `step`: linear warmup, then cosine to min_lr."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    floor = t.min_lr / t.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig, ds_config: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW (DeepSpeed's CPU Adam when ZeRO offloads the optimizer to a GPU run's host) or LAMB."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, per_tensor=cfg.optimizer == "lamb")
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]  # LambdaLR scales each group's own initial lr
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.optimizer == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if torch.cuda.is_available() and offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=torch.cuda.is_available() or None)


def input_dtype(engine: Any) -> torch.dtype:
    """The dtype the wrapped model expects for its inputs."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def build_engine(model: nn.Module, cfg: RunConfig, world: int, ds_config: dict[str, Any] | None = None) -> Any:
    """Wrap `model` in a DeepSpeed engine with medscale's optimizer and schedule.

    Args:
        model: the plain model (built on the CPU; DeepSpeed moves it to the device).
        cfg: the run config.
        world: number of ranks.
        ds_config: an already resolved DeepSpeed config (default: `resolve_ds_config`).
    """
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    ds_config = ds_config or resolve_ds_config(cfg, world)
    optimizer = build_optimizer(model, cfg.train, ds_config)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        # DeepSpeed steps the scheduler once per applied optimizer step (not on fp16 overflow).
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg)),
        config=ds_config,
    )
    return engine


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

    def step(self) -> bool:
        """``engine.step()``; at an accumulation boundary, count an fp16 overflow. True if a step was taken."""
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
