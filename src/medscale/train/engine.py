"""The one place where a plain model meets DeepSpeed: ZeRO, precision, and wrapping the optimizer and schedule.

The run config is the single source of batch sizes, learning rate, clipping and precision. A
DeepSpeed JSON leaves those as ``"auto"`` and gets them filled in here; a JSON value that
contradicts the run config is an error naming both, never a silent override.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from medscale.config import ConfigError, RunConfig
from medscale.resources import resolve_resource
from medscale.train.optim import build_optimizer, lr_factor

__all__ = ["resolve_ds_config", "build_engine", "input_dtype"]

log = logging.getLogger("medscale.train.engine")

# DeepSpeed keeps these; medscale builds the optimizer and schedule itself (param groups, LLRD).
_FORBIDDEN = ("optimizer", "scheduler")


def _fill(ds: dict[str, Any], key: str, value: Any, source: str, path: str) -> None:
    have = ds.get(key, "auto")
    if have == "auto":
        ds[key] = value
    elif have != value:
        raise ConfigError(f"{path}: '{key}' is {have!r} but {source} gives {value!r}; set it to \"auto\" or make them agree")


def resolve_ds_config(cfg: RunConfig, world: int, path: str | Path | None = None,
                      overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read the DeepSpeed JSON and fill its "auto" values from the run config.

    Args:
        cfg: the run config.
        world: number of ranks.
        path: the DeepSpeed JSON (default: ``dist.deepspeed_config``).
        overrides: what a resume changes (`medscale.checkpoint.checkpointer.ResumePlan.ds_overrides`):
            ``gradient_accumulation_steps`` replaces train.grad_accum (the global batch follows),
            any other entry is merged into the JSON.

    Raises:
        ConfigError: unreadable JSON, an optimizer/scheduler section, fp16 without a GPU, a value
            that contradicts the run config (the message names both), or a combination DeepSpeed
            would run wrongly (LAMB on partitioned tensors, bf16 accumulation without ZeRO).
    """
    path = resolve_resource(path or cfg.dist.deepspeed_config, "ds_configs", "dist.deepspeed_config")
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
    overrides = dict(overrides or {})
    accum = int(overrides.pop("gradient_accumulation_steps", t.grad_accum))
    accum_source = f"train.grad_accum={t.grad_accum}"
    if accum != t.grad_accum:
        accum_source = f"the resume, which keeps the checkpoint's global batch ({accum_source} recomputed to {accum})"
        log.info("gradient accumulation %d (train.grad_accum=%d recomputed by the resume): global batch %d", accum,
                 t.grad_accum, t.micro_batch_size * accum * world)
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, f"train.micro_batch_size={t.micro_batch_size}", str(path))
    _fill(ds, "gradient_accumulation_steps", accum, accum_source, str(path))
    _fill(ds, "train_batch_size", t.micro_batch_size * accum * world,
          f"micro_batch_size x grad_accum x world ({t.micro_batch_size} x {accum} x {world})", str(path))
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
        if stage == 0 and accum > 1:
            raise ConfigError(f"{path}: bf16 without ZeRO (stage 0) accumulates gradients in bf16, which diverges over "
                              f"{accum} micro-batches ({accum_source}); use ZeRO stage >= 1 (fp32 accumulation)")
        if stage > 0:
            # Accumulate gradients in fp32: bf16 accumulation over many micro-batches diverges.
            ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    if t.optimizer == "lamb":
        _check_lamb(ds, stage, offload, world, str(path))
        ds["zero_allow_untested_optimizer"] = True
    if not torch.cuda.is_available():
        # With a client optimizer on CPU, offload would otherwise insist on DeepSpeedCPUAdam.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    _merge(ds, overrides)
    return ds


def _merge(ds: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Merge `extra` into `ds`, section by section."""
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(ds.get(k), dict):
            _merge(ds[k], v)
        else:
            ds[k] = dict(v) if isinstance(v, Mapping) else v


def _check_lamb(ds: dict[str, Any], stage: int, offload: bool, world: int, path: str) -> None:
    """LAMB's trust ratio is a per-tensor norm: it needs each tensor whole on one rank."""
    if offload:
        raise ConfigError(f"{path}: train.optimizer=lamb cannot run with optimizer offload (DeepSpeed offloads Adam only)")
    low_precision = ds["bf16"]["enabled"] or ds["fp16"]["enabled"]
    if world > 1 and (stage > 0 or low_precision):
        raise ConfigError(f"{path}: train.optimizer=lamb with {world} ranks needs ZeRO stage 0 and fp32 (got stage "
                          f"{stage}, bf16/fp16={low_precision}): DeepSpeed then splits tensors across ranks and each "
                          "rank's trust ratio would see only its slice; use train.optimizer=adamw")


def _cxx_compiler() -> str | None:
    """The C++ compiler inductor uses on the CPU ($CXX, else g++: torch._inductor.config.cpp.cxx), if found."""
    return shutil.which(os.environ.get("CXX", "g++"))


def input_dtype(engine: Any) -> torch.dtype:
    """The dtype the wrapped model expects for its inputs."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def build_engine(model: nn.Module, cfg: RunConfig, world: int, ds_config: dict[str, Any] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Any:
    """Wrap `model` in a DeepSpeed engine with medscale's optimizer and schedule.

    Args:
        model: the plain model (built on the CPU; DeepSpeed moves it to the device).
        cfg: the run config.
        world: number of ranks.
        ds_config: an already resolved DeepSpeed config (default: `resolve_ds_config`).
        overrides: what a resume changes in the DeepSpeed config (`ResumePlan.ds_overrides`); give
            them to `resolve_ds_config` instead when passing `ds_config`.
    """
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    if ds_config is not None and overrides:
        raise ValueError("pass the overrides to resolve_ds_config when giving build_engine a resolved ds_config")
    ds_logger.setLevel(logging.WARNING)
    ds_config = ds_config or resolve_ds_config(cfg, world, overrides=overrides)
    optimizer = build_optimizer(model, cfg.train, ds_config)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        # DeepSpeed steps the scheduler once per applied optimizer step (not on fp16 overflow).
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg)),
        config=ds_config,
    )
    if cfg.train.compile:
        _compile(engine)
    return engine


def _compile(engine: Any) -> None:
    """torch.compile the engine's module in place (DeepSpeed's ``engine.compile()``).

    DeepSpeed calls ``nn.Module.compile()``, which compiles the module's call without wrapping it in
    an ``OptimizedModule``: ``engine.module`` stays the timm model, so its state dict, the
    checkpoints, the EMA and ``model.pt`` keep the plain parameter names (no ``_orig_mod.``).
    Compilation happens lazily, in the first forward (and again in the first evaluation, which runs
    without gradients).
    """
    if not torch.cuda.is_available() and not _cxx_compiler():
        # Inductor generates C++ for CPU kernels; fail before any step rather than in the first forward.
        raise ConfigError("train.compile=true on a CPU needs a C++ compiler (inductor builds its CPU kernels with "
                          "g++ or $CXX), and none was found; install one (Debian: apt-get install g++) or set "
                          "train.compile=false")
    # Batch shapes are fixed by design (training drops the ragged tail, evaluation pads its last
    # micro-batch), so static shapes: one graph for training and one for evaluation, never a
    # slower dynamic-shape graph made after the first shape change.
    from deepspeed.accelerator import get_accelerator

    backend = get_accelerator().get_compile_backend()  # inductor on CUDA and on DeepSpeed's CPU accelerator
    engine.compile(backend=backend, compile_kwargs={"dynamic": False})
    log.info("train.compile: the model is compiled with torch.compile (backend %s) in its first forward", backend)
