"""Lossless pixel encodings for shards, shared by prep (encode) and the loader (decode).

Medical images are 8- to 16-bit and must come back bit-exact. Four encodings are offered:

- ``zstd`` (default): a delta filter between neighbouring rows (or frames), then Zstandard.
  The delta turns smooth anatomy into small numbers, which zstd stores compactly.
- ``lz4``: the same delta filter, then Blosc2's bit shuffle and LZ4 on one thread: faster to
  encode than zstd and larger; for prep runs that are CPU-bound rather than storage-bound.
- ``zlib``: the same filter with zlib, for readers without zstandard.
- ``png``: standard 8/16-bit PNG, viewable by any tool; much slower to encode at high levels.
  Signed images are stored with an offset of 32768, recorded in the header dict.

The ``zstd``/``lz4``/``zlib`` payload starts with a small self-describing header (magic, dtype,
shape, filter), so a sample decodes without its JSON. Sizes and speeds of each encoding on CT:
BENCHMARKS.md (prep).
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np

__all__ = ["ENCODINGS", "encode_pixels", "decode_pixels", "extension_for"]

ENCODINGS = ("zstd", "lz4", "zlib", "png")
_EXT = {"zstd": "pix.zst", "lz4": "pix.lz4", "zlib": "pix.zlib", "png": "pix.png"}
_BY_EXT = {v: k for k, v in _EXT.items()}
_MAGIC = b"MSPX"
_DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"]
_FILTER_NONE, _FILTER_DELTA = 0, 2  # header codes: never renumber, shards store them
_PAYLOAD_VERSION = 1  # layout of the payload header (magic, version, dtype, filter, ndim, shape)
# PNG has no signed samples: int16 is stored shifted into uint16 by this much.
_PNG_INT16_SHIFT = 32768


def extension_for(encoding: str) -> str:
    """The WebDataset member extension for an encoding (``pix.zst``, ``pix.lz4``, ``pix.zlib``, ``pix.png``)."""
    try:
        return _EXT[encoding]
    except KeyError:
        raise ValueError(f"unknown pixel encoding {encoding!r}; choose one of {ENCODINGS}") from None


def _zstd():
    try:
        import zstandard
    except ImportError as e:  # declared as a dependency; say what to do if it is missing
        raise ImportError("the zstd pixel encoding needs the 'zstandard' package: pip install zstandard") from e
    return zstandard


def _blosc2():
    try:
        import blosc2
    except ImportError as e:
        raise ImportError("the lz4 pixel encoding needs the 'blosc2' package: pip install blosc2") from e
    return blosc2


def _compress(encoding: str, payload: bytes, level: int, itemsize: int) -> bytes:
    if encoding == "zstd":
        return _zstd().ZstdCompressor(level=level).compress(payload)
    if encoding == "lz4":
        b = _blosc2()
        # One thread: prep parallelises over worker processes, one core each.
        return b.compress2(payload, typesize=itemsize, clevel=max(1, min(level, 9)), codec=b.Codec.LZ4,
                           filters=[b.Filter.BITSHUFFLE], nthreads=1)
    return zlib.compress(payload, level)


def _decompress(encoding: str, body: bytes) -> bytes:
    if encoding == "zstd":
        return _zstd().ZstdDecompressor().decompress(body)
    if encoding == "lz4":
        return _blosc2().decompress2(body, nthreads=1)
    if encoding == "zlib":
        return zlib.decompress(body)
    raise ValueError(f"unknown pixel encoding {encoding!r}; choose one of {ENCODINGS}")


def _delta(arr: np.ndarray) -> bytes:
    # Difference along the first axis (rows of an image, or neighbouring frames of a volume):
    # whole rows subtract as vectors, and modular arithmetic in the unsigned type of the same
    # width makes the filter exactly invertible for signed and unsigned data alike.
    u = arr.view(np.dtype(f"u{arr.dtype.itemsize}"))
    d = np.empty_like(u)
    d[:1] = u[:1]
    np.subtract(u[1:], u[:-1], out=d[1:])
    return d.astype(d.dtype.newbyteorder("<"), copy=False).tobytes()


def _undelta(raw: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    u = np.frombuffer(raw, np.dtype(f"<u{dtype.itemsize}")).reshape(shape)
    if u.ndim < 2 or u.shape[0] < 2:
        return np.cumsum(u, axis=0, dtype=u.dtype).view(dtype)  # wraps modulo 2**bits, undoing the delta
    # Row by row, each row a vector add (wrapping like the cumsum): numpy's cumsum along the first
    # axis walks the array with a stride and took 0.73 ms for a 512x512 image, this 0.31 ms. The
    # loader decodes every sample every epoch, so this is a third of a worker's decode time.
    out = np.empty(u.shape, u.dtype)
    out[0] = u[0]
    for i in range(1, u.shape[0]):
        np.add(out[i - 1], u[i], out=out[i])
    return out.view(dtype)


def encode_pixels(arr: np.ndarray, encoding: str = "zstd", level: int = 3) -> tuple[bytes, dict[str, Any]]:
    """Encode an image array losslessly.

    Args:
        arr: (H, W), (H, W, C) or (F, H, W[, C]) array of an integer or float dtype.
        encoding: one of ``zstd``, ``lz4``, ``zlib``, ``png``.
        level: compression level of the encoding.

    Returns:
        The encoded bytes and a small dict (dtype, shape, encoding, offset) for the sample JSON.
    """
    arr = np.ascontiguousarray(arr)
    if arr.dtype.name not in _DTYPES:
        raise ValueError(f"cannot encode pixel dtype {arr.dtype}; expected one of {_DTYPES}")
    info: dict[str, Any] = {"dtype": arr.dtype.name, "shape": list(arr.shape), "encoding": encoding}
    if encoding == "png":
        return _encode_png(arr, level, info), info
    if encoding not in ("zstd", "lz4", "zlib"):
        raise ValueError(f"unknown pixel encoding {encoding!r}; choose one of {ENCODINGS}")
    # Integer images get the delta filter; float images (non-integer rescale) are stored as is.
    filt = _FILTER_DELTA if arr.dtype.kind in "ui" and arr.ndim >= 1 and arr.size else _FILTER_NONE
    payload = _delta(arr) if filt else arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    body = _compress(encoding, payload, level, arr.dtype.itemsize)
    header = _MAGIC + struct.pack(
        f"<BBBB{arr.ndim}I", _PAYLOAD_VERSION, _DTYPES.index(arr.dtype.name), filt, arr.ndim, *arr.shape
    )
    return header + body, info


def decode_pixels(data: bytes, encoding: str, info: dict[str, Any] | None = None) -> np.ndarray:
    """Decode bytes written by `encode_pixels` back to the exact array.

    Args:
        data: encoded bytes.
        encoding: the encoding (or the member extension such as ``pix.zst``).
        info: the dict `encode_pixels` returned; needed for PNG (dtype and offset).
    """
    encoding = _BY_EXT.get(encoding, encoding)
    if encoding == "png":
        return _decode_png(data, info or {})
    if data[:4] != _MAGIC:
        raise ValueError("not a medscale pixel payload (bad magic)")
    version, dcode, filt, ndim = struct.unpack_from("<BBBB", data, 4)
    if version != _PAYLOAD_VERSION:
        raise ValueError(f"unsupported pixel payload version {version}")
    shape = struct.unpack_from(f"<{ndim}I", data, 8)
    body = data[8 + 4 * ndim :]
    raw = _decompress(encoding, body)
    dtype = np.dtype(_DTYPES[dcode]).newbyteorder("<")
    if filt == _FILTER_DELTA:
        return _undelta(raw, dtype, shape).astype(dtype.newbyteorder("="), copy=False)
    if filt != _FILTER_NONE:
        raise ValueError(f"unknown pixel filter {filt} (written by a newer medscale?)")
    return np.frombuffer(raw, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _encode_png(arr: np.ndarray, level: int, info: dict[str, Any]) -> bytes:
    from PIL import Image

    if arr.ndim == 3 and arr.shape[-1] not in (3, 4) or arr.ndim > 3:
        raise ValueError(f"png encoding takes one (H, W) or (H, W, 3) image, got shape {arr.shape}; use zstd for volumes")
    if arr.dtype == np.int16:
        # PNG has no signed samples: shift into uint16 and record the shift.
        arr = (arr.astype(np.int32) + _PNG_INT16_SHIFT).astype(np.uint16)
        info["offset"] = -_PNG_INT16_SHIFT
    elif arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"png encoding takes uint8/uint16/int16, got {arr.dtype}; use zstd")
    buf = io.BytesIO()
    if arr.dtype == np.uint16 and arr.ndim == 2:
        # Pillow's "I;16" mode writes 16-bit grayscale PNG without widening.
        img = Image.frombuffer("I;16", (arr.shape[1], arr.shape[0]), arr.astype("<u2").tobytes(), "raw", "I;16", 0, 1)
    elif arr.dtype == np.uint16:
        raise ValueError("16-bit colour PNG is not supported by Pillow; use zstd")
    else:
        img = Image.fromarray(arr)
    img.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def _decode_png(data: bytes, info: dict[str, Any]) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.mode in ("I;16", "I;16B", "I;16L"):
            arr = np.frombuffer(img.tobytes("raw", "I;16"), "<u2").reshape(img.size[1], img.size[0]).copy()
        else:
            arr = np.asarray(img)
    if info.get("offset"):
        arr = (arr.astype(np.int32) + int(info["offset"])).astype(info.get("dtype", "int16"))
    elif info.get("dtype") and arr.dtype.name != info["dtype"]:
        arr = arr.astype(info["dtype"])
    return arr
