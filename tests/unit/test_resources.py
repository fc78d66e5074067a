"""Packaged configs, DeepSpeed JSON and recipes resolve from any directory, in a checkout and in a wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from medscale.config import RunConfig, load_config
from medscale.errors import InputNotFound, UserError
from medscale.prep.config import PrepConfig
from medscale.resources import RESOURCE_DIRS, packaged_dir, packaged_names, resolve_resource

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {"configs": "*.yaml", "ds_configs": "*.json", "data_prep": "*.yaml"}


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A current directory outside the checkout, with nothing in it."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_checkout_directories_are_the_packaged_ones():
    # README commands (`--config configs/demo.yaml`) run in a checkout reach the same files a wheel ships.
    for kind in RESOURCE_DIRS:
        assert (ROOT / kind).resolve() == packaged_dir(kind), kind
        assert packaged_names(kind) == sorted(p.name for p in (ROOT / kind).iterdir() if p.is_file())
    assert "demo.yaml" in packaged_names("configs") and "zero2.json" in packaged_names("ds_configs")
    assert "demo.yaml" in packaged_names("data_prep")


def test_packaged_demo_config_and_its_deepspeed_config_resolve_from_elsewhere(elsewhere):
    from medscale.train.engine import resolve_ds_config

    path = resolve_resource("configs/demo.yaml", "configs", "--config")
    assert path == packaged_dir("configs") / "demo.yaml" and path.is_file()
    cfg = load_config(RunConfig, path)
    assert cfg.dist.deepspeed_config == "ds_configs/zero2.json"  # relative: no cwd holds it here
    ds = resolve_ds_config(cfg, world=2)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 2
    assert ds["zero_optimization"]["stage"] == 2


def test_every_shipped_name_resolves_from_elsewhere(elsewhere):
    for kind in RESOURCE_DIRS:
        for name in packaged_names(kind):
            for spelling in (f"{kind}/{name}", f"./{kind}/{name}", name):
                assert resolve_resource(spelling, kind) == packaged_dir(kind) / name, spelling
    for name in packaged_names("configs"):
        cfg = load_config(RunConfig, resolve_resource(f"configs/{name}"))
        assert resolve_resource(cfg.dist.deepspeed_config).is_file()
    for name in packaged_names("data_prep"):
        load_config(PrepConfig, resolve_resource(f"data_prep/{name}"))


def test_an_existing_path_is_used_as_given(elsewhere):
    own = elsewhere / "configs"
    own.mkdir()
    (own / "demo.yaml").write_text("train: {steps: 3}\n")
    assert resolve_resource("configs/demo.yaml", "configs") == Path("configs/demo.yaml")
    assert load_config(RunConfig, resolve_resource("configs/demo.yaml")).train.steps == 3
    absolute = own / "demo.yaml"
    assert resolve_resource(absolute) == absolute


def test_unknown_name_names_the_path_the_places_and_the_packaged_files(elsewhere):
    with pytest.raises(InputNotFound) as e:
        resolve_resource("configs/dmeo.yaml", "configs", "--config")
    msg = str(e.value)
    assert "--config configs/dmeo.yaml" in msg
    assert str(elsewhere / "configs" / "dmeo.yaml") in msg  # the current directory, looked in first
    assert str(packaged_dir("configs") / "dmeo.yaml") in msg  # then the packaged copy
    assert "demo.yaml" in msg and "chestxray14_vit_base.yaml" in msg  # what does exist
    assert isinstance(e.value, UserError) and isinstance(e.value, FileNotFoundError)

    with pytest.raises(InputNotFound, match="dist.deepspeed_config ds_configs/zero9.json.*zero2.json"):
        resolve_resource("ds_configs/zero9.json", what="dist.deepspeed_config")
    with pytest.raises(InputNotFound, match="packaged data_prep: .*nih_chestxray14.yaml"):
        resolve_resource("nope.yaml", "data_prep", "--recipe")
    # An absolute path or one outside the packaged directories has no packaged copy to look for.
    with pytest.raises(InputNotFound) as e:
        resolve_resource(elsewhere / "missing.yaml")
    assert "(packaged)" not in str(e.value) and str(elsewhere / "missing.yaml") in str(e.value)


def test_deepspeed_config_that_exists_nowhere_is_a_user_error(elsewhere):
    from medscale.train.engine import resolve_ds_config

    cfg = load_config(RunConfig, resolve_resource("configs/demo.yaml"), ["dist.deepspeed_config=ds_configs/zero7.json"])
    with pytest.raises(InputNotFound, match="dist.deepspeed_config ds_configs/zero7.json"):
        resolve_ds_config(cfg, world=1)


def test_cli_loads_the_packaged_config_and_recipe_from_elsewhere(elsewhere, capsys, monkeypatch):
    import medscale.cli
    from medscale.cli import main

    loaded = []
    real = medscale.cli.load_config
    monkeypatch.setattr(medscale.cli, "load_config", lambda cls, path, ov=(): loaded.append(Path(path)) or real(cls, path, ov))
    # The config loads (the packaged copy) and its validation, not a missing file, stops the run.
    assert main(["train", "--config", "configs/demo.yaml", "train.steps=0"]) == 2
    err = capsys.readouterr().err
    assert "train.steps must be >= 1" in err and "Traceback" not in err
    assert main(["prep", "in", "bogus_key=1", "--out", "o", "--recipe", "data_prep/demo.yaml"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'bogus_key'" in err and "Traceback" not in err
    assert loaded == [packaged_dir("configs") / "demo.yaml", packaged_dir("data_prep") / "demo.yaml"]
    assert not (elsewhere / "o").exists()


def test_demo_finds_config_and_recipe_from_elsewhere(elsewhere, monkeypatch):
    import medscale.config
    import medscale.demo

    loaded = []
    real = medscale.config.load_config

    def spy(cls, path=None, overrides=()):
        loaded.append((cls, Path(path)))
        return real(cls, path, overrides)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop  # both configs are resolved and loaded; generating the corpus is not this test's business

    monkeypatch.setattr(medscale.config, "load_config", spy)
    monkeypatch.setattr(medscale.demo, "write_synthetic_corpus", stop)
    with pytest.raises(Stop):
        medscale.demo.run_demo(out=elsewhere / "demo_out")
    assert loaded == [(RunConfig, packaged_dir("configs") / "demo.yaml"),
                      (PrepConfig, packaged_dir("data_prep") / "demo.yaml")]


def test_demo_help_and_config_load_in_a_subprocess_from_elsewhere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "medscale.cli", "demo", "--help"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "packaged copy" in " ".join(r.stdout.split())  # argparse wraps the help text
    r = subprocess.run([sys.executable, "-m", "medscale.cli", "train", "--config", "configs/demo.yaml", "train.lr=abc"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 2 and "train.lr" in r.stderr and "'abc'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "launching" not in r.stdout


@pytest.mark.integration
def test_wheel_ships_configs_and_they_work_from_elsewhere(tmp_path):
    # Build from a copy of the sources, so that a stale build/ in the checkout cannot leak into the wheel.
    src = tmp_path / "src_copy"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = wheels.glob("medscale-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind, pattern in SHIPPED.items():
        shipped = {f"medscale/{kind}/{p.name}" for p in (ROOT / kind).glob(pattern)}
        assert shipped and shipped <= names, sorted(shipped - names)

    # Installed (not editable) into a directory that shadows the checkout, run from yet another one.
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    check = (
        "import medscale, medscale.resources as r\n"
        "from medscale.config import RunConfig, load_config\n"
        "from medscale.train.engine import resolve_ds_config\n"
        f"assert medscale.__file__.startswith({str(target)!r}), medscale.__file__\n"
        "cfg = load_config(RunConfig, r.resolve_resource('configs/demo.yaml'))\n"
        "ds = r.resolve_resource(cfg.dist.deepspeed_config)\n"
        f"assert str(ds).startswith({str(target)!r}), ds\n"
        "assert resolve_ds_config(cfg, world=2)['zero_optimization']['stage'] == 2\n"
        "print(r.resolve_resource('data_prep/demo.yaml'))\n"
    )
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == str(target / "medscale" / "data_prep" / "demo.yaml")
    r = subprocess.run([sys.executable, "-m", "medscale.cli", "demo", "--help"],
                       capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert r.returncode == 0 and "packaged copy" in " ".join(r.stdout.split()), r.stderr
