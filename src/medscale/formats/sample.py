"""One shard sample: its tar members, the metadata prep writes, and its optional label.

Members, stored as ``<key>.<extension>`` (`medscale.formats.tar`):

- ``json``: UTF-8 JSON metadata, keys sorted (below);
- ``pix.<codec>``: the pixels, one of ``pix.zst``, ``pix.lz4``, ``pix.zlib``, ``pix.png``
  (`medscale.formats.codec`).

The key is a keyed pseudonym (hex, with ``_fNNNNN`` for a frame of a multi-frame DICOM) and never
holds a dot: webdataset takes everything before the first dot of a member name as the key.

Metadata keys prep writes (`METADATA_KEYS`):

- always: ``source`` ("dicom" or "photo"), ``patient`` (pseudonym), ``split``, ``pixels`` (what
  `encode_pixels` returned: dtype, shape, encoding, offset), ``photometric`` ("MONOCHROME2" or
  "RGB"; never MONOCHROME1, which prep inverts), ``lossless``, ``meta`` (the allowlisted header,
  `medscale.prep.deid.safe_metadata`, or the photo's format facts);
- DICOM: ``study``, ``series`` (pseudonyms or null), ``frame``, ``windows`` ([center, width]
  pairs), ``voi_applied``, ``inverted``, ``bits_stored``;
- photo: ``patient_from`` ("csv" or "image");
- DICOM with ``burned_in: redact``, OPTIONAL: ``redacted`` (true: text areas of the pixels were
  blanked and OCR read nothing in the rest) and ``redacted_boxes`` (how many boxes were blanked);
- the label, OPTIONAL: ``label`` (multiclass: index into the manifest's ``classes``) or
  ``labels`` (multilabel: one 0/1 per class). Prep writes neither when it runs without a labels
  CSV or ``label_from_dir``; the manifest then says task ``unlabeled``. Readers that do not need
  labels never look at them; readers that do must treat a labeled split's sample without one as
  corrupt.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from medscale.formats.codec import decode_pixels

__all__ = ["JSON_MEMBER", "PIXEL_PREFIX", "LABEL_KEY", "LABELS_KEY", "METADATA_KEYS", "TASKS", "UNLABELED",
           "label_field", "encode_sample", "pixel_member", "stored_label", "check_label", "decode_members"]

JSON_MEMBER = "json"
PIXEL_PREFIX = "pix."
LABEL_KEY = "label"
"""Multiclass label: a class index."""
LABELS_KEY = "labels"
"""Multilabel label: a 0/1 list over the manifest's classes."""
UNLABELED = "unlabeled"
TASKS = ("multiclass", "multilabel", UNLABELED)
"""What a manifest's ``task`` may say."""
METADATA_KEYS = ("source", "patient", "study", "series", "split", "pixels", "photometric", "lossless", "meta",
                 "frame", "windows", "voi_applied", "inverted", "bits_stored", "patient_from", "redacted",
                 "redacted_boxes", LABEL_KEY, LABELS_KEY)
"""Every JSON key prep writes (see the module docstring for which and when)."""


def label_field(task: str) -> str | None:
    """The JSON key holding a sample's label for ``task`` (None for unlabeled data)."""
    if task == UNLABELED:
        return None
    return LABELS_KEY if task == "multilabel" else LABEL_KEY


def encode_sample(info: dict[str, Any], pixel_extension: str, pixels: bytes, *, task: str,
                  label: Any = None) -> dict[str, bytes]:
    """The members of one sample: ``{"json": metadata, pixel_extension: pixels}``.

    ``label`` (None: unlabeled) is stored under `label_field` of ``task``; ``info`` gains it.
    """
    field = label_field(task)
    if label is not None:
        if field is None:
            raise ValueError(f"a sample of task {task!r} cannot carry a label")
        info[field] = label
    return {JSON_MEMBER: json.dumps(info, sort_keys=True).encode(), pixel_extension: pixels}


def pixel_member(raw: Mapping[str, Any]) -> str | None:
    """The extension of a sample's pixel member (``pix.zst``...), or None."""
    return next((k for k in raw if k.startswith(PIXEL_PREFIX)), None)


def stored_label(info: Mapping[str, Any]) -> Any:
    """The label as stored (class index or 0/1 list), without checks; None if the sample has none."""
    return info.get(LABEL_KEY, info.get(LABELS_KEY))


def check_label(value: Any, task: str, num_classes: int, key: str = "?") -> Any:
    """A stored label as a training target: the class index, or the 0/1 list as floats.

    Raises:
        ValueError: the value does not fit the task or the number of classes.
    """
    if task == "multilabel":
        if not isinstance(value, list) or (num_classes and len(value) != num_classes):
            raise ValueError(f"sample {key}: {LABELS_KEY!r} is {value!r}, expected {num_classes} 0/1 values")
        return [float(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (num_classes and value >= num_classes):
        raise ValueError(f"sample {key}: {LABEL_KEY!r} is {value!r}, expected a class index below {num_classes}")
    return value


def decode_members(raw: Mapping[str, Any], task: str, num_classes: int, *,
                   labels: bool = True) -> tuple[np.ndarray, dict[str, Any], Any]:
    """Raw members (``json`` and ``pix.*`` bytes) to (pixels, metadata, label).

    The label is optional: it is None when ``labels`` is False (not even parsed), when the task
    is unlabeled, or when the sample carries none; deciding whether a missing label is an error
    is the caller's business.

    Raises:
        ValueError: (or a decoder error) a member is missing or does not decode, or a label is
            present but malformed.
    """
    key = raw.get("__key__", "?")
    if JSON_MEMBER not in raw:
        raise ValueError(f"sample {key} has no .{JSON_MEMBER} member")
    info = json.loads(raw[JSON_MEMBER])
    ext = pixel_member(raw)
    if ext is None:
        raise ValueError(f"sample {key} has no pixel member (.pix.zst, .pix.lz4, .pix.zlib or .pix.png)")
    pixels = decode_pixels(raw[ext], ext, info.get("pixels"))
    field = label_field(task) if labels else None
    label = None
    if field is not None and info.get(field) is not None:
        label = check_label(info[field], task, num_classes, key)
    return pixels, info, label
