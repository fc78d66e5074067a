"""GPU-side transforms (``data.transforms_on``): the gpu path (workers decode and crop, the ops run
batched with per-sample parameters in `to_device`) gives the cpu path's tensors for the same seeds;
run here on the CPU device, as on a CPU-only machine."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from medscale.config import DataConfig
from medscale.data.device import to_device
from medscale.data.loader import ShardStream, make_loader
from medscale.data.transforms import PARAMS, SampleTransform, resize_crops
from medscale.formats.codec import encode_pixels, extension_for
from conftest import subprocess_env, write_shards

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
EVERY_AUG = dict(crop_scale=0.6, rotate_degrees=20.0, translate=0.1, hflip=True, vflip=True, brightness=0.2,
                 contrast=0.3, gamma=0.4)
WINDOWS = [[40.0, 400.0], [-600.0, 1500.0], [400.0, 1800.0]]


def write_images(root: Path, images: list[np.ndarray]) -> Path:
    """One zstd shard of `images` (any sizes and dtypes), split "train", keys k0000..."""
    root.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(root / "train-000000-00.tar"), encoder=False) as w:
        for i, img in enumerate(images):
            data, info = encode_pixels(img, "zstd", 1)
            meta = {"pixels": info, "label": i % 2, "patient": f"p{i}"}
            w.write({"__key__": f"k{i:04d}", "json": json.dumps(meta).encode(), extension_for("zstd"): data})
    manifest = {"task": "multiclass", "classes": ["a", "b"],
                "shards": [{"path": "train-000000-00.tar", "split": "train", "samples": len(images)}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def mixed_ct(n: int = 8, dtype=np.int16) -> list[np.ndarray]:
    """CT-like images of different sizes (larger and smaller than the output), smooth plus noise."""
    rng = np.random.default_rng(1)
    sizes = [(40, 40), (48, 36), (30, 52), (64, 64), (20, 24), (33, 33), (56, 44), (32, 32)]
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[:h, :w]
        img = 800 * np.sin(yy / 5.0 + i) * np.cos(xx / 7.0) + rng.normal(0, 150, (h, w))
        if dtype == np.uint16:  # MR/X-ray counts, beyond int16's range
            img = (img - img.min()) * 40 + 20_000
        out.append(np.clip(np.rint(img), np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype))
    return out


def data_cfg(transforms_on: str, workers: int = 0, **kw) -> DataConfig:
    base = dict(image_size=32, channels=1, num_workers=workers, shuffle_block=8, transforms_on=transforms_on)
    return DataConfig(**{**base, **kw})


def images(root: Path, transforms_on: str, *, train=True, mb=4, workers=0, state=None, n=None, **kw):
    """(images, seeds) of the valid samples of the stream's batches, each moved with `to_device` to
    the CPU device."""
    s = ShardStream(str(root), "train", data_cfg(transforms_on, workers, **kw), micro_batch=mb, train=train, seed=5)
    if state:
        s.load_state_dict(state)
    out = []
    for b in make_loader(s, CPU):
        moved = to_device(b, CPU, torch.float32)
        valid = b["valid"]  # padding (evaluation) differs between the paths and is never used
        out.append((moved["image"][valid], b["seed"][valid]))
        if n is not None and len(out) == n:
            break
    return out, s


def assert_same(a, b, atol=2e-5):
    assert len(a) == len(b) > 0
    for (x, sx), (y, sy) in zip(a, b):
        assert torch.equal(sx, sy)
        assert x.shape == y.shape and x.dtype == y.dtype == torch.float32
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


# -- both paths, the same tensors ----------------------------------------------------------------

CASES = {
    "ct_windows_every_aug": (np.int16, dict(windows=WINDOWS, normalize="window", channels=3, **EVERY_AUG)),
    "one_window_repeated": (np.int16, dict(windows=[[40.0, 400.0]], normalize="window", channels=3, **EVERY_AUG)),
    "uint16_minmax": (np.uint16, dict(normalize="minmax", **EVERY_AUG)),
    "zscore": (np.int16, dict(normalize="zscore", channels=2, **EVERY_AUG)),
    "no_crop_rotate_only": (np.int16, dict(crop_scale=1.0, rotate_degrees=30.0, translate=0.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_path_gives_the_cpu_paths_tensors(tmp_path, case):
    dtype, kw = CASES[case]
    root = write_images(tmp_path, mixed_ct(8, dtype))  # several sizes in every batch
    cpu, _ = images(root, "cpu", **kw)
    gpu, _ = images(root, "gpu", **kw)
    assert_same(cpu, gpu)
    for x, _ in cpu:
        assert bool(torch.isfinite(x).all())
        if kw.get("normalize") != "zscore":
            assert 0 <= float(x.min()) and float(x.max()) <= 1 + 1e-6


def test_uint16_values_above_32767_survive_the_gpu_path(tmp_path):
    imgs = mixed_ct(4, np.uint16)
    assert max(int(i.max()) for i in imgs) > 40_000
    root = write_images(tmp_path, imgs)
    s = ShardStream(str(root), "train", data_cfg("gpu", crop_scale=1.0, rotate_degrees=0.0, translate=0.0),
                    micro_batch=4, train=False)
    b = next(iter(make_loader(s, CPU)))
    assert b["pixels"].dtype == torch.uint16
    for k, img in enumerate(imgs):  # the stored values, exactly, top-left in the padded batch
        h, w = img.shape
        assert np.array_equal(b["pixels"][k, 0, :h, :w].numpy(), img)
        assert not b["pixels"][k, 0, h:].any() and not b["pixels"][k, 0, :, w:].any()


def test_evaluation_path_is_equal_and_unaugmented(tmp_path):
    root = write_images(tmp_path, mixed_ct(6))
    kw = dict(windows=WINDOWS, normalize="window", channels=3, **EVERY_AUG)
    cpu, _ = images(root, "cpu", train=False, **kw)
    gpu, _ = images(root, "gpu", train=False, **kw)
    assert_same(cpu, gpu)
    plain, _ = images(root, "cpu", train=False, windows=WINDOWS, normalize="window", channels=3)
    assert_same(cpu, plain, atol=0)  # the augmentation options do nothing at evaluation


@pytest.mark.parametrize("channels", [3, 1])
def test_colour_photos_on_both_paths(tmp_path, channels):
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, (h, w, 3), endpoint=False).astype(np.uint8) for h, w in ((40, 36), (28, 30))]
    photos.append(rng.integers(0, 65536, (36, 36, 3)).astype(np.uint16))  # 16-bit colour: scaled by 65535
    root = write_images(tmp_path, photos)
    kw = dict(channels=channels, **EVERY_AUG)
    cpu, _ = images(root, "cpu", mb=3, **kw)
    gpu, _ = images(root, "gpu", mb=3, **kw)
    assert_same(cpu, gpu)
    assert cpu[0][0].shape == (3, channels, 32, 32)


def test_a_batch_mixing_colour_and_grayscale(tmp_path):
    rng = np.random.default_rng(0)
    mixed = [rng.integers(0, 256, (40, 36, 3)).astype(np.uint8), mixed_ct(1)[0],
             rng.integers(0, 256, (30, 30, 3)).astype(np.uint8), mixed_ct(2)[1]]
    root = write_images(tmp_path, mixed)
    cpu, _ = images(root, "cpu", channels=3, **EVERY_AUG)
    gpu, _ = images(root, "gpu", channels=3, **EVERY_AUG)
    assert_same(cpu, gpu)


def test_the_cpu_path_is_apply_on_a_batch_of_one():
    img = mixed_ct(1)[0]
    t = SampleTransform(data_cfg("cpu", windows=WINDOWS, normalize="window", channels=3, **EVERY_AUG), train=True)
    one = t(img, {}, seed=123)
    crop, row = t.prepare(img, 123)
    batched = t.apply(torch.from_numpy(np.ascontiguousarray(crop))[None], torch.from_numpy(row)[None])[0]
    torch.testing.assert_close(one, batched, atol=1e-6, rtol=0)
    assert crop.shape[1:] != img.shape  # the worker ships the crop box only
    torch.manual_seed(7)
    a = t(img, {})
    torch.manual_seed(7)
    assert torch.equal(a, t(img, {}))  # without a seed: drawn from torch's (per-sample seeded) generator


def test_batched_resize_matches_per_sample_antialiased_interpolate():
    rng = torch.Generator().manual_seed(0)
    x = torch.randint(-1000, 3000, (5, 1, 70, 66), generator=rng).float()
    hw = torch.tensor([[70, 66], [50, 60], [33, 31], [12, 20], [70, 40]])
    for size in (32, 48):  # down- and upscaling
        a = resize_crops(x, hw, size, "interpolate")
        b = resize_crops(x, hw, size, "matmul")
        torch.testing.assert_close(a, b, atol=0.05, rtol=1e-5)  # HU values: far below one HU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_batched_transforms_give_the_cpu_paths_tensors(tmp_path):
    root = write_images(tmp_path, mixed_ct(8, np.uint16))
    kw = dict(windows=[[30_000.0, 20_000.0]], normalize="window", channels=3, **EVERY_AUG)
    cpu, _ = images(root, "cpu", **kw)
    cuda = torch.device("cuda")
    s = ShardStream(str(root), "train", data_cfg("auto", 1, **kw), micro_batch=4, seed=5)
    loader = make_loader(s, cuda)
    assert loader.transforms_on == "gpu"
    got = []
    for b in loader:
        assert b["pixels"].is_pinned() and b["pixels"].dtype == torch.uint16
        got.append((to_device(b, cuda, torch.float32)["image"].cpu(), b["seed"]))
    assert_same(cpu, got, atol=2e-3)  # the batched matmul resize against per-sample interpolate


# -- per-sample parameters (the trap), resume, resolution -----------------------------------------


def test_parameters_differ_per_sample_within_a_batch(tmp_path):
    same = [mixed_ct(1)[0]] * 8  # one image eight times: only the parameters can tell them apart
    root = write_images(tmp_path, same)
    s = ShardStream(str(root), "train", data_cfg("gpu", **EVERY_AUG), micro_batch=8, seed=5)
    b = next(iter(make_loader(s, CPU)))
    params = b["params"].numpy()
    for name in ("angle", "tx", "ty", "offset", "factor", "gamma"):
        assert len(np.unique(params[:, PARAMS.index(name)])) == 8, name
    assert len(np.unique(params[:, PARAMS.index("height")])) >= 5  # crop boxes: whole pixels, a few coincide
    for name in ("hflip", "vflip"):
        assert 0 < params[:, PARAMS.index(name)].sum() < 8, name
    x = to_device(b, CPU, torch.float32)["image"]
    assert len({tuple(v.flatten()[:64].tolist()) for v in x}) == 8
    # torchvision's v2 transforms on the same batch: one draw for all of it (why they are not used).
    from torchvision.transforms import v2

    same_batch = torch.from_numpy(np.stack(same)[:, None].astype(np.float32))
    rotated = v2.RandomAffine(degrees=20.0)(same_batch)
    assert all(torch.equal(rotated[0], r) for r in rotated)


def test_resumed_gpu_stream_gives_the_same_batches(tmp_path):
    root = write_images(tmp_path, mixed_ct(24))
    kw = dict(windows=WINDOWS, normalize="window", channels=3, **EVERY_AUG)
    whole, _ = images(root, "gpu", workers=2, **kw)
    _, first = images(root, "gpu", n=2, **kw)
    rest, _ = images(root, "gpu", workers=2, state=first.state_dict(), **kw)
    assert len(whole) == 6 and first.position == 8
    assert_same(whole[2:], rest, atol=0)
    cpu, _ = images(root, "cpu", workers=2, **kw)  # workers and shared memory on both paths
    assert_same(whole, cpu)


def test_auto_is_cpu_without_cuda_and_gpu_on_the_cpu_device_says_so(tmp_path, caplog):
    root = write_images(tmp_path, mixed_ct(4))
    auto = ShardStream(str(root), "train", data_cfg("auto"), micro_batch=4)
    assert make_loader(auto, CPU).transforms_on == "cpu" and not auto.deferred
    assert "image" in next(iter(make_loader(auto)))
    assert auto.resolve_transforms("cuda") == "gpu" and auto.deferred  # resolution only: no GPU needed
    gpu = ShardStream(str(root), "train", data_cfg("gpu"), micro_batch=4)
    assert "image" in next(iter(make_loader(gpu)))  # no device given: finished images, whatever the option
    import medscale.data.device as device_mod

    device_mod._told_cpu = False
    gpu = ShardStream(str(root), "train", data_cfg("gpu"), micro_batch=2)  # the first one's epoch is spent
    with caplog.at_level(logging.INFO, logger="medscale.data"):
        for b in make_loader(gpu, CPU):
            assert "image" not in b and b["pixels"].dtype == torch.int16
            assert to_device(b, CPU, torch.bfloat16)["image"].dtype == torch.bfloat16
    assert sum("transforms run batched on the CPU" in r.message for r in caplog.records) == 1
    from medscale.errors import ConfigError

    with pytest.raises(ConfigError, match="data.transforms_on='tpu'"):
        ShardStream(str(root), "train", data_cfg("tpu"), micro_batch=4)


def test_training_runs_with_transforms_on_gpu(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, {"train": [12], "val": [4], "test": [4]}, size=24)
    config = {
        "data": {"shards": str(shards), "image_size": 16, "channels": 1, "num_workers": 1, "shuffle_block": 16,
                 "transforms_on": "gpu", "hflip": True, "contrast": 0.2},
        "model": {"name": "test_vit", "patch_size": 8, "num_classes": 2},
        "train": {"steps": 3, "micro_batch_size": 4, "warmup_steps": 1, "log_every": 1, "precision": "fp32"},
        "dist": {"nproc": 1, "deepspeed_config": str(ROOT / "ds_configs" / "cpu_zero2.json")},
        "eval": {"micro_batch_size": 4, "bootstrap": 10},
        "checkpoint": {"every_steps": 100},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "medscale.cli", "train", "--config", str(path), f"out_dir={out}"]
    r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert "transforms run batched on the CPU" in r.stdout + r.stderr
    assert json.loads((out / "eval.json").read_text())
