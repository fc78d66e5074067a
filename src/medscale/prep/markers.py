"""Chunk markers: ``OUT/chunks/NNNNNN.json``, written last by the worker that finished a chunk.

A marker's presence means its chunk is complete; `medscale prep --merge` reads them all. They are
typed both ways: written from a `ChunkMarker` and read back into one (`read_marker`), checked before
any of their names is used: markers are files on a shared disk, and the shard and index names in
them become paths below ``--out`` (never outside it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medscale.errors import InputError
from medscale.files import atomic_write
from medscale.formats.manifest import check_entries
from medscale.prep.config import unsafe_split_name

__all__ = ["ChunkMarker", "marker_path", "read_marker", "write_marker"]


@dataclass
class ChunkMarker:
    """What one chunk wrote: its shards (manifest entries), rejects (by input position), patients per
    split, and its counts. Names no source file (the reject log beside ``--out`` does that)."""

    index: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    patients: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> patient -> samples
    inputs: int = 0
    accepted: int = 0
    samples: int = 0
    lossy: int = 0
    stratified: int = 0  # samples whose patient the stratified assignment placed
    redacted: int = 0  # samples whose burned-in text areas were blanked (burned_in: redact)
    dropped_codes: dict[str, int] = field(default_factory=dict)  # CS values that were not defined terms
    seconds: float = 0.0


def marker_path(out: Path, index: int) -> Path:
    return Path(out) / "chunks" / f"{index:06d}.json"


def write_marker(out: Path, marker: ChunkMarker) -> None:
    """Write a chunk's marker (last: its presence means the chunk is complete)."""
    atomic_write(marker_path(out, marker.index), json.dumps(dataclasses.asdict(marker)))


def read_marker(out: Path, index: int) -> ChunkMarker:
    """Chunk `index`'s marker, typed and checked.

    Raises:
        InputError: not the marker of that chunk, a field of the wrong type, or a shard, index or
            split name that is not a plain name below ``--out`` (naming the marker and the entry).
    """
    path = marker_path(out, index)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e}); rerun that chunk with --resume") from None
    if not isinstance(raw, dict) or raw.get("index") != index:
        raise InputError(f"{path} is not the marker of chunk {index}; prep again with --overwrite")
    names = {f.name: f for f in dataclasses.fields(ChunkMarker)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise InputError(f"{path} has fields {unknown} a chunk marker does not have; prep again with --overwrite")
    for name, value in raw.items():
        want = {"int": int, "float": (int, float), "list": list, "dict": dict}[str(names[name].type).split("[")[0]]
        if isinstance(value, bool) or not isinstance(value, want):
            raise InputError(f"{path}: {name} is {value!r}, not a {names[name].type}")
    for s in raw.get("shards", []):
        if not isinstance(s, dict):
            raise InputError(f"{path}: a shard entry is not an object: {s!r}")
        check_entries(s, str(path))
        why = unsafe_split_name(s.get("split"))
        if why is not None:
            raise InputError(f"{path}: split {s.get('split')!r} is refused: {why}")
    return ChunkMarker(**raw)
