"""End to end at tiny size: synthetic DICOM -> prep -> real DeepSpeed launcher, 2 ranks, ZeRO-2 -> eval."""

import json
import subprocess
import sys

import pytest


@pytest.mark.integration
def test_demo_tiny_through_deepspeed_launcher(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "medscale.cli", "demo", "--out", str(out), "--patients", "30",
           "--images-per-patient", "4", "--workers", "2", "train.steps=12", "train.log_every=4", "eval.bootstrap=20"]
    # Run outside the checkout: the packaged demo config, DeepSpeed JSON and recipe must be found anyway.
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    r = subprocess.run(cmd, cwd=elsewhere, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "deepspeed.launcher.runner" in r.stdout  # it really went through the launcher

    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    result = json.loads((out / "run" / "eval.json").read_text())
    assert manifest["samples"] == 120 and manifest["rejected"] == 0
    assert {"train", "test"} <= set(manifest["splits"])
    # every held-out sample counted exactly once, none duplicated by distributed padding
    assert result["n_samples"] == manifest["splits"]["test"]["samples"]
    assert result["duplicates_dropped"] == 0
    assert result["n_patients"] == manifest["splits"]["test"]["patients"]
    assert 0.0 <= result["auroc"] <= 1.0 and 0.0 <= result["accuracy"] <= 1.0
    # both ranks logged, and the resolved config went into the run directory
    assert (out / "run" / "config.yaml").exists() and (out / "run" / "model.pt").exists()
    assert "world_size=2" in r.stdout + r.stderr or "2 ranks" in r.stdout + r.stderr

    # the fake identities written into the DICOM headers never reach a shard or the manifest
    blobs = [p.read_bytes() for p in (out / "shards").glob("*.tar")] + [(out / "shards" / "manifest.json").read_bytes()]
    for secret in (b"MRN100003", b"DOE^", b"Demo General Hospital", b"HOUSE^GREGORY", b"CT CHEST for"):
        assert not any(secret in b for b in blobs), secret
    import pydicom

    first = sorted((out / "raw" / "dicom").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    for value in (ds.PatientBirthDate, ds.StudyInstanceUID, ds.SOPInstanceUID, ds.AccessionNumber):
        assert not any(str(value).encode() in b for b in blobs), value

    # the demo ends with the run's report: every figure a non-blank PNG, each embedded in the page
    import base64
    import io
    import re

    import numpy as np
    from PIL import Image

    report = out / "run" / "report" / "report.html"
    assert f"report: {report}" in r.stdout
    pngs = sorted(report.parent.glob("*.png"))
    names = {p.stem for p in pngs}
    assert {"loss_lr", "throughput", "roc", "pr", "calibration", "confusion", "samples"} <= names, names
    for png in pngs:
        image = np.asarray(Image.open(png).convert("L"))
        assert image.shape[0] >= 200 and image.shape[1] >= 300, (png.name, image.shape)
        assert image.std() > 5, f"{png.name} is blank"
    page = report.read_text()
    embedded = [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert sorted(embedded) == sorted(p.read_bytes() for p in pngs)
    for e in embedded:
        Image.open(io.BytesIO(e)).verify()
    assert "<table" in page and "auroc" in page.lower()
    # nothing of a patient's identity in the report either
    for path in [report, *pngs, *(out / "run").glob("*samples.npz")]:
        for secret in (b"MRN100003", b"DOE^", b"Demo General Hospital"):
            assert secret not in path.read_bytes(), (path.name, secret)


@pytest.mark.integration
def test_pretrain_demo_tiny_end_to_end(tmp_path):
    """`medscale demo --pretrain` at tiny size (one rank, a few steps): unlabeled prep, MAE pretraining,
    encoder export, fine-tuning from it and from scratch on a patient-level labelled subset, the
    summary with both AUROCs and their CIs, and a report of each run with its figures."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "medscale.cli", "demo", "--pretrain", "--out", str(out), "--patients", "30",
           "--images-per-patient", "3", "--labelled-fraction", "0.3", "--pretrain-steps", "4", "--finetune-steps",
           "4", "dist.nproc=1", "train.micro_batch_size=4", "eval.bootstrap=20", "train.log_every=2"]
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    r = subprocess.run(cmd, cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "pretrain_summary.json").read_text())
    for name in ("pretrained", "scratch"):
        assert 0 <= summary[f"auroc_{name}"] <= 1
        lo, hi = summary[f"auroc_{name}_ci95"]
        assert lo <= hi
    assert f"{summary['auroc_pretrained']:.3f}" in r.stdout and f"{summary['auroc_scratch']:.3f}" in r.stdout

    unlabeled = json.loads((out / "shards_unlabeled" / "manifest.json").read_text())
    labelled = json.loads((out / "shards_labelled" / "manifest.json").read_text())
    assert unlabeled["task"] == "unlabeled" and unlabeled["samples"] == 90 and unlabeled["rejected"] == 0
    # the labelled subset: a fraction of the training patients, every held-out patient, the same patients
    split = labelled["splits"]
    assert split["train"]["patients"] == summary["labelled_train_patients"] < unlabeled["splits"]["train"]["patients"]
    for key in ("patients", "samples"):
        assert split["test"][key] == unlabeled["splits"]["test"][key], key
    assert summary["test_samples"] == split["test"]["samples"]
    # the fine-tuned run loaded the exported encoder, the scratch run did not
    assert (out / "encoder" / "model.safetensors").exists()
    assert yaml_value(out / "finetuned" / "config.yaml", "model", "weights").endswith("model.safetensors")
    assert yaml_value(out / "scratch" / "config.yaml", "model", "weights") == ""
    assert (out / "pretrain" / "report" / "reconstructions.png").exists()
    assert (out / "finetuned" / "report" / "roc.png").exists() and (out / "scratch" / "report" / "roc.png").exists()

    # nothing of a patient's identity in anything the demo wrote beside its synthetic source (raw/):
    # shards, manifests, runs, checkpoints, the encoder, reports, the summary; contents and names.
    # The source's own labels CSV lists every patient id, folder (patient) name and instance UID.
    import csv

    with open(out / "raw" / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    secrets = {b"DOE^", b"Demo General Hospital", b"HOUSE^GREGORY"}
    secrets |= {row[k].encode() for row in rows for k in ("patient_id", "folder", "sop_uid")}
    # (prep's reject logs, DIR/shards_*.logs, are where source paths belong: kept beside, not in, an output)
    written = [f for f in out.rglob("*") if f.is_file() and "raw" not in f.relative_to(out).parts
               and not f.relative_to(out).parts[0].endswith(".logs")]
    assert written and len(rows) == 90
    for f in written:
        blob, name = f.read_bytes(), str(f.relative_to(out)).encode()
        for secret in secrets:
            assert secret not in blob and secret not in name, (f, secret)


def yaml_value(path, *keys):
    import yaml

    value = yaml.safe_load(path.read_text())
    for k in keys:
        value = value[k]
    return value
