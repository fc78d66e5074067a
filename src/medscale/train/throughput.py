"""Throughput figures for the log: samples/s, model FLOPs utilisation, data wait, peak memory.

Model FLOPs per sample are counted once by the objective (`medscale.models.flops`: one forward pass
of the model built on the meta device, shapes only), and tripled here for forward + backward. Recomputation under
gradient checkpointing is not counted: MFU measures useful model work, as in the PaLM paper.
The peak of a device comes from ``train.peak_tflops`` or a table of dense bf16/fp16 tensor-core
peaks (fp32 training uses the TF32 peak). On CPUs and unknown devices MFU is None, not a guess.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any, Iterable, Iterator

import torch

__all__ = ["FWD_BWD_FLOPS", "device_peak_tflops", "Throughput"]

log = logging.getLogger("medscale.train.throughput")

FWD_BWD_FLOPS = 3
"""Training FLOPs per forward FLOP: the backward pass costs about twice the forward (input and weight grads)."""
_TERA = 1e12
_GIB = 2**30
_KIB_PER_GIB = 2**20  # ru_maxrss is in KiB on Linux
_MIN_INTERVAL_S = 1e-9  # guards the rates against a zero-length interval

# Dense (no sparsity) peak TFLOP/s per device: (bf16/fp16 tensor cores, tf32). Vendor data sheets;
# the first matching name wins, so more specific names come first.
_PEAKS: list[tuple[str, float, float]] = [
    ("GH200", 989.0, 494.0),
    ("H200", 989.0, 494.0),
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("H100", 989.0, 494.0),  # SXM
    ("H800", 989.0, 494.0),
    ("B200", 2250.0, 1100.0),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0),
    ("A10G", 70.0, 35.0),
    ("A10", 125.0, 62.5),
    ("A6000", 155.0, 77.4),
    ("V100", 125.0, 15.7),  # fp16 only; fp32 without tensor cores
]


def device_peak_tflops(precision: str, configured: float = 0.0) -> float | None:
    """Peak dense TFLOP/s of this process's device: `configured` if > 0, else the table (GPUs only)."""
    if configured > 0:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, low_precision, tf32 in _PEAKS:
        if key in name:
            return tf32 if precision == "fp32" else low_precision
    return None


def peak_memory_gb() -> float:
    """Peak memory of this process: GPU memory allocated on GPUs, resident set size on CPUs."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / _GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _KIB_PER_GIB


class Throughput:
    """Counts samples and time waiting for data between two `report` calls.

    Args:
        samples_per_micro: samples one micro-batch of all ranks together holds (micro x world).
        flops: forward FLOPs per sample (None: no MFU).
        peak_tflops: peak of one device (None: no MFU).
        world: number of devices.
    """

    def __init__(self, samples_per_micro: int, flops: float | None, peak_tflops: float | None, world: int):
        self.samples_per_micro, self.flops, self.peak, self.world = samples_per_micro, flops, peak_tflops, world
        self.micro = 0
        self.wait = 0.0
        self.since = time.perf_counter()

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Yield from `loader`, adding the time spent waiting for each batch."""
        it = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            self.micro += 1
            yield batch

    def report(self) -> dict[str, float | None]:
        """Figures since the previous report (then starts a new interval)."""
        now = time.perf_counter()
        elapsed = max(now - self.since, _MIN_INTERVAL_S)
        rate = self.micro * self.samples_per_micro / elapsed
        mfu = None
        if self.flops and self.peak:
            mfu = FWD_BWD_FLOPS * self.flops * rate / (self.world * self.peak * _TERA)
        out = {"samples_per_s": rate, "mfu": mfu, "data_wait_frac": self.wait / elapsed,
               "peak_mem_gb": peak_memory_gb()}
        self.micro, self.wait, self.since = 0, 0.0, now
        return out
