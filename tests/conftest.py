"""Shared fixtures: tiny shard sets written with the real codec and tar writer (with indexes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medscale.formats.codec import encode_pixels, extension_for
from medscale.formats.manifest import MANIFEST_VERSION
from medscale.formats.tar import ShardSequence

NO_ROLLOVER = 1 << 62  # shard_bytes: one shard per count, whatever its size


def write_shards(root: Path, sizes: dict[str, list[int]], *, size: int = 16, classes=("normal", "lesion"),
                 seed: int = 0) -> dict:
    """Write shards with the given per-shard sample counts per split and a matching manifest.

    Shards are written by prep's writer (`medscale.formats.tar.ShardSequence`), so each has its
    member-offset index beside it, as prep's do.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    n = 0
    for split, counts in sizes.items():
        for i, count in enumerate(counts):
            seq = ShardSequence(root, split, i, NO_ROLLOVER)  # names it f"{split}-{i:06d}-00.tar"
            for _ in range(count):
                pixels = rng.integers(-1000, 1000, (size, size)).astype(np.int16)
                data, info = encode_pixels(pixels, "zstd")
                label = int(rng.integers(len(classes)))
                meta = {"pixels": info, "label": label, "patient": f"p{n // 3}", "split": split}
                seq.add(f"s{n:06d}", {"json": json.dumps(meta).encode(), extension_for("zstd"): data}, label)
                n += 1
            shards += seq.close()  # path, split, samples, bytes, sha256, label_counts ({}), index
    manifest = {"version": MANIFEST_VERSION, "task": "multiclass", "classes": list(classes), "shards": shards,
                "splits": {s: {"samples": sum(c)} for s, c in sizes.items()}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture
def shard_factory(tmp_path):
    def make(sizes, **kw):
        return write_shards(tmp_path / "shards", sizes, **kw), tmp_path / "shards"

    return make
