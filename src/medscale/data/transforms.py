"""Pixels from a shard to a model-ready tensor: geometry, intensity, channels, augmentation.

The order, and why:

1. The decoded array (lossless modality values prep stored: HU for CT, 8- or 16-bit counts
   otherwise) becomes float32, which holds every 16-bit value exactly. Colour images are scaled
   by their bit depth to [0, 1].
2. Geometry (random resized crop, small rotation/translation, flips; or a plain resize for
   evaluation) runs on that single-channel modality image, before windowing: interpolation then
   mixes physical values, and k stacked windows cost one resize instead of k. The resize is
   antialiased bilinear (a triangle filter widened by the downscale factor): a 512 -> 224 crop
   without it aliases fine structure. Areas rotated in are filled with the image's minimum (air,
   not water).
3. Intensity: CT windows (``[center, width]`` pairs, several stack as channels), else min-max or
   z-score over the image. Grayscale always comes as MONOCHROME2 (bright = dense): prep inverts
   MONOCHROME1 sources when it writes the shards.
4. Photometric augmentation (brightness, contrast, gamma) on the [0, 1] result.
5. Channels: grayscale is repeated to ``data.channels``; colour becomes luminance for a
   1-channel model.

Where the work runs (``data.transforms_on``): the random parameters of a sample are drawn in the
loader worker from the sample's own seed (`SampleTransform.prepare`, a pure function of the seed
and the image size, so resume is exact). The worker then either applies the ops itself (cpu) or
ships the stored-dtype pixels, cut to the crop box, with the parameters, and `SampleTransform.apply`
runs the same ops on the device, batched with per-sample parameters (gpu). The CPU path calls
`apply` on a batch of one: there is one implementation of the math. (torchvision's v2 transforms
called on a batch draw one set of parameters for the whole batch, so they are not used here.)

Defaults leave flips off: laterality matters in chest X-ray and CT.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medscale.config import DataConfig
from medscale.errors import ConfigError

__all__ = ["SampleTransform", "resize_crops", "PARAMS"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights
# Smallest spread divided by: a flat image normalises to zeros instead of NaN.
_EPS = 1e-6
# Aspect ratios the random resized crop may draw: near-square, anatomy is not stretched far.
_CROP_RATIO = (0.9, 1.1)
_CROP_TRIES = 10  # crop boxes drawn before falling back to the largest box of an allowed ratio

PARAMS = ("height", "width", "low", "scale", "colour", "angle", "tx", "ty", "hflip", "vflip",
          "offset", "factor", "gamma")
"""Columns of the per-sample parameter rows `SampleTransform.prepare` returns and `apply` takes:
the size of the shipped crop, the fill value (the whole image's minimum, in [0, 1] units for
colour), the colour scale (dtype maximum; 1 for grayscale), whether it is colour, the affine
(degrees, shift in output pixels), flips (0/1) and the photometric offset, factor and gamma."""
_P = {name: i for i, name in enumerate(PARAMS)}
# Uniform draws per sample at fixed positions, so turning one option on never shifts another's
# draws: two per crop try, the crop position (2), angle, shift (2), flips (2), offset, factor, gamma.
_U_CROP = 0
_U_POS = _U_CROP + 2 * _CROP_TRIES
_U_ANGLE, _U_TX, _U_TY, _U_HFLIP, _U_VFLIP, _U_OFFSET, _U_FACTOR, _U_GAMMA = range(_U_POS + 2, _U_POS + 10)
_DRAWS = _U_POS + 10


def _aa_weights(n_in: torch.Tensor, n_max: int, n_out: int) -> torch.Tensor:
    """(B, n_out, n_max) antialiased bilinear resampling matrices, one per input length in `n_in`.

    Output pixel i samples the input around ``(i + 0.5) * scale`` with a triangle filter whose
    half-width is ``max(scale, 1)`` input pixels, cut at the input's edges and renormalised: the
    weights `F.interpolate(..., antialias=True)` uses, as a dense matrix so that a batch of
    different sizes resizes in two batched matmuls. Columns past a sample's length are zero.
    """
    n = n_in.to(torch.float64)
    scale = n / n_out
    support = scale.clamp_min(1.0)
    i = torch.arange(n_out, dtype=torch.float64, device=n_in.device) + 0.5
    j = torch.arange(n_max, dtype=torch.float64, device=n_in.device) + 0.5
    d = (j[None, None, :] - scale[:, None, None] * i[None, :, None]) / support[:, None, None]
    w = (1.0 - d.abs()).clamp_min_(0.0) * (j[None, None, :] < n[:, None, None])
    return (w / w.sum(-1, keepdim=True)).to(torch.float32)


def resize_crops(x: torch.Tensor, hw: torch.Tensor, size: int, method: str | None = None) -> torch.Tensor:
    """Each image ``x[b, :, :h_b, :w_b]`` resized to ``size`` x ``size`` (antialiased bilinear).

    Args:
        x: (B, C, H, W) float; sample b's image sits top-left, the rest is padding.
        hw: (B, 2) heights and widths.
        size: output side.
        method: ``"matmul"`` (two batched matrix products with `_aa_weights`: one kernel pair for
            the whole batch, for GPUs), ``"interpolate"`` (one `F.interpolate` per sample: banded,
            about 20x fewer operations, for CPUs), or None: matmul on CUDA, else interpolate. Both
            compute the same weights (equal within float rounding; tested).
    """
    b, c, h_max, w_max = x.shape
    if method is None:
        method = "matmul" if x.is_cuda else "interpolate"
    if method == "interpolate":
        out = x.new_empty(b, c, size, size)
        for k, (h, w) in enumerate(hw.to("cpu", torch.int64).tolist()):
            crop = x[k:k + 1, :, :h, :w]
            out[k:k + 1] = crop if (h, w) == (size, size) else F.interpolate(
                crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return out
    if method != "matmul":
        raise ValueError(f"unknown resize method {method!r} (matmul or interpolate)")
    wy = _aa_weights(hw[:, 0], h_max, size)  # (B, size, H)
    wx = _aa_weights(hw[:, 1], w_max, size)  # (B, size, W)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 would cost about 1 HU on CT values
    try:
        return torch.matmul(torch.matmul(wy[:, None], x), wx[:, None].transpose(-1, -2))
    finally:
        torch.set_float32_matmul_precision(precision)


class SampleTransform:
    """Pixels to a (C, H, W) float tensor of the configured size and channels.

    Call it on one sample (the CPU path), or split the work: `prepare` in the loader worker
    (parameters and crop, stored dtype) and `apply` on the device over a batch.

    Args:
        cfg: data options.
        train: augment (when ``data.augment``); evaluation only resizes and normalises.

    Raises:
        ConfigError: windows that do not match ``data.channels``.
    """

    def __init__(self, cfg: DataConfig, train: bool):
        self.cfg = cfg
        self.size = cfg.image_size
        self.train = train and cfg.augment
        if cfg.windows and len(cfg.windows) not in (1, cfg.channels):
            raise ConfigError(f"data.windows gives {len(cfg.windows)} channels but data.channels={cfg.channels}; "
                              "use one window (repeated) or one window per channel")
        a = self.train
        crop = float(cfg.crop_scale)
        self.crop_scale = crop if a and 0 < crop < 1 else None
        self.degrees = float(cfg.rotate_degrees) if a else 0.0
        self.translate = float(cfg.translate) if a else 0.0
        self.hflip, self.vflip = a and cfg.hflip, a and cfg.vflip
        self.brightness, self.contrast, gamma = ((float(getattr(cfg, k)) if a else 0.0)
                                                 for k in ("brightness", "contrast", "gamma"))
        # Gamma needs values in [0, 1]: never on z-scored images.
        self.unit_range = bool(cfg.windows) or cfg.normalize != "zscore"
        self.gamma = gamma if self.unit_range else 0.0

    @property
    def ops(self) -> set[str]:
        """The augmentations this transform applies (empty for evaluation)."""
        named = {"crop": self.crop_scale is not None, "affine": bool(self.degrees or self.translate),
                 "hflip": self.hflip, "vflip": self.vflip,
                 "intensity": bool(self.brightness or self.contrast or self.gamma)}
        return {k for k, on in named.items() if on}

    # -- worker side: parameters and crop ---------------------------------------------------------

    def prepare(self, pixels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The sample's pixels cut to its crop box, as (C, h, w) in the stored dtype (a view), and
        its parameter row (float64, columns `PARAMS`): a pure function of the image and `seed`.

        Raises:
            ValueError: an image that is neither 2-D grayscale nor (H, W, 3|4) colour.
        """
        colour = pixels.ndim == 3 and pixels.shape[-1] in (3, 4)
        if colour:
            arr = pixels[..., :3].transpose(2, 0, 1)
            scale = float(np.iinfo(pixels.dtype).max) if pixels.dtype.kind in "ui" else 1.0
        elif pixels.ndim == 2:
            arr, scale = pixels[None], 1.0
        else:
            raise ValueError(f"expected a 2-D image, got shape {tuple(pixels.shape)} (volumes need a 3-D model)")
        height, width = arr.shape[1:]
        u = random.Random(seed).random
        draws = [u() for _ in range(_DRAWS)]
        top, left, h, w = self._crop_box(height, width, draws) if self.crop_scale else (0, 0, height, width)
        row = np.zeros(len(PARAMS))
        row[[_P["height"], _P["width"], _P["scale"], _P["colour"], _P["factor"], _P["gamma"]]] = \
            (h, w, scale, float(colour), 1.0, 1.0)
        if self.degrees or self.translate:
            row[_P["low"]] = float(arr.min()) / scale  # the fill: the whole image's minimum, not the crop's
            row[_P["angle"]] = (2 * draws[_U_ANGLE] - 1) * self.degrees
            row[_P["tx"]] = (2 * draws[_U_TX] - 1) * self.translate * self.size
            row[_P["ty"]] = (2 * draws[_U_TY] - 1) * self.translate * self.size
        row[_P["hflip"]] = float(self.hflip and draws[_U_HFLIP] < 0.5)
        row[_P["vflip"]] = float(self.vflip and draws[_U_VFLIP] < 0.5)
        row[_P["offset"]] = (2 * draws[_U_OFFSET] - 1) * self.brightness
        row[_P["factor"]] = 1 + (2 * draws[_U_FACTOR] - 1) * self.contrast
        row[_P["gamma"]] = math.exp((2 * draws[_U_GAMMA] - 1) * math.log1p(self.gamma))
        return arr[:, top:top + h, left:left + w], row

    def _crop_box(self, height: int, width: int, u: list[float]) -> tuple[int, int, int, int]:
        """(top, left, h, w): area a uniform fraction in [crop_scale, 1], log-uniform aspect ratio."""
        area, lo = height * width, self.crop_scale or 1.0
        log_lo, log_hi = math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])
        for k in range(_CROP_TRIES):
            target = area * (lo + (1 - lo) * u[_U_CROP + 2 * k])
            ratio = math.exp(log_lo + (log_hi - log_lo) * u[_U_CROP + 2 * k + 1])
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                break
        else:  # a very elongated image: the largest box of an allowed aspect ratio
            h, w = height, width
            if width / height < _CROP_RATIO[0]:
                h = min(height, round(width / _CROP_RATIO[0]))
            elif width / height > _CROP_RATIO[1]:
                w = min(width, round(height * _CROP_RATIO[1]))
        top = int(u[_U_POS] * (height - h + 1))
        left = int(u[_U_POS + 1] * (width - w + 1))
        return top, left, h, w

    # -- device side: the ops, batched --------------------------------------------------------------

    def apply(self, pixels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels (any dtype; sample b in ``[:, :h_b, :w_b]``, grayscale in channel 0)
        and (B, len(PARAMS)) parameters to the (B, data.channels, size, size) float32 model input,
        on the pixels' device, each sample with its own parameters. Pass `params` on the CPU (as
        the loader gives them): the colour/grayscale split is decided there, without a device sync."""
        colour = (params[:, _P["colour"]] > 0).cpu()
        on_device = params.to(pixels.device, non_blocking=True)
        if bool(colour.all()):
            return self._apply(pixels[:, :3], on_device, colour=True)
        if not bool(colour.any()):
            return self._apply(pixels[:, :1], on_device, colour=False)
        # A batch mixing colour and grayscale sources: each kind batched on its own.
        out = torch.empty(len(pixels), self.cfg.channels, self.size, self.size, device=pixels.device)
        for mask, is_colour in ((colour, True), (~colour, False)):
            idx = mask.nonzero().flatten().to(pixels.device)
            out[idx] = self._apply(pixels[idx][:, :3 if is_colour else 1], on_device[idx], colour=is_colour)
        return out

    def _apply(self, pixels: torch.Tensor, p: torch.Tensor, colour: bool) -> torch.Tensor:
        def col(name: str) -> torch.Tensor:  # one parameter per sample, broadcast over (C, H, W)
            return p[:, _P[name]].to(torch.float32)[:, None, None, None]

        if pixels.dtype == torch.uint16:  # unsigned 16-bit has few kernels on CUDA: widen through int16 bits
            pixels = pixels.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
        x = pixels.to(torch.float32)
        if colour:
            x = x / col("scale")
        hw = p[:, [_P["height"], _P["width"]]]
        x = resize_crops(x, hw, self.size)
        if self.degrees or self.translate:
            low = col("low")
            x = self._affine(x - low, p) + low  # the zero fill becomes the image minimum
        if self.hflip:
            x = torch.where(col("hflip") > 0, x.flip(-1), x)
        if self.vflip:
            x = torch.where(col("vflip") > 0, x.flip(-2), x)
        if not colour:
            x = self._intensity(x)
        if self.gamma:
            x = x.clamp(0.0, 1.0).pow(col("gamma"))
        if self.contrast:
            mean = x.mean((1, 2, 3), keepdim=True)
            x = (x - mean) * col("factor") + mean
        if self.brightness:
            x = x + col("offset")
        if self.brightness or self.contrast or self.gamma:
            x = x.clamp(0.0, 1.0) if self.unit_range else x
        return self._channels(x)

    def _affine(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Rotation about the centre and shift, per sample, bilinear, zeros outside."""
        a = torch.deg2rad(p[:, _P["angle"]].to(torch.float32))
        cos, sin = torch.cos(a), torch.sin(a)
        # Output pixels to input (normalised coordinates, square image): inverse rotation of the
        # point minus the shift; a shift of t pixels is 2t / size.
        t = p[:, [_P["tx"], _P["ty"]]].to(torch.float32) * (2.0 / self.size)
        inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # (B, 2, 2)
        theta = torch.cat([inv, -(inv @ t[:, :, None])], -1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        """Modality values (B, 1, H, W) to normalised channels, each sample over its own image."""
        cfg = self.cfg
        if cfg.windows:
            return torch.cat([((x - (c - w / 2.0)) / w).clamp_(0.0, 1.0) for c, w in cfg.windows], 1)
        if cfg.normalize == "zscore":
            return (x - x.mean((1, 2, 3), keepdim=True)) / x.std((1, 2, 3), keepdim=True).clamp_min(_EPS)
        lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(_EPS)

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg.channels
        if x.shape[1] == c:
            return x.contiguous()
        if x.shape[1] == 1:
            return x.expand(-1, c, -1, -1).contiguous()
        if c == 1 and x.shape[1] == 3:
            luma = torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)
            return (x * luma).sum(1, keepdim=True)
        raise ValueError(f"image has {x.shape[1]} channels, data.channels={c}")

    # -- the CPU path -------------------------------------------------------------------------------

    def __call__(self, pixels: np.ndarray, info: dict[str, Any] | None = None, seed: int | None = None) -> torch.Tensor:
        """One sample to its (C, size, size) model input: `prepare` and `apply` on a batch of one.

        Args:
            pixels: the decoded array. info: the sample's metadata (unused by the ops so far).
            seed: the sample's seed; None draws one from torch's global generator (which the
                loader seeds per sample).
        """
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
        crop, row = self.prepare(pixels, seed)
        x = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None]
        return self.apply(x, torch.from_numpy(row)[None])[0]

    def blank(self) -> tuple[np.ndarray, np.ndarray]:
        """`prepare`'s output for a padding sample: a black image of the output size, no augmentation."""
        row = np.zeros(len(PARAMS))
        row[[_P["height"], _P["width"], _P["scale"], _P["factor"], _P["gamma"]]] = (self.size, self.size, 1, 1, 1)
        return np.zeros((1, self.size, self.size), np.uint8), row
