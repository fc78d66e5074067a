"""Benchmark (a model, not a measurement): step time and scaling efficiency of ViT-B/L/H under ZeRO-1/2/3
from 8 to 1024 GPUs, checked against Goyal et al. 2017 and against a real 2-rank gloo all-reduce here.

Compute. One GPU's time per sample is either measured (``--step-s vit_base=0.031``: a single-GPU
forward + backward of one micro-batch) or assumed: training FLOPs = 6 x forward MACs (forward 2, backward
4 FLOPs per MAC) at ``--mfu`` of ``--peak-tflops`` (default 45% of an H100 SXM's dense bf16 989 TFLOP/s).
Forward MACs per 224 px image (timm's model cards): ViT-B/16 17.6 G, ViT-L/16 61.6 G, ViT-H/14 167.4 G,
i.e. about 4,200, 1,200 and 440 images/s per GPU. MFU is taken as independent of the micro-batch; small
micro-batches run at lower MFU, so the smallest batches found below are optimistic. The forward is 1/3
of a micro-batch's compute ``t``, the backward 2/3.

Parameters P are counted from the timm model built on the meta device (no weights, no download).
Traffic of one optimizer step of ``k`` micro-batches (S = bytes of the whole buffer, bf16 = 2 bytes each):

    ZeRO-1: grads reduce-scattered once per step (accumulated locally), S = 2P; updated params all-gathered
            once after the step, S = 2P.  (DDP/ZeRO-0 all-reduces 2P once: the same bytes.)
    ZeRO-2: grads reduce-scattered every micro-batch (they are partitioned, so they cannot be accumulated
            whole: DeepSpeed's stage_1_and_2 reduces each micro-step), 2P; params all-gathered once, 2P.
    ZeRO-3: every micro-batch, params all-gathered in the forward (2P) and again in the backward (2P),
            grads reduce-scattered (2P).

Collectives (alpha-beta, ring). A flat ring over n ranks with per-rank bandwidth B and per-hop latency a:

    reduce-scatter or all-gather of S:  (n-1) a + (n-1)/n * S / B
    all-reduce of S:                  2 (n-1) a + 2 (n-1)/n * S / B

Hierarchical over N = n/g nodes of g GPUs: the ring inside the node over NVLink on S, then one ring per
local rank across nodes on S/g over that GPU's NIC:  T = T_ring(S, g, B_nvlink, a_nv) + T_ring(S/g, N,
B_ib, a_ib); the inter-node bandwidth term is (N-1)/N * S / (g B_ib), i.e. the node's aggregate NIC rate.
Phases are summed (not pipelined): conservative. Each buffer is issued in b buckets, so the latency term
is paid b times; more buckets let more of it overlap. b is tuned per case (the best of 1, 2, 4, ... up to
one per transformer block; ZeRO-3 always one per block, as it gathers and frees block by block) unless
``--bucket-elems`` fixes it.
At 1024 GPUs the ring latency (127 hops across nodes) dominates small buckets.

Step time, with C = all the buckets' time of one collective kind and c its last (or first) bucket:

    no overlap:  ZeRO-1  k t + C_rs + C_ag          ZeRO-2  k (t + C_rs) + C_ag
                 ZeRO-3  k (t + 2 C_ag + C_rs)
    overlap (comm runs beside the compute of its own pass; a bucket's reduction can start only when its
    gradients exist, so the last bucket is never hidden; the parameter all-gather after the optimizer
    step of ZeRO-1/2 overlaps nothing):
                 ZeRO-1  (k t - t_b) + max(t_b + c_rs, C_rs) + C_ag
                 ZeRO-2  k (t_f + max(t_b + c_rs, C_rs)) + C_ag
                 ZeRO-3  k (max(t_f + c_ag, C_ag) + max(t_b + c_ag + c_rs, C_ag + C_rs))

Efficiency = k t / step time: per-GPU throughput against one GPU computing alone (``eff_vs_8`` relative to
one node of 8 is in the JSON too, as Goyal et al. define theirs). Gradient accumulation amortises what is
paid once per step (ZeRO-1's reduce-scatter and all-gather, ZeRO-2's all-gather), not what is paid per
micro-batch. Line rates are used: NCCL typically reaches 80-90% of them, so read the figures as bounds.

Validation: Goyal et al. 2017 (ResNet-50 in 1 hour) is reproduced with the same model, and a 2-rank gloo
all-reduce on 127.0.0.1 is timed against the model's prediction from the measured loopback latency and
bandwidth (``--no-measure`` skips it). The last output line is one JSON object.

    python bench/scaling.py [--mfu 0.45 --step-s vit_base=0.031 --micro vit_base=128 --no-measure]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# key: (timm name, forward GMACs per 224 px image from timm's model cards, default per-GPU micro-batch)
MODELS: dict[str, tuple[str, float, int]] = {
    "vit_base": ("vit_base_patch16_224", 17.6, 128),
    "vit_large": ("vit_large_patch16_224", 61.6, 64),
    "vit_huge": ("vit_huge_patch14_224", 167.4, 32),
}
GPU_COUNTS = [8, 16, 32, 64, 128, 256, 512, 1024]
TABLE_COUNTS = [64, 256, 1024]
TARGET = 0.90


@dataclasses.dataclass(frozen=True)
class Fabric:
    """An interconnect: a ring inside each node, one ring per local rank across nodes."""

    name: str
    intra_gbs: float
    """Per-GPU bus bandwidth inside a node, GB/s."""
    inter_gbs: float
    """Per-GPU network bandwidth across nodes, GB/s (a node has gpus_per_node times this)."""
    gpus_per_node: int = 8
    intra_alpha_s: float = 1e-6
    """Latency of one ring hop inside a node."""
    inter_alpha_s: float = 4e-6
    """Latency of one ring hop across nodes."""


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model's training on one GPU: what the cost model needs."""

    name: str
    params: int
    sample_s: float
    """Forward + backward seconds per sample on one GPU."""
    depth: int
    """Transformer blocks: the most buckets a buffer is split into (one block's parameters each)."""
    buckets: int = 0
    """Collectives each buffer is issued in; 0 = tuned: the best of 1, 2, 4, ... up to `depth`."""
    grad_bytes: int = 2
    param_bytes: int = 2


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Bytes of the whole buffer moved by each collective kind, per micro-batch and per optimizer step."""

    rs_per_micro: int = 0
    rs_per_step: int = 0
    ag_per_micro: int = 0
    ag_per_step: int = 0


def zero_traffic(params: int, stage: int, grad_bytes: int = 2, param_bytes: int = 2) -> Traffic:
    """Reduce-scatter and all-gather buffer bytes of ZeRO `stage` (0 = DDP's all-reduce, as RS + AG)."""
    g, p = params * grad_bytes, params * param_bytes
    if stage == 0:
        return Traffic(rs_per_step=g, ag_per_step=g)
    if stage == 1:
        return Traffic(rs_per_step=g, ag_per_step=p)
    if stage == 2:
        return Traffic(rs_per_micro=g, ag_per_step=p)
    if stage == 3:
        return Traffic(rs_per_micro=g, ag_per_micro=2 * p)
    raise ValueError(f"ZeRO stage must be 0-3, got {stage}")


def wire_bytes_per_gpu(t: Traffic, n: int, accum: int = 1) -> float:
    """Bytes one GPU sends per optimizer step in flat rings of n: (n-1)/n of each RS/AG buffer."""
    total = accum * (t.rs_per_micro + t.ag_per_micro) + t.rs_per_step + t.ag_per_step
    return (n - 1) / n * total


def ring_time(kind: str, nbytes: float, n: int, gbs: float, alpha_s: float) -> float:
    """Alpha-beta time of a flat-ring collective ('reduce_scatter', 'all_gather' or 'all_reduce')."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    hops = {"reduce_scatter": 1, "all_gather": 1, "all_reduce": 2}[kind]
    return hops * ((n - 1) * alpha_s + (n - 1) / n * nbytes / (gbs * 1e9))


def collective_time(kind: str, nbytes: float, n: int, fabric: Fabric) -> float:
    """Hierarchical collective: ring inside the node on S, then across nodes on S/g, phases summed."""
    g = min(n, fabric.gpus_per_node)
    if n % g:
        raise ValueError(f"{n} GPUs do not fill nodes of {fabric.gpus_per_node}")
    intra = ring_time(kind, nbytes, g, fabric.intra_gbs, fabric.intra_alpha_s)
    return intra + ring_time(kind, nbytes / g, n // g, fabric.inter_gbs, fabric.inter_alpha_s)


def step_time(w: Workload, stage: int, n: int, fabric: Fabric, *, micro: int, accum: int = 1,
              overlap: bool = False) -> dict[str, float]:
    """Modelled seconds of one optimizer step per GPU and its efficiency against compute alone, with
    the workload's bucket count or, if that is 0, the best one (reported as ``buckets``)."""
    if w.buckets or stage == 3:  # ZeRO-3 gathers block by block: a whole-model bucket would undo it
        b = w.buckets or w.depth
        return _step_time(w, b, stage, n, fabric, micro=micro, accum=accum, overlap=overlap)
    counts = sorted({2 ** i for i in range(w.depth.bit_length()) if 2 ** i <= w.depth} | {w.depth})
    return max((_step_time(w, b, stage, n, fabric, micro=micro, accum=accum, overlap=overlap) for b in counts),
               key=lambda r: r["eff"])


def _step_time(w: Workload, buckets: int, stage: int, n: int, fabric: Fabric, *, micro: int, accum: int,
               overlap: bool) -> dict[str, float]:
    t = micro * w.sample_s
    tf, tb = t / 3, 2 * t / 3
    tr = zero_traffic(w.params, stage, w.grad_bytes, w.param_bytes)

    def coll(kind: str, nbytes: int) -> tuple[float, float]:  # all buckets, one bucket
        one = collective_time(kind, nbytes / buckets, n, fabric)
        return buckets * one, one

    if stage == 0:  # DDP: one all-reduce per step, all of it in the last backward
        car, c1 = coll("all_reduce", tr.rs_per_step)
        comm_step = car
        step = accum * t + car if not overlap else accum * t - tb + max(tb + c1, car)
    elif stage == 1:
        crs, c1 = coll("reduce_scatter", tr.rs_per_step)
        cag, _ = coll("all_gather", tr.ag_per_step)
        comm_step = crs + cag
        step = (accum * t + crs if not overlap else accum * t - tb + max(tb + c1, crs)) + cag
    elif stage == 2:
        crs, c1 = coll("reduce_scatter", tr.rs_per_micro)
        cag, _ = coll("all_gather", tr.ag_per_step)
        comm_step = accum * crs + cag
        step = accum * ((t + crs) if not overlap else tf + max(tb + c1, crs)) + cag
    else:
        crs, r1 = coll("reduce_scatter", tr.rs_per_micro)
        cag, a1 = coll("all_gather", tr.ag_per_micro // 2)  # one gather of the params per pass
        comm_step = accum * (2 * cag + crs)
        if overlap:
            step = accum * (max(tf + a1, cag) + max(tb + a1 + r1, cag + crs))
        else:
            step = accum * (t + 2 * cag + crs)
    return {"compute_s": accum * t, "comm_s": comm_step, "step_s": step, "eff": accum * t / step,
            "buckets": buckets}


def efficiency_curve(w: Workload, stage: int, fabric: Fabric, *, micro: int, accum: int = 1,
                     overlap: bool = False, counts: list[int] = GPU_COUNTS) -> dict[int, dict[str, float]]:
    """Efficiency at each GPU count for a fixed per-GPU batch; ``eff_vs_8`` is step(8) / step(n)."""
    out = {n: step_time(w, stage, n, fabric, micro=micro, accum=accum, overlap=overlap) for n in counts}
    base = step_time(w, stage, 8, fabric, micro=micro, accum=accum, overlap=overlap)["step_s"]
    for v in out.values():
        v["eff_vs_8"] = base / v["step_s"]
    return out


def min_global_batch(w: Workload, stage: int, fabric: Fabric, n: int, *, micro_max: int, overlap: bool,
                     target: float = TARGET) -> dict[str, Any]:
    """Smallest global batch (n x micro x accum) reaching `target` efficiency at n GPUs, with the
    micro-batch capped at `micro_max` (memory); ``micro_needed`` is the micro-batch that would do it alone."""
    best = None
    micros = [m for m in (2 ** i for i in range(20)) if m <= micro_max]
    cands = [(m, 1) for m in micros] + [(micro_max, k) for k in (2 ** i for i in range(1, 11))]
    for m, k in cands:
        if step_time(w, stage, n, fabric, micro=m, accum=k, overlap=overlap)["eff"] >= target:
            if best is None or m * k < best[0] * best[1]:
                best = (m, k)
    needed = next((m for m in (2 ** i for i in range(16))
                   if step_time(w, stage, n, fabric, micro=m, overlap=overlap)["eff"] >= target), None)
    if best is None:
        return {"global_batch": None, "micro": None, "accum": None, "micro_needed": needed}
    return {"global_batch": n * best[0] * best[1], "micro": best[0], "accum": best[1], "micro_needed": needed}


# Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", as we read it:
# ResNet-50 (25.6 M params, fp32 gradients), Big Basin servers of 8 P100 joined by NVLink inside, one
# 50 Gb/s Ethernet port per server, 32 images per GPU, gradients summed in the server, all-reduced across
# servers, broadcast back (bandwidth-equal to our hierarchical ring). Published: 90 epochs take 29 h on 8
# GPUs (batch 256) and 1 h on 256 GPUs (batch 8k): 0.232 s and 0.256 s per iteration, 90.6% from 8 to 256
# ("~90%" in the text). Assumed here: P100 NVLink ring bus bandwidth 20 GB/s, 10 us per Ethernet hop,
# 4 gradient buckets (ResNet's stages).
GOYAL = {"params": 25_557_032, "gpus": 256, "iter_8_s": 29 * 3600 / (1_281_167 * 90 / 256),
         "iter_256_s": 3600 / (1_281_167 * 90 / 8192), "published_eff": 0.90}


def goyal_reproduction() -> dict[str, float]:
    """Model Goyal et al.'s 8 -> 256 GPU scaling from their stated hardware; published figure beside."""
    fabric = Fabric("big-basin+50GbE", intra_gbs=20.0, inter_gbs=50 / 8 / 8, inter_alpha_s=10e-6)
    probe = Workload("resnet50", GOYAL["params"], 1.0, depth=4, buckets=4, grad_bytes=4, param_bytes=4)
    # Compute per iteration = the published 8-GPU iteration less the modelled in-server all-reduce.
    intra = step_time(probe, 0, 8, fabric, micro=32)["comm_s"]
    w = dataclasses.replace(probe, sample_s=(GOYAL["iter_8_s"] - intra) / 32)
    out = {"published_eff": GOYAL["published_eff"],
           "published_eff_from_times": round(GOYAL["iter_8_s"] / GOYAL["iter_256_s"], 4),
           "iter_8_s": round(GOYAL["iter_8_s"], 4), "published_iter_256_s": round(GOYAL["iter_256_s"], 4)}
    for overlap in (False, True):
        c = efficiency_curve(w, 0, fabric, micro=32, overlap=overlap, counts=[8, 256])
        key = "overlap" if overlap else "no_overlap"
        out[f"modelled_eff_{key}"] = round(c[256]["eff_vs_8"], 4)
        out[f"modelled_iter_256_s_{key}"] = round(c[256]["step_s"], 4)
    return out


def count_params(timm_name: str, num_classes: int) -> tuple[int, int]:
    """Parameters and transformer blocks of a timm model built on the meta device (no weights)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
    return sum(p.numel() for p in model.parameters()), len(model.blocks)


def _gloo_worker(rank: int, port: int, nbytes: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    small, big = torch.zeros(256), torch.zeros(nbytes // 4)
    half = torch.zeros(nbytes // 8)

    def timed(fn, reps: int) -> float:
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def ping_pong() -> None:  # a round trip of `half`; one way = half the time
        if rank == 0:
            dist.send(half, 1)
            dist.recv(half, 1)
        else:
            dist.recv(half, 0)
            dist.send(half, 0)

    for _ in range(5):
        dist.all_reduce(small)
    t_small = timed(lambda: dist.all_reduce(small), 30)
    ping_pong()
    t_p2p = timed(ping_pong, 3) / 2
    dist.all_reduce(big)
    t_big = timed(lambda: dist.all_reduce(big), 3)
    other = torch.ones_like(big)
    t_add = timed(lambda: big.add_(other), 3)  # the local summing gloo does beside the transfers
    if rank == 0:
        Path(out).write_text(json.dumps({"t_small": t_small, "t_p2p": t_p2p, "p2p_bytes": half.numel() * 4,
                                         "t_big": t_big, "big_bytes": big.numel() * 4, "t_add": t_add}))
    dist.destroy_process_group()


def gloo_check(nbytes: int) -> dict[str, float]:
    """Time a 2-rank gloo all-reduce of `nbytes` on 127.0.0.1 against the alpha-beta prediction from the
    measured small-message latency and point-to-point loopback bandwidth."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "gloo.json")
        mp.spawn(_gloo_worker, args=(port, nbytes, out), nprocs=2, join=True)
        m = json.loads(Path(out).read_text())
    alpha = m["t_small"] / 2  # a 2-rank ring all-reduce is 2 hops; 1 KiB adds nothing measurable
    gbs = m["p2p_bytes"] / m["t_p2p"] / 1e9
    predicted = ring_time("all_reduce", m["big_bytes"], 2, gbs, alpha)
    reduce_s = m["t_add"] / 2  # each of 2 ranks sums half the buffer: the gamma term alpha-beta leaves out
    return {"bytes": m["big_bytes"], "alpha_s": round(alpha, 7), "loopback_gbs": round(gbs, 3),
            "measured_s": round(m["t_big"], 5), "predicted_s": round(predicted, 5),
            "ratio": round(m["t_big"] / predicted, 3), "predicted_with_reduce_s": round(predicted + reduce_s, 5),
            "ratio_with_reduce": round(m["t_big"] / (predicted + reduce_s), 3)}


def _pairs(items: list[str], kind: type) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in MODELS:
            raise SystemExit(f"expected MODEL=VALUE with MODEL one of {sorted(MODELS)}, got {item!r}")
        out[key] = kind(value)
    return out


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM)")
    p.add_argument("--mfu", type=float, default=0.45)
    p.add_argument("--step-s", nargs="*", default=[], metavar="MODEL=S",
                   help="measured single-GPU fwd+bwd seconds of one micro-batch (replaces the MFU assumption)")
    p.add_argument("--micro", nargs="*", default=[], metavar="MODEL=N", help="per-GPU micro-batch")
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--nvlink-gbs", type=float, default=450.0, help="per-GPU bus bandwidth inside a node")
    p.add_argument("--ib-gbits", type=float, nargs="+", default=[200.0, 400.0], help="per-GPU InfiniBand")
    p.add_argument("--alpha-intra-us", type=float, default=1.0, help="latency of a ring hop inside a node")
    p.add_argument("--alpha-inter-us", type=float, default=4.0, help="latency of a ring hop across nodes")
    p.add_argument("--bucket-elems", type=int, default=0,
                   help="elements per collective (default 0: tuned, the best of 1, 2, 4 ... blocks' worth)")
    p.add_argument("--gloo-mb", type=float, default=0.0,
                   help="gloo all-reduce size in MB (default: a quarter of ViT-B's bf16 gradients)")
    p.add_argument("--no-measure", action="store_true", help="skip the 2-rank gloo all-reduce")
    return p.parse_args()


def main() -> None:
    a = _args()
    step_s, micro = _pairs(a.step_s, float), _pairs(a.micro, int)
    fabrics = [Fabric(f"nvlink{a.nvlink_gbs:g}+ib{g:g}", a.nvlink_gbs, g / 8, intra_alpha_s=a.alpha_intra_us * 1e-6,
                      inter_alpha_s=a.alpha_inter_us * 1e-6) for g in a.ib_gbits]
    loads, micros, sources = {}, {}, {}
    for key in a.models:
        timm_name, gmacs, default_micro = MODELS[key]
        params, depth = count_params(timm_name, a.num_classes)
        micros[key] = micro.get(key, default_micro)
        if key in step_s:
            sample_s, sources[key] = step_s[key] / micros[key], "measured"
        else:
            sample_s, sources[key] = 6 * gmacs * 1e9 / (a.peak_tflops * 1e12 * a.mfu), "assumed"
        buckets = math.ceil(params / a.bucket_elems) if a.bucket_elems > 0 else 0
        loads[key] = Workload(key, params, sample_s, depth, buckets)

    eff: dict[str, Any] = {}
    batch90: dict[str, Any] = {}
    head = " ".join(f"{n:>5}/{'ov':<3}" for n in TABLE_COUNTS)
    print(f"{'model':<10} {'P (M)':>7} {'img/s/GPU':>9} {'micro':>5} {'ZeRO':>4} {'fabric':<16} {head}  "
          f"{'GB>=90% @1024 (no-ov/ov)':>26}")
    for key, w in loads.items():
        for stage in a.stages:
            for fab in fabrics:
                row = []
                for overlap in (False, True):
                    c = efficiency_curve(w, stage, fab, micro=micros[key], overlap=overlap)
                    tag = "overlap" if overlap else "no_overlap"
                    eff.setdefault(key, {}).setdefault(f"zero{stage}", {}).setdefault(fab.name, {})[tag] = {
                        str(n): {"eff": round(v["eff"], 4), "eff_vs_8": round(v["eff_vs_8"], 4),
                                 "step_s": round(v["step_s"], 5), "buckets": v["buckets"]} for n, v in c.items()}
                    mb = min_global_batch(w, stage, fab, 1024, micro_max=micros[key], overlap=overlap)
                    batch90.setdefault(key, {}).setdefault(f"zero{stage}", {}).setdefault(fab.name, {})[tag] = mb
                    row.append((c, mb))
                cells = " ".join(f"{row[0][0][n]['eff']:>5.3f}/{row[1][0][n]['eff']:<3.3f}" for n in TABLE_COUNTS)
                gbs = "/".join(str(r[1]["global_batch"] or f">{1024 * micros[key]}") for r in row)
                print(f"{key:<10} {w.params / 1e6:>7.1f} {1 / w.sample_s:>9.0f} {micros[key]:>5} {stage:>4} "
                      f"{fab.name:<16} {cells}  {gbs:>26}")

    at_global: dict[str, Any] = {}
    for key, w in loads.items():
        for stage in a.stages:
            for fab in fabrics[-1:]:
                for gb in (4096, 16384, 65536):
                    m_ = gb // 1024
                    r = [step_time(w, stage, 1024, fab, micro=m_, overlap=o)["eff"] for o in (False, True)]
                    at_global.setdefault(key, {}).setdefault(f"zero{stage}", {})[str(gb)] = [round(x, 4) for x in r]
    print(f"\n1024 GPUs on {fabrics[-1].name}, efficiency (no overlap/overlap) at global batch 4096 / 16384 / 65536:")
    for key, stages in at_global.items():
        print("  " + key + ": " + "; ".join(f"{st} " + " ".join(f"{v[0]:.2f}/{v[1]:.2f}" for v in d.values())
                                         for st, d in stages.items()))

    goyal = goyal_reproduction()
    print(f"\nGoyal et al. 2017, ResNet-50, 8 -> 256 P100: published {goyal['published_eff']:.1%} "
          f"({goyal['published_eff_from_times']:.1%} from 29 h / 1 h); modelled {goyal['modelled_eff_no_overlap']:.1%} "
          f"without overlap, {goyal['modelled_eff_overlap']:.1%} with; per iteration published "
          f"{goyal['published_iter_256_s']} s, modelled {goyal['modelled_iter_256_s_no_overlap']} s")

    # The seed's claim: two weeks of (one-GPU) training in 52 minutes on 64 V100s, 90% at 1024 GPUs.
    speedup = 14 * 24 * 60 / 52
    seed = {"speedup_claimed": round(speedup, 1), "linear_64": 64,
            "per_gpu_gain_needed_at_100pct": round(speedup / 64, 2),
            "per_gpu_gain_needed_at_90pct": round(speedup / (64 * TARGET), 2)}
    for key, stages in batch90.items():  # the cheapest way to 90% at 1024 over stages, fabrics, overlap
        found = [(v["global_batch"], f"{st} {fab} {tag}") for st, fabs in stages.items()
                 for fab, tags in fabs.items() for tag, v in tags.items() if v["global_batch"]]
        seed[f"{key}_min_global_batch_90pct_1024"] = min(found)[0] if found else None
        seed[f"{key}_min_global_batch_how"] = min(found)[1] if found else None
    print(f"seed claim: 2 weeks -> 52 min is {speedup:.0f}x on 64 GPUs: each must be "
          f"{seed['per_gpu_gain_needed_at_90pct']}x faster than the baseline GPU at 90% scaling; 90% at 1024 needs "
          + ", ".join(f"{k} >= {seed[f'{k}_min_global_batch_90pct_1024']} ({seed[f'{k}_min_global_batch_how']})"
                      for k in batch90))

    figures: dict[str, Any] = {
        "benchmark": "scaling", "compute": {k: {"source": sources[k], "img_s_per_gpu": round(1 / w.sample_s, 1),
                                                 "micro": micros[k], "params": w.params, "blocks": w.depth}
                                             for k, w in loads.items()},
        "assumptions": {"peak_tflops": a.peak_tflops, "mfu": a.mfu, "train_flops_per_mac": 6,
                        "grad_and_param_bytes": 2, "gpus_per_node": 8, "nvlink_gbs": a.nvlink_gbs,
                        "ib_gbits_per_gpu": a.ib_gbits, "alpha_intra_us": a.alpha_intra_us, "alpha_inter_us": a.alpha_inter_us,
                        "bucket_elems": a.bucket_elems or "tuned"},
        "efficiency": eff, "global_batch_90pct_1024": batch90, "eff_1024_at_global_batch": at_global,
        "goyal_2017": goyal, "seed_claim": seed,
    }
    if not a.no_measure:
        vit_b = loads.get("vit_base") or Workload("vit_base", count_params(MODELS["vit_base"][0],
                                                                           a.num_classes)[0], 0, 1)
        nbytes = int(a.gloo_mb * 1e6) if a.gloo_mb > 0 else vit_b.params * 2 // 4
        g = gloo_check(nbytes // 8 * 8)
        figures["gloo_check"] = g
        print(f"gloo 2 ranks on 127.0.0.1, all-reduce {g['bytes'] / 1e6:.1f} MB: measured {g['measured_s']} s, "
              f"predicted {g['predicted_s']} s (alpha {g['alpha_s'] * 1e6:.0f} us, loopback "
              f"{g['loopback_gbs']} GB/s), ratio {g['ratio']}; with the local sum {g['predicted_with_reduce_s']} s, "
              f"ratio {g['ratio_with_reduce']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
