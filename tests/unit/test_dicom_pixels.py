"""DICOM pixel decoding: pydicom's shipped test files plus small synthetic datasets.

Only files inside pydicom's wheel are used (never those in its urls.json, which download).
"""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, convert_color_space, get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
)

from medscale.prep import errors
from medscale.synthetic import write_dicom
from medscale.prep.dicom import DICOM_REJECT_REASONS, RejectedInput, decode_dicom, read_dicom

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def sample_file(name: str) -> Path:
    return Path(pydicom.data.get_testdata_file(name, download=False))


def decode_file(path: Path, **kw: object) -> list:
    return decode_dicom(read_dicom(path), **kw)


def reason_of(path: Path, **kw: object) -> str:
    with pytest.raises(RejectedInput) as info:
        decode_file(path, **kw)
    return info.value.reason


def write_image(path: Path, stored: np.ndarray, *, bits_stored: int = 16, signed: bool = False,
                photometric: str = "MONOCHROME2", raw: bytes | None = None, **attrs: object) -> Path:
    """A 16-bit grayscale DICOM file holding `stored` (F, H, W) or (H, W); attrs override."""
    return write_dicom(path, stored.astype(np.int16 if signed else np.uint16), sop_class=attrs.pop("SOPClassUID", CTImageStorage),
                       bits_stored=bits_stored, signed=signed, photometric=photometric, pixel_data=raw, **attrs)


# 1. Every file pydicom ships either decodes or is rejected with a known reason.

def test_sweep_every_pydicom_test_file() -> None:
    files = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())
    tally: collections.Counter[str] = collections.Counter()
    for path in files:
        try:
            ds = read_dicom(path)
            images = decode_dicom(ds)
            volume = decode_dicom(ds, voi="apply", frames="volume")
        except RejectedInput as r:
            assert r.reason in DICOM_REJECT_REASONS, (path, r)
            tally[r.reason] += 1
            continue
        assert images and len(volume) == 1, path
        for im in images + volume:
            assert isinstance(im.pixels, np.ndarray) and im.pixels.size > 0, path
            assert im.photometric in ("MONOCHROME2", "RGB"), path
        if volume[0].voi_applied:
            assert volume[0].pixels.dtype == np.float32 and 0 <= volume[0].pixels.min() <= volume[0].pixels.max() <= 1
        tally["decoded"] += 1
    print("pydicom test_files:", dict(tally.most_common()))
    assert sum(tally.values()) == len(files) > 150
    assert tally["decoded"] >= 70 and tally["not_dicom"] >= 5 and tally["no_pixel_data"] >= 50


def test_rejected_input_is_the_pipelines_class() -> None:
    assert RejectedInput is errors.RejectedInput
    r = RejectedInput("truncated", "cut")
    assert (r.reason, r.detail) == ("truncated", "cut")


# 2. Modality LUT values are exact integers.

@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm",
                                  "dicomdirtests/77654033/CT2/17106", "dicomdirtests/98892001/CT5N/2062"])
def test_modality_lut_exact(name: str) -> None:
    path = TEST_FILES / name
    ref = pydicom.dcmread(path)
    slope, intercept = float(ref.get("RescaleSlope", 1)), float(ref.get("RescaleIntercept", 0))
    expected = ref.pixel_array.astype(np.int64) * int(slope) + int(intercept)
    (img,) = decode_file(path)
    assert img.pixels.dtype.kind in "iu" and img.pixels.dtype.itemsize <= 2 and img.lossless
    assert np.array_equal(img.pixels.astype(np.int64), expected)
    assert (img.frame, img.photometric, img.voi_applied) == (None, "MONOCHROME2", False)


def test_ct_small_is_int16_hounsfield() -> None:
    (img,) = decode_file(sample_file("CT_small.dcm"))
    assert img.pixels.dtype == np.int16 and img.bits_stored == 16
    assert img.pixels.min() < -100 < 0 < img.pixels.max()  # air and soft tissue in HU


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm",
                                  "MR_small_implicit.dcm", "MR_small_expb.dcm", "MR_small_padded.dcm"])
def test_lossless_encodings_match_uncompressed(name: str) -> None:
    (ref,) = decode_file(sample_file("MR_small.dcm"))
    (img,) = decode_file(sample_file(name))
    assert img.pixels.dtype == ref.pixels.dtype and np.array_equal(img.pixels, ref.pixels)
    assert img.windows == ref.windows == [(600.0, 1600.0)]


# 3. MONOCHROME1 inversion.

def test_monochrome1_inverted_exactly(tmp_path: Path) -> None:
    stored = np.array([[0, 1, 100], [2000, 4094, 4095]], dtype=np.uint16)
    path = write_image(tmp_path / "m1.dcm", stored, bits_stored=12, photometric="MONOCHROME1",
                       RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=500, WindowWidth=1000)
    (img,) = decode_file(path)
    lo, hi = 0 - 1000, 4095 - 1000  # possible modality range from BitsStored 12 and the intercept
    modality = stored.astype(np.int64) - 1000
    assert img.photometric == "MONOCHROME2" and img.inverted and img.lossless
    assert img.pixels.dtype == np.int16
    assert np.array_equal(img.pixels, lo + hi - modality)
    assert np.array_equal(lo + hi - img.pixels.astype(np.int64), modality)  # exactly recoverable
    # Brightness order flips: the largest stored value is now the darkest.
    assert np.array_equal(np.argsort(img.pixels, axis=None), np.argsort(-modality, axis=None, kind="stable"))
    assert img.windows == [(lo + hi - 500.0, 1000.0)]

    (shown,) = decode_file(path, voi="apply")
    x = modality.astype(np.float64)
    linear = np.clip((x - 499.5) / 999 + 0.5, 0, 1)
    assert shown.voi_applied and shown.pixels.dtype == np.float32
    assert np.allclose(shown.pixels, 1 - linear, atol=1e-6)
    assert shown.pixels[0, 0] == 1.0 and shown.pixels[1, 2] == 0.0


def test_real_monochrome1_cr_with_fractional_slope() -> None:
    path = TEST_FILES / "dicomdirtests/77654033/CR1/6154"
    ref = pydicom.dcmread(path)
    (img,) = decode_file(path)
    slope, intercept = float(ref.RescaleSlope), float(ref.RescaleIntercept)
    lo, hi = intercept, 4095 * slope + intercept
    expected = lo + hi - (ref.pixel_array.astype(np.float64) * slope + intercept)
    assert img.inverted and not img.lossless and img.pixels.dtype == np.float32
    assert np.allclose(img.pixels, expected, rtol=0, atol=1e-3)


# 4. Enhanced multi-frame: per-frame Pixel Value Transformation and Frame VOI LUT.

def enhanced_ct(tmp_path: Path, intercepts: list[float], *, shared_slope: float | None = None) -> Path:
    """Enhanced CT, one frame per intercept. With `shared_slope` the Pixel Value Transformation
    (that slope, the first intercept) sits in the shared functional groups instead of per frame."""
    frames = np.stack([np.full((4, 5), 1000 + i, dtype=np.uint16) for i in range(len(intercepts))])
    frames[:, 0, 0] = 0

    def pvt(slope: float, intercept: float) -> Sequence:
        item = Dataset()
        item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, intercept, "HU"
        return Sequence([item])

    per_frame = []
    for i, intercept in enumerate(intercepts):
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = 40 + 10 * i, 400
        item = Dataset()
        if shared_slope is None:
            item.PixelValueTransformationSequence = pvt(1, intercept)
        item.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(item)
    shared = Dataset()
    if shared_slope is not None:
        shared.PixelValueTransformationSequence = pvt(shared_slope, intercepts[0])
    return write_image(tmp_path / "enhanced.dcm", frames, bits_stored=12, SOPClassUID=EnhancedCTImageStorage,
                       PerFrameFunctionalGroupsSequence=Sequence(per_frame),
                       SharedFunctionalGroupsSequence=Sequence([shared]))


def test_enhanced_per_frame_intercepts(tmp_path: Path) -> None:
    intercepts = [-1024, 0, 500]
    images = decode_file(enhanced_ct(tmp_path, intercepts))
    assert [im.frame for im in images] == [0, 1, 2]
    for i, (im, intercept) in enumerate(zip(images, intercepts, strict=True)):
        assert im.pixels[0, 0] == intercept and im.pixels[1, 1] == 1000 + i + intercept
        assert im.windows == [(40.0 + 10 * i, 400.0)]
        # Each frame's dtype follows its own possible range: int16 with -1024, else uint16.
        assert im.lossless and im.pixels.dtype == (np.int16 if intercept < 0 else np.uint16)

    shown = decode_file(enhanced_ct(tmp_path, intercepts), voi="apply")
    for i, (im, intercept) in enumerate(zip(shown, intercepts, strict=True)):
        x, c = 1000 + i + intercept, 40 + 10 * i  # each frame windowed with its own window
        assert im.pixels[1, 1] == pytest.approx(np.clip((x - (c - 0.5)) / 399 + 0.5, 0, 1), abs=1e-6)


def test_enhanced_shared_fractional_slope_is_float(tmp_path: Path) -> None:
    images = decode_file(enhanced_ct(tmp_path, [-1000, -1000], shared_slope=0.5))
    assert all(im.pixels.dtype == np.float32 and not im.lossless for im in images)
    assert images[0].pixels[1, 1] == 1000 * 0.5 - 1000 and images[1].pixels[1, 1] == 1001 * 0.5 - 1000


# 5. Colour: YBR converted once, palettes applied.

def test_ybr_full_422_uncompressed_converted_once() -> None:
    path = sample_file("SC_ybr_full_422_uncompressed.dcm")
    ds = read_dicom(path)
    raw = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, raw=True)[0]  # still YBR
    (img,) = decode_dicom(ds)
    assert img.photometric == "RGB" and img.pixels.shape == (100, 100, 3) and img.pixels.dtype == np.uint8
    assert np.array_equal(img.pixels, convert_color_space(raw, "YBR_FULL", "RGB"))
    assert img.pixels[5, 50].tolist() == pytest.approx([255, 0, 0], abs=3)  # the top band is red


@pytest.mark.parametrize("name", ["SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_ybr_jpeg_matches_rgb_jpeg(name: str) -> None:
    (rgb,) = decode_file(sample_file("SC_rgb_dcmtk_+eb+cr.dcm"))  # same picture, JPEG in RGB space
    (img,) = decode_file(sample_file(name))
    assert img.photometric == "RGB" and img.pixels.dtype == np.uint8 and img.pixels.shape == (100, 100, 3)
    # Lossy JPEG differs a little; a second YBR->RGB conversion would shift colours by tens.
    assert np.abs(img.pixels.astype(int) - rgb.pixels.astype(int)).mean() < 3


def test_palette_color_to_rgb() -> None:
    path = sample_file("examples_palette.dcm")
    ref = pydicom.dcmread(path)
    (img,) = decode_file(path)
    assert img.photometric == "RGB" and img.pixels.shape == (350, 800, 3) and img.pixels.dtype == np.uint16
    assert np.array_equal(img.pixels, apply_color_lut(ref.pixel_array, ref))
    (same,) = decode_file(path, voi="apply")
    assert not same.voi_applied and np.array_equal(same.pixels, img.pixels)  # VOI is grayscale only


def big_endian_twin(src: Path, dst: Path) -> Path:
    """`src` (Explicit VR Little Endian, 8-bit pixels) rewritten as Explicit VR Big Endian, as
    dcmconv would: pydicom writes OB/OW values as they are, so the 16-bit LUT words are swapped
    here; 8-bit pixels go as OB, which has no byte order."""
    ds = pydicom.dcmread(src)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and ds.BitsAllocated == 8
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    for colour in ("Red", "Green", "Blue"):
        keyword = f"{colour}PaletteColorLookupTableData"
        setattr(ds, keyword, np.frombuffer(ds[keyword].value, "<u2").astype(">u2").tobytes())
    ds["PixelData"].VR = "OB"
    pydicom.dcmwrite(dst, ds, enforce_file_format=True)
    return dst


def test_big_endian_palette_matches_little_endian(tmp_path: Path) -> None:
    # pydicom ships examples_palette.dcm only in little endian (OBXXXX1A_expb.dcm downloads).
    little = sample_file("examples_palette.dcm")
    big = big_endian_twin(little, tmp_path / "palette_expb.dcm")
    assert pydicom.dcmread(big).original_encoding == (False, False)
    (want,), (got,) = decode_file(little), decode_file(big)
    assert got.photometric == "RGB" and got.pixels.dtype == want.pixels.dtype == np.uint16
    assert np.array_equal(got.pixels, want.pixels)
    assert len(np.unique(want.pixels.reshape(-1, 3), axis=0)) > 10  # a real palette, not a constant


def test_big_endian_palette_twin_reads_the_same_in_gdcm(tmp_path: Path) -> None:
    # The twin is built here, so check it with another toolkit: GDCM applies both files' palettes
    # alike (to 8 bits, the high byte of each 16-bit entry).
    gdcm = pytest.importorskip("gdcm")
    little = sample_file("examples_palette.dcm")
    big = big_endian_twin(little, tmp_path / "palette_expb.dcm")

    def gdcm_rgb(path: Path) -> np.ndarray:
        reader = gdcm.ImageReader()
        reader.SetFileName(str(path))
        assert reader.Read(), path
        lut = gdcm.ImageApplyLookupTable()
        lut.SetInput(reader.GetImage())
        assert lut.Apply(), path
        return np.frombuffer(lut.GetOutput().GetBuffer().encode("utf-8", "surrogateescape"), np.uint8)

    (ours,) = decode_file(little)
    assert np.array_equal(gdcm_rgb(big), gdcm_rgb(little))
    assert np.array_equal(gdcm_rgb(big), (ours.pixels >> 8).astype(np.uint8).reshape(-1))


# 6. Multi-frame as samples or as one volume.

@pytest.mark.parametrize("name, shape", [("examples_ybr_color.dcm", (30, 240, 320, 3)),
                                         ("rtdose.dcm", (15, 10, 10)),
                                         ("SC_rgb_rle_16bit_2frame.dcm", (2, 100, 100, 3))])
def test_frames_volume_vs_samples(name: str, shape: tuple[int, ...]) -> None:
    ds = read_dicom(sample_file(name))
    samples = decode_dicom(ds, frames="samples")
    (volume,) = decode_dicom(ds, frames="volume")
    assert [im.frame for im in samples] == list(range(shape[0])) and volume.frame is None
    assert volume.pixels.shape == shape and all(im.pixels.shape == shape[1:] for im in samples)
    assert np.array_equal(volume.pixels, np.stack([im.pixels for im in samples]))


def test_volume_of_enhanced_frames(tmp_path: Path) -> None:
    (volume,) = decode_file(enhanced_ct(tmp_path, [-1024, 0]), frames="volume")
    # Frames decoded as int16 and uint16 share the narrowest type that holds both.
    assert volume.pixels.shape == (2, 4, 5) and volume.pixels.dtype == np.int16
    assert volume.pixels[:, 0, 0].tolist() == [-1024, 0]


# 7. Rejections: too large (from the header), not DICOM, empty, truncated, decoder missing.

def test_too_large_decided_from_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The header claims 60000 x 60000 pixels; the pixel data is tiny and never looked at.
    path = write_image(tmp_path / "huge.dcm", np.zeros((2, 2), np.uint16), raw=b"\0" * 8, Rows=60000, Columns=60000)
    with pytest.raises(RejectedInput) as info:
        read_dicom(path)
    assert info.value.reason == "too_large"

    def no_decoding(*args: object) -> None:
        raise AssertionError("pixels decoded before the size check")

    monkeypatch.setattr("medscale.prep.dicom.get_decoder", no_decoding)
    ds = read_dicom(sample_file("CT_small.dcm"))
    with pytest.raises(RejectedInput) as info:
        decode_dicom(ds, max_pixels=128 * 128 - 1)
    assert info.value.reason == "too_large"
    with pytest.raises(RejectedInput) as info:
        read_dicom(sample_file("CT_small.dcm"), max_pixels=100)
    assert info.value.reason == "too_large"


def test_large_pixel_data_is_deferred(tmp_path: Path) -> None:
    # 2048 x 2048 x 16 bit = 8 MiB: above the defer size, so it stays on disk until decoded
    stored = (np.arange(2048 * 2048) % 4096).astype(np.uint16).reshape(2048, 2048)
    ds = read_dicom(write_image(tmp_path / "big.dcm", stored))
    assert ds.get_item("PixelData", keep_deferred=True).value is None  # not read yet
    (img,) = decode_dicom(ds)
    assert np.array_equal(img.pixels, stored)


def test_not_dicom_and_empty(tmp_path: Path) -> None:
    junk = tmp_path / "random.dcm"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    assert reason_of(junk) == "not_dicom"
    assert reason_of(empty) == "empty"
    assert reason_of(tmp_path / "missing.dcm") == "unreadable"


@pytest.mark.parametrize("name, fraction", [("CT_small.dcm", 0.5), ("CT_small.dcm", 0.05), ("MR_small.dcm", 0.99),
                                            ("JPEG2000.dcm", 0.98), ("examples_palette.dcm", 0.5)])
def test_truncated(tmp_path: Path, name: str, fraction: float) -> None:
    data = sample_file(name).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * fraction)])
    assert reason_of(cut) == "truncated"


def test_truncated_pixel_data_found_at_decode(tmp_path: Path) -> None:
    # The header is complete; only decoding finds too few bytes for the claimed image.
    path = write_image(tmp_path / "short.dcm", np.zeros((2, 2), np.uint16), raw=b"\0" * 8, Rows=4, Columns=4)
    assert reason_of(path) == "truncated"


def without_plugins(monkeypatch: pytest.MonkeyPatch, uid: str, *names: str) -> None:
    """pydicom's decoder for `uid` as if the plugins `names` were not installed."""
    decoder = get_decoder(uid)
    monkeypatch.setattr(decoder, "_available", {k: v for k, v in decoder._available.items() if k not in names})


@pytest.mark.parametrize("name, uid, missing, package, extra", [
    # Every permissive plugin of the syntax's row missing: the detail names what to install.
    ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless, ("pyjpegls", "gdcm", "pylibjpeg"), "pyjpegls", "dicom"),
    ("SC_rgb_jpeg_gdcm.dcm", JPEGLosslessSV1, ("gdcm", "pylibjpeg"), "python-gdcm", "dicom"),
    ("MR_small_jp2klossless.dcm", JPEG2000Lossless, ("pylibjpeg", "gdcm", "pillow"), "pylibjpeg-openjpeg", "dicom"),
    # 12-bit JPEG Extended: only libjpeg can, so gdcm and Pillow being installed does not help.
    ("JPGExtended.dcm", JPEGExtended12Bit, ("pylibjpeg",), "pylibjpeg-libjpeg", "dicom-gpl"),
    ("JPEG-lossy.dcm", JPEGExtended12Bit, ("pylibjpeg",), "pylibjpeg-libjpeg", "dicom-gpl"),
])
def test_decoder_missing_names_the_package(name: str, uid: str, missing: tuple[str, ...], package: str, extra: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    without_plugins(monkeypatch, uid, *missing)
    with pytest.raises(RejectedInput) as info:
        decode_file(sample_file(name))
    assert info.value.reason == "decoder_missing"
    assert package in info.value.detail and str(uid) in info.value.detail
    assert f"medscale[{extra}]" in info.value.detail


def test_malformed_data_is_decode_error(tmp_path: Path) -> None:
    # PALETTE COLOR without its lookup tables: pydicom raises, prep records a decode_error.
    path = write_image(tmp_path / "pal.dcm", np.zeros((2, 2), np.uint16), bits_stored=8,
                       photometric="PALETTE COLOR")
    with pytest.raises(RejectedInput) as info:
        decode_file(path)
    assert info.value.reason == "decode_error" and info.value.detail


def test_bad_arguments_are_value_errors() -> None:
    ds = read_dicom(sample_file("CT_small.dcm"))
    with pytest.raises(ValueError, match="voi"):
        decode_dicom(ds, voi="window")
    with pytest.raises(ValueError, match="frames"):
        decode_dicom(ds, frames="stack")


# 8. Synthetic CT round trip, BitsStored, dtype choice.

def test_synthetic_ct_round_trip(tmp_path: Path) -> None:
    stored = np.array([[-2048, -1, 0], [1, 1024, 2047]], dtype=np.int16)  # the full 12-bit signed range
    path = write_image(tmp_path / "ct.dcm", stored, bits_stored=12, signed=True,
                       RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=[40, -600], WindowWidth=[400, 1500])
    (img,) = decode_file(path)
    assert img.pixels.dtype == np.int16 and img.lossless and img.bits_stored == 12
    assert np.array_equal(img.pixels, stored.astype(np.int64) - 1024)
    assert img.windows == [(40.0, 400.0), (-600.0, 1500.0)]


def test_bits_stored_masks_unused_high_bits(tmp_path: Path) -> None:
    # 12-bit signed values in 16-bit words whose 4 unused high bits hold garbage.
    values = np.array([[-2048, -1, 0], [1, 1000, 2047]], dtype=np.int16)
    words = (values.astype(np.uint16) & 0x0FFF) | np.array([[0x5000, 0x0000, 0xA000], [0xF000, 0x3000, 0x9000]],
                                                            dtype=np.uint16)
    path = write_image(tmp_path / "bits.dcm", values, bits_stored=12, signed=True, raw=words.astype("<u2").tobytes(),
                       RescaleSlope=1, RescaleIntercept=-1024)
    (img,) = decode_file(path)
    assert np.array_equal(img.pixels, values.astype(np.int64) - 1024)


def test_int32_only_when_values_need_it(tmp_path: Path) -> None:
    small = write_image(tmp_path / "a.dcm", np.array([[0, 3000]], np.uint16), RescaleIntercept=-1024, RescaleSlope=1)
    big = write_image(tmp_path / "b.dcm", np.array([[0, 60000]], np.uint16), RescaleIntercept=-1024, RescaleSlope=1)
    (a,), (b,) = decode_file(small), decode_file(big)
    assert a.pixels.dtype == np.int16 and a.pixels.tolist() == [[-1024, 1976]]
    assert b.pixels.dtype == np.int32 and b.pixels.tolist() == [[-1024, 58976]]


def test_fractional_slope_gives_float32(tmp_path: Path) -> None:
    path = write_image(tmp_path / "pet.dcm", np.array([[0, 3, 4095]], np.uint16), bits_stored=12,
                       RescaleSlope=0.25, RescaleIntercept=10)
    (img,) = decode_file(path)
    assert img.pixels.dtype == np.float32 and not img.lossless
    assert img.pixels.tolist() == [[10.0, 10.75, 1033.75]]


def test_modality_lut_sequence(tmp_path: Path) -> None:
    lut = Dataset()
    lut.LUTDescriptor = [16, 0, 16]
    lut.ModalityLUTType = "US"
    lut.add_new("LUTData", "US", [100 * i for i in range(16)])
    path = write_image(tmp_path / "lut.dcm", np.array([[0, 5, 15]], np.uint16), bits_stored=4,
                       ModalityLUTSequence=Sequence([lut]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (img,) = decode_file(path)
    assert img.pixels.dtype == np.uint16 and img.pixels.tolist() == [[0, 500, 1500]]


def test_voi_lut_sequence_applied(tmp_path: Path) -> None:
    lut = Dataset()
    lut.LUTDescriptor = [300, 0, 8]  # an 8-bit LUT with more than 256 entries
    lut.add_new("LUTData", "US", [min(i, 255) for i in range(300)])
    path = write_image(tmp_path / "voilut.dcm", np.array([[0, 51, 255, 299, 4000]], np.uint16), bits_stored=12,
                       VOILUTSequence=Sequence([lut]))
    (img,) = decode_file(path, voi="apply")
    assert img.voi_applied and np.allclose(img.pixels, [[0, 0.2, 1, 1, 1]])


def test_dataset_without_preamble_or_file_meta(tmp_path: Path) -> None:
    stored = np.array([[1, 2], [3, 4]], np.uint16)
    src = pydicom.dcmread(write_image(tmp_path / "full.dcm", stored))
    raw = tmp_path / "raw.dcm"
    src.file_meta, src.preamble = FileMetaDataset(), None
    pydicom.dcmwrite(raw, src, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert raw.read_bytes()[128:132] != b"DICM"
    (img,) = decode_file(raw)
    assert np.array_equal(img.pixels, stored)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each corrupted value
def test_corrupted_files_are_rejected_never_raised(tmp_path: Path) -> None:
    # Random byte changes in real files, compressed ones included: the Rust RLE/J2K codecs
    # panic on some of these with a BaseException, which must still become a rejection.
    rng = np.random.default_rng(0)
    names = ["SC_rgb_rle.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "CT_small.dcm",
             "examples_palette.dcm", "SC_rgb_jpeg_dcmtk.dcm"]
    path, reasons = tmp_path / "corrupt.dcm", collections.Counter()
    for i in range(240):
        data = bytearray(sample_file(names[i % len(names)]).read_bytes())
        for pos in rng.integers(0, len(data), rng.integers(1, 9)):
            data[pos] = rng.integers(0, 256)
        path.write_bytes(bytes(data))
        try:
            decode_dicom(read_dicom(path), voi="apply", frames="volume")
            reasons["decoded"] += 1
        except RejectedInput as r:
            assert r.reason in DICOM_REJECT_REASONS
            reasons[r.reason] += 1
    assert reasons["decode_error"] > 0 and reasons["decoded"] > 0


@pytest.mark.parametrize("slope", [30000, 40000])  # int32 arithmetic, then int64 where int32 could overflow
def test_large_integer_slope_stays_exact(tmp_path: Path, slope: int) -> None:
    stored = np.array([[0, 1, 65535]], np.uint16)
    path = write_image(tmp_path / "big_slope.dcm", stored, RescaleSlope=slope, RescaleIntercept=0)
    (img,) = decode_file(path)
    assert img.lossless and img.pixels.dtype == np.uint32
    assert img.pixels.astype(np.int64).tolist() == [[0, slope, 65535 * slope]]


@pytest.mark.parametrize("seed", range(6))
def test_one_pass_rescale_matches_wide_arithmetic(seed: int) -> None:
    # _affine_exact computes in the output's own width, modulo 2**bits; the reference widens to
    # int64, computes, mirrors and narrows. Same dtype and same values, over stored types, signs,
    # slopes (incl. negative), intercepts and MONOCHROME1, including ranges that need 32 bits.
    from medscale.prep.dicom import _affine_exact, _to_int_dtype

    rng = np.random.default_rng(seed)
    for _ in range(200):
        dtype = rng.choice([np.uint8, np.int8, np.uint16, np.int16, np.int32])
        bits = int(rng.integers(1, 8 * np.dtype(dtype).itemsize + 1)) if dtype != np.int32 else 24
        signed = np.dtype(dtype).kind == "i"
        s_lo, s_hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        stored = rng.integers(s_lo, s_hi + 1, size=(7, 5)).astype(dtype)
        slope = int(rng.choice([1, 1, 2, -1, 3, -7]))
        intercept = int(rng.choice([0, -1024, 1024, 32768, -32768, 5, 70000]))
        lo, hi = sorted((s_lo * slope + intercept, s_hi * slope + intercept))
        mirror = bool(rng.integers(2))
        values = stored.astype(np.int64) * slope + intercept
        if mirror:
            values = (lo + hi) - values
        want = _to_int_dtype(values, lo, hi)
        got = _affine_exact(stored, slope, intercept, lo, hi, mirror)
        assert got.dtype == want.dtype, (dtype, bits, slope, intercept, mirror)
        np.testing.assert_array_equal(got, want)
