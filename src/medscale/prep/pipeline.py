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

The pieces, each in its own module: the inputs (`discover`), one input to samples (`convert`),
copies of one DICOM instance (`instances`), a worker's chunk (`chunks`) and its marker
(`markers`), the plan and the output directory (`plan`), the merge (`merge`); this module checks a
job and drives the chunks through worker processes. What the files hold (tar layout, index, sample
members and metadata, manifest schema) is defined in `medscale.formats`. Without a labels CSV (and without
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

import json
import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from typing import Any

from medscale.errors import ConfigError, InputNotFound
from medscale.files import atomic_write
from medscale.logs import on_terminal
from medscale.prep.chunks import init_worker, process_chunk
from medscale.prep.deid import Pseudonymizer
from medscale.prep.discover import Source, discover_inputs
from medscale.prep.job import PrepIncomplete, PrepJob
from medscale.prep.labels import LabelTable, load_labels
from medscale.prep.markers import marker_path
from medscale.prep.merge import merge
from medscale.prep.plan import PLAN_FILE, build_plan, check_plan
from medscale.prep.ocr import require_ocr
from medscale.prep.splits import stratified_splits

__all__ = ["PrepInputs", "check_prep", "run_prep"]

log = logging.getLogger("medscale.prep")

# Without a progress bar (batch jobs, logs), a progress line at most this often.
_LOG_EVERY_S = 30.0
# How often the driver wakes to update progress while worker processes run.
_POLL_S = 0.5


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


@dataclass
class PrepInputs:
    """What `check_prep` read and checked before anything is written: the labels, the stratified
    assignment and the sorted inputs."""

    labels: LabelTable | None
    splits: dict[str, str] | None
    sources: list[Source]


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
    plan = build_plan(job, sources, labels)
    plan_path = job.out / PLAN_FILE
    check_plan(plan_path, plan)
    (job.out / "chunks").mkdir(parents=True, exist_ok=True)
    (job.logs / "rejects").mkdir(parents=True, exist_ok=True)
    if not plan_path.exists():
        atomic_write(plan_path, json.dumps(plan, indent=1))

    chunks = [
        (i, sources[i * job.chunk_files : (i + 1) * job.chunk_files])
        for i in range(plan["chunks"])
        if i % job.num_tasks == job.task_index and not marker_path(job.out, i).exists()
    ]
    todo_inputs = sum(len(c[1]) for c in chunks)
    log.info("prep: %d inputs, %d chunks for this task (%d already done)", len(sources), len(chunks),
             len([i for i in range(plan["chunks"]) if i % job.num_tasks == job.task_index]) - len(chunks))
    _run_chunks(job, labels, splits, chunks, todo_inputs, progress if progress is not None else on_terminal())
    if job.num_tasks == 1:
        return merge(job.out, log_dir=job.logs)
    return None


def _run_chunks(job: PrepJob, labels: LabelTable | None, splits: dict[str, str] | None,
                chunks: list[tuple[int, list[Source]]], total: int, bar: bool) -> None:
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
        init_worker(job, labels, splits, counter)
        for c in chunks:
            process_chunk(c)
            report()
    else:
        from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        # fork keeps start-up cheap: workers inherit the parsed labels instead of re-reading the CSV.
        # An executor rather than mp.Pool: a worker killed inside a C decoder (a codec that aborts
        # on a corrupt stream, the OOM killer) breaks the executor instead of hanging the run.
        with ProcessPoolExecutor(job.workers, mp_context=mp.get_context("fork"), initializer=init_worker,
                                 initargs=(job, labels, splits, counter, os.getpid())) as pool:
            futures = [pool.submit(process_chunk, c) for c in chunks]
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
