"""Optimizer parameter groups (weight decay, layer-wise LR decay), AdamW/LAMB, the LR schedule.

Plain PyTorch: nothing here knows DeepSpeed; `medscale.train.engine` hands the result to it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from medscale.config import ConfigError, RunConfig, TrainConfig

__all__ = ["param_groups", "lr_factor", "build_optimizer"]


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
