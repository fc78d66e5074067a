"""The real sbatch templates on a real Slurm cluster (slurm/testing/cluster.sh: slurmctld, n1, n2).

All scenarios are submitted at once and run side by side on the test cluster (each node advertises
more CPUs than the machine has: jobs mostly wait for Slurm, not for the cores); each test then
waits for its own scenario and checks it:

- a job that trains to the end: COMPLETED, never requeued, eval.json and done.json written;
- three warnings (USR2 to the batch shell, as --signal=B:USR2 sends): each time the ranks save,
  the job requeues itself and resumes; the per-step losses and the final weights equal the
  uninterrupted job's exactly (fp32), SLURM_RESTART_COUNT reached 3;
- a time limit shorter than the run: Slurm's own warning signal, a requeue, completion;
- scancel: CANCELLED for good, no requeue, the checkpoint it saved on SIGTERM intact;
- a restart cap: MAX_RESTARTS=1, warned twice: not requeued the second time, a clear message;
- two nodes (-N 2 --ntasks-per-node=1): the same losses as one node with two tasks, also across
  a preemption;
- the deepspeed-launcher variant on two nodes (LAUNCHER=deepspeed: one launcher per node, a
  hostfile from the allocation, --no_ssh): the same losses, also across a preemption;
- a chain of three dependent jobs (submit_chain.sh): the first is warned and ends COMPLETED
  without requeue (REQUEUE=0), the second continues the run to the end, the third finds it done;
- eval.sbatch on two tasks gives the run's own test metrics;
- MAE pretraining (train.objective=mae) through the same template, warned once: requeued, resumed,
  every step logged once, its reconstruction evaluation written;
- prep.sbatch as a 3-task array plus its merge job (afterok) equals a single-process prep.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from conftest import write_shards
from conftest import last_step, losses
from slurmkit import skip_or_fail_without_slurm

from medscale.testing.slurm import ROOT, SLURM, Cluster, restart_lines, start_cluster, stop_cluster, wait_for

pytestmark = pytest.mark.slurm

TRAIN = SLURM / "train.sbatch"
STEPS = 240  # about 10 s of training on two CPU ranks: long enough to be warned three times mid-run


def _config(tmp: Path, name: str, shards: Path, **train: Any) -> Path:
    config = {
        "out_dir": str(tmp / name),
        "data": {"shards": str(shards), "image_size": 16, "channels": 1, "num_workers": 1, "shuffle_block": 16},
        "model": {"name": "test_vit", "patch_size": 8, "num_classes": 2},
        "train": {"steps": STEPS, "micro_batch_size": 2, "warmup_steps": 2, "log_every": 1, "precision": "fp32",
                  **train},
        "dist": {"deepspeed_config": str(ROOT / "ds_configs" / "cpu_zero2.json")},
        "eval": {"micro_batch_size": 4, "bootstrap": 0},
        "checkpoint": {"every_steps": 0, "keep": 2},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Scenario:
    """One job's story, driven in a thread so that all scenarios share the cluster's waiting time."""

    def __init__(self, name: str, body: Callable[[], dict[str, Any]]):
        self.name = name
        self.result: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.started = time.time()
        self.thread = threading.Thread(target=self._run, args=(body,), name=name, daemon=True)
        self.thread.start()

    def _run(self, body: Callable[[], dict[str, Any]]) -> None:
        try:
            self.result = body()
        except BaseException as e:  # re-raised in the test
            self.error = e
        self.result["seconds"] = time.time() - self.started

    def get(self, timeout: float = 600) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"scenario {self.name} still running after {timeout} s"
        if self.error is not None:
            raise self.error
        print(f"scenario {self.name}: {self.result['seconds']:.0f} s")
        return self.result


def _preempt(cluster: Cluster, job: str, run: Path, log: Path, times: int, every: int = 40) -> list[int]:
    """Warn the running job `times` times, each time once it has trained `every` more steps; returns the
    steps reached when each warning was sent."""
    sent = []
    for i in range(times):
        target = (i + 1) * every
        wait_for(lambda: last_step(run) >= target, 240, f"{job} to reach step {target}")
        sent.append(last_step(run))
        cluster.warn(job)
        wait_for(lambda: len([x for x in restart_lines(log) if "requeueing" in x or "not requeued" in x]) > i,
                 120, f"{job} to stop after warning {i + 1}")
        if i + 1 < times:
            wait_for(lambda: cluster.job(job).get("Restarts") == str(i + 1) and cluster.state(job) == "RUNNING"
                     and last_step(run) > sent[-1], 240, f"{job} to run again after warning {i + 1}")
    return sent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    skip_or_fail_without_slurm()
    state = tmp_path_factory.mktemp("slurm-state")
    c = start_cluster(state, cpus=8)
    yield c
    print(stop_cluster(state))


NEEDS = {  # test -> the scenarios it reads; only those of the selected tests are started
    "test_a_job_trains_to_the_end_without_requeue": ["reference"],
    "test_three_warnings_requeue_and_resume_exactly": ["reference", "preempted"],
    "test_time_limit_warning_requeues_and_completes": ["time_limit"],
    "test_scancel_ends_the_job_for_good": ["cancelled"],
    "test_restart_cap_stops_requeueing": ["capped"],
    "test_two_nodes_train_like_one_node_and_resume": ["reference", "two_nodes"],
    "test_deepspeed_launcher_variant": ["reference", "launcher"],
    "test_chain_of_dependent_jobs": ["chain"],
    "test_eval_template_scores_the_run": ["reference", "evaluate"],
    "test_prep_array_and_merge_equal_a_single_process_prep": ["prep_array"],
    "test_pretraining_runs_through_the_same_template": ["pretrain"],
}


@pytest.fixture(scope="module")
def scenarios(cluster: Cluster, tmp_path_factory, request) -> dict[str, Scenario]:
    tmp = tmp_path_factory.mktemp("slurm-train")
    shards = tmp / "shards"
    write_shards(shards, {"train": [20, 20, 8], "val": [6], "test": [12]}, size=16)
    logs = tmp / "logs"
    logs.mkdir()

    def submit(name: str, *options: str, env: dict[str, str] | None = None, script: Path = TRAIN,
               args: tuple[str, ...] = (), **train: Any) -> tuple[str, Path, Path]:
        config = _config(tmp, name, shards, **train)
        log = logs / f"{name}.log"
        job = cluster.sbatch("-J", name, "-o", log, *options, script, config, *args, env=env, cwd=tmp)
        return job, tmp / name, log

    def reference() -> dict[str, Any]:
        job, run, log = submit("reference", "-N", "1", "-n", "2")
        return {"job": job, "run": run, "log": log, "info": cluster.wait_final(job, 300)}

    def preempted() -> dict[str, Any]:
        job, run, log = submit("preempted", "-N", "1", "-n", "2")
        sent = _preempt(cluster, job, run, log, times=3)
        return {"job": job, "run": run, "log": log, "sent": sent, "info": cluster.wait_final(job, 300)}

    def pretrain() -> dict[str, Any]:
        # MAE pretraining is train.objective=mae in the config: the same template, warning and requeue.
        job, run, log = submit("pretrain", "-N", "1", "-n", "2", objective="mae", steps=120)
        sent = _preempt(cluster, job, run, log, times=1)
        return {"job": job, "run": run, "log": log, "sent": sent, "info": cluster.wait_final(job, 300)}

    def two_nodes() -> dict[str, Any]:
        job, run, log = submit("two_nodes", "-N", "2", "--ntasks-per-node", "1")
        sent = _preempt(cluster, job, run, log, times=1, every=60)
        return {"job": job, "run": run, "log": log, "sent": sent, "info": cluster.wait_final(job, 300)}

    def launcher() -> dict[str, Any]:
        job, run, log = submit("launcher", "-N", "2", "--ntasks-per-node", "1",
                               env={"LAUNCHER": "deepspeed", "GPUS_PER_NODE": "1"})
        sent = _preempt(cluster, job, run, log, times=1, every=60)
        return {"job": job, "run": run, "log": log, "sent": sent, "info": cluster.wait_final(job, 300)}

    def time_limit() -> dict[str, Any]:
        # Slurm checks time limits every 30 s and sends the warning at the first check that finds at
        # most GRACE + 30 s left: with --time=2 and GRACE=60 that is 30-60 s after the start (measured:
        # 42 s). 4000 steps on one rank take 85 s alone on this machine, more beside the other
        # scenarios: every start is warned mid-run, and each trains a share of the run.
        job, run, log = submit("time_limit", "-n", "1", "-t", "2", "--signal=B:USR2@60", steps=4000, log_every=100)
        return {"job": job, "run": run, "log": log, "info": cluster.wait_final(job, 480)}

    def cancelled() -> dict[str, Any]:
        job, run, log = submit("cancelled", "-n", "1", steps=100000, log_every=10)
        wait_for(lambda: last_step(run) >= 20, 240, "the run to train")
        cluster.cancel(job)
        info = cluster.wait_final(job, 120)
        time.sleep(15)  # longer than the test cluster's requeue hold: a requeued job would be PENDING by now
        return {"job": job, "run": run, "log": log, "info": info, "later": cluster.job(job)}

    def capped() -> dict[str, Any]:
        job, run, log = submit("capped", "-n", "1", env={"MAX_RESTARTS": "1"}, steps=100000, log_every=10)
        sent = _preempt(cluster, job, run, log, times=2)
        return {"job": job, "run": run, "log": log, "sent": sent, "info": cluster.wait_final(job, 120)}

    def chain() -> dict[str, Any]:
        config = _config(tmp, "chain", shards)
        r = cluster.run("bash", SLURM / "submit_chain.sh", "3", "-n", "2", "-J", "chain", "-o", logs / "chain-%j.log",
                        "--", config, cwd=tmp)
        jobs = r.stdout.split()
        run = tmp / "chain"
        wait_for(lambda: last_step(run) >= 60, 240, "the first job of the chain to train")
        cluster.warn(jobs[0])
        infos = [cluster.wait_final(j, 300) for j in jobs]
        return {"jobs": jobs, "run": run, "infos": infos, "logs": [logs / f"chain-{j}.log" for j in jobs]}

    def evaluate() -> dict[str, Any]:
        ref = scenarios["reference"].get()
        out = tmp / "eval-test.json"
        job = cluster.sbatch("-J", "eval", "-n", "2", "-o", logs / "eval.log", SLURM / "eval.sbatch", ref["run"],
                             "--output", out, cwd=tmp)
        return {"job": job, "info": cluster.wait_final(job, 240), "out": out, "run": ref["run"]}

    def prep_array() -> dict[str, Any]:
        from medscale.demo import write_synthetic_corpus

        raw = tmp / "raw"
        labels = write_synthetic_corpus(raw, patients=12, images_per_patient=3, size=32)
        key = tmp / "pseudonym.key"
        key.write_text(bytes(range(32)).hex())
        args = ["--recipe", str(ROOT / "data_prep" / "demo.yaml"), "--labels", str(labels), "--key-file", str(key),
                "--chunk-files", "5", str(raw / "dicom")]
        single = subprocess.run([str(Path(sys.executable).parent / "medscale"), "prep", "--out", str(tmp / "single"),
                                 *args], capture_output=True, text=True, timeout=300, env=cluster.env)
        assert single.returncode == 0, single.stderr
        array = cluster.sbatch("-J", "prep", "--array=0-2", "-o", logs / "prep-%A_%a.log", SLURM / "prep.sbatch",
                               "--out", tmp / "array", *args, cwd=tmp)
        infos = [cluster.wait_final(f"{array}_{i}", 300) for i in range(3)]
        merge = cluster.run("squeue", "-h", "-o", "%i", "-n", f"prep-merge-{array}", "-t", "all").stdout.split()
        assert len(merge) == 1, f"expected one merge job, found {merge}"
        return {"infos": infos, "merge": cluster.wait_final(merge[0], 120), "single": tmp / "single",
                "array": tmp / "array"}

    wanted = {n for item in request.session.items if item.module is request.module
              for n in NEEDS.get(item.originalname, [])}
    scenarios: dict[str, Scenario] = {}
    for name, body in (("reference", reference), ("preempted", preempted), ("two_nodes", two_nodes),
                       ("launcher", launcher), ("time_limit", time_limit), ("cancelled", cancelled),
                       ("capped", capped), ("chain", chain), ("evaluate", evaluate), ("prep_array", prep_array),
                       ("pretrain", pretrain)):
        if name in wanted:
            scenarios[name] = Scenario(name, body)
    return scenarios


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", map_location="cpu", weights_only=True)["model"]


def test_a_job_trains_to_the_end_without_requeue(scenarios):
    r = scenarios["reference"].get()
    assert r["info"]["JobState"] == "COMPLETED" and r["info"]["Restarts"] == "0", r["info"]
    assert (r["run"] / "eval.json").is_file() and (r["run"] / "done.json").is_file()
    assert sorted(losses(r["run"])) == list(range(1, STEPS + 1))
    lines = restart_lines(r["log"])
    assert any("finished" in x for x in lines) and not any("requeue" in x for x in lines), lines


def test_three_warnings_requeue_and_resume_exactly(scenarios):
    ref = scenarios["reference"].get()
    r = scenarios["preempted"].get()
    assert r["info"]["JobState"] == "COMPLETED" and r["info"]["Restarts"] == "3", r["info"]
    lines = restart_lines(r["log"])
    assert [x.split("restart ")[1].split(":")[0] for x in lines if ": start on" in x] == ["0", "1", "2", "3"], lines
    assert sum("requeueing" in x for x in lines) == 3, lines
    assert losses(r["run"]) == losses(ref["run"])  # every step, bit for bit (fp32)
    mine, theirs = _final_weights(r["run"]), _final_weights(ref["run"])
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ckpts = sorted(p.name for p in (r["run"] / "checkpoints").glob("step*"))
    assert ckpts, "the warnings left no checkpoint"


def test_time_limit_warning_requeues_and_completes(scenarios):
    r = scenarios["time_limit"].get()
    assert r["info"]["JobState"] == "COMPLETED", r["info"]
    assert int(r["info"]["Restarts"]) >= 1, r["info"]
    lines = restart_lines(r["log"])
    assert any("got SIGUSR2" in x for x in lines) and any("requeueing" in x for x in lines), lines
    assert (r["run"] / "done.json").is_file()


def test_scancel_ends_the_job_for_good(scenarios):
    from medscale.checkpoint.safety import verify_checkpoint_files

    r = scenarios["cancelled"].get()
    assert r["info"]["JobState"] == "CANCELLED" and r["info"]["Restarts"] == "0", r["info"]
    assert r["later"]["JobState"] == "CANCELLED" and r["later"]["Restarts"] == "0", r["later"]
    lines = restart_lines(r["log"])
    assert not any("requeueing" in x for x in lines), lines
    newest = sorted((r["run"] / "checkpoints").glob("step*"))
    assert newest and (newest[-1] / "complete.json").is_file(), "SIGTERM left no complete checkpoint"
    assert verify_checkpoint_files(newest[-1]) > 0
    assert not (r["run"] / "done.json").exists()


def test_restart_cap_stops_requeueing(scenarios):
    r = scenarios["capped"].get()
    assert r["info"]["JobState"] == "FAILED" and r["info"]["Restarts"] == "1", r["info"]
    assert r["info"]["ExitCode"].startswith("75:"), r["info"]
    lines = restart_lines(r["log"])
    assert any("MAX_RESTARTS=1" in x and "not requeued" in x for x in lines), lines


def test_two_nodes_train_like_one_node_and_resume(scenarios):
    ref = scenarios["reference"].get()
    r = scenarios["two_nodes"].get()
    assert r["info"]["JobState"] == "COMPLETED" and r["info"]["Restarts"] == "1", r["info"]
    assert r["info"]["NodeList"] == "n[1-2]", r["info"]
    assert losses(r["run"]) == losses(ref["run"])


def test_deepspeed_launcher_variant(scenarios):
    ref = scenarios["reference"].get()
    r = scenarios["launcher"].get()
    assert r["info"]["JobState"] == "COMPLETED" and r["info"]["Restarts"] == "1", r["info"]
    assert losses(r["run"]) == losses(ref["run"])
    assert (r["run"] / f"hostfile-{r['job']}").read_text().splitlines() == ["n1 slots=1", "n2 slots=1"]


def test_chain_of_dependent_jobs(scenarios):
    r = scenarios["chain"].get()
    states = [i["JobState"] for i in r["infos"]]
    assert states == ["COMPLETED"] * 3 and all(i["Restarts"] == "0" for i in r["infos"]), r["infos"]
    first, second, third = (restart_lines(log) for log in r["logs"])
    stamp = lambda line: line.split()[1] + " " + line.split()[2]  # noqa: E731 - "medscale-slurm: DATE TIME ..."
    assert stamp(first[-1]) <= stamp(second[0]) and stamp(second[-1]) <= stamp(third[0]), "the jobs overlapped"
    assert any("REQUEUE=0" in x for x in first), first
    assert any("finished" in x for x in second), second
    assert any("nothing to do" in x for x in third), third
    assert sorted(losses(r["run"])) == list(range(1, STEPS + 1))


def test_eval_template_scores_the_run(scenarios):
    r = scenarios["evaluate"].get()
    assert r["info"]["JobState"] == "COMPLETED", r["info"]
    got, trained = json.loads(r["out"].read_text()), json.loads((r["run"] / "eval.json").read_text())
    for key in ("n_samples", "accuracy", "auroc", "auprc"):
        assert got[key] == trained[key], key


def test_prep_array_and_merge_equal_a_single_process_prep(scenarios):
    r = scenarios["prep_array"].get()
    assert [i["JobState"] for i in r["infos"]] == ["COMPLETED"] * 3, r["infos"]
    assert r["merge"]["JobState"] == "COMPLETED", r["merge"]
    single, array = (json.loads((d / "manifest.json").read_text()) for d in (r["single"], r["array"]))
    assert [(s["path"], s["sha256"], s["samples"]) for s in array["shards"]] == \
        [(s["path"], s["sha256"], s["samples"]) for s in single["shards"]]
    assert {k: v for k, v in array.items() if k != "created"} == {k: v for k, v in single.items() if k != "created"}
    for shard in single["shards"]:
        assert (r["array"] / shard["path"]).read_bytes() == (r["single"] / shard["path"]).read_bytes()


def test_pretraining_runs_through_the_same_template(scenarios):
    r = scenarios["pretrain"].get()
    assert r["info"]["JobState"] == "COMPLETED" and r["info"]["Restarts"] == "1", r["info"]
    assert sorted(losses(r["run"])) == list(range(1, 121))  # every step once across the requeue
    result = json.loads((r["run"] / "eval.json").read_text())
    assert result["objective"] == "mae" and result["loss"] > 0 and (r["run"] / "done.json").is_file()
