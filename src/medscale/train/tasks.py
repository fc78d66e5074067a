"""The task seam: what an objective supplies to the training loop, chosen by ``train.objective``.

The loop knows batches, an engine and a loss tensor, nothing about labels or heads. An objective
(a `Task`) supplies the rest: whether the data must carry labels (checked against the manifest
before any process trains), the plain model for it, the loss over one micro-batch, and its
evaluation. Registered: ``classification`` and ``mae`` (masked-autoencoder pretraining on the images
alone, `MaeTask`); another objective registers itself the same way and the loop stays as it is.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar, Protocol

import torch
from torch import nn

from medscale.config import ConfigError, RunConfig
from medscale.data.loader import ShardStream
from medscale.formats.manifest import has_labels
from medscale.logs import metric_fields

__all__ = ["Task", "ClassificationTask", "MaeTask", "TASKS", "register_task", "build_task"]

log = logging.getLogger("medscale.train")


class Task(Protocol):
    """One training objective. Methods are called on every rank."""

    needs_labels: ClassVar[bool]
    """The data must carry a label per sample (streams are built with ``labels=needs_labels``)."""
    class_names: list[str]
    """Names of the outputs, for the preprocessing record saved with the weights (may be empty)."""

    def build_model(self) -> nn.Module:
        """The plain model (no DeepSpeed), on the CPU."""

    def loss(self, model: Callable[..., Any], batch: dict[str, Any]) -> torch.Tensor:
        """Scalar loss of one micro-batch already on the model's device (``batch["valid"]`` marks
        samples that count; the others are stand-ins that keep batch shapes equal on every rank).
        `model` is the engine: called with whatever the task's model takes (the image; MAE: the
        image and ``batch["seed"]``)."""

    def evaluate(self, model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """Metrics over a whole split, identical on every rank (a collective: all ranks call it)."""

    def flops_per_sample(self) -> float | None:
        """Forward FLOPs of the model on one training sample, for MFU (None: not countable)."""


TASKS: dict[str, Callable[[RunConfig, dict[str, Any]], Task]] = {}


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: make a task available as ``train.objective=<name>``."""

    def add(cls: type) -> type:
        TASKS[name] = cls
        return cls

    return add


def build_task(cfg: RunConfig, manifest: dict[str, Any]) -> Task:
    """The objective ``cfg.train.objective`` asks for, checked against the shards' manifest.

    Raises:
        ConfigError: an unknown objective, or data that the objective cannot train on (for
            example unlabeled shards for classification); the message says what to change.
    """
    try:
        factory = TASKS[cfg.train.objective]
    except KeyError:
        raise ConfigError(f"train.objective={cfg.train.objective!r} is not registered; "
                          f"known: {sorted(TASKS)}") from None
    return factory(cfg, manifest)


@register_task("classification")
class ClassificationTask:
    """Image classification: multiclass (softmax cross-entropy) or multilabel (sigmoid BCE per finding),
    focal and positive weights as `train.*` asks; evaluated with AUROC/AUPRC and bootstrap CIs."""

    needs_labels: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig, manifest: dict[str, Any]):
        from medscale.train.losses import build_loss

        self.cfg = cfg
        shards = cfg.data.shards
        if not has_labels(manifest):
            raise ConfigError(
                f"train.objective=classification needs labeled shards, but {shards} holds none (prepped without "
                "a labels CSV): prep again with --labels LABELS.csv (or a recipe's labels_csv / label_from_dir)")
        task = manifest.get("task", "multiclass")
        if task != cfg.train.task:
            raise ConfigError(f"train.task={cfg.train.task} but the manifest of {shards} says task {task}")
        classes = manifest.get("classes") or []
        if classes and len(classes) != cfg.model.num_classes:
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the manifest of {shards} lists "
                              f"{len(classes)} classes {classes[:10]}")
        self.class_names: list[str] = list(classes)
        self.loss_fn = build_loss(cfg.train, manifest, cfg.data.train_split)

    def build_model(self) -> nn.Module:
        from medscale.models import create_model

        return create_model(self.cfg.model, img_size=self.cfg.data.image_size, in_chans=self.cfg.data.channels)

    def loss(self, model: Callable[[torch.Tensor], torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        return self.loss_fn(model(batch["image"]), batch["target"], batch["valid"])

    def evaluate(self, model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        from medscale.eval.evaluate import evaluate

        result = evaluate(model, stream, self.cfg.eval, dtype, device, seed=self.cfg.train.seed)
        log.info("eval %s: %s", stream.split, metric_fields(auroc=result.get("auroc"), auprc=result.get("auprc"),
                                                             accuracy=result["accuracy"], n=result["n_samples"]))
        return result

    def flops_per_sample(self) -> float | None:
        from medscale.train.throughput import flops_per_sample

        return flops_per_sample(self.cfg.model, in_chans=self.cfg.data.channels, img_size=self.cfg.data.image_size)


@register_task("mae")
class MaeTask:
    """Masked-autoencoder pretraining of the ViT that ``model.name`` names (`medscale.models.mae`): the
    loss is the MSE over each valid sample's masked patches, the masks drawn from ``batch["seed"]``.
    Labels are never read (labeled shards work too: their labels are hidden). Evaluation: the
    reconstruction loss over the split, and ``mae.samples`` images as original / masked /
    reconstruction for the report and W&B."""

    needs_labels: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig, manifest: dict[str, Any]):
        self.cfg = cfg
        self.class_names: list[str] = []
        if cfg.data.image_size % (cfg.model.patch_size or 1):
            raise ConfigError(f"data.image_size={cfg.data.image_size} must be a multiple of "
                              f"model.patch_size={cfg.model.patch_size} for train.objective=mae")

    def build_model(self) -> nn.Module:
        from medscale.models import create_mae_model

        return create_mae_model(self.cfg.model, self.cfg.mae, img_size=self.cfg.data.image_size,
                                in_chans=self.cfg.data.channels)

    def loss(self, model: Callable[..., Any], batch: dict[str, Any]) -> torch.Tensor:
        from medscale.models.mae import masked_loss

        out = model(batch["image"], batch["seed"])
        return masked_loss(out.pred, out.target, out.mask, batch["valid"])

    def evaluate(self, model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        result = evaluate_reconstruction(model, stream, dtype, device, samples=self.cfg.mae.samples)
        result["mask_ratio"] = self.cfg.mae.mask_ratio
        log.info("eval %s: %s  (reconstruction of masked patches, %s)", stream.split,
                 metric_fields(loss=result["loss"], n=result["n_samples"]),
                 "per-patch normalised pixels" if self.cfg.mae.norm_pix_loss else "pixels")
        return result

    def flops_per_sample(self) -> float | None:
        # The encoder sees only the visible patches, the decoder all of them: counted on this model,
        # not the full-image classifier (which would overstate MFU about fourfold at mask 0.75).
        from medscale.models import create_mae_model
        from medscale.train.throughput import forward_flops

        c, s = self.cfg.data.channels, self.cfg.data.image_size
        return forward_flops(lambda m: create_mae_model(m, self.cfg.mae, img_size=s, in_chans=c), self.cfg.model,
                             lambda: (torch.zeros(1, c, s, s), torch.zeros(1, dtype=torch.int64)))


@torch.no_grad()
def evaluate_reconstruction(model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device,
                            samples: int = 6) -> dict[str, Any]:
    """Reconstruction loss of an MAE over a whole split, identical on every rank (all ranks call it).

    Each sample's loss is the MSE over its masked patches (the evaluation's masks are fixed per
    position, so every evaluation of a split draws the same ones); ``loss`` is their mean over the
    split's distinct samples, ``samples`` the first `samples` by key drawn as one image each:
    original | masked | reconstruction side by side (``label`` says so, ``prob`` holds the sample's
    loss), in the form `medscale.eval.evaluate.save_result` writes.

    Raises:
        RuntimeError: the ranks together saw another number of distinct samples than the manifest
            holds for the split (corrupt ones included), or more corrupt samples than allowed.
    """
    from medscale.data.device import to_device
    from medscale.data.loader import make_loader
    from medscale.dist import all_gather_objects
    from medscale.eval.evaluate import gather_split

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
    parts = all_gather_objects({"keys": keys, "patients": patients, "losses": losses, "shown": shown,
                                "corrupt": stream.corrupt_count - corrupt_before})
    split = gather_split(parts, stream)  # each sample once, and the split covered
    values = [parts[j]["losses"][i] for j, i in split.rows]
    groups = {parts[j]["patients"][i] for j, i in split.rows}
    everyone = {k: v for part in parts for k, v in part["shown"].items()}
    chosen = sorted(everyone)[:samples]
    return {"objective": "mae", "split": stream.split, "loss": sum(values) / len(values),
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
    import numpy as np

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
