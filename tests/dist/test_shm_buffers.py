"""No run leaves DeepSpeed's shared-memory all-reduce buffers behind in /dev/shm.

On the CPU accelerator with every rank on one host (LOCAL_SIZE == WORLD_SIZE, as the deepspeed
launcher sets), DeepSpeed creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>,
66 MB each, and never unlinks it. /dev/shm is RAM: a CI run of the suite left 17 GB there and
was OOM-killed. `medscale.dist.init_distributed` unlinks each rank's name once all have mapped it.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from medscale.dist import SHM_DIR, free_port
from tests.conftest import subprocess_env

pytestmark = pytest.mark.integration

RANK_SCRIPT = r"""
import os, signal, sys
import torch
from medscale.cli import _pin_build_environment
_pin_build_environment()  # the trainer's extension cache: no JIT rebuild of the shm op
import deepspeed, deepspeed.comm as ds_comm
from deepspeed.comm import comm as ds_state  # cdb is set there at init
from medscale.dist import init_distributed, shm_buffer_path
rank, mode = int(os.environ["RANK"]), sys.argv[1]
if mode == "deepspeed":  # DeepSpeed alone: the premise, the buffer is there after init
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    assert ds_state.cdb.shm_comm_op is not None, "DeepSpeed's shm op was not loaded"
    assert os.path.exists(shm_buffer_path(rank)), os.listdir("/dev/shm")
    torch.distributed.barrier()
    os.unlink(shm_buffer_path(rank))
    sys.exit(0)
init_distributed()
assert ds_state.cdb.shm_comm_op is not None
assert not os.path.exists(shm_buffer_path(rank)), shm_buffer_path(rank)
t = torch.full((1000,), float(rank + 1))
ds_comm.inference_all_reduce(t)  # the shm all-reduce still works on the unlinked buffers
assert torch.all(t == 3.0), t[:4]
torch.distributed.barrier()
if rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)  # a killed rank leaves nothing behind either
os._exit(0)  # no shutdown: its barrier would meet the dead rank
"""


def _launch(mode: str) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = subprocess_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, mode], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    leftover = glob.glob(os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))
    for f in leftover:
        os.unlink(f)
    assert not leftover, f"{mode}: left in {SHM_DIR}: {leftover}"
    return results


@pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="no /dev/shm")
def test_deepspeed_alone_creates_the_buffers_medscale_unlinks_them_even_when_killed():
    premise = _launch("deepspeed")
    assert [r.returncode for r in premise] == [0, 0], "\n".join(r.stdout[-3000:] for r in premise)
    ours = _launch("medscale")
    assert ours[0].returncode == 0, ours[0].stdout[-3000:]
    assert ours[1].returncode == -9, ours[1].stdout[-3000:]
