"""One input to samples: a DICOM file or a photo becomes de-identified samples with their label.

`Context` is what a worker process builds once (pseudonymizer, labels, stratified splits, redactor)
and uses for every input of its chunks.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from medscale.formats.codec import encode_pixels, extension_for
from medscale.formats.sample import UNLABELED
from medscale.prep.config import PrepConfig
from medscale.prep.deid import Pseudonymizer, burned_in_text_reason, safe_metadata
from medscale.prep.dicom import decode_dicom, read_dicom
from medscale.prep.discover import Source
from medscale.prep.errors import RejectedInput
from medscale.prep.job import PrepJob
from medscale.prep.labels import LabelTable
from medscale.prep.photos import load_photo
from medscale.prep.redact import Redactor

__all__ = ["Context", "labels_kind", "dicom_samples", "photo_samples", "encode", "label_counts"]


class Context:
    """Per-process state: built once per worker, not once per file."""

    def __init__(self, job: PrepJob, labels: LabelTable | None, splits: dict[str, str] | None):
        self.job = job
        self.cfg = job.cfg
        self.pseudo = Pseudonymizer(job.key)
        self.labels = labels
        self.task = labels_kind(job.cfg, labels)
        self.splits = splits or {}  # stratified: patient pseudonym -> split; others use the hash split
        self.ext = extension_for(job.cfg.encoding)
        # Rules parsed and Tesseract checked once per worker; run_prep's require_ocr has already
        # refused a config that cannot run here, before any worker started.
        needs_ocr = job.cfg.burned_in == "redact" or job.cfg.photos_ocr
        self.redactor = Redactor(job.cfg) if needs_ocr else None
        self.dropped: Counter = Counter()  # safe_metadata counts CS values that are not defined terms here


def labels_kind(cfg: PrepConfig, labels: LabelTable | None) -> str:
    """What the samples' labels are: the CSV's task, multiclass for folder classes, else unlabeled."""
    if labels is not None:
        return labels.task
    return "multiclass" if cfg.label_from_dir else UNLABELED


def _label_for(ctx: Context, keys: dict[str, str]) -> Any:
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


def dicom_samples(ctx: Context, src: Source) -> list[tuple[str, dict[str, Any], np.ndarray]]:
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
        assert ctx.redactor is not None  # Context builds one whenever burned_in is redact
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


def photo_samples(ctx: Context, src: Source) -> list[tuple[str, dict[str, Any], np.ndarray]]:
    pixels, meta = load_photo(src.path, max_pixels=ctx.cfg.max_pixels)
    keys = {"path": src.rel, "filename": Path(src.rel).name, "stem": Path(src.rel).stem}
    target = _label_for(ctx, keys)  # first: an unlabeled photo is rejected without paying for OCR
    if ctx.cfg.photos_ocr:
        assert ctx.redactor is not None  # Context builds one whenever photos_ocr is set
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


_CTX: Context | None = None
_PROGRESS: Any = None


def encode(ctx: Context, pixels: np.ndarray) -> tuple[bytes, dict[str, Any]]:
    try:
        return encode_pixels(pixels, ctx.cfg.encoding, ctx.cfg.compression_level)
    except ValueError as e:  # e.g. float32 pixels (non-integer rescale) with encoding=png
        raise RejectedInput("unsupported", str(e)) from None


def label_counts(ctx: Context, target: Any) -> dict[str, int]:
    if target is None:
        return {}
    if ctx.cfg.label_from_dir:
        return {ctx.cfg.classes[target]: 1}
    assert ctx.labels is not None
    return ctx.labels.counts(target)
