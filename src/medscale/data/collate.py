"""A worker's samples to one batch: images stacked (or stored-dtype crops padded) into shared memory,
keys, patients, studies, validity, seeds and targets beside them; targets and flags become tensors
in the main process (`to_tensors`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from medscale.data.shm import SharedBuffers, new_shared

__all__ = ["Batch", "stack", "pad_pixels", "collate", "to_tensors"]

Batch = dict[str, Any]


def stack(tensors: list[torch.Tensor], buffers: SharedBuffers | None = None) -> torch.Tensor:
    if get_worker_info() is None:
        return torch.stack(tensors)
    # In a worker, stack straight into shared memory: the batch then crosses to the main process
    # without another copy.
    shape = (len(tensors), *tensors[0].shape)
    out = buffers.take(shape) if buffers is not None else new_shared(shape)
    return torch.stack(tensors, out=out)


# Stored dtypes the gpu path ships as they are; anything else is widened (uint32) or narrowed to
# float32 (float64), as the cpu path's float32 conversion would.
_SHIPPED = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int8): torch.int8, np.dtype(np.uint16): torch.uint16,
            np.dtype(np.int16): torch.int16, np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32}


def pad_pixels(crops: list[np.ndarray], buffers: SharedBuffers | None = None) -> torch.Tensor:
    """(C, h, w) crops of one batch in one (B, C, H, W) tensor of their common dtype, each top-left,
    zero-padded to the largest; in shared memory in a worker.

    Padding rather than grouping by size: the batch keeps its order (exact resume) and the device
    resizes it in one pass; the cost is the padding bytes, about 10% for same-size sources and
    their random crops.
    """
    dtype = np.result_type(*[c.dtype for c in crops])
    tdtype = _SHIPPED.get(dtype, torch.int64 if dtype.kind in "ui" else torch.float32)
    shape = (len(crops), max(c.shape[0] for c in crops), max(c.shape[1] for c in crops),
             max(c.shape[2] for c in crops))
    if get_worker_info() is not None:
        out = buffers.take(shape, tdtype) if buffers is not None else new_shared(shape, dtype=tdtype)
    else:
        out = torch.empty(shape, dtype=tdtype)
    for k, crop in enumerate(crops):
        c, h, w = crop.shape
        out[k, :c, :h, :w].copy_(torch.from_numpy(crop))
        out[k, c:].zero_()  # the padding: fresh shared memory is zero already, reused buffers are not
        out[k, :c, h:].zero_()
        out[k, :c, :h, w:].zero_()
    return out


def collate(items: list[dict[str, Any]], buffers: SharedBuffers | None = None) -> Batch:
    if items and "pixels" in items[0]:  # the gpu path: stored-dtype crops and their parameters
        pixels: Batch = {"pixels": pad_pixels([x["pixels"] for x in items], buffers),
                         "params": torch.from_numpy(np.stack([x["params"] for x in items]))}
    else:
        pixels = {"image": stack([x["image"] for x in items], buffers)}
    batch = {
        **pixels,
        "key": [x["key"] for x in items],
        "patient": [x["patient"] for x in items],
        "study": [x["study"] for x in items],
        "valid": [x["valid"] for x in items],
        "seed": [x["seed"] for x in items],
    }
    if items and "target" in items[0]:  # a stream without labels has no targets
        batch["target"] = [x["target"] for x in items]  # lists: made tensors in the main process (`to_tensors`)
    return batch


def to_tensors(batch: Batch, task: str) -> Batch:
    """Targets and valid flags to tensors, in the main process (see `collate`)."""
    if "target" in batch:
        batch["target"] = torch.tensor(batch["target"], dtype=torch.float32 if task == "multilabel" else torch.long)
    batch["valid"] = torch.tensor(batch["valid"], dtype=torch.bool)
    batch["seed"] = torch.tensor(batch["seed"], dtype=torch.int64)
    return batch
