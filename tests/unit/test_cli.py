"""Exit codes of `medscale`: 2 and one line for bad config or input, 1 and a traceback for anything else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import medscale.cli
from medscale.cli import main
from medscale.errors import CorruptShards, InputError, InputNotFound, RunStateError
from medscale.train.runlock import RunLocked

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_config_error_exits_2_with_one_line_and_no_traceback(capsys):
    assert main(["train", "--config", DEMO, "train.lr=abc"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert _lines(err) == [f"medscale train: error: config key 'train.lr' (command line 'train.lr=abc'): "
                           f"expected float, got 'abc'"]


def test_unknown_key_exits_2_naming_the_key(capsys):
    assert main(["train", "--config", DEMO, "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.lrr'" in err and "did you mean 'train.lr'" in err and "Traceback" not in err


def test_missing_config_exits_2_naming_the_path_and_the_packaged_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "configs/nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(_lines(err)) == 1
    assert err.startswith("medscale train: error: --config configs/nope.yaml: no such file")
    assert str(tmp_path / "configs" / "nope.yaml") in err and "demo.yaml" in err
    assert main(["prep", "x", "--out", str(tmp_path / "o"), "--recipe", str(tmp_path / "r.yaml")]) == 2
    assert f"medscale prep: error: --recipe {tmp_path / 'r.yaml'}: no such file" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--config", "configs/nope.yaml"]) == 2
    assert "medscale demo: error: --config configs/nope.yaml" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_bad_prep_and_demo_arguments_exit_2_before_any_work(tmp_path, capsys):
    assert main(["prep", "--out", str(tmp_path / "o")]) == 2
    assert "needs at least one INPUT" in capsys.readouterr().err
    assert main(["prep", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "medscale prep: error: --workers must be >= 1, got 0" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--patients", "0"]) == 2
    assert "medscale demo: error: --patients must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("exc", [ValueError("bad value in the code"), KeyError("missing_key"),
                                 FileNotFoundError("/some/internal/file")], ids=lambda e: type(e).__name__)
def test_unexpected_error_in_a_command_exits_1_with_its_traceback(exc, monkeypatch, capsys):
    def broken(args):
        raise exc

    monkeypatch.setattr(medscale.cli, "cmd_inspect", broken)
    assert main(["inspect", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert f"{type(exc).__name__}: " in err and str(exc.args[0]) in err
    assert "medscale inspect: error:" not in err  # not dressed up as a user error


@pytest.mark.parametrize("exc", [InputError("labels CSV x.csv lacks column 'finding'"),
                                 InputNotFound("prep input 'raw/' does not exist"),
                                 RunStateError("the checkpoints in x changed while this run started: stop it"),
                                 CorruptShards("12 corrupt samples exceed data.max_corrupt_fraction"),
                                 RunLocked("run directory x is in use by pid 1 on host h")],
                         ids=lambda e: type(e).__name__)
def test_user_error_from_a_command_exits_2(exc, monkeypatch, capsys):
    def refuses(args):
        raise exc

    monkeypatch.setattr(medscale.cli, "cmd_inspect", refuses)
    assert main(["inspect", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert _lines(err) == [f"medscale inspect: error: {exc}"]


def test_debug_env_adds_the_traceback_to_user_errors(monkeypatch, capsys):
    monkeypatch.setenv("MEDSCALE_DEBUG", "1")
    assert main(["train", "--config", DEMO, "train.lr=abc"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert _lines(err)[-1].startswith("medscale train: error: config key 'train.lr'")


def test_subprocess_bad_value_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "medscale.cli", "train", "--config", "configs/demo.yaml", "train.lr=abc",
                        f"out_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "medscale train: error:" in r.stderr and "train.lr" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_get_prints_resolved_values_for_batch_scripts_and_trains_nothing(tmp_path, capsys):
    # slurm/train.sbatch asks for the run directory and the step count this way.
    assert main(["train", "--config", DEMO, f"out_dir={tmp_path}/r", "train.steps=7", "--get", "out_dir",
                 "--get", "train.steps"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{tmp_path}/r", "7"]
    assert not (tmp_path / "r").exists()
    assert main(["train", "--config", DEMO, "--get", "train.nope"]) == 2
    assert "--get train.nope: no such config key" in capsys.readouterr().err


def test_one_ninja_and_one_extension_cache_per_environment(monkeypatch):
    # Processes with and without the venv on PATH used to rebuild DeepSpeed's JIT op for each other.
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    medscale.cli._pin_build_environment()
    import os

    assert os.environ["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    if sys.prefix != sys.base_prefix:
        assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    medscale.cli._pin_build_environment()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/somewhere/else"


def test_a_taken_master_port_is_named_and_nothing_starts(tmp_path):
    """dist.master_port set and held by another process: one line naming the setting, exit 2, no launcher."""
    import socket

    from conftest import subprocess_env, write_shards

    write_shards(tmp_path / "shards", {"train": [8], "test": [4]})
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "medscale.cli", "train", "--config", DEMO, "dist.nproc=2",
                            f"dist.master_port={port}", f"data.shards={tmp_path / 'shards'}", f"out_dir={tmp_path / 'run'}"],
                           capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert _lines(r.stderr) == [f"medscale train: error: dist.master_port={port} is in use on this machine (Address "
                                "already in use): another run may hold it; choose another port, or leave "
                                "dist.master_port unset for a free one"]
    assert "launching:" not in r.stdout
    assert not (tmp_path / "run" / "run.lock").exists()  # the lock it took is given back
    assert not (tmp_path / "run" / "launch_config.yaml").exists()

