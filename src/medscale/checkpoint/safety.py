"""Checkpoint files are checked to hold nothing but tensors before anything unpickles them for real.

medscale itself reads every file with ``torch.load(weights_only=True)`` or safetensors. DeepSpeed
does not: ``engine.load_checkpoint`` and ``zero_to_fp32`` unpickle their files with
``weights_only=False``, and an unpickled object may run any code (its ``__reduce__``). So before a
checkpoint directory goes to DeepSpeed, `verify_checkpoint_files` loads every ``.pt`` in it with
``weights_only=True`` (memory-mapped: the tensors' bytes are not read), allowing exactly the classes
DeepSpeed's own checkpoints hold, and refuses the directory if any file needs anything else.

The allowed classes (`DEEPSPEED_GLOBALS`) were found by listing the globals of real DeepSpeed 0.19
checkpoints (``torch.serialization.get_unsafe_globals_in_checkpoint``) at ZeRO 0-3, bf16 and fp32,
one and two ranks, with and without optimizer offload: ``ZeroStageEnum`` (ZeRO-1/2/3 optimizer
states), ``fragment_address`` (the parameter-to-partition map of ZeRO-1/2 and of the bf16
optimizer), and the static ``LossScaler`` (ZeRO-1/2/3 optimizer states). ``DynamicLossScaler``
replaces ``LossScaler`` under fp16, which runs on GPUs only: it is allowed from DeepSpeed's source
(the optimizer saves its loss scaler) and a round trip of the object, not from a real fp16
checkpoint.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from medscale.errors import InputError

__all__ = ["DEEPSPEED_GLOBALS", "deepspeed_globals", "verify_checkpoint_files", "safe_load"]

log = logging.getLogger("medscale.checkpoint")

# "module.Class" names, as torch.serialization names them in its errors and listings.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


def deepspeed_globals() -> list[Any]:
    """The classes of `DEEPSPEED_GLOBALS` (imports DeepSpeed)."""
    import importlib

    out = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def safe_load(path: str | Path, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)`` that also accepts DeepSpeed's own checkpoint classes.

    Memory-maps zip-format files (``mmap=True``, unless given): tensors are read only when touched.

    Raises:
        InputError: the file holds anything else (the message names the file and the globals).
    """
    path = Path(path)
    kwargs.setdefault("map_location", "cpu")
    if "mmap" not in kwargs:
        kwargs["mmap"] = zipfile.is_zipfile(path)  # torch's legacy (non-zip) format cannot be mapped
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise InputError(_refusal(path, e)) from None


def verify_checkpoint_files(*directories: str | Path | None) -> int:
    """Check that every ``.pt`` file under the `directories` (None: skipped) loads with
    ``torch.load(weights_only=True)`` plus `DEEPSPEED_GLOBALS`. Call it before DeepSpeed (or anything
    with ``weights_only=False``) reads them. Returns the number of files checked.

    Raises:
        InputError: a file would need another global to load (a crafted or foreign file); the
            message names the file and the global. Nothing of that file has been executed.
    """
    files = [f for d in directories if d is not None for f in sorted(Path(d).rglob("*.pt"))]
    for f in files:
        safe_load(f)
    log.debug("verified %d checkpoint files in %s", len(files), [str(d) for d in directories if d is not None])
    return len(files)


def _refusal(path: Path, error: Exception) -> str:
    allowed = set(DEEPSPEED_GLOBALS)
    try:
        offending = [g for g in _globals(path) if g not in allowed]
    except Exception:  # not even a readable pickle: torch's own reason below says why
        offending = []
    reason = next((line.strip() for line in str(error).splitlines() if "WeightsUnpickler error" in line),
                  str(error).splitlines()[0] if str(error) else type(error).__name__)
    what = (f"global {', '.join(offending)}" if offending
            else f"content that torch.load(weights_only=True) rejects ({reason})")
    return (f"refusing to load {path}: it holds {what}, which a checkpoint of tensors never holds (a crafted or "
            f"foreign file?). medscale loads checkpoints with torch.load(weights_only=True), allowing only "
            f"DeepSpeed's own {', '.join(g.rsplit('.', 1)[1] for g in DEEPSPEED_GLOBALS)}; nothing in the file "
            f"was run. Remove the checkpoint directory or restore it from a trusted copy")


def _globals(path: Path) -> list[str]:
    """The "module.name" globals a torch file's pickle would import (zip format or torch's legacy one)."""
    if zipfile.is_zipfile(path):
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    import pickletools

    found: list[str] = []
    strings: list[str] = []  # STACK_GLOBAL takes the module and name pushed just before it
    with open(path, "rb") as f:
        for op, arg, _ in pickletools.genops(f):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    try:  # leave out what torch allows anyway, as its own listing of zip files does
        from torch._weights_only_unpickler import _get_allowed_globals

        default = set(_get_allowed_globals())
    except (ImportError, AttributeError):
        default = set()
    return [g for g in dict.fromkeys(found) if g not in default]
