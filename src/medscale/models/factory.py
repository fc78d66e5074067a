"""timm models by name. The model is a plain nn.Module and knows nothing about DeepSpeed."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from torch import nn

from medscale.config import ModelConfig
from medscale.errors import ConfigError, InputError, InputNotFound

__all__ = ["create_model", "create_mae_model", "load_weights", "model_from_record", "record_model_config",
           "timm_spec", "ENCODER_ONLY", "POOLING_PREFIXES"]

log = logging.getLogger("medscale.models")

ENCODER_ONLY = "encoder"
"""``medscale_export_kind`` in the metadata of an encoder-only export (``medscale export --encoder-only``)."""
POOLING_PREFIXES = ("attn_pool", "fc_norm")
"""Parts of a classifier's pooling that an encoder has none of: fresh in a model fine-tuned from an encoder."""


def create_model(cfg: ModelConfig, *, img_size: int, in_chans: int, encoder_only: bool = False) -> nn.Module:
    """Build a timm model from the config, never downloading weights.

    Args:
        cfg: model section of the run config.
        img_size: input side length (passed to models that take it, e.g. ViTs).
        in_chans: input channels.
        encoder_only: no classifier and no pooling (``num_classes=0, global_pool=''``): the token
            encoder that MAE pretrains (`create_mae_model`) and an encoder-only export holds.
    """
    if not timm.is_model(cfg.name):
        close = timm.list_models(f"*{cfg.name.split('_')[0]}*")[:8]
        raise ConfigError(f"model.name={cfg.name!r} is not a timm model; similar: {close}")
    kwargs: dict = {"num_classes": 0 if encoder_only else cfg.num_classes, "in_chans": in_chans}
    if encoder_only:
        kwargs["global_pool"] = ""
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


def record_model_config(record: Mapping[str, Any]) -> ModelConfig:
    """The ``model`` section a preprocessing record keeps (`medscale.checkpoint.weights`)."""
    spec = record["model"]
    return ModelConfig(name=spec["name"], num_classes=spec["num_classes"], patch_size=spec.get("patch_size", 0),
                       drop_path_rate=spec.get("drop_path_rate", 0.0))


def model_from_record(record: Mapping[str, Any], encoder_only: bool = False) -> nn.Module:
    """The timm model a preprocessing record describes (weights not loaded)."""
    return create_model(record_model_config(record), img_size=record["image_size"], in_chans=record["channels"],
                        encoder_only=encoder_only)


def timm_spec(record: Mapping[str, Any], encoder_only: bool = False) -> dict[str, Any]:
    """The timm architecture, its constructor arguments and the pretrained-config overlay of a
    preprocessing record: what ``timm.create_model`` needs to rebuild the model and load an export
    (`encoder_only`: without head and pooling, ``num_classes=0, global_pool=''``)."""
    model = record["model"]
    name = model["name"]
    params = _constructor_params(name)
    kwargs: dict[str, Any] = {"num_classes": 0 if encoder_only else int(model["num_classes"]),
                              "in_chans": int(record["channels"])}
    if encoder_only:
        kwargs["global_pool"] = ""
    if "img_size" in params:
        kwargs["img_size"] = int(record["image_size"])
    if model.get("patch_size"):
        kwargs["patch_size"] = int(model["patch_size"])
    overlay = {"num_classes": kwargs["num_classes"],
               "input_size": [int(record["channels"]), int(record["image_size"]), int(record["image_size"])]}
    return {"model_name": name, "kwargs": kwargs, "pretrained_cfg_overlay": overlay}


def create_mae_model(cfg: ModelConfig, mae: Any, *, img_size: int, in_chans: int) -> nn.Module:
    """A masked autoencoder (`medscale.models.mae.MaskedAutoencoder`) around the timm ViT that
    `cfg` names, built encoder-only; ``model.weights`` (e.g. an earlier encoder export) initialises
    the encoder."""
    from medscale.models.mae import MaskedAutoencoder

    encoder = create_model(cfg, img_size=img_size, in_chans=in_chans, encoder_only=True)
    return MaskedAutoencoder(encoder, in_chans=in_chans, mask_ratio=mae.mask_ratio, decoder_dim=mae.decoder_dim,
                             decoder_depth=mae.decoder_depth, decoder_heads=mae.decoder_heads,
                             decoder_mlp_ratio=mae.decoder_mlp_ratio, norm_pix_loss=mae.norm_pix_loss)


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
    state, metadata = _read_state(p)
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
    if metadata.get("medscale_export_kind") == ENCODER_ONLY:
        head += POOLING_PREFIXES  # an MAE encoder has no pooling: attention pool / fc_norm start fresh
    bad = [k for k in missing if not k.startswith(head)]
    if bad:
        raise InputError(f"weights {p} do not fit {type(model).__name__}: missing or mis-shaped {bad[:5]}")


def _read_state(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict of a weights file and its metadata (a safetensors header's; {} for others)."""
    metadata: dict[str, str] = {}
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = load_file(str(p))
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
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
    return dict(state), metadata


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
