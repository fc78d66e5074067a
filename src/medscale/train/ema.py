"""Exponential moving average of the weights, under every ZeRO stage including ZeRO-3.

Each rank averages the weights it holds, in fp32, and with 16-bit training the fp32 *master*
weights, never their 16-bit rounding:

- fp32 training: the module's parameters (they are the master copy); under ZeRO-3 this rank's
  partition of each (``param.ds_tensor``).
- bf16/fp16 with ZeRO-1/2 (and DeepSpeed's bf16 optimizer): this rank's fragment of the fp32
  master copy the optimizer updates (the ``hp_fragment`` DeepSpeed links to each parameter, a
  view: no copy per step). Each rank averages only its slice, so the EMA costs 4 bytes per
  parameter divided by the number of ranks.
- bf16/fp16 with ZeRO-3: this rank's partition of the fp32 master (DeepSpeed's public
  ``safe_get_local_fp32_param``, also a view).

Warm-up (timm's ``ModelEmaV3`` form, on by default through ``train.ema_warmup``): update ``t`` (from
0) uses ``min(decay, 1 - (1 + t / gamma) ** -power)``, so the first update copies the weights and the
decay grows with the steps taken (power 2/3, gamma 1: 0.954 at step 100, 0.99 at about 1,000, 0.999 at
about 31,600), an average over roughly the last third of the steps until it reaches ``decay``. Without it, an evaluation after 2,000 steps at 0.9998 would score weights that are still
0.9998^2000 = 67% the initial ones, and ``checkpoint.keep_best`` would rank such evaluations.

Checkpoints hold the consolidated EMA (gathered once, on every rank), so it does not depend on the
number of ranks: `load_state_dict` takes each rank's slice again. For evaluation, `applied()`
swaps the EMA into the live model and restores the trained weights afterwards (the optimizer's
master copy is never touched).
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
    """The part of `p` this rank holds in the live model: its ZeRO-3 partition (flat) or the whole tensor."""
    return p.ds_tensor if _zero3(p) else p.data


def _master(p: nn.Parameter) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """What this rank averages for `p`: an fp32 tensor, and where it sits in the flattened parameter
    when it is only a fragment of it (ZeRO-1/2 master weights), else None."""
    live = _local(p)
    if live.dtype == torch.float32:
        return live, None
    if _zero3(p):
        from deepspeed.utils import safe_get_local_fp32_param

        master = safe_get_local_fp32_param(p)
        return (master, None) if master is not None and master.shape == live.shape else (live, None)
    mapping = getattr(p, "_hp_mapping", None)  # set by DeepSpeed's link_hp_params for ZeRO-1/2 and bf16
    if mapping is None:
        return live.new_empty(0, dtype=torch.float32), (0, 0)  # no slice of this parameter on this rank
    address = mapping.lp_fragment_address
    return mapping.hp_fragment.view(-1), (int(address.start), int(address.numel))


class ModelEma:
    """EMA of a model's parameters, each rank over the parameters (or partitions) it holds.

    Args:
        model: the DeepSpeed engine or the plain module (parameters are read through ``.module``
            when present). Build it after ``deepspeed.initialize``: ZeRO-3 partitions then.
        decay: weight of the old average per update, e.g. 0.9998.
        warmup_power: the warm-up's power (timm's default 2/3; 3/4 for shorter runs); None: no warm-up,
            every update uses `decay`.
        warmup_gamma: the warm-up's step scale (timm's default 1).
    """

    def __init__(self, model: Any, decay: float, warmup_power: float | None = None, warmup_gamma: float = 1.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if warmup_power is not None and (warmup_power <= 0 or warmup_gamma <= 0):
            raise ValueError(f"EMA warm-up power and gamma must be > 0, got {warmup_power} and {warmup_gamma}")
        self.engine = model
        self.module: nn.Module = getattr(model, "module", model)
        self.decay = decay
        self.warmup_power, self.warmup_gamma = warmup_power, warmup_gamma
        self.named = [(n, p) for n, p in self.module.named_parameters()]
        masters = [_master(p) for _, p in self.named]
        self.slices = [where for _, where in masters]  # None: the whole local tensor
        self.shadow = [m.detach().float().clone() for m, _ in masters]
        self.updates = 0

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the current weights."""
        for (_, p), s in zip(self.named, self.shadow):
            s.copy_(_master(p)[0])
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses: `decay`, or less during the warm-up (0 for the first update)."""
        if self.warmup_power is None:
            return self.decay
        t = self.updates
        if t <= 0:
            return 0.0
        return min(self.decay, 1.0 - (1.0 + t / self.warmup_gamma) ** -self.warmup_power)

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current weights: ema = d * ema + (1 - d) * w, d = `current_decay`."""
        current = [_master(p)[0] for _, p in self.named]  # views: no copy
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.current_decay())
        self.updates += 1

    # -- consolidation ------------------------------------------------------------------------------

    @torch.no_grad()
    def _full(self, i: int) -> torch.Tensor:
        """Parameter i's EMA as a whole tensor (a collective under ZeRO-3 and for ZeRO-1/2 fragments: call on every rank)."""
        _, p = self.named[i]
        local = self.shadow[i]
        if self.slices[i] is not None:  # a ZeRO-1/2 fragment: every rank adds its slice into zeros
            start, numel = self.slices[i]
            full = torch.zeros(p.numel(), dtype=torch.float32, device=_comm_device())
            full[start:start + numel] = local
            torch_dist.all_reduce(full)
            return full.view(p.shape).to(local.device)
        if not _zero3(p):
            return local
        group = getattr(p, "ds_process_group", None)
        world = torch_dist.get_world_size(group=group)
        send = local.to(_comm_device())
        parts = [torch.empty_like(send) for _ in range(world)]
        torch_dist.all_gather(parts, send, group=group)
        return torch.cat(parts)[: p.ds_numel].view(p.ds_shape).to(local.device)

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "updates", "warmup_power", "warmup_gamma", "params": {name: fp32 tensor on CPU}}``,
        whole tensors, on every rank. ``updates`` places a resumed warm-up where it stopped.

        This gathers one parameter at a time under ZeRO (fragments, partitions): every rank must call it.
        """
        params = {n: self._full(i).detach().cpu().clone() for i, (n, _) in enumerate(self.named)}
        return {"decay": self.decay, "updates": self.updates, "warmup_power": self.warmup_power,
                "warmup_gamma": self.warmup_gamma, "params": params}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take this rank's part of a consolidated EMA (any number of ranks may have written it)."""
        params = state["params"]
        missing = [n for n, _ in self.named if n not in params]
        if missing:
            raise ValueError(f"EMA state lacks parameters {missing[:5]} (of {len(missing)})")
        for i, (n, p) in enumerate(self.named):
            full = params[n].float()
            if tuple(full.shape) != _shape(p):
                raise ValueError(f"EMA of {n} has shape {tuple(params[n].shape)}, the model {_shape(p)}")
            if self.slices[i] is not None:
                start, numel = self.slices[i]
                self.shadow[i].copy_(full.flatten()[start:start + numel])
                continue
            if _zero3(p):
                group = getattr(p, "ds_process_group", None)
                rank = torch_dist.get_rank(group=group)
                size = self.shadow[i].numel()
                flat = torch.zeros(size * torch_dist.get_world_size(group=group))
                flat[: full.numel()] = full.flatten()
                full = flat[rank * size:(rank + 1) * size]
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
        # A fragment is gathered into the whole tensor the live model holds (a collective).
        self._write([self._full(i) if where is not None else s
                     for i, (s, where) in enumerate(zip(self.shadow, self.slices))])
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


def _shape(p: nn.Parameter) -> tuple[int, ...]:
    return tuple(p.ds_shape) if _zero3(p) else tuple(p.shape)


def _comm_device() -> torch.device:
    """Where collectives want their tensors: the current GPU under NCCL, else the CPU."""
    if torch_dist.is_initialized() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
