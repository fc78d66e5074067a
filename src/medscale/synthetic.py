"""Synthetic DICOM files for the demo, the tests and the benchmarks: one writer, never real data.

`synthetic_dicom` builds a dataset with what every DICOM file needs (file meta in explicit VR little
endian, SOP class and instance, study and series) and the image pixel module of an array; keyword
arguments then set (or, with None, delete) any attribute, so a caller adds only what its case is
about: a patient full of canaries, a rescale, ultrasound regions, a 12-bit stored range.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset

from medscale.formats.codec import encode_pixels, extension_for
from medscale.formats.manifest import MANIFEST_VERSION
from medscale.formats.tar import ShardSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

_NO_ROLLOVER = 1 << 62  # shard_bytes no shard reaches

__all__ = ["synthetic_dicom", "write_dicom", "write_bench_dicoms", "prep_bench_dicoms", "write_tiny_shards"]


def synthetic_dicom(pixels: np.ndarray, *, path: str | Path = "synthetic.dcm", sop_class: str = CTImageStorage,
                    sop_uid: str | None = None, modality: str = "CT", bits_stored: int | None = None,
                    signed: bool | None = None, photometric: str | None = None, pixel_data: bytes | None = None,
                    **attrs: Any) -> FileDataset:
    """A DICOM dataset holding `pixels` (not yet written).

    Args:
        pixels: (H, W) or (F, H, W) grey, (H, W, 3) or (F, H, W, 3) colour (``photometric="RGB"``, or a
            last axis of 3 when `photometric` is None); uint8 is stored in 8 bits, other integers in 16.
        path: the dataset's file name (where `write_dicom` saves it).
        sop_class, sop_uid: SOP class and instance (a new UID when None); study and series get new
            UIDs unless `attrs` set them.
        modality: Modality.
        bits_stored: BitsStored (default: the bits allocated); HighBit follows it.
        signed: PixelRepresentation 1 (default: the dtype's signedness).
        photometric: PhotometricInterpretation (default MONOCHROME2, or RGB for colour).
        pixel_data: PixelData as given instead of `pixels`' bytes (a deliberately short or odd value).
        attrs: DICOM keywords to set afterwards; None deletes one.
    """
    pixels = np.asarray(pixels)
    rgb = photometric == "RGB" or (photometric is None and pixels.ndim >= 3 and pixels.shape[-1] == 3)
    frames = pixels.ndim == (4 if rgb else 3)
    bits = 8 if pixels.dtype == np.uint8 else 16
    signed = pixels.dtype.kind == "i" if signed is None else signed
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    if frames:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if rgb else "MONOCHROME2")
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    if pixel_data is None:
        dtype = np.uint8 if bits == 8 else ("<i2" if signed else "<u2")
        pixel_data = np.ascontiguousarray(pixels).astype(dtype).tobytes()
    ds.PixelData = pixel_data
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if "SOPInstanceUID" in attrs:  # the file meta names the same instance
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def write_dicom(path: str | Path, pixels: np.ndarray, **kwargs: Any) -> Path:
    """`synthetic_dicom` saved at `path` as a DICOM file (preamble and file meta); returns `path`."""
    synthetic_dicom(pixels, path=path, **kwargs).save_as(path, enforce_file_format=True)
    return Path(path)


def write_bench_dicoms(folder: Path, n: int) -> None:
    """`n` 512x512 16-bit CT DICOMs for the loader benchmarks (bench/loader.py, bench/monai_loader.py)
    and ``labels.csv`` (filename, label): pydicom's own JPEG 2000 CT test image, decoded once,
    shifted and noised per file, stored uncompressed; one lesion in five, eight files per patient."""
    import csv

    import pydicom
    import pydicom.data

    src = pydicom.dcmread(pydicom.data.get_testdata_file("693_J2KI.dcm", download=False))
    stored = src.pixel_array.astype(np.int16)  # decoded once, here, with the JPEG 2000 plugin
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        for i in range(n):
            dy, dx = rng.integers(-16, 17, 2)
            img = np.roll(stored, (int(dy), int(dx)), axis=(0, 1)) + rng.integers(-3, 4, stored.shape).astype(np.int16)
            write_dicom(folder / f"{i:05d}.dcm", img.astype(np.int16), PatientID=f"BENCH{i // 8:05d}",
                        BurnedInAnnotation="NO", RescaleSlope=src.get("RescaleSlope", 1),
                        RescaleIntercept=src.get("RescaleIntercept", 0))
            w.writerow([f"{i:05d}.dcm", "lesion" if i % 5 == 0 else "normal"])


def prep_bench_dicoms(folder: Path, out: Path) -> str:
    """`write_bench_dicoms`' files prepped into shards (one training split) with `medscale prep`."""
    from medscale.prep.config import PrepConfig
    from medscale.prep.job import PrepJob
    from medscale.prep.pipeline import run_prep
    from medscale.prep.plan import prepare_output

    cfg = PrepConfig(label_key="filename", key_column="filename", label_column="label", classes=["normal", "lesion"],
                     splits={"train": 1.0}, shard_bytes=16_000_000)
    prepare_output(out, resume=False, overwrite=True)
    job = PrepJob(inputs=[str(folder)], out=out, cfg=cfg, key=bytes(range(32)), labels_csv=str(folder / "labels.csv"),
                  workers=1, chunk_files=10_000)
    run_prep(job, progress=False)
    return "medscale.prep"


def write_tiny_shards(root: Path, sizes: dict[str, list[int]], *, size: int = 16,
                      classes: Sequence[str] = ("normal", "lesion"), seed: int = 0) -> dict:
    """Shards of random 16-bit images with the given sample counts per shard and split, and a manifest:
    what the distributed tests and the Slurm benchmark train on in seconds.

    Shards are written by prep's writer (`medscale.formats.tar.ShardSequence`), one per count however
    large, so each has its member-offset index beside it, as prep's do; patients come three samples
    each (``p0``, ``p1``...), labels at random from `classes`.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    n = 0
    for split, counts in sizes.items():
        for i, count in enumerate(counts):
            # One shard per count, whatever its size; named f"{split}-{i:06d}-00.tar".
            seq = ShardSequence(root, split, i, _NO_ROLLOVER)
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
