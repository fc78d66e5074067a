"""Loader (single process): equal batch counts, world-independent order, exact resume,
decoding without precision loss, intensity and augmentation options, corrupt data, balancing."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from medscale.formats.codec import encode_pixels, extension_for
from medscale.config import DataConfig
from medscale.formats import sample as sample_mod
from medscale.data.loader import ShardStream, load_manifest, make_loader
from medscale.data.order import EpochOrder, class_weights
from medscale.data.transforms import SampleTransform


def cfg(workers=0, **kw):
    """A DataConfig; options DataConfig does not have yet are set as attributes (the loader uses getattr)."""
    known = set(DataConfig.__dataclass_fields__)
    base = {"image_size": 16, "channels": 1, "num_workers": workers, "shuffle_block": 8, **kw}
    c = DataConfig(**{k: v for k, v in base.items() if k in known})
    for k, v in base.items():
        if k not in known:
            setattr(c, k, v)
    return c


def keys_of(stream):
    out = []
    for b in make_loader(stream):
        out.append([k for k, v in zip(b["key"], b["valid"].tolist()) if v])
    return out


def global_batches(root, world, mb, workers=0, state=None, **kw):
    """Each step's keys over all ranks (ranks run one after the other), and each rank's final state."""
    per_rank, states = [], []
    for rank in range(world):
        s = ShardStream(str(root), "train", cfg(workers, **kw), micro_batch=mb, rank=rank, world=world, seed=3)
        if state:
            s.load_state_dict(state)
        per_rank.append(keys_of(s))
        states.append(s.state_dict())
    assert len({len(b) for b in per_rank}) == 1
    return [sorted(k for r in per_rank for k in r[i]) for i in range(len(per_rank[0]))], states


# -- batch counts and order ---------------------------------------------------------------------


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 2), (4, 1)])
def test_train_batches_equal_on_every_rank_with_uneven_shards(shard_factory, world, workers):
    _, root = shard_factory({"train": [37, 5, 11]})  # 53 samples; fewer shards than ranks x workers
    counts, seen = [], []
    for rank in range(world):
        s = ShardStream(str(root), "train", cfg(workers), micro_batch=4, rank=rank, world=world, seed=3)
        batches = keys_of(s)
        assert len(batches) == s.batches_per_epoch() == 53 // (world * 4)
        assert all(len(b) == 4 for b in batches)
        counts.append(len(batches))
        seen += [k for b in batches for k in b]
    assert len(set(counts)) == 1
    assert len(seen) == len(set(seen)) == counts[0] * world * 4  # no sample twice in an epoch


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 0), (5, 1)])
def test_eval_sees_every_sample_once_and_ranks_agree(shard_factory, world, workers):
    _, root = shard_factory({"test": [13, 2, 7]})
    seen, nbatches = [], set()
    for rank in range(world):
        s = ShardStream(str(root), "test", cfg(workers), micro_batch=4, rank=rank, world=world, train=False)
        batches = keys_of(s)
        nbatches.add(len(batches))
        assert len(batches) == s.batches_per_epoch()
        seen += [k for b in batches for k in b]
    assert len(nbatches) == 1  # same number of forward passes everywhere (ZeRO-3 needs it)
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 22


def test_global_order_does_not_depend_on_world_workers_or_micro_batch(shard_factory):
    _, root = shard_factory({"train": [9, 30, 4, 17]})  # 60 samples
    ref, _ = global_batches(root, 1, 1)  # the global sequence itself, one sample per step
    seq = [b[0] for b in ref]
    for world, mb, workers in [(2, 3, 2), (3, 4, 0), (1, 6, 2)]:
        batches, _ = global_batches(root, world, mb, workers)
        g = world * mb
        assert batches == [sorted(seq[i * g:(i + 1) * g]) for i in range(60 // g)]


def test_shuffle_is_deterministic_per_seed_and_epoch(shard_factory):
    _, root = shard_factory({"train": [20, 20]})
    a = ShardStream(str(root), "train", cfg(), micro_batch=5, seed=1)
    b = ShardStream(str(root), "train", cfg(), micro_batch=5, seed=1)
    first = keys_of(a)
    assert first == keys_of(b)
    a.set_epoch(0)  # a new pass over the same epoch starts from its beginning
    assert keys_of(a) == first
    b.set_epoch(1)
    assert keys_of(b) != first
    c = ShardStream(str(root), "train", cfg(), micro_batch=5, seed=2)
    assert keys_of(c) != first


def test_blocks_mix_whole_shards_and_keep_shard_locality():
    counts = [10] * 12
    order = EpochOrder(counts, seed=0, epoch=0, shuffle=True, block=30)
    ids = order.ids(0, order.length)
    assert sorted(ids.tolist()) == list(range(120))
    shard, _ = order.locate(ids)
    blocks = [set(shard[i:i + 30].tolist()) for i in range(0, 120, 30)]
    assert all(len(b) == 3 for b in blocks)  # each block of 30 samples comes from 3 whole shards
    assert order.shards_per_block() == 3


# -- resume ---------------------------------------------------------------------------------------


def consume(stream, n):
    out = []
    for i, b in enumerate(make_loader(stream)):
        out.append(b["key"])
        if i + 1 == n:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_with_exactly_the_next_samples(shard_factory, workers):
    _, root = shard_factory({"train": [23, 6, 14]})
    full = keys_of(ShardStream(str(root), "train", cfg(workers), micro_batch=4, seed=5))
    s = ShardStream(str(root), "train", cfg(workers), micro_batch=4, seed=5)
    head = consume(s, 3)
    state = json.loads(json.dumps(s.state_dict()))  # JSON-able
    assert state["position"] == 12 and state["epoch"] == 0
    t = ShardStream(str(root), "train", cfg(workers), micro_batch=4, seed=5)
    t.load_state_dict(state)
    t.set_epoch(0)  # what the trainer does at the top of its epoch loop
    assert len(make_loader(t)) == len(full) - 3 and t.batches_per_epoch() == len(full)
    assert head + keys_of(t) == full
    t.set_epoch(1)
    assert t.position == 0 and len(keys_of(t)) == len(full)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3)])
def test_rank_change_resplits_the_rest_of_the_epoch(shard_factory, before, after):
    _, root = shard_factory({"train": [31, 8, 19]})  # 58 samples
    ref, _ = global_batches(root, 1, 1)
    seq = [b[0] for b in ref]
    mb = 3
    streams = [ShardStream(str(root), "train", cfg(), micro_batch=mb, rank=r, world=before, seed=3)
               for r in range(before)]
    head = [consume(s, 2) for s in streams]
    states = [s.state_dict() for s in streams]
    assert all(st == states[0] for st in states)  # the state is the same on every rank
    tail, _ = global_batches(root, after, mb, state=states[0])
    consumed = [k for r in head for b in r for k in b] + [k for b in tail for k in b]
    p = 2 * before * mb
    end = p + (58 - p) // (after * mb) * (after * mb)
    assert len(consumed) == len(set(consumed)) == end  # none repeated
    assert sorted(consumed) == sorted(seq[:end])  # none skipped
    g = after * mb
    assert tail == [sorted(seq[p + i * g:p + (i + 1) * g]) for i in range(len(tail))]


def test_resume_skips_without_decoding(shard_factory, monkeypatch):
    _, root = shard_factory({"train": [40, 40]})
    decoded = []
    real = sample_mod.decode_pixels
    monkeypatch.setattr(sample_mod, "decode_pixels", lambda *a, **k: decoded.append(1) or real(*a, **k))
    s = ShardStream(str(root), "train", cfg(), micro_batch=4, seed=0)
    s.load_state_dict({**s.state_dict(), "position": 60})
    assert len(keys_of(s)) == 5
    assert len(decoded) == 20  # only the samples yielded after the resume point


def test_state_from_other_data_or_order_is_refused(shard_factory):
    _, root = shard_factory({"train": [20, 20]})
    state = ShardStream(str(root), "train", cfg(), micro_batch=4, seed=0).state_dict()
    with pytest.raises(ValueError, match="shuffle_block"):
        ShardStream(str(root), "train", cfg(), micro_batch=4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        ShardStream(str(root), "train", cfg(), micro_batch=4, seed=0).load_state_dict({**state, "position": 99})


# -- decoding and intensity -------------------------------------------------------------------------


def write_images(root: Path, images, encoding="zstd", meta=None):
    root.mkdir(parents=True, exist_ok=True)
    ext = extension_for(encoding)
    with wds.TarWriter(str(root / "test-000000-00.tar"), encoder=False) as w:
        for i, img in enumerate(images):
            data, info = encode_pixels(img, encoding, 1)
            m = {"pixels": info, "label": 0, "patient": f"p{i}", **(meta or {})}
            w.write({"__key__": f"k{i:04d}", "json": json.dumps(m).encode(), ext: data})
    manifest = {"task": "multiclass", "classes": ["a", "b"],
                "shards": [{"path": "test-000000-00.tar", "split": "test", "samples": len(images)}]}
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("encoding,dtype", [("zstd", np.int16), ("png", np.uint16), ("zlib", np.uint16),
                                            ("png", np.uint8), ("png", np.int16)])
def test_decoding_keeps_every_bit_of_8_and_16_bit_images(tmp_path, encoding, dtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    img = rng.integers(info.min, info.max, (16, 16), endpoint=True).astype(dtype)
    img[0, 0], img[0, 1], img[0, 2] = info.min, info.max, info.min + 1  # extremes and the first step
    write_images(tmp_path, [img], encoding)
    s = ShardStream(str(tmp_path), "test", cfg(normalize="minmax"), micro_batch=1, train=False)
    x = next(iter(make_loader(s)))["image"][0, 0].double()
    # Min-max of the exact values: 1 / (max - min) resolves every 16-bit step.
    expect = (img.astype(np.float64) - info.min) / (info.max - info.min)
    np.testing.assert_allclose(x.numpy(), expect, atol=1e-6)
    assert len(np.unique(np.round(x.numpy() * (info.max - info.min)))) == len(np.unique(img))


def test_ct_windows_stack_as_channels(tmp_path):
    # MONOCHROME1 is inverted by prep, not by the loader: test_formats.py checks it end to end.
    hu = np.tile(np.linspace(-1200, 1600, 16), (16, 1)).astype(np.int16)
    write_images(tmp_path / "m2", [hu])
    windows = [[40, 400], [-600, 1500], [400, 1800]]
    c = cfg(windows=windows, normalize="window", channels=3)
    x = next(iter(make_loader(ShardStream(str(tmp_path / "m2"), "test", c, micro_batch=1, train=False))))["image"][0]
    for ch, (center, width) in enumerate(windows):
        expect = np.clip((hu.astype(np.float64) - (center - width / 2)) / width, 0, 1)
        np.testing.assert_allclose(x[ch].numpy(), expect, atol=1e-6)


def test_channels_zscore_and_colour():
    gray = np.arange(256, dtype=np.uint16).reshape(16, 16) * 200
    x = SampleTransform(cfg(normalize="zscore", channels=3), train=False)(gray, {})
    assert x.shape == (3, 16, 16) and torch.equal(x[0], x[2])
    assert abs(float(x[0].mean())) < 1e-5 and abs(float(x[0].std()) - 1) < 1e-2
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 1] = 255
    y = SampleTransform(cfg(channels=1), train=False)(rgb, {})
    assert y.shape == (1, 16, 16) and abs(float(y.mean()) - 0.587) < 1e-6
    with pytest.raises(ValueError, match="data.windows gives 2 channels"):
        SampleTransform(cfg(windows=[[40, 400], [0, 100]], channels=3), train=False)


# -- augmentation -------------------------------------------------------------------------------------


def test_augmentations_follow_the_config_and_are_off_where_they_should_be():
    def kinds(**kw):
        return SampleTransform(cfg(**kw), train=True).ops

    default = kinds()
    assert {"crop", "affine"} <= default
    assert not {"hflip", "vflip", "intensity"} & default  # no flips by default
    assert "hflip" in kinds(hflip=True)
    assert {"vflip", "intensity"} <= kinds(vflip=True, brightness=0.1, gamma=0.2)
    assert kinds(augment=False) == set()
    assert SampleTransform(cfg(hflip=True), train=False).ops == set()  # never at evaluation


def test_augmentation_is_reproducible_and_intensity_stays_in_range():
    img = np.random.default_rng(0).integers(-1000, 1000, (32, 32)).astype(np.int16)
    t = SampleTransform(cfg(image_size=24, brightness=0.2, contrast=0.2, gamma=0.3, windows=[[0, 2000]],
                            normalize="window"), train=True)
    torch.manual_seed(7)
    a = t(img, {})
    torch.manual_seed(7)
    b = t(img, {})
    torch.manual_seed(8)
    c = t(img, {})
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, 24, 24) and 0 <= float(a.min()) and float(a.max()) <= 1


def test_rotation_fills_with_the_image_minimum_not_zero():
    img = np.full((32, 32), 500, np.int16)  # bright everywhere: a zero fill would show as a dark corner
    img[0, 0] = -1000
    t = SampleTransform(cfg(image_size=32, crop_scale=1.0, rotate_degrees=30, translate=0.0,
                            windows=[[0, 4000]], normalize="window"), train=True)
    torch.manual_seed(0)
    x = t(img, {})
    assert float(x.min()) >= (-1000 + 2000) / 4000 - 1e-6  # the fill is -1000 HU, never below


# -- corrupt data -------------------------------------------------------------------------------------


def corrupt_dataset(root: Path, *, bad_samples=(), truncate=False):
    """Three train shards of 10; some samples get garbage pixels; optionally shard 1 is cut short."""
    from conftest import write_shards

    manifest = write_shards(root, {"train": [10, 10, 10]})
    if bad_samples:
        name = root / manifest["shards"][0]["path"]
        samples = list(wds.WebDataset(str(name), shardshuffle=False))
        with wds.TarWriter(str(name), encoder=False) as w:
            for i, smp in enumerate(samples):
                smp = {k: v for k, v in smp.items() if k != "__url__" and k != "__local_path__"}
                if i in bad_samples:
                    smp["pix.zst"] = b"MSPX garbage"
                w.write(smp)
    if truncate:
        path = root / manifest["shards"][1]["path"]
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return root


def test_corrupt_samples_and_shards_are_logged_counted_and_skipped(tmp_path, caplog):
    root = corrupt_dataset(tmp_path / "s", bad_samples=(1, 4), truncate=True)
    s = ShardStream(str(root), "train", cfg(max_corrupt_fraction=0.5), micro_batch=5, seed=0)
    with caplog.at_level(logging.WARNING, logger="medscale.data"):
        batches = list(make_loader(s))
    assert len(batches) == s.batches_per_epoch() == 6  # counts unchanged
    invalid = sum(int((~b["valid"]).sum()) for b in batches)
    stats = s.stats()
    assert stats["corrupt_samples"] == invalid >= 2 + 4  # 2 garbage + at least 4 lost to truncation
    assert stats["shard_errors"] == 1 and stats["global_corrupt_epoch"] == invalid
    assert all(len(b["key"]) == 5 for b in batches)
    assert "corrupt shard" in caplog.text and "skipping corrupt sample" in caplog.text
    # The stand-ins are copies of good samples of the same batch, flagged invalid.
    for b in batches:
        good = {k for k, v in zip(b["key"], b["valid"].tolist()) if v}
        assert all(k in good for k, v in zip(b["key"], b["valid"].tolist()) if not v)


def test_too_many_corrupt_samples_stop_with_a_clear_error(tmp_path):
    root = corrupt_dataset(tmp_path / "s", truncate=True)
    s = ShardStream(str(root), "train", cfg(max_corrupt_fraction=0.05), micro_batch=5, seed=0)
    with pytest.raises(RuntimeError, match="corrupt samples in epoch 0 .* exceed data.max_corrupt_fraction=0.05"):
        list(make_loader(s))


def test_corrupt_eval_samples_become_padding(tmp_path):
    root = corrupt_dataset(tmp_path / "s", bad_samples=(3,))
    manifest = json.loads((root / "manifest.json").read_text())
    for sh in manifest["shards"]:
        sh["split"] = "val"
    (root / "manifest.json").write_text(json.dumps(manifest))
    s = ShardStream(str(root), "val", cfg(), micro_batch=4, train=False)
    valid = [k for k in keys_of(s) for k in k]
    assert len(valid) == 29 and s.stats()["corrupt_samples"] == 1


@pytest.mark.parametrize("limit", [0.05, 0.0])
def test_evaluation_reports_corrupt_samples_within_the_limit(tmp_path, limit):
    from medscale.config import RunConfig, from_dict
    from medscale.tasks.classification import evaluate

    root = corrupt_dataset(tmp_path / "s", bad_samples=(3,))  # 1 of 30
    data = {"image_size": 16, "channels": 1, "num_workers": 0, "max_corrupt_fraction": limit}
    run = from_dict(RunConfig, {"data": data, "eval": {"bootstrap": 0}})
    s = ShardStream(str(root), "train", run.data, micro_batch=4, train=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 2))
    if limit == 0.0:
        with pytest.raises(RuntimeError, match="1 corrupt samples in split 'train'.*data.max_corrupt_fraction=0.0"):
            evaluate(model, s, run.eval, torch.float32, torch.device("cpu"))
        return
    result = evaluate(model, s, run.eval, torch.float32, torch.device("cpu"))
    assert result["n_samples"] == 29 and result["corrupt_samples"] == 1 and result["expected_samples"] == 30


# -- class balance, manifests, errors ---------------------------------------------------------------


def test_class_weights_balance_multiclass_and_multilabel():
    w = class_weights(np.array([0] * 90 + [1] * 10), 1.0)
    assert np.isclose(w[:90].sum(), w[90:].sum())
    ml = np.array([[1, 0], [0, 0], [0, 0], [0, 0], [1, 1]])
    wm = class_weights(ml, 1.0)
    assert wm[4] == 1.0 and wm[0] == 0.5 and np.isclose(wm[1], 1 / 3)


def test_class_balanced_epochs_oversample_the_rare_class(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(root / "train-0.tar"), encoder=False) as w:
        for i in range(200):
            data, info = encode_pixels(rng.integers(0, 255, (8, 8)).astype(np.uint8), "zstd")
            m = {"pixels": info, "label": int(i % 10 == 0), "patient": f"p{i}"}
            w.write({"__key__": f"k{i:04d}", "json": json.dumps(m).encode(), "pix.zst": data})
    (root / "manifest.json").write_text(json.dumps(
        {"task": "multiclass", "classes": ["common", "rare"],
         "shards": [{"path": "train-0.tar", "split": "train", "samples": 200}]}))
    s = ShardStream(str(root), "train", cfg(class_balance=1.0, shuffle_block=64), micro_batch=10, seed=0)
    targets = torch.cat([b["target"] for b in make_loader(s)])
    assert len(targets) == 200 and 0.35 < float(targets.float().mean()) < 0.65  # 10% rare -> about half
    s2 = ShardStream(str(root), "train", cfg(class_balance=1.0, shuffle_block=64), micro_batch=10, seed=0)
    s.set_epoch(0)  # same seed and epoch, same draws
    assert keys_of(s) == keys_of(s2)


def test_pipe_urls_stream_the_same_samples_as_local_paths(shard_factory):
    _, root = shard_factory({"train": [13, 7, 9]})
    local = keys_of(ShardStream(str(root), "train", cfg(workers=2), micro_batch=4, rank=1, world=2, seed=3))
    piped = ShardStream(f"pipe:cat {root}/{{}}", "train", cfg(workers=2), micro_batch=4, rank=1, world=2, seed=3)
    assert piped.urls[0].startswith("pipe:cat ")
    assert keys_of(piped) == local


def test_brace_and_glob_roots_merge_manifests(tmp_path):
    from conftest import write_shards

    write_shards(tmp_path / "a", {"train": [5, 6]}, seed=1)
    write_shards(tmp_path / "b", {"train": [7]}, seed=2)
    for pattern in (f"{tmp_path}/{{a,b}}", f"{tmp_path}/[ab]"):
        m = load_manifest(pattern)
        assert len(m["shards"]) == 3 and m["splits"]["train"]["samples"] == 18
        s = ShardStream(pattern, "train", cfg(), micro_batch=3, manifest=m)
        assert s.samples == 18 and len(keys_of(s)) == 6


def test_errors_name_the_problem(shard_factory, tmp_path):
    _, root = shard_factory({"train": [3]})
    with pytest.raises(ValueError, match="split 'val' has no samples"):
        ShardStream(str(root), "val", cfg(), micro_batch=2)
    with pytest.raises(ValueError, match="fewer than one global micro-batch"):
        ShardStream(str(root), "train", cfg(), micro_batch=2, world=2)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardStream(str(tmp_path / "nowhere"), "train", cfg(), micro_batch=2)


def test_remote_shards_are_cached_once_per_node_then_read_by_random_access(shard_factory, tmp_path):
    _, root = shard_factory({"train": [13, 7, 9]})
    cache = tmp_path / "cache"
    local = keys_of(ShardStream(str(root), "train", cfg(workers=2), micro_batch=4, seed=3))
    remote = ShardStream(f"pipe:cat {root}/{{}}", "train", cfg(workers=2, cache_dir=str(cache)), micro_batch=4, seed=3)
    assert keys_of(remote) == local
    copies = sorted(cache.glob("*.tar"))
    assert len(copies) == 3 and not list(cache.glob("*.lock")) and not list(cache.glob("*temp*"))
    stamps = [p.stat().st_mtime_ns for p in copies]
    remote.set_epoch(1)
    assert len(keys_of(remote)) == len(local)
    assert [p.stat().st_mtime_ns for p in copies] == stamps  # not downloaded again


def test_a_worker_with_nothing_readable_never_raises_alone(tmp_path):
    # Raising in one rank would leave the others waiting in a collective; the global
    # corrupt-fraction check is what stops a run, on every rank at once.
    root = corrupt_dataset(tmp_path / "s", bad_samples=tuple(range(10)))
    s = ShardStream(str(root), "train", cfg(max_corrupt_fraction=1.0, shuffle_block=1), micro_batch=5, seed=0)
    batches = list(make_loader(s))
    assert len(batches) == 6 and s.stats()["corrupt_samples"] == 10
    assert sum(int(b["valid"].sum()) for b in batches) == 20
    first = batches[0]  # seed 0 reads the all-garbage shard first: blank stand-ins of class 0
    assert not first["valid"].any() and float(first["image"].abs().sum()) == 0 and first["target"].eq(0).all()


def test_url_forms():
    from medscale.formats.manifest import UnsafeManifestEntry, gopen_module, is_local, join_url

    assert join_url("pipe:aws s3 cp s3://b/prep/{} -", "train-0.tar") == "pipe:aws s3 cp s3://b/prep/train-0.tar -"
    assert join_url("pipe:curl -s https://h/prep", "m.json") == "pipe:curl -s https://h/prep/m.json"
    assert join_url("https://h/prep/", "train-0.tar") == "https://h/prep/train-0.tar"
    assert join_url("/data/prep/manifest.json", "train-0.tar") == "/data/prep/train-0.tar"
    # A name read from a manifest is data: never a command, a URL or a place outside the root.
    for name in ("/abs/train-0.tar", "../x/train-0.tar", "pipe:touch x", "https://h/t.tar", "a;b.tar", "-o.tar"):
        with pytest.raises(UnsafeManifestEntry, match="is refused"):
            join_url("/data/prep", name)
    assert is_local("/data/x.tar") and is_local("file:///data/x.tar") and not is_local("s3://b/x.tar")
    assert "s3" in gopen_module().gopen_schemes  # s3:// opens through the AWS CLI


def test_training_epochs_end_on_whole_optimizer_steps(shard_factory):
    """2 ranks x 1 micro-batch and 1 rank x 2 accumulated micro-batches are the same global batch:
    their epochs must cover the same entries (the resume on another number of ranks relies on it)."""
    _, root = shard_factory({"train": [18, 18]})  # 36 samples; a global batch of 8 leaves 4 over
    two = [ShardStream(str(root), "train", cfg(), micro_batch=4, rank=r, world=2) for r in range(2)]
    one = ShardStream(str(root), "train", cfg(), micro_batch=4, world=1, accumulation=2)
    assert [s.batches_per_epoch() for s in two] == [4, 4] and one.batches_per_epoch() == 8  # 32 samples each
    assert ShardStream(str(root), "train", cfg(), micro_batch=4, world=1).batches_per_epoch() == 9
    seen_two = sorted(k for s in two for batch in keys_of(s) for k in batch)
    assert len(seen_two) == 32 and seen_two == sorted(k for batch in keys_of(one) for k in batch)
    one.load_state_dict({**one.state_dict(), "position": 24})  # 3 steps of 8 taken: 1 whole step left
    assert one.remaining_batches() == 2 and sum(len(b) for b in keys_of(one)) == 8
    with pytest.raises(ValueError, match="fewer than one global micro-batch.*x 2 accumulated"):
        ShardStream(str(root), "train", cfg(), micro_batch=10, world=2, accumulation=2)


def test_workers_ignore_stop_signals_so_the_main_process_can_save(shard_factory):
    # scancel and Slurm's warnings signal every process of a job step, loader workers included; a
    # worker killed by SIGTERM used to make the next batch raise before the rank could save.
    import os
    import signal

    import psutil

    _, root = shard_factory({"train": [40]})
    s = ShardStream(str(root), "train", cfg(1), micro_batch=2, seed=3)
    it = iter(make_loader(s))
    next(it)
    workers = psutil.Process().children()
    assert workers, "the loader started no worker process"
    for w in workers:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
            os.kill(w.pid, sig)
    assert len(list(it)) == s.batches_per_epoch() - 1
