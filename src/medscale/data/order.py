"""The order of an epoch and its split over ranks and workers: pure functions, no I/O.

The *global sequence* of a training epoch depends only on (shard list, seed, epoch, block size,
class balance), never on the number of ranks, workers or the micro-batch size:

1. the shards are permuted with a rng seeded by (seed, epoch);
2. consecutive shards of that permutation are grouped into *blocks* of whole shards holding at
   least ``block`` samples (a remainder under half a block joins the last block);
3. the samples of each block are permuted with a rng seeded by (seed, epoch, block index).

A global sample id is a sample's index in the path-sorted shard list (shard ``j`` holds ids
``cum[j]:cum[j+1]``). Class-balanced epochs draw ``N`` ids with replacement, weighted by class,
and then order those draws the same way, so an epoch always has ``N`` entries.

Training consumes the sequence in *global batches* of ``world * micro_batch`` entries; a rank's
micro-batch ``c`` is its slice of global batch ``c`` after sorting that batch by read order
(shard in the epoch permutation, then position inside the shard). The sort changes nothing in
the gradient (it is averaged over the global batch) but gives each rank a narrow range of shards,
which bounds how many shards every rank must read (see `ShardStream`). The loader's resume state
is the number of entries consumed, ``position``, a multiple of the global batch of whatever world
size consumed it; resuming at ``position`` with any world size continues the same sequence.

Evaluation reads every sample once in path order: rank ``r`` gets a contiguous range of
``ceil(N / world)`` samples, cut into micro-batches, the short last one padded.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

__all__ = ["stable_seed", "EpochOrder", "class_weights", "train_batch_ids", "eval_batches", "eval_batch_ids",
           "worker_batches"]


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from parts that is the same in every process (unlike ``hash()`` of str)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _rng(*parts: Any) -> np.random.Generator:
    return np.random.default_rng(stable_seed(*parts))


def class_weights(labels: np.ndarray, power: float) -> np.ndarray:
    """Per-sample draw weights ``count(class) ** -power`` for class-balanced epochs.

    Args:
        labels: (N,) class indices, or (N, C) 0/1 multi-label targets; a multi-label sample
            takes the weight of its rarest positive finding, a sample with none counts as its
            own "no finding" class.
        power: 0 leaves the distribution alone, 1 makes classes equally frequent, 0.5 is the
            square-root compromise.
    """
    if labels.ndim == 1:
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        return counts[inverse].astype(np.float64) ** -power
    pos = labels > 0
    per_class = pos.sum(0).astype(np.float64)
    none = ~pos.any(1)
    w = np.zeros(len(labels))
    with np.errstate(divide="ignore"):
        cls_w = np.where(per_class > 0, per_class ** -power, 0.0)
    w[~none] = (pos[~none] * cls_w).max(1)
    if none.any():
        w[none] = float(none.sum()) ** -power
    return w


class EpochOrder:
    """The global sequence of one epoch, computed lazily block by block.

    Args:
        counts: samples per shard, shards in path order.
        seed, epoch: what the order is a function of.
        shuffle: permute shards and samples (training); False keeps path order (evaluation).
        block: samples per shuffle block (whole shards are grouped until they reach it); <= 1
            permutes the shards only.
        weights: per-sample draw weights for class balancing (None reads each sample once).
    """

    def __init__(self, counts: Sequence[int], *, seed: int, epoch: int, shuffle: bool, block: int,
                 weights: np.ndarray | None = None):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(self.counts)])
        self.samples = int(self.cum[-1])
        self.shuffle, self.block = shuffle, block
        self.seed, self.epoch = seed, epoch
        n_shards = len(self.counts)
        self.shard_order = _rng(seed, epoch, "shards").permutation(n_shards) if shuffle else np.arange(n_shards)
        self.shard_rank = np.empty(n_shards, dtype=np.int64)
        self.shard_rank[self.shard_order] = np.arange(n_shards)
        # Multiplicity of each id in this epoch: 1, or a weighted draw with replacement.
        self.mult: np.ndarray | None = None
        if weights is not None:
            if len(weights) != self.samples:
                raise ValueError(f"class weights cover {len(weights)} samples, the split has {self.samples}")
            p = np.asarray(weights, dtype=np.float64)
            self.mult = _rng(seed, epoch, "balance").multinomial(self.samples, p / p.sum())
        per_shard = self.counts if self.mult is None else np.bincount(
            np.repeat(np.arange(n_shards), self.counts), weights=self.mult, minlength=n_shards).astype(np.int64)
        self.length = int(per_shard.sum())
        self._blocks = self._cut_blocks(per_shard[self.shard_order])
        self._starts = np.array([p for _, _, p in self._blocks], dtype=np.int64)
        self._cache: dict[int, np.ndarray] = {}

    def _cut_blocks(self, sizes: np.ndarray) -> list[tuple[int, int, int]]:
        """(first shard slot, end shard slot, first sequence position) of each block."""
        if not self.shuffle or self.block <= 1:
            starts = np.concatenate([[0], np.cumsum(sizes)])
            return [(i, i + 1, int(starts[i])) for i in range(len(sizes))]
        blocks, first, acc, pos = [], 0, 0, 0
        for i, n in enumerate(sizes):
            acc += int(n)
            if acc >= self.block:
                blocks.append((first, i + 1, pos))
                first, pos, acc = i + 1, pos + acc, 0
        if first < len(sizes):
            if blocks and acc < self.block // 2:
                a, _, p = blocks.pop()  # a short remainder joins the last block
                blocks.append((a, len(sizes), p))
            else:
                blocks.append((first, len(sizes), pos))
        return blocks

    def _block_ids(self, b: int) -> np.ndarray:
        if b in self._cache:
            return self._cache[b]
        first, end, _ = self._blocks[b]
        parts = []
        for j in self.shard_order[first:end]:
            ids = np.arange(self.cum[j], self.cum[j + 1], dtype=np.int64)
            parts.append(ids if self.mult is None else np.repeat(ids, self.mult[ids]))
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if self.shuffle and self.block > 1:
            ids = _rng(self.seed, self.epoch, "block", b).permutation(ids)
        if len(self._cache) >= 2:  # a worker moves forward through blocks; keep the last two
            self._cache.pop(next(iter(self._cache)))
        self._cache[b] = ids
        return ids

    def ids(self, start: int, stop: int) -> np.ndarray:
        """Global sample ids at sequence positions ``start:stop``."""
        if not 0 <= start <= stop <= self.length:
            raise IndexError(f"positions {start}:{stop} outside the epoch's {self.length}")
        out = []
        b = max(0, int(np.searchsorted(self._starts, start, side="right")) - 1)
        while start < stop:
            base = self._blocks[b][2]
            block = self._block_ids(b)
            take = block[start - base : min(stop - base, len(block))]
            out.append(take)
            start += len(take)
            b += 1
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, index within shard) of global ids."""
        shard = np.searchsorted(self.cum, ids, side="right") - 1
        return shard, ids - self.cum[shard]

    def read_key(self, ids: np.ndarray) -> np.ndarray:
        """Sort key that follows the order shards are read in this epoch."""
        shard, idx = self.locate(ids)
        return self.shard_rank[shard] * (1 << 32) + idx

    def shards_per_block(self) -> float:
        return len(self.counts) / max(1, len(self._blocks))

    def max_shards_per_block(self) -> int:
        return max((end - first for first, end, _ in self._blocks), default=0)


def train_batch_ids(order: EpochOrder, position: int, c: int, rank: int, world: int,
                    micro_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(global ids, sequence positions) of rank ``rank``'s micro-batch ``c`` counted from ``position``."""
    g = world * micro_batch
    start = position + c * g
    ids = order.ids(start, start + g)
    pos = np.arange(start, start + g)
    sel = np.argsort(order.read_key(ids), kind="stable")[rank * micro_batch : (rank + 1) * micro_batch]
    return ids[sel], pos[sel]


def eval_batches(samples: int, world: int, micro_batch: int) -> int:
    """Micro-batches every rank runs to see each of ``samples`` once."""
    per_rank = -(-samples // world)
    return max(1, -(-per_rank // micro_batch))


def eval_batch_ids(samples: int, c: int, rank: int, world: int, micro_batch: int) -> np.ndarray:
    """Global ids of rank ``rank``'s eval micro-batch ``c``; -1 marks padding."""
    per_rank = -(-samples // world)
    lo, hi = rank * per_rank, min((rank + 1) * per_rank, samples)
    ids = np.arange(lo + c * micro_batch, lo + (c + 1) * micro_batch)
    ids[ids >= hi] = -1
    return ids


def worker_batches(total: int, worker: int, workers: int) -> range:
    """The batch indices a DataLoader worker produces: torch collects them round-robin."""
    return range(worker, total, workers)
