"""Benchmark: medscale's shard stream against MONAI's usual DICOM pipeline, same CT, same work, CPU.

Inputs are those of ``bench/loader.py`` (its helpers are imported): pydicom's 512x512 CT test file
(693_J2KI.dcm) varied per copy and saved as uncompressed 16-bit DICOMs, prepped once with
`medscale.prep` into zstd shards (the offline stage: not timed). Both sides then produce shuffled
batches of 32 single-channel 224x224 float32 images of one CT window (soft tissue, center 40 HU,
width 400 HU, scaled to [0, 1]):

- ``monai``: ``monai.data.Dataset`` over the DICOM files with ``LoadImaged(PydicomReader(),
  ensure_channel_first=True)`` (dcmread, pixel_array, RescaleSlope/Intercept to HU, float32
  MetaTensor), ``ScaleIntensityRanged(-160, 240 -> 0, 1, clip=True)`` (the window), ``Resized(224,
  224)`` (MONAI's default mode, "area"), through ``monai.data.DataLoader`` (shuffle, drop_last,
  ``list_data_collate``, MONAI's worker seeding, torch's default prefetch of 2);
- ``medscale``: `ShardStream` + `make_loader` in training mode (shuffled, exact accounting, resume
  position) with ``augment=False``: read the sample from the shard, zstd-decode the int16 HU
  (the modality LUT was applied at prep), resize 512 -> 224 (bilinear, antialiased), then the same
  window clamped to [0, 1]; prefetch 4 batches per worker.

Each configuration first runs one untimed warm-up epoch (its first batch is the output check:
shapes, dtypes, value ranges, and one image put through both sides compared pixel by pixel). Rates
are steady-state (from the batch after each worker's first to the last), best of ``--repeat``
epochs, the two sides alternating so that other load on the machine hits both alike. CPU per image
is ``getrusage`` of this process (RUSAGE_SELF) plus its joined children (RUSAGE_CHILDREN: the
loader's worker processes) over whole timed epochs, worker start-up included, lowest of the repeats.

The last output line is one JSON object with ``ratio_vs_monai`` (medscale images/s over MONAI
images/s, one worker each), or with ``skipped`` when MONAI is not installed
(``pip install medscale[bench]``).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pydicom
import torch

warnings.filterwarnings("ignore")
WINDOW = (40.0, 400.0)  # soft tissue [center, width] in HU
SIZE = 224
HERE = Path(__file__).resolve().parent


# -- the two pipelines --------------------------------------------------------------------------------


def medscale_config(workers: int) -> Any:
    from medscale.config import DataConfig

    return DataConfig(image_size=SIZE, channels=1, windows=[list(WINDOW)], normalize="window",
                      num_workers=workers, shuffle_block=256, augment=False)


def medscale_batches(shards: Path, workers: int, mb: int) -> Iterable[dict[str, Any]]:
    from medscale.data.loader import ShardStream, make_loader

    stream = ShardStream(str(shards), "train", medscale_config(workers), micro_batch=mb, seed=0)
    yield from make_loader(stream)
    if stream.stats()["corrupt_samples"] or stream.position != stream.batches_per_epoch() * mb:
        raise RuntimeError(f"medscale stream did not read the epoch cleanly: {stream.stats()}")


def monai_transform() -> Any:
    from monai.data import PydicomReader
    from monai.transforms import Compose, LoadImaged, Resized, ScaleIntensityRanged

    c, w = WINDOW
    return Compose([
        LoadImaged(keys="image", reader=PydicomReader(), ensure_channel_first=True),
        ScaleIntensityRanged(keys="image", a_min=c - w / 2, a_max=c + w / 2, b_min=0.0, b_max=1.0, clip=True),
        Resized(keys="image", spatial_size=(SIZE, SIZE)),
    ])


def monai_items(folder: Path) -> list[dict[str, Any]]:
    rows = csv.DictReader(open(folder / "labels.csv"))
    return [{"image": str(folder / r["filename"]), "label": int(r["label"] == "lesion")} for r in rows]


def monai_batches(items: list[dict[str, Any]], workers: int, mb: int) -> Iterable[dict[str, Any]]:
    from monai.data import DataLoader, Dataset

    ds = Dataset(items, transform=monai_transform())
    return DataLoader(ds, batch_size=mb, shuffle=True, num_workers=workers, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


# -- measurement ----------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU of this process and of its joined children (the loader workers), user + system."""
    multiprocessing.active_children()  # reaps finished workers so RUSAGE_CHILDREN counts them
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def epoch(make: Callable[[], Iterable[dict[str, Any]]], workers: int, keep_first: bool = False) -> dict[str, Any]:
    """One epoch: steady-state images/s, seconds to the first batch, CPU ms per image."""
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    stamps, sizes, first = [], [], None
    for b in make():
        stamps.append(time.perf_counter())
        sizes.append(len(b["image"]))
        if keep_first and first is None:
            first = b
    cpu = cpu_seconds() - cpu0
    k = max(1, workers)
    if len(stamps) <= k:
        raise SystemExit(f"{len(stamps)} batches: too few images for a steady-state rate with {workers} workers")
    out = {"rate": sum(sizes[k:]) / (stamps[-1] - stamps[k - 1]), "first_batch_s": stamps[0] - t0,
           "cpu_ms": 1e3 * cpu / sum(sizes)}
    if keep_first:
        out["first"] = first
    return out


def summary(batch: dict[str, Any]) -> dict[str, Any]:
    x = batch["image"]
    return {"type": type(x).__name__, "shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", ""),
            "min": round(float(x.min()), 3), "max": round(float(x.max()), 3), "mean": round(float(x.mean()), 3)}


def check_outputs(first: dict[str, dict[str, Any]], mb: int, shards: Path, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Both sides give (mb, 1, 224, 224) float32 in [0, 1] with similar statistics, and one image put
    through both matches pixel by pixel (MONAI's PydicomReader swaps rows and columns: undone here)."""
    from medscale.data.loader import ShardStream, decode_sample

    sums = {side: summary(b) for side, b in first.items()}
    problems = []
    for side, s in sums.items():
        if s["shape"] != [mb, 1, SIZE, SIZE] or s["dtype"] != "float32":
            problems.append(f"{side}: batch {s['shape']} {s['dtype']}, expected [{mb}, 1, {SIZE}, {SIZE}] float32")
        if s["min"] < 0 or s["max"] > 1 or s["max"] - s["min"] < 0.5:
            problems.append(f"{side}: values {s['min']}..{s['max']} are not a windowed image in [0, 1]")
    if abs(sums["medscale"]["mean"] - sums["monai"]["mean"]) > 0.05:
        problems.append(f"batch means differ: medscale {sums['medscale']['mean']}, monai {sums['monai']['mean']}")

    stream = ShardStream(str(shards), "train", medscale_config(0), micro_batch=mb, seed=0)
    from medscale.data.reader import ShardReader

    reader = ShardReader(stream.urls, stream.counts)
    raw = reader.get(0, 0)
    reader.close()
    ours = decode_sample(raw, stream.transform, stream.task, stream.num_classes)["image"]
    item = source_of(raw, stream.task, stream.num_classes, items)
    theirs = torch.as_tensor(monai_transform()(dict(item))["image"]).transpose(-1, -2)
    diff = (ours - theirs).abs()
    same = {"file": Path(item["image"]).name, "mean_abs_diff": round(float(diff.mean()), 4),
            "p99_abs_diff": round(float(diff.flatten().quantile(0.99)), 4), "max_abs_diff": round(float(diff.max()), 4)}
    if same["mean_abs_diff"] > 0.02:
        problems.append(f"image {same['file']}: mean |medscale - monai| = {same['mean_abs_diff']} (> 0.02)")
    return {"first_batch": sums, "same_image": same, "problems": problems}


def source_of(raw: dict[str, Any], task: str, num_classes: int, items: list[dict[str, Any]]) -> dict[str, Any]:
    """The DICOM a shard sample came from, found by its pixels (prep keys samples by keyed hashes)."""
    from pydicom.pixels import apply_modality_lut

    from medscale.formats.sample import decode_members

    hu = decode_members(raw, task, num_classes)[0]
    for item in items:
        ds = pydicom.dcmread(item["image"])
        if np.array_equal(np.rint(apply_modality_lut(ds.pixel_array, ds)), hu):
            return item
    raise RuntimeError(f"shard sample {raw.get('__key__')} matches none of the {len(items)} DICOMs")


def show(name: str, r: dict[str, float]) -> None:
    print(f"{name:28s} {r['rate']:6.1f} images/s  {r['cpu_ms']:5.2f} ms CPU/image  first batch {r['first_batch_s']:.2f} s",
          flush=True)


# -- main -------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import monai

    return {"monai": monai.__version__, "torch": torch.__version__, "pydicom": pydicom.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512, help="DICOMs to generate (default 512)")
    ap.add_argument("--repeat", type=int, default=3, help="timed epochs per configuration; the best counts")
    ap.add_argument("--workers", default="0,1", help="comma-separated worker counts; 1 is always run (default 0,1)")
    ap.add_argument("--quick", action="store_true", help="128 images, one timed epoch, 1 worker only")
    args = ap.parse_args()
    if args.quick:
        args.images, args.repeat, args.workers = 128, 1, "1"
    try:
        import monai  # noqa: F401
    except ImportError as e:
        print(f"MONAI is not installed ({e}); install the benchmark extra: pip install 'medscale[bench]'. Skipping.")
        print(json.dumps({"benchmark": "monai_loader", "skipped": "monai not installed"}))
        return
    workers = sorted({1, *(int(w) for w in args.workers.split(","))})
    from medscale.config import TrainConfig
    from medscale.synthetic import prep_bench_dicoms, write_bench_dicoms

    mb = TrainConfig().micro_batch_size  # the default micro-batch, as bench/loader.py measures
    torch.set_num_threads(1)  # as in a DataLoader worker; the 0-worker runs are one thread on both sides
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "dicom", Path(tmp) / "shards"
        t = time.perf_counter()
        write_bench_dicoms(folder, args.images)
        shards_by = prep_bench_dicoms(folder, shards)
        print(f"inputs: {args.images} 512x512 DICOMs, shards by {shards_by}, {time.perf_counter() - t:.1f} s (not timed)")
        items = monai_items(folder)
        sides: dict[str, Callable[[int], Callable[[], Iterable[dict[str, Any]]]]] = {
            "medscale": lambda w: (lambda: medscale_batches(shards, w, mb)),
            "monai": lambda w: (lambda: monai_batches(items, w, mb)),
        }

        first = {}
        for side, make in sides.items():  # warm-up epochs, not timed; their first batch is the check
            for w in workers:
                r = epoch(make(w), w, keep_first=w == 1)
                if w == 1:
                    first[side] = r["first"]
        check = check_outputs(first, mb, shards, items)
        print(f"check, first batch: {json.dumps(check['first_batch'])}")
        print(f"check, one image through both (MONAI transposed back): {json.dumps(check['same_image'])}")
        if check["problems"]:
            print("output check FAILED: " + "; ".join(check["problems"]), file=sys.stderr)
            raise SystemExit(1)
        print("output check passed: both sides yield [32, 1, 224, 224] float32 windowed images that agree")

        runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(args.repeat):  # alternate the sides so background load falls on both
            for w in workers:
                for side, make in sides.items():
                    runs.setdefault((side, w), []).append(epoch(make(w), w))
        res = {}
        for (side, w), rs in runs.items():
            res[side, w] = dict(max(rs, key=lambda r: r["rate"]), cpu_ms=min(r["cpu_ms"] for r in rs))
            show(f"{side}, {w} worker{'s' if w != 1 else ''}", res[side, w])

    ms1, mo1 = res["medscale", 1], res["monai", 1]
    out: dict[str, Any] = {
        "benchmark": "monai_loader",
        "ratio_vs_monai": round(ms1["rate"] / mo1["rate"], 3),
        "medscale_per_s_1_worker": round(ms1["rate"], 1),
        "monai_per_s_1_worker": round(mo1["rate"], 1),
        "cpu_ms_per_image_1_worker": {"medscale": round(ms1["cpu_ms"], 2), "monai": round(mo1["cpu_ms"], 2)},
        "cpu_ratio_monai_over_medscale": round(mo1["cpu_ms"] / ms1["cpu_ms"], 3),
    }
    for w in workers:
        if w != 1:
            out[f"medscale_per_s_{w}_workers"] = round(res["medscale", w]["rate"], 1)
            out[f"monai_per_s_{w}_workers"] = round(res["monai", w]["rate"], 1)
            out[f"ratio_vs_monai_{w}_workers"] = round(res["medscale", w]["rate"] / res["monai", w]["rate"], 3)
            out[f"cpu_ms_per_image_{w}_workers"] = {s: round(res[s, w]["cpu_ms"], 2) for s in sides}
    out.update({
        "first_batch_s_1_worker": {"medscale": round(ms1["first_batch_s"], 2), "monai": round(mo1["first_batch_s"], 2)},
        "images": args.images,
        "micro_batch": mb,
        "repeat": args.repeat,
        "work": {"monai": "dcmread+pixel_array+slope/intercept (PydicomReader), ScaleIntensityRanged -160..240 HU"
                          " -> [0,1] clip, Resized 224 (area)",
                 "medscale": "shard read + zstd decode of HU int16, resize 224 (bilinear antialias),"
                             " window 40/400 -> [0,1]"},
        "check": {"same_image_mean_abs_diff": check["same_image"]["mean_abs_diff"],
                  "first_batch_mean": {s: check["first_batch"][s]["mean"] for s in sides}},
        "cpu_measure": "getrusage RUSAGE_SELF + RUSAGE_CHILDREN (joined loader workers), whole timed epochs",
        "shards_by": shards_by,
        "versions": versions(),
        "load_avg_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
