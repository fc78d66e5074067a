"""The Tracker with real offline W&B, in this process: the run it writes is read back with wandb's own
reader (``wandb leet inspect --json``), its id kept in RUN_DIR/wandb_id and in the tracker's state.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import read_wandb_run
from medscale.config import LoggingConfig
from medscale.train.tracking import Tracker

CONFIG = {"train": {"steps": 3, "lr": 0.001}, "model": {"name": "test_vit3"}}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline W&B with no key and no user settings; yields a setter for WANDB_DIR."""
    for key in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_ENTITY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's capture of stdout alone
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))

    def use_dir(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        monkeypatch.setenv("WANDB_DIR", str(d))
        return d

    yield use_dir
    import wandb

    wandb.teardown()  # wandb reads its environment once per process: the next test's settings must count


def test_tracker_writes_an_offline_run_and_metrics_jsonl(offline, tmp_path):
    wandb_dir = offline("wb")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = Tracker(LoggingConfig(wandb=True, project="medscale-test"), run_dir, True, CONFIG)
    assert list(run_dir.iterdir()) == [] and tracker.state_dict() == {"wandb_id": None}  # cheap: nothing opened
    tracker.load_state_dict({"wandb_id": None})  # a fresh run: no checkpoint id
    tracker.start()
    losses = {1: 0.9, 2: 0.7, 3: 0.5}
    for step, loss in losses.items():
        tracker.log(step, {"loss": loss, "epoch": 0, "mfu": None, "skipped": True}, prefix="train/")
    tracker.summary({"test/auroc": 0.75, "test/weights": "ema"})
    tracker.close()
    tracker.close()  # a second close does nothing

    run_id = (run_dir / "wandb_id").read_text()
    assert tracker.state_dict() == {"wandb_id": run_id} and run_id
    run = read_wandb_run(wandb_dir)
    assert run["id"] == run_id and run["project"] == "medscale-test" and run["name"] == "run"
    assert run["config"]["train"]["steps"] == 3 and run["config"]["model"]["name"] == "test_vit3"
    assert {s: h["train/loss"] for s, h in run["history"].items()} == losses
    assert run["summary"]["test/auroc"] == 0.75
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(set(r) == {"step", "time", "train/loss", "train/epoch"} for r in rows)  # no None, no bool


def test_checkpoint_id_wins_over_the_file_and_the_file_continues_a_run(offline, tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb_id").write_text("fromfile1")
    wandb_dir = offline("wb1")
    tracker = Tracker(LoggingConfig(wandb=True), run_dir, True, CONFIG)
    tracker.load_state_dict({"wandb_id": "fromckpt2"})
    with caplog.at_level(logging.WARNING, logger="medscale"):
        tracker.start()
    tracker.log(4, {"loss": 0.3}, prefix="train/")
    tracker.close()
    assert "fromckpt2" in caplog.text and "fromfile1" in caplog.text
    assert (run_dir / "wandb_id").read_text() == "fromckpt2" and tracker.state_dict() == {"wandb_id": "fromckpt2"}
    assert read_wandb_run(wandb_dir)["id"] == "fromckpt2"

    # a restart without a checkpoint id (none saved yet) continues the run named in the file
    wandb_dir = offline("wb2")
    again = Tracker(LoggingConfig(wandb=True), run_dir, True, CONFIG)
    again.start()
    again.log(5, {"loss": 0.2}, prefix="train/")
    again.close()
    assert again.state_dict() == {"wandb_id": "fromckpt2"} and read_wandb_run(wandb_dir)["id"] == "fromckpt2"
    with pytest.raises(RuntimeError, match="before Tracker.start"):
        again.load_state_dict({"wandb_id": "late"})


def test_wandb_failing_in_log_does_not_stop_training(offline, tmp_path, caplog):
    import wandb

    offline("wb")
    tracker = Tracker(LoggingConfig(wandb=True), tmp_path, True, CONFIG)
    tracker.start()
    wandb.finish()  # the run ends under the tracker: every further W&B call raises UsageError
    with caplog.at_level(logging.WARNING, logger="medscale"):
        for step in (1, 2, 3):
            tracker.log(step, {"loss": 1.0}, prefix="train/")
        tracker.summary({"test/auroc": 0.5})
        tracker.close()
    assert sum("W&B failed" in r.getMessage() for r in caplog.records) == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_other_ranks_and_disabled_wandb_write_nothing(offline, monkeypatch, tmp_path):
    tracker = Tracker(LoggingConfig(wandb=True), tmp_path, False, CONFIG)
    tracker.load_state_dict({"wandb_id": "abc"})
    tracker.start()
    tracker.log(1, {"loss": 1.0})
    tracker.summary({"x": 1.0})
    tracker.close()
    assert list(tmp_path.iterdir()) == [] and tracker.state_dict() == {"wandb_id": "abc"}

    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = tmp_path / "disabled"
    run_dir.mkdir()
    tracker = Tracker(LoggingConfig(wandb=True), run_dir, True, CONFIG)
    tracker.start()
    tracker.log(1, {"loss": 1.0})
    tracker.close()
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]  # no id of a run that does not exist
    assert tracker.state_dict() == {"wandb_id": None}
