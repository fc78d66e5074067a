"""``model.safetensors`` written tensor by tensor, with no second copy of the weights in memory.

``model.safetensors`` is written tensor by tensor (the safetensors layout: a little-endian u64
header length, a JSON header of dtypes, shapes and byte offsets, then the raw bytes), so the export
never holds a second copy of the weights.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch

from medscale.errors import InputError

__all__ = ["LazyTensor", "write_safetensors"]


class LazyTensor(Protocol):
    """A tensor materialised on ``contiguous()`` (a torch.Tensor is one; so is DeepSpeed's GatheredTensor)."""

    shape: torch.Size
    dtype: torch.dtype

    def contiguous(self) -> torch.Tensor: ...


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


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
