"""The project's Slurm test cluster, driven from Python: the Slurm tests (tests/slurm) and
bench/slurm_restart.py submit the real sbatch templates to it.

The cluster is `slurm/testing/cluster.sh` of a source checkout: munged, slurmctld and two slurmd
nodes (n1, n2) on this machine, as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["Cluster", "missing_slurm", "start_cluster", "stop_cluster", "wait_for", "restart_lines", "ROOT",
           "SLURM"]

ROOT = Path(__file__).resolve().parents[3]  # the checkout: src/medscale/testing/ -> .
SLURM = ROOT / "slurm"
CLUSTER_SH = SLURM / "testing" / "cluster.sh"
BIN = Path(sys.executable).parent
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


def missing_slurm() -> str | None:
    """Why the Slurm tests cannot run here, or None."""
    if not CLUSTER_SH.is_file():
        return f"no {CLUSTER_SH}: the test cluster runs from a source checkout"
    absent = [b for b in DAEMONS if shutil.which(b) is None]
    if absent:
        return f"Slurm is not installed (no {', '.join(absent)})"
    if os.geteuid() != 0:
        return "the test cluster needs root (slurmd starts jobs as their users)"
    return None


class Cluster:
    """A running test cluster: submit the templates, read job state, send signals."""

    def __init__(self, state_dir: Path):
        self.dir = state_dir
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT")}
        # Jobs inherit this environment (sbatch --export=ALL): the venv's medscale first on PATH.
        self.env.update(SLURM_CONF=str(state_dir / "slurm.conf"), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
                        OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def run(self, *cmd: str | Path, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in cmd], env=kw.pop("env", self.env), capture_output=True, text=True,
                              check=check, timeout=kw.pop("timeout", 60), **kw)

    def sbatch(self, *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit; returns the job id. `args`: sbatch options, the script, then its arguments."""
        r = self.run("sbatch", "--parsable", *args, env={**self.env, **(env or {})}, cwd=cwd, check=False)
        assert r.returncode == 0, f"sbatch failed: {r.stderr}"
        return r.stdout.strip().split(";")[0]

    def job(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        r = self.run("scontrol", "-o", "show", "job", job, check=False)
        if r.returncode != 0:
            return {}
        fields: dict[str, str] = {}
        for item in r.stdout.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def state(self, job: str) -> str:
        return self.job(job).get("JobState", "UNKNOWN")

    def wait_final(self, job: str, timeout: float) -> dict[str, str]:
        """Wait until the job has ended for good (a requeued job passes through PENDING again)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job)
            if info.get("JobState") in FINAL:
                return info
            time.sleep(1)
        raise AssertionError(f"job {job} did not end within {timeout:.0f} s: {self.job(job)}")

    def warn(self, job: str, signal: str = "USR2") -> None:
        """What Slurm does before a time limit or preemption with --signal=B:USR2: signal the batch shell."""
        self.run("scancel", f"--signal={signal}", "--batch", job)

    def cancel(self, job: str) -> None:
        self.run("scancel", job)


def start_cluster(state_dir: Path, cpus: int) -> Cluster:
    env = {**os.environ, "SLURM_TEST_CPUS": str(cpus)}
    r = subprocess.run(["bash", str(CLUSTER_SH), "start", str(state_dir)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"cluster.sh start failed:\n{r.stdout}\n{r.stderr}"
    return Cluster(state_dir)


def stop_cluster(state_dir: Path) -> str:
    r = subprocess.run(["bash", str(CLUSTER_SH), "stop", str(state_dir)], capture_output=True, text=True, timeout=120)
    return r.stdout + r.stderr


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def restart_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("medscale-slurm:")] if log.exists() else []
