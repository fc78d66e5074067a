"""``train.objective=mae``: masked-autoencoder pretraining of the ViT that ``model.name`` names.

The encoder sees only the visible patches, a small decoder predicts the pixels of the masked ones
(`medscale.models.mae`); the loss is the MSE over each valid sample's masked patches, the masks drawn
from ``batch["seed"]``. Labels are never read (labeled shards work too: their labels are hidden).
Evaluation: the reconstruction loss over the split, and ``mae.samples`` images as original / masked
/ reconstruction for the report and W&B. Its knobs are the ``mae`` section (`MaeConfig`); an export
writes the encoder alone (``medscale export --encoder-only``), for ``model.weights`` in a
fine-tuning config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch
from torch import nn

from medscale.config import RunConfig, from_dict, to_dict
from medscale.data.device import to_device
from medscale.data.loader import ShardStream, make_loader
from medscale.dist import all_gather_objects
from medscale.errors import ConfigError, InputError
from medscale.eval.gather import gather_split
from medscale.logs import metric_fields
from medscale.tasks.base import ExportView, Figure, TaskBase

__all__ = ["MaeTask", "MaeConfig", "evaluate_reconstruction", "ENCODER_PART"]

log = logging.getLogger("medscale.tasks")

ENCODER_PART = "encoder"
_ENCODER = "encoder."  # the autoencoder's encoder's keys; stripped, they are the plain timm model's


@dataclass
class MaeConfig:
    """Masked-autoencoder pretraining (``train.objective=mae``): a timm ViT encoder that sees only the
    visible patches, a small decoder that predicts the pixels of the masked ones."""

    mask_ratio: float = 0.75
    """Fraction of each image's patches that are masked (rounded to whole patches, the same count for
    every sample); the Medical MAE recipe for chest X-rays used 0.90."""
    decoder_dim: int = 128
    """Width of the decoder's tokens."""
    decoder_depth: int = 2
    """Transformer blocks in the decoder."""
    decoder_heads: int = 4
    """Attention heads per decoder block (must divide decoder_dim)."""
    decoder_mlp_ratio: float = 4.0
    """Hidden width of the decoder's MLPs as a multiple of decoder_dim."""
    norm_pix_loss: bool = True
    """Predict each patch's pixels normalised by that patch's own mean and variance (the MAE paper's
    better-performing target); false: the loader's intensities as they are."""
    samples: int = 6
    """Images drawn as original / masked / reconstruction in each evaluation's figure (0: none)."""

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"mae.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        for key in ("decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"mae.{key} must be >= 1, got {getattr(self, key)}")
        if self.decoder_dim % 4:
            raise ConfigError(f"mae.decoder_dim must be a multiple of 4 (2-D sine-cosine positions), "
                              f"got {self.decoder_dim}")
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"mae.decoder_heads={self.decoder_heads} must divide mae.decoder_dim={self.decoder_dim}")
        if self.decoder_mlp_ratio <= 0:
            raise ConfigError(f"mae.decoder_mlp_ratio must be > 0, got {self.decoder_mlp_ratio}")


class MaeTask(TaskBase):
    """Masked-autoencoder pretraining (see the module docstring)."""

    needs_labels: ClassVar[bool] = False
    config_section: ClassVar[str | None] = "mae"
    Config: ClassVar[type | None] = MaeConfig

    def __init__(self, cfg: RunConfig, manifest: dict[str, Any]):
        super().__init__(cfg, manifest)
        self.mae: MaeConfig = cfg.objective_config
        if cfg.data.image_size % (cfg.model.patch_size or 1):
            raise ConfigError(f"data.image_size={cfg.data.image_size} must be a multiple of "
                              f"model.patch_size={cfg.model.patch_size} for train.objective=mae")

    def build_model(self) -> nn.Module:
        from medscale.models import create_mae_model

        return create_mae_model(self.cfg.model, self.mae, img_size=self.cfg.data.image_size,
                                in_chans=self.cfg.data.channels)

    def loss(self, model: Callable[..., Any], batch: dict[str, Any]) -> torch.Tensor:
        from medscale.models.mae import masked_loss

        out = model(batch["image"], batch["seed"])
        return masked_loss(out.pred, out.target, out.mask, batch["valid"])

    def predict(self, model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """Each valid sample's reconstruction loss over its masked patches (``losses``)."""
        return _reconstruction_losses(model, stream, dtype, device, samples=0)

    def evaluate(self, model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        result = evaluate_reconstruction(model, stream, dtype, device, samples=self.mae.samples)
        result["mask_ratio"] = self.mae.mask_ratio
        log.info("eval %s: %s  (reconstruction of masked patches, %s)", stream.split,
                 metric_fields(loss=result["loss"], n=result["n_samples"]),
                 "per-patch normalised pixels" if self.mae.norm_pix_loss else "pixels")
        return result

    def flops_per_sample(self) -> float | None:
        # The encoder sees only the visible patches, the decoder all of them: counted on this model,
        # not the full-image classifier (which would overstate MFU about fourfold at mask 0.75).
        from medscale.models import create_mae_model
        from medscale.models.flops import forward_flops

        c, s = self.cfg.data.channels, self.cfg.data.image_size
        return forward_flops(lambda m: create_mae_model(m, self.mae, img_size=s, in_chans=c), self.cfg.model,
                             lambda: (torch.zeros(1, c, s, s), torch.zeros(1, dtype=torch.int64)))

    def record(self) -> dict[str, Any]:
        return {"mae": to_dict(self.mae)}  # the decoder's shape, to rebuild the whole autoencoder

    # -- from a saved record or result ------------------------------------------------------------

    @classmethod
    def model_from_record(cls, record: Mapping[str, Any]) -> nn.Module:
        from medscale.models import create_mae_model
        from medscale.models.factory import record_model_config

        mae = from_dict(MaeConfig, record.get("mae") or {}, source="the preprocessing record")
        return create_mae_model(record_model_config(record), mae, img_size=record["image_size"],
                                in_chans=record["channels"])

    @classmethod
    def export_view(cls, state: dict[str, Any], record: Mapping[str, Any], part: str | None) -> ExportView:
        """The encoder alone, under the plain timm model's key names (``encoder.`` stripped, the decoder
        left out), built without head or pooling: `medscale.models.factory.load_weights` loads it into
        a classifier whose head and pooling start fresh."""
        from medscale.models.factory import ENCODER_ONLY, timm_spec

        if part != ENCODER_PART:
            raise InputError("an MAE pretraining run exports its encoder: use --encoder-only")
        encoder = {k[len(_ENCODER):]: v for k, v in state.items() if k.startswith(_ENCODER)}
        return ExportView(encoder, timm_spec(record, encoder_only=True), {"medscale_export_kind": ENCODER_ONLY},
                          part=ENCODER_PART, onnx=False)

    @classmethod
    def report_figures(cls, result: Mapping[str, Any], samples: Mapping[str, Any] | None,
                       samples_file: str) -> list[Figure]:
        from medscale.report import figures

        ratio = result.get("mask_ratio")
        return [Figure("Reconstructions (original | masked | reconstruction)", "reconstructions",
                       (lambda p: figures.reconstruction_grid(samples, p, ratio)) if samples is not None
                       else f"no {samples_file}")]

    @classmethod
    def metrics_html(cls, result: Mapping[str, Any]) -> str:
        """An MAE evaluation: the reconstruction loss over the split's masked patches."""
        from medscale.report.tables import fmt, table

        rows = [["reconstruction loss (MSE, masked patches)", fmt(result.get("loss"))],
                ["mask ratio", fmt(result.get("mask_ratio"))],
                ["samples / patients", f"{result.get('n_samples', '-')} / {result.get('n_patients', '-')}"]]
        return (f"<p>split {fmt(result.get('split'))}: masked-autoencoder pretraining</p>"
                + table(["metric", "value"], rows))

    @classmethod
    def wandb_figures(cls, wandb: Any, split: str, result: Mapping[str, Any]) -> dict[str, Any]:
        """The strips (original | masked | reconstruction) as a captioned media panel."""
        if not result.get("samples"):
            return {}
        ratio = result.get("mask_ratio")
        masked = f"masked {ratio:.0%}" if isinstance(ratio, float) else "masked"
        return {f"{split}/reconstructions": [
            wandb.Image(x["image"], caption=f"original | {masked} | reconstruction, loss {float(x['prob']):.4f}")
            for x in result["samples"]]}


@torch.no_grad()
def _reconstruction_losses(model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device,
                           samples: int) -> dict[str, Any]:
    """This rank's per-sample reconstruction losses (``keys``, ``patients``, ``losses``, ``corrupt``) and,
    with `samples`, its first `samples` strips by key (``shown``: key -> (image, loss))."""
    was_training = model.training
    model.eval()
    keys: list[str] = []
    patients: list[str] = []
    losses: list[float] = []
    shown: dict[str, tuple[Any, float]] = {}
    corrupt_before = stream.corrupt_count
    module = getattr(model, "module", model)
    for batch in make_loader(stream, device):
        moved = to_device(batch, device, dtype)  # on data.transforms_on=gpu, transformed there
        images = moved["image"]
        out = model(images, moved["seed"])
        per_patch = (out.pred.float() - out.target).pow(2).mean(dim=-1)
        mask = out.mask.float()
        per_sample = ((per_patch * mask).sum(dim=1) / mask.sum(dim=1)).cpu().tolist()
        valid = batch["valid"].tolist()
        take = [i for i, v in enumerate(valid) if v]
        keys += [batch["key"][i] for i in take]
        patients += [batch["patient"][i] for i in take]
        losses += [per_sample[i] for i in take]
        if samples:
            wanted = [i for i in take if len(shown) < samples or batch["key"][i] < max(shown)]
            if wanted:
                recon, hidden = module.reconstruct(images, out)
                for i in wanted:
                    shown[batch["key"][i]] = (_triptych(images[i], recon[i], hidden[i, 0]), per_sample[i])
                shown = dict(sorted(shown.items())[:samples])
    model.train(was_training)
    return {"keys": keys, "patients": patients, "losses": losses, "shown": shown,
            "corrupt": stream.corrupt_count - corrupt_before}


def evaluate_reconstruction(model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device,
                            samples: int = 6) -> dict[str, Any]:
    """Reconstruction loss of an MAE over a whole split, identical on every rank (all ranks call it).

    Each sample's loss is the MSE over its masked patches (the evaluation's masks are fixed per
    position, so every evaluation of a split draws the same ones); ``loss`` is their mean over the
    split's distinct samples, ``samples`` the first `samples` by key drawn as one image each:
    original | masked | reconstruction side by side (``label`` says so, ``prob`` holds the sample's
    loss), in the form `medscale.eval.results.save_result` writes.

    Raises:
        RunStateError: the ranks together saw another number of distinct samples than the manifest
            holds for the split (corrupt ones included).
        CorruptShards: more corrupt samples than allowed.
    """
    parts = all_gather_objects(_reconstruction_losses(model, stream, dtype, device, samples))
    split = gather_split(parts, stream)  # each sample once, and the split covered
    values = [parts[j]["losses"][i] for j, i in split.rows]
    groups = {parts[j]["patients"][i] for j, i in split.rows}
    everyone = {k: v for part in parts for k, v in part["shown"].items()}
    chosen = sorted(everyone)[:samples]
    return {"split": stream.split, "loss": sum(values) / len(values),
            "n_samples": len(values), "n_patients": len(groups), "duplicates_dropped": split.duplicates,
            "expected_samples": stream.samples, "corrupt_samples": split.corrupt,
            "samples": [{"image": everyone[k][0], "label": "original | masked | reconstruction", "pred": "",
                         "prob": float(everyone[k][1])} for k in chosen]}


_HIDDEN_RGB = (60, 90, 170)  # masked patches in the middle panel: a colour no intensity maps to


def _triptych(original: torch.Tensor, recon: torch.Tensor, hidden: torch.Tensor) -> Any:
    """Original | masked | reconstruction side by side as one RGB uint8 image (H', W', 3).

    Each channel (a CT window) gets its own row, scaled to the original's range in that channel (a
    reconstruction outside it is clipped); three channels show as one colour row. In the middle
    panel the hidden patches are painted a flat blue; white lines separate the panels.
    """

    def scale(x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
        lo, hi = float(ref.min()), float(ref.max())
        a = ((x.float() - lo) / (hi - lo) if hi > lo else torch.zeros_like(x, dtype=torch.float32)).clamp(0, 1)
        return np.round(a.cpu().numpy() * 255).astype(np.uint8)

    rows = [(original, recon)] if original.shape[0] == 3 else [(original[c:c + 1], recon[c:c + 1])
                                                                for c in range(original.shape[0])]
    mask = hidden.cpu().numpy()
    strips = []
    for orig, rec in rows:
        a, b = scale(orig, orig), scale(rec, orig)
        a, b = [np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x for x in (a, b)]
        a, b = a.transpose(1, 2, 0), b.transpose(1, 2, 0)
        masked = a.copy()
        masked[mask] = _HIDDEN_RGB
        line = np.full((a.shape[0], 2, 3), 255, np.uint8)
        strips.append(np.concatenate([a, line, masked, line, b], axis=1))
        strips.append(np.full((2, strips[-1].shape[1], 3), 255, np.uint8))
    return np.ascontiguousarray(np.concatenate(strips[:-1], axis=0))
