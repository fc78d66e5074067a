"""`medscale prep` end to end: privacy, lossless pixels, patient splits, rejects, resume, array tasks."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_deid import NUMERIC_CANARIES, make_dicom

from medscale.formats.codec import decode_pixels
from medscale.config import load_config
from medscale.prep.config import PrepConfig
from medscale.demo import write_synthetic_corpus
from medscale.prep.deid import Pseudonymizer
from medscale.prep.job import PrepJob
from medscale.prep.merge import merge
from medscale.prep.pipeline import run_prep
from medscale.prep.plan import prepare_output

ROOT = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def prep(inputs, out, *, labels=None, workers=1, chunk_files=1000, recipe=None, overrides=(), **kw):
    cfg = load_config(PrepConfig, recipe, list(overrides))
    prepare_output(Path(out), resume=kw.pop("resume", False), overwrite=kw.pop("overwrite", True))
    job = PrepJob(inputs=[str(i) for i in inputs], out=Path(out), cfg=cfg, key=KEY,
                  labels_csv=str(labels) if labels else None, workers=workers, chunk_files=chunk_files, **kw)
    return run_prep(job, progress=False)


def samples_of(out: Path):
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            members = {}
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = t.extractfile(m).read()
        for key, m in members.items():
            yield tar.name, key, m


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "medscale.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, "MEDSCALE_PSEUDONYM_KEY": KEY.hex()})


def test_phi_canaries_never_reach_a_shard_or_manifest(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(12):
        ds = make_dicom(SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.9{i:04d}", PatientID=f"CANARY_PID_{i % 4}_7f3a")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(src / f"{i}.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    manifest = prep([src], out, workers=2, chunk_files=5)
    assert manifest["samples"] == 12 and manifest["rejected"] == 0
    canaries = [b"CANARY", b"7f3a", b"Springfield", b"1.2.826.0.1.3680043.8.498"] + [c.encode() for c in NUMERIC_CANARIES]
    for f in out.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for c in canaries:
                # hex digests may contain "7f3a" by chance; only the text canaries are checked there
                if c == b"7f3a" and f.suffix == ".json" and f.name != "manifest.json":
                    continue
                assert c not in data, (f.name, c)
    for _, key, m in samples_of(out):
        assert "." not in key
        info = json.loads(m["json"])
        assert not any(str(c) in json.dumps(info) for c in ("CANARY", "7f3a_", "19450307"))


def test_16bit_ct_decodes_back_to_exact_modality_values(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm", download=False), src / "ct.dcm")
    shutil.copy(pydicom.data.get_testdata_file("MR_small.dcm", download=False), src / "mr.dcm")
    out = tmp_path / "out"
    prep([src], out)
    pseudo = Pseudonymizer(KEY)
    by_key = {k: m for _, k, m in samples_of(out)}
    for name in ("ct.dcm", "mr.dcm"):
        ds = pydicom.dcmread(src / name)
        expected = ds.pixel_array.astype(np.int64) * int(getattr(ds, "RescaleSlope", 1)) + int(getattr(ds, "RescaleIntercept", 0))
        m = by_key[pseudo("instance", ds.SOPInstanceUID)]
        info = json.loads(m["json"])
        got = decode_pixels(m["pix.zst"], "pix.zst", info["pixels"])
        assert got.dtype.kind in "iu" and got.dtype.itemsize <= 2
        assert np.array_equal(got.astype(np.int64), expected), name


def test_patients_never_cross_splits_and_manifest_adds_up(tmp_path):
    labels = write_synthetic_corpus(tmp_path / "raw", patients=40, images_per_patient=3, size=32)
    out = tmp_path / "out"
    manifest = prep([tmp_path / "raw" / "dicom"], out, labels=labels, recipe=ROOT / "data_prep" / "demo.yaml",
                    workers=2, chunk_files=16)
    split_of = {}
    counts = {}
    for tar, key, m in samples_of(out):
        info = json.loads(m["json"])
        assert tar.startswith(info["split"] + "-")
        assert split_of.setdefault(info["patient"], info["split"]) == info["split"]
        counts[info["split"]] = counts.get(info["split"], 0) + 1
    assert manifest["samples"] == 120 == sum(counts.values())
    assert {s: d["samples"] for s, d in manifest["splits"].items()} == counts
    assert sum(d["patients"] for d in manifest["splits"].values()) == 40
    for s in manifest["shards"]:
        assert (out / s["path"]).stat().st_size == s["bytes"]
    for split, d in manifest["splits"].items():
        wids = json.loads((out / f"{split}.wids.json").read_text())
        assert sum(x["nsamples"] for x in wids["shardlist"]) == d["samples"]
    assert sum(manifest["splits"][s]["label_counts"].get("lesion", 0) for s in counts) > 0
    assert manifest["classes"] == ["normal", "lesion"]
    assert manifest["largest_patient_samples"] == 3


def test_a_placeholder_patient_id_is_flagged(tmp_path, caplog):
    # Anonymised exports often carry one PatientID for everyone: prep cannot tell those people
    # apart, so they form one "patient" in one split. The manifest and a warning say so.
    write_synthetic_corpus(tmp_path / "raw", patients=20, images_per_patient=3, size=32)
    for f in sorted((tmp_path / "raw" / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.PatientID = "ANONYMOUS"
        ds.save_as(f)
    with caplog.at_level("WARNING", logger="medscale.prep"):
        manifest = prep([tmp_path / "raw" / "dicom"], tmp_path / "out")
    assert manifest["samples"] == manifest["largest_patient_samples"] == 60
    assert sum(d["patients"] for d in manifest["splits"].values()) == 1
    assert "one patient holds 60 of 60 samples" in caplog.text


def test_bad_inputs_are_rejected_with_reasons_and_counts_add_up(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm", download=False))
    shutil.copy(ct, src / "good.dcm")
    (src / "empty.dcm").write_bytes(b"")
    (src / "noise.bin").write_bytes(os.urandom(3000))
    other = pydicom.dcmread(ct)  # its own instance: copies of one instance are rejected as duplicates
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8.9.1"
    other.save_as(src / "truncated.dcm")
    (src / "truncated.dcm").write_bytes((src / "truncated.dcm").read_bytes()[: ct.stat().st_size // 2])
    big = pydicom.dcmread(ct)
    big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8.9.2"
    big.Rows = big.Columns = 60000  # header claims a huge image: rejected from the header alone
    big.save_as(src / "huge.dcm")
    from PIL import Image

    Image.new("RGB", (40, 30), (10, 200, 30)).save(src / "photo.jpg")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    out = tmp_path / "out"
    manifest = prep([src], out, overrides=["max_pixels=50000000"])
    assert not (out / "rejects.jsonl").exists()  # it names source files: kept out of the shard directory
    log = [json.loads(x) for x in (tmp_path / "out.logs" / "rejects.jsonl").read_text().splitlines()]
    rejects = {Path(r["path"]).name: r["reason"] for r in log}
    assert set(rejects) == {"empty.dcm", "noise.bin", "truncated.dcm", "huge.dcm", "broken.png"}
    assert rejects["huge.dcm"] == "too_large" and rejects["empty.dcm"] == "empty"
    assert rejects["noise.bin"] == "not_dicom"
    assert "error" not in rejects.values()
    assert manifest["accepted_inputs"] + manifest["rejected"] == manifest["inputs"] == 7


def test_every_pydicom_test_file_is_converted_or_rejected_with_a_reason(tmp_path):
    files = Path(pydicom.data.__file__).parent / "test_files"
    out = tmp_path / "out"
    manifest = prep([files], out, workers=2, chunk_files=20)
    rejects = [json.loads(x) for x in (tmp_path / "out.logs" / "rejects.jsonl").read_text().splitlines()]
    crashes = [r for r in rejects if r["reason"] == "error"]
    assert not crashes, crashes[:3]
    assert manifest["inputs"] == sum(1 for f in files.rglob("*") if f.is_file() and not f.name.startswith("."))
    assert manifest["accepted_inputs"] + manifest["rejected"] == manifest["inputs"]
    assert manifest["accepted_inputs"] > 30
    assert sum(manifest["reject_reasons"].values()) == manifest["rejected"]


def test_output_dir_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm", download=False), src / "a.dcm")
    r = cli("prep", src, "--out", out)
    assert r.returncode == 2 and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert (out / "something").exists()
    r = cli("prep", src, "--out", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (out / "something").exists() and (out / "manifest.json").exists()


def test_overrides_go_anywhere_on_the_command_line(tmp_path):
    """As `medscale prep --help` says: trailing key=value items override the recipe, after the options too."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm", download=False), src / "a.dcm")
    r = cli("prep", src, "--out", tmp_path / "out", "encoding=png", "--workers", 1, "splits={train: 1.0}")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["encoding"] == "png" and list(manifest["splits"]) == ["train"]
    r = cli("prep", src, "--out", tmp_path / "o2", "encodin=png")
    assert r.returncode == 2 and "unknown config key 'encodin'" in r.stderr and "did you mean 'encoding'" in r.stderr
    r = cli("prep", src, "--out", tmp_path / "o2", "encoding=png", "--bogus")
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr
    assert not (tmp_path / "o2").exists()


def _tree_state(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_prep_that_fails_before_its_first_input_leaves_out_as_it_found_it(tmp_path):
    labels = write_synthetic_corpus(tmp_path / "raw", patients=3, images_per_patient=2, size=32)
    raw, recipe = tmp_path / "raw" / "dicom", ROOT / "data_prep" / "demo.yaml"
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("nothing,useful\n1,2\n")
    out = tmp_path / "out"
    for args in (["--labels", bad_csv], ["--labels", labels, "label_column=nope"], ["--labels", tmp_path / "none.csv"],
                 ["--labels", labels, "stratify=true", "patient_column=missing"]):
        r = cli("prep", raw, "--out", out, "--recipe", recipe, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not out.exists() and not (tmp_path / "out.logs").exists(), args
    assert cli("prep", raw, "--out", out, "--recipe", recipe, "--labels", labels).returncode == 0
    before = _tree_state(out), _tree_state(tmp_path / "out.logs")
    for args in (["--overwrite", "--labels", bad_csv], ["--resume", "--labels", bad_csv], ["--overwrite", tmp_path / "gone"],
                 ["--resume", "--labels", labels, "--chunk-files", 1]):
        r = cli("prep", raw, "--out", out, "--recipe", recipe, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert (_tree_state(out), _tree_state(tmp_path / "out.logs")) == before, args


@pytest.mark.integration
def test_sigkill_of_prep_stops_its_workers(tmp_path):
    """kill -9 of a prep with worker processes: the workers die with it and write no more shards."""
    import psutil

    labels = write_synthetic_corpus(tmp_path / "raw", patients=40, images_per_patient=4, size=64)
    out = tmp_path / "out"
    env = {**os.environ, "MEDSCALE_PSEUDONYM_KEY": KEY.hex()}
    proc = subprocess.Popen([sys.executable, "-m", "medscale.cli", "prep", str(tmp_path / "raw" / "dicom"), "--out",
                             str(out), "--labels", str(labels), "--recipe", str(ROOT / "data_prep" / "demo.yaml"),
                             "--workers", "2", "--chunk-files", "4"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "chunks").glob("*.json"))) < 2:
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) >= 2, workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [w.pid for w in alive]
    files = {str(p): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    time.sleep(2)
    assert {str(p): p.stat().st_size for p in out.rglob("*") if p.is_file()} == files
    assert len(list((out / "chunks").glob("*.json"))) < 40


def test_missing_key_stops_with_instructions(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MEDSCALE_PSEUDONYM_KEY"}
    r = subprocess.run([sys.executable, "-m", "medscale.cli", "prep", str(src), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2 and "secrets.token_hex" in r.stderr and "--key-file" in r.stderr


def _shard_set(out: Path):
    m = json.loads((out / "manifest.json").read_text())
    return [(s["path"], s["sha256"], s["samples"]) for s in m["shards"]]


@pytest.mark.integration
def test_rerun_after_kill_ends_with_the_same_shards(tmp_path):
    labels = write_synthetic_corpus(tmp_path / "raw", patients=30, images_per_patient=4, size=64)
    args = ["prep", tmp_path / "raw" / "dicom", "--labels", labels, "--recipe", ROOT / "data_prep" / "demo.yaml",
            "--chunk-files", "6"]
    ref = tmp_path / "ref"
    assert cli(*args, "--out", ref).returncode == 0
    out = tmp_path / "killed"
    env = {**os.environ, "MEDSCALE_PSEUDONYM_KEY": KEY.hex()}
    proc = subprocess.Popen([sys.executable, "-m", "medscale.cli", *map(str, args), "--out", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "chunks").glob("*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "chunks").glob("*.json")))
    assert 3 <= done < 20, "the kill should land mid-run"
    assert not (out / "manifest.json").exists()
    r = cli(*args, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert _shard_set(out) == _shard_set(ref)
    assert not list(out.glob("*.tmp"))


def test_array_tasks_then_merge_equal_a_single_run(tmp_path):
    labels = write_synthetic_corpus(tmp_path / "raw", patients=12, images_per_patient=3, size=32)
    common = dict(labels=labels, recipe=ROOT / "data_prep" / "demo.yaml", chunk_files=5)
    prep([tmp_path / "raw" / "dicom"], tmp_path / "single", **common)
    out = tmp_path / "array"
    for task in (1, 0):
        assert prep([tmp_path / "raw" / "dicom"], out, task_index=task, num_tasks=2, resume=True, overwrite=False,
                    **common) is None
    merge(out)
    assert _shard_set(out) == _shard_set(tmp_path / "single")


def test_merge_refuses_when_tasks_are_missing(tmp_path):
    labels = write_synthetic_corpus(tmp_path / "raw", patients=6, images_per_patient=2, size=32)
    out = tmp_path / "array"
    prep([tmp_path / "raw" / "dicom"], out, labels=labels, recipe=ROOT / "data_prep" / "demo.yaml", chunk_files=3,
         task_index=0, num_tasks=2)
    with pytest.raises(RuntimeError, match="not finished"):
        merge(out)


def test_inspect_verifies_checksums_and_dumps_previews(tmp_path):
    labels = write_synthetic_corpus(tmp_path / "raw", patients=4, images_per_patient=2, size=32)
    out = tmp_path / "out"
    prep([tmp_path / "raw" / "dicom"], out, labels=labels, recipe=ROOT / "data_prep" / "demo.yaml")
    r = cli("inspect", out, "--verify", "--dump", 3, "--dump-dir", tmp_path / "png")
    assert r.returncode == 0 and "0 bad" in r.stdout, r.stdout + r.stderr
    assert len(list((tmp_path / "png").glob("*.png"))) == 3
    shard = next(out.glob("*.tar"))
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = cli("inspect", out, "--verify")
    assert r.returncode == 1 and "sha256 mismatch" in r.stdout


def _photo_corpus(root: Path, patients: int, positives: int) -> Path:
    """One 8x8 PNG per patient in ISIC's layout; the first `positives` patients are class 1."""
    from PIL import Image

    (root / "img").mkdir(parents=True)
    lines = ["image_name,patient_id,target"]
    for i in range(patients):
        Image.fromarray(np.full((8, 8), i % 250, np.uint8)).save(root / "img" / f"IMG_{i:04d}.png")
        lines.append(f"IMG_{i:04d},PAT_{i:04d},{int(i < positives)}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


@pytest.mark.parametrize("stratify", [True, False])
def test_stratified_split_gives_every_split_its_share_of_a_rare_class(tmp_path, stratify):
    labels = _photo_corpus(tmp_path / "raw", patients=200, positives=10)
    overrides = ["include=['*.png']", "label_key=stem", "key_column=image_name", "label_column=target",
                 "classes=['0', '1']", "patient_column=patient_id", f"stratify={str(stratify).lower()}"]
    m = prep([tmp_path / "raw" / "img"], tmp_path / "out", labels=labels, overrides=overrides, workers=2,
             chunk_files=64)
    positives = {s: d["label_counts"].get("1", 0) for s, d in m["splits"].items()}
    negatives = {s: d["label_counts"].get("0", 0) for s, d in m["splits"].items()}
    if stratify:
        # Rank dealing: 10 positives -> 8/1/1 and 190 negatives -> 152/19/19, exactly.
        assert positives == {"train": 8, "val": 1, "test": 1}
        assert negatives == {"train": 152, "val": 19, "test": 19}
    else:
        # The plain keyed hash gets the totals right but not the exact shares of each class.
        assert sum(positives.values()) == 10 and sum(negatives.values()) == 190
        assert (positives, negatives) != ({"train": 8, "val": 1, "test": 1}, {"train": 152, "val": 19, "test": 19})
    assert m["stratified_samples"] == (200 if stratify else None)


def test_stratify_reports_samples_whose_patient_the_csv_does_not_name(tmp_path, caplog):
    labels = _photo_corpus(tmp_path / "raw", patients=20, positives=4)
    lines = labels.read_text().splitlines()
    lines[1:4] = [f"IMG_{i:04d},,1" for i in range(3)]  # three photos (positives) without a patient id
    labels.write_text("\n".join(lines) + "\n")
    overrides = ["include=['*.png']", "label_key=stem", "key_column=image_name", "label_column=target",
                 "classes=['0', '1']", "patient_column=patient_id", "stratify=true"]
    with caplog.at_level("WARNING", logger="medscale.prep"):
        m = prep([tmp_path / "raw" / "img"], tmp_path / "out", labels=labels, overrides=overrides)
    assert m["samples"] == 20 and m["stratified_samples"] == 17
    assert "3 of 20 samples belong to patients the labels CSV does not name" in caplog.text


def test_stratify_needs_patients_in_the_labels_csv(tmp_path):
    labels = _photo_corpus(tmp_path / "raw", patients=4, positives=1)
    overrides = ["include=['*.png']", "label_key=stem", "key_column=image_name", "label_column=target",
                 "stratify=true"]
    with pytest.raises(ValueError, match="stratify=true needs patients in the labels CSV"):
        prep([tmp_path / "raw" / "img"], tmp_path / "out", labels=labels, overrides=overrides)


def test_patient_strata_use_the_rarest_class_a_patient_has():
    from medscale.prep.labels import LabelTable

    # Multi-label, keyed by image: patient A has effusion (3 patients) and nodule (1 patient).
    t = LabelTable("multilabel", ["effusion", "nodule"], "stem",
                   targets={"a1": [1, 0], "a2": [0, 1], "b1": [1, 0], "c1": [1, 0], "d1": [0, 0]},
                   patients={"a1": "A", "a2": "A", "b1": "B", "c1": "C", "d1": "D"})
    assert t.patient_strata() == {"A": "nodule", "B": "effusion", "C": "effusion", "D": "none"}
    # Keyed by PatientID: each key is a patient.
    t = LabelTable("multiclass", ["normal", "lesion"], "PatientID", targets={"P1": 0, "P2": 1, "P3": 0})
    assert t.patient_strata() == {"P1": "normal", "P2": "lesion", "P3": "normal"}
