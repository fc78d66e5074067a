"""The shard format (`medscale.formats`): what prep writes is what the loader reads.

Tar writer and member-offset index, the sample schema with its optional label, manifest version
and merge, unlabeled prep outputs, MONOCHROME1 end to end.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_deid import make_dicom
from test_loader import cfg
from test_prep import KEY, ROOT, prep

from medscale.data import reader as reader_mod
from medscale.data.loader import ShardStream, make_loader
from medscale.demo import write_synthetic_corpus
from medscale.errors import ConfigError, InputError
from medscale.formats.codec import encode_pixels
from medscale.formats.manifest import MANIFEST_VERSION, has_labels, load_manifest, task_of
from medscale.formats.sample import decode_members, encode_sample
from medscale.formats.tar import INDEX_SUFFIX, INDEX_VERSION, ShardSequence, read_index, scan_tar
from medscale.prep.deid import Pseudonymizer
from medscale.tasks.losses import pos_weight_from_manifest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
DEMO = ROOT / "data_prep" / "demo.yaml"


def batches(stream):
    return list(make_loader(stream))


# -- tar writer and index -------------------------------------------------------------------------


def _write(root: Path, n: int, labels=lambda i: i % 2, shard_bytes: int = 1 << 40) -> list[dict]:
    root.mkdir(parents=True, exist_ok=True)
    seq = ShardSequence(root, "train", 0, shard_bytes)
    for i in range(n):
        data, info = encode_pixels(np.full((8, 8), i, np.uint16), "zstd")
        label = labels(i)
        meta = {"pixels": info, "patient": f"p{i}", "split": "train"}
        seq.add(f"k{i:04d}", encode_sample(meta, "pix.zst", data, task="multiclass", label=label), label,
                {"ab"[label]: 1} if label is not None else {})
    return seq.close()


def test_the_index_matches_a_header_scan_and_is_deterministic(tmp_path):
    shards = _write(tmp_path / "a", 30, shard_bytes=4000)  # several shards: the index rolls over too
    assert len(shards) > 1 and all(s["index"] == s["path"] + INDEX_SUFFIX for s in shards)
    for s in shards:
        path = tmp_path / "a" / s["path"]
        index, why = read_index(str(path) + INDEX_SUFFIX, path.stat().st_size)
        assert why == "" and index.bytes == s["bytes"] == path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        try:
            scanned, problem = scan_tar(fd, path.stat().st_size)
        finally:
            os.close(fd)
        assert problem == "" and index.samples == scanned and len(index.labels) == s["samples"]
    # Same samples, same bytes: shards, checksums and indexes.
    again = _write(tmp_path / "b", 30, shard_bytes=4000)
    assert [(s["path"], s["sha256"]) for s in again] == [(s["path"], s["sha256"]) for s in shards]
    for s in shards:
        assert (tmp_path / "a" / s["index"]).read_bytes() == (tmp_path / "b" / s["index"]).read_bytes()


def test_the_local_reader_uses_the_index_and_falls_back_to_a_scan(tmp_path, monkeypatch, caplog):
    from conftest import write_shards

    manifest = write_shards(tmp_path / "s", {"train": [7, 5]})
    path = tmp_path / "s" / manifest["shards"][0]["path"]
    shard = reader_mod._LocalShard(str(path), str(path))
    assert shard.indexed and len(shard.samples) == 7 and shard.read(3, False)["__key__"] == "s000003"
    shard.close()

    # With every index present, opening a shard scans no header.
    monkeypatch.setattr(reader_mod, "scan_tar", lambda *a: pytest.fail("scanned a shard that has an index"))
    s = ShardStream(str(tmp_path / "s"), "train", cfg(), micro_batch=4, seed=0)
    assert sum(int(b["valid"].sum()) for b in batches(s)) == 12 and s.stats()["corrupt_samples"] == 0
    monkeypatch.undo()

    # An index of another size (the shard was rewritten), a newer version, a member outside the shard
    # (offsets are data: never a seek or an allocation anywhere), or none: the header scan.
    index = Path(str(path) + INDEX_SUFFIX)
    doc = json.loads(index.read_bytes())
    first = doc["samples"][0]
    outside = {**first, "members": {ext: [doc["bytes"] - 10, 1 << 40] for ext in first["members"]}}
    for broken in ({**doc, "bytes": doc["bytes"] + 512}, {**doc, "version": INDEX_VERSION + 1},
                   {**doc, "samples": [outside, *doc["samples"][1:]]}, None):
        if broken is None:
            index.unlink()
        else:
            index.write_text(json.dumps(broken))
        with caplog.at_level(logging.INFO, logger="medscale.data"):
            shard = reader_mod._LocalShard(str(path), str(path))
        assert not shard.indexed and len(shard.samples) == 7 and shard.read(6, False)["__key__"] == "s000006"
        shard.close()
    assert "describes a shard of" in caplog.text and "index version" in caplog.text
    assert "lies outside the shard's" in caplog.text


def test_class_balance_reads_labels_from_the_indexes_not_the_shards(tmp_path, monkeypatch):
    from conftest import write_shards

    write_shards(tmp_path / "s", {"train": [20, 13, 9]})
    root = str(tmp_path / "s")
    monkeypatch.setattr(reader_mod, "scan_json", lambda *a: pytest.fail("JSON-scanned shards that have indexes"))
    indexed = ShardStream(root, "train", cfg(class_balance=1.0), micro_batch=4, seed=0).weights
    piped = ShardStream(f"pipe:cat {root}/{{}}", "train", cfg(class_balance=1.0), micro_batch=4, seed=0).weights
    monkeypatch.undo()
    for index in (tmp_path / "s").glob("*" + INDEX_SUFFIX):
        index.unlink()  # shards of an older prep: the JSON scan gives the same weights
    scanned = ShardStream(root, "train", cfg(class_balance=1.0), micro_batch=4, seed=0).weights
    np.testing.assert_array_equal(indexed, scanned)
    np.testing.assert_array_equal(piped, scanned)
    assert len(set(indexed.tolist())) == 2  # two classes, two weights


def test_prep_writes_an_index_per_shard_the_same_bytes_on_every_run(tmp_path):
    labels = write_synthetic_corpus(tmp_path / "raw", patients=6, images_per_patient=2, size=32)
    runs = [prep([tmp_path / "raw" / "dicom"], tmp_path / name, labels=labels, recipe=DEMO, chunk_files=5)
            for name in ("a", "b")]
    assert runs[0]["shards"] == runs[1]["shards"]
    for s in runs[0]["shards"]:
        shard = tmp_path / "a" / s["path"]
        index, why = read_index(str(tmp_path / "a" / s["index"]), shard.stat().st_size)
        assert why == "" and len(index.samples) == s["samples"]
        assert sum(1 for x in index.labels if x == 1) == s["label_counts"].get("lesion", 0)
        for name in (s["path"], s["index"]):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


# -- sample schema --------------------------------------------------------------------------------


def test_the_label_is_optional_in_a_sample():
    data, info = encode_pixels(np.arange(16, dtype=np.uint8).reshape(4, 4), "zstd")
    labeled = encode_sample({"pixels": info, "patient": "p"}, "pix.zst", data, task="multilabel", label=[0, 1])
    unlabeled = encode_sample({"pixels": info, "patient": "p"}, "pix.zst", data, task="unlabeled")
    px, meta, label = decode_members(labeled, "multilabel", 2)
    assert label == [0.0, 1.0] and meta["labels"] == [0, 1] and px.dtype == np.uint8
    assert decode_members(labeled, "multilabel", 2, labels=False)[2] is None
    assert decode_members(unlabeled, "multiclass", 2)[2] is None and "label" not in json.loads(unlabeled["json"])
    with pytest.raises(ValueError, match="expected 3 0/1 values"):
        decode_members(labeled, "multilabel", 3)
    with pytest.raises(ValueError, match="cannot carry a label"):
        encode_sample({}, "pix.zst", data, task="unlabeled", label=1)


def test_a_labeled_sample_without_its_label_is_corrupt(tmp_path):
    shards = _write(tmp_path, 6, labels=lambda i: None if i == 2 else i % 2)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"version": MANIFEST_VERSION, "task": "multiclass", "classes": ["a", "b"], "shards": shards}))
    s = ShardStream(str(tmp_path), "train", cfg(), micro_batch=3, train=False)
    valid = [k for b in batches(s) for k, v in zip(b["key"], b["valid"].tolist()) if v]
    assert s.stats()["corrupt_samples"] == 1 and "k0002" not in valid and len(valid) == 5
    # Without labels the same sample is fine.
    s = ShardStream(str(tmp_path), "train", cfg(), micro_batch=3, train=False, labels=False)
    assert sum(int(b["valid"].sum()) for b in batches(s)) == 6 and s.stats()["corrupt_samples"] == 0


# -- unlabeled prep outputs -----------------------------------------------------------------------


def test_unlabeled_prep_output_streams_without_labels_and_refuses_an_objective_that_needs_them(tmp_path):
    write_synthetic_corpus(tmp_path / "raw", patients=10, images_per_patient=2, size=32)
    out = tmp_path / "out"
    m = prep([tmp_path / "raw" / "dicom"], out)  # no labels CSV, no label_from_dir
    assert m["task"] == "unlabeled" and m["classes"] == [] and m["version"] == MANIFEST_VERSION
    seen = 0
    for split, d in m["splits"].items():
        for train in (True, False):
            s = ShardStream(str(out), split, cfg(), micro_batch=1, train=train, labels=False)
            got = batches(s)
            assert all("target" not in b for b in got)
            assert s.stats()["corrupt_samples"] == 0 and s.stats()["shard_errors"] == 0
            assert sum(int(b["valid"].sum()) for b in got) == d["samples"]
        seen += d["samples"]
    assert seen == m["samples"] == 20
    with pytest.raises(ConfigError, match="labels"):
        ShardStream(str(out), "train", cfg(), micro_batch=1)
    with pytest.raises(ConfigError, match="class_balance"):
        ShardStream(str(out), "train", cfg(class_balance=1.0), micro_batch=1, labels=False)

    # A manifest from before version 2 said multiclass, with no classes and no label counts.
    old = json.loads((out / "manifest.json").read_text())
    old.update(version=1, task="multiclass")
    (out / "manifest.json").write_text(json.dumps(old))
    assert not has_labels(load_manifest(str(out))) and task_of(load_manifest(str(out))) == "unlabeled"
    with pytest.raises(ConfigError, match="--labels"):
        ShardStream(str(out), "train", cfg(), micro_batch=1)
    assert ShardStream(str(out), "train", cfg(), micro_batch=1, labels=False).samples > 0


# -- manifests ------------------------------------------------------------------------------------


def test_a_newer_manifest_is_refused_naming_the_file_and_both_versions(shard_factory):
    manifest, root = shard_factory({"train": [3]})
    assert load_manifest(str(root))["version"] == MANIFEST_VERSION
    del manifest["version"]  # no version: version 1, read as before
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert len(load_manifest(str(root))["shards"]) == 1
    (root / "manifest.json").write_text(json.dumps({**manifest, "version": MANIFEST_VERSION + 7}))
    with pytest.raises(InputError) as e:
        load_manifest(str(root))
    msg = str(e.value)
    assert str(root / "manifest.json") in msg and f"version {MANIFEST_VERSION + 7}" in msg
    assert f"up to version {MANIFEST_VERSION}" in msg


def test_merged_prep_outputs_sum_label_counts_so_auto_pos_weight_works(tmp_path):
    parts = []
    for i, patients in enumerate((8, 6)):
        labels = write_synthetic_corpus(tmp_path / f"raw{i}", patients=patients, images_per_patient=3, size=32,
                                        seed=i)
        parts.append(prep([tmp_path / f"raw{i}" / "dicom"], tmp_path / f"ct-{i}", labels=labels, recipe=DEMO))
    merged = load_manifest(f"{tmp_path}/ct-*")
    assert merged["roots"] == [str(tmp_path / "ct-0"), str(tmp_path / "ct-1")]
    assert merged["samples"] == sum(p["samples"] for p in parts) == 42
    for split, d in merged["splits"].items():
        own = [p["splits"][split] for p in parts if split in p["splits"]]
        for key in ("shards", "samples", "bytes", "patients"):
            assert d[key] == sum(o[key] for o in own), (split, key)
        for c in ("normal", "lesion"):
            assert d["label_counts"].get(c, 0) == sum(o["label_counts"].get(c, 0) for o in own)
    counts, n = merged["splits"]["train"]["label_counts"], merged["splits"]["train"]["samples"]
    assert pos_weight_from_manifest(merged, "train") == [(n - counts[c]) / counts[c] for c in ("normal", "lesion")]
    s = ShardStream(f"{tmp_path}/ct-*", "train", cfg(), micro_batch=2, train=False, manifest=merged)
    assert sum(int(b["valid"].sum()) for b in batches(s)) == n and s.stats()["corrupt_samples"] == 0


def test_merging_refuses_labeled_with_unlabeled(tmp_path):
    labels = write_synthetic_corpus(tmp_path / "raw", patients=4, images_per_patient=2, size=32)
    prep([tmp_path / "raw" / "dicom"], tmp_path / "p-a", labels=labels, recipe=DEMO)
    prep([tmp_path / "raw" / "dicom"], tmp_path / "p-b")
    with pytest.raises(InputError, match="cannot merge manifests: task"):
        load_manifest(f"{tmp_path}/p-*")


# -- photometric ----------------------------------------------------------------------------------


def test_monochrome1_is_inverted_by_prep_so_bone_is_bright_as_in_monochrome2(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    stored = np.arange(256, dtype=np.uint16) * 16  # 12-bit ramp: air (low) to bone (high) in MONOCHROME2
    files = {"m2": ("MONOCHROME2", stored), "m1_same_anatomy": ("MONOCHROME1", 4095 - stored),
             "m1_same_values": ("MONOCHROME1", stored)}
    for i, (name, (photometric, px)) in enumerate(files.items()):
        ds = make_dicom(SOPInstanceUID=f"1.2.3.4.{i}", PatientID=f"P{i}", PhotometricInterpretation=photometric,
                        PixelData=px.astype(np.uint16).tobytes())
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(src / f"{name}.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    prep([src], out, overrides=["splits={test: 1.0}"])
    pseudo = Pseudonymizer(KEY)
    key_of = {pseudo("instance", f"1.2.3.4.{i}"): name for i, name in enumerate(files)}
    s = ShardStream(str(out), "test", cfg(normalize="minmax"), micro_batch=3, train=False, labels=False)
    (batch,) = batches(s)
    image = {key_of[k]: x[0] for k, x in zip(batch["key"], batch["image"])}
    torch.testing.assert_close(image["m1_same_anatomy"], image["m2"])  # bone bright, air dark in both
    torch.testing.assert_close(image["m1_same_values"], 1 - image["m2"])  # the same numbers read inverted
    assert float(image["m2"][-1, -1]) == 1.0 and float(image["m2"][0, 0]) == 0.0
    # What the shards say: never MONOCHROME1 (the header's own value stays in the metadata).
    for tar in out.glob("*.tar"):
        import tarfile

        with tarfile.open(tar) as t:
            for member in t.getmembers():
                if member.name.endswith(".json"):
                    info = json.loads(t.extractfile(member).read())
                    assert info["photometric"] == "MONOCHROME2"
                    assert info["inverted"] == (info["meta"]["photometric"] == "MONOCHROME1")
