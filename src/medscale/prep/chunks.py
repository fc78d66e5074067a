"""A worker's share: one chunk of inputs to shards, a reject log and its marker.

Each chunk writes one shard sequence per split (``{split}-{chunk:06d}-{part:02d}.tar``, rolling over
at ``shard_bytes``, each with its member-offset index), its part of the reject log into the log
directory, and its marker last (`medscale.prep.markers`). A chunk run again after a kill first
removes what its earlier run left, so it ends with byte-identical shards.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from medscale.files import atomic_write
from medscale.formats.sample import encode_sample
from medscale.formats.tar import DuplicateKey, ShardSequence
from medscale.leash import die_with_parent
from medscale.prep.convert import Context, dicom_samples, encode, label_counts, photo_samples
from medscale.prep.discover import PHOTO_SUFFIXES, Source
from medscale.prep.errors import RejectedInput
from medscale.prep.instances import in_preference_order
from medscale.prep.job import PrepJob
from medscale.prep.labels import LabelTable
from medscale.prep.markers import ChunkMarker, write_marker
from medscale.prep.splits import patient_split

__all__ = ["init_worker", "process_chunk"]

_CTX: Context | None = None
_PROGRESS: Any = None


def init_worker(job: PrepJob, labels: LabelTable | None, splits: dict[str, str] | None, progress: Any,
                 parent: int | None = None) -> None:
    global _CTX, _PROGRESS  # noqa: PLW0603 - a worker process's state, set once by its initializer
    if parent is not None:  # a worker process: it dies with prep (SIGKILL included), mid-chunk or idle
        die_with_parent(signal.SIGKILL, parent)
    _CTX, _PROGRESS = Context(job, labels, splits), progress


def process_chunk(args: tuple[int, list[Source]]) -> ChunkMarker:
    index, sources = args
    ctx = _CTX
    assert ctx is not None, "worker not initialised"  # programming error, not data validation
    t0 = time.perf_counter()
    out = ctx.job.out
    for stale in out.glob(f"*-{index:06d}-*.tar*"):
        stale.unlink()  # leftovers of an interrupted run of this chunk
    result = ChunkMarker(index=index, inputs=len(sources))
    sequences: dict[str, ShardSequence] = {}
    patients: dict[str, Counter] = {}
    log: list[dict[str, Any]] = []  # names sources: written to the log directory, never beside the shards
    ctx.dropped.clear()
    kept: dict[str, int] = {}  # sample key -> position of the input that wrote it (all splits of the chunk)

    def reject(src: Source, reason: str, detail: str) -> None:
        result.rejects.append({"input": src.position, "reason": reason})
        log.append({"input": src.position, "path": src.path, "reason": reason, "detail": detail})

    for src in in_preference_order(sources):
        samples, encoded = [], []
        try:
            is_photo = Path(src.path).suffix.lower() in PHOTO_SUFFIXES
            samples = photo_samples(ctx, src) if is_photo else dicom_samples(ctx, src)
            first = next((kept[k] for k, _, _ in samples if k in kept), None)
            if first is not None:  # the same SOPInstanceUID, hence the same keys, as an input already written
                raise RejectedInput("duplicate", f"the same instance (SOPInstanceUID) as input {first}, which is kept")
            if not samples:
                raise RejectedInput("empty", "decoded to no images")
            encoded = [encode(ctx, px) for _, _, px in samples]
        except RejectedInput as r:
            reject(src, r.reason, r.detail)
            samples = []
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - one bad file must not end a million-file run; it is reported
            reject(src, "error", f"{type(e).__name__}: {e}")
            samples = []
        added = 0
        for (key, info, _), (data, pix) in zip(samples, encoded):
            patient = info["patient"]
            assigned = ctx.splits.get(patient)
            split = assigned or patient_split(ctx.pseudo, patient, ctx.cfg.splits)
            result.stratified += assigned is not None
            info["pixels"] = pix
            info["split"] = split
            target = info.pop("target")
            members = encode_sample(info, ctx.ext, data, task=ctx.task, label=target)
            if split not in sequences:
                sequences[split] = ShardSequence(out, split, index, ctx.cfg.shard_bytes)
            try:
                sequences[split].add(key, members, target, label_counts(ctx, target))
            except DuplicateKey as e:  # never two samples under one key (the reader would merge them)
                if added:  # frames of one input have keys of their own: a collision here is a bug
                    raise
                reject(src, "duplicate", str(e))
                break
            added += 1
            patients.setdefault(split, Counter())[patient] += 1
            result.samples += 1
            result.lossy += not info.get("lossless", True)
            result.redacted += bool(info.get("redacted"))
        result.accepted += added > 0
        kept.update((k, src.position) for k, _, _ in samples[:added])
        if _PROGRESS is not None:
            with _PROGRESS.get_lock():
                _PROGRESS.value += 1
    for split in sorted(sequences):
        result.shards.extend(sequences[split].close())
    result.patients = {s: dict(sorted(c.items())) for s, c in sorted(patients.items())}
    result.dropped_codes = dict(sorted(ctx.dropped.items()))
    result.seconds = time.perf_counter() - t0
    atomic_write(ctx.job.logs / "rejects" / f"{index:06d}.jsonl", "".join(json.dumps(x) + "\n" for x in log))
    write_marker(out, result)  # last: its presence means the chunk is complete
    return result
