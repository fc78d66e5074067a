"""Config tree: defaults < YAML < dotted overrides; unknown keys and wrong types are errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medscale.config import ConfigError, RunConfig, from_dict, load_config, save_config, to_dict
from medscale.prep.config import PrepConfig

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, data, name="run.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_then_file_then_overrides(tmp_path):
    p = write(tmp_path, {"train": {"lr": 0.01, "steps": 7}, "data": {"image_size": 32}})
    cfg = load_config(RunConfig, p, ["train.lr=3e-4", "data.windows=[[40, 400]]", "logging.wandb=true"])
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string; still a float here
    assert cfg.train.steps == 7
    assert cfg.data.image_size == 32
    assert cfg.data.windows == [[40.0, 400.0]]
    assert cfg.logging.wandb is True
    assert cfg.train.micro_batch_size == RunConfig().train.micro_batch_size


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    p = write(tmp_path, {"train": {"lrr": 0.1}})
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, p)
    assert "train.lrr" in str(e.value) and str(p) in str(e.value) and "train.lr" in str(e.value)


def test_unknown_section_and_override(tmp_path):
    with pytest.raises(ConfigError, match="'trian'"):
        load_config(RunConfig, None, ["trian.lr=1"])
    with pytest.raises(ConfigError, match="command line"):
        load_config(RunConfig, None, ["train.nope=1"])


@pytest.mark.parametrize(
    "override,key",
    [("train.lr=abc", "train.lr"), ("train.steps=1.5", "train.steps"), ("train.precision=fp8", "train.precision"),
     ("logging.wandb=maybe", "logging.wandb"), ("data.windows=[1, 2]", "data.windows[0]"),
     ("train=3", "train")],
)
def test_wrong_types_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, [override])
    assert f"'{key}'" in str(e.value)


def test_wrong_type_in_file_names_file(tmp_path):
    p = write(tmp_path, {"train": {"micro_batch_size": "big"}})
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, p)
    assert "train.micro_batch_size" in str(e.value) and str(p) in str(e.value)


def test_validation_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(RunConfig, None, ["train.steps=0"])
    with pytest.raises(ConfigError, match="data.windows"):
        load_config(RunConfig, None, ["data.normalize=window"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(RunConfig, None, ["train.lr"])
    with pytest.raises(ConfigError, match="train.ema_warmup_power and train.ema_warmup_gamma must be > 0"):
        load_config(RunConfig, None, ["train.ema_warmup_power=0"])
    cfg = load_config(RunConfig, None, ["train.ema_decay=0.9998"])
    assert cfg.train.ema_warmup and cfg.train.ema_warmup_power == 2 / 3  # on by default
    assert cfg.dist.master_port is None  # a free port unless one is set


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RunConfig, bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(RunConfig, ROOT / "configs" / "demo.yaml", ["train.steps=3"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(RunConfig, tmp_path / "resolved.yaml")
    assert again == cfg
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_every_shipped_config_and_recipe_loads():
    runs = [load_config(RunConfig, p) for p in sorted((ROOT / "configs").glob("*.yaml"))]
    recipes = [load_config(PrepConfig, p) for p in sorted((ROOT / "data_prep").glob("*.yaml"))]
    assert len(runs) >= 3 and len(recipes) >= 5
    # every run config names a DeepSpeed JSON that ships with the repo
    for cfg in runs:
        assert (ROOT / cfg.dist.deepspeed_config).exists(), cfg.dist.deepspeed_config


def test_cli_rejects_bad_value_before_any_process_starts(tmp_path):
    # Acceptance: `medscale train --config configs/demo.yaml train.lr=abc` names train.lr and starts nothing.
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "medscale.cli", "train", "--config", str(ROOT / "configs" / "demo.yaml"),
         "train.lr=abc", f"out_dir={out}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert r.returncode == 2
    assert "train.lr" in r.stderr and "'abc'" in r.stderr
    assert "launching" not in r.stdout
    assert not out.exists()  # nothing was written: no launcher, no ranks


def test_renamed_key_is_accepted_with_a_warning(tmp_path, caplog):
    f = tmp_path / "old.yaml"
    f.write_text("data:\n  shuffle_buffer: 512\n")
    with caplog.at_level("WARNING", logger="medscale.config"):
        cfg = load_config(RunConfig, f)
    assert cfg.data.shuffle_block == 512
    assert "data.shuffle_buffer" in caplog.text and "data.shuffle_block" in caplog.text
    assert load_config(RunConfig, None, ["data.shuffle_buffer=64"]).data.shuffle_block == 64
    both = tmp_path / "both.yaml"
    both.write_text("data:\n  shuffle_buffer: 512\n  shuffle_block: 64\n")
    with pytest.raises(ConfigError, match="old and new name"):
        load_config(RunConfig, both)
