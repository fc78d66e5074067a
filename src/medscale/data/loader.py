"""Streaming shards to batches, with the same number of batches on every rank.

The plan of an epoch is a pure function of (manifest, split, seed, epoch, world size, workers),
computed identically on every rank, so no rank ever waits in a collective for a peer that ran out
of data:

- Work is cut into ``slots = world * workers`` streams, one per data-loader worker of each rank.
  With at least as many shards as slots, slot ``s`` reads shards ``order[s::slots]``; with fewer,
  every slot reads all shards and keeps every ``slots``-th sample (no slot is ever empty).
- Training drops the ragged tail: each rank yields exactly ``samples // (world * micro_batch)``
  batches, and a worker whose stream is short repeats its own samples (as DistributedSampler
  pads) rather than stopping early.
- Evaluation reads every sample once; short streams are padded with samples marked
  ``valid=False`` so that all ranks run the same number of forward passes (ZeRO-3 needs that),
  and the evaluator drops them.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from medscale.codec import decode_pixels
from medscale.config import DataConfig
from medscale.data.transforms import SampleTransform

__all__ = ["load_manifest", "ShardStream", "make_loader", "Batch"]

Batch = dict[str, Any]


def load_manifest(root: str) -> dict[str, Any]:
    """Read ``manifest.json`` from a prep output directory (or a URL/pipe prefix to one)."""
    if "://" in root or root.startswith("pipe:"):
        from webdataset import gopen

        with gopen.gopen(root.rstrip("/") + "/manifest.json") as f:
            manifest = json.load(f)
    else:
        path = Path(root) / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"no manifest.json in {root!r}; point data.shards at a `medscale prep` output")
        manifest = json.loads(path.read_text())
    manifest["root"] = root
    return manifest


def _seed(*parts: Any) -> int:
    """A stable 64-bit seed from parts (Python's hash() of strings changes per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _shard_url(root: str, path: str) -> str:
    if urlparse(path).scheme or path.startswith("pipe:") or path.startswith("/"):
        return path
    return f"{root.rstrip('/')}/{path}"


@dataclass
class _Slot:
    urls: list[str]
    stride: int  # keep every stride-th sample ...
    offset: int  # ... starting at this one
    count: int  # samples this slot sees in one pass


class ShardStream(IterableDataset):
    """Batches of one split for one rank; iterate it through `make_loader`."""

    def __init__(self, root: str, split: str, cfg: DataConfig, *, micro_batch: int, rank: int = 0,
                 world: int = 1, train: bool = True, seed: int = 0, manifest: dict[str, Any] | None = None):
        self.manifest = manifest or load_manifest(root)
        self.root, self.split, self.cfg = root, split, cfg
        self.micro_batch, self.rank, self.world = micro_batch, rank, world
        self.train, self.seed, self.epoch = train, seed, 0
        self.shards = sorted((s for s in self.manifest["shards"] if s["split"] == split), key=lambda s: s["path"])
        self.samples = sum(s["samples"] for s in self.shards)
        if not self.shards or self.samples == 0:
            have = sorted(self.manifest.get("splits", {}))
            raise ValueError(f"split {split!r} has no samples in {root}/manifest.json (splits there: {have})")
        if train and self.samples < world * micro_batch:
            raise ValueError(
                f"split {split!r} has {self.samples} samples, fewer than one global micro-batch "
                f"({world} ranks x {micro_batch}); lower train.micro_batch_size"
            )
        self.workers = max(1, cfg.num_workers)
        self.transform = SampleTransform(cfg, train=train)
        self.task = self.manifest.get("task", "multiclass")
        self.num_classes = len(self.manifest.get("classes") or [])

    # -- the plan -------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _slots(self) -> list[_Slot]:
        order = list(self.shards)
        if self.train:
            random.Random(_seed(self.seed, self.epoch, "shards")).shuffle(order)
        n = self.world * self.workers
        urls = [_shard_url(self.root, s["path"]) for s in order]
        if len(order) >= n:
            return [_Slot(urls[i::n], 1, 0, sum(s["samples"] for s in order[i::n])) for i in range(n)]
        return [_Slot(urls, n, i, (self.samples - i + n - 1) // n) for i in range(n)]

    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch (known before reading any shard)."""
        if self.train:
            return self.samples // (self.world * self.micro_batch)
        return self.workers * self._eval_batches_per_worker()

    def _eval_batches_per_worker(self) -> int:
        return max((s.count + self.micro_batch - 1) // self.micro_batch for s in self._slots())

    def _worker_batches(self, worker: int) -> int:
        if not self.train:
            return self._eval_batches_per_worker()
        total = self.batches_per_epoch()
        return total // self.workers + (1 if worker < total % self.workers else 0)

    # -- reading --------------------------------------------------------------------------------

    def _read(self, slot: _Slot) -> Iterator[dict[str, Any]]:
        samples = tariterators.tarfile_samples([{"url": u} for u in slot.urls])
        for i, raw in enumerate(samples):
            if i % slot.stride == slot.offset:
                yield raw

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        info = json.loads(raw["json"])
        ext = next((k for k in raw if k.startswith("pix.")), None)
        if ext is None:
            raise ValueError(f"sample {raw['__key__']} in {raw.get('__url__')} has no pixel member")
        pixels = decode_pixels(raw[ext], ext, info.get("pixels"))
        if self.task == "multilabel":
            target = torch.tensor(info.get("labels", [0] * self.num_classes), dtype=torch.float32)
        else:
            target = torch.tensor(info.get("label", -1), dtype=torch.long)
        return {"image": self.transform(pixels, info), "target": target, "key": raw["__key__"],
                "patient": info.get("patient") or "", "valid": True}

    def _stream(self, slot: _Slot, rng: random.Random) -> Iterator[dict[str, Any]]:
        it = self._read(slot)
        if not self.train or self.cfg.shuffle_buffer <= 1:
            yield from it
            return
        buf: list[dict[str, Any]] = []
        for raw in it:
            buf.append(raw)
            if len(buf) >= self.cfg.shuffle_buffer:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"ShardStream planned for {self.workers} workers, DataLoader has {info.num_workers}")
        slot_index = self.rank * self.workers + worker
        slot = self._slots()[slot_index]
        rng = random.Random(_seed(self.seed, self.epoch, slot_index, "buffer"))
        torch.manual_seed(_seed(self.seed, self.epoch, slot_index, "augment") & 0x7FFFFFFFFFFFFFFF)
        want = self._worker_batches(worker)
        made, batch = 0, []
        while made < want:
            got_any = False
            for raw in self._stream(slot, rng):
                got_any = True
                batch.append(self._decode(raw))
                if len(batch) == self.micro_batch:
                    yield _collate(batch)
                    made, batch = made + 1, []
                    if made == want:
                        return
            if not self.train:
                break
            if not got_any:
                raise RuntimeError(f"slot {slot_index} of split {self.split!r} read no samples from {slot.urls}")
            # Training: a short stream wraps around (padding by repetition) so every rank
            # yields the same number of batches.
        if not self.train:
            pad = self._padding()
            while made < want:
                batch += [pad] * (self.micro_batch - len(batch))
                yield _collate(batch)
                made, batch = made + 1, []

    def _padding(self) -> dict[str, Any]:
        c, s = self.cfg.channels, self.cfg.image_size
        target = torch.zeros(self.num_classes) if self.task == "multilabel" else torch.tensor(-1)
        return {"image": torch.zeros(c, s, s), "target": target, "key": "", "patient": "", "valid": False}


def _collate(items: list[dict[str, Any]]) -> Batch:
    return {
        "image": torch.stack([x["image"] for x in items]),
        "target": torch.stack([x["target"] for x in items]),
        "key": [x["key"] for x in items],
        "patient": [x["patient"] for x in items],
        "valid": torch.tensor([x["valid"] for x in items]),
    }


def make_loader(stream: ShardStream) -> DataLoader:
    """A DataLoader over a ShardStream: batching happens in the workers, so batch_size=None."""
    workers = stream.workers if stream.cfg.num_workers > 0 else 0
    return DataLoader(stream, batch_size=None, num_workers=workers,
                      persistent_workers=False, prefetch_factor=4 if workers else None)
