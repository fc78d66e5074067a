"""Benchmark: medscale training on one GPU against plain PyTorch AMP, and its loader against synthetic data.

One process, one device, in this order (rows that no longer fit ``--budget-s`` are skipped and
say so; the estimate is printed first):

- the measured bf16 matmul peak: large square GEMMs (4096, 8192, 16384), best TFLOP/s;
- for each model (default vit_large_patch16_224 and vit_base_patch16_224 at 224 px, 3 channels,
  2 classes), on synthetic tensors already on the device, eager and then with torch.compile:
  ``plain``: the same timm model in PyTorch AMP (autocast bf16, fp32 weights, fused AdamW over the
  same parameter groups, grad clipping 1.0) -- the reference;
  ``medscale bf16``: `build_engine` (DeepSpeed ZeRO-2, ``ds_configs/zero2.json``) and `train_step`,
  what `train()` runs per micro-batch (loss over valid samples, numerics guard, its loss sync);
  ``medscale fp16``: the same with fp16 and DeepSpeed's dynamic loss scaling (overflow steps and
  the final loss scale are reported);
  compiled rows use ``train.compile=true`` (DeepSpeed's ``engine.compile()``) and, for the plain
  side, ``model.compile()``, both static shapes;
- ``loader_vs_synthetic``: the loader model (default ViT-B, the harder one to feed) trained by the
  same medscale bf16 engine from shards on local disk through `ShardStream` + `make_loader`
  (synthetic CT from `medscale.demo` prepped by `medscale.prep`, the training transform: 3 CT
  windows, random resized crop to 224, rotation), right after its synthetic-tensor row; the
  ratio of the two images/s.

Per row: images/s, model FLOPs utilisation against the measured matmul peak and against the card's
datasheet dense bf16 peak (medscale's table: H100 SXM/H200 989 TFLOP/s, A100 312; null when the
card is not in it), peak memory (``torch.cuda.max_memory_allocated``, reset per row), compile and
first-step time. Model FLOPs: the forward counted on the meta device (`flops_per_sample`) times 3
for training, i.e. 6 x MACs (issue 13 quotes 17.6 / 61.6 GMACs for ViT-B/16 / ViT-L/16 at 224;
both figures are printed). Warm-up steps are excluded; the device is synchronised around timers.
Every row names the card. The last output line is one JSON object.

On the GPU machine (Python 3.12, torch and timm installed, no network): prepare the wheels here
with ``bash bench/gpu_wheels.sh``, then run ``bash bench/gpu_device.sh`` there (it installs them
with ``pip install --no-index --no-deps`` and runs this script). By hand::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site bench/wheels/*.whl
    PYTHONPATH=/tmp/site:src python3 bench/gpu.py        # about 5.5 minutes on an H100/H200

``python bench/gpu.py --smoke`` runs every path at tiny size on the CPU (test_vit3 at 32 px,
bf16 and fp32; fp16 is skipped there; compile rows with the aot_eager backend, since inductor's
first C++ build takes about 30 s a graph on 2 cores) in well under a minute:
tests/unit/test_bench_gpu.py runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import inspect
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]

# What this script imports beyond the standard library, by import name. The GPU machine has torch,
# timm, numpy, yaml, tabulate; bench/gpu_wheels.sh carries the rest.
NEEDED = ("torch", "timm", "numpy", "yaml", "tabulate", "deepspeed", "hjson", "pydantic", "webdataset",
          "braceexpand", "pydicom", "zstandard")

# Issue 13's forward GMACs per 224 px image, printed beside the counted figure as a cross-check.
NOMINAL_GMACS = {"vit_base_patch16_224": 17.6, "vit_large_patch16_224": 61.6}
GPU_MODELS = ("vit_large_patch16_224", "vit_base_patch16_224")  # the headline target is ViT-L's
GPU_BATCH = {"vit_base_patch16_224": 256, "vit_large_patch16_224": 128}  # per GPU; fits 80 GB with room
WINDOWS = [[40.0, 400.0], [-600.0, 1500.0], [600.0, 2800.0]]  # soft tissue, lung, bone: 3 channels
CLASSES = ["normal", "lesion"]  # the demo corpus's classes

# Planning figures, used only to size the run before anything is measured (printed as assumptions).
ASSUMED_MFU_OF_MEASURED = 0.5  # step time estimate: model FLOPs at this fraction of the measured matmul peak
ASSUMED_COMPILE_S = {"vit_base_patch16_224": 40.0, "vit_large_patch16_224": 60.0}  # inductor, cold cache, fwd+bwd
ASSUMED_COMPILE_S_OTHER = 45.0
ASSUMED_SMOKE_COMPILE_S = 4.0  # aot_eager on test_vit3
CORPUS_S_PER_IMAGE = 0.004  # synthetic DICOM + prep, one core


@dataclasses.dataclass
class Sizes:
    """How big the run is: the GPU defaults, or tiny for --smoke."""

    models: tuple[str, ...]
    img: int
    patch: int  # 0 keeps the model's own
    batch: dict[str, int]
    warmup: int
    target_timed_s: float  # per row: timed steps are sized to last about this long
    min_steps: int
    max_steps: int
    gemm_sizes: tuple[int, ...]
    gemm_iters: int
    corpus_images: int  # distinct synthetic slices prepped into shards
    corpus_px: int  # their side length (the loader crops/resizes to img)
    budget_s: float


GPU_SIZES = Sizes(models=GPU_MODELS, img=224, patch=0, batch=dict(GPU_BATCH), warmup=5, target_timed_s=5.0,
                  min_steps=10, max_steps=60, gemm_sizes=(4096, 8192, 16384), gemm_iters=20,
                  corpus_images=1536, corpus_px=256, budget_s=330.0)
SMOKE_SIZES = Sizes(models=("test_vit3",), img=32, patch=8, batch={"test_vit3": 8}, warmup=2, target_timed_s=0.3,
                    min_steps=3, max_steps=4, gemm_sizes=(256, 512), gemm_iters=3, corpus_images=96,
                    corpus_px=48, budget_s=120.0)


@dataclasses.dataclass
class Spec:
    """One row to measure."""

    kind: str  # "plain" or "medscale"
    model: str
    precision: str  # bf16, fp16, fp32
    compile: bool
    loader: bool = False  # also train from shards right after the synthetic timed steps

    @property
    def name(self) -> str:
        what = "plain AMP bf16" if self.kind == "plain" else f"medscale {self.precision} ZeRO-2"
        return what + (" +compile" if self.compile else "")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: every path, a minute at most")
    p.add_argument("--quick", action="store_true", help="eager rows only, about 2 s timed per row")
    p.add_argument("--models", default="", help="comma list of timm models (default: ViT-L/16 and ViT-B/16)")
    p.add_argument("--batch", action="append", default=[], metavar="MODEL=N", help="micro-batch of a model")
    p.add_argument("--rows", default="plain,bf16,fp16", help="which of plain,bf16,fp16 (and fp32) to run")
    p.add_argument("--compile", choices=["both", "off", "on"], default="both",
                   help="eager rows, compiled rows, or both")
    p.add_argument("--compile-backend", default="", help="torch.compile backend (default: inductor; "
                   "--smoke: aot_eager)")
    p.add_argument("--loader-model", default="", help="model of the loader row (default: ViT-B, else the last model)")
    p.add_argument("--workers", type=int, default=0, help="loader workers (default: cores - 2, at most 14)")
    p.add_argument("--budget-s", type=float, default=0.0, help="stop starting rows after this many seconds "
                   "(default 330; --smoke 120)")
    p.add_argument("--plan-only", action="store_true", help="print the plan and the budget's choices, run nothing")
    p.add_argument("--assume-peak-tflops", type=float, default=790.0,
                   help="--plan-only: the matmul peak to plan with (an H200 measured about 790)")
    p.add_argument("--json", default="", help="also write the final JSON object to this file")
    return p.parse_args(argv)


def check_installed() -> list[str]:
    """The import names this script needs that are not installed."""
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


# -- device helpers ----------------------------------------------------------------------------------


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()  # note: timers must not stop while kernels are still queued


def _card() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _peak_mem_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None  # the process's RSS is not a per-row figure
    return torch.cuda.max_memory_allocated() / 2**30


def _free() -> None:
    """Release what the previous row left: compiled graphs, cycles (engines), cached blocks."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def matmul_peak(sizes: tuple[int, ...], iters: int) -> dict[str, Any]:
    """Best bf16 TFLOP/s of square GEMMs on random data (n^3 multiply-adds = 2 n^3 FLOPs)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    by_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        for _ in range(3):  # warm-up: cuBLAS heuristics, clocks up
            a @ b
        _sync()
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync()
        by_size[n] = 2 * n**3 * iters / (time.perf_counter() - t) / 1e12
        del a, b
    best = max(by_size, key=by_size.get)
    return {"tflops": by_size[best], "size": best, "by_size": {str(k): round(v, 1) for k, v in by_size.items()}}


# -- configuration --------------------------------------------------------------------------------


def run_config(spec: Spec, sz: Sizes, batch: int, shards: str = "", workers: int = 1) -> Any:
    """The RunConfig of a medscale row (its data section is what the loader row reads)."""
    import torch

    from medscale.config import DataConfig, RunConfig, from_dict

    cuda = torch.cuda.is_available()
    data: dict[str, Any] = {"shards": shards, "image_size": sz.img, "channels": 3, "windows": WINDOWS,
                            "normalize": "window", "num_workers": workers}
    # GPU-side transforms (data.transforms_on, issue 13): the workers only decode and crop, the device
    # resizes, windows and augments, in train_step's move to the device. Asked for explicitly on CUDA
    # ("auto" would choose it too). The hasattr keeps this script running on a medscale from before
    # the key, where the transforms run in the loader workers.
    if cuda and hasattr(DataConfig, "transforms_on"):
        data["transforms_on"] = "gpu"
    model: dict[str, Any] = {"name": spec.model, "num_classes": len(CLASSES)}
    if sz.patch:
        model["patch_size"] = sz.patch
    ds = ROOT / "ds_configs" / ("zero2.json" if cuda else "cpu_zero2.json")  # "auto" precision: bf16 and fp16
    return from_dict(RunConfig, {
        "data": data, "model": model,
        "train": {"steps": 10**6, "micro_batch_size": batch, "precision": spec.precision, "lr": 1e-4,
                  "warmup_steps": 10, "compile": spec.compile},
        "dist": {"deepspeed_config": str(ds)},
        "logging": {"wandb": False},
    })


def _create(spec: Spec, sz: Sizes) -> Any:
    import torch

    from medscale.config import ModelConfig
    from medscale.models import create_model

    torch.manual_seed(0)  # the same initial weights in every row
    return create_model(ModelConfig(name=spec.model, num_classes=len(CLASSES), patch_size=sz.patch),
                        img_size=sz.img, in_chans=3)


# -- timing ---------------------------------------------------------------------------------------


def _time_steps(step: Callable[[], Any], warmup: int, steps: int) -> dict[str, float]:
    """First step (compilation, kernel selection) and the rest of the warm-up untimed; then `steps` timed."""
    _sync()
    t = time.perf_counter()
    step()
    _sync()
    first = time.perf_counter() - t
    for _ in range(max(0, warmup - 1)):
        step()
    _sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return {"first_step_s": first, "timed_s": time.perf_counter() - t}


def _figures(row: dict[str, Any], batch: int, steps: int, timed_s: float, flops: float | None,
             measured_peak: float, datasheet_peak: float | None) -> None:
    """images/s and MFU against both peaks, into `row`."""
    from medscale.train.throughput import FWD_BWD_FLOPS

    rate = batch * steps / timed_s
    row.update(images_per_s=round(rate, 1), step_s=round(timed_s / steps, 4), steps=steps)
    achieved = FWD_BWD_FLOPS * flops * rate / 1e12 if flops else None
    row["model_tflops"] = round(achieved, 1) if achieved is not None else None
    row["mfu_vs_measured"] = round(achieved / measured_peak, 4) if achieved and measured_peak else None
    row["mfu_vs_datasheet"] = round(achieved / datasheet_peak, 4) if achieved and datasheet_peak else None


def run_plain(spec: Spec, sz: Sizes, batch: int, steps: int, backend: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """Plain PyTorch AMP: fp32 weights, autocast bf16, fused AdamW, clipping; synthetic tensors on the device."""
    import torch
    import torch.nn.functional as F

    from medscale.train.optim import param_groups

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    t = time.perf_counter()
    model = _create(spec, sz).to(dev)
    # The same parameter groups as medscale (no decay on norms, biases, embeddings), plain torch AdamW.
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, weight_decay=0.05, fused=cuda or None)
    if spec.compile:
        model.compile(backend=backend, dynamic=False)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, 3, sz.img, sz.img, device=dev, generator=g)
    y = torch.randint(0, len(CLASSES), (batch,), device=dev, generator=g)
    setup_s = time.perf_counter() - t
    losses: list[torch.Tensor] = []

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # no sync here: a plain loop reads its loss when it logs

    times = _time_steps(step, sz.warmup, steps)
    row = {"setup_s": round(setup_s, 2), **{k: round(v, 3) for k, v in times.items()},
           "loss_first": float(losses[0]), "loss_last": float(losses[-1])}
    _figures(row, batch, steps, times["timed_s"], ctx["flops"][spec.model], ctx["measured_peak"], ctx["datasheet"])
    return row


def run_medscale(spec: Spec, sz: Sizes, batch: int, steps: int, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """medscale's engine and train_step on synthetic tensors; with ``spec.loader`` the same engine then
    trains from shards through the real loader (a second row)."""
    import torch

    from medscale.train.engine import build_engine, input_dtype, resolve_ds_config
    from medscale.train.loop import train_step
    from medscale.train.numerics import NumericsGuard
    from medscale.tasks.base import build_task

    t = time.perf_counter()
    cfg = run_config(spec, sz, batch, shards=ctx.get("shards", ""), workers=ctx["workers"])
    engine = build_engine(_create(spec, sz), cfg, 1, resolve_ds_config(cfg, 1))
    try:
        task = build_task(cfg, {"task": "multiclass", "classes": CLASSES})
        guard = NumericsGuard(engine, cfg.train, 1)
        dtype = input_dtype(engine)
        g = torch.Generator(device=engine.device).manual_seed(0)
        batch_data = {"image": torch.randn(batch, 3, sz.img, sz.img, device=engine.device, generator=g).to(dtype),
                      "target": torch.randint(0, len(CLASSES), (batch,), device=engine.device, generator=g),
                      "valid": torch.ones(batch, dtype=torch.bool, device=engine.device)}
        setup_s = time.perf_counter() - t
        losses: list[float] = []

        def step() -> None:
            out = train_step(engine, batch_data, task, guard)  # what train() runs per micro-batch
            if out.loss is not None:
                losses.append(out.loss)

        times = _time_steps(step, sz.warmup, steps)
        row: dict[str, Any] = {"setup_s": round(setup_s, 2), **{k: round(v, 3) for k, v in times.items()},
                               "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                               "zero_stage": engine.zero_optimization_stage(),
                               "nonfinite_skipped": guard.nonfinite_total}
        if guard.fp16:
            row.update(overflow_steps=guard.overflow_total, loss_scale=guard.loss_scale())
        _figures(row, batch, steps, times["timed_s"], ctx["flops"][spec.model], ctx["measured_peak"], ctx["datasheet"])
        rows = [row]
        if spec.loader:
            rows.append(_loader_row(engine, task, guard, cfg, sz, batch, steps, ctx))
        return rows
    finally:
        # DeepSpeed's own release of what its optimizer holds (0.16+); the rest goes with gc in _free.
        getattr(engine, "destroy", lambda: None)()


def _loader_row(engine: Any, task: Any, guard: Any, cfg: Any, sz: Sizes, batch: int, steps: int,
                ctx: dict[str, Any]) -> dict[str, Any]:
    """The same engine fed by ShardStream + make_loader from the shards on local disk."""
    from medscale.data import loader as loader_module
    from medscale.data.loader import ShardStream, make_loader
    from medscale.formats.manifest import load_manifest
    from medscale.train.loop import train_step
    from medscale.train.throughput import Throughput

    manifest = load_manifest(cfg.data.shards)
    stream = ShardStream(cfg.data.shards, cfg.data.train_split, cfg.data, micro_batch=batch, rank=0, world=1,
                         train=True, seed=cfg.train.seed, manifest=manifest, labels=True)
    # Warm-up long enough to drain the batches the workers prefetched while starting (the loader's
    # prefetch factor a worker): the timed steps then see the loader's steady rate, not its queue.
    warmup = sz.warmup + getattr(loader_module, "_PREFETCH", 4) * stream.workers + 2
    available = stream.batches_per_epoch()
    timed = min(steps, available - warmup)  # one epoch: no worker restart inside the timed window
    if timed < 1:
        raise RuntimeError(f"the shards hold {available} batches of {batch}, fewer than the {warmup} warm-up steps")
    meter = Throughput(batch, None, None, 1)
    # make_loader takes the batches' device since data.transforms_on (pinned memory; where the
    # transforms run under "auto"); before that it took the stream alone.
    takes_device = len(inspect.signature(make_loader).parameters) > 1
    loader = make_loader(stream, engine.device) if takes_device else make_loader(stream)
    batches = meter.batches(loader)
    losses: list[float] = []
    t0 = time.perf_counter()
    first_batch_s = None
    try:
        for i in range(warmup + timed):
            if i == warmup:
                _sync()
                meter.report()  # starts the timed interval: its data wait counts from here
                t = time.perf_counter()
            b = next(batches)
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - t0
            out = train_step(engine, b, task, guard)  # moves the batch (and on the gpu path transforms it)
            if out.loss is not None:
                losses.append(out.loss)
        _sync()
        elapsed = time.perf_counter() - t
        wait = meter.report()["data_wait_frac"]
    finally:
        batches.close()  # ends the DataLoader iterator: its workers exit
    row: dict[str, Any] = {"first_batch_s": round(first_batch_s or 0.0, 2), "warmup_steps": warmup,
                           "data_wait_frac": round(wait, 4), "loss_last": losses[-1] if losses else None,
                           "workers": stream.workers, "corrupt_samples": stream.stats()["corrupt_samples"],
                           "transforms_on": getattr(loader, "transforms_on", "cpu (no data.transforms_on)")}
    _figures(row, batch, timed, elapsed, ctx["flops"][cfg.model.name], ctx["measured_peak"], ctx["datasheet"])
    return row


# -- shards -----------------------------------------------------------------------------------------


def make_shards(tmp: Path, images: int, px: int, copies: int, workers: int) -> str:
    """Synthetic CT (medscale.demo) prepped by medscale.prep into ``tmp/ct-000``, then hard-linked
    into ``copies`` prep outputs; returns the brace pattern over them (medscale merges the manifests).

    The copies give an epoch long enough for the timed window without generating every image.
    """
    from medscale.config import load_config
    from medscale.demo import write_synthetic_corpus
    from medscale.prep.config import PrepConfig
    from medscale.prep.job import PrepJob
    from medscale.prep.pipeline import run_prep
    from medscale.prep.plan import prepare_output
    from medscale.resources import resolve_resource

    per_patient = 8
    labels = write_synthetic_corpus(tmp / "raw", patients=max(1, images // per_patient), images_per_patient=per_patient,
                                    size=px, seed=0)
    recipe = load_config(PrepConfig, resolve_resource("data_prep/demo.yaml", "data_prep", "demo recipe"))
    cfg = dataclasses.replace(recipe, splits={"train": 1.0}, shard_bytes=8_000_000)
    first = tmp / "ct-000"
    prepare_output(first, resume=False, overwrite=True)
    job = PrepJob(inputs=[str(tmp / "raw" / "dicom")], out=first, cfg=cfg, key=bytes(range(32)),
                  labels_csv=str(labels), workers=workers, chunk_files=max(1, images // max(1, workers)))
    run_prep(job, progress=False)
    for i in range(1, copies):
        shutil.copytree(first, tmp / f"ct-{i:03d}", copy_function=os.link)  # same bytes, no extra disk
    shutil.rmtree(tmp / "raw")
    return f"{tmp}/ct-{{000..{copies - 1:03d}}}"


# -- plan, budget, report --------------------------------------------------------------------------


def plan_rows(args: argparse.Namespace, sz: Sizes, cuda: bool) -> list[Spec]:
    """Rows in priority order: eager before compiled, ViT-L's headline rows first, fp16 last of each."""
    kinds = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = set(kinds) - {"plain", "bf16", "fp16", "fp32"}
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; use plain,bf16,fp16,fp32")
    if not cuda and "fp32" not in kinds and args.smoke:
        kinds.append("fp32")  # the CPU's other DeepSpeed precision, in place of fp16
    modes = {"both": [False, True], "off": [False], "on": [True]}[args.compile]
    if args.quick:
        modes = [m for m in modes if not m] or [False]
    loader_model = args.loader_model or ("vit_base_patch16_224" if "vit_base_patch16_224" in sz.models
                                         else sz.models[-1])
    specs = []
    for compiled in modes:
        # Each model's plain/bf16 pair together (the budget reserves for the pair), then the others.
        for group in (("plain", "bf16"), ("fp16", "fp32")):
            for model in sz.models:
                for precision in [k for k in group if k in kinds]:
                    if precision == "fp32" and compiled and args.smoke:
                        continue  # the smoke run's extra CPU row: eager is enough, compiling it costs seconds
                    kind = "plain" if precision == "plain" else "medscale"
                    specs.append(Spec(kind, model, "bf16" if kind == "plain" else precision, compiled,
                                      loader=(kind == "medscale" and precision == "bf16" and not compiled
                                              and model == loader_model)))
    return specs


def timed_steps(sz: Sizes, step_s: float, quick: bool) -> int:
    target = sz.target_timed_s * (0.4 if quick else 1.0)
    return int(min(sz.max_steps, max(sz.min_steps, math.ceil(target / max(step_s, 1e-6)))))


def estimate(spec: Spec, sz: Sizes, ctx: dict[str, Any], smoke: bool, quick: bool) -> dict[str, float]:
    """Seconds a row should take, from its FLOPs at ASSUMED_MFU_OF_MEASURED of the measured peak."""
    batch = sz.batch[spec.model]
    flops = ctx["flops"][spec.model] or 1e9
    step_s = batch * 3 * flops / (ctx["measured_peak"] * 1e12 * ASSUMED_MFU_OF_MEASURED)
    steps = timed_steps(sz, step_s, quick)
    params_m = ctx["params_m"][spec.model]
    seconds = 2.0 + params_m / 50.0 + (sz.warmup + steps) * step_s  # model build, engine set-up, steps
    if spec.compile:
        seconds += ASSUMED_SMOKE_COMPILE_S if smoke else ASSUMED_COMPILE_S.get(spec.model, ASSUMED_COMPILE_S_OTHER)
    if spec.loader:
        workers = ctx["workers"]
        seconds += sz.corpus_images * CORPUS_S_PER_IMAGE + 5.0 + (sz.warmup + 4 * workers + 2 + steps) * step_s
    return {"seconds": seconds, "step_s": step_s, "steps": steps}


def skip_reason(spec: Spec, specs: list[Spec], plans: list[dict[str, float]], left: float, budget: float,
                cuda: bool) -> str:
    """Why a row is not run ("" to run it): fp16 off a GPU, or not enough of the budget left."""
    if spec.precision == "fp16" and not cuda:
        return "fp16 needs a GPU (DeepSpeed's CPU accelerator refuses it)"
    own = plans[specs.index(spec)]["seconds"]
    # A plain row is only worth its time with its medscale bf16 partner: reserve for both.
    partner = sum(p["seconds"] for s, p in zip(specs, plans) if spec.kind == "plain" and s.kind == "medscale"
                  and s.precision == "bf16" and (s.model, s.compile) == (spec.model, spec.compile))
    if own + partner > left:
        return f"budget: needs ~{own + partner:.0f} s, {max(0.0, left):.0f} s left of {budget:.0f}"
    return ""


def print_plan(specs: list[Spec], plans: list[dict[str, float]], sz: Sizes, elapsed: float,
               cuda: bool) -> list[dict[str, Any]]:
    """Print the rows, their estimates and which of them the budget would run if the estimates hold."""
    print(f"plan: {len(specs)} rows, budget {sz.budget_s:.0f} s; assumes {ASSUMED_MFU_OF_MEASURED:.0%} of the measured "
          f"peak and compile times {ASSUMED_COMPILE_S} s")
    at = elapsed
    out = []
    for s, p in zip(specs, plans):
        why = skip_reason(s, specs, plans, sz.budget_s - at, sz.budget_s, cuda)
        at += 0 if why else p["seconds"]
        print(f"  {s.model:24s} {s.name:32s} ~{p['seconds']:5.1f} s ({p['steps']} timed steps of ~{p['step_s']:.3f} s)"
              + ("  + loader row" if s.loader else "") + (f"  -> skip ({why})" if why else f"  -> ends ~{at:.0f} s"))
        out.append({"model": s.model, "name": s.name, "seconds": round(p["seconds"], 1), "steps": p["steps"],
                    "runs": not why, "ends_s": round(at)})
    print(f"estimated total {at:.0f} s")
    return out


def _row_table(rows: list[dict[str, Any]]) -> str:
    from tabulate import tabulate

    def pct(v: Any) -> str:
        return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "-"

    def num(v: Any, f: str = "{:.1f}") -> str:
        return f.format(v) if isinstance(v, (int, float)) else "-"

    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append([r["card"], r["model"], r["name"], r["batch"], "-", "-", "-", "-", "-",
                        r["status"] + ": " + r["reason"][:90]])
            continue
        extra = []
        if "overflow_steps" in r:
            extra.append(f"overflow {r['overflow_steps']}, scale {r['loss_scale']:g}")
        if "data_wait_frac" in r:
            extra.append(f"data wait {100 * r['data_wait_frac']:.0f}%")
        if r.get("compile"):
            extra.append(f"first step {r['first_step_s']:.1f} s")
        out.append([r["card"], r["model"], r["name"], r["batch"], num(r["images_per_s"]), pct(r["mfu_vs_measured"]),
                    pct(r["mfu_vs_datasheet"]), num(r.get("peak_mem_gb"), "{:.1f}"), num(r["step_s"], "{:.3f}"),
                    "; ".join(extra)])
    return tabulate(out, headers=["card", "model", "row", "batch", "images/s", "MFU meas.", "MFU sheet",
                                  "peak GB", "step s", "notes"])


def _ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """medscale bf16 over plain AMP per model and compile mode; loader over synthetic; the targets."""
    ok = {(r["model"], r["kind"], r["precision"], r["compile"], r.get("source", "synthetic")): r
          for r in rows if r["status"] == "ok"}
    vs_plain = {}
    for (model, kind, precision, compiled, source), r in ok.items():
        plain = ok.get((model, "plain", "bf16", compiled, "synthetic"))
        if kind == "medscale" and precision != "fp32" and source == "synthetic" and plain:  # 16-bit against 16-bit
            key = f"{model} {precision}{' compile' if compiled else ''}"
            vs_plain[key] = round(r["images_per_s"] / plain["images_per_s"], 4)
    loader = [r for r in rows if r.get("source") == "loader" and r["status"] == "ok"]
    lvs = None
    if loader:
        syn = ok.get((loader[0]["model"], "medscale", "bf16", False, "synthetic"))
        lvs = round(loader[0]["images_per_s"] / syn["images_per_s"], 4) if syn else None
    large = [r for r in ok.values() if r["model"] == "vit_large_patch16_224" and r["precision"] == "bf16"
             and r.get("source", "synthetic") == "synthetic" and r["mfu_vs_datasheet"] is not None]
    best = {kind: max((r["mfu_vs_datasheet"] for r in large if r["kind"] == kind), default=None)
            for kind in ("medscale", "plain")}
    bf16_vs_plain = [v for k, v in vs_plain.items() if " bf16" in k]
    targets = {
        "vit_large_bf16_mfu_vs_datasheet": {"value": best["medscale"], "plain": best["plain"], "target": 0.45,
                                            "met": None if best["medscale"] is None else best["medscale"] >= 0.45},
        "medscale_bf16_vs_plain_min": {"value": min(bf16_vs_plain, default=None), "target": 0.97,
                                       "met": None if not bf16_vs_plain else min(bf16_vs_plain) >= 0.97},
        "loader_vs_synthetic": {"value": lvs, "target": 0.97, "met": None if lvs is None else lvs >= 0.97},
    }
    return {"medscale_vs_plain": vs_plain, "loader_vs_synthetic": lvs, "targets": targets}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "timm", "deepspeed", "webdataset", "pydicom"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - a version we cannot read is reported, not fatal
            out[name] = f"unknown ({type(e).__name__})"
    return out


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    start = time.perf_counter()
    missing = check_installed()
    if missing:
        print(f"missing packages: {', '.join(missing)}. On the GPU machine install the wheels that "
              "bench/gpu_wheels.sh prepares (bench/gpu_device.sh does it), then run this again.", file=sys.stderr)
        print(json.dumps({"bench": "gpu", "error": "missing packages", "missing": missing}))
        return 2
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import torch

    from medscale.config import ModelConfig
    from medscale.dist import init_distributed, shutdown
    from medscale.models.flops import flops_per_sample
    from medscale.train.throughput import device_peak_tflops

    cuda = torch.cuda.is_available()
    if not (cuda or args.smoke or args.plan_only):
        # `make bench` runs every script: at GPU sizes a CPU would train ViT-L for hours.
        print("no GPU here: bench/gpu.py measures a GPU; --smoke runs every path at tiny size on the CPU, "
              "--plan-only prints what a GPU run would do", file=sys.stderr)
        print(json.dumps({"bench": "gpu", "skipped": "no GPU", "card": "cpu"}))
        return 0
    sz = dataclasses.replace(SMOKE_SIZES if args.smoke else GPU_SIZES)
    sz.batch = dict(sz.batch)
    if args.models:
        sz.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    for item in args.batch:
        name, _, n = item.partition("=")
        sz.batch[name] = int(n)
    for m in sz.models:
        sz.batch.setdefault(m, 64)
    sz.budget_s = args.budget_s or sz.budget_s
    backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    if not cuda:
        torch.set_num_threads(1)  # as the tests run: a second thread only contends on a shared 2-core machine

    if args.plan_only:
        cuda = True  # plan the GPU run, from an assumed matmul peak, without touching a device
    else:
        init_distributed()  # one rank: NCCL on a GPU, gloo on the CPU (DeepSpeed engines need a group)
    if backend != "inductor" and not args.plan_only:
        from deepspeed.accelerator import get_accelerator

        # train.compile compiles with the accelerator's backend (medscale.train.engine): set it there.
        get_accelerator().set_compile_backend(backend)
    card = _card()
    datasheet = device_peak_tflops("bf16")
    # Loader workers: all cores but one for the training process and one for the rest (the GPU
    # machine: 14 of 16); --plan-only plans for that machine.
    cores = 16 if args.plan_only else (os.cpu_count() or 4)
    workers = args.workers or (1 if args.smoke else max(1, min(14, cores - 2)))

    if args.plan_only:
        mm = {"tflops": args.assume_peak_tflops, "size": 0, "by_size": {}}
        datasheet = datasheet or 989.0
    else:
        mm = matmul_peak(sz.gemm_sizes, sz.gemm_iters)
    print(f"{card}: measured bf16 matmul peak {mm['tflops']:.1f} TFLOP/s (n={mm['size']}; {mm['by_size']}), "
          f"datasheet {datasheet if datasheet is not None else 'n/a'}")
    flops, params_m = {}, {}
    for m in sz.models:
        mcfg = ModelConfig(name=m, num_classes=len(CLASSES), patch_size=sz.patch)
        flops[m] = flops_per_sample(mcfg, in_chans=3, img_size=sz.img)
        with torch.device("meta"):
            params_m[m] = sum(p.numel() for p in _create(Spec("plain", m, "bf16", False), sz).parameters()) / 1e6
        nominal = NOMINAL_GMACS.get(m) if sz.img == 224 else None
        gmacs = flops[m] / 2e9 if flops[m] else float("nan")
        print(f"{m} at {sz.img} px: {params_m[m]:.1f} M parameters, forward {gmacs:.2f} GMACs counted"
              + (f" (issue 13: {nominal})" if nominal else "") + f", micro-batch {sz.batch[m]}")
    ctx: dict[str, Any] = {"flops": flops, "params_m": params_m, "measured_peak": mm["tflops"],
                           "datasheet": datasheet, "workers": workers}

    specs = plan_rows(args, sz, cuda)
    plans = [estimate(s, sz, ctx, args.smoke, args.quick) for s in specs]
    planned = print_plan(specs, plans, sz, time.perf_counter() - start, cuda)
    total = planned[-1]["ends_s"] if planned else 0
    if args.plan_only:
        print(json.dumps({"bench": "gpu", "plan_only": True, "assumed_peak_tflops": mm["tflops"],
                          "budget_s": sz.budget_s, "estimate_s": total, "rows": planned}))
        return 0

    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="medscale-gpu-bench-"))
    try:
        for spec, plan in zip(specs, plans):
            base = {"card": card, "model": spec.model, "name": spec.name, "kind": spec.kind,
                    "precision": spec.precision, "compile": spec.compile, "batch": sz.batch[spec.model],
                    "img": sz.img, "source": "synthetic"}
            if spec.compile:
                base["compile_backend"] = backend
            reason = skip_reason(spec, specs, plans, sz.budget_s - (time.perf_counter() - start), sz.budget_s, cuda)
            if reason:
                print(f"skipped: {spec.model} {spec.name}: {reason}")
                rows.append({**base, "status": "skipped", "reason": reason})
                if spec.loader:
                    rows.append({**base, "name": "medscale bf16 ZeRO-2, real loader", "source": "loader",
                                 "status": "skipped", "reason": reason})
                continue
            _free()
            base["mem_at_start_gb"] = round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None
            t = time.perf_counter()
            try:
                if spec.loader and "shards" not in ctx:
                    copies = max(2, math.ceil((sz.warmup + 4 * workers + 4 + plan["steps"]) * sz.batch[spec.model]
                                              / sz.corpus_images))
                    ctx["shards"] = make_shards(tmp, sz.corpus_images, sz.corpus_px, copies, workers)
                    ctx["shards_s"] = round(time.perf_counter() - t, 1)
                    print(f"shards: {sz.corpus_images} synthetic CT slices at {sz.corpus_px} px x {copies} linked "
                          f"copies in {ctx['shards_s']} s ({ctx['shards']})")
                if spec.kind == "plain":
                    got = [run_plain(spec, sz, sz.batch[spec.model], plan["steps"], backend, ctx)]
                else:
                    got = run_medscale(spec, sz, sz.batch[spec.model], plan["steps"], ctx)
                peak = _peak_mem_gb()
                rows.append({**base, "status": "ok", **got[0], "peak_mem_gb": round(peak, 2) if peak else None,
                             "wall_s": round(time.perf_counter() - t, 1)})
                if len(got) > 1:
                    rows.append({**base, "name": "medscale bf16 ZeRO-2, real loader", "source": "loader",
                                 "status": "ok", **got[1], "peak_mem_gb": rows[-1]["peak_mem_gb"]})
            except Exception as e:  # noqa: BLE001 - one failing row (OOM, a compile error) must not lose the others
                traceback.print_exc()
                rows.append({**base, "status": "error", "reason": f"{type(e).__name__}: {e}"[:500]})
            r = rows[-1]
            print(f"  {spec.model} {r['name']}: " + (f"{r['images_per_s']} images/s, MFU {r['mfu_vs_datasheet']} "
                  f"of datasheet, {r['mfu_vs_measured']} of measured" if r["status"] == "ok" else r["reason"]),
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _free()

    summary = _ratios(rows)
    print()
    print(_row_table(rows))
    print(f"\nmedscale bf16/fp16 vs plain AMP (images/s ratio): {summary['medscale_vs_plain']}")
    print(f"loader_vs_synthetic: {summary['loader_vs_synthetic']}")
    for k, v in summary["targets"].items():
        print(f"target {k}: {v}")
    figures = {
        "bench": "gpu", "smoke": args.smoke, "device": card, "cuda": cuda,
        "matmul_peak_tflops": round(mm["tflops"], 1), "matmul_by_size": mm["by_size"],
        "datasheet_peak_tflops": datasheet,
        "models": {m: {"params_m": round(params_m[m], 1),
                       "fwd_gmacs_counted": round(flops[m] / 2e9, 2) if flops[m] else None,
                       "fwd_gmacs_nominal": NOMINAL_GMACS.get(m) if sz.img == 224 else None,
                       "batch": sz.batch[m]} for m in sz.models},
        "img": sz.img, "compile_backend": backend, "loader_workers": workers,
        "shards_s": ctx.get("shards_s"), "rows": rows, **summary,
        "estimate_s": round(total), "budget_s": sz.budget_s, "wall_s": round(time.perf_counter() - start, 1),
        "versions": _versions(), "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
    }
    shutdown()
    line = json.dumps(figures)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    if "--smoke" in sys.argv[1:]:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the smoke run is the CPU's
    sys.exit(main())
