"""`medscale export`: a run's weights as ``model.safetensors`` plus ``config.json``, loadable by plain timm.

Without a checkpoint tag the weights come from ``RUN/model.pt`` (the EMA when the run kept one,
else the trained fp32 weights).
With ``--checkpoint TAG`` they are consolidated from ``RUN/checkpoints/TAG``: the EMA from its
``parts.pt``, or the fp32 master weights from DeepSpeed's files, one tensor at a time
(`medscale.checkpoint.zero_weights`). ``model.safetensors`` is written tensor by tensor
(`medscale.checkpoint.safetensors_io`). ``config.json`` holds the timm architecture, its
constructor arguments, the input size and the run's preprocessing record (windows, normalisation,
class names, threshold) and the exact timm call that loads the weights (`load_exported` makes it).
The classifier's class count and the input channels must be in ``pretrained_cfg_overlay``:
otherwise timm compares them with the architecture's default pretrained config (1000 classes,
3 channels) and silently drops the trained head.

What is written is the run's objective's to say (`medscale.tasks.base.Task.export_view`): a
classifier exports its whole model; an MAE pretraining run its encoder alone (``--encoder-only``,
`medscale.tasks.mae.MaeTask.export_view`), for ``model.weights`` in a fine-tuning config.
``--onnx`` adds ``model.onnx``, checked with ONNX Runtime (`medscale.checkpoint.onnx`).
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from medscale.checkpoint.checkpointer import COMPLETE, PARTS
from medscale.checkpoint.onnx import ONNX_TOLERANCE, export_onnx, require_onnx
from medscale.checkpoint.safetensors_io import LazyTensor, write_safetensors
from medscale.checkpoint.safety import safe_load, verify_checkpoint_files
from medscale.checkpoint.weights import (MODEL_FILE, PREPROCESS_FILE, read_preprocess, record_from_config,
                                        record_objective)
from medscale.checkpoint.zero_weights import master_weights, model_states_file
from medscale.errors import ConfigError, InputError, InputNotFound
from medscale.files import atomic_write, unsafe_relative_name

__all__ = ["EXPORT_VERSION", "WEIGHTS_FILE", "CONFIG_FILE", "ONNX_FILE", "ExportResult", "export_run", "load_exported"]

log = logging.getLogger("medscale.checkpoint.export")


EXPORT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, ONNX_FILE = "model.safetensors", "config.json", "model.onnx"

@dataclass
class ExportResult:
    """What `export_run` wrote."""

    out_dir: Path
    weights: Path
    config: Path
    source: dict[str, Any]
    """Where the weights came from: run, file or checkpoint, ``ema`` or ``trained``."""
    tensors: int
    bytes: int
    onnx: Path | None = None
    onnx_max_abs_diff: float | None = None
    notes: list[str] = field(default_factory=list)


def export_run(run_dir: str | Path, out_dir: str | Path, *, checkpoint: str | None = None,
               use_ema: bool | None = None, onnx: bool = False, tolerance: float | None = None,
               part: str | None = None) -> ExportResult:
    """Export a run's weights (see the module docstring).

    Args:
        run_dir: a run directory written by ``medscale train``.
        out_dir: where ``model.safetensors`` and ``config.json`` (and ``model.onnx``) go.
        checkpoint: a tag under ``RUN/checkpoints`` (or ``latest``); None: ``RUN/model.pt``.
        use_ema: the EMA (True), the trained weights (False), or the EMA when there is one (None).
        onnx: also write and check ``model.onnx``.
        tolerance: ONNX parity tolerance (absolute, on the logits; default `ONNX_TOLERANCE`).
        part: which part of the model the run's objective exports (`medscale.tasks.base.Task.export_view`;
            an MAE run: ``encoder``); None: its default.

    Raises:
        InputNotFound: no such run, model.pt or checkpoint.
        InputError: the source cannot be exported (no EMA when one is asked for, a torn checkpoint,
            an unsafe file, a format without named fp32 master weights, a part the objective has not).
        ConfigError: ``onnx`` without the ``export`` extra installed, or for a part without logits.
        OnnxParityError: ONNX Runtime disagrees with PyTorch by more than `tolerance`.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    tolerance = ONNX_TOLERANCE if tolerance is None else tolerance
    if not run_dir.is_dir():
        raise InputNotFound(f"run directory {run_dir} does not exist")
    if onnx:
        require_onnx()
    if checkpoint is None:
        state, record, source = _model_file_weights(run_dir, use_ema)
    else:
        state, record, source = _checkpoint_weights(run_dir, checkpoint, use_ema)
    view = record_objective(record).export_view(state, record, part)
    if onnx and not view.onnx:
        raise ConfigError(f"--onnx exports a model with logits; the {view.part} of {run_dir} has none")
    state, spec = view.state, view.spec
    if view.part != "model":
        source["part"] = view.part
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    metadata = {"format": "pt", "medscale_export": str(EXPORT_VERSION), "architecture": spec["model_name"],
                "weights": source["weights"], **view.metadata}
    nbytes = write_safetensors(weights, state, metadata)
    tensors = len(state)
    del state
    gc.collect()  # the source's memory maps go before an ONNX export builds the model
    log.info("wrote %s: %d tensors, %.1f MB, %s weights", weights, tensors, nbytes / 1e6, source["weights"])

    config: dict[str, Any] = {
        "format": "medscale-export", "version": EXPORT_VERSION, "weights": WEIGHTS_FILE, "source": source,
        "architecture": spec["model_name"], "timm": spec,
        "load_with_timm": _timm_call(spec, WEIGHTS_FILE),
        "load_note": ("file= is the path of model.safetensors (as written: run from this directory). num_classes and "
                      "input_size in pretrained_cfg_overlay are needed: without them timm compares the weights with "
                      "the architecture's default pretrained config (1000 classes, 3 channels) and replaces the "
                      "trained head with a fresh one. timm's mean/std are not this model's preprocessing: see "
                      "'preprocess'"),
        "input_size": [record["channels"], record["image_size"], record["image_size"]],
        "preprocess": record,
    }
    result = ExportResult(out_dir, weights, out_dir / CONFIG_FILE, source, tensors, nbytes)
    onnx_path = out_dir / ONNX_FILE
    if onnx:
        model = load_exported(out_dir, spec=spec)
        diff, opset = export_onnx(model, onnx_path, channels=record["channels"], image_size=record["image_size"],
                                  tolerance=tolerance)
        config["onnx"] = {"file": ONNX_FILE, "opset": opset, "input": "image", "output": "logits",
                          "dynamic_axes": {"image": {"0": "batch"}, "logits": {"0": "batch"}},
                          "max_abs_diff": diff, "tolerance": tolerance, "exporter": "torch.onnx.export(dynamo=True)"}
        result.onnx, result.onnx_max_abs_diff = onnx_path, diff
    else:
        for stale in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
            if stale.exists():  # an earlier export's: it would not match these weights
                stale.unlink()
                result.notes.append(f"removed stale {stale}")
    atomic_write(result.config, json.dumps(config, indent=1) + "\n")
    return result


# -------------------------------------------------------------------------------------------------
# timm
# -------------------------------------------------------------------------------------------------


def _timm_call(spec: Mapping[str, Any], file: str) -> str:
    overlay = dict(spec["pretrained_cfg_overlay"], input_size=tuple(spec["pretrained_cfg_overlay"]["input_size"]))
    args = ", ".join(f"{k}={v!r}" for k, v in spec["kwargs"].items())
    extra = ", ".join(f"{k}={v!r}" for k, v in overlay.items())
    return (f"timm.create_model({spec['model_name']!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={file!r}, {extra}), {args})")


# timm.create_model arguments that load files or reach a hub: an export's own weights file is the only
# source (`load_exported` names it), whatever its config.json says.
_SOURCE_ARGUMENTS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                               "cache_dir"})


def _check_spec(spec: Mapping[str, Any], out_dir: Path) -> None:
    """Refuse a config.json whose timm call would read anything but the export's own weights: a hub or
    local-dir model name, or an argument that names a file, a URL or a cache."""
    import timm

    name = spec.get("model_name")
    if not isinstance(name, str) or not timm.is_model(name):
        raise InputError(f"{out_dir / CONFIG_FILE}: model_name {name!r} is refused: not a model of timm's registry "
                         "(hub and local-dir names are never loaded)")
    kwargs = spec.get("kwargs")
    bad = sorted(_SOURCE_ARGUMENTS & set(kwargs)) if isinstance(kwargs, Mapping) else ["kwargs"]
    if bad:
        raise InputError(f"{out_dir / CONFIG_FILE}: timm argument {bad[0]} is refused: an export loads its own "
                         f"{WEIGHTS_FILE} and nothing else")


def load_exported(out_dir: str | Path, spec: Mapping[str, Any] | None = None) -> nn.Module:
    """Plain timm's model of an export (`load_with_timm` in its config.json), in eval mode."""
    import timm

    out_dir = Path(out_dir)
    if spec is None:
        path = out_dir / CONFIG_FILE
        if not path.exists():
            raise InputNotFound(f"{path} not found: not a medscale export")
        spec = json.loads(path.read_text())["timm"]
    _check_spec(spec, out_dir)
    overlay = dict(spec["pretrained_cfg_overlay"], input_size=tuple(spec["pretrained_cfg_overlay"]["input_size"]))
    model = timm.create_model(spec["model_name"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out_dir / WEIGHTS_FILE), **overlay),
                              **spec["kwargs"])
    return model.eval()


# -------------------------------------------------------------------------------------------------
# sources
# -------------------------------------------------------------------------------------------------


def _model_file_weights(run_dir: Path, use_ema: bool | None) -> tuple[dict[str, LazyTensor], dict, dict]:
    path = run_dir / MODEL_FILE
    if not path.exists():
        tags = _tags(run_dir)
        hint = f"; or export a checkpoint with --checkpoint TAG ({', '.join(tags[-3:])})" if tags else ""
        raise InputNotFound(f"{path} not found: `medscale train` writes it at the end of a run{hint}")
    saved = safe_load(path)  # memory-mapped: only the exported tensors are read
    record = saved.get("preprocess") or read_preprocess(run_dir)
    has_ema = "model_ema" in saved
    if use_ema and not has_ema:
        raise InputError(f"{path} holds no EMA weights (the run had train.ema_decay=0): export without --ema")
    key = "model_ema" if (has_ema if use_ema is None else use_ema) else "model"
    source = {"run": str(run_dir), "file": MODEL_FILE, "checkpoint": None,
              "weights": "ema" if key == "model_ema" else "trained"}
    return dict(saved[key]), record, source


def _checkpoint_weights(run_dir: Path, tag: str, use_ema: bool | None) -> tuple[dict[str, LazyTensor], dict, dict]:
    root = run_dir / "checkpoints"
    if tag == "latest" and (root / "latest").exists():
        tag = (root / "latest").read_text().strip()
        why = unsafe_relative_name(tag) or ("it has a /" if "/" in tag else None)
        if why is not None:  # a file's contents, not the user's word: only a tag below checkpoints/
            raise InputError(f"{root / 'latest'}: checkpoints/latest names {tag!r}, which is refused: {why}; "
                             "pass --checkpoint with a tag under it")
    path = root / tag
    if not path.is_dir():
        tags = _tags(run_dir)
        raise InputNotFound(f"checkpoint {path} does not exist; {run_dir} has "
                            f"{', '.join(tags) if tags else 'no checkpoints'}")
    if not (path / COMPLETE).exists():
        raise InputError(f"checkpoint {path} is incomplete (no {COMPLETE}: a save was interrupted); "
                         "export a complete one")
    verify_checkpoint_files(path)  # DeepSpeed's reader below unpickles with weights_only=False
    states = safe_load(model_states_file(path))
    module = states["module"]
    buffer_names = set(states.get("buffer_names") or [])
    buffers = {k: v.float() if v.is_floating_point() else v for k, v in module.items() if k in buffer_names}
    parts = safe_load(path / PARTS) if (path / PARTS).exists() else {}
    ema = parts.get("ema")
    if use_ema and ema is None:
        raise InputError(f"checkpoint {path} holds no EMA (the run had train.ema_decay=0): export without --ema")
    if ema is not None and (use_ema is None or use_ema):
        params: Mapping[str, LazyTensor] = ema["params"]
        weights = "ema"
    else:
        params = master_weights(root, tag, path, states)
        weights = "trained"
    state: dict[str, LazyTensor] = {}
    shared = states.get("shared_params") or {}
    for name in module:  # the module's state-dict order
        if name in params:
            state[name] = params[name]
        elif name in buffers:
            state[name] = buffers[name]
        elif name in shared and shared[name] in params:
            state[name] = params[shared[name]]  # a tied parameter, written under both names
        else:
            raise InputError(f"checkpoint {path} holds no {'EMA' if weights == 'ema' else 'fp32'} weights for {name!r}")
    step = (states.get("medscale") or {}).get("step")
    source = {"run": str(run_dir), "file": None, "checkpoint": tag, "step": step, "weights": weights}
    return state, _checkpoint_record(run_dir, states), source


def _checkpoint_record(run_dir: Path, states: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing record for a checkpoint: the run's ``preprocess.json`` (written at the end of
    training), else built from the config saved in the checkpoint, else from ``config.yaml``."""
    if (run_dir / PREPROCESS_FILE).exists():
        return read_preprocess(run_dir)
    config = (states.get("medscale") or {}).get("config")
    if config:
        from medscale.config import RunConfig, from_dict

        try:
            cfg = from_dict(RunConfig, config, source="the checkpoint's config")
        except ConfigError as e:
            log.warning("the checkpoint's config no longer parses (%s): using %s", e, run_dir / "config.yaml")
        else:
            return record_from_config(cfg, _class_names(cfg.data.shards))
    return read_preprocess(run_dir)


def _class_names(shards: str) -> list[str]:
    from medscale.errors import UserError
    from medscale.formats.manifest import load_manifest

    try:
        return list(load_manifest(shards).get("classes") or [])
    except (UserError, OSError) as e:
        log.warning("class names unknown (the run's manifest %s is not readable: %s)", shards, e)
        return []


def _tags(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / COMPLETE).exists()) if root.is_dir() else []

