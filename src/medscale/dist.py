"""Process-group set-up that works the same under deepspeed, torchrun, srun or no launcher."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as torch_dist

if TYPE_CHECKING:
    from medscale.config import RunConfig

__all__ = ["DistInfo", "relaunch", "launched", "env_from_slurm", "init_distributed", "barrier", "all_gather_objects"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a launcher that already set up ranks (deepspeed, torchrun, srun with >1 task)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ


def env_from_slurm() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR from SLURM_* when srun started us directly."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
        first = ""
        if nodes:
            try:
                out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
                first = out.stdout.split()[0]
            except (OSError, subprocess.CalledProcessError, IndexError):
                first = ""
        os.environ["MASTER_ADDR"] = first or "127.0.0.1"
    os.environ.setdefault("MASTER_PORT", "29500")


def init_distributed() -> DistInfo:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU) through DeepSpeed, single process included."""
    import deepspeed

    env_from_slurm()
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port()) if os.environ["WORLD_SIZE"] == "1" else "29500"
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(dist_backend=None, verbose=False)
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
    return DistInfo(torch_dist.get_rank(), torch_dist.get_world_size(), local)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (objects travel pickled over the default group)."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def relaunch(cfg: "RunConfig", command: list[str]) -> int:
    """Start `cfg.dist.nproc` local ranks of `medscale COMMAND` with the deepspeed launcher.

    The resolved config is written to the run directory and handed to every rank, so the ranks
    cannot disagree about it. Returns the launcher's exit code.
    """
    import sys
    from pathlib import Path

    from medscale.config import save_config

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / "launch_config.yaml"
    save_config(cfg, resolved)
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", str(cfg.dist.nproc),
           "--master_port", str(cfg.dist.master_port), "--no_local_rank", "--module", "medscale.cli",
           *command, "--config", str(resolved)]
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)
