"""Checkpoints that are either complete or ignored: weights, optimizer, EMA, step, loader, RNG, config.

Layout of ``<out_dir>/checkpoints/``::

    step00000100/            DeepSpeed's files: model, ZeRO optimizer partitions, and a client state
                             with step, epoch, loader position, resolved config, W&B run id
        ema.pt               consolidated fp32 EMA (independent of the number of ranks)
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
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medscale.config import ConfigError, RunConfig, to_dict
from medscale.dist import DistInfo, barrier

__all__ = ["Checkpointer", "TrainState"]

log = logging.getLogger("medscale.checkpoint.checkpointer")

_TAG = re.compile(r"^step(\d{8,})$")
COMPLETE = "complete.json"


class TrainState:
    """Where training is: optimizer steps taken and the current epoch."""

    def __init__(self, step: int = 0, epoch: int = 0):
        self.step, self.epoch = step, epoch


class Checkpointer:
    """Saves on every rank and resumes from the newest complete checkpoint.

    Args:
        cfg: the run config (``checkpoint.*``; the resolved config goes into every checkpoint).
        run_dir: the run directory.
        dist: this process's rank and world size.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, dist: DistInfo):
        if cfg.checkpoint.keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
        self.cfg, self.dist, self.run_dir = cfg, dist, run_dir
        self.root = run_dir / "checkpoints"

    def due(self, step: int) -> bool:
        """Save now? Every ``checkpoint.every_steps`` and at the last step."""
        every = self.cfg.checkpoint.every_steps
        return step == self.cfg.train.steps or bool(every and step % every == 0)

    def save(self, engine: Any, state: TrainState, stream: Any = None, ema: Any = None) -> Path:
        """Write a checkpoint of the current step (every rank must call it)."""
        tag = f"step{state.step:08d}"
        path = self.root / tag
        wandb_id = self.run_dir / "wandb_id"
        client = {"medscale": {"step": state.step, "epoch": state.epoch, "world": self.dist.world,
                               "loader": stream.state_dict() if hasattr(stream, "state_dict") else None,
                               "config": to_dict(self.cfg),
                               "wandb_id": wandb_id.read_text().strip() if wandb_id.exists() else None}}
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False)
        ema_state = ema.state_dict() if ema is not None else None  # a collective under ZeRO-3
        if self.dist.is_main and ema_state is not None:
            torch.save(ema_state, path / "ema.pt")
        path.mkdir(parents=True, exist_ok=True)  # ranks that DeepSpeed gave nothing to write
        torch.save(_rng_state(), path / f"rng_rank{self.dist.rank}.pt")
        barrier()  # every rank's files are on disk
        if self.dist.is_main:
            _atomic_write(path / COMPLETE, json.dumps({"step": state.step, "world": self.dist.world,
                                                       "time": time.time()}))
            _atomic_write(self.root / "latest", tag)
            self._prune()
        barrier()
        log.info("saved checkpoint %s", path)
        return path

    def newest(self) -> Path | None:
        """The newest complete checkpoint directory, if any."""
        done = [p for p in self._tags() if (p / COMPLETE).exists()]
        return done[-1] if done else None

    def resume(self, engine: Any, stream: Any = None, ema: Any = None) -> TrainState:
        """Load the newest complete checkpoint into engine, EMA, loader and RNG; a fresh state if none.

        Raises:
            RuntimeError: the checkpoint was written by another number of ranks under ZeRO (its
                optimizer state is partitioned by rank), or DeepSpeed cannot load it.
        """
        path = self.newest() if self.cfg.checkpoint.resume else None
        if path is None:
            return TrainState()
        info = json.loads((path / COMPLETE).read_text())
        if info["world"] != self.dist.world and engine.zero_optimization_stage() > 0:
            raise RuntimeError(
                f"checkpoint {path} was written by {info['world']} ranks, this run has {self.dist.world}: ZeRO "
                "partitions the optimizer state by rank count. Resume with the same number of ranks, or start "
                "a new out_dir with model.weights pointing at the run's model.pt")
        loaded, client = engine.load_checkpoint(str(self.root), tag=path.name)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        meta = client["medscale"]
        if ema is not None:
            if (path / "ema.pt").exists():
                ema.load_state_dict(torch.load(path / "ema.pt", map_location="cpu", weights_only=True))
            else:
                log.warning("checkpoint %s has no EMA: the EMA restarts from the loaded weights", path)
                ema.reset()
        rng = path / f"rng_rank{self.dist.rank}.pt"
        if rng.exists() and info["world"] == self.dist.world:
            _set_rng_state(torch.load(rng, weights_only=True))
        if meta.get("loader") is not None and hasattr(stream, "load_state_dict"):
            stream.load_state_dict(meta["loader"])
        log.info("resumed from %s at step %d, epoch %d", path, meta["step"], meta["epoch"])
        return TrainState(int(meta["step"]), int(meta["epoch"]))

    def _tags(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
        return [p for _, p in sorted(found)]

    def _prune(self) -> None:
        """Keep the newest `checkpoint.keep` complete checkpoints; drop torn ones older than those."""
        tags = self._tags()
        done = [p for p in tags if (p / COMPLETE).exists()]
        keep = set(done[-self.cfg.checkpoint.keep:])
        newest = done[-1]
        for p in tags:
            if p not in keep and (p in done or p.name < newest.name):
                shutil.rmtree(p, ignore_errors=True)


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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
