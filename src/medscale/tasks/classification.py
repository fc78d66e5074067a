"""``train.objective=classification``: multiclass or multilabel image classification.

Training: softmax cross-entropy over one label (``train.label_kind=multiclass``) or sigmoid BCE per
finding (multilabel), with the focal and positive weights ``train.*`` asks for. Evaluation: every
held-out sample's probabilities gathered once across ranks, then AUROC/AUPRC, sensitivity and
specificity at the operating point, calibration and bootstrap CIs by patient
(`medscale.eval.metrics`), optionally pooled per patient or study, with curve data and the first
few samples of each class as the model saw them. Predictions run on unlabeled streams too. The
report shows ROC, PR, calibration, the confusion matrix and the samples; W&B the same as charts.
"""

from __future__ import annotations

import bisect
import html
import json
import logging
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch
from torch import nn

from medscale.config import ConfigError, EvalConfig, RunConfig
from medscale.data.device import to_device
from medscale.data.loader import ShardStream, make_loader
from medscale.dist import all_gather_objects
from medscale.eval.curves import curve_data
from medscale.eval.gather import gather_split
from medscale.eval.metrics import aggregate_by_group, classification_metrics
from medscale.eval.results import display_image
from medscale.formats.manifest import has_labels
from medscale.logs import Progress, metric_fields
from medscale.tasks.base import Figure, TaskBase

__all__ = ["ClassificationTask", "predict", "evaluate", "SAMPLES_PER_CLASS"]

log = logging.getLogger("medscale.tasks")

SAMPLES_PER_CLASS = 4
"""Sample images kept per class by `evaluate` (the first by sample key, so every run keeps the same)."""
_HEADLINE = ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "ece", "top5_accuracy")


class ClassificationTask(TaskBase):
    """Image classification; evaluated with AUROC/AUPRC and bootstrap CIs."""

    needs_labels: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig, manifest: dict[str, Any]):
        from medscale.tasks.losses import build_loss

        super().__init__(cfg, manifest)
        shards = cfg.data.shards
        if not has_labels(manifest):
            raise ConfigError(
                f"train.objective=classification needs labeled shards, but {shards} holds none (prepped without "
                "a labels CSV): prep again with --labels LABELS.csv (or a recipe's labels_csv / label_from_dir)")
        kind = manifest.get("task", "multiclass")
        if kind != cfg.train.label_kind:
            raise ConfigError(f"train.label_kind={cfg.train.label_kind} but the manifest of {shards} says its labels "
                              f"are {kind}")
        classes = manifest.get("classes") or []
        if classes and len(classes) != cfg.model.num_classes:
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the manifest of {shards} lists "
                              f"{len(classes)} classes {classes[:10]}")
        self.class_names = list(classes)
        self.loss_fn = build_loss(cfg.train, manifest, cfg.data.train_split)

    def build_model(self) -> nn.Module:
        from medscale.models import create_model

        return create_model(self.cfg.model, img_size=self.cfg.data.image_size, in_chans=self.cfg.data.channels)

    def loss(self, model: Callable[[torch.Tensor], torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        return self.loss_fn(model(batch["image"]), batch["target"], batch["valid"])

    def predict(self, model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        return predict(model, stream, dtype, device)

    def evaluate(self, model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        result = evaluate(model, stream, self.cfg.eval, dtype, device, seed=self.cfg.train.seed)
        log.info("eval %s: %s", stream.split, metric_fields(auroc=result.get("auroc"), auprc=result.get("auprc"),
                                                             accuracy=result["accuracy"], n=result["n_samples"]))
        return result

    def flops_per_sample(self) -> float | None:
        from medscale.models.flops import flops_per_sample

        return flops_per_sample(self.cfg.model, in_chans=self.cfg.data.channels, img_size=self.cfg.data.image_size)

    # -- from a saved result ------------------------------------------------------------------------

    @classmethod
    def report_figures(cls, result: Mapping[str, Any], samples: Mapping[str, Any] | None,
                       samples_file: str) -> list[Figure]:
        from medscale.report import figures

        curves = result.get("curves")
        if curves:
            out = [Figure("ROC curves", "roc", lambda p: figures.roc(curves, p)),
                   Figure("Precision-recall curves", "pr", lambda p: figures.pr(curves, p)),
                   Figure("Calibration", "calibration", lambda p: figures.calibration(curves, p)),
                   Figure("Confusion matrix", "confusion", lambda p: figures.confusion(curves, p))]
        else:
            out = [Figure("ROC, PR, calibration, confusion", "", "the result has no curves (written before "
                          "medscale kept them?)")]
        out.append(Figure("Sample images", "samples", (lambda p: figures.sample_grid(samples, p))
                          if samples is not None else f"no {samples_file}"))
        return out

    @classmethod
    def metrics_html(cls, result: Mapping[str, Any]) -> str:
        """Headline metrics with their 95% CIs, then one row per class (CIs and counts at the operating point)."""
        from medscale.report.tables import ci, fmt, table

        cis = result.get("ci95") or {}
        rows = [[m, fmt(result[m]), ci(cis.get(m))] for m in _HEADLINE if m in result]
        rows.append(["samples / patients", f"{result.get('n_samples', '-')} / {result.get('n_patients', '-')}", ""])
        boot = result.get("bootstrap")
        unit = f" ({boot['n']} bootstrap resamples by {boot['unit']})" if boot else " (no bootstrap)"
        out = [f"<p>split {fmt(result.get('split'))}, operating point "
               f"{html.escape(json.dumps(result.get('operating_point', {})))}{unit}</p>",
               table(["metric", "value", "95% CI"], rows)]
        per = result.get("per_class") or {}
        conf = {name: d["confusion"] for name, d in ((result.get("curves") or {}).get("per_class") or {}).items()}
        if per:
            prow = []
            for name, d in per.items():
                c = d.get("ci95") or {}
                tn_fp_fn_tp = " / ".join(str(x) for pair in conf[name] for x in pair) if name in conf else "-"
                prow.append([html.escape(name), fmt(d.get("auroc")), ci(c.get("auroc")), fmt(d.get("auprc")),
                             ci(c.get("auprc")), fmt(d.get("sensitivity")), fmt(d.get("specificity")),
                             fmt(d.get("threshold")), fmt(d.get("n_pos")), tn_fp_fn_tp])
            out.append(table(["class", "auroc", "95% CI", "auprc", "95% CI", "sensitivity", "specificity",
                              "threshold", "positives", "tn / fp / fn / tp"], prow))
        return "\n".join(out)

    @classmethod
    def wandb_figures(cls, wandb: Any, split: str, result: Mapping[str, Any]) -> dict[str, Any]:
        """Per class ROC and precision-recall curves (medscale's own points, at most a few hundred per
        curve: W&B's built-in ROC plot is multi-class only and subsamples to 10k rows), the confusion
        matrix at the operating point, the reliability curve, and the sample images with label,
        prediction and probability."""
        out: dict[str, Any] = {}
        curves, samples = result.get("curves"), result.get("samples")
        if curves:
            for kind, x, y in (("roc", "fpr", "tpr"), ("pr", "recall", "precision")):
                rows = [[name, a, b] for name, c in curves["per_class"].items() for a, b in zip(c[kind][x], c[kind][y])]
                if rows:
                    data = wandb.Table(columns=["class", x, y], data=rows)
                    out[f"{split}/{kind}_curve"] = wandb.plot.line(data, x, y, stroke="class",
                                                                   title=f"{split} {kind.upper()} per class")
            conf = curves.get("confusion")
            if conf:
                labels = conf["labels"]
                out[f"{split}/confusion_matrix"] = wandb.Table(
                    columns=["true", "predicted", "count"],
                    data=[[labels[i], labels[j], int(n)] for i, row in enumerate(conf["matrix"]) for j, n in enumerate(row)])
            else:  # multi-label: one 2x2 table per finding
                out[f"{split}/confusion_matrix"] = wandb.Table(
                    columns=["finding", "tn", "fp", "fn", "tp"],
                    data=[[name, *map(int, sum(c["confusion"], []))] for name, c in curves["per_class"].items()])
            cal = curves.get("calibration") or {}
            if cal.get("confidence"):
                data = wandb.Table(columns=["confidence", "accuracy", "count"],
                                   data=[list(r) for r in zip(cal["confidence"], cal["accuracy"], cal["count"])])
                out[f"{split}/calibration"] = wandb.plot.line(data, "confidence", "accuracy", title=f"{split} reliability")
        if samples:
            out[f"{split}/samples"] = wandb.Table(
                columns=["image", "label", "prediction", "probability"],
                data=[[wandb.Image(x["image"]), x["label"], x["pred"], float(x["prob"])] for x in samples])
            # The same images as a captioned media panel: offline, a table's images live only in its
            # artifact until `wandb sync`; these are written as PNG files into the run folder at once.
            out[f"{split}/sample_images"] = [
                wandb.Image(x["image"], caption=f"{x['label']} -> {x['pred']} ({float(x['prob']):.2f})") for x in samples]
        return out


# -------------------------------------------------------------------------------------------------
# Predictions and evaluation
# -------------------------------------------------------------------------------------------------


class _Candidates:
    """This rank's first `per_class` samples of each class by key: only those can be the split's first.

    Holding a few per class (not every image) keeps memory and the gather small whatever the split size.
    """

    def __init__(self, per_class: int):
        self.per_class = per_class
        self.by_class: dict[int, list[str]] = {}
        self.images: dict[str, np.ndarray] = {}

    def offer(self, key: str, classes: list[int], image: torch.Tensor) -> None:
        took = False
        for c in classes:
            keys = self.by_class.setdefault(c, [])
            if len(keys) < self.per_class or key < keys[-1]:
                bisect.insort(keys, key)
                del keys[self.per_class:]
                took = took or key in keys
        if took and key not in self.images:
            self.images[key] = display_image(image)

    def prune(self) -> None:
        kept = {k for keys in self.by_class.values() for k in keys}
        self.images = {k: v for k, v in self.images.items() if k in kept}


@torch.no_grad()
def predict(model: Any, stream: ShardStream, dtype: torch.dtype, device: torch.device,
            samples_per_class: int = 0) -> dict[str, Any]:
    """This rank's class probabilities for the valid samples of `stream` (all ranks must call it).

    ``keys``, ``patients``, ``studies`` (None when the loader passes none) and ``probs`` always;
    ``targets`` only when the stream carries labels (an unlabeled stream predicts all the same).
    With `samples_per_class` (labeled streams), ``sample_images`` maps the keys of this rank's first
    samples of each (true) class to their model input as `display_image`; without, it is empty.
    """
    was_training = model.training
    model.eval()
    keys: list[str] = []
    patients: list[str] = []
    studies: list[str] | None = []
    probs, targets = [], []
    corrupt_before = stream.corrupt_count
    candidates = _Candidates(samples_per_class)
    bar = Progress(stream.batches_per_epoch(), desc=f"eval {stream.split}", unit="batch", enabled=stream.rank == 0)
    for batch in make_loader(stream, device):
        bar.update()
        image = to_device(batch, device, dtype)["image"]  # on data.transforms_on=gpu, transformed there
        logits = model(image).float()
        p = torch.sigmoid(logits) if stream.task == "multilabel" else torch.softmax(logits, dim=-1)
        valid = batch["valid"]
        mask = valid.tolist()
        probs.append(p.cpu()[valid])
        if "target" in batch:
            targets.append(batch["target"][valid])
        keys += [k for k, v in zip(batch["key"], mask) if v]
        patients += [k for k, v in zip(batch["patient"], mask) if v]
        if studies is not None and "study" in batch:
            studies += [k for k, v in zip(batch["study"], mask) if v]
        else:
            studies = None  # the loader does not pass study ids
        if samples_per_class and "target" in batch:
            target = batch["target"]
            for i in np.flatnonzero(mask):
                classes = target[i].nonzero().flatten().tolist() if target.ndim == 2 else [int(target[i])]
                candidates.offer(batch["key"][i], classes, image[i])
            candidates.prune()
    bar.close()
    model.train(was_training)
    out = {"keys": keys, "patients": patients, "studies": studies, "corrupt": stream.corrupt_count - corrupt_before,
           "sample_images": candidates.images,
           "probs": torch.cat(probs).numpy() if probs else np.zeros((0, 0), np.float32)}
    if stream.labels:
        out["targets"] = torch.cat(targets).numpy() if targets else np.zeros((0,), np.int64)
    return out


def evaluate(model: Any, stream: ShardStream, cfg: EvalConfig, dtype: torch.dtype,
             device: torch.device, seed: int = 0, samples_per_class: int = SAMPLES_PER_CLASS) -> dict[str, Any]:
    """Metrics over the whole split, identical on every rank (all ranks must call it).

    Besides the metrics of `classification_metrics`, ``curves`` holds `curve_data` at the operating
    threshold and ``samples`` the first `samples_per_class` samples of each class by key, as
    ``{"image": uint8 array, "label": str, "pred": str, "prob": float}`` (see `_samples`).

    Corrupt samples (undecodable; the loader logs each and passes padding in their place) are
    left out of the metrics and reported as ``corrupt_samples``, up to the stream's limit
    (``data.max_corrupt_fraction`` of the split). `seed` seeds the bootstrap.

    Raises:
        RunStateError: the ranks together saw another number of distinct samples than the
            manifest holds for the split, corrupt ones included (a loader bug must not hide in
            the metrics).
        CorruptShards: more corrupt samples than ``data.max_corrupt_fraction`` allows.
    """
    mine = predict(model, stream, dtype, device, samples_per_class)
    images = mine.pop("sample_images")  # only the chosen few travel, in a second gather below
    mine["sample_keys"] = list(images)
    parts = all_gather_objects(mine)
    split = gather_split(parts, stream)
    have_studies = all(part["studies"] is not None for part in parts)
    probs = [parts[j]["probs"][i] for j, i in split.rows]
    targets = [parts[j]["targets"][i] for j, i in split.rows]
    patients = [parts[j]["patients"][i] for j, i in split.rows]
    studies = [parts[j]["studies"][i] for j, i in split.rows] if have_studies else []
    seen = split.keys
    p, t = np.stack(probs), np.stack(targets)
    options = dict(task=stream.task, class_names=stream.manifest.get("classes") or None,
                   threshold=cfg.threshold, at_specificity=cfg.at_specificity or None, n_bootstrap=cfg.bootstrap,
                   seed=seed)
    result = classification_metrics(p, t, groups=patients, **options)
    result.update({"split": stream.split, "n_patients": len(set(patients)), "duplicates_dropped": split.duplicates,
                   "expected_samples": stream.samples, "corrupt_samples": split.corrupt})
    names = list(result["per_class"])
    # The curves' operating points are the metrics': a common threshold, argmax, or per class at a specificity.
    thresholds = [result["per_class"][n]["threshold"] for n in names] if cfg.at_specificity else None
    result["curves"] = curve_data(p, t, task=stream.task, class_names=names, class_thresholds=thresholds,
                                  threshold=result["operating_point"].get("threshold"))
    candidates = {k for part in parts for k in part["sample_keys"]}
    rows = {k: i for i, k in enumerate(seen) if k in candidates}  # seen: keys in the order of p and t
    result["samples"] = _samples(rows, p, t, result, images, samples_per_class)
    if cfg.aggregate != "none":
        if cfg.aggregate == "study" and not have_studies:
            raise ConfigError("eval.aggregate=study needs a study id per sample, and the loader passes none; "
                              "use eval.aggregate=patient")
        groups = studies if cfg.aggregate == "study" else patients
        pooled, pooled_t, names = pool(p, t, groups, stream.task, cfg.aggregate, cfg.aggregate_how)
        level = classification_metrics(pooled, pooled_t, **options)  # each group is its own bootstrap unit
        level.update({"n_groups": len(names), "pooling": cfg.aggregate_how})
        result[f"{cfg.aggregate}_level"] = level
    return result


def _samples(row: dict[str, int], probs: np.ndarray, targets: np.ndarray, result: dict[str, Any],
             images: dict[str, np.ndarray], per_class: int) -> list[dict[str, Any]]:
    """The first `per_class` samples of each class by key, chosen from the ranks' candidates (`row`:
    key -> row of probs/targets) and gathered with this rank's `images`; no key or id is kept.

    Multiclass: ``label`` is the true class, ``pred`` the decision of the operating point (class 1 at
    its threshold for a binary task, else argmax) and ``prob`` its probability. Multilabel: a sample
    is shown for each finding it has: ``label`` is that finding, ``pred`` the finding or "not
    <finding>" at its threshold, ``prob`` the finding's probability. Every rank must call it.
    """
    names = list(result["per_class"])
    thr = [result["per_class"][n]["threshold"] for n in names]
    multilabel = result["task"] == "multilabel"
    chosen = []
    for c in range(len(names)):
        has = [k for k in row if (targets[row[k], c] if multilabel else targets[row[k]] == c)]
        chosen += [(c, k) for k in sorted(has)[:per_class]]
    wanted = {k for _, k in chosen}
    shown: dict[str, np.ndarray] = {}
    for part in all_gather_objects({k: v for k, v in images.items() if k in wanted}):
        shown.update(part)
    out = []
    for c, key in chosen:
        p = probs[row[key]]
        if multilabel:
            called = thr[c] is not None and p[c] >= thr[c]
            label, pred, prob = names[c], names[c] if called else f"not {names[c]}", p[c]
        else:
            k = int(p[1] >= thr[1]) if len(names) == 2 and thr[1] is not None else int(p.argmax())
            label, pred, prob = names[c], names[k], p[k]
        out.append({"image": shown[key], "label": label, "pred": pred, "prob": float(prob)})
    return out


def pool(probs: np.ndarray, targets: np.ndarray, groups: list[str], task: str, level: str,
         how: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Predictions pooled per group. A binary task's group is positive if any of its images is."""
    binary = task == "multiclass" and probs.shape[1] == 2
    t = np.eye(2, dtype=np.int64)[targets] if binary else targets  # one-hot: pooled as "any positive"
    try:
        pooled, pooled_t, names = aggregate_by_group(probs, t, groups, how=how)
    except ValueError as e:
        raise ConfigError(f"eval.aggregate={level}: {e}; {level}-level metrics need one label per {level} "
                          "(or a binary or multilabel task)") from e
    return pooled, (pooled_t[:, 1] if binary else pooled_t), names
