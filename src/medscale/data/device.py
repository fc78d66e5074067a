"""Where a batch meets the model's device: the move, and the transforms the gpu path left for it."""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["to_device"]

log = logging.getLogger("medscale.data")

_DEFERRED = ("pixels", "params", "device_transform")
_told_cpu = False


def to_device(batch: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """The batch with its tensors on `device` and ``image`` in the model's input `dtype`.

    A batch from the gpu path (``data.transforms_on=gpu``: ``pixels``, ``params`` and
    ``device_transform`` instead of ``image``) gets its transforms here, batched on `device` with
    each sample's own parameters. Copies are non-blocking: asynchronous from the pinned batches
    `medscale.data.loader.make_loader` gives on CUDA.
    """
    global _told_cpu
    device = torch.device(device)
    out = {k: v.to(device=device, non_blocking=True) if isinstance(v, torch.Tensor) else v
           for k, v in batch.items() if k not in _DEFERRED}
    if "device_transform" in batch:
        if device.type != "cuda" and not _told_cpu:
            _told_cpu = True
            log.info("data.transforms_on=gpu on device %s: the transforms run batched on the CPU in the main "
                     "process (the workers only decode)", device)
        pixels = batch["pixels"].to(device=device, non_blocking=True)
        image = batch["device_transform"].apply(pixels, batch["params"])  # params stay on the CPU: see apply
    else:
        image = out["image"]
    out["image"] = image.to(dtype=dtype)
    return out
