"""Pixel encodings are lossless for every dtype prep writes."""

import numpy as np
import pytest

from medscale.formats.codec import ENCODINGS, decode_pixels, encode_pixels, extension_for


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16"])
def test_round_trip_exact_2d(encoding, dtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    arr = rng.integers(info.min, info.max, (37, 53), endpoint=True).astype(dtype)
    arr[0, 0], arr[-1, -1] = info.min, info.max  # extremes survive the delta wrap-around and PNG offset
    data, meta = encode_pixels(arr, encoding)
    out = decode_pixels(data, extension_for(encoding), meta)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert np.array_equal(out, arr)


@pytest.mark.parametrize("encoding", ["zstd", "lz4", "zlib"])
@pytest.mark.parametrize("dtype", ["int32", "uint32", "float32", "int8"])
def test_round_trip_exact_volumes_and_wide_types(encoding, dtype):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((4, 9, 11, 3)) * 1000).astype(dtype)
    data, meta = encode_pixels(arr, encoding, 1)
    assert np.array_equal(decode_pixels(data, encoding), arr)


def test_rgb_png_and_smooth_ct_compresses():
    rgb = np.random.default_rng(2).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    data, meta = encode_pixels(rgb, "png")
    assert np.array_equal(decode_pixels(data, "png", meta), rgb)
    yy, xx = np.mgrid[0:256, 0:256]
    ct = (np.sqrt((yy - 128.0) ** 2 + (xx - 128.0) ** 2) * 4 - 1000).astype(np.int16)
    data, _ = encode_pixels(ct, "zstd")
    assert len(data) < ct.nbytes / 4  # the delta filter is what makes smooth anatomy small


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown pixel encoding"):
        encode_pixels(np.zeros((2, 2), np.uint8), "jpeg")
    with pytest.raises(ValueError, match="cannot encode pixel dtype"):
        encode_pixels(np.zeros((2, 2), np.complex64), "zstd")
    with pytest.raises(ValueError, match="bad magic"):
        decode_pixels(b"nope" * 4, "zstd")
    with pytest.raises(ValueError, match="16-bit colour"):
        encode_pixels(np.zeros((2, 2, 3), np.uint16), "png")
