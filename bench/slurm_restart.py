"""Benchmark: what a requeue costs under Slurm, on the project's own test cluster.

Starts `slurm/testing/cluster.sh` (needs root and slurm-wlm), submits `slurm/train.sbatch` on two
CPU ranks of one node (the tests' tiny ViT, fp32 ZeRO-2), warns it as Slurm's --signal=B:USR2
does once it trains, and times from the log:

- ``first_start_to_step_s``: from the job's first "start" line to its first logged step;
- ``restart_to_step_s``: the same after the requeue (imports, engine, checkpoint load, loader);
- ``warning_to_exit_s``: from the warning to the "requeueing" line (save plus one step);
- ``requeue_gap_s``: from "requeueing" to the next "start" line (Slurm's hold: cred_expire, set
  to ``--cred-expire`` on the test cluster; 120 s by default on a real one).

Each start's figure counts from the batch script's first line, so it includes the time the script
takes to resolve the config. The machine should be otherwise idle. The last output line is one
JSON object.

    python bench/slurm_restart.py [--steps 400] [--cred-expire 10]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import tempfile
import time
from pathlib import Path

from medscale.synthetic import write_tiny_shards
from medscale.testing.slurm import missing_slurm, start_cluster, stop_cluster, wait_for
from medscale.train.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]

LINE = re.compile(r"medscale-slurm: (\S+ \S+) job \d+ restart (\d+): (.*)")
STEP = re.compile(r"(\S+ \S+),(\d+) \[rank0\] INFO medscale.train: step \d+/")


def _stamp(text: str, ms: str = "0") -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S").timestamp() + int(ms) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--cred-expire", type=int, default=10)
    args = ap.parse_args()
    why = missing_slurm()
    if why:  # `make bench` goes on with the others
        print(json.dumps({"bench": "slurm_restart", "skipped": why}))
        return
    import os

    import yaml

    os.environ["SLURM_TEST_CRED_EXPIRE"] = str(args.cred_expire)
    tmp = Path(tempfile.mkdtemp(prefix="medscale-bench-slurm-"))
    cluster = start_cluster(tmp / "cluster", cpus=2)
    try:
        write_tiny_shards(tmp / "shards", {"train": [20, 20, 8], "val": [6], "test": [12]}, size=16)
        config = {
            "out_dir": str(tmp / "run"),
            "data": {"shards": str(tmp / "shards"), "image_size": 16, "channels": 1, "num_workers": 1},
            "model": {"name": "test_vit", "patch_size": 8, "num_classes": 2},
            "train": {"steps": args.steps, "micro_batch_size": 2, "warmup_steps": 2, "log_every": 1,
                      "precision": "fp32"},
            "dist": {"deepspeed_config": str(ROOT / "ds_configs" / "cpu_zero2.json")},
            "eval": {"micro_batch_size": 4, "bootstrap": 0},
        }
        (tmp / "run.yaml").write_text(yaml.safe_dump(config))
        log = tmp / "job.log"
        job = cluster.sbatch("-N", "1", "-n", "2", "-o", log, ROOT / "slurm" / "train.sbatch", tmp / "run.yaml",
                             cwd=tmp)
        wait_for(lambda: max((r["step"] for r in read_metrics(tmp / "run")[0] if "train/loss" in r), default=0) >= 20,
                 300, "the first steps")
        warned = time.time()
        cluster.warn(job)
        info = cluster.wait_final(job, 600)
        lines = log.read_text().splitlines()
    finally:
        stop_cluster(tmp / "cluster")

    starts, steps, requeue = [], [], None
    for line in lines:
        m = LINE.match(line)
        if m and m.group(3).startswith("start on"):
            starts.append(_stamp(m.group(1)))
            steps.append(None)
        elif m and "requeueing" in m.group(3):
            requeue = _stamp(m.group(1))
        s = STEP.match(line)
        if s and steps and steps[-1] is None:
            steps[-1] = _stamp(s.group(1), s.group(2))
    result = {
        "bench": "slurm_restart",
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "job_state": info.get("JobState"), "restarts": int(info.get("Restarts", 0)),
        "first_start_to_step_s": round(steps[0] - starts[0], 1),
        "restart_to_step_s": round(steps[1] - starts[1], 1) if len(starts) > 1 and steps[1] else None,
        "warning_to_exit_s": round(requeue - warned, 1) if requeue else None,
        "requeue_gap_s": round(starts[1] - requeue, 1) if requeue and len(starts) > 1 else None,
        "cred_expire_s": args.cred_expire, "steps": args.steps,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
