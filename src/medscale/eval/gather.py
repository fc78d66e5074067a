"""One split's results from every rank, each sample once: what every objective's evaluation shares.

Each rank evaluates its share of a split (padding samples are flagged ``valid=False`` by the loader
and dropped); the parts are all-gathered with their sample keys, a sample seen twice is counted
and kept once, and the whole is checked against the manifest, so a loader bug or shards that
changed cannot hide in the figures.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from medscale.data.loader import ShardStream
from medscale.errors import CorruptShards, RunStateError

__all__ = ["SplitRows", "gather_split"]

log = logging.getLogger("medscale.eval")


class SplitRows(NamedTuple):
    """Which gathered rows make up a split, each sample once (see `gather_split`)."""

    rows: list[tuple[int, int]]
    """(part, index) of each distinct sample, in the order its key was first seen."""
    keys: list[str]
    """The samples' keys, in the same order."""
    duplicates: int
    corrupt: int


def gather_split(parts: list[dict[str, Any]], stream: ShardStream) -> SplitRows:
    """Every rank's evaluation of a split (``parts``: one dict per rank with ``keys`` and ``corrupt``,
    as all-gathered), each sample taken once, and the checks that it covers the split.

    Raises:
        CorruptShards: more corrupt samples than ``data.max_corrupt_fraction`` allows, or no sample at all.
        RunStateError: another number of distinct samples than the manifest holds for the split,
            corrupt ones included (shards that changed, or a loader bug, must not hide in the figures).
    """
    seen: dict[str, tuple[int, int]] = {}
    duplicates = 0
    for j, part in enumerate(parts):
        for i, key in enumerate(part["keys"]):
            if key in seen:
                duplicates += 1  # should never happen; counted so a loader bug cannot hide
                continue
            seen[key] = (j, i)
    corrupt = sum(part["corrupt"] for part in parts)
    if corrupt > stream.max_corrupt_fraction * stream.samples:
        raise CorruptShards(f"{corrupt} corrupt samples in split {stream.split!r} ({stream.root}) exceed "
                            f"data.max_corrupt_fraction={stream.max_corrupt_fraction} of its {stream.samples}; "
                            "the log names each one; check the shards with `medscale inspect --verify`")
    if corrupt:
        log.warning("%d corrupt samples of split %r left out of the evaluation", corrupt, stream.split)
    if not seen:
        raise CorruptShards(f"evaluation of split {stream.split!r} ({stream.root}) saw no readable sample; check the "
                            "shards with `medscale inspect --verify`")
    if len(seen) + corrupt != stream.samples:
        raise RunStateError(f"evaluation saw {len(seen)} distinct samples of split {stream.split!r} and {corrupt} "
                            f"corrupt ones; the manifest says {stream.samples}: the shards in {stream.root} do not "
                            "match their manifest (check them with `medscale inspect --verify`, or prep them again)")
    return SplitRows(list(seen.values()), list(seen), duplicates, corrupt)
