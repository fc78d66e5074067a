"""Loader: equal batch counts on every rank, every eval sample exactly once."""

import pytest

from medscale.config import DataConfig
from medscale.data.loader import ShardStream, make_loader


def cfg(workers=1, **kw):
    return DataConfig(**{"image_size": 16, "channels": 1, "num_workers": workers, "shuffle_buffer": 8, **kw})


def keys_of(stream):
    out = []
    for b in make_loader(stream):
        out.append([k for k, v in zip(b["key"], b["valid"].tolist()) if v])
    return out


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (3, 2), (4, 2)])
def test_train_batches_equal_on_every_rank_with_uneven_shards(shard_factory, world, workers):
    manifest, root = shard_factory({"train": [37, 5, 11]})  # 53 samples, fewer shards than slots sometimes
    counts = []
    for rank in range(world):
        s = ShardStream(str(root), "train", cfg(workers), micro_batch=4, rank=rank, world=world, seed=3)
        batches = keys_of(s)
        assert len(batches) == s.batches_per_epoch() == 53 // (world * 4)
        assert all(len(b) == 4 for b in batches)
        counts.append(len(batches))
    assert len(set(counts)) == 1


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2), (3, 1), (5, 1)])
def test_eval_sees_every_sample_once_and_ranks_agree(shard_factory, world, workers):
    manifest, root = shard_factory({"test": [13, 2, 7]})
    seen, nbatches = [], set()
    for rank in range(world):
        s = ShardStream(str(root), "test", cfg(workers), micro_batch=4, rank=rank, world=world, train=False)
        batches = keys_of(s)
        nbatches.add(len(batches))
        assert len(batches) == s.batches_per_epoch()
        seen += [k for b in batches for k in b]
    assert len(nbatches) == 1  # same number of forward passes everywhere (ZeRO-3 needs it)
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 22


def test_shuffle_is_deterministic_per_seed_and_epoch(shard_factory):
    _, root = shard_factory({"train": [20, 20]})
    a = ShardStream(str(root), "train", cfg(), micro_batch=5, seed=1)
    b = ShardStream(str(root), "train", cfg(), micro_batch=5, seed=1)
    assert keys_of(a) == keys_of(b)
    b.set_epoch(1)
    assert keys_of(a) != keys_of(b)


def test_images_have_configured_shape_and_windows(shard_factory):
    _, root = shard_factory({"train": [8]})
    s = ShardStream(str(root), "train", cfg(windows=[[40, 400], [-600, 1500]], normalize="window", image_size=24,
                    channels=2), micro_batch=4)
    b = next(iter(make_loader(s)))
    assert tuple(b["image"].shape) == (4, 2, 24, 24)
    assert 0.0 <= float(b["image"].min()) and float(b["image"].max()) <= 1.0


def test_errors_name_the_problem(shard_factory, tmp_path):
    _, root = shard_factory({"train": [3]})
    with pytest.raises(ValueError, match="split 'val' has no samples"):
        ShardStream(str(root), "val", cfg(), micro_batch=2)
    with pytest.raises(ValueError, match="fewer than one global micro-batch"):
        ShardStream(str(root), "train", cfg(), micro_batch=2, world=2)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardStream(str(tmp_path / "nowhere"), "train", cfg(), micro_batch=2)
