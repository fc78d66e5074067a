"""Benchmark: cost of a medscale training step against a bare DeepSpeed engine loop.

One rank, same model, batch and DeepSpeed config. The medscale side runs what `train()` runs per
micro-batch (the throughput meter's batch wrapper, `train_step` with its loss over valid samples
and the numerics guard, the loss bookkeeping); the bare side is `deepspeed.initialize` with a
plain AdamW and ``engine(x) -> cross_entropy -> backward -> step``. Both engines live in one
process and alternate step by step, so load from other processes hits both alike; the figure is
the median over steps of (medscale step time / adjacent bare step time). The last output line is
one JSON object.

    python bench/step.py [--model vit_tiny_patch16_224 --img 128 --batch 16 --steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--img", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30, help="timed steps per side (after warm-up)")
    p.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "cpu_zero2.json"))
    p.add_argument("--precision", default=None, choices=["bf16", "fp32", "fp16"],
                   help="default: bf16 on a GPU, fp32 on a CPU (CPUs without bf16 units emulate it, ~10x slower)")
    return p.parse_args()


def main() -> None:
    a = _args()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import torch
    import torch.nn.functional as F

    from medscale.config import RunConfig, from_dict
    from medscale.dist import init_distributed
    from medscale.train.engine import build_engine, input_dtype, resolve_ds_config
    from medscale.train.numerics import NumericsGuard
    from medscale.tasks.base import build_task
    from medscale.models import create_model
    from medscale.train.throughput import Throughput
    from medscale.train.loop import train_step

    dist = init_distributed()
    a.precision = a.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    cfg = from_dict(RunConfig, {
        "model": {"name": a.model, "num_classes": 2},
        "data": {"image_size": a.img, "channels": 3},
        "train": {"steps": 10**6, "micro_batch_size": a.batch, "precision": a.precision, "warmup_steps": 10,
                  "lr": 1e-4},
        "dist": {"deepspeed_config": a.ds_config},
    })
    ds_config = resolve_ds_config(cfg, dist.world)

    torch.manual_seed(0)
    engine = build_engine(create_model(cfg.model, img_size=a.img, in_chans=3), cfg, dist.world, ds_config)
    task = build_task(cfg, {"task": cfg.train.label_kind, "classes": [str(c) for c in range(cfg.model.num_classes)]})
    guard = NumericsGuard(engine, cfg.train, dist.world)
    meter = Throughput(a.batch, None, None, dist.world)

    import deepspeed

    torch.manual_seed(0)
    bare_model = create_model(cfg.model, img_size=a.img, in_chans=3)
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-4, weight_decay=0.05)
    bare, _, _, _ = deepspeed.initialize(model=bare_model, optimizer=bare_opt, config=dict(ds_config))

    dtype = input_dtype(engine)
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(a.batch, 3, a.img, a.img, generator=g),
                "target": torch.randint(0, 2, (a.batch,), generator=g),
                "valid": torch.ones(a.batch, dtype=torch.bool)} for _ in range(4)]
    losses: list[float] = []

    def medscale_block(n: int) -> list[float]:
        times = []
        t = time.perf_counter()
        for batch in meter.batches(batches[i % len(batches)] for i in range(n)):
            out = train_step(engine, batch, task, guard)  # what train() does per micro-batch
            if out.loss is not None:
                losses.append(out.loss)
            now = time.perf_counter()
            times.append(now - t)
            t = now
        return times

    def bare_block(n: int) -> list[float]:
        times = []
        for i in range(n):
            t = time.perf_counter()
            batch = batches[i % len(batches)]
            x, y = batch["image"].to(bare.device, dtype), batch["target"].to(bare.device)
            loss = F.cross_entropy(bare(x).float(), y)
            bare.backward(loss)
            bare.step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # medscale's step syncs on the loss value; time the same work
            times.append(time.perf_counter() - t)
        return times

    medscale_block(3)  # warm-up: allocator, kernels, first optimizer step
    bare_block(3)
    ours, theirs = [], []
    for i in range(a.steps):  # alternate step by step (and which goes first), so load bursts hit both
        if i % 2:
            theirs += bare_block(1)
            ours += medscale_block(1)
        else:
            ours += medscale_block(1)
            theirs += bare_block(1)
    m, b = statistics.median(ours), statistics.median(theirs)
    paired = statistics.median(x / y for x, y in zip(ours, theirs))
    if os.environ.get("BENCH_DEBUG"):
        print("medscale", [round(x, 3) for x in ours], "\nbare", [round(x, 3) for x in theirs])
    figures = {
        "benchmark": "step", "model": a.model, "img": a.img, "batch": a.batch, "precision": a.precision,
        "zero_stage": engine.zero_optimization_stage(), "steps": a.steps,
        "medscale_step_s": round(m, 4), "deepspeed_step_s": round(b, 4),
        "medscale_mean_s": round(statistics.mean(ours), 4), "deepspeed_mean_s": round(statistics.mean(theirs), 4),
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "ratio_of_medians": round(m / b, 4),
        "ratio_vs_deepspeed": round(paired, 4),  # median of the per-step ratios of adjacent steps
    }
    from medscale.dist import shutdown

    del engine, bare
    shutdown()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
