"""`medscale prep`: a raw corpus to de-identified, patient-split WebDataset shards.

How the work is cut, and why:

- Inputs are discovered, sorted, and cut into fixed *chunks* of ``chunk_files`` inputs. A chunk
  is the unit of parallelism (worker processes, Slurm array tasks: chunk ``i`` belongs to task
  ``i % num_tasks``) and of completion: its shards are written under temporary names, renamed
  when complete, and a marker ``chunks/NNNNNN.json`` is written last. A rerun after a kill skips
  finished chunks and redoes the others from scratch, so it ends with byte-identical shards
  (tar members carry fixed mtimes and owners).
- Each chunk writes one shard sequence per split, ``{split}-{chunk:06d}-{part:02d}.tar``,
  rolling over at ``shard_bytes``, each shard with its member-offset index beside it
  (``<shard>.idx.json``).
- ``merge`` reads the markers and writes ``manifest.json`` and one wids index per split, and
  ``rejects.jsonl`` into the log directory.

What the files hold (tar layout, index, sample members and metadata, manifest schema) is defined
in `medscale.formats`; this module decides what goes in them. Without a labels CSV (and without
``label_from_dir``) the samples carry no label and the manifest says task ``unlabeled``.

Privacy: only what `deid.safe_metadata` allowlists reaches a shard; sample keys are keyed
pseudonyms. Nothing under the output directory names a source path, folder or file: hospital
exports name folders after patients (``SMITH_JOHN_1950/``), and whoever copies the shards copies
that directory. Markers and the plan name inputs by their position in the sorted input list and
a keyed hash of that list. What must name sources, the reject log (``rejects.jsonl``, so that
rejected files can be found), goes to a separate log directory (``--log-dir``, by default
``<out>.logs`` beside the output): an operator log, never to be published with the shards.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medscale.config import to_dict
from medscale.errors import ConfigError, InputError, InputNotFound
from medscale.files import atomic_write
from medscale.logs import on_terminal
from medscale.formats.codec import encode_pixels, extension_for
from medscale.formats.manifest import PREP_LOG_SUFFIX, build_manifest, write_manifest
from medscale.formats.sample import UNLABELED, encode_sample
from medscale.formats.tar import DuplicateKey, ShardSequence
from medscale.leash import die_with_parent
from medscale.prep.config import PrepConfig, unsafe_split_name
from medscale.prep.deid import Pseudonymizer, burned_in_text_reason, safe_metadata
from medscale.prep.dicom import decode_dicom, read_dicom
from medscale.prep.errors import RejectedInput
from medscale.prep.labels import LabelTable, load_labels
from medscale.prep.photos import load_photo
from medscale.prep.redact import Redactor, require_ocr
from medscale.prep.splits import patient_split, stratified_splits

__all__ = ["PrepJob", "PrepIncomplete", "PrepInputs", "check_prep", "run_prep", "merge", "discover_inputs", "prepare_output", "PHOTO_SUFFIXES",
           "default_log_dir"]

log = logging.getLogger("medscale.prep")

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}
# Warn when one patient holds more than this share of a corpus of at least this many samples.
PLACEHOLDER_SHARE, PLACEHOLDER_MIN_SAMPLES = 0.2, 50
# Without a progress bar (batch jobs, logs), a progress line at most this often.
_LOG_EVERY_S = 30.0
# How often the driver wakes to update progress while worker processes run.
_POLL_S = 0.5


class PrepIncomplete(InputError, RuntimeError):
    """`merge` was asked for before every chunk is finished (rerun the missing tasks)."""


@dataclass
class PrepJob:
    """Everything one prep invocation needs; picklable so worker processes get a copy."""

    inputs: list[str]
    out: Path
    cfg: PrepConfig
    key: bytes
    labels_csv: str | None = None
    workers: int = 1
    task_index: int = 0
    num_tasks: int = 1
    chunk_files: int = 1000
    log_dir: Path | None = None
    """Where logs that name source files go (rejects); None: `default_log_dir(out)`."""

    @property
    def logs(self) -> Path:
        return Path(self.log_dir) if self.log_dir is not None else default_log_dir(self.out)


def default_log_dir(out: str | os.PathLike) -> Path:
    """``<out>.logs``, beside the output directory, never inside it (it names source files)."""
    out = Path(out).resolve()
    return out.parent / (out.name + PREP_LOG_SUFFIX)


@dataclass
class _Source:
    path: str  # absolute path, for reading
    rel: str  # path relative to its input root, for label lookup
    position: int = -1  # in the sorted input list: how markers and the plan name an input


@dataclass
class _ChunkResult:
    index: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    patients: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> patient -> samples
    inputs: int = 0
    accepted: int = 0
    samples: int = 0
    lossy: int = 0
    stratified: int = 0  # samples whose patient the stratified assignment placed
    redacted: int = 0  # samples whose burned-in text areas were blanked (burned_in: redact)
    dropped_codes: dict[str, int] = field(default_factory=dict)  # CS values that were not defined terms
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


def discover_inputs(inputs: Sequence[str], include: Sequence[str]) -> list[_Source]:
    """Expand directories (by glob patterns), single files and file lists into a sorted list.

    A file ending in ``.txt`` or ``.lst`` is a list of paths, one per line.
    """
    found: dict[str, _Source] = {}
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            root = p.resolve()
            for pattern in include:
                for f in root.glob(pattern):
                    if f.is_file() and not f.name.startswith("."):
                        found.setdefault(str(f), _Source(str(f), f.relative_to(root).as_posix()))
        elif p.is_file() and p.suffix in (".txt", ".lst"):
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    f = (p.parent / line).resolve() if not os.path.isabs(line) else Path(line)
                    found.setdefault(str(f), _Source(str(f), line))
        elif p.is_file():
            found.setdefault(str(p.resolve()), _Source(str(p.resolve()), p.name))
        else:
            raise InputNotFound(f"prep input {item!r} does not exist")
    ordered = sorted(found.values(), key=lambda s: s.path)
    for i, s in enumerate(ordered):
        s.position = i
    return ordered


# ---------------------------------------------------------------------------------------------
# One input -> samples
# ---------------------------------------------------------------------------------------------


class _Context:
    """Per-process state: built once per worker, not once per file."""

    def __init__(self, job: PrepJob, labels: LabelTable | None, splits: dict[str, str] | None):
        self.job = job
        self.cfg = job.cfg
        self.pseudo = Pseudonymizer(job.key)
        self.labels = labels
        self.task = _task(job.cfg, labels)
        self.splits = splits or {}  # stratified: patient pseudonym -> split; others use the hash split
        self.ext = extension_for(job.cfg.encoding)
        # Rules parsed and Tesseract checked once per worker; run_prep's require_ocr has already
        # refused a config that cannot run here, before any worker started.
        needs_ocr = job.cfg.burned_in == "redact" or job.cfg.photos_ocr
        self.redactor = Redactor(job.cfg) if needs_ocr else None
        self.dropped: Counter = Counter()  # safe_metadata counts CS values that are not defined terms here


def _task(cfg: PrepConfig, labels: LabelTable | None) -> str:
    """What the samples' labels are: the CSV's task, multiclass for folder classes, else unlabeled."""
    if labels is not None:
        return labels.task
    return "multiclass" if cfg.label_from_dir else UNLABELED


def _label_for(ctx: _Context, keys: dict[str, str]) -> Any:
    if ctx.cfg.label_from_dir:
        # Folder-per-class layouts (HyperKvasir): classes come from the config, order fixed.
        name = Path(keys["path"]).parent.name
        if name not in ctx.cfg.classes:
            raise RejectedInput("unlabeled", f"folder {name!r} is not one of the recipe's classes")
        return ctx.cfg.classes.index(name)
    if ctx.labels is None:
        return None
    target = ctx.labels.lookup(keys)
    if target is None:
        raise RejectedInput("unlabeled", f"no row in the labels CSV for {ctx.labels.key_kind}")
    return target


def _dicom_samples(ctx: _Context, src: _Source) -> list[tuple[str, dict[str, Any], np.ndarray]]:
    ds = read_dicom(src.path, max_pixels=ctx.cfg.max_pixels)
    why = burned_in_text_reason(ds)
    redact = why is not None and ctx.cfg.burned_in == "redact"
    if why and not redact:
        raise RejectedInput("quarantined", why)  # before decoding: quarantine costs no pixel work
    meta = safe_metadata(ds, ctx.pseudo, ctx.dropped)
    keys = {
        "path": src.rel,
        "filename": Path(src.rel).name,
        "stem": Path(src.rel).stem,
        "SOPInstanceUID": str(ds.get("SOPInstanceUID", "")),
        "StudyInstanceUID": str(ds.get("StudyInstanceUID", "")),
        "PatientID": str(ds.get("PatientID", "")),
    }
    target = _label_for(ctx, keys)
    images = decode_dicom(ds, voi=ctx.cfg.voi, frames=ctx.cfg.frames, max_pixels=ctx.cfg.max_pixels)
    boxes = None
    if redact:
        assert ctx.redactor is not None  # _Context builds one whenever burned_in is redact
        # Blanks the images in place; raises RejectedInput("quarantined") where OCR still reads text.
        boxes = ctx.redactor.redact_dicom(ds, images, why)
    base = meta.get("instance") or ctx.pseudo("path", src.rel)
    out = []
    for img in images:
        key = base if img.frame is None else f"{base}_f{img.frame:05d}"
        info = {
            "source": "dicom",
            "patient": meta.get("patient"),
            "study": meta.get("study"),
            "series": meta.get("series"),
            "frame": img.frame,
            "photometric": img.photometric,
            "windows": [list(w) for w in img.windows],
            "voi_applied": img.voi_applied,
            "inverted": img.inverted,
            "lossless": img.lossless,
            "bits_stored": img.bits_stored,
            "meta": meta,
            "target": target,
        }
        if boxes is not None:
            # Pixels changed by burned_in: redact (and passed its OCR check): the manifest counts these.
            info["redacted"] = True
            info["redacted_boxes"] = boxes
        out.append((key, info, img.pixels))
    return out


def _photo_samples(ctx: _Context, src: _Source) -> list[tuple[str, dict[str, Any], np.ndarray]]:
    pixels, meta = load_photo(src.path, max_pixels=ctx.cfg.max_pixels)
    keys = {"path": src.rel, "filename": Path(src.rel).name, "stem": Path(src.rel).stem}
    target = _label_for(ctx, keys)  # first: an unlabeled photo is rejected without paying for OCR
    if ctx.cfg.photos_ocr:
        assert ctx.redactor is not None  # _Context builds one whenever photos_ocr is set
        ctx.redactor.check_photo(pixels)  # raises RejectedInput("quarantined") if OCR reads text
    patient_raw = ctx.labels.patient(keys) if ctx.labels is not None and ctx.cfg.patient_column else None
    # Without a patient column each photo is its own patient; the manifest says so.
    patient = ctx.pseudo("patient", patient_raw) if patient_raw else ctx.pseudo("patient", "photo:" + src.rel)
    key = ctx.pseudo("instance", "photo:" + src.rel)
    info = {
        "source": "photo",
        "patient": patient,
        "patient_from": "csv" if patient_raw else "image",
        "photometric": "RGB" if pixels.ndim == 3 else "MONOCHROME2",
        "lossless": True,
        "meta": meta,
        "target": target,
    }
    return [(key, info, pixels)]


_CTX: _Context | None = None
_PROGRESS: Any = None


def _init_worker(job: PrepJob, labels: LabelTable | None, splits: dict[str, str] | None, progress: Any,
                 parent: int | None = None) -> None:
    global _CTX, _PROGRESS
    if parent is not None:  # a worker process: it dies with prep (SIGKILL included), mid-chunk or idle
        die_with_parent(signal.SIGKILL, parent)
    _CTX, _PROGRESS = _Context(job, labels, splits), progress


def _stratified_splits(job: PrepJob, labels: LabelTable | None) -> dict[str, str] | None:
    """Patient pseudonym -> split when the config asks for a stratified split, else None.

    Computed from the labels CSV alone, so every worker and every Slurm array task gets the same
    assignment without seeing the others' inputs.
    """
    if not job.cfg.stratify:
        return None
    if labels is None:
        raise ConfigError("stratify=true needs a labels CSV (--labels or the recipe's labels_csv)")
    pseudo = Pseudonymizer(job.key)
    strata = {pseudo("patient", raw): stratum for raw, stratum in labels.patient_strata().items() if raw}
    return stratified_splits(pseudo, strata, job.cfg.splits)


def _process_chunk(args: tuple[int, list[_Source]]) -> _ChunkResult:
    index, sources = args
    ctx = _CTX
    assert ctx is not None, "worker not initialised"  # programming error, not data validation
    t0 = time.perf_counter()
    out = ctx.job.out
    for stale in out.glob(f"*-{index:06d}-*.tar*"):
        stale.unlink()  # leftovers of an interrupted run of this chunk
    result = _ChunkResult(index=index, inputs=len(sources))
    sequences: dict[str, ShardSequence] = {}
    patients: dict[str, Counter] = {}
    log: list[dict[str, Any]] = []  # names sources: written to the log directory, never beside the shards
    ctx.dropped.clear()
    kept: dict[str, int] = {}  # sample key -> position of the input that wrote it (all splits of the chunk)

    def reject(src: _Source, reason: str, detail: str) -> None:
        result.rejects.append({"input": src.position, "reason": reason})
        log.append({"input": src.position, "path": src.path, "reason": reason, "detail": detail})

    for src in _in_preference_order(sources):
        samples, encoded = [], []
        try:
            is_photo = Path(src.path).suffix.lower() in PHOTO_SUFFIXES
            samples = _photo_samples(ctx, src) if is_photo else _dicom_samples(ctx, src)
            first = next((kept[k] for k, _, _ in samples if k in kept), None)
            if first is not None:  # the same SOPInstanceUID, hence the same keys, as an input already written
                raise RejectedInput("duplicate", f"the same instance (SOPInstanceUID) as input {first}, which is kept")
            if not samples:
                raise RejectedInput("empty", "decoded to no images")
            encoded = [_encode(ctx, px) for _, _, px in samples]
        except RejectedInput as r:
            reject(src, r.reason, r.detail)
            samples = []
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - one bad file must not end a million-file run; it is reported
            reject(src, "error", f"{type(e).__name__}: {e}")
            samples = []
        added = 0
        for (key, info, _), (data, pix) in zip(samples, encoded):
            patient = info["patient"]
            assigned = ctx.splits.get(patient)
            split = assigned or patient_split(ctx.pseudo, patient, ctx.cfg.splits)
            result.stratified += assigned is not None
            info["pixels"] = pix
            info["split"] = split
            target = info.pop("target")
            members = encode_sample(info, ctx.ext, data, task=ctx.task, label=target)
            if split not in sequences:
                sequences[split] = ShardSequence(out, split, index, ctx.cfg.shard_bytes)
            try:
                sequences[split].add(key, members, target, _label_counts(ctx, target))
            except DuplicateKey as e:  # never two samples under one key (the reader would merge them)
                if added:  # frames of one input have keys of their own: a collision here is a bug
                    raise
                reject(src, "duplicate", str(e))
                break
            added += 1
            patients.setdefault(split, Counter())[patient] += 1
            result.samples += 1
            result.lossy += not info.get("lossless", True)
            result.redacted += bool(info.get("redacted"))
        result.accepted += added > 0
        kept.update((k, src.position) for k, _, _ in samples[:added])
        if _PROGRESS is not None:
            with _PROGRESS.get_lock():
                _PROGRESS.value += 1
    for split in sorted(sequences):
        result.shards.extend(sequences[split].close())
    result.patients = {s: dict(sorted(c.items())) for s, c in sorted(patients.items())}
    result.dropped_codes = dict(sorted(ctx.dropped.items()))
    result.seconds = time.perf_counter() - t0
    atomic_write(ctx.job.logs / "rejects" / f"{index:06d}.jsonl", "".join(json.dumps(x) + "\n" for x in log))
    # The marker is written last: its presence means the chunk is complete.
    atomic_write(out / "chunks" / f"{index:06d}.json", json.dumps(result.__dict__))
    return result


# Transfer syntaxes that keep every bit: a duplicate instance stored in one of these wins.
_LOSSLESS_SYNTAXES = frozenset({
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
})


def _in_preference_order(sources: list[_Source]) -> list[_Source]:
    """This chunk's inputs, copies of one instance next to each other, the best copy first.

    Real exports hold the same image twice (exported again, or in two transfer syntaxes). Both
    get the same sample keys, and a reader groups a tar's adjacent members by key, so they would
    merge into one corrupt sample: the first copy converted is kept, the others are rejected as
    ``duplicate`` (by their keys, after the full read). This order makes the kept one the best:
    a lossless transfer syntax, then the first in path order, so every rerun keeps the same file;
    a copy that fails to convert gives the next one its turn. Inputs keep path order otherwise; a
    group goes where its first member sorts. The UIDs come from a byte scan of each file's first
    16 kB (a third of a pydicom header parse): a wrong or missing one only changes the order.
    """
    found = {s.position: _scan_instance(s.path) for s in sources
             if Path(s.path).suffix.lower() not in PHOTO_SUFFIXES}
    groups: dict[str, list[tuple[bool, int, _Source]]] = {}
    for s in sources:
        if found.get(s.position):
            uid, syntax = found[s.position]
            groups.setdefault(uid, []).append((syntax not in _LOSSLESS_SYNTAXES, s.position, s))
    order: list[_Source] = []
    placed: set[str] = set()
    for s in sources:
        uid = found[s.position][0] if found.get(s.position) else None
        if uid is None or len(groups[uid]) == 1:
            order.append(s)
        elif uid not in placed:
            placed.add(uid)
            order.extend(g[2] for g in sorted(groups[uid], key=lambda g: g[:2]))
    return order


_UID_CHARS = frozenset(b"0123456789.")


def _scan_instance(path: str) -> tuple[str, str] | None:
    """(SOPInstanceUID, TransferSyntaxUID) found in a DICOM file's first 16 kB, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16384)
    except OSError:
        return None
    if head[128:132] != b"DICM":
        return None

    def value(at: int, length_format: str) -> str:
        size = struct.calcsize(length_format)
        (n,) = struct.unpack_from(length_format, head, at)
        raw = head[at + size:at + size + n].rstrip(b"\0 ")
        return raw.decode("ascii") if raw and n <= 64 and set(raw) <= _UID_CHARS else ""

    i = head.find(b"\x02\x00\x10\x00UI", 132)  # the file meta group is always explicit little endian
    syntax = value(i + 6, "<H") if i >= 0 and i + 8 <= len(head) else ""
    # The tag's bytes also turn up inside other elements (a length of 0x18): try each occurrence.
    for tag, order in ((b"\x08\x00\x18\x00", "<"), (b"\x00\x08\x00\x18", ">")):
        j = head.find(tag, 132)
        while 0 <= j <= len(head) - 12:
            vr = head[j + 4:j + 6]
            if vr == b"UI":
                uid = value(j + 6, order + "H")
            elif vr == b"UN":  # explicit VR with a 4-byte length after 2 reserved bytes
                uid = value(j + 8, order + "I")
            else:  # implicit VR (little endian only)
                uid = value(j + 4, "<I") if order == "<" else ""
            if uid:
                return uid, syntax
            j = head.find(tag, j + 1)
    return None


def _encode(ctx: _Context, pixels: np.ndarray) -> tuple[bytes, dict[str, Any]]:
    try:
        return encode_pixels(pixels, ctx.cfg.encoding, ctx.cfg.compression_level)
    except ValueError as e:  # e.g. float32 pixels (non-integer rescale) with encoding=png
        raise RejectedInput("unsupported", str(e)) from None


def _label_counts(ctx: _Context, target: Any) -> dict[str, int]:
    if target is None:
        return {}
    if ctx.cfg.label_from_dir:
        return {ctx.cfg.classes[target]: 1}
    assert ctx.labels is not None
    return ctx.labels.counts(target)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _plan(job: PrepJob, sources: list[_Source], labels: LabelTable | None) -> dict[str, Any]:
    # Keyed: an unkeyed hash of the paths could be confirmed by whoever can guess them.
    h = hmac.new(job.key, b"medscale-prep-inputs", hashlib.sha256)
    for s in sources:
        h.update(s.path.encode() + b"\0")
    return {
        "inputs": len(sources),
        "inputs_hmac": h.hexdigest(),
        "chunk_files": job.chunk_files,
        "chunks": (len(sources) + job.chunk_files - 1) // job.chunk_files,
        "config": _config_record(job),
        "labels_sha256": _file_sha256(job.labels_csv) if job.labels_csv else None,
        "task": _task(job.cfg, labels),
        "classes": labels.classes if labels else list(job.cfg.classes) if job.cfg.label_from_dir else [],
        "key_fingerprint": Pseudonymizer(job.key)("fingerprint", "medscale"),
    }


_PLAN_CHECKS = {"inputs_hmac": "inputs", "chunk_files": "chunk files", "config": "config",
                "labels_sha256": "labels CSV contents", "key_fingerprint": "key fingerprint"}
# Config fields that hold paths: recorded by their contents' hash, never by name.
_PATH_FIELDS = ("labels_csv", "redact_rules")


def _config_record(job: PrepJob) -> dict[str, Any]:
    cfg = to_dict(job.cfg)
    for name in _PATH_FIELDS:
        if cfg.get(name):
            path = job.labels_csv if name == "labels_csv" and job.labels_csv else cfg[name]
            cfg[name] = f"sha256:{_file_sha256(path)}" if os.path.isfile(path) else "set"
    return cfg


def _file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_output(out: Path, *, resume: bool, overwrite: bool, log_dir: Path | None = None,
                   dry_run: bool = False) -> None:
    """Refuse a non-empty output directory unless resuming or overwriting; check the log directory.

    The log directory (default `default_log_dir`) may not lie inside the output: it names sources.
    Creates nothing (`run_prep` does, once its inputs are checked); ``overwrite`` deletes the output
    and its reject logs, so check the job first (`check_prep`). `dry_run`: only the checks.
    """
    logs = Path(log_dir) if log_dir is not None else default_log_dir(out)
    if logs.resolve().is_relative_to(Path(out).resolve()):
        raise ConfigError(f"--log-dir {logs} is inside --out {out}: the reject log names source files and "
                          "must stay out of the shard directory; choose a directory beside it")
    if out.exists() and any(out.iterdir()):
        if overwrite:
            if not dry_run:
                shutil.rmtree(out)
                shutil.rmtree(logs / "rejects", ignore_errors=True)
        elif not resume:
            raise ConfigError(
                f"output directory {out} is not empty; pass --resume to continue an interrupted prep "
                "or --overwrite to start again"
            )


@dataclass
class PrepInputs:
    """What `check_prep` read and checked before anything is written: the labels, the stratified
    assignment and the sorted inputs."""

    labels: LabelTable | None
    splits: dict[str, str] | None
    sources: list[_Source]


def check_prep(job: PrepJob) -> PrepInputs:
    """Read and check everything a prep needs before it writes anything (a bad labels CSV, a missing
    OCR engine, inputs that do not exist fail here, and ``--out`` stays as it was).

    Raises:
        InputError, InputNotFound, ConfigError: naming the file, key or value to fix.
    """
    labels = load_labels(job.cfg, job.labels_csv) if job.labels_csv else None
    require_ocr(job.cfg)  # here, not in the workers: a missing Tesseract stops the run before it starts
    splits = _stratified_splits(job, labels)
    sources = discover_inputs(job.inputs, job.cfg.include)
    if not sources:
        raise InputNotFound(f"no input files found under {job.inputs} with patterns {job.cfg.include}")
    return PrepInputs(labels, splits, sources)


def run_prep(job: PrepJob, inputs: PrepInputs | None = None, *, progress: bool | None = None) -> dict[str, Any] | None:
    """Run this task's share of the chunks; merge and return the manifest when it is the only task.

    `inputs`: what `check_prep` returned (checked here when None). Nothing is written until the
    inputs, the labels and, on a resume, the plan of the prep being continued are checked.
    """
    checked = inputs or check_prep(job)
    labels, splits, sources = checked.labels, checked.splits, checked.sources
    plan = _plan(job, sources, labels)
    plan_path = job.out / "plan.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        for k in _PLAN_CHECKS:
            if old.get(k) != plan.get(k):
                raise ConfigError(
                    f"{plan_path} was written for different {_PLAN_CHECKS[k]}; resume only with the same "
                    "inputs, recipe, chunk size and key, or use --overwrite"
                )
    (job.out / "chunks").mkdir(parents=True, exist_ok=True)
    (job.logs / "rejects").mkdir(parents=True, exist_ok=True)
    if not plan_path.exists():
        atomic_write(plan_path, json.dumps(plan, indent=1))

    chunks = [
        (i, sources[i * job.chunk_files : (i + 1) * job.chunk_files])
        for i in range(plan["chunks"])
        if i % job.num_tasks == job.task_index and not (job.out / "chunks" / f"{i:06d}.json").exists()
    ]
    todo_inputs = sum(len(c[1]) for c in chunks)
    log.info("prep: %d inputs, %d chunks for this task (%d already done)", len(sources), len(chunks),
             len([i for i in range(plan["chunks"]) if i % job.num_tasks == job.task_index]) - len(chunks))
    _run_chunks(job, labels, splits, chunks, todo_inputs, progress if progress is not None else on_terminal())
    if job.num_tasks == 1:
        return merge(job.out, log_dir=job.logs)
    return None


def _run_chunks(job: PrepJob, labels: LabelTable | None, splits: dict[str, str] | None,
                chunks: list[tuple[int, list[_Source]]], total: int, bar: bool) -> None:
    from tqdm import tqdm

    counter = mp.Value("q", 0)
    pbar = tqdm(total=total, unit="file", disable=not bar, dynamic_ncols=True)
    last_log = time.monotonic()

    def report() -> None:
        nonlocal last_log
        pbar.update(counter.value - pbar.n)
        if not bar and time.monotonic() - last_log > _LOG_EVERY_S:
            log.info("prep: %d/%d files", counter.value, total)
            last_log = time.monotonic()

    if job.workers <= 1:
        _init_worker(job, labels, splits, counter)
        for c in chunks:
            _process_chunk(c)
            report()
    else:
        from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        # fork keeps start-up cheap: workers inherit the parsed labels instead of re-reading the CSV.
        # An executor rather than mp.Pool: a worker killed inside a C decoder (a codec that aborts
        # on a corrupt stream, the OOM killer) breaks the executor instead of hanging the run.
        with ProcessPoolExecutor(job.workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
                                 initargs=(job, labels, splits, counter, os.getpid())) as pool:
            futures = [pool.submit(_process_chunk, c) for c in chunks]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_EXCEPTION)
                report()
                try:
                    for f in done:
                        f.result()  # re-raises a worker's exception here
                except BrokenProcessPool:
                    unfinished = [c[0] for c, f in zip(chunks, futures) if not f.done() or f.exception()]
                    raise PrepIncomplete(
                        f"a prep worker process died (killed, out of memory, or a decoder crashed) while "
                        f"converting chunks {unfinished[:5]}; finished chunks are kept: rerun with --resume, "
                        "and with --workers 1 --chunk-files 1 to find the input that kills it") from None
    report()
    pbar.close()


def merge(out: Path, log_dir: Path | None = None) -> dict[str, Any]:
    """Build manifest.json and the wids indexes from the chunk markers, and LOG_DIR/rejects.jsonl."""
    out = Path(out)
    logs = Path(log_dir) if log_dir is not None else default_log_dir(out)
    plan = json.loads((out / "plan.json").read_text())
    if not isinstance(plan.get("chunks"), int) or isinstance(plan["chunks"], bool) or plan["chunks"] < 0:
        raise InputError(f"{out / 'plan.json'}: 'chunks' is {plan.get('chunks')!r}, not a count; prep again with --overwrite")
    results = []
    missing = []
    for i in range(plan["chunks"]):
        marker = out / "chunks" / f"{i:06d}.json"
        if marker.exists():
            results.append(_read_marker(marker, i))
        else:
            missing.append(i)
    if missing:
        raise PrepIncomplete(
            f"cannot merge {out}: {len(missing)} of {plan['chunks']} chunks are not finished "
            f"(first: {missing[:5]}); rerun the prep tasks with --resume"
        )
    shards = sorted((s for r in results for s in r["shards"]), key=lambda s: s["path"])
    rejects = sorted((x for r in results for x in r["rejects"]), key=lambda x: x["input"])
    reject_log, unlogged = [], []
    for i in range(plan["chunks"]):
        part = logs / "rejects" / f"{i:06d}.jsonl"
        if part.exists():
            reject_log.extend(json.loads(line) for line in part.read_text().splitlines() if line)
        elif results[i]["rejects"]:
            unlogged.append(i)
    split_patients: dict[str, set[str]] = {}
    per_patient: Counter = Counter()
    for r in results:
        for split, counts in r["patients"].items():
            split_patients.setdefault(split, set()).update(counts)
            per_patient.update(counts)
    seen: dict[str, str] = {}
    for split, ps in split_patients.items():
        for p in ps:
            if p in seen and seen[p] != split:
                raise RuntimeError(f"patient {p} appears in splits {seen[p]} and {split}: refusing to write a leaky manifest")
            seen[p] = split
    repeated = _keys_in_several_chunks(out, results)
    largest = max(per_patient.values(), default=0)
    total = sum(s["samples"] for s in shards)
    warnings = []
    if total >= PLACEHOLDER_MIN_SAMPLES and largest > PLACEHOLDER_SHARE * total:
        warnings.append(f"one patient holds {largest} of {total} samples ({100 * largest / total:.0f}%): a "
                        "placeholder PatientID (ANONYMOUS, 0, ...) merges many people into one patient, who "
                        "then lands in a single split; check the corpus's PatientIDs")
    stratified = sum(r.get("stratified", 0) for r in results)
    if plan["config"].get("stratify") and stratified < total:
        warnings.append(f"{total - stratified} of {total} samples belong to patients the labels CSV does not "
                        "name (for DICOM: whose PatientID differs from the CSV's patient column); they got the "
                        "plain hash split, not the stratified one")
    if repeated:
        warnings.append(f"{repeated} sample keys (SOPInstanceUIDs) occur in more than one chunk: the same image "
                        "exported twice, in files that sort far apart; prep keeps one instance per chunk only, so "
                        "these samples are counted twice (a larger --chunk-files puts such copies together)")
    if unlogged:
        warnings.append(f"the reject log of chunks {unlogged[:5]} is missing from {logs}: their rejected files "
                        "are counted but not listed (was --log-dir different for those tasks?)")
    for w in warnings:
        log.warning(w)
    cfg = plan["config"]
    manifest = build_manifest(
        shards, {name: len(ps) for name, ps in split_patients.items()},
        task=plan["task"], classes=plan["classes"], encoding=cfg["encoding"],
        pixel_extension=extension_for(cfg["encoding"]), key_fingerprint=plan["key_fingerprint"], config=cfg,
        run={
            "inputs": plan["inputs"],
            "accepted_inputs": sum(r["accepted"] for r in results),
            # The most samples any one (pseudonymized) patient has: a placeholder PatientID shows here.
            "largest_patient_samples": largest,
            "warnings": warnings,
            "stratified_samples": stratified if cfg.get("stratify") else None,
            # Samples whose values are float32 after a non-integer rescale (not bit-exact integers).
            "lossy_samples": sum(r.get("lossy", 0) for r in results),
            "rejected": len(rejects),
            "reject_reasons": dict(sorted(Counter(x["reason"] for x in rejects).items())),
            "keys_in_several_chunks": repeated,
            # burned_in: redact; images that still showed text are in reject_reasons as "quarantined".
            "redacted_samples": sum(r.get("redacted", 0) for r in results),
            # Coded strings that were not DICOM defined terms (a surname in BodyPartExamined): left out.
            "dropped_codes": dict(sorted(sum((Counter(r.get("dropped_codes", {})) for r in results), Counter()).items())),
        },
    )
    write_manifest(out, manifest)
    reject_log.sort(key=lambda x: x["input"])
    atomic_write(logs / "rejects.jsonl", "".join(json.dumps(x) + "\n" for x in reject_log))
    return manifest


def _read_marker(path: Path, index: int) -> dict[str, Any]:
    """A chunk marker, checked before any of its names is used: markers are files on a shared disk,
    and the shard and index names in them become paths below ``--out`` (never outside it)."""
    from medscale.formats.manifest import check_entries

    marker = json.loads(path.read_text())
    shards = marker.get("shards") if isinstance(marker, dict) else None
    if marker.get("index") != index or not isinstance(shards, list):
        raise InputError(f"{path} is not the marker of chunk {index}; prep again with --overwrite")
    for s in shards:
        if not isinstance(s, dict):
            raise InputError(f"{path}: a shard entry is not an object: {s!r}")
        check_entries(s, str(path))
        why = unsafe_split_name(s.get("split"))
        if why is not None:
            raise InputError(f"{path}: split {s.get('split')!r} is refused: {why}")
    return marker


def _keys_in_several_chunks(out: Path, results: list[dict[str, Any]]) -> int:
    """How many sample keys occur in the shards of more than one chunk (from the shard indexes)."""
    from medscale.formats.tar import decode_index

    first: dict[str, int] = {}
    repeated = set()
    for r in results:  # one chunk marker each: its index and the shards it wrote
        for s in r["shards"]:
            idx = decode_index((out / s["index"]).read_bytes(), s["index"])
            for key, _ in idx.samples:
                if first.setdefault(key, r["index"]) != r["index"]:
                    repeated.add(key)
    return len(repeated)
