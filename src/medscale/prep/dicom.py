"""DICOM pixels as a radiologist would read them, kept lossless where the data allows.

Each frame follows the grayscale pipeline in its standard order (PS3.3 C.11): decode ->
Modality LUT -> VOI LUT / window (only with ``voi="apply"``) -> MONOCHROME1 inversion.

- Modality LUT: a Modality LUT Sequence, else the rescale, which enhanced multi-frame objects
  keep per frame in the Pixel Value Transformation functional group (pydicom's
  ``apply_modality_lut`` ignores it). Integer rescales are kept exact, computed in the output's
  integer width (`_affine_exact`).
- MONOCHROME1 without VOI is inverted as ``lo + hi - v`` over the possible modality range
  ``[lo, hi]``: integer, range-preserving, and undone exactly by the same formula.
- Colour: pydicom converts YBR_FULL(_422) to RGB and reports the colour space it returns, so
  JPEG data a codec already returned as RGB is not converted twice. BitsStored masking and
  sign extension are pydicom's, on decode. PALETTE COLOR lookup tables are read in the
  file's byte order (`_palette_to_rgb`).

Decoders (`_PLUGINS`): each compressed transfer syntax is decoded by the first installed
pydicom plugin of its row, and only by that one: a file it fails on is rejected, never retried
with another codec, so the pixels of a corpus do not depend on which other plugins happen to be
installed. Permissive codecs come first; GPL pylibjpeg-libjpeg is used only where nothing
permissive is installed, and is the only codec for 12-bit JPEG Extended. Pillow (a medscale
dependency) before python-gdcm for 8-bit JPEG: gdcm 3.2 aborts the whole process on some
corrupt baseline streams (an uncaught C++ exception), where Pillow raises; both give identical
pixels on pydicom's test files.

=========================================  ==========  ========================================
Transfer syntax                            UID         Plugins, first installed wins
=========================================  ==========  ========================================
JPEG Baseline (Process 1)                  .4.50       pillow, gdcm, pylibjpeg (libjpeg)
JPEG Extended, 8-bit (BitsStored 8)        .4.51       pillow, gdcm, pylibjpeg (libjpeg)
JPEG Extended, 12-bit                      .4.51       pylibjpeg (libjpeg, medscale[dicom-gpl])
JPEG Lossless (Process 14)                 .4.57       gdcm, pylibjpeg (libjpeg)
JPEG Lossless SV1                          .4.70       gdcm, pylibjpeg (libjpeg)
JPEG-LS Lossless / Near-Lossless           .4.80/81    pyjpegls, gdcm, pylibjpeg (libjpeg)
JPEG 2000 Lossless / JPEG 2000             .4.90/91    pylibjpeg (openjpeg), gdcm, pillow
HTJ2K (all three)                          .4.201-203  pylibjpeg (openjpeg)
RLE Lossless                               .5          pylibjpeg (rle), pydicom (numpy)
=========================================  ==========  ========================================

pydicom logs a traceback for every plugin that fails on a file; prep rejects that file with a
one-line reason instead, so those records are dropped unless debugging (`quiet_decoder_logs`).
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import uid as U
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.pixels.decoders.base import Decoder

from medscale.prep.errors import RejectedInput

__all__ = ["DICOM_REJECT_REASONS", "RejectedInput", "DicomImage", "read_dicom", "decode_dicom", "quiet_decoder_logs"]

DICOM_REJECT_REASONS = frozenset({"not_dicom", "unreadable", "truncated", "empty", "no_pixel_data",
                                  "decoder_missing", "too_large", "unsupported", "decode_error"})
"""Every reason `read_dicom` and `decode_dicom` may give."""

# Values larger than this stay in the file until the pixels are decoded, so a huge image is
# rejected from its header without being read. Smaller pixel data is read with the header:
# deferring it too would open and read the file twice (measured: decode 1.7 -> 0.9 ms for
# 512x512 CT).
_DEFER_SIZE = "8 MB"
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DICOM_EXTRA = "the medscale[dicom] extra"
_GDCM = "python-gdcm (Apache-2.0)"
_OPENJPEG = "pylibjpeg-openjpeg (MIT)"
_LIBJPEG = "pylibjpeg-libjpeg (GPLv3, the medscale[dicom-gpl] extra)"
_JLS_SYNTAXES = (U.JPEGLSLossless, U.JPEGLSNearLossless)
_J2K_SYNTAXES = (U.JPEG2000Lossless, U.JPEG2000)
_HTJ2K_SYNTAXES = (U.HTJ2KLossless, U.HTJ2KLosslessRPCL, U.HTJ2K)
# pydicom plugin names, in order of preference (the table in the module docstring). "pylibjpeg"
# is pylibjpeg-libjpeg for JPEG and JPEG-LS, pylibjpeg-openjpeg for JPEG 2000, pylibjpeg-rle for RLE.
_PLUGINS: dict[str, tuple[str, ...]] = {
    # Pillow first: gdcm aborts the process on some corrupt 8-bit JPEG (see the module docstring).
    **dict.fromkeys([U.JPEGBaseline8Bit, U.JPEGExtended12Bit], ("pillow", "gdcm", "pylibjpeg")),
    **dict.fromkeys([U.JPEGLossless, U.JPEGLosslessSV1], ("gdcm", "pylibjpeg")),
    **dict.fromkeys(_JLS_SYNTAXES, ("pyjpegls", "gdcm", "pylibjpeg")),
    **dict.fromkeys(_J2K_SYNTAXES, ("pylibjpeg", "gdcm", "pillow")),
    **dict.fromkeys(_HTJ2K_SYNTAXES, ("pylibjpeg",)),
    U.RLELossless: ("pylibjpeg", "pydicom"),
}
# Only libjpeg decodes 12-bit JPEG Extended; pydicom's gdcm and Pillow plugins refuse BitsStored != 8.
_JPEG_12BIT_PLUGINS = ("pylibjpeg",)
# What to install when no plugin of a row is, for the detail of a decoder_missing rejection.
_DECODER_HINTS = {
    **dict.fromkeys([*_J2K_SYNTAXES, *_HTJ2K_SYNTAXES], f"{_OPENJPEG}, {_DICOM_EXTRA}"),
    **dict.fromkeys([U.JPEGLossless, U.JPEGLosslessSV1], f"{_GDCM}, {_DICOM_EXTRA}"),
    **dict.fromkeys(_JLS_SYNTAXES, f"pyjpegls (CharLS, BSD-3) or {_GDCM}, {_DICOM_EXTRA}"),
    **dict.fromkeys([U.JPEGBaseline8Bit, U.JPEGExtended12Bit], f"Pillow or {_GDCM} ({_DICOM_EXTRA})"),
    U.RLELossless: f"pylibjpeg-rle (MIT, {_DICOM_EXTRA})",
}
_JPEG_12BIT_HINT = f"{_LIBJPEG}; python-gdcm and Pillow cannot decode 12-bit JPEG"
# Plugin failures that mean "this codec variant is not supported here", not "corrupt data".
_UNSUPPORTED_BY_PLUGIN = ("does not support", "not supported", "cannot decode")
# Integer output types, narrowest first; unsigned before signed of the same width.
_INT_DTYPES = (np.uint8, np.uint16, np.int16, np.uint32, np.int32)


@dataclass
class DicomImage:
    """One sample's pixels and what a trainer needs to interpret them.

    Attributes:
        pixels: (H, W) grayscale, (H, W, 3) RGB, or (F, H, W[, 3]) as a volume. Grayscale holds
            exact modality values (HU for CT) in the narrowest integer dtype (`_to_int_dtype`),
            float32 after a non-integer rescale, or float32 in [0, 1] with VOI applied. RGB keeps
            its decoded dtype (uint8 for 8-bit, uint16 for 16-bit palettes).
        frame: Frame index when a multi-frame object's frames are separate samples, else None.
        photometric: "MONOCHROME2" (MONOCHROME1 is already inverted) or "RGB".
        windows: VOI (center, width) pairs from the header (per frame if enhanced; a volume gives
            its first frame's), [] if none; mirrored like the pixels when MONOCHROME1 was inverted
            without VOI, so each still selects the same tissue.
        voi_applied: A VOI LUT or window was applied: float32 in [0, 1] (the frame's min..max if
            the header has no VOI). Always False for colour.
        lossless: False only when a non-integer rescale forced float32 modality values.
        bits_stored: BitsStored of the source pixel data.
        inverted: The source was MONOCHROME1 and has been inverted.
    """

    pixels: np.ndarray
    frame: int | None
    photometric: str
    windows: list[tuple[float, float]]
    voi_applied: bool
    lossless: bool
    bits_stored: int
    inverted: bool = False


def read_dicom(path: str | os.PathLike, *, max_pixels: int = 100_000_000) -> Dataset:
    """Read a DICOM file's header, deferring large pixel data, and reject what prep cannot use.

    A file without preamble and ``DICM`` prefix is kept if it parses as a dataset with a
    standard SOP Class UID; its Transfer Syntax UID is then filled in from the parsed encoding.

    Args:
        path: The file.
        max_pixels: Reject images with more values than this (rows x columns x frames x
            samples per pixel), decided from the header before any pixel is read.

    Raises:
        RejectedInput: ``empty``, ``not_dicom``, ``truncated``, ``unreadable``,
            ``no_pixel_data``, ``unsupported`` (float pixel data) or ``too_large``.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise RejectedInput("unreadable", f"{p}: {e.strerror or e}") from e
    if size == 0:
        raise RejectedInput("empty", "the file has 0 bytes")
    ds = _parse(p)
    try:
        _check_header(ds, size, max_pixels)
    except RejectedInput:
        raise
    except Exception as e:  # noqa: BLE001 - values convert lazily; a malformed one fails on first access
        raise RejectedInput("unreadable", f"{type(e).__name__}: {e}"[:300]) from e
    return ds


def decode_dicom(ds: Dataset, *, voi: str = "metadata", frames: str = "samples",
                 max_pixels: int = 100_000_000) -> list[DicomImage]:
    """Decode a dataset's pixels into one image per frame, or one volume.

    Args:
        ds: A dataset, typically from `read_dicom`.
        voi: ``"metadata"``: keep modality values and report the header's windows;
            ``"apply"``: apply the VOI LUT or first window, giving float32 in [0, 1].
        frames: ``"samples"``: one image per frame; ``"volume"``: one image of all frames.
        max_pixels: Reject images with more pixel values than this, before decoding.

    Returns:
        At least one image.

    Raises:
        ValueError: `voi` or `frames` is not one of the values above.
        RejectedInput: ``too_large``, ``no_pixel_data``, ``unreadable``, ``decoder_missing``
            (naming the package that would decode it), ``truncated``, ``unsupported``, or
            ``decode_error`` for any other failure on malformed data, with its message.
    """
    if voi not in ("metadata", "apply"):
        raise ValueError(f"voi must be 'metadata' or 'apply', got {voi!r}")
    if frames not in ("samples", "volume"):
        raise ValueError(f"frames must be 'samples' or 'volume', got {frames!r}")
    if "PixelData" not in ds:
        raise RejectedInput("no_pixel_data", "the dataset has no (integer) Pixel Data")
    try:
        if (n := _pixel_count(ds)) > max_pixels:
            raise RejectedInput("too_large", f"{n} pixel values > max_pixels={max_pixels}")
        images = _decode(ds, voi)
    except (RejectedInput, MemoryError):
        raise
    except BaseException as e:  # noqa: BLE001 - malformed data fails in many ways; each is a counted rejection
        # Rust codecs (pylibjpeg-rle, -openjpeg) panic on corrupt data with pyo3's PanicException,
        # which is a BaseException; KeyboardInterrupt and SystemExit still propagate.
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        raise RejectedInput("decode_error", f"{type(e).__name__}: {e}"[:500]) from e
    return images if frames == "samples" or len(images) == 1 else [_as_volume(images)]


def quiet_decoder_logs(debug: bool) -> None:
    """Keep pydicom's decoder output out of the log, or with `debug` let all of it through.

    Quiet drops every pydicom log record made while medscale decodes pixels (a traceback per
    plugin that fails, per-file warnings such as excess padding) and any pydicom record with a
    traceback: a file that fails is one RejectedInput with its reason. Until this is called, a
    non-empty MEDSCALE_DEBUG environment variable means `debug`. The setting is per process;
    workers forked after the call inherit it.
    """
    _DECODER_LOG_FILTER.debug = bool(debug)
    _filter_pydicom_logs()  # and on any pydicom logger created since import


class _DecoderLogFilter(logging.Filter):
    """Drops the records described in `quiet_decoder_logs`: prep rejects such a file with a
    one-line reason (RejectedInput), which is all its log needs."""

    debug: bool | None = None  # None: MEDSCALE_DEBUG decides (read per record; records are rare)

    def filter(self, record: logging.LogRecord) -> bool:
        debug = self.debug if self.debug is not None else bool(os.environ.get("MEDSCALE_DEBUG"))
        return debug or not (record.exc_info or _DECODING.get())


# True while this thread is inside pydicom's decoder for `_decode_pixels`.
_DECODING: contextvars.ContextVar[bool] = contextvars.ContextVar("medscale_dicom_decoding", default=False)
_DECODER_LOG_FILTER = _DecoderLogFilter()


def _filter_pydicom_logs() -> None:
    # A logger's filters see only the records logged to it, not those its children propagate, so
    # the filter goes on "pydicom" and on each child pydicom has created by now (its decoders log
    # the tracebacks to "pydicom.pixels.decoders.base").
    loggers = [logging.getLogger("pydicom")] + [
        lg for name, lg in logging.Logger.manager.loggerDict.items()
        if name.startswith("pydicom.") and isinstance(lg, logging.Logger)]
    for lg in loggers:
        if _DECODER_LOG_FILTER not in lg.filters:
            lg.addFilter(_DECODER_LOG_FILTER)


_filter_pydicom_logs()


def _parse(p: Path) -> Dataset:
    # pydicom reports a file that ends inside an undefined-length element only as a warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(p, defer_size=_DEFER_SIZE)
        except InvalidDicomError:
            try:
                ds = pydicom.dcmread(p, force=True, defer_size=_DEFER_SIZE)
                sop_class = str(ds.get("SOPClassUID", ""))
            except Exception as e:  # noqa: BLE001 - force=True on arbitrary bytes fails in many ways
                raise RejectedInput("not_dicom", f"no DICM prefix, not a DICOM dataset ({type(e).__name__})") from e
            # force=True reads any bytes as elements; a standard SOP class tells real DICOM apart.
            if not sop_class.startswith("1.2.840.10008."):
                raise RejectedInput("not_dicom", "no DICM prefix and no DICOM dataset (no SOP Class UID)") from None
        except EOFError as e:
            raise RejectedInput("truncated", f"{type(e).__name__}: {e}"[:300]) from e
        except Exception as e:  # noqa: BLE001 - pydicom raises many types on malformed headers
            raise RejectedInput("unreadable", f"{type(e).__name__}: {e}"[:300]) from e
    eof = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if eof:
        raise RejectedInput("truncated", eof[0][:300])
    return ds


def _check_header(ds: Dataset, size: int, max_pixels: int) -> None:
    _check_complete(ds, size)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise RejectedInput("no_pixel_data", f"SOP class {ds.get('SOPClassUID', 'unknown')} has no pixel data")
    if "PixelData" not in ds:
        raise RejectedInput("unsupported", "float pixel data (e.g. parametric maps) is not supported")
    if (n := _pixel_count(ds)) > max_pixels:
        raise RejectedInput("too_large", f"{n} pixel values > max_pixels={max_pixels}")
    if not ds.file_meta.get("TransferSyntaxUID"):
        if ds.get_item("PixelData", keep_deferred=True).length == _UNDEFINED_LENGTH:
            raise RejectedInput("unreadable", "compressed pixel data without a Transfer Syntax UID")
        # Native pixel data still decodes: the encoding is known from parsing the header.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (U.ImplicitVRLittleEndian if implicit else
                                          U.ExplicitVRLittleEndian if little else U.ExplicitVRBigEndian)


def _check_complete(ds: Dataset, size: int) -> None:
    """Reject a file cut inside an element: pydicom keeps a short value, drops a cut header."""
    if ds.file_meta.get("TransferSyntaxUID") == U.DeflatedExplicitVRLittleEndian:
        return  # offsets are in the inflated stream, not the file
    last_tell, last_end = -1, None
    for tag in ds.keys():  # noqa: SIM118 - iterating ds itself would convert and read deferred values
        elem = ds.get_item(tag, keep_deferred=True)
        if not isinstance(elem, RawDataElement):
            continue
        end = None if elem.length == _UNDEFINED_LENGTH else elem.value_tell + elem.length
        if end is not None and end > size:
            raise RejectedInput("truncated", f"element {elem.tag} ends at byte {end}, the file has {size}")
        if elem.value_tell > last_tell:
            last_tell, last_end = elem.value_tell, end
    if last_end is not None and 0 < size - last_end < 8:
        raise RejectedInput("truncated", f"the file ends inside an element header at byte {size}")


def _pixel_count(ds: Dataset) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an invalid value becomes the rejection's detail instead
        dims = [int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)]
    if min(dims) <= 0:
        raise RejectedInput("empty", f"image dimensions {dims} (rows, columns, frames, samples)")
    return math.prod(dims)


def _decode(ds: Dataset, voi: str) -> list[DicomImage]:
    arr, photometric = _decode_pixels(ds)
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0)
    frames = [(i, None if arr.shape[0] == 1 else i) for i in range(arr.shape[0])]  # (index, frame)
    if photometric in ("MONOCHROME1", "MONOCHROME2") and arr.ndim == 3:
        return [_grayscale(ds, arr[i], i, f, voi, photometric == "MONOCHROME1", bits) for i, f in frames]
    if photometric == "PALETTE COLOR" and arr.ndim == 3:
        arr = _palette_to_rgb(arr, ds)
    elif not (photometric == "RGB" and arr.ndim == 4 and arr.shape[-1] == 3):
        raise RejectedInput("unsupported", f"photometric interpretation {photometric!r} with shape {arr.shape[1:]}")
    # VOI is a grayscale operation (PS3.3 C.11.2): colour keeps its decoded values.
    return [DicomImage(arr[i], f, "RGB", [], False, True, bits) for i, f in frames]


def _decode_pixels(ds: Dataset) -> tuple[np.ndarray, str]:
    """All frames as (F, H, W[, S]) and the photometric interpretation of that array."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if not ts:
        raise RejectedInput("unreadable", "no Transfer Syntax UID in the file meta")
    ts = U.UID(ts)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as e:
        raise RejectedInput("unsupported", f"pydicom has no decoder for {ts.name} ({ts})") from e
    plugin, hint = _choose_plugin(ds, ts, decoder)
    decoding = _DECODING.set(True)  # pydicom's log records too: see quiet_decoder_logs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the outcome is an array or a rejection
            # options from ds; YBR_FULL(_422) -> RGB here
            arr, props = decoder.as_array(ds, decoding_plugin=plugin)
    except RuntimeError as e:
        if any(s in str(e).lower() for s in _UNSUPPORTED_BY_PLUGIN):
            raise RejectedInput("decoder_missing", f"{ts.name} ({ts}): {e}; needs {hint}"[:500]) from e
        raise
    except ValueError as e:
        if "less than expected" in str(e):
            raise RejectedInput("truncated", f"pixel data: {e}"[:300]) from e
        raise
    finally:
        _DECODING.reset(decoding)
    if arr.ndim == (2 if int(props["samples_per_pixel"]) == 1 else 3):
        arr = arr[None]
    return arr, str(props["photometric_interpretation"]).strip().upper()


def _choose_plugin(ds: Dataset, ts: U.UID, decoder: Decoder) -> tuple[str, str]:
    """The pydicom plugin that decodes `ds` (see `_PLUGINS`; "" for native data: no plugin) and
    what to install if it fails as unsupported."""
    twelve_bit = ts == U.JPEGExtended12Bit and int(ds.get("BitsStored") or 8) != 8
    preferred = _JPEG_12BIT_PLUGINS if twelve_bit else _PLUGINS.get(ts)
    hint = _JPEG_12BIT_HINT if twelve_bit else _DECODER_HINTS.get(ts, "a pydicom decoding plugin")
    if preferred is None:  # native encodings, or a syntax pydicom added after this table
        if not decoder.is_available:
            raise RejectedInput("decoder_missing", f"{ts.name} ({ts}) needs {hint}")
        return "", hint
    installed = decoder.available_plugins
    for plugin in preferred:
        if plugin in installed:
            return plugin, hint
    what = f"12-bit {ts.name}" if twelve_bit else ts.name
    raise RejectedInput("decoder_missing", f"{what} ({ts}) needs {hint}")


def _palette_to_rgb(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """`apply_color_lut`, with 16-bit LUT data read in the dataset's byte order.

    pydicom 3.0 reads (non-segmented) Palette Color LUT Data, raw OW bytes, in the machine's byte
    order, which swaps every entry of a big-endian file's palette. Segmented LUTs it reads right.
    """
    order = "<" if _little_endian(ds) else ">"
    if "RedPaletteColorLookupTableData" not in ds or order == ("<" if sys.byteorder == "little" else ">"):
        return apply_color_lut(arr, ds)
    entries = int(ds.RedPaletteColorLookupTableDescriptor[0]) or 65536
    luts = Dataset()  # only what apply_color_lut reads, with the data in machine order
    luts.RedPaletteColorLookupTableDescriptor = ds.RedPaletteColorLookupTableDescriptor
    if "PixelPresentation" in ds:
        luts.PixelPresentation = ds.PixelPresentation
    for colour in ("Red", "Green", "Blue", "Alpha"):
        data = ds.get(f"{colour}PaletteColorLookupTableData")
        if data:
            if len(data) == 2 * entries:  # 16-bit entries; 8-bit ones (one byte each) have no order
                data = np.frombuffer(data, f"{order}u2").astype("=u2").tobytes()
            setattr(luts, f"{colour}PaletteColorLookupTableData", data)
    return apply_color_lut(arr, luts)


def _little_endian(ds: Dataset) -> bool:
    """Whether the dataset's OB/OW values (kept as raw bytes by pydicom) are little-endian."""
    little = ds.original_encoding[1]
    if little is None:  # built in memory, not read: the transfer syntax says
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        return ts != U.ExplicitVRBigEndian
    return bool(little)


def _grayscale(ds: Dataset, stored: np.ndarray, index: int, frame: int | None, voi: str,
               monochrome1: bool, bits: int) -> DicomImage:
    windows = _windows(ds, index)
    if voi != "apply" and "ModalityLUTSequence" not in ds and stored.dtype.kind in "iu":
        # The common case (integer rescale), in one pass: see _affine_exact.
        slope, intercept, lo, hi = _rescale_range(ds, index)
        if slope.is_integer() and intercept.is_integer() and max(abs(lo), abs(hi)) < 2**53:
            lo, hi = int(lo), int(hi)
            pixels = _affine_exact(stored, int(slope), int(intercept), lo, hi, monochrome1)
            if monochrome1:
                windows = [(lo + hi - c, w) for c, w in windows]
            return DicomImage(pixels, frame, "MONOCHROME2", windows, False, True, bits, monochrome1)
    values, lo, hi = _modality(ds, stored, index)
    exact = values.dtype.kind in "iu"
    if voi == "apply":
        y = _apply_voi(ds, values, windows, index)
        y = 1.0 - y if monochrome1 else y
        return DicomImage(y.astype(np.float32), frame, "MONOCHROME2", windows, True, exact, bits, monochrome1)
    if monochrome1:
        values = (lo + hi) - values  # maps [lo, hi] onto itself; exact (see _modality)
        windows = [(lo + hi - c, w) for c, w in windows]
    pixels = _to_int_dtype(values, lo, hi) if exact else values.astype(np.float32)
    return DicomImage(pixels, frame, "MONOCHROME2", windows, False, exact, bits, monochrome1)


def _modality(ds: Dataset, stored: np.ndarray, index: int) -> tuple[np.ndarray, Any, Any]:
    """Modality values (int32/int64 when exact, else float64) and their possible range [lo, hi]."""
    if "ModalityLUTSequence" in ds:
        out_bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return apply_modality_lut(stored, ds).astype(np.int64), 0, (1 << out_bits) - 1
    slope, intercept, lo, hi = _rescale_range(ds, index)
    if slope.is_integer() and intercept.is_integer() and max(abs(lo), abs(hi)) < 2**53:
        # int32 halves int64's memory traffic; it is exact while anything the decoded container can
        # hold, rescaled and then mirrored (MONOCHROME1), still fits.
        c = np.iinfo(stored.dtype)
        bound = abs(lo + hi) + max(abs(c.min * slope + intercept), abs(c.max * slope + intercept))
        wide = np.int32 if bound < 2**31 else np.int64
        values = stored.astype(wide)
        if slope != 1:
            values *= int(slope)
        if intercept != 0:
            values += int(intercept)
        return values, int(lo), int(hi)
    return stored.astype(np.float64) * slope + intercept, lo, hi


def _rescale_range(ds: Dataset, index: int) -> tuple[float, float, Any, Any]:
    """Rescale slope and intercept, and the range [lo, hi] they map BitsStored values onto."""
    slope, intercept = _rescale(ds, index)
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    s_lo, s_hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    lo, hi = sorted((s_lo * slope + intercept, s_hi * slope + intercept))
    return slope, intercept, lo, hi


def _affine_exact(stored: np.ndarray, slope: int, intercept: int, lo: int, hi: int, mirror: bool) -> np.ndarray:
    """``stored * slope + intercept`` (then ``lo + hi - v`` if `mirror`), exact, in one pass.

    Gives the same values and dtype as widening to int32/int64, computing, and narrowing with
    `_to_int_dtype`, without the wide temporaries (most of prep's pixel time on 512x512 CT):
    the output dtype is chosen from the range the stored min and max map to (the map is
    affine, so those are the output's extremes), and the arithmetic runs on the unsigned view
    of that width, modulo 2**bits. Every true result fits the width, so the wrapped result is
    the true one.
    """
    a, b = (-slope, lo + hi - intercept) if mirror else (slope, intercept)
    smin, smax = int(stored.min()), int(stored.max())
    vlo, vhi = sorted((smin * a + b, smax * a + b))
    dtype = np.dtype(_int_dtype(lo, hi, vlo, vhi))
    unsigned = np.dtype(f"u{dtype.itemsize}")
    modulus = 1 << (8 * dtype.itemsize)
    out = stored.astype(unsigned)  # a copy; a narrowing cast wraps, which the modulus absorbs
    if a % modulus != 1:
        np.multiply(out, unsigned.type(a % modulus), out=out)
    if b % modulus:
        np.add(out, unsigned.type(b % modulus), out=out)
    return out.view(dtype)


def _rescale(ds: Dataset, index: int) -> tuple[float, float]:
    src = _functional_group(ds, index, "PixelValueTransformationSequence") or ds
    slope, intercept = src.get("RescaleSlope"), src.get("RescaleIntercept")
    # A non-numeric value raises here and becomes a decode_error in decode_dicom.
    slope = 1.0 if slope in (None, "") else float(slope)
    intercept = 0.0 if intercept in (None, "") else float(intercept)
    if slope == 0 or not (math.isfinite(slope) and math.isfinite(intercept)):
        raise RejectedInput("decode_error", f"unusable rescale: slope {slope}, intercept {intercept}")
    return slope, intercept


def _functional_group(ds: Dataset, index: int, name: str) -> Dataset | None:
    """An enhanced object's functional-group macro for one frame: per-frame first, then shared."""
    for seq_name, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(seq_name)
        if groups and i < len(groups) and groups[i].get(name):
            return groups[i].get(name)[0]
    return None


def _windows(ds: Dataset, index: int) -> list[tuple[float, float]]:
    src = _functional_group(ds, index, "FrameVOILUTSequence") or ds
    centers, widths = src.get("WindowCenter"), src.get("WindowWidth")
    out = []
    for c, w in zip(centers if isinstance(centers, MultiValue) else [centers],
                    widths if isinstance(widths, MultiValue) else [widths], strict=False):
        # A malformed window is header metadata, not pixels: it is left out and the image kept.
        try:
            c, w = float(c), float(w)
        except (TypeError, ValueError):
            continue
        if math.isfinite(c) and math.isfinite(w) and w > 0:
            out.append((c, w))
    return out


def _apply_voi(ds: Dataset, values: np.ndarray, windows: list[tuple[float, float]], index: int) -> np.ndarray:
    """VOI LUT or window (PS3.3 C.11.2.1) to float64 in [0, 1]."""
    x = values.astype(np.float64)
    frame_voi = _functional_group(ds, index, "FrameVOILUTSequence")
    if frame_voi is None and "VOILUTSequence" in ds:
        # Looked up here: pydicom's apply_voi indexes in the LUT's output dtype, which wraps for
        # 8-bit LUTs with more than 256 entries.
        item = ds.VOILUTSequence[0]
        entries, first, out_bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData
        if isinstance(data, bytes):  # VR OW: 16-bit words in the dataset's byte order
            data = np.frombuffer(data, "<u2" if _little_endian(ds) else ">u2")
        lut = np.asarray(data, dtype=np.float64)[: entries or 65536]
        idx = np.clip(np.rint(x) - first, 0, len(lut) - 1).astype(np.int64)
        return np.clip(lut[idx] / ((1 << out_bits) - 1), 0.0, 1.0)
    if not windows:
        lo, hi = float(x.min()), float(x.max())
        return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    c, w = windows[0]
    function = str((frame_voi or ds).get("VOILUTFunction", "LINEAR")).strip().upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if w <= 1:  # LINEAR with width 1 is a step at c - 0.5
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


def _to_int_dtype(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The narrowest integer dtype: 8/16-bit by the possible range [lo, hi] (one dtype per series),
    else 16-bit by this image's values (16-bit signed CT with intercept -1024 has a possible range
    beyond int16, its values rarely are), else 32-bit."""
    return values.astype(_int_dtype(lo, hi, int(values.min()), int(values.max())))


def _int_dtype(lo: int, hi: int, vlo: int, vhi: int) -> type:
    """`_to_int_dtype`'s choice for possible range [lo, hi] and actual values [vlo, vhi]."""
    for a, b, dtypes in ((min(lo, vlo), max(hi, vhi), _INT_DTYPES[:3]), (vlo, vhi, _INT_DTYPES[1:])):
        for dt in dtypes:
            if np.iinfo(dt).min <= a and b <= np.iinfo(dt).max:
                return dt
    raise RejectedInput("unsupported", f"modality values {vlo}..{vhi} do not fit 32 bits")


def _as_volume(images: list[DicomImage]) -> DicomImage:
    first, arrays = images[0], [im.pixels for im in images]
    if any(a.dtype.kind == "f" for a in arrays):
        dtype = np.dtype(np.float32)
    else:  # frames with their own rescale may have chosen different integer types: one for all
        lo, hi = min(int(a.min()) for a in arrays), max(int(a.max()) for a in arrays)
        width = max(a.dtype.itemsize for a in arrays)
        dtype = next(np.dtype(dt) for dt in _INT_DTYPES + (np.int64,)
                     if np.dtype(dt).itemsize >= width and np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max)
    return DicomImage(np.stack([a.astype(dtype, copy=False) for a in arrays]), None, first.photometric,
                      first.windows, first.voi_applied, all(im.lossless for im in images), first.bits_stored,
                      first.inverted)
