"""Loader under real torch.distributed (gloo), several data-loader workers per rank.

Each rank is a separate process (this file run as a script) that all-reduces once per batch, as
DDP/ZeRO do: a rank with fewer batches than its peers would hang there (the process group's
timeout turns that into a failure). Resume tests kill the ranks with SIGKILL mid-epoch while
their workers are prefetching, restart from the last state each rank recorded, possibly with a
different number of ranks, and compare every sample key with the epoch's global sequence.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medscale.dist import free_port

pytestmark = pytest.mark.integration

MB = 3
WORKERS = 2



def _cfg(workers: int):
    from medscale.config import DataConfig

    return DataConfig(image_size=16, channels=1, num_workers=workers, shuffle_block=16)


# -- the rank process -------------------------------------------------------------------------------


def _rank_main(a: dict) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from medscale.data.loader import ShardStream, make_loader

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a['port']}", rank=a["rank"],
                            world_size=a["world"], timeout=timedelta(seconds=45))
    out = open(a["out"], "a")

    def emit(rec: dict) -> None:
        out.write(json.dumps(rec) + "\n")
        out.flush()

    for p in a["passes"]:
        s = ShardStream(a["root"], p["split"], _cfg(a["workers"]), micro_batch=MB, rank=a["rank"],
                        world=a["world"], train=p["train"], seed=3)
        if p.get("state"):
            s.load_state_dict(p["state"])
        s.set_epoch(s.epoch)  # what the trainer's epoch loop does
        n = 0
        for batch in make_loader(s):
            t = torch.ones(1)
            dist.all_reduce(t)  # stands in for the gradient all-reduce
            n += 1
            emit({"pass": p["name"], "step": n, "keys": batch["key"], "valid": batch["valid"].tolist(),
                  "state": s.state_dict()})
            if p.get("pause_after") == n:
                emit({"pass": p["name"], "paused": True})
                time.sleep(300)  # killed here, workers alive and prefetching
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(a["world"])]
        dist.all_gather(counts, torch.tensor([n]))
        emit({"pass": p["name"], "done": True, "batches": n, "all": [int(c) for c in counts],
              "expected": s.batches_per_epoch(), "remaining_at_start": len(s) if not p["train"] else None})
    emit({"exit": True})
    from medscale.dist import shutdown

    shutdown()  # the loader's count all-reduce must not leave a group alive at exit (gloo aborts)


# -- helpers for the tests --------------------------------------------------------------------------


def _launch(tmp: Path, tag: str, world: int, root: Path, passes: list[dict]) -> list[tuple[subprocess.Popen, Path]]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for rank in range(world):
        out = tmp / f"{tag}-rank{rank}.jsonl"
        args = {"port": port, "rank": rank, "world": world, "workers": WORKERS, "root": str(root),
                "passes": passes, "out": str(out)}
        with open(tmp / f"{tag}-rank{rank}.log", "w") as log:
            p = subprocess.Popen([sys.executable, __file__, json.dumps(args)], stdout=log, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True)  # own group: SIGKILL reaches its workers too
        procs.append((p, out))
    return procs


def _records(out: Path) -> list[dict]:
    if not out.exists():
        return []
    lines = out.read_text().split("\n")
    return [json.loads(line) for line in lines[:-1]]  # the last piece is "" or a line still being written


def _wait(procs, until: str, timeout: float = 90.0) -> list[list[dict]]:
    """Wait until every rank has written a record with key ``until``; fail at once if a rank dies."""
    deadline = time.monotonic() + timeout
    while True:
        recs = [_records(out) for _, out in procs]
        if all(any(r.get(until) for r in rs) for rs in recs):
            return recs
        for (p, out), rs in zip(procs, recs):
            if p.poll() not in (None, 0):
                log = out.with_suffix(".log").read_text()
                _kill(procs)
                pytest.fail(f"rank exited with {p.returncode}:\n{log[-3000:]}")
        if time.monotonic() > deadline:
            _kill(procs)
            pytest.fail(f"timed out waiting for {until!r} (a hang?)")
        time.sleep(0.2)


def _kill(procs) -> None:
    for p, _ in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the rank's own process group: it and its workers
        p.wait()


def _finish(procs) -> list[list[dict]]:
    recs = _wait(procs, "exit")
    for p, out in procs:
        code = p.wait(timeout=30)
        assert code == 0, f"rank exited with {code} after its last record:\n{out.with_suffix('.log').read_text()[-3000:]}"
    return recs


def _sequence(root: Path) -> list[str]:
    """The epoch's global sequence: one sample per step with one rank."""
    from medscale.data.loader import ShardStream, make_loader

    s = ShardStream(str(root), "train", _cfg(0), micro_batch=1, seed=3)
    return [b["key"][0] for b in make_loader(s)]


def _steps(recs: list[list[dict]], name: str) -> list[list[str]]:
    """Keys of each step, over all ranks (the global batch)."""
    per_rank = [[r["keys"] for r in rs if r.get("pass") == name and "keys" in r] for rs in recs]
    assert len({len(x) for x in per_rank}) == 1
    return [sorted(k for rank in per_rank for k in rank[i]) for i in range(len(per_rank[0]))]


# -- the tests ---------------------------------------------------------------------------------------


def test_equal_batches_on_every_rank_with_uneven_and_too_few_shards(shard_factory, tmp_path):
    # 3 shards of very different sizes for 2 ranks x 2 workers = 4 slots.
    _, root = shard_factory({"train": [37, 5, 1], "test": [11, 1, 6]})
    procs = _launch(tmp_path, "even", 2, root, [{"name": "train", "split": "train", "train": True},
                                                {"name": "test", "split": "test", "train": False}])
    recs = _finish(procs)
    for rs in recs:
        train, test = [r for r in rs if r.get("done")]
        assert train["all"] == [train["expected"]] * 2 == [43 // (2 * MB)] * 2
        assert test["all"] == [test["expected"]] * 2
    seq = _sequence(root)
    g = 2 * MB
    assert _steps(recs, "train") == [sorted(seq[i * g:(i + 1) * g]) for i in range(43 // g)]
    valid = [k for rs in recs for r in rs if r.get("pass") == "test" and "keys" in r
             for k, v in zip(r["keys"], r["valid"]) if v]
    assert len(valid) == len(set(valid)) == 18  # every eval sample exactly once, padding flagged


@pytest.mark.parametrize("before,after", [(2, 2), (2, 1), (1, 2)])
def test_kill_and_resume_mid_epoch_repeats_and_skips_nothing(shard_factory, tmp_path, before, after):
    _, root = shard_factory({"train": [31, 8, 19, 2]})  # 60 samples
    n = 60
    first = _launch(tmp_path, "first", before, root,
                    [{"name": "e0", "split": "train", "train": True, "pause_after": 3}])
    recs = _wait(first, "paused")
    _kill(first)
    # The checkpoint: the state each rank recorded after its last finished step (the same on all).
    states = [[r["state"] for r in rs if "state" in r][-1] for rs in recs]
    assert all(s == states[0] for s in states)
    state = states[0]
    assert state["position"] == 3 * before * MB
    head = _steps(recs, "e0")

    second = _launch(tmp_path, "second", after, root, [{"name": "e0", "split": "train", "train": True,
                                                        "state": state}])
    tail_recs = _finish(second)
    tail = _steps(tail_recs, "e0")

    seq = _sequence(root)
    p, g = state["position"], after * MB
    assert head == [sorted(seq[i * before * MB:(i + 1) * before * MB]) for i in range(3)]
    assert tail == [sorted(seq[p + i * g:p + (i + 1) * g]) for i in range((n - p) // g)]
    consumed = [k for b in head + tail for k in b]
    assert len(consumed) == len(set(consumed))  # none repeated
    end = p + (n - p) // g * g
    assert sorted(consumed) == sorted(seq[:end])  # none skipped (only the ragged tail < one global batch)
    if before == after:
        # Same world size: each rank sees exactly what an uninterrupted run gives it, in order.
        from medscale.data.loader import ShardStream, make_loader

        for rank in range(after):
            full = [b["key"] for b in make_loader(ShardStream(str(root), "train", _cfg(0), micro_batch=MB,
                                                              rank=rank, world=after, seed=3))]
            mine = [r["keys"] for r in recs[rank] if "keys" in r] + [r["keys"] for r in tail_recs[rank] if "keys" in r]
            assert mine == full


if __name__ == "__main__":
    _rank_main(json.loads(sys.argv[1]))
