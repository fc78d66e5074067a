"""Benchmark: medscale's checkpoint save/resume against DeepSpeed's bare save/load, the universal
conversion, and the peak memory of `medscale export`.

One rank, fp32 (a CPU), for each ZeRO stage asked (default 2 and 3): one engine takes a training step
(so the optimizer holds its moments), then saves and loads alternately, `repeats` times each way:
DeepSpeed's bare ``engine.save_checkpoint``/``load_checkpoint`` and medscale's ``Checkpointer.save``/
``resume`` (the train state as its only part, so both write the same engine state; resume includes
the safety check of every file, also timed alone as ``verify_s``). Each save starts after an
``os.sync()``. medscale's save fsyncs its completion marker, which on ext4 (data=ordered) writes the
checkpoint's data to disk first; DeepSpeed's does not, so the bare save is also timed followed by an
``os.sync()`` (``bare_save_then_sync_s``): the same durability. Loads read from the page cache.
``*_ratio_vs_deepspeed`` is the median over the repeats of medscale's time over the adjacent bare one
(``ratio_of_medians`` beside it); ``ratio_vs_deepspeed`` the worst of save and load,
``ratio_vs_deepspeed_then_sync`` the worst against the durable bare save. A save with the EMA as a
part is reported beside.

``ds_to_universal`` is timed on medscale's last checkpoint (1 extract and 1 merge worker). Export's
peak memory is the peak resident set (VmHWM, read by the export process itself at its end) minus that
of a process that only imports what export imports, divided by the bytes of the fp32 weights
(``export_peak_ratio``): for the EMA and the trained weights of the checkpoint and for model.pt's EMA
(``--onnx`` adds an ONNX export, reported but left out of the headline ratio). ``read_mb`` is what the
export process read from the disk (/proc/self/io, after evicting the run's files from the page
cache): the weights, not the optimizer moments beside them in ``optim_states_mb``. The last output
line is one JSON object.

    python bench/checkpoint.py [--model vit_base_patch16_224 --stages 2 3 --repeats 5 --onnx]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--repeats", type=int, default=5, help="saves and loads per side and stage")
    p.add_argument("--onnx", action="store_true", help="also time `medscale export --onnx` (and its peak memory)")
    p.add_argument("--workdir", help="where checkpoints go (default: a temporary directory, removed after)")
    return p.parse_args()


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return dict(env, OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))


# The child reports its own peak resident set (VmHWM): the ru_maxrss that wait4 gives a parent counts
# the pages the child shared with it between fork and exec, i.e. the parent's whole resident set.
# It also reports the bytes it had the block layer read (/proc/self/io read_bytes, page faults on
# memory maps included): with the checkpoint's pages evicted first, what export really read.
_HWM = ("import sys\n{body}\nhwm = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
        "io = dict(line.split(': ') for line in open('/proc/self/io').read().splitlines())\n"
        "print('VMHWM_KB', hwm, 'READ_BYTES', int(io['read_bytes']), file=sys.stderr)\nsys.exit(rc)\n")


def _peak_rss(body: str, *args: str) -> tuple[int, float, int]:
    """Run `body` (Python that sets ``rc``) in a fresh interpreter; its peak resident set (bytes), seconds
    and bytes read from the disk."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _HWM.format(body=body), *args], cwd=ROOT, env=_child_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{body} {args} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    tail = r.stderr.rsplit("VMHWM_KB", 1)[1].split()
    return int(tail[0]) * 1024, time.perf_counter() - t, int(tail[2])


def _evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (clean pages only: sync first)."""
    os.sync()
    for f in paths:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    a = _args()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import torch
    import torch.nn.functional as F

    from medscale.checkpoint.checkpointer import Checkpointer, TrainState
    from medscale.checkpoint.safety import verify_checkpoint_files
    from medscale.checkpoint.weights import preprocess_record, save_weights
    from medscale.config import CheckpointConfig, RunConfig, from_dict, to_dict
    from medscale.dist import init_distributed, shutdown
    from medscale.models import create_model
    from medscale.train.ema import ModelEma
    from medscale.train.engine import build_engine, resolve_ds_config

    dist = init_distributed()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    # What an export process imports before it reads a byte of weights: its baseline.
    baseline, _, _ = _peak_rss("import medscale.cli, medscale.checkpoint.export, medscale.checkpoint.safety, "
                            "deepspeed.utils.zero_to_fp32, timm, safetensors\nmedscale.checkpoint.safety.deepspeed_globals()"
                            "\nrc = 0")
    figures: dict = {"benchmark": "checkpoint", "model": a.model, "img": a.img, "precision": "fp32", "ranks": 1,
                     "repeats": a.repeats, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                     "export_baseline_rss_mb": round(baseline / 2**20, 1), "stages": {}}
    for stage in a.stages:
        run = work / f"zero{stage}"
        cfg = from_dict(RunConfig, {
            "out_dir": str(run), "model": {"name": a.model, "num_classes": 2},
            "data": {"image_size": a.img, "channels": 3},
            "train": {"steps": 1000, "micro_batch_size": 2, "precision": "fp32", "ema_decay": 0.999},
            "dist": {"deepspeed_config": str(ROOT / "ds_configs" / f"cpu_zero{stage}.json")},
        })
        torch.manual_seed(0)
        engine = build_engine(create_model(cfg.model, img_size=a.img, in_chans=3), cfg, 1, resolve_ds_config(cfg, 1))
        x, y = torch.randn(2, 3, a.img, a.img), torch.tensor([0, 1])
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()  # the optimizer now holds its moments
        ema = ModelEma(engine, cfg.train.ema_decay)
        ema.update()

        bare_root = run / "bare"
        # keep: no pruning inside the timed saves (the bare side deletes outside them too)
        ck = Checkpointer(CheckpointConfig(every_steps=1, keep=a.repeats + 2), run, dist, last_step=10**6,
                          config=to_dict(cfg))
        parts = {"train": TrainState(step=1)}
        names = ("bare_save", "bare_save_sync", "medscale_save", "bare_load", "medscale_load", "verify")
        times: dict[str, list[float]] = {k: [] for k in names}
        sizes: dict[str, int] = {}
        for r in range(a.repeats):
            order = ("bare", "medscale") if r % 2 == 0 else ("medscale", "bare")  # alternate who goes first
            for side in order:
                os.sync()  # each save starts with no dirty pages of the one before
                t = time.perf_counter()
                if side == "bare":
                    engine.save_checkpoint(str(bare_root), tag=f"bare{r}", client_state={"step": r}, save_latest=False)
                    times["bare_save"].append(time.perf_counter() - t)
                    os.sync()  # what medscale's fsync of complete.json costs on top (ext4 writes the data first)
                    times["bare_save_sync"].append(time.perf_counter() - t)
                    sizes["bare"] = _bytes(bare_root / f"bare{r}")
                else:
                    path = ck.save(engine, r + 1, parts)
                    times["medscale_save"].append(time.perf_counter() - t)
                    sizes["medscale"] = _bytes(path)
            for side in order:
                t = time.perf_counter()
                if side == "bare":
                    loaded, _ = engine.load_checkpoint(str(bare_root), tag=f"bare{r}")
                    assert loaded is not None
                    times["bare_load"].append(time.perf_counter() - t)
                else:
                    assert ck.resume(engine, parts) is not None
                    times["medscale_load"].append(time.perf_counter() - t)
            t = time.perf_counter()
            verify_checkpoint_files(path)  # the part of resume that is this safety check
            times["verify"].append(time.perf_counter() - t)
            shutil.rmtree(bare_root / f"bare{r}")
            for old in (run / "checkpoints").glob("step*"):
                if old != path:
                    shutil.rmtree(old)
        med = {k: statistics.median(v) for k, v in times.items()}
        paired = {k: statistics.median(m / b for m, b in zip(times[f"medscale_{x}"], times[f"bare_{y}"]))
                  for k, x, y in (("save", "save", "save"), ("save_sync", "save", "save_sync"), ("load", "load", "load"))}

        # With the EMA as a part (what a real run saves), then the run's final weights for the export.
        t = time.perf_counter()
        last = ck.save(engine, a.repeats + 1, {"train": TrainState(step=a.repeats + 1), "ema": ema})
        ema_save = time.perf_counter() - t
        save_weights(engine, ema, cfg, preprocess_record(cfg, ["a", "b"]), run, dist)
        final = torch.load(run / "model.pt", map_location="cpu", mmap=True, weights_only=True)["model"]
        weight_bytes = sum(v.numel() * v.element_size() for v in final.values())  # the fp32 weights
        del final

        uni = last.with_name(last.name + "_universal")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(last),
                        "--output_folder", str(uni), "--inject_missing_state", "--num_extract_workers", "1",
                        "--num_merge_workers", "1"], cwd=ROOT, env=_child_env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        universal_s = time.perf_counter() - t
        universal_bytes = _bytes(uni)
        shutil.rmtree(uni)
        (run / "checkpoints" / "latest_universal").unlink(missing_ok=True)

        del engine, ema
        gc.collect()
        exports = {}
        cases = {"checkpoint_ema": ["--checkpoint", last.name], "checkpoint_trained": ["--checkpoint", last.name,
                                                                                        "--no-ema"],
                 "model_pt_ema": []}
        if a.onnx:
            cases["model_pt_ema_onnx"] = ["--onnx"]
        sources = [f for f in (run / "checkpoints").rglob("*.pt")] + [run / "model.pt"]
        for name, extra in cases.items():
            out = run / f"export_{name}"
            _evict(sources)
            rss, seconds, read = _peak_rss("import medscale.cli\nrc = medscale.cli.main(sys.argv[1:])", "export",
                                           str(run), "--out", str(out), *extra)
            exports[name] = {"seconds": round(seconds, 2), "peak_rss_mb": round(rss / 2**20, 1),
                             "export_peak_ratio": round((rss - baseline) / weight_bytes, 3),
                             "read_mb": round(read / 2**20, 1)}
            shutil.rmtree(out)
        figures["stages"][str(stage)] = {
            "fp32_weight_mb": round(weight_bytes / 2**20, 1),
            "bare_save_s": round(med["bare_save"], 3), "medscale_save_s": round(med["medscale_save"], 3),
            "bare_load_s": round(med["bare_load"], 3), "medscale_load_s": round(med["medscale_load"], 3),
            "bare_bytes": sizes["bare"], "medscale_bytes": sizes["medscale"],
            "bare_save_then_sync_s": round(med["bare_save_sync"], 3), "verify_s": round(med["verify"], 4),
            "optim_states_mb": round(sum(f.stat().st_size for f in last.glob("*optim_states.pt")) / 2**20, 1),
            "checkpoint_mb": round(_bytes(last) / 2**20, 1),
            # medians of the per-repeat ratios of adjacent saves (loads): the bursts of other load hit both
            "save_ratio_vs_deepspeed": round(paired["save"], 3),
            "save_ratio_vs_deepspeed_then_sync": round(paired["save_sync"], 3),
            "load_ratio_vs_deepspeed": round(paired["load"], 3),
            "ratio_of_medians": {"save": round(med["medscale_save"] / med["bare_save"], 3),
                                 "save_then_sync": round(med["medscale_save"] / med["bare_save_sync"], 3),
                                 "load": round(med["medscale_load"] / med["bare_load"], 3)},
            "times_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "save_with_ema_s": round(ema_save, 3), "bytes_with_ema": _bytes(last),
            "universal_conversion_s": round(universal_s, 2), "universal_bytes": universal_bytes,
            "export": exports,
        }
        shutil.rmtree(run)
    stages = figures["stages"].values()
    figures["ratio_vs_deepspeed"] = max(max(s["save_ratio_vs_deepspeed"], s["load_ratio_vs_deepspeed"]) for s in stages)
    figures["ratio_vs_deepspeed_then_sync"] = max(max(s["save_ratio_vs_deepspeed_then_sync"],
                                                      s["load_ratio_vs_deepspeed"]) for s in stages)
    figures["export_peak_ratio"] = max(e["export_peak_ratio"] for s in stages for n, e in s["export"].items()
                                       if not n.endswith("onnx"))
    figures["targets"] = {"ratio_vs_deepspeed": 1.10, "export_peak_ratio": 2.0}
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    shutdown()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
