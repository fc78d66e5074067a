"""Exponential moving average of the weights, under every ZeRO stage including ZeRO-3.

Each rank averages the weights it holds: the whole model under ZeRO-0/1/2 (where every rank has
all parameters), and under ZeRO-3 only its own partition of each parameter (``param.ds_tensor``),
so the EMA costs 4 bytes per parameter divided by the number of ranks. The average is kept in
fp32 and updated from the working weights after each applied optimizer step.

Checkpoints hold the consolidated EMA (gathered once, on every rank), so it does not depend on the
number of ranks: `load_state_dict` takes each rank's slice again. For evaluation, `applied()`
swaps the EMA into the live model and restores the trained weights afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as torch_dist
from torch import nn

__all__ = ["ModelEma"]


def _zero3(p: nn.Parameter) -> bool:
    return getattr(p, "ds_tensor", None) is not None


def _local(p: nn.Parameter) -> torch.Tensor:
    """The part of `p` this rank owns: its ZeRO-3 partition (flat) or the whole tensor."""
    return p.ds_tensor if _zero3(p) else p.data


class ModelEma:
    """EMA of a model's parameters, each rank over the parameters (or partitions) it holds.

    Args:
        model: the DeepSpeed engine or the plain module (parameters are read through ``.module``
            when present). Build it after ``deepspeed.initialize``: ZeRO-3 partitions then.
        decay: weight of the old average per update, e.g. 0.9998.
    """

    def __init__(self, model: Any, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.engine = model
        self.module: nn.Module = getattr(model, "module", model)
        self.decay = decay
        self.named = [(n, p) for n, p in self.module.named_parameters()]
        self.shadow = [_local(p).detach().float().clone() for _, p in self.named]
        self.updates = 0

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the current weights."""
        for (_, p), s in zip(self.named, self.shadow):
            s.copy_(_local(p))
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current weights: ema = decay * ema + (1 - decay) * w."""
        current = [_local(p) for _, p in self.named]
        if any(t.dtype != torch.float32 for t in current):
            current = [t.float() for t in current]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)
        self.updates += 1

    # -- consolidation ------------------------------------------------------------------------------

    @torch.no_grad()
    def _full(self, i: int) -> torch.Tensor:
        """Parameter i's EMA as a whole tensor (a collective under ZeRO-3: call on every rank)."""
        _, p = self.named[i]
        local = self.shadow[i]
        if not _zero3(p):
            return local
        group = getattr(p, "ds_process_group", None)
        world = torch_dist.get_world_size(group=group)
        send = local.to(_comm_device())
        parts = [torch.empty_like(send) for _ in range(world)]
        torch_dist.all_gather(parts, send, group=group)
        return torch.cat(parts)[: p.ds_numel].view(p.ds_shape).to(local.device)

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "updates", "params": {name: fp32 tensor on CPU}}``, whole tensors, on every rank.

        Under ZeRO-3 this gathers one parameter at a time: every rank must call it.
        """
        params = {n: self._full(i).detach().cpu().clone() for i, (n, _) in enumerate(self.named)}
        return {"decay": self.decay, "updates": self.updates, "params": params}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take this rank's part of a consolidated EMA (any number of ranks may have written it)."""
        params = state["params"]
        missing = [n for n, _ in self.named if n not in params]
        if missing:
            raise ValueError(f"EMA state lacks parameters {missing[:5]} (of {len(missing)})")
        for i, (n, p) in enumerate(self.named):
            full = params[n].float()
            if _zero3(p):
                group = getattr(p, "ds_process_group", None)
                rank = torch_dist.get_rank(group=group)
                size = self.shadow[i].numel()
                flat = torch.zeros(size * torch_dist.get_world_size(group=group))
                flat[: full.numel()] = full.flatten()
                full = flat[rank * size:(rank + 1) * size]
            if full.shape != self.shadow[i].shape:
                raise ValueError(f"EMA of {n} has shape {tuple(params[n].shape)}, the model {tuple(p.shape)}")
            self.shadow[i].copy_(full)
        self.updates = int(state.get("updates", 0))

    def model_state_dict(self, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full model state dict: the EMA parameters plus the buffers of `live` (e.g. norm statistics).

        Collective under ZeRO-3 (every rank must call it); `live` may be empty on ranks other than 0.
        """
        ema = self.state_dict()["params"]
        return {k: ema.get(k, v) for k, v in live.items()} if live else ema

    # -- evaluation with the EMA --------------------------------------------------------------------

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model computes with the EMA weights (every rank must enter it)."""
        backup = [_local(p).detach().clone() for _, p in self.named]
        self._write(self.shadow)
        try:
            yield
        finally:
            self._write(backup)

    @torch.no_grad()
    def _write(self, values: list[torch.Tensor]) -> None:
        optimizer = getattr(self.engine, "optimizer", None)
        zero3 = any(_zero3(p) for _, p in self.named)
        # ZeRO-3 keeps small "persistent" parameters gathered on every rank: release them so the
        # gathered copies are rebuilt from the partitions just written (what DeepSpeed's own
        # checkpoint loading does).
        if zero3 and hasattr(optimizer, "checkpoint_event_prologue"):
            optimizer.checkpoint_event_prologue()
        for (_, p), v in zip(self.named, values):
            _local(p).copy_(v)
        if zero3 and hasattr(optimizer, "checkpoint_event_epilogue"):
            optimizer.checkpoint_event_epilogue()


def _comm_device() -> torch.device:
    """Where collectives want their tensors: the current GPU under NCCL, else the CPU."""
    if torch_dist.is_initialized() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
