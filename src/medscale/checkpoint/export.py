"""`medscale export`: a run's weights as ``model.safetensors`` plus ``config.json``, loadable by plain timm.

Without a checkpoint tag the weights come from ``RUN/model.pt`` (the EMA when the run kept one,
else the trained fp32 weights). With ``--checkpoint TAG`` they are consolidated from
``RUN/checkpoints/TAG``: the EMA from its ``parts.pt``, or the fp32 master weights from DeepSpeed's
files, memory-mapped and one tensor at a time: the model-state file and the fp32 partitions are
read, the optimizer moments in the same files never touched. At ZeRO-3 that is DeepSpeed's public
``get_fp32_state_dict_from_zero_checkpoint(..., lazy_mode=True)``, which gathers each tensor from its
partitions when it is written. At ZeRO-1/2 the same function first concatenates each parameter
group's partitions into one fp32 copy (``torch.cat`` in ``_zero2_merge_trainable_params``), so the
export would hold the weights twice (a peak of 2.02x their bytes, bench/checkpoint.py): medscale
reads those files itself instead (ZeRO-1/2 files of a DeepSpeed without the slice map still go
through that function). Each rank's optimizer file holds its partition of every flat group
(``single_partition_of_fp32_groups``, saved without its trailing padding) and the optimizer's own
map of where each parameter's slice sits in it (``param_slice_mappings``); a tensor is the
concatenation of its slices in rank order, made when it is written (a view of the mapped file when
one rank holds it whole). The map is checked against the layout DeepSpeed's function reads by (the
model states' ``param_shapes`` in order, with ``param_alignment_paddings`` and ``group_paddings``);
where they disagree (``round_robin_gradients``, which the map does not follow) the layout wins, so
the tensors are always that function's, bit for bit. ZeRO-2's frozen parameters come from the model
states, as there. bf16 at ZeRO-1 runs DeepSpeed's ``BF16_Optimizer``, whose files that function
refuses ("is not a zero checkpoint"); they hold the same two keys (partitions saved with their
padding) and go through the same reader. Every ``.pt`` of the checkpoint is verified first
(`medscale.checkpoint.safety`), because DeepSpeed unpickles them with ``weights_only=False``;
medscale's own reads are ``torch.load(weights_only=True, mmap=True)`` (`safe_load`).

``model.safetensors`` is written tensor by tensor (the safetensors layout: a little-endian u64
header length, a JSON header of dtypes, shapes and byte offsets, then the raw bytes), so the export
never holds a second copy of the weights. ``config.json`` holds the timm architecture, its
constructor arguments, the input size and the run's preprocessing record (windows, normalisation,
class names, threshold) and the exact timm call that loads the weights (`load_exported` makes it).
The classifier's class count and the input channels must be in ``pretrained_cfg_overlay``:
otherwise timm compares them with the architecture's default pretrained config (1000 classes,
3 channels) and silently drops the trained head.

``--encoder-only`` (an MAE pretraining run, ``train.objective=mae``) writes the autoencoder's
encoder alone, under the plain timm model's key names (``encoder.`` stripped, the decoder left out)
and built without head or pooling (``num_classes=0, global_pool=''``): ``timm.create_model`` loads
it as a token encoder, and ``model.weights=DIR/model.safetensors`` in a fine-tuning config loads it
into a classifier whose head and pooling start fresh (its safetensors metadata says
``medscale_export_kind: encoder``; see `medscale.models.factory.load_weights`).

``--onnx`` adds ``model.onnx`` (torch's dynamo exporter, the default since torch 2.9; a dynamic
batch axis) and checks it with ONNX Runtime against the timm model on sample inputs of other
batch sizes than the traced one.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

import torch
from torch import nn

from medscale.checkpoint.checkpointer import COMPLETE, PARTS
from medscale.checkpoint.safety import safe_load, verify_checkpoint_files
from medscale.checkpoint.weights import MODEL_FILE, PREPROCESS_FILE, preprocess_record, read_preprocess
from medscale.errors import ConfigError, InputError, InputNotFound
from medscale.files import atomic_write, unsafe_relative_name

__all__ = ["EXPORT_VERSION", "WEIGHTS_FILE", "CONFIG_FILE", "ONNX_FILE", "ONNX_TOLERANCE", "ExportResult",
           "OnnxParityError", "export_run", "timm_spec", "load_exported", "write_safetensors", "export_onnx"]

log = logging.getLogger("medscale.checkpoint.export")

_ENCODER = "encoder."  # the prefix of the encoder's parameters in a MaskedAutoencoder's state dict

EXPORT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, ONNX_FILE = "model.safetensors", "config.json", "model.onnx"
ONNX_TOLERANCE = 1e-4
"""Largest absolute difference of logits allowed between ONNX Runtime and PyTorch."""

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class OnnxParityError(RuntimeError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance."""


class LazyTensor(Protocol):
    """A tensor materialised on ``contiguous()`` (a torch.Tensor is one; so is DeepSpeed's GatheredTensor)."""

    shape: torch.Size
    dtype: torch.dtype

    def contiguous(self) -> torch.Tensor: ...


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
               encoder_only: bool = False) -> ExportResult:
    """Export a run's weights (see the module docstring).

    Args:
        run_dir: a run directory written by ``medscale train``.
        out_dir: where ``model.safetensors`` and ``config.json`` (and ``model.onnx``) go.
        checkpoint: a tag under ``RUN/checkpoints`` (or ``latest``); None: ``RUN/model.pt``.
        use_ema: the EMA (True), the trained weights (False), or the EMA when there is one (None).
        onnx: also write and check ``model.onnx``.
        tolerance: ONNX parity tolerance (absolute, on the logits; default `ONNX_TOLERANCE`).
        encoder_only: an MAE run's encoder alone, loadable by a fine-tuning config's ``model.weights``.

    Raises:
        InputNotFound: no such run, model.pt or checkpoint.
        InputError: the source cannot be exported (no EMA when one is asked for, a torn checkpoint,
            an unsafe file, a format without named fp32 master weights).
        ConfigError: ``onnx`` without the ``export`` extra installed.
        OnnxParityError: ONNX Runtime disagrees with PyTorch by more than `tolerance`.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    tolerance = ONNX_TOLERANCE if tolerance is None else tolerance
    if not run_dir.is_dir():
        raise InputNotFound(f"run directory {run_dir} does not exist")
    if onnx:
        _require_onnx()
    if checkpoint is None:
        state, record, source = _model_file_weights(run_dir, use_ema)
    else:
        state, record, source = _checkpoint_weights(run_dir, checkpoint, use_ema)
    mae = record.get("objective") == "mae"
    if mae != encoder_only:
        raise InputError(f"{run_dir} is an MAE pretraining run: export its encoder with --encoder-only" if mae else
                         f"--encoder-only exports an MAE pretraining run's encoder; {run_dir} trained "
                         f"{record.get('objective', 'classification')}")
    if encoder_only:
        if onnx:
            raise ConfigError("--onnx exports a classifier; an encoder-only export has no logits")
        state = {k[len(_ENCODER):]: v for k, v in state.items() if k.startswith(_ENCODER)}
        source["part"] = "encoder"
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = timm_spec(record, encoder_only=encoder_only)
    weights = out_dir / WEIGHTS_FILE
    metadata = {"format": "pt", "medscale_export": str(EXPORT_VERSION), "architecture": spec["model_name"],
                "weights": source["weights"]}
    if encoder_only:
        from medscale.models.factory import ENCODER_ONLY

        metadata["medscale_export_kind"] = ENCODER_ONLY
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


def timm_spec(record: Mapping[str, Any], encoder_only: bool = False) -> dict[str, Any]:
    """The timm architecture, its constructor arguments and the pretrained-config overlay of a
    preprocessing record: what ``timm.create_model`` needs to rebuild the model and load the export
    (`encoder_only`: without head and pooling, ``num_classes=0, global_pool=''``)."""
    from medscale.models.factory import _constructor_params

    model = record["model"]
    name = model["name"]
    params = _constructor_params(name)
    kwargs: dict[str, Any] = {"num_classes": 0 if encoder_only else int(model["num_classes"]),
                              "in_chans": int(record["channels"])}
    if encoder_only:
        kwargs["global_pool"] = ""
    if "img_size" in params:
        kwargs["img_size"] = int(record["image_size"])
    if model.get("patch_size"):
        kwargs["patch_size"] = int(model["patch_size"])
    overlay = {"num_classes": kwargs["num_classes"],
               "input_size": [int(record["channels"]), int(record["image_size"]), int(record["image_size"])]}
    return {"model_name": name, "kwargs": kwargs, "pretrained_cfg_overlay": overlay}


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
    states = safe_load(_model_states_file(path))
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
        params = _master_weights(root, tag, path, states)
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


def _model_states_file(path: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (path / name).exists():
            return path / name
    raise InputError(f"checkpoint {path} holds no DeepSpeed model states (mp_rank_00_model_states.pt)")


def _master_weights(root: Path, tag: str, path: Path, states: Mapping[str, Any]) -> Mapping[str, LazyTensor]:
    """Lazily gathered fp32 master weights of a DeepSpeed checkpoint, by parameter name."""
    ds = states.get("ds_config") or {}
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    low_precision = any((ds.get(k) or {}).get("enabled") is True for k in ("bf16", "fp16"))
    if stage == 0:
        if low_precision:
            raise InputError(f"checkpoint {path} is ZeRO stage 0 with 16-bit weights: DeepSpeed keeps its fp32 master "
                             "copy there without parameter names. Export RUN/model.pt (no --checkpoint), or the EMA")
        return {k: v for k, v in states["module"].items()}  # without ZeRO and in fp32 the module is the master
    optim = sorted(path.glob("*_optim_states.pt"), key=_rank_of)
    if not optim:
        raise InputError(f"checkpoint {path} (ZeRO stage {stage}) holds no *_optim_states.pt files")
    first = safe_load(optim[0])["optimizer_state_dict"]  # memory-mapped: the moments are not read
    from deepspeed.checkpoint.constants import PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE

    zero_stage = int(first[ZERO_STAGE]) if ZERO_STAGE in first else None
    if zero_stage is not None and zero_stage >= 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, lazy_mode=True)
    if SINGLE_PARTITION_OF_FP32_GROUPS in first and PARAM_SLICE_MAPPINGS in first:
        return _sliced_master_weights(path, optim, states, first)
    if zero_stage is not None:  # a ZeRO-1/2 state without a slice map (an older DeepSpeed's)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, lazy_mode=True)
    raise InputError(f"checkpoint {path}: {optim[0].name} is neither a ZeRO nor a bf16-optimizer state; "
                     "cannot find its fp32 master weights")


class _Fragments:
    """One parameter put together from its slices of each rank's flat fp32 partition."""

    def __init__(self, name: str, pieces: list[torch.Tensor], shape: Iterable[int], dtype: torch.dtype):
        self.name, self.pieces, self.shape, self.dtype = name, pieces, torch.Size(shape), dtype

    def contiguous(self) -> torch.Tensor:
        if not self.pieces:
            flat = torch.empty(0, dtype=self.dtype)
        else:  # one piece: a view of the memory-mapped partition, no copy
            flat = torch.cat(self.pieces) if len(self.pieces) != 1 else self.pieces[0]
        if flat.numel() != self.shape.numel():
            raise InputError(f"the optimizer state holds {flat.numel()} values of {self.name}, its shape "
                             f"{tuple(self.shape)} needs {self.shape.numel()}")
        return flat.view(self.shape)


def _sliced_master_weights(path: Path, optim: list[Path], states: Mapping[str, Any],
                           first: Mapping[str, Any]) -> dict[str, LazyTensor]:
    """The fp32 masters of DeepSpeed's ZeRO-1/2 optimizer and of its BF16_Optimizer (bf16 at ZeRO-1),
    tensor by tensor. Each rank's file holds its partition of every flat parameter group
    (``single_partition_of_fp32_groups``) and, per parameter, where its slice sits in it
    (``param_slice_mappings``: start and numel in the partition). A parameter is the concatenation
    of its slices in rank order, materialised only when the writer asks for it.

    The slice map is checked against the layout DeepSpeed's ``zero_to_fp32`` reconstructs from
    (the model states' ``param_shapes`` in order, each followed by its ``param_alignment_paddings``,
    the group split into equal partitions of ``numel + group_paddings`` values: ZeRO-1/2 saves each
    partition without its trailing padding, the bf16 optimizer with it). Where they disagree the
    layout is used, so the tensors are always the ones ``get_fp32_state_dict_from_zero_checkpoint``
    returns. ZeRO-2's frozen parameters come from the model states (``frozen_param_fragments``), as
    there."""
    from deepspeed.checkpoint.constants import (FROZEN_PARAM_FRAGMENTS, GROUP_PADDINGS, PARAM_ALIGNMENT_PADDINGS,
                                                PARAM_SLICE_MAPPINGS, PARTITION_COUNT, SINGLE_PARTITION_OF_FP32_GROUPS,
                                                ZERO_STAGE)

    world = len(optim)
    ranks = [_rank_of(f) for f in optim]
    if ranks != list(range(world)):
        raise InputError(f"checkpoint {path}: optimizer files of ranks {ranks}, expected 0..{world - 1}")
    param_shapes = states.get("param_shapes")
    if not param_shapes:
        raise InputError(f"checkpoint {path}: the model states hold no param_shapes")
    osds = [first] + [safe_load(f)["optimizer_state_dict"] for f in optim[1:]]  # memory-mapped
    unpadded = ZERO_STAGE in first  # ZeRO-1/2 drops each partition's trailing padding; BF16_Optimizer keeps it
    alignment = first.get(PARAM_ALIGNMENT_PADDINGS)
    for f, osd in zip(optim, osds):
        counts = osd[PARTITION_COUNT]
        counts = {int(c) for c in counts} if isinstance(counts, (list, tuple)) else {int(counts)}
        if counts != {world}:  # (an expert group partitioned over fewer ranks would show here too)
            raise InputError(f"checkpoint {path} holds {world} optimizer files, {f.name} says "
                             f"{' or '.join(map(str, sorted(counts)))} ranks wrote it")
        if not len(osd[SINGLE_PARTITION_OF_FP32_GROUPS]) == len(osd[PARAM_SLICE_MAPPINGS]) == len(param_shapes):
            raise InputError(f"checkpoint {path}: {f.name} holds {len(osd[SINGLE_PARTITION_OF_FP32_GROUPS])} "
                             f"parameter groups, the model states {len(param_shapes)}")

    pieces: dict[str, list[torch.Tensor]] = {}
    shapes: dict[str, torch.Size] = {}
    dtypes: dict[str, torch.dtype] = {}
    for g, group in enumerate(param_shapes):
        flats = [osd[SINGLE_PARTITION_OF_FP32_GROUPS][g] for osd in osds]
        sizes = {flat.numel() + (int(osd[GROUP_PADDINGS][g]) if unpadded else 0) for flat, osd in zip(flats, osds)}
        if len(sizes) != 1:
            raise InputError(f"checkpoint {path}: the ranks' partitions of parameter group {g} differ in size {sizes}")
        size = sizes.pop()
        paddings = alignment[g] if alignment is not None else [0] * len(group)
        if len(paddings) != len(group):
            raise InputError(f"checkpoint {path}: {len(paddings)} alignment paddings for the {len(group)} "
                             f"parameters of group {g}")
        need = sum(math.prod(shape) for shape in group.values()) + sum(int(p) for p in paddings)
        if need > size * world:
            raise InputError(f"checkpoint {path}: parameter group {g} needs {need} values, the {world} partitions "
                             f"hold {size * world}")
        # The layout: where each parameter's slices sit in which rank's partition.
        layout: list[dict[str, tuple[int, int]]] = [{} for _ in range(world)]
        offset = 0
        for (name, shape), padding in zip(group.items(), paddings):
            numel = math.prod(shape)
            for r in range(offset // size, -(-(offset + numel) // size)) if numel else ():
                begin, end = max(offset, r * size), min(offset + numel, (r + 1) * size)
                layout[r][name] = (begin - r * size, end - begin)
            shapes[name], dtypes[name] = torch.Size(shape), flats[0].dtype
            offset += numel + int(padding)
        mapped = [{name: (int(w.start), int(w.numel)) for name, w in osd[PARAM_SLICE_MAPPINGS][g].items()}
                  for osd in osds]
        if mapped == layout:
            layout = mapped  # the same slices, read by the optimizer's own map
        else:
            log.warning("checkpoint %s: the optimizer's slice map of parameter group %d disagrees with the order of "
                        "param_shapes (round_robin_gradients?): reading the parameters by param_shapes, as "
                        "DeepSpeed's zero_to_fp32 does", path, g)
        for r, (flat, where) in enumerate(zip(flats, layout)):
            for name, (start, numel) in where.items():
                if start + numel > flat.numel():
                    raise InputError(f"checkpoint {path}: rank {r} holds {flat.numel()} values of parameter group "
                                     f"{g}, {name} needs {start + numel}")
                pieces.setdefault(name, []).append(flat.narrow(0, start, numel))
    state: dict[str, LazyTensor] = {name: _Fragments(name, pieces.get(name, []), shape, dtypes[name])
                                    for name, shape in shapes.items()}
    for name, value in (states.get(FROZEN_PARAM_FRAGMENTS) or {}).items():
        state.setdefault(name, value)  # ZeRO-2 saves the parameters outside the optimizer (frozen) whole
    return state


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
            return preprocess_record(cfg, _class_names(cfg.data.shards))
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


def _rank_of(path: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(m.group(1)) if m else -1


# -------------------------------------------------------------------------------------------------
# writers
# -------------------------------------------------------------------------------------------------


def write_safetensors(path: str | Path, tensors: Mapping[str, LazyTensor], metadata: Mapping[str, str] | None = None,
                      ) -> int:
    """Write `tensors` as a safetensors file, materialising one tensor at a time; floating-point
    tensors in fp32, others as they are. Atomic (a temporary name, then a rename). Returns the bytes
    of tensor data."""
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}}
    offset = 0
    for name, t in tensors.items():
        dtype = torch.float32 if t.dtype.is_floating_point else t.dtype
        if dtype not in _ST_DTYPES:
            raise InputError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot hold")
        size = math.prod(t.shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, t in tensors.items():
            value = t.contiguous()
            if value.is_floating_point():
                value = value.float()
            data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            begin, end = header[name]["data_offsets"]
            if data.nbytes != end - begin:
                raise InputError(f"tensor {name!r} has {data.nbytes} bytes, its shape {list(t.shape)} needs {end - begin}")
            f.write(data.data)
            del value, data
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return offset


def _require_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(f"--onnx needs {', '.join(missing)}: pip install 'medscale[export]' "
                          "(onnx, onnxscript, onnxruntime)")


@torch.no_grad()
def export_onnx(model: nn.Module, path: str | Path, *, channels: int, image_size: int,
                tolerance: float = ONNX_TOLERANCE) -> tuple[float, int]:
    """Write `model` as ONNX with a dynamic batch axis and compare ONNX Runtime with PyTorch on
    seeded inputs of batch 1 and 3 (the graph is traced at batch 2). Returns the largest absolute
    difference of the outputs and the opset.

    Raises:
        OnnxParityError: the difference exceeds `tolerance` (the ONNX files are removed).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    path = Path(path)
    model = model.eval()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, channels, image_size, image_size, generator=g)
    program = torch.onnx.export(model, (sample,), input_names=["image"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    program.save(str(path))  # initializers inside the file below 2 GB, beside it (model.onnx.data) above
    opset = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), 0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, channels, image_size, image_size, generator=g)
        want = model(x).float().numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        if got.shape != want.shape:
            raise OnnxParityError(f"ONNX Runtime gave outputs of shape {got.shape} for batch {batch}, PyTorch {want.shape}")
        diff = max(diff, float(np.abs(got - want).max()))
    del session
    if not diff <= tolerance:
        path.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        raise OnnxParityError(f"ONNX Runtime's logits differ from PyTorch's by up to {diff:.3g} (tolerance "
                              f"{tolerance:g}) on seeded inputs of batch 1 and 3; {path} was removed")
    log.info("wrote %s (opset %d): ONNX Runtime within %.3g of PyTorch (tolerance %g)", path, opset, diff, tolerance)
    return diff, opset
