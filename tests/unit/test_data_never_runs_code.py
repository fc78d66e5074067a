"""Data never runs code: nothing read from a manifest, shard, index or chunk marker reaches a shell, a URL
opener or a path outside where the user pointed.

Each hostile input goes through the real command line (`medscale train`, `eval`, `inspect`, `prep
--merge`), in a real process: the command exits 2 with one line naming the file and the entry, and a
canary file that a shell would create never appears.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from conftest import subprocess_env, write_shards
from medscale.files import unsafe_relative_name

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = ("pipe", "index_pipe", "dotdot", "absolute", "url")


def medscale(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medscale.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=subprocess_env())


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean") / "shards"
    write_shards(root, {"train": [8], "val": [4], "test": [4]})
    return root


def hostile(clean: Path, tmp: Path, kind: str) -> tuple[Path, Path]:
    """A copy of `clean` whose manifest's first shard entry is `kind`, and the canary a shell would touch."""
    out = tmp / f"hostile_{kind}"
    shutil.copytree(clean, out)
    canary = tmp / f"canary_{kind}"
    manifest = json.loads((out / "manifest.json").read_text())
    first = manifest["shards"][0]
    outside = tmp / "elsewhere"  # a real shard outside the manifest's directory: readable, yet never read
    outside.mkdir(exist_ok=True)
    shutil.copy(clean / first["path"], outside / first["path"])
    first.update({
        "pipe": {"path": f"pipe:touch {canary}"},
        "index_pipe": {"index": f"pipe:touch {canary}"},
        "dotdot": {"path": f"../elsewhere/{first['path']}"},
        "absolute": {"path": str(outside / first["path"])},
        "url": {"path": f"http://127.0.0.1:9/{first['path']}"},
    }[kind])
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, canary


def _refused(r: subprocess.CompletedProcess, command: str, canary: Path, where: Path) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith(f"medscale {command}: error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "is refused" in errors[0] and str(where) in errors[0], errors[0]
    assert "Traceback" not in r.stderr
    assert not canary.exists()


def test_safe_names():
    for ok in ("train-000000-00.tar", "a/b/train-0.tar.idx.json", "x_1+2=3@a,b.tar"):
        assert unsafe_relative_name(ok) is None, ok
    for bad in ("", "pipe:ls", "http://h/x.tar", "s3://b/x.tar", "file:///x.tar", "/abs.tar", "../x.tar", "a/../x.tar",
                "a//x.tar", "./x.tar", "a b.tar", "a;b.tar", "$(id).tar", "`id`.tar", "-o.tar", "a\nb", "x|y", None, 3):
        assert unsafe_relative_name(bad) is not None, bad


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_manifests_are_refused_by_every_command(tmp_path, clean, kind):
    shards, canary = hostile(clean, tmp_path, kind)
    manifest = shards / "manifest.json"
    _refused(medscale("inspect", shards, "--verify", "--dump", 4, "--dump-dir", tmp_path / "png"), "inspect",
             canary, manifest)
    assert not (tmp_path / "png").exists()

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"shards": str(shards), "image_size": 16, "channels": 1, "num_workers": 0},
        "model": {"name": "test_vit", "patch_size": 8, "num_classes": 2},
        "train": {"steps": 2, "micro_batch_size": 2, "precision": "fp32"},
        "dist": {"deepspeed_config": str(ROOT / "ds_configs" / "cpu_zero2.json")}}))
    for nproc in (1, 2):
        run = tmp_path / f"run{nproc}"
        _refused(medscale("train", "--config", config, f"out_dir={run}", f"dist.nproc={nproc}"), "train", canary, manifest)
        assert not run.exists()  # refused before the run directory was made

    # eval of a run whose config names the hostile shards (e.g. shards replaced after training)
    run = tmp_path / "finished"
    run.mkdir()
    (run / "config.yaml").write_text(config.read_text())
    _refused(medscale("eval", "--run", run), "eval", canary, manifest)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_a_hostile_manifest_in_a_pattern_is_refused(tmp_path, clean):
    """data.shards as a pattern over several prep outputs: each manifest is checked."""
    shards, canary = hostile(clean, tmp_path, "pipe")
    shutil.copytree(clean, tmp_path / "hostile_0")  # a clean one first in the pattern's order
    _refused(medscale("inspect", f"{tmp_path}/hostile_*"), "inspect", canary, shards / "manifest.json")


def test_hostile_chunk_markers_are_refused_by_merge(tmp_path):
    """prep --merge turns chunk markers (files on a shared disk) into paths: they are data too."""
    from medscale.demo import write_synthetic_corpus

    write_synthetic_corpus(tmp_path / "raw", patients=2, images_per_patient=2, size=32)
    out = tmp_path / "out"
    r = medscale("prep", tmp_path / "raw" / "dicom", "--out", out, "--random-key", "--chunk-files", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    canary = tmp_path / "canary"
    for field, value in (("index", "../../outside.idx.json"), ("path", f"pipe:touch {canary}"),
                         ("split", "../../x")):
        marker = out / "chunks" / "000000.json"
        saved = marker.read_text()
        doc = json.loads(saved)
        doc["shards"][0][field] = value
        marker.write_text(json.dumps(doc))
        r = medscale("prep", "--merge", "--out", out)
        assert r.returncode == 2 and "is refused" in r.stderr and str(marker) in r.stderr, r.stderr[-2000:]
        assert not canary.exists() and not (tmp_path.parent / "x.wids.json").exists()
        marker.write_text(saved)
    assert medscale("prep", "--merge", "--out", out).returncode == 0


def test_a_split_name_is_never_a_path(tmp_path):
    r = medscale("prep", tmp_path, "--out", tmp_path / "out", "--random-key", "splits={../../x: 1.0}")
    assert r.returncode == 2 and "splits: '../../x' is refused" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_inspect_dump_never_writes_outside_its_folder(tmp_path, clean):
    """A tar member's name is the sample key, and --dump names its PNGs by key."""
    shards = tmp_path / "evil"
    shutil.copytree(clean, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    first = manifest["shards"][0]
    tar = shards / first["path"]
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(tar, "w") as t:  # the first sample's members renamed ../../escape.*
        key = members[0][0].name.split(".", 1)[0]
        for m, data in members:
            if m.name.startswith(key + "."):
                m.name = "../../escape." + m.name.split(".", 1)[1]
            t.addfile(m, io.BytesIO(data))
    (shards / (first["path"] + ".idx.json")).unlink()  # its index no longer matches: the reader scans headers
    first.pop("index", None)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    dump = tmp_path / "a" / "b" / "png"
    r = medscale("inspect", shards, "--dump", 3, "--dump-dir", dump)
    assert r.returncode == 2 and "sample key '../../escape' is not a plain file name" in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.rglob("escape*"))
