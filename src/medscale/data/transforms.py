"""Pixels from a shard to a model-ready tensor: intensity, size, channels, augmentation.

Intensity handling works on the lossless modality values prep stored (HU for CT), so a window
chosen at training time is exact. Augmentations are torchvision v2 transforms on tensors and
are off where they make no sense for medical images (no horizontal flip unless asked).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from medscale.config import DataConfig

__all__ = ["intensity", "SampleTransform"]


def intensity(pixels: np.ndarray, info: dict[str, Any], cfg: DataConfig) -> torch.Tensor:
    """Modality values to a float (C, H, W) tensor in about [0, 1].

    Windows (center, width) stack as channels; otherwise min-max over the image or z-score.
    Colour images (H, W, 3) are scaled by their bit depth.
    """
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32)
    if x.ndim == 3 and x.shape[-1] in (3, 4):  # (H, W, C) colour
        x = x[..., :3].permute(2, 0, 1) / (65535.0 if pixels.dtype == np.uint16 else 255.0)
        return x
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {tuple(x.shape)} (volumes need a 3-D model)")
    if cfg.windows:
        chans = []
        for center, width in cfg.windows:
            lo = center - width / 2.0
            chans.append(((x - lo) / width).clamp_(0.0, 1.0))
        return torch.stack(chans)
    if cfg.normalize == "zscore":
        return ((x - x.mean()) / x.std().clamp_min(1e-6)).unsqueeze(0)
    lo, hi = x.min(), x.max()
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).unsqueeze(0)


class SampleTransform:
    """Callable: (pixels, info) -> (C, H, W) float tensor of the configured size and channels."""

    def __init__(self, cfg: DataConfig, train: bool):
        self.cfg = cfg
        self.train = train
        size = cfg.image_size
        augs: list[Any] = []
        if train:
            augs.append(v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True))
            augs.append(v2.RandomAffine(degrees=7, translate=(0.03, 0.03)))
            if cfg.hflip:
                augs.append(v2.RandomHorizontalFlip())
        self.augment = v2.Compose(augs) if augs else None

    def __call__(self, pixels: np.ndarray, info: dict[str, Any]) -> torch.Tensor:
        x = intensity(pixels, info, self.cfg)
        if self.augment is not None:
            x = self.augment(x)
        if x.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            x = F.interpolate(x[None], size=(self.cfg.image_size,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)[0]
        c = self.cfg.channels
        if x.shape[0] != c:
            if x.shape[0] == 1:
                x = x.expand(c, -1, -1).contiguous()
            elif c == 1:
                x = x.mean(0, keepdim=True)
            else:
                raise ValueError(f"image has {x.shape[0]} channels, data.channels={c}")
        return x
