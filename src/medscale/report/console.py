"""Human-facing summaries: manifest tables, evaluation tables, `medscale inspect`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

__all__ = ["print_manifest_summary", "print_eval", "inspect_shards"]


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def print_manifest_summary(manifest: dict[str, Any], seconds: float | None = None) -> None:
    """Samples, patients, shards, bytes and labels per split, then reject reasons."""
    rows = [[name, d["samples"], d["patients"], d["shards"], _mb(d["bytes"]),
             ", ".join(f"{k}={v}" for k, v in d["label_counts"].items()) or "-"]
            for name, d in manifest["splits"].items()]
    rows.append(["total", manifest["samples"], sum(d["patients"] for d in manifest["splits"].values()),
                 len(manifest["shards"]), _mb(sum(s["bytes"] for s in manifest["shards"])), ""])
    print(tabulate(rows, headers=["split", "samples", "patients", "shards", "size", "labels"]))
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    print(f"\n{manifest['inputs']} inputs{took}: {manifest['samples']} samples written, "
          f"{manifest['rejected']} inputs rejected or quarantined (see rejects.jsonl)")
    if manifest.get("lossy_samples"):
        print(f"note: {manifest['lossy_samples']} samples had a non-integer rescale and are stored as float32 "
              "modality values (exact to float32 precision, not bit-exact integers)")
    for warning in manifest.get("warnings", []):
        print(f"warning: {warning}")
    if manifest["reject_reasons"]:
        print(tabulate(sorted(manifest["reject_reasons"].items()), headers=["reason", "inputs"]))


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def print_eval(result: dict[str, Any], title: str = "") -> None:
    """Headline metrics with bootstrap CIs, then per-class AUROC/AUPRC."""
    ci = result.get("ci95", {})
    rows = []
    for k in ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "ece", "loss"):  # loss: an MAE run
        if k in result:
            lo_hi = ci.get(k)
            rows.append([k, _fmt(result[k]), f"[{_fmt(lo_hi[0])}, {_fmt(lo_hi[1])}]" if lo_hi else ""])
    rows.append(["samples / patients", f"{result['n_samples']} / {result.get('n_patients', '-')}", ""])
    if title:
        print(f"\nEvaluation: {title}")
    print(tabulate(rows, headers=["metric", "value", "95% CI"]))
    per = result.get("per_class") or {}
    if len(per) > 1:
        print(tabulate([[n, _fmt(d.get("auroc")), _fmt(d.get("auprc")), d.get("n_pos")] for n, d in per.items()],
                       headers=["class", "auroc", "auprc", "positives"]))


def inspect_shards(root: str, *, verify: bool = False, dump: int = 0, dump_dir: str = "inspect_png") -> int:
    """Print the manifest summary; optionally verify checksums and dump previews. Returns an exit code."""
    from medscale.formats.manifest import load_manifest

    manifest = load_manifest(root)
    print_manifest_summary(manifest)
    status = 0
    if verify:
        bad = []
        for s in manifest["shards"]:
            path = Path(root) / s["path"]
            if not path.exists():
                bad.append((s["path"], "missing"))
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if h.hexdigest() != s["sha256"]:
                bad.append((s["path"], "sha256 mismatch"))
        print(f"\nverified {len(manifest['shards'])} shards: {len(bad)} bad")
        for name, why in bad:
            print(f"  {name}: {why}")
        status = 1 if bad else 0
    if dump:
        _dump(manifest, root, dump, Path(dump_dir))
    return status


def _dump(manifest: dict[str, Any], root: str, n: int, out: Path) -> None:
    from PIL import Image
    from webdataset import tariterators

    from medscale.formats.codec import decode_pixels

    out.mkdir(parents=True, exist_ok=True)
    urls = [{"url": str(Path(root) / s["path"])} for s in manifest["shards"]]
    for i, raw in enumerate(tariterators.tarfile_samples(urls)):
        if i >= n:
            break
        info = json.loads(raw["json"])
        ext = next(k for k in raw if k.startswith("pix."))
        px = decode_pixels(raw[ext], ext, info.get("pixels")).astype(np.float32)
        if px.ndim == 3 and px.shape[-1] not in (3, 4):
            px = px[px.shape[0] // 2]  # middle frame of a volume
        if info.get("windows") and px.ndim == 2:
            c, w = info["windows"][0]
            lo, hi = c - w / 2, c + w / 2
        else:
            lo, hi = float(px.min()), float(px.max())
        img = np.clip((px - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(out / f"{raw['__key__']}.png")
    print(f"wrote {min(n, i + 1) if manifest['shards'] else 0} previews to {out}")
