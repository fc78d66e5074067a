"""Checkpoints that are either complete or ignored: DeepSpeed's engine state plus a dict of stateful parts.

The checkpointer is handed the engine and a dict of *parts*, objects with ``state_dict()`` and
``load_state_dict()`` (the train state, the loader, the EMA, the tracker; a new piece of state
adds itself to the dict). It does not know what they hold.

Layout of ``<out_dir>/checkpoints/``::

    step00000100/            DeepSpeed's files: model, ZeRO optimizer partitions, and a client state
                             with the step, world size and resolved config
        parts.pt             every part's state_dict, saved by rank 0 (parts are rank-independent;
                             a part whose state_dict is a collective, such as the ZeRO-3 EMA, is
                             asked on every rank)
        rng_rank<r>.pt       each rank's Python/NumPy/torch RNG states
        complete.json        written last, by rank 0, after every rank has finished writing
    latest                   tag of the newest complete checkpoint (DeepSpeed's tools read it)

DeepSpeed writes its own ``latest`` on rank 0 before the other ranks have finished their shards,
so a kill in between would point at a torn checkpoint. Here DeepSpeed's is switched off, every
rank saves, a barrier waits for all of them, and only then ``complete.json`` and ``latest`` are
written (atomically). Resume takes the newest directory holding ``complete.json``.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch

from medscale.config import CheckpointConfig, ConfigError
from medscale.dist import DistInfo, barrier
from medscale.files import atomic_write

__all__ = ["Checkpointer", "Stateful", "TrainState", "COMPLETE", "PARTS"]

log = logging.getLogger("medscale.checkpoint")

_TAG = re.compile(r"^step(\d{8,})$")
COMPLETE = "complete.json"
PARTS = "parts.pt"


class Stateful(Protocol):
    """A part of the training state. It may also have ``reset()``, called when a checkpoint holds no
    state for it (a part added since), so it can start from what the engine loaded."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainState:
    """Where training is: optimizer steps taken and the current epoch."""

    def __init__(self, step: int = 0, epoch: int = 0):
        self.step, self.epoch = step, epoch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])


class Checkpointer:
    """Saves on every rank and resumes from the newest complete checkpoint.

    Args:
        cfg: the ``checkpoint`` section.
        run_dir: the run directory (checkpoints go to ``run_dir/checkpoints``).
        dist: this process's rank and world size.
        last_step: the run's final step, which is always saved.
        config: the resolved run config, stored in every checkpoint.
    """

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, dist: DistInfo, *, last_step: int,
                 config: Mapping[str, Any] | None = None):
        if cfg.keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1, got {cfg.keep}")
        self.cfg, self.dist, self.run_dir = cfg, dist, run_dir
        self.last_step, self.config = last_step, dict(config or {})
        self.root = run_dir / "checkpoints"

    def due(self, step: int) -> bool:
        """Save now? Every ``checkpoint.every_steps`` and at the last step."""
        every = self.cfg.every_steps
        return step == self.last_step or bool(every and step % every == 0)

    def save(self, engine: Any, step: int, parts: Mapping[str, Stateful | None]) -> Path:
        """Write the checkpoint of `step` (every rank must call it, with the same parts)."""
        tag = f"step{step:08d}"
        path = self.root / tag
        client = {"medscale": {"step": step, "world": self.dist.world, "config": self.config}}
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False)
        states = {name: part.state_dict() for name, part in parts.items() if part is not None}  # may be collectives
        path.mkdir(parents=True, exist_ok=True)  # ranks that DeepSpeed gave nothing to write
        if self.dist.is_main:
            torch.save(states, path / PARTS)
        torch.save(_rng_state(), path / f"rng_rank{self.dist.rank}.pt")
        barrier()  # every rank's files are on disk
        if self.dist.is_main:
            atomic_write(path / COMPLETE, json.dumps({"step": step, "world": self.dist.world, "parts": sorted(states),
                                                      "time": time.time()}))
            atomic_write(self.root / "latest", tag)
            self._prune()
        barrier()
        log.info("saved checkpoint %s", path)
        return path

    def newest(self) -> Path | None:
        """The newest complete checkpoint directory, if any."""
        done = [p for p in self._tags() if (p / COMPLETE).exists()]
        return done[-1] if done else None

    def resume(self, engine: Any, parts: Mapping[str, Stateful | None]) -> Path | None:
        """Load the newest complete checkpoint into the engine, the parts and this rank's RNG.

        Returns the checkpoint directory, or None when there is none (or ``checkpoint.resume`` is off):
        then everything stays as it is.

        Raises:
            RuntimeError: the checkpoint was written by another number of ranks under ZeRO (its
                optimizer state is partitioned by rank), or DeepSpeed cannot load it.
        """
        path = self.newest() if self.cfg.resume else None
        if path is None:
            return None
        info = json.loads((path / COMPLETE).read_text())
        if info["world"] != self.dist.world and engine.zero_optimization_stage() > 0:
            raise RuntimeError(
                f"checkpoint {path} was written by {info['world']} ranks, this run has {self.dist.world}: ZeRO "
                "partitions the optimizer state by rank count. Resume with the same number of ranks, or start "
                "a new out_dir with model.weights pointing at the run's model.pt")
        loaded, client = engine.load_checkpoint(str(self.root), tag=path.name)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        states = _read_parts(path, client)
        for name, part in parts.items():
            if part is None:
                continue
            if name in states:
                part.load_state_dict(states[name])
            else:
                log.warning("checkpoint %s holds no state of %r: it starts from the loaded weights", path, name)
                reset = getattr(part, "reset", None)
                if reset is not None:
                    reset()
        rng = path / f"rng_rank{self.dist.rank}.pt"
        if rng.exists() and info["world"] == self.dist.world:
            _set_rng_state(torch.load(rng, weights_only=True))
        log.info("resumed from %s at step %d", path, info["step"])
        return path

    def _tags(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
        return [p for _, p in sorted(found)]

    def _prune(self) -> None:
        """Keep the newest `checkpoint.keep` complete checkpoints; drop torn ones older than those."""
        tags = self._tags()
        done = [p for p in tags if (p / COMPLETE).exists()]
        keep = set(done[-self.cfg.keep:])
        newest = done[-1]
        for p in tags:
            if p not in keep and (p in done or p.name < newest.name):
                shutil.rmtree(p, ignore_errors=True)


def _read_parts(path: Path, client: dict[str, Any]) -> dict[str, Any]:
    """The parts' states; checkpoints of medscale 0.1 kept them in the client state and ``ema.pt``."""
    if (path / PARTS).exists():
        return torch.load(path / PARTS, map_location="cpu", weights_only=True)
    meta = client.get("medscale", {})
    states: dict[str, Any] = {"train": {"step": meta["step"], "epoch": meta["epoch"]}}
    if meta.get("loader") is not None:
        states["loader"] = meta["loader"]
    if meta.get("wandb_id"):
        states["tracker"] = {"wandb_id": meta["wandb_id"]}
    if (path / "ema.pt").exists():
        states["ema"] = torch.load(path / "ema.pt", map_location="cpu", weights_only=True)
    return states


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(x: Any) -> Any:
    """random.setstate wants tuples where a round trip through torch.save may give lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
