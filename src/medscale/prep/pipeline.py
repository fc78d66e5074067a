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
- ``merge`` reads the markers and writes ``manifest.json``, ``rejects.jsonl`` and one
  wids index per split.

What the files hold (tar layout, index, sample members and metadata, manifest schema) is defined
in `medscale.formats`; this module decides what goes in them. Without a labels CSV (and without
``label_from_dir``) the samples carry no label and the manifest says task ``unlabeled``.

Privacy: only what `deid.safe_metadata` allowlists reaches a shard; sample keys are keyed
pseudonyms; source paths appear only in ``rejects.jsonl``, an operator log kept beside the shards
so rejected files can be found (do not publish it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
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
from medscale.formats.manifest import build_manifest, write_manifest
from medscale.formats.sample import UNLABELED, encode_sample
from medscale.formats.tar import ShardSequence
from medscale.prep.config import PrepConfig
from medscale.prep.deid import Pseudonymizer, burned_in_text_reason, safe_metadata
from medscale.prep.dicom import decode_dicom, read_dicom
from medscale.prep.errors import RejectedInput
from medscale.prep.labels import LabelTable, load_labels
from medscale.prep.photos import load_photo
from medscale.prep.splits import patient_split, stratified_splits

__all__ = ["PrepJob", "PrepIncomplete", "run_prep", "merge", "discover_inputs", "prepare_output", "PHOTO_SUFFIXES"]

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


@dataclass
class _Source:
    path: str  # absolute path, for reading
    rel: str  # path relative to its input root, for label lookup


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
    return sorted(found.values(), key=lambda s: s.path)


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
    if ctx.cfg.quarantine_burned_in:
        why = burned_in_text_reason(ds)
        if why:
            raise RejectedInput("quarantined", why)
    meta = safe_metadata(ds, ctx.pseudo)
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
        out.append((key, info, img.pixels))
    return out


def _photo_samples(ctx: _Context, src: _Source) -> list[tuple[str, dict[str, Any], np.ndarray]]:
    pixels, meta = load_photo(src.path, max_pixels=ctx.cfg.max_pixels)
    keys = {"path": src.rel, "filename": Path(src.rel).name, "stem": Path(src.rel).stem}
    target = _label_for(ctx, keys)
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


def _init_worker(job: PrepJob, labels: LabelTable | None, splits: dict[str, str] | None, progress: Any) -> None:
    global _CTX, _PROGRESS
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
    for src in sources:
        samples, encoded = [], []
        try:
            is_photo = Path(src.path).suffix.lower() in PHOTO_SUFFIXES
            samples = _photo_samples(ctx, src) if is_photo else _dicom_samples(ctx, src)
            if not samples:
                raise RejectedInput("empty", "decoded to no images")
            encoded = [_encode(ctx, px) for _, _, px in samples]
        except RejectedInput as r:
            result.rejects.append({"path": src.path, "reason": r.reason, "detail": r.detail})
            samples = []
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - one bad file must not end a million-file run; it is reported
            result.rejects.append({"path": src.path, "reason": "error", "detail": f"{type(e).__name__}: {e}"})
            samples = []
        result.accepted += bool(samples)
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
            sequences[split].add(key, members, target, _label_counts(ctx, target))
            patients.setdefault(split, Counter())[patient] += 1
            result.samples += 1
            result.lossy += not info.get("lossless", True)
        if _PROGRESS is not None:
            with _PROGRESS.get_lock():
                _PROGRESS.value += 1
    for split in sorted(sequences):
        result.shards.extend(sequences[split].close())
    result.patients = {s: dict(sorted(c.items())) for s, c in sorted(patients.items())}
    result.seconds = time.perf_counter() - t0
    # The marker is written last: its presence means the chunk is complete.
    atomic_write(out / "chunks" / f"{index:06d}.json", json.dumps(result.__dict__))
    return result


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
    h = hashlib.sha256()
    for s in sources:
        h.update(s.path.encode() + b"\0")
    return {
        "inputs": len(sources),
        "inputs_sha256": h.hexdigest(),
        "chunk_files": job.chunk_files,
        "chunks": (len(sources) + job.chunk_files - 1) // job.chunk_files,
        "config": to_dict(job.cfg),
        "labels_csv": job.labels_csv,
        "task": _task(job.cfg, labels),
        "classes": labels.classes if labels else list(job.cfg.classes) if job.cfg.label_from_dir else [],
        "key_fingerprint": Pseudonymizer(job.key)("fingerprint", "medscale"),
    }


def prepare_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless resuming or overwriting."""
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise ConfigError(
                f"output directory {out} is not empty; pass --resume to continue an interrupted prep "
                "or --overwrite to start again"
            )
    (out / "chunks").mkdir(parents=True, exist_ok=True)


def run_prep(job: PrepJob, *, progress: bool | None = None) -> dict[str, Any] | None:
    """Run this task's share of the chunks; merge and return the manifest when it is the only task."""
    # Read the CSV here first: a bad CSV fails before any worker starts.
    labels = load_labels(job.cfg, job.labels_csv) if job.labels_csv else None
    splits = _stratified_splits(job, labels)
    sources = discover_inputs(job.inputs, job.cfg.include)
    if not sources:
        raise InputNotFound(f"no input files found under {job.inputs} with patterns {job.cfg.include}")
    plan = _plan(job, sources, labels)
    plan_path = job.out / "plan.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        for k in ("inputs_sha256", "chunk_files", "config", "key_fingerprint"):
            if old.get(k) != plan.get(k):
                raise ConfigError(
                    f"{plan_path} was written for different {k.replace('_', ' ')}; resume only with the same "
                    "inputs, recipe, chunk size and key, or use --overwrite"
                )
    else:
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
        return merge(job.out)
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
        # fork keeps start-up cheap: workers inherit the parsed labels instead of re-reading the CSV.
        with mp.get_context("fork").Pool(job.workers, initializer=_init_worker,
                                         initargs=(job, labels, splits, counter)) as pool:
            pending = pool.map_async(_process_chunk, chunks, chunksize=1)
            while not pending.ready():
                pending.wait(_POLL_S)
                report()
            pending.get()  # re-raises a worker's exception here
    report()
    pbar.close()


def merge(out: Path) -> dict[str, Any]:
    """Build manifest.json, rejects.jsonl and the wids indexes from the chunk markers."""
    out = Path(out)
    plan = json.loads((out / "plan.json").read_text())
    results = []
    missing = []
    for i in range(plan["chunks"]):
        marker = out / "chunks" / f"{i:06d}.json"
        if marker.exists():
            results.append(json.loads(marker.read_text()))
        else:
            missing.append(i)
    if missing:
        raise PrepIncomplete(
            f"cannot merge {out}: {len(missing)} of {plan['chunks']} chunks are not finished "
            f"(first: {missing[:5]}); rerun the prep tasks with --resume"
        )
    shards = sorted((s for r in results for s in r["shards"]), key=lambda s: s["path"])
    rejects = sorted((x for r in results for x in r["rejects"]), key=lambda x: x["path"])
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
        },
    )
    write_manifest(out, manifest)
    atomic_write(out / "rejects.jsonl", "".join(json.dumps(x) + "\n" for x in rejects))
    return manifest
