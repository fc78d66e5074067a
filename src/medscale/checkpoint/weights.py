"""The final weights of a run, in fp32, and what is needed to use them again.

``RUN/model.pt`` holds ``model`` (the trained weights), ``model_ema`` (when train.ema_decay > 0),
``config`` (the resolved run config) and ``preprocess``; ``RUN/preprocess.json`` holds the same
record for tools that do not unpickle. The record is what whoever loads the weights needs to feed
them correctly (timm's ``pretrained_cfg`` is the model): the timm architecture and its arguments,
input size and channels, CT windows, normalisation, task and class names, and the operating
threshold. Evaluation and export build the model from it instead of a whole run config.

Under bf16 (and fp16) DeepSpeed keeps the module's parameters in 16 bits and the fp32 master copy
with the optimizer; the weights are taken from that master copy through DeepSpeed's public
``safe_get_full_fp32_param`` (gathered one tensor at a time, at every ZeRO stage), never from the
16-bit module.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medscale.config import RunConfig, to_dict
from medscale.dist import DistInfo, barrier
from medscale.errors import InputError, InputNotFound
from medscale.files import atomic_write

__all__ = ["PREPROCESS_VERSION", "preprocess_record", "fp32_state_dict", "save_weights", "read_preprocess",
           "record_from_config", "record_objective", "load_run_model"]

log = logging.getLogger("medscale.checkpoint")

PREPROCESS_VERSION = 1
MODEL_FILE, PREPROCESS_FILE = "model.pt", "preprocess.json"


def preprocess_record(cfg: RunConfig, task: Any) -> dict[str, Any]:
    """How inputs must be prepared for these weights, and how their outputs read.

    `task`: the run's objective (`medscale.tasks.base.Task`): its name, class names and what it adds
    (`Task.record`: e.g. an autoencoder's decoder shape) go in too.
    """
    m, d = cfg.model, cfg.data
    record = {
        "version": PREPROCESS_VERSION,
        "model": {"name": m.name, "num_classes": m.num_classes, "patch_size": m.patch_size,
                  "drop_path_rate": m.drop_path_rate},
        "image_size": d.image_size,
        "channels": d.channels,
        "windows": [list(w) for w in d.windows],
        "normalize": d.normalize,
        "objective": cfg.train.objective,
        "task": cfg.train.label_kind,  # the label kind (the key keeps its version-1 name)
        "class_names": list(task.class_names),
        # None: 0.5, or argmax for multiclass with more than two classes (eval.threshold's default).
        "threshold": cfg.eval.threshold,
    }
    record.update(task.record())
    return record


@torch.no_grad()
def fp32_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The module's state dict with every parameter taken from the fp32 master copy, on rank 0.

    A collective at ZeRO stages 1-3 and under the bf16 optimizer: every rank must call it. Other
    ranks get None. Buffers (e.g. norm statistics) are the module's own.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    params: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None where DeepSpeed keeps no separate master (fp32, no ZeRO)
        if full is None:
            full = p.detach()
        if main:
            params[name] = full.detach().float().cpu().clone()
    if not main:
        return None
    state = module.state_dict()
    return {k: params.get(k, v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu())
            for k, v in state.items()}


def save_weights(engine: Any, ema: Any, cfg: RunConfig, preprocess: dict[str, Any], run_dir: Path,
                 dist: DistInfo) -> Path:
    """Write ``model.pt`` (fp32 weights, EMA, config, preprocess) and ``preprocess.json`` in `run_dir`.

    Called on every rank: gathering the fp32 weights (and the ZeRO-3 EMA) is a collective.
    """
    state = fp32_state_dict(engine)
    ema_state = ema.model_state_dict(state or {}) if ema is not None else None
    path = run_dir / MODEL_FILE
    if dist.is_main:
        assert state is not None
        out: dict[str, Any] = {"model": state, "config": to_dict(cfg), "preprocess": preprocess}
        if ema_state is not None:
            out["model_ema"] = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                                for k, v in ema_state.items()}
        torch.save(out, path)
        atomic_write(run_dir / PREPROCESS_FILE, json.dumps(preprocess, indent=1))
    barrier()
    return path


def read_preprocess(run_dir: Path) -> dict[str, Any]:
    """A run's preprocessing record (``preprocess.json``; runs older than it: from ``config.yaml``)."""
    path = run_dir / PREPROCESS_FILE
    if path.exists():
        record = json.loads(path.read_text())
        if int(record.get("version", 0)) > PREPROCESS_VERSION:
            raise InputError(f"{path} has version {record['version']}; this medscale reads up to "
                             f"{PREPROCESS_VERSION}: upgrade medscale")
        return record
    config = run_dir / "config.yaml"
    if not config.exists():
        raise InputNotFound(f"{run_dir} holds neither {PREPROCESS_FILE} nor config.yaml: not a medscale run")
    from medscale.config import load_config

    return record_from_config(load_config(RunConfig, config), [])


def record_from_config(cfg: RunConfig, class_names: list[str]) -> dict[str, Any]:
    """`preprocess_record` from a run config alone, for runs and checkpoints written before the record
    was: with no shards to build the objective from, what it adds is taken to be its own config
    section (what medscale's objectives add)."""
    from types import SimpleNamespace

    from medscale.tasks.registry import task_class

    section = task_class(cfg.train.objective).config_section
    extra = {section: to_dict(cfg.objective_config)} if section and cfg.objective_config is not None else {}
    return preprocess_record(cfg, SimpleNamespace(class_names=class_names, record=lambda: extra))


def record_objective(record: dict[str, Any]) -> Any:
    """The objective class a preprocessing record was written by (runs before objectives were recorded:
    classification)."""
    from medscale.tasks.registry import DEFAULT_OBJECTIVE, task_class

    return task_class(record.get("objective") or DEFAULT_OBJECTIVE)


def load_run_model(run_dir: Path, use_ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a finished run, built by its objective from its preprocessing record: EMA weights
    when present and wanted (an MAE run's: the whole autoencoder). Returns the model (eval mode, CPU)
    and the record."""
    run_dir = Path(run_dir)
    path = run_dir / MODEL_FILE
    if not path.exists():
        raise InputNotFound(f"{path} not found; `medscale train` writes it at the end of a run")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    record = saved.get("preprocess") or read_preprocess(run_dir)
    model = record_objective(record).model_from_record(record)
    key = "model_ema" if use_ema and "model_ema" in saved else "model"
    model.load_state_dict(saved[key])
    log.info("loaded %s weights of %s", "EMA" if key == "model_ema" else "trained", path)
    return model.eval(), record
