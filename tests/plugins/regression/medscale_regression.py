"""An objective from outside medscale: regress each image's mean intensity (as the model sees it).

It needs no labels, owns a config section (``regression:``), and supplies its model, loss,
predictions, evaluation (MSE, MAE, Pearson r over the split, each sample once), its report figure
(predicted against true) and its W&B chart. Everything else (the loop, DeepSpeed, checkpoints and
resume, export, the report's page) is medscale's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping

import torch
from torch import nn

from medscale.data.device import to_device
from medscale.data.loader import make_loader
from medscale.dist import all_gather_objects
from medscale.errors import ConfigError
from medscale.eval.gather import gather_split
from medscale.tasks.base import Figure, TaskBase

MAX_POINTS = 400


@dataclass
class RegressionConfig:
    """The ``regression`` section."""

    loss: Literal["mse", "l1"] = "mse"
    """Training loss on the mean intensity."""
    scale: float = 1.0
    """Multiplies the target (the mean intensity of the normalised image)."""

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ConfigError(f"regression.scale must be > 0, got {self.scale}")


class MeanIntensity(TaskBase):
    """Regression of a scalar from the image: its mean intensity times ``regression.scale``."""

    needs_labels: ClassVar[bool] = False
    config_section: ClassVar[str | None] = "regression"
    Config: ClassVar[type | None] = RegressionConfig

    def __init__(self, cfg: Any, manifest: dict[str, Any]):
        super().__init__(cfg, manifest)
        if cfg.model.num_classes != 1:
            raise ConfigError(f"train.objective=regression predicts one number: set model.num_classes=1 "
                              f"(got {cfg.model.num_classes})")
        self.own: RegressionConfig = cfg.objective_config

    def target(self, image: torch.Tensor) -> torch.Tensor:
        return image.float().mean(dim=(1, 2, 3)) * self.own.scale

    def build_model(self) -> nn.Module:
        from medscale.models import create_model

        return create_model(self.cfg.model, img_size=self.cfg.data.image_size, in_chans=self.cfg.data.channels)

    def loss(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        pred = model(batch["image"]).float().squeeze(-1)
        err = pred - self.target(batch["image"])
        per = err.pow(2) if self.own.loss == "mse" else err.abs()
        valid = batch["valid"].to(per.dtype)
        return (per * valid).sum() / valid.sum().clamp_min(1.0)

    @torch.no_grad()
    def predict(self, model: Any, stream: Any, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        was = model.training
        model.eval()
        out: dict[str, Any] = {"keys": [], "patients": [], "preds": [], "targets": []}
        before = stream.corrupt_count
        for batch in make_loader(stream, device):
            image = to_device(batch, device, dtype)["image"]
            pred = model(image).float().squeeze(-1).cpu().tolist()
            target = self.target(image).cpu().tolist()
            for i, ok in enumerate(batch["valid"].tolist()):
                if ok:
                    out["keys"].append(batch["key"][i])
                    out["patients"].append(batch["patient"][i])
                    out["preds"].append(pred[i])
                    out["targets"].append(target[i])
        model.train(was)
        out["corrupt"] = stream.corrupt_count - before
        return out

    def evaluate(self, model: Any, stream: Any, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        parts = all_gather_objects(self.predict(model, stream, dtype, device))
        split = gather_split(parts, stream)
        pred = [parts[j]["preds"][i] for j, i in split.rows]
        true = [parts[j]["targets"][i] for j, i in split.rows]
        n = len(pred)
        mse = sum((p - t) ** 2 for p, t in zip(pred, true)) / n
        mae = sum(abs(p - t) for p, t in zip(pred, true)) / n
        mp, mt = sum(pred) / n, sum(true) / n
        cov = sum((p - mp) * (t - mt) for p, t in zip(pred, true))
        norm = math.sqrt(sum((p - mp) ** 2 for p in pred) * sum((t - mt) ** 2 for t in true))
        step = max(1, n // MAX_POINTS)
        return {"split": stream.split, "mse": mse, "mae": mae, "pearson_r": cov / norm if norm else None,
                "n_samples": n, "n_patients": len({parts[j]["patients"][i] for j, i in split.rows}),
                "duplicates_dropped": split.duplicates, "corrupt_samples": split.corrupt,
                "points": [[true[i], pred[i]] for i in range(0, n, step)]}

    @classmethod
    def report_figures(cls, result: Mapping[str, Any], samples: Any, samples_file: str) -> list[Figure]:
        points = result.get("points") or []

        def draw(path: Any) -> Any:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure as MplFigure

            fig = MplFigure(figsize=(5, 5), dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.subplots()
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=8)
            ax.set(xlabel="true mean intensity", ylabel="predicted")
            fig.savefig(path, format="png")
            return path

        return [Figure("Predicted against true mean intensity", "regression_scatter",
                       draw if points else "the result has no points")]

    @classmethod
    def wandb_figures(cls, wandb: Any, split: str, result: Mapping[str, Any]) -> dict[str, Any]:
        table = wandb.Table(columns=["true", "predicted"], data=[list(p) for p in result.get("points") or []])
        return {f"{split}/regression": wandb.plot.scatter(table, "true", "predicted")}
