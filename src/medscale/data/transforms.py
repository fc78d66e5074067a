"""Pixels from a shard to a model-ready tensor: geometry, intensity, channels, augmentation.

The order, and why:

1. The decoded array (lossless modality values prep stored: HU for CT, 8- or 16-bit counts
   otherwise) becomes float32, which holds every 16-bit value exactly.
2. Geometry (random resized crop, small rotation/translation, flips; or a plain resize for
   evaluation) runs on that single-channel modality image, before windowing: interpolation then
   mixes physical values, and k stacked windows cost one resize instead of k. Areas rotated in
   are filled with the image's minimum (air, not water).
3. Intensity: CT windows (``[center, width]`` pairs, several stack as channels), else min-max or
   z-score over the image. Colour images are scaled by their bit depth. Grayscale always comes
   as MONOCHROME2 (bright = dense): prep inverts MONOCHROME1 sources when it writes the shards.
4. Photometric augmentation (brightness, contrast, gamma) on the [0, 1] result.
5. Channels: grayscale is repeated to ``data.channels``; colour becomes luminance for a
   1-channel model.

All augmentations are torchvision v2 transforms on tensors, drawn from torch's global RNG, which
the loader seeds per sample. Defaults leave flips off: laterality matters in chest X-ray and CT.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from medscale.config import DataConfig
from medscale.errors import ConfigError

__all__ = ["intensity", "RandomIntensity", "SampleTransform", "AUGMENT_DEFAULTS", "option"]

# Data options read with getattr so this module works before and after DataConfig gains them.
AUGMENT_DEFAULTS: dict[str, Any] = {
    "augment": True,
    "crop_scale": 0.8,
    "rotate_degrees": 7.0,
    "translate": 0.03,
    "hflip": False,
    "vflip": False,
    "brightness": 0.0,
    "contrast": 0.0,
    "gamma": 0.0,
}

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)  # ITU-R BT.601 luma weights
# Smallest spread divided by: a flat image normalises to zeros instead of NaN.
_EPS = 1e-6
# Aspect ratios the random resized crop may draw: near-square, anatomy is not stretched far.
_CROP_RATIO = (0.9, 1.1)


def option(cfg: DataConfig, name: str) -> Any:
    """A data option, with the loader's default when DataConfig does not (yet) have it."""
    return getattr(cfg, name, AUGMENT_DEFAULTS[name])


def to_tensor(pixels: np.ndarray) -> tuple[torch.Tensor, bool]:
    """(C, H, W) float32 tensor and whether it is colour (already scaled to [0, 1])."""
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        scale = float(np.iinfo(pixels.dtype).max) if pixels.dtype.kind in "ui" else 1.0
        x = torch.from_numpy(pixels[..., :3].astype(np.float32)).permute(2, 0, 1)
        return x.div_(scale), True
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {tuple(pixels.shape)} (volumes need a 3-D model)")
    return torch.from_numpy(pixels.astype(np.float32)).unsqueeze(0), False  # exact up to 24 bits


def intensity(x: torch.Tensor, info: dict[str, Any], cfg: DataConfig) -> torch.Tensor:
    """Modality values (1, H, W) to normalised channels (``info``: the sample's metadata)."""
    if cfg.windows:
        chans = [((x[0] - (c - w / 2.0)) / w).clamp_(0.0, 1.0) for c, w in cfg.windows]
        x = torch.stack(chans)
    elif cfg.normalize == "zscore":
        x = (x - x.mean()) / x.std().clamp_min(_EPS)
    else:
        lo, hi = x.amin(), x.amax()
        x = (x - lo) / (hi - lo).clamp_min(_EPS)
    return x


class RandomIntensity(v2.Transform):
    """Brightness (additive), contrast (around the mean) and gamma, for images in [0, 1].

    Works on any number of channels (stacked CT windows included), unlike ColorJitter.

    Args:
        brightness: offset drawn from [-b, b].
        contrast: factor drawn from [1 - c, 1 + c].
        gamma: exponent drawn log-uniformly from [1 / (1 + g), 1 + g].
        unit_range: the input is in [0, 1] (clamp the result, gamma allowed).
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, gamma: float = 0.0, unit_range: bool = True):
        super().__init__()
        self.brightness, self.contrast, self.gamma, self.unit_range = brightness, contrast, gamma, unit_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        u = torch.rand(3).tolist()
        g = math.log1p(self.gamma) if self.unit_range else 0.0
        return {"offset": (2 * u[0] - 1) * self.brightness, "factor": 1 + (2 * u[1] - 1) * self.contrast,
                "gamma": math.exp((2 * u[2] - 1) * g)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        x = inpt
        if params["gamma"] != 1.0:
            x = x.clamp(0.0, 1.0).pow(params["gamma"])
        if params["factor"] != 1.0:
            mean = x.mean()
            x = (x - mean) * params["factor"] + mean
        if params["offset"]:
            x = x + params["offset"]
        return x.clamp(0.0, 1.0) if self.unit_range else x


class SampleTransform:
    """Callable: (pixels, info) -> (C, H, W) float tensor of the configured size and channels."""

    def __init__(self, cfg: DataConfig, train: bool):
        self.cfg = cfg
        self.size = cfg.image_size
        self.train = train and bool(option(cfg, "augment"))
        if cfg.windows and len(cfg.windows) not in (1, cfg.channels):
            raise ConfigError(f"data.windows gives {len(cfg.windows)} channels but data.channels={cfg.channels}; "
                              "use one window (repeated) or one window per channel")
        geo: list[Any] = []
        photo: list[Any] = []
        if self.train:
            crop = float(option(cfg, "crop_scale"))
            if 0 < crop < 1:
                geo.append(v2.RandomResizedCrop(self.size, scale=(crop, 1.0), ratio=_CROP_RATIO, antialias=True))
            else:
                geo.append(v2.Resize((self.size, self.size), antialias=True))  # rotate the small image
            deg, shift = float(option(cfg, "rotate_degrees")), float(option(cfg, "translate"))
            if deg or shift:
                geo.append(v2.RandomAffine(degrees=deg, translate=(shift, shift) if shift else None,
                                           interpolation=v2.InterpolationMode.BILINEAR))
            if option(cfg, "hflip"):
                geo.append(v2.RandomHorizontalFlip())
            if option(cfg, "vflip"):
                geo.append(v2.RandomVerticalFlip())
            b, c, g = (float(option(cfg, k)) for k in ("brightness", "contrast", "gamma"))
            if b or c or g:
                unit = bool(cfg.windows) or cfg.normalize != "zscore"
                photo.append(RandomIntensity(b, c, g if unit else 0.0, unit_range=unit))
        self.geometry = v2.Compose(geo) if geo else None
        self.photometric = v2.Compose(photo) if photo else None

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", antialias=True,
                             align_corners=False)[0]

    def __call__(self, pixels: np.ndarray, info: dict[str, Any]) -> torch.Tensor:
        x, colour = to_tensor(pixels)
        if self.geometry is not None:
            low = x.amin()
            x = self._resize(self.geometry(x - low)) + low  # the fill (0) becomes the image minimum
        else:
            x = self._resize(x)
        if not colour:
            x = intensity(x, info, self.cfg)
        if self.photometric is not None:
            x = self.photometric(x)
        return self._channels(x)

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg.channels
        if x.shape[0] == c:
            return x.contiguous()
        if x.shape[0] == 1:
            return x.expand(c, -1, -1).contiguous()
        if c == 1 and x.shape[0] == 3:
            return (x * _LUMA).sum(0, keepdim=True)
        raise ValueError(f"image has {x.shape[0]} channels, data.channels={c}")
