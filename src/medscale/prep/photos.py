"""Clinical photos (JPEG, PNG) to upright pixel arrays, with every embedded metadata block dropped."""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medscale.prep.errors import RejectedInput

__all__ = ["load_photo", "PHOTO_FORMATS"]

PHOTO_FORMATS = ("JPEG", "PNG")
"""Formats `load_photo` accepts, as reported in its metadata."""

# File signatures, checked before Pillow sees the file: only the JPEG and PNG parsers ever run on
# untrusted input, and a GIF or TIFF renamed to .jpg is told apart from a corrupt JPEG.
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))
# Pillow's JPEG opener also returns multi-picture (MPO) files, which phones often write; their
# first frame is the ordinary photo.
_PILLOW_FORMATS = ("JPEG", "PNG")

_GRAY16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_GRAY8_MODES = frozenset({"1", "L", "LA", "La"})
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})


def load_photo(path: str | os.PathLike, *, max_pixels: int = 100_000_000) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a JPEG or PNG photo into an upright pixel array.

    Only the pixel array and a few facts about its shape leave this function; that is what strips
    EXIF (camera serials, GPS, dates, artist), XMP, ICC profiles, comments and PNG text chunks
    (tEXt/iTXt/zTXt, which often carry names): none of them is ever read into the result. The EXIF
    orientation is applied first, so the pixels are upright without the tag. Alpha is dropped
    (not composited) and ICC profiles are not applied: pixels stay in the file's colour space.

    Args:
        path: The file.
        max_pixels: Reject images with more values than this (width x height x channels),
            checked from the header before any pixel is decoded. Pillow's own
            decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, twice which it refuses) also
            yields ``too_large``.

    Returns:
        ``(pixels, meta)``: pixels are a fresh, C-contiguous array, ``uint8 (H, W, 3)`` for colour,
        ``uint8 (H, W)`` or ``uint16 (H, W)`` for grayscale (16-bit PNG stays 16-bit, exactly;
        16-bit colour PNG is decoded by Pillow to 8 bits per channel). ``meta`` holds only
        ``width``, ``height``, ``channels``, ``bit_depth`` (of the returned array) and ``format``
        (``"JPEG"`` or ``"PNG"``).

    Raises:
        RejectedInput: reason ``empty``, ``unsupported`` (not JPEG/PNG, or a pixel mode we do not
            handle), ``too_large``, ``truncated`` or ``unreadable``.
        ValueError: ``max_pixels`` is not positive.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise RejectedInput("unreadable", f"cannot open: {e.strerror or e}") from e
    if not head:
        raise RejectedInput("empty", "the file has 0 bytes")
    if not any(head.startswith(sig) for sig, _ in _SIGNATURES):
        raise RejectedInput("unsupported", "not a JPEG or PNG file (by its signature)")

    with warnings.catch_warnings():
        # Pillow warns above MAX_IMAGE_PIXELS; our own max_pixels check is the one that decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=_PILLOW_FORMATS) as im:
                return _decode(im, max_pixels)
        except Image.DecompressionBombError as e:
            raise RejectedInput("too_large", str(e)) from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            # Pillow signals a short file with OSError("image file is truncated ...") or
            # OSError("Truncated File Read"); everything else is a corrupt stream.
            reason = "truncated" if "truncated" in str(e).lower() else "unreadable"
            raise RejectedInput(reason, f"{type(e).__name__}: {e}") from e


def _decode(im: Image.Image, max_pixels: int) -> tuple[np.ndarray, dict[str, Any]]:
    fmt = "PNG" if im.format == "PNG" else "JPEG"
    if im.mode in _GRAY16_MODES or im.mode in _GRAY8_MODES:
        channels = 1
    elif im.mode in _COLOUR_MODES:
        channels = 3
    else:
        raise RejectedInput("unsupported", f"{fmt} pixel mode {im.mode!r}")
    width, height = im.size
    if width <= 0 or height <= 0:
        raise RejectedInput("unreadable", f"image size {width}x{height}")
    if width * height * channels > max_pixels:
        raise RejectedInput("too_large", f"{width}x{height}x{channels} values exceed max_pixels={max_pixels}")

    im.load()  # decode now, so truncation surfaces here and not inside a transform
    try:
        upright = ImageOps.exif_transpose(im)
    except (SyntaxError, ValueError, TypeError, KeyError, OSError, struct.error) as e:
        # Without a readable orientation we cannot know which way is up; a sideways image would
        # train silently wrong, so refuse it.
        raise RejectedInput("unreadable", f"EXIF block cannot be parsed, orientation unknown ({e})") from e

    if upright.mode in _GRAY16_MODES:
        pixels = np.array(upright)
        # "I" is 32-bit; from a PNG it holds 16-bit samples, anything else would be truncated.
        if pixels.size and (pixels.min() < 0 or pixels.max() > 0xFFFF):
            raise RejectedInput("unsupported", f"{fmt} mode {upright.mode!r} values outside 0-65535")
        pixels = pixels.astype(np.uint16)  # also converts big-endian I;16B to native order
    elif channels == 1:
        pixels = np.array(upright if upright.mode == "L" else upright.convert("L"), dtype=np.uint8)
    else:
        pixels = np.array(upright if upright.mode == "RGB" else upright.convert("RGB"), dtype=np.uint8)
    pixels = np.ascontiguousarray(pixels)
    meta = {
        "width": int(pixels.shape[1]),
        "height": int(pixels.shape[0]),
        "channels": channels,
        "bit_depth": 16 if pixels.dtype == np.uint16 else 8,
        "format": fmt,
    }
    return pixels, meta
