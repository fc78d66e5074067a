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

Resuming on another number of ranks (`Checkpointer.prepare_resume`, called before the engine is
built): the global batch is kept (gradient accumulation recomputed), a ZeRO checkpoint is loaded
through its universal form, converted once into ``<tag>_universal/`` beside it
(`medscale.checkpoint.universal`), and the parts continue as they are (they do not depend on the
number of ranks). Per-rank RNG states cannot carry over to another number of ranks and are not
restored then.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch

from medscale.checkpoint import universal
from medscale.config import CheckpointConfig, ConfigError, TrainConfig
from medscale.dist import DistInfo, barrier
from medscale.errors import RunStateError
from medscale.files import atomic_write
from medscale.checkpoint.safety import verify_checkpoint_files

__all__ = ["Checkpointer", "ResumePlan", "Stateful", "TrainState", "COMPLETE", "PARTS"]

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


@dataclass(frozen=True)
class ResumePlan:
    """How this run resumes, decided before the engine is built (its DeepSpeed config depends on it)."""

    path: Path | None
    """The checkpoint to resume from; None: start from the beginning."""
    saved_world: int | None = None
    """Ranks that wrote it."""
    universal: Path | None = None
    """Its universal form, when ZeRO cut its optimizer state for another number of ranks than this run's."""
    grad_accum: int | None = None
    """Gradient accumulation that keeps its global batch on this run's ranks (None: train.grad_accum)."""

    @property
    def ds_overrides(self) -> dict[str, Any]:
        """DeepSpeed config entries for `medscale.train.engine.build_engine` (empty for a plain resume)."""
        out: dict[str, Any] = {}
        if self.grad_accum is not None:
            out["gradient_accumulation_steps"] = self.grad_accum
        if self.universal is not None:
            out["checkpoint"] = {"load_universal": True}  # for this resume only: switched off after loading
        return out


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
        self._plan: ResumePlan | None = None

    def due(self, step: int) -> bool:
        """Save now? Every ``checkpoint.every_steps`` and at the last step."""
        every = self.cfg.every_steps
        return step == self.last_step or bool(every and step % every == 0)

    def save(self, engine: Any, step: int, parts: Mapping[str, Stateful | None],
             score: float | None = None) -> Path:
        """Write the checkpoint of `step` (every rank must call it, with the same parts).

        `score`: the ``checkpoint.keep_best`` metric of an evaluation at this step, if one ran.
        """
        tag = f"step{step:08d}"
        path = self.root / tag
        client = {"medscale": {"step": step, "world": self.dist.world, "config": self.config},
                  "universal_checkpoint_info": {}}  # what DeepSpeed's ds_to_universal asks of ZeRO-1/2 checkpoints
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False)
        states = {name: part.state_dict() for name, part in parts.items() if part is not None}  # may be collectives
        path.mkdir(parents=True, exist_ok=True)  # ranks that DeepSpeed gave nothing to write
        if self.dist.is_main:
            torch.save(states, path / PARTS)
        torch.save(_rng_state(), path / f"rng_rank{self.dist.rank}.pt")
        _fault_pause()
        barrier()  # every rank's files are on disk
        if self.dist.is_main:
            atomic_write(path / COMPLETE, json.dumps({"step": step, "world": self.dist.world, "parts": sorted(states),
                                                      "score": score, "time": time.time()}))
            atomic_write(self.root / "latest", tag)
            self._prune()
        barrier()
        log.info("saved checkpoint %s", path)
        return path

    def newest(self) -> Path | None:
        """The newest complete checkpoint directory, if any."""
        done = [p for p in self._tags() if (p / COMPLETE).exists()]
        return done[-1] if done else None

    def prepare_resume(self, train: TrainConfig) -> ResumePlan:
        """Decide how to resume, before the engine is built; every rank must call it.

        The resumed run keeps the checkpoint's global batch: the gradient accumulation is recomputed
        for this number of ranks and train.micro_batch_size (the plan's `ResumePlan.ds_overrides`
        carry it to the engine; train.grad_accum is an input). A ZeRO checkpoint written by another
        number of ranks is converted, once, into its universal form beside it (rank 0 converts, the
        others wait).

        Raises:
            ConfigError: the global batch cannot be kept on this many ranks with
                train.micro_batch_size (the message names the settings that can).
            RuntimeError: the conversion failed.
        """
        path = self.newest() if self.cfg.resume else None
        if self.dist.is_main and self.cfg.resume:
            self._drop_torn_after(path)
            universal.drop_orphans(self.root)  # universal forms of pruned checkpoints, killed conversions
        if path is None:
            self._plan = ResumePlan(None)
            return self._plan
        written = int(json.loads((path / COMPLETE).read_text())["world"])
        world = self.dist.world
        if written == world and not universal.has_model_states(path):
            self._plan = ResumePlan(path, written)  # no DeepSpeed files to read the global batch from
            return self._plan
        saved = universal.saved_run(path, written)
        accum = universal.grad_accum_for(saved, train.micro_batch_size, world, path)
        if written != world or accum != train.grad_accum:
            log.info("checkpoint %s was written by %d ranks with a global batch of %d; on %d ranks gradient "
                     "accumulation %d (train.grad_accum=%d recomputed) keeps it (micro-batch %d x %d x %d ranks)",
                     path.name, written, saved.global_batch, world, accum, train.grad_accum, train.micro_batch_size,
                     accum, world)
        converted = universal.convert(path, self.dist) if written != world and saved.stage > 0 else None
        if accum != train.grad_accum and isinstance(self.config.get("train"), dict):
            # later checkpoints store the accumulation the engine runs with
            self.config = {**self.config, "train": {**self.config["train"], "grad_accum": accum}}
        self._plan = ResumePlan(path, written, converted, accum if accum != train.grad_accum else None)
        return self._plan

    def resume(self, engine: Any, parts: Mapping[str, Stateful | None]) -> Path | None:
        """Load the newest complete checkpoint into the engine, the parts and this rank's RNG.

        Returns the checkpoint directory, or None when there is none (or ``checkpoint.resume`` is off):
        then everything stays as it is. A checkpoint written by another number of ranks needs
        `prepare_resume` first (the engine is built from its plan); its RNG states are not
        restored (they are per rank).

        Raises:
            RunStateError: the newest complete checkpoint is not the one `prepare_resume` planned for
                (another process writes this run directory), or DeepSpeed cannot load it.
            RuntimeError: the checkpoint was written by another number of ranks and `prepare_resume`
                was not called before the engine was built (a programming error).
        """
        plan = self._plan
        newest = self.newest() if self.cfg.resume else None
        if plan is None:
            plan = self._plan = self._plain_plan()
        elif plan.path != newest:
            raise RunStateError(
                f"the checkpoints in {self.root} changed while this run started: it planned to resume from "
                f"{plan.path.name if plan.path else 'the beginning'}, and the newest complete one is now "
                f"{newest.name if newest else 'none'}. Another process is writing this run directory: stop it "
                "(look for medscale or deepspeed processes with this out_dir), then run the command again")
        path = plan.path
        if path is None:
            return None
        verify_checkpoint_files(path, plan.universal)  # DeepSpeed unpickles with weights_only=False: tensors only
        info = json.loads((path / COMPLETE).read_text())
        if plan.grad_accum is not None and engine.gradient_accumulation_steps() != plan.grad_accum:
            raise RuntimeError(f"the engine accumulates {engine.gradient_accumulation_steps()} micro-batches, the "
                               f"resume from {path} needs {plan.grad_accum}: build it with prepare_resume's ds_overrides")
        if plan.universal is not None:
            if engine.zero_optimization_stage() == 0:
                raise ConfigError(f"checkpoint {path} holds ZeRO optimizer partitions of {info['world']} ranks; "
                                  f"loading it on {self.dist.world} goes through a universal checkpoint, which needs "
                                  "ZeRO stage >= 1: use a dist.deepspeed_config with ZeRO")
            engine._config.load_universal_checkpoint = True  # as the plan's ds_overrides ask
            try:
                loaded, client = engine.load_checkpoint(str(self.root), tag=plan.universal.name)
            finally:
                engine._config.load_universal_checkpoint = False  # later loads are normal ones
            if loaded is not None:
                universal.finish_load(engine, path, plan.universal)  # and universal loading is off again
        else:
            loaded, client = engine.load_checkpoint(str(self.root), tag=path.name)
        if loaded is None:
            raise RunStateError(f"DeepSpeed could not load checkpoint {path}, though it is marked complete: move it "
                                f"out of {self.root} to resume from the one before it, or set checkpoint.resume=false "
                                "to start again")
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
        if info["world"] == self.dist.world:
            if rng.exists():
                _set_rng_state(torch.load(rng, weights_only=True))
        elif self.dist.is_main:
            log.warning("checkpoint %s was written by %d ranks: their RNG states are per rank and are not restored on "
                        "%d (data order and augmentation do not use them; dropout and drop-path draw afresh)",
                        path.name, info["world"], self.dist.world)
        log.info("resumed from %s at step %d%s", path, info["step"],
                 f" through {plan.universal.name}" if plan.universal is not None else "")
        return path

    def _drop_torn_after(self, path: Path | None) -> None:
        """Remove torn checkpoints newer than `path`: this run writes their tags again, and files that a
        run on more ranks left in one (its other ranks' shards) would mix into the new checkpoint."""
        for p in self._tags():
            if not (p / COMPLETE).exists() and (path is None or p.name > path.name):
                shutil.rmtree(p, ignore_errors=True)

    def _plain_plan(self) -> ResumePlan:
        """The plan of a resume on as many ranks as wrote the checkpoint (no `prepare_resume` needed)."""
        path = self.newest() if self.cfg.resume else None
        if path is None:
            return ResumePlan(None)
        written = int(json.loads((path / COMPLETE).read_text())["world"])
        if written != self.dist.world:
            raise RuntimeError(f"checkpoint {path} was written by {written} ranks, this run has {self.dist.world}: call "
                               "Checkpointer.prepare_resume before building the engine (it keeps the global batch and "
                               "converts a ZeRO checkpoint to a universal one)")
        return ResumePlan(path, written)

    def best(self) -> Path | None:
        """The complete checkpoint with the best ``checkpoint.keep_best`` score (None: off, or none scored)."""
        if not self.cfg.keep_best:
            return None
        scored = []
        for p in self._tags():
            if (p / COMPLETE).exists():
                score = json.loads((p / COMPLETE).read_text()).get("score")
                if score is not None and math.isfinite(score):
                    scored.append((score if self.cfg.best_mode == "max" else -score, p))
        return max(scored, key=lambda x: x[0])[1] if scored else None

    def completed_at(self, path: Path) -> float:
        """When checkpoint `path` was completed (rank 0's clock, as metrics.jsonl rows)."""
        return float(json.loads((path / COMPLETE).read_text())["time"])

    def _tags(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
        return [p for _, p in sorted(found)]

    def _prune(self) -> None:
        """Keep the newest `checkpoint.keep` complete checkpoints and, with ``checkpoint.keep_best``,
        the best scored one; drop torn ones older than those."""
        tags = self._tags()
        done = [p for p in tags if (p / COMPLETE).exists()]
        keep = set(done[-self.cfg.keep:])
        best = self.best()
        if best is not None:
            keep.add(best)
        newest = done[-1]
        for p in tags:
            if p not in keep and (p in done or p.name < newest.name):
                shutil.rmtree(p, ignore_errors=True)


def _fault_pause() -> None:
    """Fault injection for the tests: MEDSCALE_TEST_SAVE_PAUSE=SECONDS holds every rank after its files
    are written and before the checkpoint is complete, the window a kill must never tear."""
    pause = os.environ.get("MEDSCALE_TEST_SAVE_PAUSE")
    if pause:
        log.warning("MEDSCALE_TEST_SAVE_PAUSE: pausing %s s before completing the checkpoint", pause)
        time.sleep(float(pause))


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
