"""An objective from outside medscale (tests/plugins/regression, found through the entry-point group
``medscale.objectives``) lives the whole life of a run through the command line: it trains on 2 ranks,
resumes after SIGKILL of the process group to the uninterrupted run's losses, evaluates, exports to
plain timm and appears in the report, with no file under src/medscale naming it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import last_step, losses, subprocess_env, tiny_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "tests" / "plugins" / "regression"
STEPS = 24


def _env() -> dict[str, str]:
    # The plugin's folder holds its module and its dist-info: on PYTHONPATH it is an installed distribution.
    return subprocess_env(PYTHONPATH=os.pathsep.join(filter(None, [str(PLUGIN), os.environ.get("PYTHONPATH", "")])))


def medscale(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medscale.cli", *map(str, args)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_shards) -> Path:
    return tiny_run(tmp_path_factory.mktemp("plugin") / "regression.yaml", tiny_shards, model={"num_classes": 1},
                    train={"objective": "regression", "steps": STEPS, "micro_batch_size": 2, "warmup_steps": 2,
                           "lr": 0.003},
                    regression={"loss": "l1", "scale": 10.0}, dist={"nproc": 2}, checkpoint={"every_steps": 3})


def test_an_outside_objective_trains_resumes_evaluates_exports_and_reports(tmp_path, config):
    whole = tmp_path / "whole"
    r = medscale("train", "--config", config, f"out_dir={whole}")
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads((whole / "preprocess.json").read_text())["objective"] == "regression"
    assert yaml.safe_load((whole / "config.yaml").read_text())["regression"] == {"loss": "l1", "scale": 10.0}
    result = json.loads((whole / "eval.json").read_text())
    assert result["objective"] == "regression" and result["n_samples"] == 12 and result["mse"] >= 0

    # SIGKILL of the process group mid-run, then the same command: the uninterrupted run's losses, bitwise.
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "medscale.cli", "train", "--config", str(config), f"out_dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while last_step(run) < 11:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    r = medscale("train", "--config", config, f"out_dir={run}")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr + r.stdout
    assert losses(run) == losses(whole) and sorted(losses(run)) == list(range(1, STEPS + 1))

    r = medscale("eval", "--run", whole, "--split", "val")
    assert r.returncode == 0, r.stderr[-3000:]
    val = json.loads((whole / "eval_val.json").read_text())
    assert val["objective"] == "regression" and val["n_samples"] == 6 and "pearson_r" in val

    r = medscale("export", whole, "--out", tmp_path / "export")
    assert r.returncode == 0, r.stderr[-3000:]
    code = ("import sys, torch; from medscale.checkpoint.export import load_exported; "
            f"m = load_exported({str(tmp_path / 'export')!r}); print(m(torch.zeros(2, 1, 16, 16)).shape)")
    shown = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert shown.returncode == 0 and "torch.Size([2, 1])" in shown.stdout, shown.stderr[-2000:]
    saved = torch.load(whole / "model.pt", weights_only=True)["model"]
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert all(torch.equal(saved[k], exported[k]) for k in exported) and set(exported) == set(saved)

    r = medscale("report", whole)
    assert r.returncode == 0, r.stderr[-3000:]
    page = (whole / "report" / "report.html").read_text()
    assert "Predicted against true mean intensity" in page and "pearson_r" in page
    assert (whole / "report" / "regression_scatter.png").stat().st_size > 1000


def test_no_file_of_medscale_names_the_outside_objective():
    for path in (ROOT / "src" / "medscale").rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            for word in (b"regression", b"MeanIntensity", b"medscale_regression"):
                assert word not in text, (path, word)


def test_an_outside_objective_by_module_and_class(tmp_path):
    """``train.objective=package.module:Class`` needs no registration at all."""
    code = ("from medscale.tasks.registry import task_class; c = task_class('medscale_regression:MeanIntensity'); "
            "print(c.__name__, c.config_section)")
    env = subprocess_env(PYTHONPATH=str(PLUGIN / "..") + os.pathsep + str(PLUGIN))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["MeanIntensity", "regression"], r.stderr[-2000:]
