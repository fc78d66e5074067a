"""The `Task` protocol: what an objective supplies, and `TaskBase`, the defaults it may inherit.

An objective owns everything that differs between objectives, and nothing outside ``medscale.tasks``
asks for an objective by name (`medscale.tasks.registry` finds one): the training loop, the
checkpointer, the final weights, export, evaluation, the report and W&B call the methods below.
Two kinds of method:

- on an instance, built from a run config and the shards' manifest (training and evaluation):
  the model, the loss of a micro-batch, predictions on any stream (labeled or not), evaluation of a
  split, FLOPs, and what the objective adds to the preprocessing record saved with the weights;
- on the class, from a saved record or result, with no run config (``medscale eval``, ``export``,
  ``report``): the model rebuilt from the record, which part of it an export writes, the report's
  figures and metrics table, and the W&B figures of an evaluation.

An objective may own a config section (`Task.config_section`, a dataclass `Task.Config`): the
YAML key of that name is typed and checked against it, exactly like the built-in sections, and
is available as ``cfg.objective_config``.

Words: an *objective* (this module's `Task`) is what the model learns (``train.objective``); the
*label kind* (``train.label_kind``, the manifest's ``task``) is multiclass, multilabel or unlabeled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Protocol, Union

from medscale.errors import InputError
from medscale.tasks.registry import task_class

if TYPE_CHECKING:  # types only
    import torch
    from torch import nn

    from medscale.config import RunConfig
    from medscale.data.loader import ShardStream

__all__ = ["Task", "TaskBase", "Figure", "ExportView", "build_task"]


@dataclass(frozen=True)
class Figure:
    """One figure of a report: ``draw(path)`` writes a PNG and returns its path; a string says why it is missing."""

    title: str
    name: str
    draw: Union[Callable[[Path], Path], str]


@dataclass
class ExportView:
    """What `medscale export` writes of a run's weights (`Task.export_view`)."""

    state: dict[str, Any]
    """The tensors, under the names the exported model has."""
    spec: dict[str, Any]
    """The timm call that rebuilds it (`medscale.models.factory.timm_spec`)."""
    metadata: dict[str, str]
    """Extra safetensors metadata."""
    part: str = "model"
    """What was exported (``model``, ``encoder``...)."""
    onnx: bool = True
    """Whether the exported model has outputs an ONNX parity check can compare (logits)."""


class Task(Protocol):
    """One training objective. Instance methods are called on every rank."""

    name: ClassVar[str]
    """The name it was found under (set by `task_class`)."""
    needs_labels: ClassVar[bool]
    """The data must carry a label per sample (streams are built with ``labels=needs_labels``)."""
    config_section: ClassVar[str | None]
    """The run config's top-level key this objective owns (None: none)."""
    Config: ClassVar[type | None]
    """The dataclass of that section."""
    class_names: list[str]
    """Names of the outputs, for the preprocessing record saved with the weights (may be empty)."""

    def __init__(self, cfg: RunConfig, manifest: dict[str, Any]) -> None:
        """Check the shards' manifest against the objective (raise `ConfigError` naming what to change)."""

    def build_model(self) -> nn.Module:
        """The plain model (no DeepSpeed), on the CPU."""

    def loss(self, model: Callable[..., Any], batch: dict[str, Any]) -> torch.Tensor:
        """Scalar loss of one micro-batch already on the model's device (``batch["valid"]`` marks
        samples that count; the others are stand-ins that keep batch shapes equal on every rank)."""

    def predict(self, model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """This rank's outputs for the valid samples of `stream`, which need carry no labels:
        ``keys``, ``patients`` and per-sample outputs (a collective only if the objective says so)."""

    def evaluate(self, model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """Metrics over a whole split, identical on every rank (a collective: all ranks call it)."""

    def flops_per_sample(self) -> float | None:
        """Forward FLOPs of the model on one training sample, for MFU (None: not countable)."""

    def record(self) -> dict[str, Any]:
        """What the objective adds to the preprocessing record saved with the weights (to rebuild the model)."""

    @classmethod
    def model_from_record(cls, record: Mapping[str, Any]) -> nn.Module:
        """The model a preprocessing record describes (weights not loaded)."""

    @classmethod
    def export_view(cls, state: dict[str, Any], record: Mapping[str, Any], part: str | None) -> ExportView:
        """What an export of `part` (None: the objective's default) writes; raise `InputError` for a part it has not."""

    @classmethod
    def report_figures(cls, result: Mapping[str, Any], samples: Mapping[str, Any] | None,
                       samples_file: str) -> list[Figure]:
        """The report's figures of an evaluation result (``samples``: its saved sample images, if any)."""

    @classmethod
    def metrics_html(cls, result: Mapping[str, Any]) -> str:
        """The report's table of an evaluation result."""

    @classmethod
    def wandb_figures(cls, wandb: Any, split: str, result: Mapping[str, Any]) -> dict[str, Any]:
        """W&B charts, tables and images of an evaluation, keyed under ``<split>/``."""


class TaskBase:
    """Defaults an objective may inherit: no config section, no record extras, no FLOPs count, the
    whole model exported as the timm model the record names, a plain metrics table, no figures.

    Only `build_model`, `loss`, `predict` and `evaluate` are left to write (and `needs_labels`).
    """

    name: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = True
    config_section: ClassVar[str | None] = None
    Config: ClassVar[type | None] = None

    def __init__(self, cfg: RunConfig, manifest: dict[str, Any]):
        self.cfg, self.manifest = cfg, manifest
        self.class_names: list[str] = []

    def flops_per_sample(self) -> float | None:
        return None

    def record(self) -> dict[str, Any]:
        return {}

    @classmethod
    def model_from_record(cls, record: Mapping[str, Any]) -> nn.Module:
        from medscale.models.factory import model_from_record

        return model_from_record(record)

    @classmethod
    def export_view(cls, state: dict[str, Any], record: Mapping[str, Any], part: str | None) -> ExportView:
        from medscale.models.factory import timm_spec

        if part not in (None, "model"):
            raise InputError(f"a {cls.name or cls.__name__} run exports its whole model; it has no part {part!r}")
        return ExportView(state, timm_spec(record), {})

    @classmethod
    def report_figures(cls, result: Mapping[str, Any], samples: Mapping[str, Any] | None,
                       samples_file: str) -> list[Figure]:
        return []

    @classmethod
    def metrics_html(cls, result: Mapping[str, Any]) -> str:
        from medscale.report.tables import fmt, table

        rows = [[k, fmt(v)] for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return f"<p>split {fmt(result.get('split'))}</p>" + table(["metric", "value"], rows)

    @classmethod
    def wandb_figures(cls, wandb: Any, split: str, result: Mapping[str, Any]) -> dict[str, Any]:
        return {}


def build_task(cfg: RunConfig, manifest: dict[str, Any]) -> Task:
    """The objective ``cfg.train.objective`` asks for, checked against the shards' manifest.

    Raises:
        ConfigError: an unknown objective, or data that the objective cannot train on (for
            example unlabeled shards for classification); the message says what to change.
    """
    return task_class(cfg.train.objective)(cfg, manifest)
