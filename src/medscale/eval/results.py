"""Evaluation results on disk: ``RUN/eval*.json`` and the sample images beside it, for every objective.

A result is a JSON-able dict; its ``samples`` (images as the model saw them, with a label, a
prediction and a number) go to ``<stem>_samples.npz`` instead: images have no place in a JSON
file. Neither holds a sample key or a patient id.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from medscale.errors import InputError
from medscale.files import atomic_write

__all__ = ["display_image", "samples_path", "save_result", "load_result"]


def display_image(x: Any) -> np.ndarray:
    """A model input (C, H, W) as a displayable uint8 image, min-max scaled: (H, W), or (H, W, 3) for C == 3.

    Other channel counts (stacked CT windows) show their first channel: two or four windows have no
    colour meaning.
    """
    a = x.detach().float().cpu().numpy()
    a = a.transpose(1, 2, 0) if a.shape[0] == 3 else a[0]
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
    return np.round(scaled).astype(np.uint8)


def samples_path(path: Path) -> Path:
    """Where `save_result` puts the sample images of the result saved at `path`: ``<stem>_samples.npz``."""
    return Path(path).with_name(f"{Path(path).stem}_samples.npz")


def save_result(result: dict[str, Any], path: Path) -> Path:
    """Write an evaluation result as JSON (atomically: a reader never sees half a file).

    The ``samples`` (images) go to `samples_path` instead, as arrays ``images`` (N, H, W[, 3]) uint8,
    ``labels``, ``preds`` (str) and ``probs`` (float32).
    """
    path = Path(path)
    samples = result.get("samples")
    atomic_write(path, json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if samples is not None:
        buf = io.BytesIO()
        images = np.stack([s["image"] for s in samples]) if samples else np.zeros((0, 0, 0), np.uint8)
        np.savez_compressed(buf, images=images,
                            labels=np.array([s["label"] for s in samples], dtype=str),
                            preds=np.array([s["pred"] for s in samples], dtype=str),
                            probs=np.array([s["prob"] for s in samples], dtype=np.float32))
        atomic_write(samples_path(path), buf.getvalue())
    return path


def load_result(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """A saved result and its sample images (None when there are none).

    Raises:
        InputError: the JSON cannot be read.
    """
    try:
        result = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e}); rerun `medscale eval` to rewrite it") from e
    npz = samples_path(path)
    if not npz.is_file():
        return result, None
    with np.load(npz, allow_pickle=False) as data:  # no pickles: a report must not run a file's code
        return result, {k: data[k] for k in data.files}
