"""The embedded default job: a synthetic CT corpus, prepped, trained on, and evaluated.

The corpus is generated, never downloaded: 16-bit CT-like slices (air, body, lungs, spine in
Hounsfield units, stored unsigned with RescaleIntercept -1024 as scanners do), realistic headers
with fake patient names and IDs (which prep must strip), several slices per patient, and a
learnable finding: a bright round lesion in about half of the slices.

`run_pretrain_demo` (``medscale demo --pretrain``) pretrains a masked autoencoder on such a corpus
with its labels hidden and compares fine-tuning from it against training from scratch on a small
labelled fraction of the training patients.
"""

from __future__ import annotations

import csv
import datetime
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from pydicom.dataset import FileDataset
from pydicom.uid import generate_uid

from medscale.synthetic import synthetic_dicom

if TYPE_CHECKING:
    from medscale.config import RunConfig
    from medscale.prep.config import PrepConfig

__all__ = ["make_ct_slice", "write_synthetic_corpus", "run_demo", "run_pretrain_demo", "labelled_subset"]

_FIRST = ["JOHN", "MARY", "AHMED", "LI", "SOFIA", "OLUWASEUN", "PRIYA", "JAN", "ELENA", "KENJI"]
_LAST = ["DOE", "SMITH", "GARCIA", "NGUYEN", "MULLER", "OKAFOR", "SHARMA", "KOWALSKI", "ROSSI", "TANAKA"]


def make_ct_slice(rng: np.random.Generator, size: int, lesion: bool, lesion_hu: tuple[float, float] = (200, 400),
                  lesion_radius: tuple[float, float] = (0.07, 0.1)) -> np.ndarray:
    """One axial CT-like slice in HU (int16): air, an elliptic body, two lungs, a spine, noise; with
    `lesion`, a round lesion of `lesion_hu` and `lesion_radius` (fraction of the side) in a lung."""
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
        r = rng.uniform(*lesion_radius)
        px, py = cx + rng.uniform(-0.4, 0.4) * la, cy + rng.uniform(-0.4, 0.4) * lb
        hu[((xx - px) ** 2 + (yy - py) ** 2) < r ** 2] = rng.uniform(*lesion_hu)
    hu += rng.normal(0, 18, hu.shape).astype(np.float32)
    return np.clip(hu, -1024, 3071).astype(np.int16)


def _dataset(path: Path, hu: np.ndarray, patient: dict, study_uid: str, series_uid: str, sop_uid: str,
             instance: int, study_date: str) -> FileDataset:
    # Stored unsigned 12-bit with a -1024 intercept, as many scanners write CT.
    return synthetic_dicom(
        (hu.astype(np.int32) + 1024).astype(np.uint16), path=path, sop_uid=sop_uid, bits_stored=12,
        StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
        PatientName=patient["name"], PatientID=patient["id"], PatientBirthDate=patient["birth"],
        PatientSex=patient["sex"], PatientAge=patient["age"], InstitutionName="Demo General Hospital",
        ReferringPhysicianName="HOUSE^GREGORY", AccessionNumber=f"ACC{int(study_uid.replace('.', '')[-8:]):08d}",
        StudyDate=study_date, SeriesDate=study_date, ContentDate=study_date, StudyTime="101500",
        StudyDescription=f"CT CHEST for {patient['name']}", BodyPartExamined="CHEST", Manufacturer="DemoScan",
        SeriesNumber=1, InstanceNumber=instance, BurnedInAnnotation="NO", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
        PixelSpacing=[0.7, 0.7], SliceThickness=5.0, RescaleIntercept=-1024, RescaleSlope=1, RescaleType="HU",
        WindowCenter=[40, -600], WindowWidth=[400, 1500])


def write_synthetic_corpus(out: str | Path, *, patients: int = 100, images_per_patient: int = 5,
                           size: int = 96, seed: int = 0, lesion_rate: float = 0.5,
                           lesion_hu: tuple[float, float] = (200, 400),
                           lesion_radius: tuple[float, float] = (0.07, 0.1)) -> Path:
    """Write `patients` x `images_per_patient` CT DICOMs and ``labels.csv`` under `out`.

    Files sit in ``out/dicom/<patient folder>/<n>.dcm``; the CSV keys rows by SOPInstanceUID,
    as hospital exports usually do, with the patient's ID beside it (``patient_id``). Returns the
    CSV path.
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
            _dataset(path, make_ct_slice(rng, size, lesion, lesion_hu, lesion_radius), patient, study, series, sop,
                     i + 1, "20240315").save_as(path, enforce_file_format=True)
            rows.append({"sop_uid": sop, "finding": "lesion" if lesion else "normal", "patient_id": patient["id"],
                         "folder": folder.name})
    csv_path = out / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sop_uid", "finding", "patient_id", "folder"])
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
    from medscale.prep.deid import load_pseudonym_key
    from medscale.prep.job import PrepJob
    from medscale.prep.pipeline import run_prep
    from medscale.prep.plan import prepare_output
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
    # reproducible. A real corpus needs a secret key: see docs/prep.md, "Privacy and leakage".
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
    rc = _train_run(cfg)
    if rc != 0:
        return rc
    times["train_eval_s"] = time.perf_counter() - t

    t = time.perf_counter()
    from medscale.report.html import write_report

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


SUBTLE_LESION_HU = (-450.0, -250.0)
"""The pretraining demo's finding: a faint ground-glass nodule (a few hundred HU above the lung,
nowhere near the bright 200-400 HU lesion of the plain demo), so that a handful of labelled patients
is not enough to learn it from scratch."""
SUBTLE_LESION_RADIUS = (0.035, 0.06)


def labelled_subset(labels_csv: Path, key: bytes, splits: dict[str, float], fraction: float,
                    out_csv: Path) -> tuple[list[str], dict[str, int]]:
    """Keep the labels of `fraction` of the training patients (and every val/test patient).

    A patient's split is the one prep gives it (`medscale.prep.splits.patient_split` of its keyed
    pseudonym), so the subset is a real patient-level subset of the training split and the held-out
    patients are the same ones. The training patients kept are the first by pseudonym (a keyed
    hash: no pattern in IDs or folder names). Writes the restricted CSV to `out_csv`; returns the
    folders to prep and the number of patients per split kept.
    """
    from medscale.prep.deid import Pseudonymizer
    from medscale.prep.splits import patient_split

    with open(labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    pseudo = Pseudonymizer(key)
    patient_of = {r["patient_id"]: pseudo("patient", r["patient_id"]) for r in rows}
    split_of = {raw: patient_split(pseudo, p, splits) for raw, p in patient_of.items()}
    train = sorted((p for raw, p in patient_of.items() if split_of[raw] == "train"))
    n_keep = max(2, round(fraction * len(train)))
    kept_train = set(train[:n_keep])
    keep = {raw for raw, p in patient_of.items() if split_of[raw] != "train" or p in kept_train}
    chosen = [r for r in rows if r["patient_id"] in keep]
    with open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(chosen)
    counts: dict[str, int] = {}
    for raw in keep:
        counts[split_of[raw]] = counts.get(split_of[raw], 0) + 1
    return sorted({r["folder"] for r in chosen}), counts


def run_pretrain_demo(out: Path, overrides: Sequence[str] = (), patients: int = 200, images_per_patient: int = 5,
                      workers: int = 2, labelled_fraction: float = 0.1, pretrain_steps: int | None = None,
                      finetune_steps: int | None = None) -> int:
    """`medscale demo --pretrain`: MAE pretraining on the synthetic corpus with its labels hidden, then
    fine-tuning on a labelled fraction of the training patients, against training from scratch on the
    same fraction with the same steps; both evaluated on the same held-out test patients.

    Stages: generate (a subtler finding than the plain demo's, `SUBTLE_LESION_HU`) -> prep without
    labels (every patient; the pretraining corpus) -> prep of `labelled_fraction` of the training
    patients plus all val/test patients with their labels -> pretrain (configs/demo_mae.yaml, the
    train split only) -> export the encoder -> fine-tune from it (configs/demo.yaml, layer decay) and
    from scratch (configs/demo.yaml) -> ``DIR/pretrain_summary.json`` with ``auroc_pretrained`` and
    ``auroc_scratch`` and their 95% CIs (bootstrap by patient), and a report of each run.

    `overrides` apply to all three runs (e.g. ``dist.nproc=1``, ``eval.bootstrap=50``);
    `pretrain_steps` / `finetune_steps` set their ``train.steps``.
    """
    import hashlib
    import json
    import shutil
    import time

    from tabulate import tabulate

    from medscale.checkpoint.export import export_run
    from medscale.config import ConfigError, RunConfig, load_config
    from medscale.prep.config import PrepConfig
    from medscale.prep.deid import load_pseudonym_key
    from medscale.report.html import write_report
    from medscale.resources import resolve_resource

    for flag, value in (("--patients", patients), ("--images-per-patient", images_per_patient), ("--workers", workers)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if not 0 < labelled_fraction <= 1:
        raise ConfigError(f"--labelled-fraction must be in (0, 1], got {labelled_fraction}")
    out = Path(out)
    encoder = out / "encoder" / "model.safetensors"
    pre_steps = [f"train.steps={pretrain_steps}"] if pretrain_steps else []
    ft_steps = [f"train.steps={finetune_steps}"] if finetune_steps else []
    # Resolve every config first: a bad override fails before minutes of data generation.
    cfg_pre = load_config(RunConfig, resolve_resource("configs/demo_mae.yaml", "configs", "demo config"),
                          [*overrides, *pre_steps, f"data.shards={out / 'shards_unlabeled'}",
                           f"out_dir={out / 'pretrain'}"])
    demo_yaml = resolve_resource("configs/demo.yaml", "configs", "demo config")
    labelled = [*overrides, *ft_steps, f"data.shards={out / 'shards_labelled'}"]
    cfg_ft = load_config(RunConfig, demo_yaml, [*labelled, f"out_dir={out / 'finetuned'}", f"model.weights={encoder}",
                                                "train.layer_decay=0.75"])
    cfg_scratch = load_config(RunConfig, demo_yaml, [*labelled, f"out_dir={out / 'scratch'}"])
    if cfg_ft.train.steps != cfg_scratch.train.steps:
        raise ConfigError("the fine-tuned and the from-scratch runs must train the same steps")
    prep_cfg = load_config(PrepConfig, resolve_resource("data_prep/demo.yaml", "data_prep", "demo recipe"))
    if prep_cfg.stratify:  # stratified splits follow the labels CSV: the two preps would split differently
        raise ConfigError("medscale demo --pretrain needs the demo recipe's patient-hash splits (stratify: false)")
    times: dict[str, float] = {}

    t = time.perf_counter()
    for sub in ("raw", "shards_unlabeled", "shards_labelled", "pretrain", "encoder", "finetuned", "scratch"):
        shutil.rmtree(out / sub, ignore_errors=True)
    labels = write_synthetic_corpus(out / "raw", patients=patients, images_per_patient=images_per_patient,
                                    lesion_hu=SUBTLE_LESION_HU, lesion_radius=SUBTLE_LESION_RADIUS)
    times["generate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    key_file = out / "pseudonym.key"
    key_file.write_text(hashlib.sha256(b"medscale demo: synthetic data only").hexdigest())  # see run_demo
    key_file.chmod(0o600)
    key = load_pseudonym_key(key_file)
    unlabeled = _prep(out / "shards_unlabeled", [out / "raw" / "dicom"], None, prep_cfg, key, workers)
    subset_csv = out / "raw" / "labels_subset.csv"
    folders, kept = labelled_subset(labels, key, dict(prep_cfg.splits), labelled_fraction, subset_csv)
    manifest = _prep(out / "shards_labelled", [out / "raw" / "dicom" / f for f in folders], subset_csv, prep_cfg,
                     key, workers)
    times["prep_s"] = time.perf_counter() - t

    t = time.perf_counter()
    rc = _train_run(cfg_pre)
    if rc:
        return rc
    export_run(out / "pretrain", out / "encoder", part="encoder")
    times["pretrain_s"] = time.perf_counter() - t
    results = {}
    for name, cfg in (("finetuned", cfg_ft), ("scratch", cfg_scratch)):
        t = time.perf_counter()
        rc = _train_run(cfg)
        if rc:
            return rc
        times[f"{name}_s"] = time.perf_counter() - t
        results[name] = json.loads((out / name / "eval.json").read_text())
    t = time.perf_counter()
    reports = [write_report(out / name) for name in ("pretrain", "finetuned", "scratch")]
    times["report_s"] = time.perf_counter() - t

    pre, ft, sc = (json.loads((out / "pretrain" / "eval.json").read_text()), results["finetuned"],
                   results["scratch"])
    ci = lambda r: (r.get("ci95") or {}).get("auroc")  # noqa: E731
    split = manifest["splits"]
    summary = {
        "auroc_pretrained": ft["auroc"], "auroc_pretrained_ci95": ci(ft),
        "auroc_scratch": sc["auroc"], "auroc_scratch_ci95": ci(sc),
        "accuracy_pretrained": ft["accuracy"], "accuracy_scratch": sc["accuracy"],
        "test_samples": ft["n_samples"], "test_patients": ft["n_patients"],
        "bootstrap": ft.get("bootstrap"),
        "labelled_fraction": labelled_fraction, "labelled_train_patients": kept.get("train", 0),
        "labelled_train_images": split["train"]["samples"],
        "pretrain_images": unlabeled["splits"]["train"]["samples"],
        "pretrain_reconstruction_loss_test": pre["loss"], "mask_ratio": cfg_pre.objective_config.mask_ratio,
        "pretrain_steps": cfg_pre.train.steps, "finetune_steps": cfg_ft.train.steps, "ranks": cfg_ft.dist.nproc,
        "lesion_hu": list(SUBTLE_LESION_HU), "lesion_radius": list(SUBTLE_LESION_RADIUS),
        **times, "total_s": sum(times.values()),
    }
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=1))
    fmt = lambda r: f"{r['auroc']:.3f}" + (f"  [{ci(r)[0]:.3f}, {ci(r)[1]:.3f}]" if ci(r) else "")  # noqa: E731
    print("\n=== medscale demo --pretrain ===")
    print(f"pretraining: {summary['pretrain_images']} unlabeled training images, {cfg_pre.train.steps} steps, mask "
          f"{cfg_pre.objective_config.mask_ratio:.0%}; test reconstruction loss {pre['loss']:.4f}")
    print(f"fine-tuning: {summary['labelled_train_images']} labelled images of {summary['labelled_train_patients']} "
          f"training patients ({labelled_fraction:.0%}), {cfg_ft.train.steps} steps each")
    print(tabulate([["MAE-pretrained, fine-tuned", fmt(ft)], ["from scratch", fmt(sc)]],
                   headers=[f"held-out test: {ft['n_samples']} images, {ft['n_patients']} patients", "AUROC [95% CI]"]))
    print(tabulate([[k.removesuffix("_s"), f"{v:.1f} s"] for k, v in times.items()]
                   + [["total", f"{sum(times.values()):.1f} s"]], headers=["stage", "time"]))
    print(f"summary: {out / 'pretrain_summary.json'}")
    for report in reports:
        print(f"report: {report}")
    return 0


def _prep(shards: Path, inputs: list[Path], labels: Path | None, prep_cfg: "PrepConfig", key: bytes,
          workers: int) -> dict:
    from medscale.prep.job import PrepJob
    from medscale.prep.pipeline import run_prep
    from medscale.prep.plan import prepare_output

    prepare_output(shards, resume=False, overwrite=True)
    files = sum(1 for i in inputs for _ in Path(i).rglob("*.dcm"))
    job = PrepJob(inputs=[str(i) for i in inputs], out=shards, cfg=prep_cfg, key=key,
                  labels_csv=str(labels) if labels else None, workers=workers, chunk_files=max(1, files // 16))
    manifest = run_prep(job, progress=False)
    assert manifest is not None  # one task: the manifest is written
    return manifest


def _train_run(cfg: "RunConfig") -> int:
    """Train one run the way `medscale train` does (`medscale.commands.train`)."""
    from medscale.commands import train

    rc = train(cfg)
    if rc != 0:
        print(f"medscale demo: training {cfg.out_dir} failed with exit code {rc}", file=sys.stderr)
    return rc
