"""Forward FLOPs of one sample of a model, counted on the meta device (for MFU in the training log).

Counted once, on one forward pass of the model built on the meta device (``torch.utils.flop_counter``:
shapes only, no memory and no arithmetic); multiply-add counts 2 FLOPs. Recomputation under gradient
checkpointing is not counted: MFU measures useful model work, as in the PaLM paper.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

from medscale.config import ModelConfig

__all__ = ["flops_per_sample", "forward_flops"]

log = logging.getLogger("medscale.models")


def flops_per_sample(cfg: ModelConfig, *, in_chans: int, img_size: int) -> float | None:
    """Forward FLOPs of one sample of the classifier `cfg` names (multiply-add = 2 FLOPs), or None
    if counting fails."""
    from medscale.models import create_model

    return forward_flops(lambda c: create_model(c, img_size=img_size, in_chans=in_chans), cfg,
                         lambda: (torch.zeros(1, in_chans, img_size, img_size),))


def forward_flops(build: Callable[[ModelConfig], torch.nn.Module], cfg: ModelConfig,
                  inputs: Callable[[], tuple[torch.Tensor, ...]]) -> float | None:
    """Forward FLOPs of ``build(cfg)(*inputs())`` for one sample, or None if counting fails.

    The model is built on the meta device: shapes only, no memory and no arithmetic. Objectives
    whose model is not the classifier (MAE: the encoder sees a quarter of the patches) count theirs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = build(dataclasses.replace(cfg, weights="", grad_checkpointing=False)).eval()
            x = inputs()
        # Parameters must not require grad, and `torch.no_grad()` alone is not enough: FlopCounterMode
        # attributes FLOPs to modules with a ModuleTracker, whose forward hooks register a backward hook
        # on every module input that requires grad and so need its grad_fn or grad accumulator. A view of
        # a parameter made under no_grad still requires grad but has neither (torch.autograd.graph raises
        # "Expected gradient function to be set"). timm's attention-pool head (global_pool="map", e.g.
        # test_vit3) feeds such a view, `self.latent.expand(B, -1, -1)`, into its `q` Linear. With no
        # tensor requiring grad the tracker registers nothing, whatever the caller's grad mode.
        model.requires_grad_(False)
        counter = FlopCounterMode(display=False)
        with counter:
            model(*x)
        return float(counter.get_total_flops())
    except Exception as e:  # noqa: BLE001 - a model the counter cannot trace only loses the MFU figure
        log.warning("could not count model FLOPs (%s: %s); MFU will not be reported", type(e).__name__, e)
        return None
