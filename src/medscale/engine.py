"""The one place where a plain model meets DeepSpeed: ZeRO, precision, optimizer, schedule.

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
from torch import nn

from medscale.config import ConfigError, RunConfig

__all__ = ["resolve_ds_config", "param_groups", "lr_factor", "build_engine", "input_dtype"]

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
        ConfigError: unreadable JSON, an optimizer/scheduler section, fp16 without a GPU, or a
            value that contradicts the run config (the message names both).
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
    if ds["bf16"]["enabled"]:
        # Accumulate gradients in fp32: bf16 accumulation over many micro-batches diverges.
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    if not torch.cuda.is_available():
        ds.setdefault("zero_optimization", {})
        # With a client optimizer on CPU, offload would otherwise insist on DeepSpeedCPUAdam.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay for weight matrices; none for biases, norms, embeddings, tokens."""
    no_decay_names = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in no_decay_names or "pos_embed" in name or "token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Multiplier of train.lr at optimizer step `step`: linear warmup, then cosine to min_lr."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    floor = t.min_lr / t.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def input_dtype(engine: Any) -> torch.dtype:
    """The dtype the wrapped model expects for its inputs."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def build_engine(model: nn.Module, cfg: RunConfig, world: int) -> Any:
    """Wrap `model` in a DeepSpeed engine with medscale's optimizer and schedule."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    ds_config = resolve_ds_config(cfg, world)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=(0.9, 0.999), eps=1e-8)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        # DeepSpeed steps the scheduler once per optimizer step (at accumulation boundaries).
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg)),
        config=ds_config,
    )
    return engine
