"""The embedded default job: a synthetic CT corpus, prepped, trained on, and evaluated.

The corpus is generated, never downloaded: 16-bit CT-like slices (air, body, lungs, spine in
Hounsfield units, stored unsigned with RescaleIntercept -1024 as scanners do), realistic headers
with fake patient names and IDs (which prep must strip), several slices per patient, and a
learnable finding: a bright round lesion in about half of the slices.
"""

from __future__ import annotations

import csv
import datetime
import random
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["make_ct_slice", "write_synthetic_corpus", "run_demo"]

_FIRST = ["JOHN", "MARY", "AHMED", "LI", "SOFIA", "OLUWASEUN", "PRIYA", "JAN", "ELENA", "KENJI"]
_LAST = ["DOE", "SMITH", "GARCIA", "NGUYEN", "MULLER", "OKAFOR", "SHARMA", "KOWALSKI", "ROSSI", "TANAKA"]


def make_ct_slice(rng: np.random.Generator, size: int, lesion: bool) -> np.ndarray:
    """One axial CT-like slice in HU (int16): air, an elliptic body, two lungs, a spine, noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    hu = np.full((size, size), -1000.0, np.float32)
    a, b = rng.uniform(0.36, 0.46), rng.uniform(0.28, 0.38)
    body = (xx / a) ** 2 + (yy / b) ** 2 < 1
    hu[body] = rng.uniform(20, 60)
    lungs = []
    for side in (-1, 1):
        cx, cy = side * rng.uniform(0.14, 0.2), rng.uniform(-0.06, 0.0)
        la, lb = rng.uniform(0.1, 0.14), rng.uniform(0.14, 0.2)
        lung = ((xx - cx) / la) ** 2 + ((yy - cy) / lb) ** 2 < 1
        hu[lung] = rng.uniform(-880, -780)
        lungs.append((cx, cy, la, lb))
    spine = (xx ** 2 + (yy - b * 0.7) ** 2) < (0.05 ** 2)
    hu[spine] = rng.uniform(500, 900)
    if lesion:
        cx, cy, la, lb = lungs[rng.integers(2)]
        r = rng.uniform(0.07, 0.1)
        px, py = cx + rng.uniform(-0.4, 0.4) * la, cy + rng.uniform(-0.4, 0.4) * lb
        hu[((xx - px) ** 2 + (yy - py) ** 2) < r ** 2] = rng.uniform(200, 400)
    hu += rng.normal(0, 18, hu.shape).astype(np.float32)
    return np.clip(hu, -1024, 3071).astype(np.int16)


def _dataset(path: Path, hu: np.ndarray, patient: dict, study_uid: str, series_uid: str, sop_uid: str,
             instance: int, study_date: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID = patient["name"], patient["id"]
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = patient["birth"], patient["sex"], patient["age"]
    ds.InstitutionName = "Demo General Hospital"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.AccessionNumber = f"ACC{int(study_uid.replace('.', '')[-8:]):08d}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = "101500"
    ds.StudyDescription = f"CT CHEST for {patient['name']}"
    ds.Modality, ds.BodyPartExamined, ds.Manufacturer = "CT", "CHEST", "DemoScan"
    ds.SeriesNumber, ds.InstanceNumber = 1, instance
    ds.BurnedInAnnotation = "NO"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns = hu.shape
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 5.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    # Stored unsigned 12-bit with a -1024 intercept, as many scanners write CT.
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = [40, -600], [400, 1500]
    ds.PixelData = (hu.astype(np.int32) + 1024).astype(np.uint16).tobytes()
    return ds


def write_synthetic_corpus(out: str | Path, *, patients: int = 100, images_per_patient: int = 5,
                           size: int = 96, seed: int = 0, lesion_rate: float = 0.5) -> Path:
    """Write `patients` x `images_per_patient` CT DICOMs and ``labels.csv`` under `out`.

    Files sit in ``out/dicom/<patient folder>/<n>.dcm``; the CSV keys rows by SOPInstanceUID,
    as hospital exports usually do. Returns the CSV path.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    rows = []
    for p in range(patients):
        name = f"{_LAST[p % 10]}^{_FIRST[(p // 10) % 10]}{p}"
        birth = datetime.date(1940, 1, 1) + datetime.timedelta(days=pyrng.randrange(0, 60 * 365))
        patient = {"name": name, "id": f"MRN{100000 + p}", "birth": birth.strftime("%Y%m%d"),
                   "sex": "MF"[p % 2], "age": f"{pyrng.randint(25, 95):03d}Y"}
        uid = lambda *parts: generate_uid(entropy_srcs=[str(seed), *map(str, parts)])  # noqa: E731 - deterministic UIDs
        study, series = uid(p, "study"), uid(p, "series")
        folder = out / "dicom" / f"{name.replace('^', '_')}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_patient):
            lesion = rng.random() < lesion_rate
            sop = uid(p, i, "sop")
            path = folder / f"{i:03d}.dcm"
            _dataset(path, make_ct_slice(rng, size, lesion), patient, study, series, sop, i + 1,
                     "20240315").save_as(path, enforce_file_format=True)
            rows.append({"sop_uid": sop, "finding": "lesion" if lesion else "normal"})
    csv_path = out / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sop_uid", "finding"])
        w.writeheader()
        w.writerows(rows)
    return csv_path


def run_demo(out: Path, config: str | None = None, overrides: Sequence[str] = (), patients: int = 120,
             images_per_patient: int = 5, workers: int = 2) -> int:
    """Generate -> prep -> train (deepspeed launcher) -> evaluate; prints and saves a summary."""
    import hashlib
    import json
    import shutil
    import time

    from tabulate import tabulate

    from medscale.config import ConfigError, RunConfig, load_config
    from medscale.prep.config import PrepConfig
    from medscale.dist import relaunch
    from medscale.prep.deid import load_pseudonym_key
    from medscale.prep.pipeline import PrepJob, prepare_output, run_prep
    from medscale.report.console import print_eval, print_manifest_summary
    from medscale.resources import resolve_resource

    for flag, value in (("--patients", patients), ("--images-per-patient", images_per_patient), ("--workers", workers)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    config_path = resolve_resource(config or "configs/demo.yaml", "configs", "--config")
    # Resolve the run config first: a bad override fails before minutes of data generation.
    cfg = load_config(RunConfig, config_path,
                      [*overrides, f"data.shards={out / 'shards'}", f"out_dir={out / 'run'}"])
    # A recipe beside a config of one's own (a copied configs/ + data_prep/ tree) wins over the packaged one.
    beside = config_path.resolve().parent.parent / "data_prep" / "demo.yaml"
    recipe = beside if beside.is_file() else resolve_resource("data_prep/demo.yaml", "data_prep", "demo recipe")
    prep_cfg = load_config(PrepConfig, recipe)
    times: dict[str, float] = {}

    t = time.perf_counter()
    for sub in ("raw", "shards", "run"):
        shutil.rmtree(out / sub, ignore_errors=True)
    labels = write_synthetic_corpus(out / "raw", patients=patients, images_per_patient=images_per_patient)
    times["generate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    key_file = out / "pseudonym.key"
    # The corpus is synthetic, so a fixed key keeps the demo's patient split (and its figures)
    # reproducible. A real corpus needs a secret key: see README, "Privacy and leakage".
    key_file.write_text(hashlib.sha256(b"medscale demo: synthetic data only").hexdigest())
    key_file.chmod(0o600)
    prepare_output(out / "shards", resume=False, overwrite=True)
    job = PrepJob(inputs=[str(out / "raw" / "dicom")], out=out / "shards", cfg=prep_cfg,
                  key=load_pseudonym_key(key_file), labels_csv=str(labels), workers=workers,
                  chunk_files=max(1, patients * images_per_patient // 16))
    manifest = run_prep(job, progress=False)
    assert manifest is not None
    times["prep_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if cfg.dist.nproc > 1:
        rc = relaunch(cfg, ["train"])
        if rc != 0:
            print(f"medscale demo: training failed with exit code {rc}", file=sys.stderr)
            return rc
    else:
        from medscale.train.loop import train

        train(cfg)
    times["train_eval_s"] = time.perf_counter() - t

    t = time.perf_counter()
    from medscale.report import write_report

    report = write_report(out / "run")
    times["report_s"] = time.perf_counter() - t

    result = json.loads((out / "run" / "eval.json").read_text())
    print("\n=== medscale demo ===")
    print_manifest_summary(manifest)
    print_eval(result, title=f"held-out test patients ({out / 'run' / 'eval.json'})")
    print(tabulate([[k.removesuffix("_s"), f"{v:.1f} s"] for k, v in times.items()]
                   + [["total", f"{sum(times.values()):.1f} s"]], headers=["stage", "time"]))
    summary = {**times, "total_s": sum(times.values()), "auroc": result["auroc"], "accuracy": result["accuracy"],
               "n_samples": result["n_samples"], "ranks": cfg.dist.nproc, "steps": cfg.train.steps}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"report: {report}")
    return 0
