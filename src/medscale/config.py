"""One typed config tree for a run: defaults < YAML file < dotted command-line overrides.

Every section is a dataclass whose fields carry their own type and a docstring-style comment.
Loading is strict: an unknown key or a value of the wrong type is a `ConfigError` that names
the dotted key and where the value came from (the YAML file or the command line), so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence, TypeVar

import yaml

from medscale.errors import ConfigError
from medscale.tasks.registry import DEFAULT_OBJECTIVE, task_class, task_names

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "DistConfig",
    "EvalConfig",
    "LoggingConfig",
    "CheckpointConfig",
    "RunConfig",
    "load_config",
    "apply_overrides",
    "to_dict",
    "from_dict",
    "save_config",
]

T = TypeVar("T")

log = logging.getLogger("medscale.config")




# ---------------------------------------------------------------------------------------------
# The run config tree
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the shards are and how samples become tensors."""

    _renamed: ClassVar[dict[str, str]] = {"shuffle_buffer": "shuffle_block"}

    shards: str = ""
    """Directory written by `medscale prep` (holds manifest.json)."""
    train_split: str = "train"
    """Manifest split used for training."""
    eval_split: str = "val"
    """Manifest split used for evaluation during training and by `medscale eval` by default."""
    test_split: str = "test"
    """Held-out split evaluated once at the end of training."""
    image_size: int = 224
    """Square side length fed to the model."""
    channels: int = 1
    """Channels fed to the model: grayscale is repeated to this many channels."""
    windows: list[list[float]] = field(default_factory=list)
    """CT windows as [center, width] pairs in modality units (HU); several windows stack as channels."""
    normalize: Literal["window", "minmax", "zscore"] = "minmax"
    """Intensity normalisation when no window applies (window implies windows is set)."""
    num_workers: int = 1
    """Data-loader worker processes per rank."""
    shuffle_block: int = 65536
    """Samples mixed by the shuffle: each epoch permutes the shards, groups them into blocks of whole
    shards holding at least this many samples and permutes the samples inside each block. It sets the
    order, not memory (no buffer is filled); bigger blocks give each rank fewer shards to open.
    Formerly ``shuffle_buffer``, still accepted with a warning."""
    max_corrupt_fraction: float = 0.01
    """Stop training when an epoch's corrupt samples, summed over ranks, exceed this fraction of the split."""
    class_balance: float = 0.0
    """Class-balanced sampling: each epoch draws N samples with weight count(class)**-class_balance
    (0 off, 1 equal classes, 0.5 square root); a multi-label sample counts as its rarest finding."""
    cache_dir: str = ""
    """Node-local directory for remote shards (http, s3, pipe:): each is downloaded once per node."""
    augment: bool = True
    """Training augmentation on or off (off: resize only, as in evaluation)."""
    crop_scale: float = 0.8
    """Random resized crop keeps between this fraction and all of the image area (1 disables)."""
    rotate_degrees: float = 7.0
    """Random rotation range in degrees (0 disables)."""
    translate: float = 0.03
    """Random shift as a fraction of the image size (0 disables)."""
    vflip: bool = False
    """Random vertical flips. Off by default: anatomy has an up and a down."""
    brightness: float = 0.0
    """Random additive brightness in [-b, b] on the [0, 1] image (0 disables)."""
    contrast: float = 0.0
    """Random contrast factor in [1 - c, 1 + c] around the image mean (0 disables)."""
    gamma: float = 0.0
    """Random gamma in [1/(1+g), 1+g], log-uniform (0 disables; not applied to z-scored images)."""
    hflip: bool = False
    """Random horizontal flips. Off by default: laterality matters in chest X-ray and many CTs."""
    transforms_on: Literal["auto", "cpu", "gpu"] = "auto"
    """Where windowing, normalisation and augmentation run: ``cpu`` in the loader workers; ``gpu``
    batched on the model's device (workers only decode and crop); ``auto`` gpu when training on
    CUDA, else cpu. Both give the same images for the same seeds; ``gpu`` without a GPU runs the
    batched transforms on the CPU in the main process."""


@dataclass
class ModelConfig:
    """Which timm model to build. The model knows nothing about DeepSpeed."""

    name: str = "vit_tiny_patch16_224"
    """timm model name (any registered vision model)."""
    num_classes: int = 2
    """Outputs of the classification head."""
    patch_size: int = 0
    """Override the ViT patch size (0 keeps the model's own)."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate."""
    weights: str = ""
    """Local weights file (safetensors or torch checkpoint); never downloaded at run time."""
    grad_checkpointing: bool = False
    """Recompute activations in backward to save memory."""


@dataclass
class TrainConfig:
    """Optimisation. The DeepSpeed JSON gets its batch sizes, clipping and precision from here."""

    _renamed: ClassVar[dict[str, str]] = {"task": "label_kind"}

    objective: str = DEFAULT_OBJECTIVE
    """What the model learns (`medscale.tasks`): ``classification`` of labeled images, ``mae``
    (masked-autoencoder pretraining of the ViT encoder on the images alone; knobs in the ``mae``
    section), an objective another installed package registers (entry-point group
    ``medscale.objectives``), or any class as ``package.module:Class``."""
    label_kind: Literal["multiclass", "multilabel"] = "multiclass"
    """The labels' kind (classification): multiclass, softmax cross-entropy over one label; multilabel,
    sigmoid BCE per finding. Formerly ``train.task``, still accepted with a warning."""
    steps: int = 100
    """Optimizer steps to train for."""
    micro_batch_size: int = 32
    """Samples per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate after warmup."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases, norms, position embeddings, class tokens)."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    label_smoothing: float = 0.0
    """Label smoothing for multiclass cross-entropy."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision; fp16 needs a GPU."""
    compile: bool = False
    """Compile the model with torch.compile (inductor) through DeepSpeed's ``engine.compile()``; the
    module is compiled in place, so weights and checkpoints keep their parameter names. The first
    steps (and the first evaluation) pay the compilation; needs a C/C++ compiler on the machine."""
    seed: int = 0
    """Seed for weights, data order and augmentation."""
    log_every: int = 10
    """Steps between log lines."""
    optimizer: Literal["adamw", "lamb"] = "adamw"
    """AdamW, or LAMB (per-tensor trust ratio: needs whole tensors on each rank, see engine.py)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam/LAMB betas."""
    eps: float = 1e-8
    """Adam/LAMB epsilon."""
    layer_decay: float = 1.0
    """Layer-wise LR decay for fine-tuning: block i of L gets lr x layer_decay^(L - i); 1.0 disables."""
    focal_gamma: float = 0.0
    """Focal loss focusing parameter (softmax focal for multiclass, sigmoid for multilabel); 0 disables."""
    pos_weight: list[float] = field(default_factory=list)
    """Multilabel BCE positive weight per class (empty: none). Exclusive with auto_pos_weight."""
    auto_pos_weight: bool = False
    """Multilabel: positive weight per class = negatives / positives of the training split (manifest counts)."""
    ema_decay: float = 0.0
    """EMA of the weights with this decay per optimizer step (e.g. 0.9998); 0 disables. Under ZeRO-3
    each rank keeps the EMA of its own partition."""
    ema_warmup: bool = True
    """Warm the EMA's decay up (timm's ModelEmaV3): update t uses min(ema_decay, 1 - (1 + t /
    ema_warmup_gamma) ^ -ema_warmup_power), so early evaluations and checkpoint.keep_best see an average
    of recent weights rather than mostly the initial ones."""
    ema_warmup_power: float = 2 / 3
    """Warm-up power: 2/3 (timm's default; decay 0.99 after about 1,000 steps, 0.999 after about 31,600)
    suits long runs, 3/4 shorter ones."""
    ema_warmup_gamma: float = 1.0
    """Warm-up step scale (larger: a slower warm-up)."""
    max_nonfinite: int = 3
    """Stop after this many non-finite losses in a row (each one skips its micro-batch on every rank)."""
    max_overflow_steps: int = 50
    """fp16: stop after this many optimizer steps in a row skipped for gradient overflow."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for model FLOPs utilisation; 0: a built-in table for known GPUs
    (MFU is null on CPU and unknown devices)."""


@dataclass
class DistConfig:
    """How `medscale train` starts processes when it is not already inside a launcher."""

    nproc: int = 1
    """Local ranks to start with the deepspeed launcher (1 runs in-process)."""
    deepspeed_config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON; values set to "auto" are filled from this config."""
    master_port: int | None = None
    """Rendezvous port for the local launcher; unset: a free one, so runs side by side do not collide."""
    timeout_minutes: int = 30
    """Collective timeout: a rank stuck this long fails the run instead of hanging it."""


@dataclass
class EvalConfig:
    """Evaluation on held-out patients."""

    every_steps: int = 0
    """Evaluate on eval_split every N steps (0: only at the end)."""
    micro_batch_size: int = 64
    """Samples per rank per evaluation forward pass."""
    bootstrap: int = 200
    """Bootstrap resamples (by patient) for 95% confidence intervals (0 disables)."""
    at_specificity: float = 0.0
    """If > 0, report sensitivity at this specificity; else at probability threshold 0.5."""
    threshold: float | None = None
    """Fixed probability threshold of the operating point (exclusive with at_specificity); None: 0.5,
    or argmax for multiclass with more than two classes."""
    aggregate: Literal["none", "patient", "study"] = "none"
    """Also report metrics with predictions pooled per patient or per study (``<level>_level`` in the result)."""
    aggregate_how: Literal["mean", "max"] = "mean"
    """How image predictions are pooled per patient/study."""
    use_ema: bool = True
    """Evaluate the EMA weights when train.ema_decay > 0."""


@dataclass
class LoggingConfig:
    """Console and Weights & Biases logging."""

    wandb: bool = False
    """Log to W&B (use WANDB_MODE=offline without network)."""
    project: str = "medscale"
    """W&B project."""
    run_name: str = ""
    """W&B run name (default: the run directory's name)."""
    group: str = ""
    """W&B group (default: WANDB_RUN_GROUP, else the run directory's name: every start and every
    job of a Slurm chain of one run share it)."""


@dataclass
class CheckpointConfig:
    """Where and how often to save. A stop signal (SIGUSR1/USR2/TERM/INT) also saves, then exits 75."""

    every_steps: int = 0
    """Save every N steps (0: only at the end and on a stop signal)."""
    every_minutes: float = 0.0
    """Also save when this many minutes have passed since the last save (0: off); all ranks decide
    together at a step boundary."""
    keep: int = 2
    """Most recent complete checkpoints to keep."""
    keep_best: str = ""
    """Also keep the checkpoint with the best value of this metric of the eval split (e.g. "auroc";
    checkpoints are scored when an evaluation ran at their step, so align eval.every_steps with
    every_steps); "" keeps only the newest."""
    best_mode: Literal["max", "min"] = "max"
    """Whether the best keep_best value is the largest or the smallest."""
    resume: bool = True
    """Continue from the newest complete checkpoint in out_dir/checkpoints when there is one."""


@dataclass
class RunConfig:
    """A whole training run."""

    out_dir: str = "runs/default"
    """Run directory: resolved config, checkpoints, metrics, eval.json."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    objective_config: Any = None
    """The objective's own section (``Task.Config`` of `medscale.tasks.base`), written in YAML under the
    section's key (``mae:``); None for an objective without one. Filled in from the objective's
    defaults when not given."""

    _OBJECTIVE_KEY: ClassVar[str] = "objective_config"

    def __post_init__(self) -> None:
        owner = task_class(self.train.objective)  # an unknown objective fails here, naming the known ones
        if self.objective_config is None and owner.Config is not None:
            self.objective_config = owner.Config()
        if self.train.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.train.steps}")
        for key in ("micro_batch_size", "grad_accum"):
            if getattr(self.train, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self.train, key)}")
        if self.dist.nproc < 1:
            raise ConfigError(f"dist.nproc must be >= 1, got {self.dist.nproc}")
        for i, w in enumerate(self.data.windows):
            if len(w) != 2 or w[1] <= 0:
                raise ConfigError(f"data.windows[{i}] must be [center, width>0], got {w}")
        d = self.data
        if not 0 <= d.max_corrupt_fraction <= 1:
            raise ConfigError(f"data.max_corrupt_fraction must be in [0, 1], got {d.max_corrupt_fraction}")
        if d.class_balance < 0:
            raise ConfigError(f"data.class_balance must be >= 0, got {d.class_balance}")
        if not 0 < d.crop_scale <= 1:
            raise ConfigError(f"data.crop_scale must be in (0, 1], got {d.crop_scale}")
        for key in ("rotate_degrees", "translate", "brightness", "contrast", "gamma"):
            if getattr(d, key) < 0:
                raise ConfigError(f"data.{key} must be >= 0, got {getattr(d, key)}")
        if d.contrast >= 1:
            raise ConfigError(f"data.contrast must be < 1, got {d.contrast}")
        if len(d.windows) > 1 and len(d.windows) != d.channels:
            raise ConfigError(f"data.windows has {len(d.windows)} windows; data.channels must match, got {d.channels}")
        if self.data.normalize == "window" and not self.data.windows:
            raise ConfigError("data.normalize=window needs data.windows, e.g. [[40, 400]]")
        t = self.train
        if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
            raise ConfigError(f"train.betas must be two values in [0, 1), got {t.betas}")
        if not 0 < t.layer_decay <= 1:
            raise ConfigError(f"train.layer_decay must be in (0, 1] (1 disables), got {t.layer_decay}")
        if not 0 <= t.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1) (0 disables), got {t.ema_decay}")
        if t.ema_warmup_power <= 0 or t.ema_warmup_gamma <= 0:
            raise ConfigError(f"train.ema_warmup_power and train.ema_warmup_gamma must be > 0, got "
                              f"{t.ema_warmup_power} and {t.ema_warmup_gamma}")
        if t.focal_gamma < 0:
            raise ConfigError(f"train.focal_gamma must be >= 0, got {t.focal_gamma}")
        if t.pos_weight and t.auto_pos_weight:
            raise ConfigError(f"train.pos_weight={t.pos_weight} and train.auto_pos_weight=true contradict; set one")
        if (t.pos_weight or t.auto_pos_weight) and t.label_kind != "multilabel":
            raise ConfigError(f"train.pos_weight/auto_pos_weight apply to multilabel BCE, but "
                              f"train.label_kind={t.label_kind}")
        if t.pos_weight and len(t.pos_weight) != self.model.num_classes:
            raise ConfigError(f"train.pos_weight has {len(t.pos_weight)} values but model.num_classes="
                              f"{self.model.num_classes}")
        for key in ("max_nonfinite", "max_overflow_steps", "log_every"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
        if self.checkpoint.every_minutes < 0:
            raise ConfigError(f"checkpoint.every_minutes must be >= 0, got {self.checkpoint.every_minutes}")
        if self.checkpoint.keep_best and not self.eval.every_steps:
            raise ConfigError(f"checkpoint.keep_best={self.checkpoint.keep_best!r} ranks checkpoints by evaluations "
                              "during training: set eval.every_steps (a multiple of checkpoint.every_steps)")
        if self.eval.threshold is not None and self.eval.at_specificity:
            raise ConfigError(f"eval.threshold={self.eval.threshold} and eval.at_specificity="
                              f"{self.eval.at_specificity} both set an operating point; set one")


# ---------------------------------------------------------------------------------------------
# Loading machinery
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return `value` checked/converted to `tp`, or raise ConfigError naming key and source."""

    def fail(extra: str = "") -> ConfigError:
        return ConfigError(
            f"config key '{key}' ({source}): expected {_type_name(tp)}, got {value!r}{extra}"
        )

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise fail()
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        for a in args:
            try:
                return _coerce(value, a, key, source)
            except ConfigError:
                continue
        raise fail()
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise fail()
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise fail()
        return {
            _coerce(k, k_tp, key, source): _coerce(v, v_tp, f"{key}.{k}", source)
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise fail()
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" as a string, so floats given that way arrive here.
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    raise TypeError(f"config key '{key}': unsupported field type {tp}")  # a bug in this module, not bad input


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, prefix: str, known: Sequence[str], source: str) -> ConfigError:
    full = f"{prefix}{key}"
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{full}' ({source}){hint}")


def _merge(cls: type[T], base: dict[str, Any], raw: Any, prefix: str, source: str) -> dict[str, Any]:
    """Merge a raw mapping into `base` (a dict of field values for `cls`), checking every key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' ({source}) must be a mapping, got {raw!r}")
    hints = _hints(cls)
    sections = getattr(cls, "_OBJECTIVE_KEY", None)  # RunConfig: other top-level keys may be an objective's section
    names = [f.name for f in dataclasses.fields(cls) if f.name != sections]  # type: ignore[arg-type]
    renamed: dict[str, str] = getattr(cls, "_renamed", {})
    for key, value in raw.items():
        if sections and key not in names:
            # Typed once the objective is known (`_objective_section`): it may be set in a later source.
            base.setdefault(_SECTIONS, []).append((str(key), value, source))
            continue
        if key in renamed:
            new = renamed[key]
            if new in raw:
                raise ConfigError(f"config keys '{prefix}{key}' and '{prefix}{new}' ({source}) are the same setting "
                                  f"under its old and new name; keep '{prefix}{new}'")
            log.warning("config key '%s%s' (%s) is deprecated; it is now '%s%s'", prefix, key, source, prefix, new)
            key = new
        if key not in names:
            raise _unknown_key(str(key), prefix, names, source)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            base[key] = _merge(tp, base[key], value, f"{prefix}{key}.", source)
        else:
            base[key] = _coerce(value, tp, f"{prefix}{key}", source)
    return base


_SECTIONS = "__objective_sections__"  # raw objective sections in a value dict: [(key, value, source), ...]


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (for YAML, JSON, checkpoints, W&B); a run's objective
    section sits under its own key (``mae:``), as it is written in YAML."""
    out = dataclasses.asdict(cfg)
    key = getattr(cfg, "_OBJECTIVE_KEY", None)
    if key is not None:
        section = out.pop(key)
        if section is not None:
                out[task_class(cfg.train.objective).config_section] = section
    return out


def _objective_section(cls: type, values: dict[str, Any]) -> Any:
    """The run's objective section, typed by its objective's ``Config`` from the raw pieces `_merge`
    kept, in the order they came; any other leftover key is an unknown key.

    A section of another built-in objective that holds only its defaults is dropped: configs saved
    by medscale 0.1 carry an ``mae`` section whatever the objective.
    """
    owner = task_class(values["train"]["objective"])
    pieces = values.pop(_SECTIONS, [])
    mine = owner.config_section
    merged = to_dict(owner.Config()) if owner.Config is not None else None
    known = [f.name for f in dataclasses.fields(cls) if f.name != cls._OBJECTIVE_KEY] + ([mine] if mine else [])
    for key, value, source in pieces:
        if key == mine and merged is not None:
            merged = _merge(owner.Config, merged, value, f"{key}.", source)
            continue
        other = _other_objective_with_section(key)
        if other is not None:
            defaults = to_dict(other.Config())
            if _merge(other.Config, dict(defaults), value, f"{key}.", source) == defaults:
                continue  # an old saved config's untouched section of another objective
            raise ConfigError(f"config section '{key}' ({source}) is for train.objective={other.name}, but this run's "
                              f"objective is {values['train']['objective']}")
        raise _unknown_key(key, "", known + _objective_sections(), source)
    return _build(owner.Config, merged) if merged is not None else None


def _objective_sections() -> list[str]:
    """The config sections of every known objective (for an unknown key's suggestion)."""
    out = []
    for name in task_names():
        try:
            section = task_class(name).config_section
        except ConfigError:
            continue
        if section:
            out.append(section)
    return out


def _other_objective_with_section(key: str) -> Any:
    for name in task_names():
        try:
            other = task_class(name)
        except ConfigError:
            continue  # a broken plugin is reported when it is the one asked for
        if other.config_section == key and other.Config is not None:
            return other
    return None


def from_dict(cls: type[T], raw: dict[str, Any], source: str = "dict") -> T:
    """Build `cls` from a nested mapping with the same strict checks as YAML loading."""
    return _build(cls, _merge(cls, to_dict(cls()), raw, "", source))


def _build(cls: type[T], values: dict[str, Any]) -> T:
    hints = _hints(cls)
    kwargs = {}
    sections = getattr(cls, "_OBJECTIVE_KEY", None)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name == sections:
            continue
        tp = hints[f.name]
        kwargs[f.name] = _build(tp, values[f.name]) if dataclasses.is_dataclass(tp) else values[f.name]
    if sections:
        kwargs[sections] = _objective_section(cls, dict(values))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a validator's message about a value; a TypeError here is a bug and keeps its traceback
        raise ConfigError(str(e)) from e


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. train.lr=3e-4)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # let the typed coercion produce the error that names the key
    return key, value


def apply_overrides(cls: type[T], values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a nested value dict, with the same strict checks."""
    for item in overrides:
        key, value = _parse_override(item)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        values = _merge(cls, values, nested, "", f"command line '{item}'")
    return values


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load a config: class defaults, then the YAML file, then dotted overrides.

    Args:
        cls: The root dataclass (RunConfig or PrepConfig).
        path: YAML file, or None for defaults only.
        overrides: Items like ``train.lr=3e-4``.

    Raises:
        ConfigError: unknown keys, wrong types, invalid values, or an unreadable file; the
            message names the dotted key and the file or override it came from.
    """
    values = to_dict(cls())
    if path is not None:
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        values = _merge(cls, values, raw, "", f"file {p}")
    values = apply_overrides(cls, values, overrides)
    return _build(cls, values)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with load_config)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
