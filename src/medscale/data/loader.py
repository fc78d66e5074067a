"""Streaming shards to batches: exact, resumable, and the same number of batches on every rank.

How an epoch is cut (details in `medscale.data.order`):

- The epoch's *global sequence* is a pure function of (manifest split, seed, epoch,
  ``data.shuffle_block``, class balance): a seeded shard permutation, then a seeded permutation
  of the samples inside blocks of whole shards holding at least ``shuffle_block`` samples. It
  does not depend on the number of ranks, workers or the micro-batch size.
- Training consumes it in global batches of ``world x micro_batch``. Every rank yields exactly
  ``(N - position) // (world x micro_batch)`` micro-batches (the ragged tail is dropped), known
  before any shard is opened, however uneven the shards and however few. Data-loader worker
  ``w`` builds the rank's micro-batches ``w, w + workers, ...``, which torch hands back in order.
- The resume state is ``{"epoch", "position"}``: the number of sequence entries all ranks have
  consumed together. Resuming at ``position``, with the same or any other number of ranks,
  continues the same sequence: nothing repeated, nothing skipped. Jumping there opens no shard
  and decodes nothing.
- Evaluation reads every sample exactly once: rank ``r`` gets a contiguous ``1/world`` of the
  split, cut into micro-batches; the short ones are padded with samples marked ``valid=False``
  so all ranks run the same number of forward passes (ZeRO-3 needs that); the evaluator drops
  them.

Reading: inside a global batch, samples are sorted by where they sit in the shards before
being cut into rank slices (the gradient, averaged over the global batch, is the same), so a
rank needs about ``K / world + 3`` of the ``K`` shards of a shuffle block rather than all of
them. Each data-loader worker builds whole micro-batches, so every worker of a rank opens the
rank's shards of the block: a shard is opened about ``workers x (1 + world / K)`` times an
epoch (``bench/loader.py`` computes it from this order for larger deployments; figures in
BENCHMARKS.md). What an open costs:

- local shards (the common case): reading the shard's index file written by prep (or, for a
  shard without one, a scan of its tar headers) and then random access; each sample's bytes
  are read once an epoch, by the worker that uses it, and samples that are skipped, on resume
  or because another rank uses them, are neither read nor decoded;
- remote shards with ``data.cache_dir``: one download per node that needs it, kept for later
  epochs, then read as local shards;
- remote shards without a cache: one full stream per open; only the members this worker uses
  are kept, undecoded, until used.

Batches are dicts: ``image`` (B, C, H, W) float (or, when the transforms run on the device,
``pixels``, ``params`` and ``device_transform`` instead, see below), ``target`` (class indices, or 0/1 floats for
multi-label; absent when the stream reads no labels, ``labels=False``), ``key``, ``patient``,
``study``, ``valid`` (bool; False for padding and stand-ins), ``seed`` (int64, the sample's own
seed: a function of the run seed, the epoch and the sample's position only, so the same on any
number of ranks; fixed per position in evaluation) and ``stats`` (see below).

Where the transforms run (``data.transforms_on``, resolved by `make_loader` from the device it is
given: ``auto`` is gpu on CUDA, else cpu; a loader made without a device always gives finished
images): on the cpu path the workers return finished images. On
the gpu path they only read, decode, draw each sample's parameters from its seed and cut the
pixels to the crop box; a batch then carries ``pixels`` (B, 1 or 3, H, W) in the stored dtype,
each sample top-left and zero-padded to the batch's largest crop, ``params`` (B, P) float64 (see
`medscale.data.transforms.PARAMS`) and ``device_transform``, and `medscale.data.device.to_device`
moves it (pinned, non-blocking on CUDA) and applies the ops batched on the device. Both paths give
the same images for the same seeds.

Labels are optional in shards (`medscale.formats.sample`). A stream built with ``labels=True``
(the default: classification) needs a labeled manifest and counts a sample without a label as
corrupt; ``labels=False`` (objectives that learn from the images alone) never reads them, so an
unlabeled prep output streams with no corrupt samples.

Corrupt data: a shard that cannot be opened or is short, or a sample that does not decode, is
logged and counted, and its slot in the micro-batch is filled with a copy of another sample of
that batch flagged ``valid=False`` (training) or with padding (evaluation), so batch counts stay
equal on every rank. Each batch carries ``batch["stats"]`` from its worker; the loader returned
by `make_loader` folds them into the stream's counters in the main process (`ShardStream.stats`)
and, in training, stops the run on every rank at once with a clear error when the epoch's corrupt
samples (summed over ranks) exceed ``data.max_corrupt_fraction`` of the epoch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import signal
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medscale.config import DataConfig
from medscale.data.collate import Batch, collate, to_tensors
from medscale.data.order import (EpochOrder, class_weights, eval_batch_ids, eval_batches, stable_seed,
                                 train_batch_ids, worker_batches)
from medscale.data.reader import ShardReader, shard_labels
from medscale.data.shm import SharedBuffers
from medscale.data.transforms import SampleTransform
from medscale.errors import ConfigError, CorruptShards
from medscale.formats.manifest import has_labels, join_url, load_manifest, task_of
from medscale.formats.sample import decode_members, label_field
from medscale.leash import die_with_parent
from medscale.signals import STOP_SIGNALS

__all__ = ["load_manifest", "ShardStream", "StreamLoader", "make_loader", "decode_sample", "Batch",
           "STATE_VERSION"]

log = logging.getLogger("medscale.data")

STATE_VERSION = 1
_CHECK_EVERY = 16  # batches between global corrupt-count checks (one tiny all-reduce)
_LOG_FIRST = 10  # corrupt samples logged one by one per worker and epoch, then every _LOG_EVERY-th
_LOG_EVERY = 100
_FINGERPRINT_HEX = 16  # hex characters of the order fingerprint in the resume state (64 bits)
_MASK63 = (1 << 63) - 1
# Batches each loader worker prepares ahead: enough to hide a slow shard open behind decoding.
_PREFETCH = 4
# A worker keeps the member offsets of its share of two shuffle blocks (the one it reads and the
# next, ``2 * block_shards / world``) plus this many: the few shards a sorted global batch reaches
# past that share (see `medscale.data.order`).
_INDEX_SLACK = 8


def _opt(cfg: DataConfig, name: str, default: Any) -> Any:
    return getattr(cfg, name, default)


def decode_sample(raw: dict[str, Any], transform: SampleTransform, task: str, num_classes: int,
                  labels: bool = True, *, seed: int | None = None, defer: bool = False) -> dict[str, Any]:
    """One raw shard sample (``json`` + ``pix.*`` bytes) to an item of a batch.

    With ``labels`` the item has a ``target`` and a sample without a label is an error; without,
    labels are not read and the item has no ``target``. The target stays a Python value (class
    index, or 0/1 list for multi-label): the loader turns a batch's targets into one tensor in the
    main process, which spares a tensor hand-over between processes. ``seed`` is the sample's
    augmentation seed (None: drawn from torch's global generator). With ``defer`` the item holds
    ``pixels`` (the stored-dtype crop) and ``params`` instead of ``image`` (the gpu path).

    Raises:
        ValueError: (or a decoder error) for a sample that cannot be used; the caller counts it.
    """
    key = raw.get("__key__", "?")
    pixels, info, label = decode_members(raw, task, num_classes, labels=labels)
    if defer:
        crop, params = transform.prepare(pixels, seed if seed is not None else 0)
        item = {"pixels": crop, "params": params}
    else:
        item = {"image": transform(pixels, info, seed)}
    item.update({"key": key, "patient": info.get("patient") or "", "study": info.get("study") or "",
                 "valid": True})
    if labels:
        if label is None:
            raise ValueError(f"sample {key} has no {label_field(task)!r} in a labeled split")
        item["target"] = label
    return item


class ShardStream(IterableDataset):
    """Batches of one split for one rank; iterate it through `make_loader` (which also turns the
    targets and valid flags into tensors and keeps the resume position).

    Args:
        root: ``data.shards`` (see `medscale.formats.manifest`).
        split: manifest split to read.
        cfg: data options.
        micro_batch: samples per micro-batch.
        rank, world: this rank and the number of ranks.
        train: shuffle, augment and drop the ragged tail (True), or read every sample once and
            pad (False).
        seed: seeds the order and the augmentation.
        manifest: an already loaded manifest (`load_manifest`), to avoid reading it again.
        labels: read each sample's label into ``batch["target"]`` (a sample without one is
            corrupt); False reads no labels and batches have no ``target`` key.

    Raises:
        ConfigError: ``labels`` with a manifest that has none, or class balancing without labels.
    """

    def __init__(self, root: str, split: str, cfg: DataConfig, *, micro_batch: int, rank: int = 0,
                 world: int = 1, train: bool = True, seed: int = 0, manifest: dict[str, Any] | None = None,
                 labels: bool = True, accumulation: int = 1):
        self.manifest = manifest or load_manifest(root)
        self.root, self.split, self.cfg = root, split, cfg
        self.micro_batch, self.rank, self.world = micro_batch, rank, world
        # Training epochs end on whole optimizer steps (accumulation micro-batches of every rank), so
        # an epoch covers the same samples for any split of one global batch into ranks x accumulation.
        self.accumulation = max(1, accumulation) if train else 1
        self.train, self.seed, self.labels = train, seed, labels
        if labels and not has_labels(self.manifest):
            raise ConfigError(
                f"this objective needs labels, but the shards in {root} have none (`medscale prep` ran without "
                "a labels CSV): prep them again with --labels LABELS.csv (or a recipe's labels_csv, or "
                "label_from_dir for folder-per-class layouts), or train an objective that needs no labels")
        if micro_batch < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(f"invalid micro_batch={micro_batch}, rank={rank}, world={world}")
        shards = [dict(s, url=s.get("url") or join_url(root, s["path"]))
                  for s in self.manifest["shards"] if s["split"] == split and s["samples"] > 0]
        shards.sort(key=lambda s: s["url"])
        self.shards = shards
        self.urls = [s["url"] for s in shards]
        self.counts = [int(s["samples"]) for s in shards]
        self.samples = sum(self.counts)
        if self.samples == 0:
            have = sorted({s["split"] for s in self.manifest["shards"]})
            raise ConfigError(f"split {split!r} has no samples in {root}/manifest.json (splits there: {have})")
        if train and self.samples < world * micro_batch * self.accumulation:
            raise ConfigError(
                f"split {split!r} has {self.samples} samples, fewer than one global micro-batch "
                f"({world} ranks x {micro_batch}" + (f" x {self.accumulation} accumulated" if self.accumulation > 1
                                                     else "") + "); lower train.micro_batch_size"
            )
        self.workers = max(1, cfg.num_workers)
        self.task = task_of(self.manifest)
        self.num_classes = len(self.manifest.get("classes") or [])
        self.transform = SampleTransform(cfg, train=train)
        self.transforms_on = str(_opt(cfg, "transforms_on", "auto"))
        if self.transforms_on not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"data.transforms_on={self.transforms_on!r}: expected auto, cpu or gpu")
        self.deferred = False  # `make_loader` resolves data.transforms_on from its device
        self.max_corrupt_fraction = float(_opt(cfg, "max_corrupt_fraction", 0.01))
        self.class_balance = float(_opt(cfg, "class_balance", 0.0)) if train else 0.0
        if self.class_balance > 0 and not labels:
            raise ConfigError(f"data.class_balance={self.class_balance} draws samples by class, but this stream "
                              "reads no labels (an objective without labels); set data.class_balance=0")
        self.cache_dir = str(_opt(cfg, "cache_dir", ""))
        self.weights = self._class_weights() if self.class_balance > 0 else None
        self.epoch, self.position = 0, 0
        self._resumed_epoch: int | None = None
        self.corrupt_count = 0  # corrupt samples in the batches this rank consumed (all epochs)
        self.shard_errors = 0  # shard-level errors reported by this rank's workers
        self.bytes_read = 0  # bytes this rank's workers read from local shards
        self._epoch_corrupt = 0
        self.last_global_corrupt = 0  # epoch's corrupt samples summed over ranks at the last check

    # -- order, resume ------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless `load_state_dict` just restored a position in it."""
        if self._resumed_epoch != epoch:
            self.position = 0
            self._epoch_corrupt = 0
        self._resumed_epoch = None
        self.epoch = epoch

    def fingerprint(self) -> str:
        """Digest of everything the epoch order depends on (not the world size)."""
        parts = [self.split, [(s["path"], s["samples"]) for s in self.shards], self.seed, self.train,
                 self.cfg.shuffle_block, self.class_balance]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:_FINGERPRINT_HEX]

    def state_dict(self) -> dict[str, Any]:
        """Where this stream is: ``{"version", "split", "epoch", "position", "samples", "order"}``.

        ``position`` counts entries of the epoch's global sequence consumed by all ranks together
        (batches the trainer has taken from `make_loader`), so the dict is the same on every rank
        and does not depend on the world size.
        """
        return {"version": STATE_VERSION, "split": self.split, "epoch": self.epoch, "position": self.position,
                "samples": self.samples, "order": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict`, with any number of ranks; call `set_epoch` as usual after."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        problems = [f"{k} {state.get(k)!r} != {v!r}" for k, v in
                    (("split", self.split), ("samples", self.samples), ("order", self.fingerprint()))
                    if state.get(k) != v]
        if problems:
            raise ConfigError("loader state does not match this data/config (" + "; ".join(problems) + "): the "
                             "manifest split, seed, data.shuffle_block or data.class_balance changed, so the "
                             "rest of the epoch cannot be continued exactly")
        position = int(state["position"])
        if not 0 <= position <= self.samples:
            raise ValueError(f"loader state position {position} outside the epoch's {self.samples} entries")
        self.epoch, self.position = int(state["epoch"]), position
        self._resumed_epoch = self.epoch
        self._epoch_corrupt = 0

    def batches_per_epoch(self) -> int:
        """Micro-batches each rank yields in a whole epoch (known before reading any shard)."""
        if self.train:
            return self._whole_steps(self.samples)
        return eval_batches(self.samples, self.world, self.micro_batch)

    def _whole_steps(self, entries: int) -> int:
        """Micro-batches per rank in the whole optimizer steps that `entries` sequence entries hold."""
        step = self.world * self.micro_batch * self.accumulation
        return entries // step * self.accumulation

    def remaining_batches(self) -> int:
        """Micro-batches each rank yields from the current position to the end of the epoch."""
        if self.train:
            return self._whole_steps(self.samples - self.position)
        return self.batches_per_epoch()

    def __len__(self) -> int:
        return self.remaining_batches()

    def order(self) -> EpochOrder:
        """The current epoch's global sequence."""
        return EpochOrder(self.counts, seed=self.seed, epoch=self.epoch, shuffle=self.train,
                          block=self.cfg.shuffle_block, weights=self.weights)

    def _class_weights(self) -> np.ndarray:
        """Per-sample weights from the labels, read from the shards' index files (a JSON scan of
        the shards without one)."""
        per_shard = shard_labels(self.urls, self.counts, indexes=[s.get("index_url") for s in self.shards],
                                 sizes=[s.get("bytes") or None for s in self.shards])
        flat = [x for shard in per_shard for x in shard]
        flat += [None] * (self.samples - len(flat))  # a short shard's missing samples
        missing = sum(x is None for x in flat)
        if self.task == "multilabel":
            width = self.num_classes or max((len(x) for x in flat if x is not None), default=0)
            labels = np.array([x if x is not None and len(x) == width else [0] * width for x in flat])
        else:
            labels = np.array([x if isinstance(x, int) else -1 for x in flat])
        w = class_weights(labels, self.class_balance)
        w[[x is None for x in flat]] = 0.0  # unreadable samples are never drawn
        if missing:
            log.warning("class balancing: %d samples without a readable label are not drawn", missing)
        return w

    # -- worker side ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A worker revisits its rank's shards of a shuffle block (about K / world + 3 of the K
        # shards) for the whole block: keep all their indexes so each is scanned once an epoch.
        order = self.order() if self.train else None
        per_block = order.max_shards_per_block() if order is not None else 1
        reader = ShardReader(self.urls, self.counts, cache_dir=self.cache_dir,
                             index_shards=2 * per_block // self.world + _INDEX_SLACK,
                             sizes=[s.get("bytes") or None for s in self.shards],
                             indexes=[s.get("index_url") for s in self.shards])
        acct = _Accounting(self, reader, worker)
        try:
            if order is not None:
                yield from self._train_batches(order, reader, acct, worker, workers)
            else:
                yield from self._eval_batches(reader, acct, worker, workers)
        finally:
            reader.close()
            acct.buffers.close()

    def _train_batches(self, order: EpochOrder, reader: ShardReader, acct: "_Accounting", worker: int,
                       workers: int) -> Iterator[Batch]:
        p0, g = self.position, self.world * self.micro_batch
        mine = worker_batches(self._whole_steps(order.length - p0), worker, workers)
        if reader.streams:  # streams keep only what this worker will use
            for c in mine:
                reader.expect(zip(*order.locate(train_batch_ids(order, p0, c, self.rank, self.world,
                                                                self.micro_batch)[0])))
        for c in mine:
            ids, pos = train_batch_ids(order, p0, c, self.rank, self.world, self.micro_batch)
            shards, idxs = order.locate(ids)
            items = [self._load(reader, int(j), int(i), int(p), acct) for j, i, p in zip(shards, idxs, pos)]
            yield acct.batch(self._fill_train(items, acct), c, p0 + (c + 1) * g)

    def _eval_batches(self, reader: ShardReader, acct: "_Accounting", worker: int, workers: int) -> Iterator[Batch]:
        total = eval_batches(self.samples, self.world, self.micro_batch)
        mine = worker_batches(total, worker, workers)
        order = EpochOrder(self.counts, seed=0, epoch=0, shuffle=False, block=0)
        if reader.streams:
            for c in mine:
                ids = eval_batch_ids(self.samples, c, self.rank, self.world, self.micro_batch)
                reader.expect(zip(*order.locate(ids[ids >= 0])))
        for c in mine:
            ids = eval_batch_ids(self.samples, c, self.rank, self.world, self.micro_batch)
            shards, idxs = order.locate(np.maximum(ids, 0))
            items = []
            for gid, j, i in zip(ids.tolist(), shards.tolist(), idxs.tolist()):
                item = self._load(reader, j, i, gid, acct) if gid >= 0 else None
                items.append(item if item is not None else self._padding())
            yield acct.batch(items, c, 0)

    def _load(self, reader: ShardReader, shard: int, index: int, position: int,
              acct: "_Accounting") -> dict[str, Any] | None:
        raw = reader.get(shard, index)
        if raw is None:
            acct.corrupt(f"sample {index} of {self.urls[shard]} is missing or unreadable")
            return None
        # The sample's seed depends on (seed, epoch, position) only: the same for any world size.
        # Training augmentation draws from it; evaluation samples get one fixed per position (an
        # objective that draws per sample, such as MAE's masks, sees the same draw every time).
        seed = _mix(acct.seed_base + position) if self.train else _mix(position)
        if self.transform.train:
            # The transforms draw from `seed` itself; torch's generator is seeded too for anything
            # else a worker draws. Only the CPU generator: torch.manual_seed also queues lazy CUDA
            # seeding, which captures a stack trace each call.
            torch.default_generator.manual_seed(seed)
        try:
            item = decode_sample(raw, self.transform, self.task, self.num_classes, self.labels, seed=seed,
                                 defer=self.deferred)
            item["seed"] = seed
            return item
        except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt sample: counted, logged, skipped
            acct.corrupt(f"sample {raw.get('__key__')} in {raw.get('__url__')}: {type(e).__name__}: {e}")
            return None

    def _fill_train(self, items: list[dict[str, Any] | None], acct: "_Accounting") -> list[dict[str, Any]]:
        """Corrupt slots become copies of a good sample (of this batch, else this worker's last).

        Never raises: a rank that stopped alone would leave the others waiting in a collective;
        the corrupt-fraction check stops all ranks together instead.
        """
        good = next((x for x in items if x is not None), acct.last_good)
        if good is None:  # nothing readable yet in this worker: a blank image (of class 0)
            good = self._padding()
            if self.labels:
                good["target"] = [0.0] * self.num_classes if self.task == "multilabel" else 0
        else:
            acct.last_good = good
        stand_in = dict(good, valid=False)
        return [x if x is not None else stand_in for x in items]

    def _padding(self) -> dict[str, Any]:
        c, s = self.cfg.channels, self.cfg.image_size
        if self.deferred:
            pixels, params = self.transform.blank()
            item: dict[str, Any] = {"pixels": pixels, "params": params}
        else:
            item = {"image": torch.zeros(c, s, s)}
        item.update({"key": "", "patient": "", "study": "", "valid": False, "seed": 0})
        if self.labels:
            item["target"] = [0.0] * self.num_classes if self.task == "multilabel" else -1
        return item

    # -- main-process side (called by StreamLoader) ---------------------------------------------

    def resolve_transforms(self, device: torch.device | str | None) -> str:
        """Where the transforms run for batches bound for `device` (``data.transforms_on``; auto:
        gpu when `device` is CUDA, else cpu; with no device, cpu: callers that read
        ``batch["image"]`` straight from the loader keep working); sets `deferred`. Called by
        `make_loader` before the workers start."""
        mode = self.transforms_on
        if device is None:
            mode = "cpu"
        elif mode == "auto":
            mode = "gpu" if torch.device(device).type == "cuda" else "cpu"
        self.deferred = mode == "gpu"
        return mode

    def _consumed(self, stats: dict[str, Any], index: int, total: int) -> None:
        if stats["batch"] != index:
            raise RuntimeError(f"loader delivered batch {stats['batch']} where {index} was due; batches must come "
                               "back in order for exact resume. This is a bug in medscale: please report it with "
                               "this log; the same command resumes from the last checkpoint")
        self.corrupt_count += stats["corrupt"]
        self.shard_errors += stats["shard_errors"]
        self.bytes_read += stats["bytes"]
        if not self.train:
            return
        self.position = stats["position"]
        self._epoch_corrupt += stats["corrupt"]
        if (index + 1) % _CHECK_EVERY == 0 or index + 1 == total:
            self._check_corrupt()

    def _check_corrupt(self) -> None:
        total = _sum_over_ranks(self._epoch_corrupt, self.world)
        self.last_global_corrupt = total
        limit = self.max_corrupt_fraction * self.samples
        if total > limit:
            # Every rank got the same sum, so every rank stops here: no rank waits in a collective.
            raise CorruptShards(
                f"{total} corrupt samples in epoch {self.epoch} of split {self.split!r} ({self.root}) exceed "
                f"data.max_corrupt_fraction={self.max_corrupt_fraction} of its {self.samples} samples; "
                "the log names each one (logger medscale.data); check the shards with `medscale inspect --verify`"
            )

    def stats(self) -> dict[str, int]:
        """Counters for the training metrics (this rank; ``global_corrupt_epoch`` summed over ranks)."""
        return {"corrupt_samples": self.corrupt_count, "shard_errors": self.shard_errors,
                "bytes_read": self.bytes_read, "global_corrupt_epoch": self.last_global_corrupt,
                "epoch": self.epoch, "position": self.position}


def _mix(x: int) -> int:
    """splitmix64: a well-spread 63-bit seed from a counter (cheaper than hashing per sample)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & _MASK63


class _Accounting:
    """Per-worker corrupt counting, logging and the ``stats`` each batch carries."""

    def __init__(self, stream: ShardStream, reader: ShardReader, worker: int):
        self.stream, self.reader, self.worker = stream, reader, worker
        self.corrupt_total = 0
        self.in_batch = 0
        self.shards_reported = 0
        self.bytes_reported = 0
        self.last_good: dict[str, Any] | None = None
        self.buffers = SharedBuffers()
        # Per-sample augmentation seeds are _mix(seed_base + position): a function of (seed,
        # epoch, position in the global sequence) only, the same for any world size.
        self.seed_base = stable_seed(stream.seed, stream.epoch, "augment")

    def corrupt(self, why: str) -> None:
        self.corrupt_total += 1
        self.in_batch += 1
        n = self.corrupt_total
        if n <= _LOG_FIRST or n % _LOG_EVERY == 0:
            log.warning("skipping corrupt sample (%d so far in rank %d worker %d): %s", n, self.stream.rank,
                        self.worker, why)

    def batch(self, items: list[dict[str, Any]], index: int, position: int) -> Batch:
        shards = len(self.reader.errors.shards)
        read = self.reader.bytes_read
        stats = {"batch": index, "position": position, "worker": self.worker, "corrupt": self.in_batch,
                 "shard_errors": shards - self.shards_reported, "bytes": read - self.bytes_reported}
        self.in_batch, self.shards_reported, self.bytes_reported = 0, shards, read
        out = collate(items, self.buffers)
        out["stats"] = stats
        return out


def _sum_over_ranks(value: int, world: int) -> int:
    """``value`` summed over ranks on a gloo group (its own, so NCCL defaults are left alone)."""
    import torch.distributed as dist

    from medscale.dist import cpu_group

    if world == 1 or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, group=cpu_group())
    return int(t.item())


class StreamLoader(DataLoader):
    """A DataLoader over a ShardStream that tells the stream which batches were consumed.

    Each batch taken from it advances ``stream.position`` (the resume state) and adds the
    batch's worker stats to the stream's counters, in the main process.
    """

    def __init__(self, stream: ShardStream, device: torch.device | str | None = None):
        workers = stream.cfg.num_workers
        cuda = device is not None and torch.device(device).type == "cuda"
        self.transforms_on = stream.resolve_transforms(device)
        # Pinned batches let the copy to the GPU run asynchronously (non_blocking in `to_device`).
        super().__init__(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                         prefetch_factor=_PREFETCH if workers else None, in_order=True,
                         worker_init_fn=functools.partial(_worker_init, parent=os.getpid()) if workers else None,
                         pin_memory=cuda)
        self.stream = stream

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        stream = self.stream
        total = stream.remaining_batches()
        for index, batch in enumerate(super().__iter__()):
            stream._consumed(batch["stats"], index, total)
            if "pixels" in batch:
                batch["device_transform"] = stream.transform  # applied by `to_device`
            yield to_tensors(batch, stream.task)


def _worker_init(worker_id: int, parent: int) -> None:
    """In each loader worker: stop signals are the main process's business, and its death is the worker's.

    `scancel`, a time limit or a preemption signal every process of a Slurm step, workers included;
    a worker that died of SIGTERM makes the main process raise "DataLoader worker is killed by
    signal" before it could save. Ignoring them here lets the main process stop at the step
    boundary; the workers still end with it: the loader's sentinel, or the kernel's SIGKILL when
    the rank dies (torch's own check of the parent only runs between batches, seconds later).
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL, parent)


def make_loader(stream: ShardStream, device: torch.device | str | None = None) -> StreamLoader:
    """A loader over `stream` for batches bound for `device`, which decides where the transforms
    run (``data.transforms_on``; without a device always in the workers) and whether batches are
    pinned (CUDA): batching happens in the workers (batch_size=None), order is kept. Move each
    batch with `medscale.data.device.to_device`."""
    return StreamLoader(stream, device)
