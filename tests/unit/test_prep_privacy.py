"""Nothing under prep's --out names a source: folders, file names, identity fields, private tags,
nested sequences. Hospital exports name folders after patients; whoever copies the shard directory
must not copy them. The reject log, which must name files, lives in the log directory instead.
Also: duplicate instances (one SOPInstanceUID in several files) keep exactly one sample."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLSNearLossless
from test_deid import NUMERIC_CANARIES, make_dicom
from test_prep import KEY, prep

from medscale.config import ConfigError
from medscale.prep.job import PrepJob, default_log_dir
from medscale.prep.plan import prepare_output
from medscale.formats.tar import DuplicateKey, ShardSequence

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FOLDER_CANARIES = ["SMITHCANARY_JOHN_1950", "DOECANARY^JANE", "Mueller-Canary"]
FILE_CANARY = "ROECANARY_RICHARD_19621103"
HEADER_CANARIES = ["CANARY", "7f3a", "Springfield", *NUMERIC_CANARIES]


def _corpus(root: Path) -> Path:
    """DICOMs under folders named after patients, a rejected file, a photo and a duplicate."""
    src = root / "export"
    for i in range(9):
        folder = src / FOLDER_CANARIES[i % 3] / f"{FILE_CANARY}_series{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        ds = make_dicom(SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.8{i:04d}", PatientID=f"CANARY_PID_{i % 3}_7f3a")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"{FILE_CANARY}_{i}.dcm", enforce_file_format=True)
    bad = src / FOLDER_CANARIES[0] / f"{FILE_CANARY}_broken.dcm"
    bad.write_bytes(b"DICM" * 10)  # rejected: its reason must reach the log, its name only the log
    from PIL import Image

    Image.new("RGB", (32, 24), (90, 40, 30)).save(src / FOLDER_CANARIES[1] / f"{FILE_CANARY}_photo.png")
    return src


def _all_output_bytes(out: Path):
    for f in sorted(out.rglob("*")):
        if f.is_file():
            yield f, f.read_bytes()
        assert not any(c.lower() in f.name.lower() for c in [*FOLDER_CANARIES, FILE_CANARY, "CANARY"]), f


def test_no_folder_file_or_header_canary_anywhere_under_out(tmp_path):
    out = tmp_path / "shards"
    manifest = prep([_corpus(tmp_path)], out, workers=2, chunk_files=4)
    assert manifest["samples"] == 10 and manifest["rejected"] == 1, manifest
    path_canaries = [c.encode().lower() for c in [*FOLDER_CANARIES, FILE_CANARY, str(tmp_path)]]
    header_canaries = [c.encode().lower() for c in HEADER_CANARIES]
    scanned = 0
    for f, data in _all_output_bytes(out):
        low = data.lower()
        for c in path_canaries:
            assert c not in low, (f.relative_to(out), c)
        for c in header_canaries:
            # hex digests may hold "7f3a" by chance; the text canaries are checked everywhere
            if c == b"7f3a" and f.suffix == ".json" and f.name != "manifest.json":
                continue
            assert c not in low, (f.relative_to(out), c)
        scanned += 1
    assert scanned >= 8 and list(out.glob("chunks/*.json")) and list(out.glob("*.tar"))
    # The operator's log, beside the output, names the rejected file so it can be found.
    log = default_log_dir(out)
    assert log == tmp_path / "shards.logs"
    rejects = [json.loads(x) for x in (log / "rejects.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rejects] == [f"{FILE_CANARY}_broken.dcm"]
    assert rejects[0]["reason"] == "not_dicom" and rejects[0]["detail"]
    markers = [json.loads(m.read_text()) for m in sorted((out / "chunks").glob("*.json"))]
    assert [x for m in markers for x in m["rejects"]] == [{"input": rejects[0]["input"], "reason": "not_dicom"}]


def test_resume_still_works_with_markers_that_name_no_file(tmp_path):
    src = _corpus(tmp_path)
    ref = prep([src], tmp_path / "ref", chunk_files=3)
    out = tmp_path / "out"
    prep([src], out, chunk_files=3)
    for marker in sorted((out / "chunks").glob("*.json"))[1:]:
        marker.unlink()  # as if killed after the first chunk
    (out / "manifest.json").unlink()
    again = prep([src], out, chunk_files=3, resume=True, overwrite=False)
    assert [(s["path"], s["sha256"]) for s in again["shards"]] == [(s["path"], s["sha256"]) for s in ref["shards"]]
    assert len((default_log_dir(out) / "rejects.jsonl").read_text().splitlines()) == 1
    # Other inputs: refused, without naming them.
    (src / "extra.dcm").write_bytes(b"x")
    with pytest.raises(ConfigError, match="different inputs"):
        prep([src], out, chunk_files=3, resume=True, overwrite=False)


def test_the_log_directory_may_not_be_inside_the_output(tmp_path):
    with pytest.raises(ConfigError, match="inside --out"):
        prepare_output(tmp_path / "out", resume=False, overwrite=False, log_dir=tmp_path / "out" / "logs")
    job = PrepJob(inputs=[], out=tmp_path / "o", cfg=None, key=KEY, log_dir=tmp_path / "elsewhere")  # type: ignore[arg-type]
    assert job.logs == tmp_path / "elsewhere"


def test_duplicate_instances_keep_one_sample_preferring_a_lossless_syntax(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    mr = Path(pydicom.data.get_testdata_file("MR_small.dcm", download=False))
    # The same instance three times: twice the same bytes, once lossy (JPEG-LS near-lossless). The
    # lossy copy sorts first, but a lossy twin never wins over a lossless one.
    shutil.copy(mr, src / "b_copy.dcm")
    shutil.copy(mr, src / "c_copy.dcm")
    lossy = pydicom.dcmread(mr)
    lossy.compress(JPEGLSNearLossless, encoding_plugin="pyjpegls", jls_error=3, generate_instance_uid=False)
    lossy.save_as(src / "a_lossy.dcm")
    other = pydicom.dcmread(mr)
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    other.save_as(src / "d_other.dcm")
    out = tmp_path / "out"
    manifest = prep([src], out)
    assert manifest["samples"] == 2 and manifest["reject_reasons"] == {"duplicate": 2}, manifest
    log = [json.loads(x) for x in (default_log_dir(out) / "rejects.jsonl").read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in log) == ["a_lossy.dcm", "c_copy.dcm"]
    keys = []
    for tar in out.glob("*.tar"):
        with tarfile.open(tar) as t:
            keys += [m.name.split(".")[0] for m in t.getmembers() if m.name.endswith(".json")]
    assert len(keys) == len(set(keys)) == 2
    # Across chunks the copies cannot be seen by one worker: counted and warned about, not hidden.
    out2 = tmp_path / "out2"
    m2 = prep([src], out2, chunk_files=1)
    assert m2["keys_in_several_chunks"] == 1 and any("more than one chunk" in w for w in m2["warnings"])


def test_the_shard_writer_refuses_a_repeated_key(tmp_path):
    seq = ShardSequence(tmp_path, "train", 0, 1 << 30)
    seq.add("k1", {"json": b"{}", "npy": np.zeros(2).tobytes()})
    with pytest.raises(DuplicateKey, match="k1"):
        seq.add("k1", {"json": b"{}"})


def test_a_duplicate_that_fails_to_convert_gives_the_next_copy_its_turn(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    mr = Path(pydicom.data.get_testdata_file("MR_small.dcm", download=False))
    data = mr.read_bytes()
    (src / "a_truncated.dcm").write_bytes(data[: len(data) - 2000])  # header intact, pixels cut short
    shutil.copy(mr, src / "b_copy.dcm")
    manifest = prep([src], tmp_path / "out")
    assert manifest["samples"] == 1 and manifest["reject_reasons"] == {"truncated": 1}, manifest


def test_the_header_byte_scan_finds_the_instance_uid_pydicom_reads():
    """The scan only orders copies (the duplicate check itself compares keys after the full read),
    but a wrong UID would make it pointless: it must agree with pydicom wherever it answers."""
    from medscale.prep.instances import scan_instance as _scan_instance

    files = Path(pydicom.data.__file__).parent / "test_files"
    found = missed = 0
    for f in sorted(p for p in files.rglob("*") if p.is_file()):
        try:
            uid = str(pydicom.dcmread(f, stop_before_pixels=True).get("SOPInstanceUID", "") or "").strip()
        except Exception:  # noqa: BLE001 - not DICOM
            uid = ""
        got = _scan_instance(str(f))
        if got is not None:
            assert got[0] == uid, f.name
            found += 1
        elif uid and f.read_bytes()[128:132] == b"DICM":
            missed += 1  # deflated datasets: the bytes are compressed
    assert found >= 140 and missed <= 2, (found, missed)
