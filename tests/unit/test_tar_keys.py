"""Sample keys in prep's shard writer: a key is written once per `ShardSequence`."""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import pytest

from medscale.formats.tar import INDEX_SUFFIX, DuplicateKey, ShardSequence, read_index, scan_tar


def _members(i: int) -> dict[str, bytes]:
    return {"json": b'{"i": %d}' % i, "pix.zst": bytes([i]) * 700}


def _scan(path: Path) -> list[tuple[str, dict]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        samples, problem = scan_tar(fd, path.stat().st_size)
    finally:
        os.close(fd)
    assert problem == ""
    return samples


def test_a_repeated_key_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    seq = ShardSequence(tmp_path, "train", 3, 1 << 40)
    seq.add("a", _members(1), 0, {"x": 1})
    seq.add("b", _members(2), 1, {"y": 1})
    written = seq.tar.size
    with pytest.raises(DuplicateKey, match=r"'a'.*train-000003-00\.tar") as e:
        seq.add("a", _members(3), 1, {"y": 1})
    assert isinstance(e.value, ValueError) and (e.value.key, e.value.first) == ("a", "train-000003-00.tar")
    assert seq.tar.size == written and seq.samples == 2  # nothing of the second "a"
    seq.add("c", _members(4))  # the sequence stays usable
    (entry,) = seq.close()
    assert entry["samples"] == 3 and entry["label_counts"] == {"x": 1, "y": 1}
    path = tmp_path / entry["path"]
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert tar.extractfile("a.json").read() == b'{"i": 1}'  # the first "a", untouched
    assert names == ["a.json", "a.pix.zst", "b.json", "b.pix.zst", "c.json", "c.pix.zst"]
    index, why = read_index(str(path) + INDEX_SUFFIX, path.stat().st_size)
    assert why == "" and [k for k, _ in index.samples] == ["a", "b", "c"] == [k for k, _ in _scan(path)]


def test_a_key_from_an_earlier_shard_of_the_sequence_is_refused_and_named(tmp_path: Path) -> None:
    seq = ShardSequence(tmp_path, "val", 0, 500)  # each sample (700+ bytes) fills a shard
    for key in ("a", "b", "c"):
        seq.add(key, _members(0))
    assert seq.part == 2
    with pytest.raises(DuplicateKey) as e:
        seq.add("a", _members(1))
    message = str(e.value)
    assert "'a'" in message and "val-000000-00.tar" in message and "val-000000-02.tar" in message
    assert [s["samples"] for s in seq.close()] == [1, 1, 1]


def test_other_sequences_are_independent_and_the_error_pickles(tmp_path: Path) -> None:
    # Keys are unique per sequence (one split of one chunk); prep's keys are pseudonyms that are
    # unique across the corpus, which a sequence cannot check by itself.
    train, val = ShardSequence(tmp_path, "train", 0, 1 << 40), ShardSequence(tmp_path, "val", 0, 1 << 40)
    train.add("a", _members(0))
    val.add("a", _members(0))
    assert [s["samples"] for s in train.close() + val.close()] == [1, 1]
    error = DuplicateKey("k", "train-000000-01.tar", "train-000000-00.tar")
    again = pickle.loads(pickle.dumps(error))  # raised in prep's worker processes
    assert type(again) is DuplicateKey and str(again) == str(error) and again.key == "k"
