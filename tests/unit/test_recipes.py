"""Each recipe in data_prep/ on a tiny fake tree with the real dataset's layout."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import ComputedRadiographyImageStorage

from medscale.config import load_config
from medscale.prep.config import PrepConfig
from medscale.prep.job import PrepJob
from medscale.prep.pipeline import run_prep
from medscale.prep.plan import prepare_output
from medscale.synthetic import write_dicom

ROOT = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))
rng = np.random.default_rng(0)


def run(recipe: str, inputs: Path, out: Path, labels: Path | None = None) -> dict:
    cfg = load_config(PrepConfig, ROOT / "data_prep" / recipe)
    prepare_output(out, resume=False, overwrite=True)
    manifest = run_prep(PrepJob(inputs=[str(inputs)], out=out, cfg=cfg, key=KEY,
                                labels_csv=str(labels) if labels else None), progress=False)
    assert manifest["rejected"] == 0, (out.parent / (out.name + ".logs") / "rejects.jsonl").read_text()
    return manifest


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def labels_in_shards(out: Path) -> list:
    found = []
    for tar in out.glob("*.tar"):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    info = json.loads(t.extractfile(m).read())
                    found.append(info.get("labels", info.get("label")))
    return found


def test_nih_chestxray14(tmp_path):
    root = tmp_path / "nih"
    rows = []
    findings = ["No Finding", "Effusion|Mass", "Hernia", "Atelectasis|Cardiomegaly|Pneumothorax", "No Finding", "Nodule"]
    for i, f in enumerate(findings):
        folder = root / f"images_00{1 + i // 3}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"0000000{i // 2}_00{i % 2}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / name)
        rows.append([name, f, i % 2, i // 2, 58, "M", "PA", 2500, 2048, 0.143, 0.143, ""])
    csv_path = write_csv(root / "Data_Entry_2017.csv",
                         ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                          "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", ""], rows)
    m = run("nih_chestxray14.yaml", root, tmp_path / "out", csv_path)
    assert m["task"] == "multilabel" and len(m["classes"]) == 14 and m["samples"] == 6
    labels = labels_in_shards(tmp_path / "out")
    assert sum(map(sum, labels)) == 7  # "No Finding" rows are all-zero vectors
    assert sum(d["patients"] for d in m["splits"].values()) == 3  # follow-ups grouped by Patient ID


def _cr(path: Path, patient_id: str) -> None:
    write_dicom(path, rng.integers(0, 255, (48, 48), dtype=np.uint8), sop_class=ComputedRadiographyImageStorage,
                modality="CR", PatientID=patient_id, PatientName=patient_id, BodyPartExamined="CHEST", ViewPosition="PA")


def test_rsna_pneumonia(tmp_path):
    root = tmp_path / "rsna" / "stage_2_train_images"
    root.mkdir(parents=True)
    ids = ["0004cfab-14fd-4e49-80ba-63a80b6bddd6", "00313ee0-9eaa-42f4-b0ab-c148ed3241cd", "00322d4d-1c29-4943-afc9-b6754be640eb"]
    for pid in ids:
        _cr(root / f"{pid}.dcm", pid)
    rows = [[ids[0], "", "", "", "", 0], [ids[1], 264, 152, 213, 379, 1], [ids[1], 562, 152, 256, 453, 1], [ids[2], "", "", "", "", 0]]
    csv_path = write_csv(tmp_path / "rsna" / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    m = run("rsna_pneumonia.yaml", root, tmp_path / "out", csv_path)
    assert m["task"] == "multiclass" and m["classes"] == ["0", "1"] and m["samples"] == 3
    assert sorted(labels_in_shards(tmp_path / "out")) == [0, 0, 1]
    assert m["stratified_samples"] == 3 and m["warnings"] == []  # CSV patientId matches DICOM PatientID


def test_hyperkvasir(tmp_path):
    root = tmp_path / "hyper-kvasir" / "labeled-images"
    layout = [("lower-gi-tract", "pathological-findings", "polyps"), ("lower-gi-tract", "anatomical-landmarks", "cecum"),
              ("upper-gi-tract", "anatomical-landmarks", "z-line"), ("upper-gi-tract", "pathological-findings", "esophagitis-a")]
    for i, parts in enumerate(layout):
        folder = root.joinpath(*parts)
        folder.mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i:04d}-{j}-uuid.jpg")
    m = run("hyperkvasir.yaml", root, tmp_path / "out")
    cfg = load_config(PrepConfig, ROOT / "data_prep" / "hyperkvasir.yaml")
    assert m["samples"] == 8 and len(cfg.classes) == 23
    got = sorted(cfg.classes[x] for x in labels_in_shards(tmp_path / "out"))
    assert got == sorted(["polyps", "cecum", "z-line", "esophagitis-a"] * 2)


def test_isic2020(tmp_path):
    root = tmp_path / "isic" / "train"
    root.mkdir(parents=True)
    rows = []
    for i in range(6):
        name = f"ISIC_{1000000 + i}"
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(root / f"{name}.jpg")
        rows.append([name, f"IP_{i // 2:07d}", "male", 45, "torso", "nevus", "benign" if i % 3 else "malignant", int(i % 3 == 0)])
    csv_path = write_csv(tmp_path / "isic" / "train.csv", ["image_name", "patient_id", "sex", "age_approx",
                         "anatom_site_general_challenge", "diagnosis", "benign_malignant", "target"], rows)
    m = run("isic2020.yaml", root, tmp_path / "out", csv_path)
    assert m["samples"] == 6 and sorted(labels_in_shards(tmp_path / "out")) == [0, 0, 0, 0, 1, 1]
    assert sum(d["patients"] for d in m["splits"].values()) == 3


def test_demo_recipe(tmp_path):
    from medscale.demo import write_synthetic_corpus

    csv_path = write_synthetic_corpus(tmp_path / "raw", patients=5, images_per_patient=2, size=32)
    m = run("demo.yaml", tmp_path / "raw" / "dicom", tmp_path / "out", csv_path)
    assert m["samples"] == 10 and m["classes"] == ["normal", "lesion"]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "data_prep").glob("*.yaml")))
def test_every_recipe_has_a_test(recipe):
    names = {"nih_chestxray14.yaml", "rsna_pneumonia.yaml", "hyperkvasir.yaml", "isic2020.yaml", "demo.yaml"}
    assert recipe in names, f"add a fake-tree test for {recipe}"
