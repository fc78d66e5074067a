"""timm models by name. The model is a plain nn.Module and knows nothing about DeepSpeed."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import timm
import torch
from torch import nn

from medscale.config import ModelConfig
from medscale.errors import ConfigError, InputError, InputNotFound

__all__ = ["create_model", "load_weights"]

log = logging.getLogger("medscale.models")


def create_model(cfg: ModelConfig, *, img_size: int, in_chans: int) -> nn.Module:
    """Build a timm model from the config, never downloading weights.

    Args:
        cfg: model section of the run config.
        img_size: input side length (passed to models that take it, e.g. ViTs).
        in_chans: input channels.
    """
    if not timm.is_model(cfg.name):
        close = timm.list_models(f"*{cfg.name.split('_')[0]}*")[:8]
        raise ConfigError(f"model.name={cfg.name!r} is not a timm model; similar: {close}")
    kwargs: dict = {"num_classes": cfg.num_classes, "in_chans": in_chans}
    # img_size/patch_size/drop_path_rate exist only for some families; pass them only where taken.
    cls_params = _constructor_params(cfg.name)
    if "img_size" in cls_params:
        kwargs["img_size"] = img_size
    if cfg.drop_path_rate:
        if "drop_path_rate" not in cls_params:
            raise ConfigError(f"model.drop_path_rate is set but {cfg.name} has no stochastic depth")
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.patch_size:
        if "patch_size" not in cls_params:
            raise ConfigError(f"model.patch_size is set but {cfg.name} takes no patch_size")
        kwargs["patch_size"] = cfg.patch_size
    model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    if cfg.weights:
        load_weights(model, cfg.weights)
    if cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(f"model.grad_checkpointing is set but {cfg.name} does not support it")
        model.set_grad_checkpointing(True)
    return model


def _constructor_params(name: str) -> set[str]:
    """Parameters the model class's __init__ accepts (timm entry points forward **kwargs)."""
    module = timm.models.model_entrypoint(name).__module__
    mod = __import__(module, fromlist=["*"])
    params: set[str] = set()
    for obj in vars(mod).values():
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module:
            # A subclass that forwards **kwargs (deit's VisionTransformerDistilled) takes its bases' arguments.
            for cls in obj.__mro__:
                if issubclass(cls, nn.Module) and cls is not nn.Module:
                    params |= set(inspect.signature(cls.__init__).parameters)
    return params


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint, adapting what differs in shape and refusing what does not fit.

    Accepts safetensors, a bare state dict, or a dict holding one under ``state_dict``, ``model``
    or ``module`` (timm, torch and DeepSpeed-consolidated files; a DDP ``module.`` prefix is
    stripped). Absolute position embeddings are resampled to the model's grid, a first layer
    trained on another number of input channels is adapted (timm's ``adapt_input_conv``), and a
    head of another shape (number of classes) is left freshly initialised.

    Raises:
        InputNotFound: the file does not exist (weights are never downloaded).
        InputError: weights other than the head are missing or do not fit.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFound(f"model.weights file {p} does not exist (weights are never downloaded)")
    state = _read_state(p)
    own = model.state_dict()
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid), num_prefix_tokens=prefix)
        log.info("resized pos_embed to grid %s", grid)
    _adapt_first_conv(model, state, own)
    dropped = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    for k in dropped:
        del state[k]  # e.g. a head for another number of classes: keep the fresh one
    missing, unexpected = model.load_state_dict(state, strict=False)
    log.info("loaded %s: reset %s, missing %d, unexpected %d", p, dropped, len(missing), len(unexpected))
    head = _head_prefixes(model)
    bad = [k for k in missing if not k.startswith(head)]
    if bad:
        raise InputError(f"weights {p} do not fit {type(model).__name__}: missing or mis-shaped {bad[:5]}")


def _read_state(p: Path) -> dict[str, torch.Tensor]:
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
        for k in ("state_dict", "model", "module"):
            if isinstance(state, dict) and k in state and isinstance(state[k], dict):
                state = state[k]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"weights {p} hold no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _adapt_first_conv(model: nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Fit the first layer to the model: other input channels (summed or repeated filters) or, for a
    ViT patch embedding, another patch size (FlexiViT-style resampling)."""
    from timm.layers import resample_patch_embed
    from timm.models import adapt_input_conv

    first = getattr(model, "pretrained_cfg", {}).get("first_conv")
    names = first if isinstance(first, (list, tuple)) else [first] if first else []
    for name in names:
        key = f"{name}.weight"
        if key not in state or key not in own or state[key].ndim != 4 or state[key].shape[0] != own[key].shape[0]:
            continue
        have, want = state[key].shape, own[key].shape
        if have[1] != want[1]:
            state[key] = adapt_input_conv(want[1], state[key])
            log.info("adapted %s from %d to %d input channels", key, have[1], want[1])
        if have[2:] != want[2:] and name.startswith("patch_embed"):
            state[key] = resample_patch_embed(state[key], list(want[2:]))
            log.info("resampled %s from %s to %s patches", key, tuple(have[2:]), tuple(want[2:]))


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier] if classifier else []
    return tuple(names) + ("head", "fc", "classifier")
