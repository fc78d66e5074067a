"""Curve data and sample images of an evaluation, and the run report drawn from them."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
import numpy as np
import pytest
import torch

from medscale.config import RunConfig, from_dict, save_config
from medscale.data.loader import ShardStream, make_loader
from medscale.errors import InputNotFound
from medscale.tasks import classification as evaluate_module
from medscale.eval.curves import MAX_POINTS, curve_data, subsample_curve
from medscale.eval.results import display_image, samples_path, save_result
from medscale.tasks.classification import evaluate, predict
from medscale.eval.metrics import average_precision, classification_metrics, roc_auc
from medscale.report import figures
from medscale.report.html import write_report


def _multiclass(n: int = 2000, c: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), t] += 1.0
    p = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 2)  # rounded: many ties
    return p / p.sum(1, keepdims=True), t


# -- curves ---------------------------------------------------------------------------------------


def test_curve_areas_agree_with_the_metrics_also_with_ties():
    p, t = _multiclass()
    curves = curve_data(p, t, task="multiclass", class_names=["a", "b", "c"])
    metrics = classification_metrics(p, t, task="multiclass", class_names=["a", "b", "c"])
    for k, name in enumerate("abc"):
        d = curves["per_class"][name]
        assert d["auroc"] == pytest.approx(roc_auc(t == k, p[:, k]), abs=1e-12)
        assert d["auprc"] == pytest.approx(average_precision(t == k, p[:, k]), abs=1e-12)
        assert d["auroc"] == pytest.approx(metrics["per_class"][name]["auroc"], abs=1e-12)
        assert sum(map(sum, d["confusion"])) == len(t)
    ml_t = (np.random.default_rng(1).random((500, 4)) < 0.3).astype(int)
    ml_p = np.clip(0.5 * ml_t + np.random.default_rng(2).random((500, 4)) * 0.6, 0, 1).round(2)
    ml = curve_data(ml_p, ml_t, task="multilabel")
    for k in range(4):
        assert ml["per_class"][str(k)]["auroc"] == pytest.approx(roc_auc(ml_t[:, k], ml_p[:, k]), abs=1e-12)
        assert ml["per_class"][str(k)]["auprc"] == pytest.approx(average_precision(ml_t[:, k], ml_p[:, k]), abs=1e-12)


def test_operating_point_and_confusion_at_the_threshold():
    p, t = _multiclass(c=2, seed=3)
    curves = curve_data(p, t, task="multiclass", class_names=["normal", "lesion"], threshold=0.3)
    d = curves["per_class"]["lesion"]
    pred, y = p[:, 1] >= 0.3, t == 1
    tp, fp, fn, tn = (int(x.sum()) for x in (pred & y, pred & ~y, ~pred & y, ~pred & ~y))
    assert d["confusion"] == [[tn, fp], [fn, tp]]
    assert d["operating_point"] == {"fpr": fp / (fp + tn), "tpr": tp / (tp + fn), "precision": tp / (tp + fp),
                                    "recall": tp / (tp + fn)}
    assert curves["threshold"] == 0.3
    assert curves["confusion"]["matrix"] == np.bincount(t * 2 + p.argmax(1), minlength=4).reshape(2, 2).tolist()
    metrics = classification_metrics(p, t, task="multiclass", threshold=0.3)
    assert d["operating_point"]["tpr"] == pytest.approx(metrics["sensitivity"])


@pytest.mark.parametrize("mode", [{}, {"threshold": 0.3}, {"at_specificity": 0.8}])
def test_operating_points_are_the_metrics_decision(mode):
    """Argmax (3 classes, no threshold), a common threshold, or per class at a specificity: the curves'
    operating points are where the metrics' sensitivity and specificity are."""
    p, t = _multiclass(c=3, seed=6)
    metrics = classification_metrics(p, t, task="multiclass", **mode)
    thresholds = [d["threshold"] for d in metrics["per_class"].values()] if "at_specificity" in mode else None
    curves = curve_data(p, t, task="multiclass", threshold=metrics["operating_point"].get("threshold"),
                        class_thresholds=thresholds)
    assert curves["threshold"] == mode.get("threshold")
    for name, d in curves["per_class"].items():
        assert d["operating_point"]["tpr"] == pytest.approx(metrics["per_class"][name]["sensitivity"])
        assert 1 - d["operating_point"]["fpr"] == pytest.approx(metrics["per_class"][name]["specificity"])


def test_degenerate_classes_get_empty_curves_not_a_crash():
    t = np.array([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 0]])
    p = np.array([[0.1, 0.9, 0.8], [0.2, 0.7, 0.1], [0.6, 0.8, 0.6], [0.3, 0.4, 0.5]])
    curves = curve_data(p, t, task="multilabel", class_names=["none_pos", "all_pos", "ok"])
    for name in ("none_pos", "all_pos"):
        d = curves["per_class"][name]
        assert d["roc"] == {"fpr": [], "tpr": []} and d["pr"] == {"precision": [], "recall": []}
        assert d["auroc"] is None and d["auprc"] is None
        assert sum(map(sum, d["confusion"])) == 4
    assert curves["per_class"]["none_pos"]["operating_point"]["tpr"] is None
    assert curves["per_class"]["all_pos"]["operating_point"]["fpr"] is None
    assert curves["per_class"]["ok"]["auroc"] == 1.0
    # a multiclass class that never occurs, and per-class thresholds with one undefined (predicts nothing)
    mc = curve_data(np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]]), np.array([0, 1]), task="multiclass",
                    class_thresholds=[0.5, 0.5, None])
    assert mc["per_class"]["2"]["auroc"] is None and mc["per_class"]["2"]["confusion"] == [[2, 0], [0, 0]]
    json.dumps(curves), json.dumps(mc)


def test_curves_are_subsampled_keeping_ends_and_shape():
    rng = np.random.default_rng(0)
    n = 50_000
    t = rng.integers(0, 2, n)
    p1 = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * t)))
    p = np.c_[1 - p1, p1]
    curves = curve_data(p, t, task="multiclass")
    d = curves["per_class"]["1"]
    fpr, tpr = np.array(d["roc"]["fpr"]), np.array(d["roc"]["tpr"])
    assert 100 < fpr.size <= MAX_POINTS and np.array(d["pr"]["recall"]).size <= MAX_POINTS
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert d["pr"]["recall"][0] == 0.0 and d["pr"]["recall"][-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # the kept points still trace the curve: their area is the exact one to 1e-3
    assert np.trapezoid(tpr, fpr) == pytest.approx(d["auroc"], abs=1e-3)
    # points inside a straight run are dropped exactly; short curves are kept whole
    x, y = subsample_curve(np.array([0, 0, 0, 0.5, 1.0]), np.array([0, 0.5, 1.0, 1.0, 1.0]))
    assert x.tolist() == [0, 0, 1.0] and y.tolist() == [0, 1.0, 1.0]
    with pytest.raises(ValueError, match="max_points"):
        subsample_curve(x, y, 1)


def test_multilabel_curve_shape():
    t = (np.random.default_rng(4).random((300, 3)) < 0.4).astype(int)
    p = np.random.default_rng(5).random((300, 3))
    curves = curve_data(p, t, task="multilabel", class_names=["effusion", "mass", "nodule"], threshold=0.4)
    assert set(curves) == {"task", "classes", "threshold", "per_class", "confusion", "calibration"}
    assert curves["task"] == "multilabel" and curves["classes"] == ["effusion", "mass", "nodule"]
    assert curves["confusion"] is None
    cal = curves["calibration"]
    assert sum(cal["count"]) == 900 and cal["bins"] == 15  # every (sample, finding) pair
    assert len(cal["confidence"]) == len(cal["accuracy"]) == len(cal["count"]) <= cal["bins"]
    for d in curves["per_class"].values():
        assert set(d) == {"roc", "pr", "auroc", "auprc", "operating_point", "confusion"}
        assert set(d["operating_point"]) == {"fpr", "tpr", "precision", "recall"}
    assert json.loads(json.dumps(curves)) == curves  # plain JSON types only


# -- evaluation of a real tiny stream -------------------------------------------------------------


def _stream(shards: Path, run: RunConfig, rank: int = 0, world: int = 1) -> ShardStream:
    return ShardStream(str(shards), "test", run.data, micro_batch=4, rank=rank, world=world, train=False)


def _run_cfg(bootstrap: int = 0) -> RunConfig:
    return from_dict(RunConfig, {"data": {"image_size": 16, "channels": 1, "num_workers": 0},
                                 "eval": {"bootstrap": bootstrap}})


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 2))


@pytest.fixture
def evaluated(shard_factory):
    """A tiny two-class split (9 + 8 samples), evaluated by the real code with a bootstrap."""
    manifest, shards = shard_factory({"test": [9, 8]}, classes=("normal", "lesion"))
    run = _run_cfg(bootstrap=20)
    result = evaluate(_model(), _stream(shards, run), run.eval, torch.float32, torch.device("cpu"))
    return result, shards, run


def test_eval_of_a_tiny_stream_keeps_curves_and_the_first_samples_by_key(evaluated):
    result, shards, run = evaluated
    assert result["n_samples"] == 17 and result["curves"]["classes"] == ["normal", "lesion"]
    assert result["curves"]["per_class"]["lesion"]["auroc"] == pytest.approx(result["auroc"])
    assert result["curves"]["per_class"]["lesion"]["operating_point"]["tpr"] == pytest.approx(result["sensitivity"])
    # expected: the first 4 keys of each true class, each image as the loader hands it to the model
    seen: dict[str, tuple[int, torch.Tensor]] = {}
    for batch in make_loader(_stream(shards, run)):
        for i, key in enumerate(batch["key"]):
            if batch["valid"][i]:
                seen[key] = (int(batch["target"][i]), batch["image"][i].clone())
    expected = [(c, k) for c in (0, 1) for k in sorted(k for k, (tc, _) in seen.items() if tc == c)[:4]]
    samples = result["samples"]
    assert len(samples) == len(expected) == 8
    for s, (c, key) in zip(samples, expected):
        assert set(s) == {"image", "label", "pred", "prob"}
        assert s["image"].dtype == np.uint8 and s["image"].shape == (16, 16)
        assert s["image"].min() == 0 and s["image"].max() == 255  # min-max scaled
        np.testing.assert_array_equal(s["image"], display_image(seen[key][1]))
        assert s["label"] == ["normal", "lesion"][c] and s["pred"] in ("normal", "lesion")
        assert 0.5 <= s["prob"] <= 1.0  # the probability of the class predicted at threshold 0.5
    # no sample key or patient id anywhere in what is kept
    ids = set(seen) | {f"p{i}" for i in range(10)}
    kept = [v for s in samples for v in s.values() if isinstance(v, str)]
    assert not ids & set(kept) and not any(i in repr(samples) for i in seen)


def test_save_result_writes_curves_to_json_and_images_to_npz(evaluated, tmp_path):
    result = evaluated[0]
    path = save_result(result, tmp_path / "eval.json")
    saved = json.loads(path.read_text())
    assert "samples" not in saved and saved["curves"] == result["curves"]
    assert {k: v for k, v in saved.items() if k != "curves"} == \
        json.loads(json.dumps({k: v for k, v in result.items() if k not in ("curves", "samples")}))
    assert samples_path(path) == tmp_path / "eval_samples.npz"
    with np.load(samples_path(path), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["images", "labels", "preds", "probs"]
        assert npz["images"].shape == (8, 16, 16) and npz["images"].dtype == np.uint8
        assert npz["labels"].tolist() == [s["label"] for s in result["samples"]]


def test_samples_are_chosen_across_ranks_as_on_one(shard_factory, monkeypatch):
    """Two ranks (gathers simulated): each keeps its own first few, the choice equals one rank's."""
    _, shards = shard_factory({"test": [9, 8]})
    run = _run_cfg()
    one = evaluate(_model(), _stream(shards, run), run.eval, torch.float32, torch.device("cpu"), samples_per_class=3)
    other = predict(_model(), _stream(shards, run, rank=1, world=2), torch.float32, torch.device("cpu"), 3)
    other_images = other.pop("sample_images")
    other["sample_keys"] = list(other_images)
    assert 0 < len(other_images) <= 6
    replies = iter([other, other_images])  # rank 1's part of the first gather, then of the image gather
    monkeypatch.setattr(evaluate_module, "all_gather_objects", lambda obj: [obj, next(replies)])
    two = evaluate(_model(), _stream(shards, run, rank=0, world=2), run.eval, torch.float32, torch.device("cpu"),
                   samples_per_class=3)
    assert len(two["samples"]) == len(one["samples"]) == 6
    for a, b in zip(one["samples"], two["samples"]):
        assert (a["label"], a["pred"]) == (b["label"], b["pred"]) and a["prob"] == pytest.approx(b["prob"], abs=1e-6)
        np.testing.assert_array_equal(a["image"], b["image"])


# -- the report -----------------------------------------------------------------------------------


def _write_metrics(run_dir: Path, evals: bool = True, torn: bool = False) -> None:
    rows = []
    for step in range(1, 21):
        rows.append({"step": step, "time": 1000.0 + step, "train/loss": 1.0 / step, "train/lr": 1e-3 * min(1, step / 5),
                     "train/samples_per_s": 50.0 + step % 3, "train/data_wait_frac": 0.1 + 0.01 * (step % 4)})
        if evals and step % 10 == 0:
            rows.append({"step": step, "time": 1000.5 + step, "val/auroc": 0.6 + step / 100, "val/accuracy": 0.7,
                         "val/n_samples": 17})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run_dir / "metrics.jsonl").write_text(text + ('{"step": 21, "ti' if torn else ""))


def _check_png(path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size, (path.name, im.size)
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 1, f"{path.name} is blank"


def test_write_report_draws_every_figure_and_embeds_them(evaluated, tmp_path):
    result, _, run = evaluated
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(run, run_dir / "config.yaml")
    _write_metrics(run_dir, torn=True)
    save_result(result, run_dir / "eval.json")

    page = write_report(run_dir)
    assert page == run_dir / "report" / "report.html"
    pngs = {p.stem: p for p in page.parent.glob("*.png")}
    assert set(pngs) == {*figures.SIZES, "samples"}
    for name, path in pngs.items():
        size = figures.sample_grid_size(8) if name == "samples" else tuple(round(x * figures.DPI)
                                                                            for x in figures.SIZES[name])
        _check_png(path, size)
    text = page.read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert sorted(base64.b64decode(u) for u in uris) == sorted(p.read_bytes() for p in pngs.values())
    bare = re.sub(r"base64,[A-Za-z0-9+/=]+", "", text)  # self-contained: nothing fetched from elsewhere
    assert not re.search(r'(src|href)="(?!data:)', bare) and not re.search(r"https?:|url\(|@import", bare)
    # the metrics table with the bootstrap CIs of eval.json, and the per-class rows
    lo, hi = result["ci95"]["auroc"]
    assert f"<td>auroc</td><td>{result['auroc']:.4f}</td><td>[{lo:.4f}, {hi:.4f}]</td>" in text
    assert "<td>lesion</td>" in text and "95% CI" in text
    assert "1 lines are not JSON" in text  # the torn last line is reported, not fatal
    assert "data.image_size" not in text and "image_size: 16" in text  # the config as written


def test_write_report_skips_figures_whose_inputs_are_missing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _write_metrics(run_dir, evals=False)
    out = write_report(run_dir, tmp_path / "out")
    assert out == tmp_path / "out" / "report.html"
    assert {p.stem for p in out.parent.glob("*.png")} == {"loss_lr", "throughput"}
    text = out.read_text()
    assert text.count("data:image/png;base64,") == 2
    assert "skipped: no evaluation rows" in text and "no evaluation result" in text
    # a multilabel evaluation without sample images: no confusion matrix, no sample grid, still a report
    t = (np.random.default_rng(0).random((40, 2)) < 0.5).astype(int)
    p = np.random.default_rng(1).random((40, 2))
    result = classification_metrics(p, t, task="multilabel", class_names=["a", "b"])
    result["curves"] = curve_data(p, t, task="multilabel", class_names=["a", "b"])
    save_result(result, run_dir / "eval.json")
    text = write_report(run_dir).read_text()
    assert "skipped: a multilabel task has no K x K confusion matrix" in text
    assert f"skipped: no {run_dir / 'eval_samples.npz'}" in text
    assert text.count("data:image/png;base64,") == 5  # loss_lr, throughput, roc, pr, calibration
    with pytest.raises(InputNotFound, match="nowhere"):
        write_report(tmp_path / "nowhere")
