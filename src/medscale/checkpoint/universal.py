"""Resuming a ZeRO checkpoint on another number of ranks, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds each rank's slice of the optimizer state (fp32 master weights, Adam
moments), cut for the number of ranks that wrote it. DeepSpeed's ``ds_to_universal`` rewrites it,
without any model code, as one folder per parameter that any number of ranks can load with
``"checkpoint": {"load_universal": true}`` in the DeepSpeed config. What this module adds:

- `convert`: the conversion, once, on rank 0 while the other ranks wait, into
  ``checkpoints/<tag>_universal/`` beside the original. It is written under a temporary name
  and renamed when complete, with a marker file inside (`MARKER`), so a killed conversion is
  never taken for a finished one: the next resume converts again.
- `saved_run`: what a resume must know before the engine is built (the DeepSpeed config changes):
  the ZeRO stage and the global batch the checkpoint was trained with, from its DeepSpeed files.
- `grad_accum_for`: the gradient accumulation that keeps that global batch on this many ranks.
- `finish_load`: what DeepSpeed's universal load leaves out or gets wrong. It restores only the
  parameters the optimizer owns, so buffers and frozen parameters are read back from the original
  checkpoint's module state; under ZeRO-3 it copies optimizer group 0's hyperparameters into every
  group (weight decay, layer-decayed learning rates) and gives all groups one shared Adam ``step``
  tensor, so each group's hyperparameters are put back from the converted optimizer state and each
  gets its own step; and ``load_universal`` is switched off again on the engine, so later saves
  and loads are normal ones.

Checked against DeepSpeed 0.19.8: ZeRO-3 universal loading needs 0.18.0 (multi-node ranks,
world-size growth and sub-groups were fixed there, and the ZeRO-3 save with ``load_universal`` on
that wrote every rank's model states to one file, DeepSpeed issue 7546, went with them).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medscale.checkpoint.safety import safe_load, verify_checkpoint_files
from medscale.dist import DistInfo, all_gather_objects
from medscale.errors import ConfigError
from medscale.files import atomic_write
from medscale.leash import popen_leashed

__all__ = ["SUFFIX", "MARKER", "MIN_DEEPSPEED", "SavedRun", "has_model_states", "saved_run", "grad_accum_for",
           "universal_dir", "is_converted", "convert", "finish_load", "drop_orphans"]

log = logging.getLogger("medscale.checkpoint")

SUFFIX = "_universal"
MARKER = "medscale_universal.json"
MIN_DEEPSPEED = "0.18.0"
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                       "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class SavedRun:
    """How the run that wrote a checkpoint was cut."""

    world: int
    """Ranks that wrote it."""
    stage: int
    """ZeRO stage (0: the optimizer state is whole on every rank)."""
    micro_batch: int
    grad_accum: int
    global_batch: int
    """Samples per optimizer step: micro_batch x grad_accum x world."""


def _model_state_files(ckpt: Path) -> list[Path]:
    """DeepSpeed's model-state files of a checkpoint, by rank (ZeRO-3 writes one per rank)."""
    files = [p for p in ckpt.glob("*model_states.pt") if not p.name.startswith(("layer_", "expert_"))]

    def rank(p: Path) -> int:
        m = re.search(r"zero_pp_rank_(\d+)_", p.name)
        return int(m.group(1)) if m else 0

    return sorted(files, key=rank)


def has_model_states(ckpt: Path) -> bool:
    """Does `ckpt` hold DeepSpeed's model-state file(s)?"""
    return bool(_model_state_files(ckpt))


def _load(path: Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint file, memory-mapped where it can be (only the metadata is read)."""
    return safe_load(path)  # weights_only=True plus DeepSpeed's own classes (medscale.checkpoint.safety)


def saved_run(ckpt: Path, world: int) -> SavedRun:
    """The ZeRO stage and batch sizes of the run that wrote `ckpt` (`world` ranks), from its DeepSpeed files.

    The DeepSpeed config stored there is what the engine ran with (a resume on another number of
    ranks recomputes the accumulation, the run config does not show it).
    """
    files = _model_state_files(ckpt)
    if not files:
        raise RuntimeError(f"checkpoint {ckpt} has no DeepSpeed model-state file (*model_states.pt)")
    state = _load(files[0])
    ds = state.get("ds_config") or {}
    train = ((state.get("medscale") or {}).get("config") or {}).get("train", {})
    micro = int(ds.get("train_micro_batch_size_per_gpu") or train["micro_batch_size"])
    accum = int(ds.get("gradient_accumulation_steps") or train.get("grad_accum", 1))
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    return SavedRun(world, stage, micro, accum, int(ds.get("train_batch_size") or micro * accum * world))


def grad_accum_for(saved: SavedRun, micro_batch: int, world: int, where: Path) -> int:
    """Gradient accumulation that keeps the checkpoint's global batch with `micro_batch` on `world` ranks.

    Raises:
        ConfigError: no whole accumulation does; the message names the micro-batch sizes, or the
            numbers of ranks, that keep the global batch.
    """
    g = saved.global_batch
    if g % (micro_batch * world) == 0:
        return g // (micro_batch * world)
    head = (f"checkpoint {where} was trained with a global batch of {g} samples per step (micro-batch "
            f"{saved.micro_batch} x accumulation {saved.grad_accum} x {saved.world} ranks); resuming keeps it, "
            f"and train.micro_batch_size={micro_batch} x {world} ranks does not divide it")
    if g % world == 0:
        fits = [m for m in range(1, g // world + 1) if (g // world) % m == 0]
        smaller = [m for m in fits if m <= micro_batch] or fits
        options = " or ".join(f"train.micro_batch_size={m} (accumulation {g // (world * m)})" for m in smaller[-3:])
        raise ConfigError(f"{head}: set {options}; train.grad_accum is recomputed from the global batch")
    worlds = [w for w in range(1, g + 1) if g % (w * micro_batch) == 0]
    raise ConfigError(f"{head}, nor does any micro-batch size on {world} ranks: resume on {worlds} ranks, or "
                      "start a new out_dir with model.weights pointing at a model.pt")


def universal_dir(ckpt: Path) -> Path:
    """Where the universal form of checkpoint `ckpt` goes: beside it, ``<tag>_universal``."""
    return ckpt.with_name(ckpt.name + SUFFIX)


def is_converted(folder: Path) -> bool:
    """A finished conversion: its marker, written last inside the folder, is there."""
    return (folder / MARKER).is_file()


def convert(ckpt: Path, dist: DistInfo) -> Path:
    """The universal form of `ckpt`, converted by rank 0 unless done before; every rank must call it.

    Raises:
        RuntimeError: DeepSpeed's conversion failed (the message carries its output), or the
            converted folder is not visible on this rank (a checkpoint folder not shared by all nodes).
    """
    verify_checkpoint_files(ckpt)  # ds_to_universal unpickles with weights_only=False: tensors only (safety)
    out = universal_dir(ckpt)
    error = None
    if dist.is_main and not is_converted(out):
        try:
            _run_conversion(ckpt, out)
        except Exception as e:  # noqa: BLE001 - handed to every rank below, so none waits forever
            error = f"{type(e).__name__}: {e}"
    elif dist.is_main:
        log.info("universal checkpoint %s is there already (converted %s)", out,
                 json.loads((out / MARKER).read_text()).get("converted", "?"))
    first = all_gather_objects(error)[0]  # also waits for rank 0's conversion
    if first is not None:
        raise RuntimeError(f"converting {ckpt} to a universal checkpoint failed: {first}")
    blind = [r for r, seen in enumerate(all_gather_objects(is_converted(out))) if not seen]
    if blind:  # every rank raises, so none is left waiting in a collective
        raise RuntimeError(f"ranks {blind} do not see the converted checkpoint {out}: every rank must see the same "
                           "checkpoint folder (a shared file system)")
    return out


def _run_conversion(ckpt: Path, out: Path) -> None:
    import deepspeed
    from packaging.version import Version

    if Version(deepspeed.__version__) < Version(MIN_DEEPSPEED):
        raise RuntimeError(f"resuming on another number of ranks needs DeepSpeed >= {MIN_DEEPSPEED} (universal "
                           f"checkpoints under ZeRO-3 were broken before), this is {deepspeed.__version__}")
    # ds_to_universal writes `latest_universal` into its output's parent: convert inside a
    # private folder, so a kill leaves only that folder behind, then rename the result.
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)  # a conversion killed before
    shutil.rmtree(out, ignore_errors=True)  # no marker: not finished
    work.mkdir()
    target = work / out.name
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
           "--output_folder", str(target), "--num_extract_workers", str(workers),
           "--num_merge_workers", str(max(1, workers // 2)),
           "--inject_missing_state"]  # checkpoints saved without universal_checkpoint_info (ZeRO-1/2)
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}  # not a rank of this job
    log.info("converting checkpoint %s to a universal checkpoint %s (DeepSpeed ds_to_universal)", ckpt, out)
    start = time.monotonic()
    # Behind a leash: the conversion and its worker processes die with this rank, SIGKILL included.
    proc = popen_leashed(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    seconds = time.monotonic() - start
    output = stdout + stderr
    if proc.returncode != 0 or not target.is_dir():
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-4000:]}")
    (target / "conversion.log").write_text(output)
    atomic_write(target / MARKER, json.dumps({"source": ckpt.name, "deepspeed": deepspeed.__version__,
                                              "seconds": round(seconds, 1), "converted": time.time()}))
    os.replace(target, out)
    shutil.rmtree(work, ignore_errors=True)
    atomic_write(out.parent / "latest_universal", out.name)  # what DeepSpeed's own tools look for
    log.info("converted %s to %s in %.1f s", ckpt.name, out.name, seconds)


def drop_orphans(root: Path) -> None:
    """Remove universal folders whose original checkpoint has been pruned, and killed conversions."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if not p.is_dir():
            continue
        killed = p.name.endswith(SUFFIX + ".partial")
        orphan = p.name.endswith(SUFFIX) and not (root / p.name[: -len(SUFFIX)]).is_dir()
        if killed or orphan:
            shutil.rmtree(p, ignore_errors=True)


def finish_load(engine: Any, ckpt: Path, universal: Path) -> None:
    """After ``engine.load_checkpoint`` of the universal form of `ckpt`: leave universal loading, and
    restore what it does not (buffers, frozen parameters, ZeRO-3 per-group hyperparameters).

    Every rank must call it (restoring ZeRO-3 frozen parameters is a collective).
    """
    engine._config.load_universal_checkpoint = False  # the engine reads the flag at every load
    section = engine.config.get("checkpoint") if isinstance(getattr(engine, "config", None), dict) else None
    if isinstance(section, dict):
        section.pop("load_universal", None)  # later checkpoints store this config: they are normal ones
    if engine.zero_optimization_stage() == 3:
        _restore_group_hyperparameters(engine, universal)
    _restore_module_state(engine, ckpt)


def _restore_group_hyperparameters(engine: Any, universal: Path) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal load with several optimizer groups.

    It gives every group group 0's hyperparameters (weight decay, learning rate): each group's own
    are put back, as the original optimizer saved them. And it hands all sub-groups one and the
    same ``step`` tensor, which torch's Adam increments in place, once per sub-group and step: the
    second group's bias correction would run a step ahead, and further each step.
    """
    saved = safe_load(universal / "zero" / "optimizer_state.pt")  # weights_only=True (medscale.checkpoint.safety)
    saved_groups = saved.get("param_groups") or []
    inner = engine.optimizer.optimizer  # the wrapped torch optimizer
    if len(saved_groups) != len(inner.param_groups):
        raise RuntimeError(f"{universal}: {len(saved_groups)} optimizer groups saved, the engine has "
                           f"{len(inner.param_groups)} (the model, or the grouping by train.weight_decay/layer_decay, "
                           "changed)")
    for group, old in zip(inner.param_groups, saved_groups):
        for k, v in old.items():
            if k != "params":
                group[k] = v
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _owned(p: torch.nn.Parameter) -> bool:
    """Does DeepSpeed's optimizer own `p` (trainable, with elements)? Universal loading restores only those."""
    numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    return p.requires_grad and numel > 0


@torch.no_grad()
def _restore_module_state(engine: Any, ckpt: Path) -> None:
    """Buffers and parameters the optimizer does not own, from the original checkpoint's module state."""
    from deepspeed.checkpoint.constants import FROZEN_PARAM_FRAGMENTS
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    module = engine.module
    keys = set(module.state_dict().keys())
    buffers = [(n, b) for n, b in module.named_buffers() if n in keys]  # persistent ones: those a checkpoint holds
    frozen = [(n, p) for n, p in module.named_parameters() if not _owned(p)]
    if not buffers and not frozen:
        return
    files = _model_state_files(ckpt)
    states = [_load(f) for f in files]
    saved = states[0]["module"]
    for name, buf in buffers:
        buf.copy_(saved[name])
    if not frozen:
        log.info("restored %d buffers from %s", len(buffers), ckpt)
        return
    values = {}
    for name, p in frozen:
        fragments = states[0].get(FROZEN_PARAM_FRAGMENTS) or {}
        if hasattr(p, "ds_id"):  # ZeRO-3: each rank saved its partition; join them
            flat = torch.cat([s[FROZEN_PARAM_FRAGMENTS][name].reshape(-1) for s in states])
            values[name] = flat[: p.ds_numel].view(p.ds_shape)
        else:
            values[name] = fragments[name] if name in fragments else saved[name]
    with GatheredParameters([p for _, p in frozen], modifier_rank=0):  # a no-op without ZeRO-3
        for name, p in frozen:
            p.data.copy_(values[name].to(p.dtype))
    log.info("restored %d buffers and %d frozen parameters from %s", len(buffers), len(frozen), ckpt)
