"""The Tracker with real offline W&B, in this process: the run it writes is read back with wandb's own
reader (``wandb leet inspect --json``), its id kept in RUN_DIR/wandb_id and in the tracker's state.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from conftest import read_wandb_run, read_wandb_runs
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


def _no_key(monkeypatch, tmp_path):
    """No API key anywhere (env, ~/.netrc), WANDB_MODE unset, and no W&B server to reach."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there


def _one_step_within_a_minute(run_dir: Path, caplog) -> Tracker:
    t0 = time.monotonic()
    tracker = Tracker(LoggingConfig(wandb=True), run_dir, True, CONFIG)
    with caplog.at_level(logging.INFO, logger="medscale"):
        tracker.start()
    tracker.log(1, {"loss": 0.5}, prefix="train/")
    tracker.close()
    assert time.monotonic() - t0 < 60
    return tracker


def test_no_api_key_means_offline_by_itself_without_a_prompt(offline, monkeypatch, tmp_path, caplog):
    _no_key(monkeypatch, tmp_path)
    wandb_dir = offline("wb")
    _one_step_within_a_minute(tmp_path, caplog)
    run = read_wandb_run(wandb_dir)
    assert run["history"][1]["train/loss"] == 0.5
    assert "logging offline" in caplog.text and "wandb sync" in caplog.text


def test_an_unreachable_server_falls_back_to_offline_in_bounded_time(offline, monkeypatch, tmp_path, caplog):
    _no_key(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key, so wandb tries the server
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    wandb_dir = offline("wb")
    tracker = _one_step_within_a_minute(tmp_path, caplog)
    assert "could not start online" in caplog.text
    run = read_wandb_run(wandb_dir)
    assert run["id"] == tracker.wandb_id and run["history"][1]["train/loss"] == 0.5


def test_restarts_write_fragments_of_one_run_with_disjoint_steps(offline, tmp_path):
    # Start 1 logs steps 1-6 and is killed; its newest checkpoint was completed after step 3. Start 2
    # runs steps 4-6 again (identical by construction) and goes on to 8, then is killed; start 3
    # resumes from step 7's checkpoint. W&B must get every step exactly once, under one id.
    wandb_dir = offline("wb")
    marks = {}

    def start(resumed_at, steps, state):
        tracker = Tracker(LoggingConfig(wandb=True), tmp_path, True, CONFIG)
        tracker.load_state_dict(state)
        tracker.start(resumed_at=resumed_at)
        for s in steps:
            tracker.log(s, {"loss": 1.0 / s}, prefix="train/")
            marks[s] = time.time()
            time.sleep(0.01)
        tracker.close()
        import wandb

        wandb.teardown()  # as a killed process: the next start is a new wandb session
        return tracker.state_dict()

    state = start(None, range(1, 7), {})
    state = start(marks[3], range(4, 9), state)
    start(marks[7], range(8, 11), state)
    runs = read_wandb_runs(wandb_dir)
    assert len(runs) == 3 and len({r["id"] for r in runs}) == 1
    steps = [sorted(r["history"]) for r in runs]
    assert steps == [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10]]
    assert all(r["history"][s]["train/loss"] == 1.0 / s for r in runs for s in r["history"])
    rows = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 11))


def test_eval_figures_and_intervals_reach_wandb(offline, tmp_path):
    import numpy as np

    wandb_dir = offline("wb")
    per_class = {name: {"roc": {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.8, 1.0]},
                        "pr": {"precision": [1.0, 0.7], "recall": [0.0, 1.0]}, "confusion": [[5, 1], [2, 4]]}
                 for name in ("normal", "lesion")}
    curves = {"task": "multiclass", "classes": ["normal", "lesion"], "threshold": 0.5, "per_class": per_class,
              "confusion": {"labels": ["normal", "lesion"], "matrix": [[5, 1], [2, 4]]},
              "calibration": {"confidence": [0.2, 0.8], "accuracy": [0.25, 0.75], "count": [6, 6], "bins": 2}}
    samples = [{"image": np.full((8, 8), 40 * i, np.uint8), "label": "normal", "pred": "lesion", "prob": 0.6}
               for i in range(3)]
    tracker = Tracker(LoggingConfig(wandb=True), tmp_path, True, CONFIG)
    tracker.start()
    tracker.log(5, {"auroc": 0.9}, prefix="test/")
    from medscale.tasks.classification import ClassificationTask

    result = {"curves": curves, "samples": samples}
    tracker.log_figures(5, lambda wandb: ClassificationTask.wandb_figures(wandb, "test", result))
    tracker.summary({"test/auroc": 0.9, "test/auroc_ci": [0.8, 0.97], "test/curves": curves,
                     "test/per_class": {"lesion": {"auroc": 0.9, "auroc_ci": [0.7, 1.0]}}})
    tracker.close()
    run = read_wandb_run(wandb_dir)
    row = run["history"][5]
    for key in ("test/roc_curve_table", "test/pr_curve_table", "test/confusion_matrix", "test/calibration_table",
                "test/samples"):
        assert row.get(f"{key}._type") == "table-file", (key, sorted(row))
    assert row["test/samples.nrows"] == 3 and row["test/confusion_matrix.nrows"] == 4
    assert run["summary"]["test/auroc_ci"] == [0.8, 0.97]
    assert run["summary"]["test/per_class/lesion/auroc_ci"] == [0.7, 1.0]
    assert not any(k.startswith("test/curves") for k in run["summary"])
    assert list((wandb_dir / "wandb").glob("offline-run-*/files/media/table/test/samples_*.table.json"))


def test_steps_a_killed_start_lost_are_sent_again_from_metrics_jsonl(offline, tmp_path):
    # kill -9 takes wandb-core with it: the killed start's offline file keeps only its header. The
    # next start finds no step in W&B's records and sends the rows the checkpoint kept again.
    wandb_dir = offline("wb")
    marks = {}
    tracker = Tracker(LoggingConfig(wandb=True), tmp_path, True, CONFIG)
    tracker.start()
    for s in range(1, 6):
        tracker.log(s, {"loss": 1.0 / s}, prefix="train/")
        marks[s] = time.time()
        time.sleep(0.01)
    tracker.close()
    import wandb

    wandb.teardown()
    (first,) = list((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    first.write_bytes(first.read_bytes()[:7])  # what a kill -9 left
    tracker = Tracker(LoggingConfig(wandb=True), tmp_path, True, CONFIG)
    tracker.load_state_dict({"wandb_id": (tmp_path / "wandb_id").read_text()})
    tracker.start(resumed_at=marks[3])  # the checkpoint after step 3
    for s in range(4, 8):
        tracker.log(s, {"loss": 1.0 / s}, prefix="train/")
    tracker.close()
    lost, second = read_wandb_runs(wandb_dir)
    assert lost["history"] == {} and sorted(second["history"]) == list(range(1, 8))
    assert all(second["history"][s]["train/loss"] == 1.0 / s for s in range(1, 8))


def test_slurm_job_and_restart_count_are_in_the_config_and_the_group_is_the_run(offline, monkeypatch, tmp_path):
    wandb_dir = offline("wb")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[001-002]")
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    run_dir = tmp_path / "ct_run"
    run_dir.mkdir()
    tracker = Tracker(LoggingConfig(wandb=True), run_dir, True, CONFIG)
    tracker.start()
    tracker.log(1, {"loss": 0.5}, prefix="train/")
    tracker.close()
    run = read_wandb_run(wandb_dir)
    assert run["config"]["launch"] == {"slurm_job_id": "4242", "slurm_restart_count": "3",
                                       "slurm_nodes": "gpu[001-002]"}
    assert run["group"] == "ct_run" and run["config"]["train"]["steps"] == 3


def test_a_run_id_read_from_a_checkpoint_never_names_a_path(offline, tmp_path, caplog):
    """The W&B id names W&B's run folder: one read from a checkpoint or RUN/wandb_id must be a plain id."""
    wandb_dir = offline("wb")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = Tracker(LoggingConfig(wandb=True, project="medscale-test"), run_dir, True, CONFIG)
    tracker.load_state_dict({"wandb_id": "../../escape"})
    with caplog.at_level(logging.WARNING, logger="medscale.train"):
        tracker.start()
    tracker.log(1, {"loss": 0.5}, prefix="train/")
    tracker.close()
    assert "W&B run id '../../escape'" in caplog.text and "training goes on" in caplog.text
    assert not list(tmp_path.rglob("*escape*")) and not list(wandb_dir.iterdir())
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["train/loss"] == 0.5
