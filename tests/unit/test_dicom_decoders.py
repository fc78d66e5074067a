"""Which codec decodes which transfer syntax, checked against uncompressed twins, and what the
decoders may write to the log.

The twins are pydicom's own test files, inside its wheel (never those in its urls.json, which
download). A missing file fails its test instead of skipping it: the wheel ships them all.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    UID,
)

from medscale.prep import dicom
from medscale.prep.dicom import DicomImage, RejectedInput, decode_dicom, quiet_decoder_logs, read_dicom

# Where the "pylibjpeg" plugin means pylibjpeg-libjpeg (GPLv3).
LIBJPEG_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
                    JPEGLSNearLossless)


def shipped(name: str) -> Path:
    path = pydicom.data.get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not in pydicom {pydicom.__version__}'s wheel"
    return Path(path)


def decode(name: str, relabel: str | None = None) -> tuple[DicomImage, UID]:
    """The whole file as one image through medscale's path, and the file's own transfer syntax.
    `relabel` replaces the transfer syntax first: for a codestream also valid under another UID."""
    ds = read_dicom(shipped(name))
    own = UID(ds.file_meta.TransferSyntaxUID)
    if relabel:
        ds.file_meta.TransferSyntaxUID = relabel
    (img,) = decode_dicom(ds, frames="volume")
    return img, own


def without_plugins(monkeypatch: pytest.MonkeyPatch, uid: str, *names: str) -> None:
    """pydicom's decoder for `uid` as if the plugins `names` were not installed."""
    decoder = get_decoder(uid)
    monkeypatch.setattr(decoder, "_available", {k: v for k, v in decoder._available.items() if k not in names})


@pytest.fixture
def permissive_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """pylibjpeg-libjpeg (GPL) out of reach, whether or not it is installed here."""
    for uid in LIBJPEG_SYNTAXES:
        without_plugins(monkeypatch, uid, "pylibjpeg")


@pytest.fixture
def plugins_used(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The `decoding_plugin` of each pydicom decode medscale asks for, in order."""
    used: list[str] = []
    as_array = Decoder.as_array

    def spy(self: Decoder, src: object, **kwargs: object) -> object:
        used.append(str(kwargs.get("decoding_plugin", "")))
        return as_array(self, src, **kwargs)

    monkeypatch.setattr(Decoder, "as_array", spy)
    return used


def twin(name: str, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """The reference pixels: an uncompressed file through medscale, or an RLE one decoded by
    pydicom's own numpy RLE decoder (independent of the pylibjpeg-rle that medscale prefers)."""
    with monkeypatch.context() as m:
        m.setitem(dicom._PLUGINS, RLELossless, ("pydicom",))
        img, ts = decode(name)
    assert not ts.is_compressed or ts == RLELossless, (name, ts.name)
    return img.pixels


# 1. Lossless: bit for bit the same values as the twin, decoded by the permissive plugin of its row.

LOSSLESS = [
    # compressed file, its transfer syntax, the UID it is relabelled to, the plugin medscale uses, the twin
    ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless, None, "pyjpegls", "MR_small.dcm"),
    ("MR_small_jp2klossless.dcm", JPEG2000Lossless, None, "pylibjpeg", "MR_small.dcm"),
    ("MR_small_RLE.dcm", RLELossless, None, "pylibjpeg", "MR_small.dcm"),
    ("rtdose_rle.dcm", RLELossless, None, "pylibjpeg", "rtdose.dcm"),  # 32-bit, 15 frames
    ("SC_rgb_jpeg_gdcm.dcm", JPEGLosslessSV1, None, "gdcm", "SC_rgb_rle.dcm"),  # RGB, 8-bit
    ("SC_rgb_gdcm_KY.dcm", JPEG2000, None, "pylibjpeg", "SC_rgb_rle.dcm"),  # a reversible stream, lossy UID
    # Codestreams valid under a second UID too, relabelled (the wheel has no such file):
    # SV1 is Process 14 with selection value 1, so an SV1 stream is a Process 14 stream;
    ("SC_rgb_jpeg_gdcm.dcm", JPEGLosslessSV1, JPEGLossless, "gdcm", "SC_rgb_rle.dcm"),
    # JPEG-LS with NEAR = 0 is lossless under the near-lossless UID as well.
    ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless, JPEGLSNearLossless, "pyjpegls", "MR_small.dcm"),
]


@pytest.mark.parametrize("name, uid, relabel, plugin, twin_name", LOSSLESS)
def test_lossless_matches_uncompressed_twin(name: str, uid: str, relabel: str | None, plugin: str, twin_name: str,
                                            permissive_only: None, plugins_used: list[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    img, own = decode(name, relabel)
    assert own == uid and plugins_used == [plugin]
    ref = twin(twin_name, monkeypatch)
    assert img.pixels.dtype == ref.dtype and img.pixels.shape == ref.shape
    assert np.array_equal(img.pixels, ref)
    assert img.lossless


# 2. Lossy: within the error the codec allows.

def jpeg_ls_near(name: str) -> int:
    """NEAR, the largest error a JPEG-LS near-lossless stream allows, from its first scan header."""
    frame = next(generate_frames(pydicom.dcmread(shipped(name)).PixelData, number_of_frames=1))
    sos = frame.index(b"\xff\xda")
    components = frame[sos + 4]
    return frame[sos + 5 + 2 * components]  # after Ls (2 bytes), Ns, and (Ci, Tmi) per component


LOSSY = [
    # compressed file, its transfer syntax, relabelled to, plugin, twin, largest error allowed.
    # Twins another toolkit decoded from the same stream (dcmtk's dcmdjpeg, gdcmconv): conforming
    # JPEG decoders may differ by one in a sample (rounding of the inverse DCT).
    ("SC_rgb_jpeg.dcm", JPEGBaseline8Bit, None, "pillow", "SC_rgb_jpeg_dcmd.dcm", 1),
    ("SC_rgb_dcmtk_+eb+cy+n2.dcm", JPEGBaseline8Bit, None, "pillow", "SC_ybr_full_422_uncompressed.dcm", 1),
    # A baseline stream is an 8-bit JPEG Extended (Process 2) stream.
    ("SC_rgb_jpeg.dcm", JPEGBaseline8Bit, JPEGExtended12Bit, "pillow", "SC_rgb_jpeg_dcmd.dcm", 1),
    # Near-lossless JPEG-LS against the original image: within NEAR, read from the stream.
    ("SC_rgb_jls_lossy_line.dcm", JPEGLSNearLossless, None, "pyjpegls", "SC_rgb_rle.dcm", "near"),
    ("SC_rgb_jls_lossy_sample.dcm", JPEGLSNearLossless, None, "pyjpegls", "SC_rgb_rle.dcm", "near"),
]


@pytest.mark.parametrize("name, uid, relabel, plugin, twin_name, bound", LOSSY)
def test_lossy_within_bound_of_twin(name: str, uid: str, relabel: str | None, plugin: str, twin_name: str,
                                    bound: int | str, permissive_only: None, plugins_used: list[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    img, own = decode(name, relabel)
    assert own == uid and plugins_used == [plugin]
    if bound == "near":
        bound = jpeg_ls_near(name)
        assert bound == 2  # what the files were encoded with; a bigger NEAR would weaken the test
    ref = twin(twin_name, monkeypatch)
    assert img.pixels.dtype == ref.dtype and img.pixels.shape == ref.shape
    error = np.abs(img.pixels.astype(np.int64) - ref.astype(np.int64))
    assert error.max() <= bound and error.mean() < 1


# 3. The choice of plugin.

def test_permissive_plugins_chosen_when_libjpeg_is_installed(monkeypatch: pytest.MonkeyPatch,
                                                             plugins_used: list[str]) -> None:
    def libjpeg(src: bytes, runner: object) -> bytes:
        raise AssertionError("the GPL codec was used where a permissive one is installed")

    for uid in LIBJPEG_SYNTAXES:  # stands in for pylibjpeg-libjpeg, installed or not
        monkeypatch.setitem(get_decoder(uid)._available, "pylibjpeg", libjpeg)
    for name in ("SC_rgb_jpeg.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "JPEGLSNearLossless_16.dcm"):
        decode(name)
    assert plugins_used == ["pillow", "gdcm", "pyjpegls", "pyjpegls"]


@pytest.mark.parametrize("name, missing, plugin", [
    ("SC_rgb_jpeg.dcm", ("pillow",), "gdcm"),
    ("MR_small_jpeg_ls_lossless.dcm", ("pyjpegls",), "gdcm"),
    ("MR_small_jp2klossless.dcm", ("pylibjpeg",), "gdcm"),
    ("MR_small_RLE.dcm", ("pylibjpeg",), "pydicom"),
])
def test_next_plugin_of_the_row_when_the_first_is_missing(name: str, missing: tuple[str, ...], plugin: str,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         plugins_used: list[str]) -> None:
    ref, _ = decode(name)
    plugins_used.clear()
    without_plugins(monkeypatch, read_dicom(shipped(name)).file_meta.TransferSyntaxUID, *missing)
    img, _ = decode(name)
    assert plugins_used == [plugin] and np.array_equal(img.pixels, ref.pixels)


def test_12bit_jpeg_extended_goes_to_libjpeg_only(monkeypatch: pytest.MonkeyPatch, plugins_used: list[str]) -> None:
    ds = read_dicom(shipped("JPGExtended.dcm"))
    assert int(ds.BitsStored) == 12 and int(ds.BitsAllocated) == 16

    def libjpeg(src: bytes, runner: object) -> bytearray:  # stands in for pylibjpeg-libjpeg
        return bytearray(int(ds.Rows) * int(ds.Columns) * 2)

    monkeypatch.setitem(get_decoder(JPEGExtended12Bit)._available, "pylibjpeg", libjpeg)
    (img,) = decode_dicom(ds)
    assert plugins_used == ["pylibjpeg"] and img.pixels.shape == (ds.Rows, ds.Columns)


# 4. Decoder output in the log: none while quiet, all of it when debugging.

@pytest.fixture
def log_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The state before any quiet_decoder_logs call, without MEDSCALE_DEBUG (another test's
    `medscale prep --debug` may have set either in this process)."""
    monkeypatch.setattr(dicom._DECODER_LOG_FILTER, "debug", None)
    monkeypatch.delenv("MEDSCALE_DEBUG", raising=False)


def reject(name: str) -> RejectedInput:
    with pytest.raises(RejectedInput) as info:
        decode(name)
    return info.value


def test_rejected_12bit_jpeg_leaves_no_traceback(log_default: None, caplog: pytest.LogCaptureFixture,
                                                 capfd: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    without_plugins(monkeypatch, JPEGExtended12Bit, "pylibjpeg")  # libjpeg not installed
    caplog.set_level(logging.DEBUG)
    r = reject("JPGExtended.dcm")
    assert r.reason == "decoder_missing"
    assert "pylibjpeg-libjpeg" in r.detail and "medscale[dicom-gpl]" in r.detail and "\n" not in r.detail
    assert caplog.records == [] and "Traceback" not in capfd.readouterr().err


def test_quiet_decoder_logs(log_default: None, caplog: pytest.LogCaptureFixture,
                            capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    # Every plugin fails on this stream (pydicom logs a traceback per plugin); and this file decodes
    # with a pydicom warning about excess padding.
    broken, padded = "JPEG2000-embedded-sequence-delimiter.dcm", "MR_small_padded.dcm"
    assert reject(broken).reason == "decode_error"
    decode(padded)
    assert caplog.records == [] and "Traceback" not in capfd.readouterr().err

    quiet_decoder_logs(True)
    reject(broken)
    decode(padded)
    assert any(r.exc_info and r.name.startswith("pydicom") for r in caplog.records)
    assert any("padding" in r.getMessage() for r in caplog.records)
    assert "Traceback" in caplog.text

    caplog.clear()
    monkeypatch.setenv("MEDSCALE_DEBUG", "1")
    quiet_decoder_logs(False)  # the explicit call wins over the environment
    reject(broken)
    assert caplog.records == []


def test_medscale_debug_env_lets_tracebacks_through(log_default: None, caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSCALE_DEBUG", "1")
    caplog.set_level(logging.DEBUG)
    reject("JPEG2000-embedded-sequence-delimiter.dcm")
    assert "Traceback" in caplog.text
