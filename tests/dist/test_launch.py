"""The same `medscale train --config X` under the deepspeed launcher, torchrun, srun's environment and alone.

Real processes, real DeepSpeed ZeRO-2 on 2 gloo ranks, tiny shards and a tiny ViT. Under srun the
ranks come from SLURM_* only (this machine has no Slurm: the variables srun sets are set by hand;
the Slurm issue runs it on a real cluster). All 2-rank launchers must train identically.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from medscale.dist import free_port
from conftest import subprocess_env, tiny_run, write_shards

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 4



@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Shards and a run config shared by every launcher."""
    tmp = tmp_path_factory.mktemp("launch")
    write_shards(tmp / "shards", {"train": [24, 20], "val": [6], "test": [11]}, size=16)
    path = tiny_run(tmp / "run.yaml", tmp / "shards", train={"steps": STEPS, "precision": "bf16", "ema_decay": 0.5},
                    dist={"nproc": 2}, eval={"bootstrap": 10})
    return tmp, path



def _train_args(config: Path, out: Path) -> list[str]:
    """The one training command line every launcher runs."""
    return ["train", "--config", str(config), f"out_dir={out}"]


def _check(r: subprocess.CompletedProcess, out: Path, world: int) -> list[float]:
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-5000:]
    assert f"{world} ranks" in text
    result = json.loads((out / "eval.json").read_text())
    assert result["n_samples"] == 11 and result["duplicates_dropped"] == 0 and result["weights"] == "ema"
    assert {"model", "model_ema", "config"} <= set(__import__("torch").load(out / "model.pt", weights_only=True))
    assert (out / "checkpoints" / f"step{STEPS:08d}" / "complete.json").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == STEPS
    return losses


def _run(cmd: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference_losses(job):
    """The run under torchrun; every other 2-rank launcher must reproduce its losses exactly."""
    tmp, config = job
    out = tmp / "torchrun"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "medscale.cli",
           *_train_args(config, out)]
    return _check(_run(cmd, subprocess_env()), out, world=2)


def test_torchrun(reference_losses):
    assert len(reference_losses) == STEPS


def test_deepspeed_launcher(job, reference_losses):
    """`deepspeed --num_gpus 2 --no_local_rank --module medscale.cli train ...` on this node."""
    tmp, config = job
    out = tmp / "deepspeed"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--no_local_rank", "--module", "medscale.cli", *_train_args(config, out)]
    assert _check(_run(cmd, subprocess_env()), out, world=2) == reference_losses


def test_deepspeed_hostfile_nodes(job, reference_losses):
    """What `deepspeed --hostfile` runs on each host (over pdsh/ssh, absent here): a per-node launcher
    with the hostfile's world info and its node rank; two one-slot "nodes" on this machine."""
    tmp, config = job
    out = tmp / "hostfile"
    world_info = base64.urlsafe_b64encode(json.dumps({"node-a": [0], "node-b": [0]}).encode()).decode()
    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
                               f"--node_rank={n}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "--no_local_rank", "--module", "medscale.cli", *_train_args(config, out)],
                              cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(2)]
    outs = [p.communicate(timeout=180) for p in nodes]
    assert nodes[1].returncode == 0, outs[1][1][-3000:]
    r0 = subprocess.CompletedProcess([], nodes[0].returncode, outs[0][0], outs[0][1])
    assert _check(r0, out, world=2) == reference_losses


def test_srun_environment(job, reference_losses):
    """Two tasks as srun starts them: only SLURM_* set; rank, world and master address come from them."""
    tmp, config = job
    out = tmp / "srun"
    procs = []
    for task in range(2):
        env = subprocess_env(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID=str(task), SLURM_LOCALID=str(task),
                   SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="localhost",
                   SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()) if task == 0 else "")
        procs.append(env)
    procs[1]["MASTER_PORT"] = procs[0]["MASTER_PORT"]  # the sbatch script exports one port for the job
    running = [subprocess.Popen([sys.executable, "-m", "medscale.cli", *_train_args(config, out)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in procs]
    outs = [p.communicate(timeout=180) for p in running]
    r0 = subprocess.CompletedProcess([], running[0].returncode, outs[0][0], outs[0][1])
    assert running[1].returncode == 0, outs[1][1][-3000:]
    assert _check(r0, out, world=2) == reference_losses


def test_plain_process(job):
    """No launcher, one process: the same command with dist.nproc=1."""
    tmp, config = job
    out = tmp / "plain"
    r = _run([sys.executable, "-m", "medscale.cli", *_train_args(config, out), "dist.nproc=1"], subprocess_env())
    assert "deepspeed.launcher" not in r.stdout
    losses = _check(r, out, world=1)
    assert all(0 < x < 5 for x in losses)
