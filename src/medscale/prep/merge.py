"""`medscale prep --merge`: the chunk markers to ``manifest.json``, the wids indexes and the reject log.

Patients are checked to sit in one split across all chunks (a leaky manifest is refused), and the
manifest carries the corpus's warnings: a placeholder PatientID that merges many people, patients
the stratified split did not know, instances exported twice.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from medscale.errors import InputError, RunStateError
from medscale.files import atomic_write
from medscale.formats.codec import extension_for
from medscale.formats.manifest import build_manifest, write_manifest
from medscale.formats.tar import decode_index
from medscale.prep.job import PrepIncomplete, default_log_dir
from medscale.prep.markers import ChunkMarker, marker_path, read_marker
from medscale.prep.plan import PLAN_FILE

__all__ = ["merge", "keys_in_several_chunks"]

log = logging.getLogger("medscale.prep")

# Warn when one patient holds more than this share of a corpus of at least this many samples.
PLACEHOLDER_SHARE, PLACEHOLDER_MIN_SAMPLES = 0.2, 50


def merge(out: Path, log_dir: Path | None = None) -> dict[str, Any]:
    """Build manifest.json and the wids indexes from the chunk markers, and LOG_DIR/rejects.jsonl."""
    out = Path(out)
    logs = Path(log_dir) if log_dir is not None else default_log_dir(out)
    plan = json.loads((out / PLAN_FILE).read_text())
    if not isinstance(plan.get("chunks"), int) or isinstance(plan["chunks"], bool) or plan["chunks"] < 0:
        raise InputError(f"{out / PLAN_FILE}: 'chunks' is {plan.get('chunks')!r}, not a count; prep again with --overwrite")
    results: list[ChunkMarker] = []
    missing = []
    for i in range(plan["chunks"]):
        if marker_path(out, i).exists():
            results.append(read_marker(out, i))
        else:
            missing.append(i)
    if missing:
        raise PrepIncomplete(
            f"cannot merge {out}: {len(missing)} of {plan['chunks']} chunks are not finished "
            f"(first: {missing[:5]}); rerun the prep tasks with --resume"
        )
    shards = sorted((s for r in results for s in r.shards), key=lambda s: s["path"])
    rejects = sorted((x for r in results for x in r.rejects), key=lambda x: x["input"])
    reject_log, unlogged = [], []
    for i in range(plan["chunks"]):
        part = logs / "rejects" / f"{i:06d}.jsonl"
        if part.exists():
            reject_log.extend(json.loads(line) for line in part.read_text().splitlines() if line)
        elif results[i].rejects:
            unlogged.append(i)
    split_patients: dict[str, set[str]] = {}
    per_patient: Counter = Counter()
    for r in results:
        for split, counts in r.patients.items():
            split_patients.setdefault(split, set()).update(counts)
            per_patient.update(counts)
    seen: dict[str, str] = {}
    for split, ps in split_patients.items():
        for p in ps:
            if p in seen and seen[p] != split:
                raise RunStateError(f"patient {p} appears in splits {seen[p]} and {split}: refusing to write a leaky "
                                    f"manifest; the chunks in {out} come from different preps: prep again with --overwrite")
            seen[p] = split
    repeated = keys_in_several_chunks(out, results)
    largest = max(per_patient.values(), default=0)
    total = sum(s["samples"] for s in shards)
    warnings = []
    if total >= PLACEHOLDER_MIN_SAMPLES and largest > PLACEHOLDER_SHARE * total:
        warnings.append(f"one patient holds {largest} of {total} samples ({100 * largest / total:.0f}%): a "
                        "placeholder PatientID (ANONYMOUS, 0, ...) merges many people into one patient, who "
                        "then lands in a single split; check the corpus's PatientIDs")
    stratified = sum(r.stratified for r in results)
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
            "accepted_inputs": sum(r.accepted for r in results),
            # The most samples any one (pseudonymized) patient has: a placeholder PatientID shows here.
            "largest_patient_samples": largest,
            "warnings": warnings,
            "stratified_samples": stratified if cfg.get("stratify") else None,
            # Samples whose values are float32 after a non-integer rescale (not bit-exact integers).
            "lossy_samples": sum(r.lossy for r in results),
            "rejected": len(rejects),
            "reject_reasons": dict(sorted(Counter(x["reason"] for x in rejects).items())),
            "keys_in_several_chunks": repeated,
            # burned_in: redact; images that still showed text are in reject_reasons as "quarantined".
            "redacted_samples": sum(r.redacted for r in results),
            # Coded strings that were not DICOM defined terms (a surname in BodyPartExamined): left out.
            "dropped_codes": dict(sorted(sum((Counter(r.dropped_codes) for r in results), Counter()).items())),
        },
    )
    write_manifest(out, manifest)
    reject_log.sort(key=lambda x: x["input"])
    atomic_write(logs / "rejects.jsonl", "".join(json.dumps(x) + "\n" for x in reject_log))
    return manifest


def keys_in_several_chunks(out: Path, results: list[ChunkMarker]) -> int:
    """How many sample keys occur in the shards of more than one chunk (from the shard indexes)."""
    first: dict[str, int] = {}
    repeated = set()
    for r in results:  # one chunk marker each: its index and the shards it wrote
        for s in r.shards:
            idx = decode_index((out / s["index"]).read_bytes(), s["index"])
            for key, _ in idx.samples:
                if first.setdefault(key, r.index) != r.index:
                    repeated.add(key)
    return len(repeated)
