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
    """Samples, patients, shards, bytes and labels per split, then reject reasons.

    A count a manifest lacks (a merge of prep outputs that did not all record it) shows as "-".
    """
    splits = manifest["splits"]
    samples = manifest.get("samples", sum(s["samples"] for s in manifest["shards"]))
    patients = [d.get("patients") for d in splits.values()]
    rows = [[name, d["samples"], "-" if d.get("patients") is None else d["patients"],
             d.get("shards", sum(s["split"] == name for s in manifest["shards"])),
             _mb(d.get("bytes") or 0), ", ".join(f"{k}={v}" for k, v in (d.get("label_counts") or {}).items()) or "-"]
            for name, d in splits.items()]
    rows.append(["total", samples, "-" if None in patients else sum(patients),
                 len(manifest["shards"]), _mb(sum(s.get("bytes") or 0 for s in manifest["shards"])), ""])
    print(tabulate(rows, headers=["split", "samples", "patients", "shards", "size", "labels"]))
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    print(f"\n{manifest.get('inputs', '-')} inputs{took}: {samples} samples written, "
          f"{manifest.get('rejected', '-')} inputs rejected or quarantined (see rejects.jsonl)")
    if manifest.get("lossy_samples"):
        print(f"note: {manifest['lossy_samples']} samples had a non-integer rescale and are stored as float32 "
              "modality values (exact to float32 precision, not bit-exact integers)")
    for warning in manifest.get("warnings", []):
        print(f"warning: {warning}")
    if manifest.get("reject_reasons"):
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
    """Print the manifest summary; optionally verify checksums and dump previews. Returns an exit code.

    Shards are found by their ``url`` (`medscale.formats.manifest.load_manifest`: below the
    manifest's location, whatever ``root`` is: a directory, the manifest file or a pattern).
    """
    from medscale.formats.manifest import is_local, load_manifest, local_path, open_url

    manifest = load_manifest(root)
    print_manifest_summary(manifest)
    status = 0
    if verify:
        bad = []
        for s in manifest["shards"]:
            if is_local(s["url"]) and not Path(local_path(s["url"])).exists():
                bad.append((s["path"], "missing"))
                continue
            h = hashlib.sha256()
            try:
                with open_url(s["url"]) as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            except OSError as e:
                bad.append((s["path"], f"unreadable: {e}"))
                continue
            if h.hexdigest() != s["sha256"]:
                bad.append((s["path"], "sha256 mismatch"))
        print(f"\nverified {len(manifest['shards'])} shards: {len(bad)} bad")
        for name, why in bad:
            print(f"  {name}: {why}")
        status = 1 if bad else 0
    if dump:
        _dump(manifest, dump, Path(dump_dir))
    return status


def _dump(manifest: dict[str, Any], n: int, out: Path) -> None:
    """The first `n` samples, in manifest order, as 8-bit PNGs named by their sample keys."""
    from PIL import Image

    from medscale.data.reader import ShardReader
    from medscale.errors import InputError
    from medscale.files import unsafe_relative_name
    from medscale.formats.codec import decode_pixels

    shards = manifest["shards"]
    wanted = []  # (shard, index) of the first n samples
    for j, s in enumerate(shards):
        wanted += [(j, i) for i in range(min(int(s["samples"]), n - len(wanted)))]
    reader = ShardReader([s["url"] for s in shards], [int(s["samples"]) for s in shards],
                         indexes=[s.get("index_url") for s in shards])
    reader.expect(wanted)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for j, i in wanted:
        raw = reader.get(j, i)
        if raw is None or "json" not in raw:
            print(f"  {shards[j]['path']} sample {i}: unreadable, skipped")
            continue
        key = raw["__key__"]
        # The key comes from a tar member's name, which is data: it names a file here only when it
        # is a plain name (a member such as ../../x.json must not write outside --dump-dir).
        if unsafe_relative_name(key) is not None or "/" in key:
            reader.close()
            raise InputError(f"{shards[j]['path']}: sample key {key!r} is not a plain file name "
                             f"({unsafe_relative_name(key) or 'it has a /'}); not written to {out}")
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
        Image.fromarray(img).save(out / f"{key}.png")
        written += 1
    reader.close()
    print(f"wrote {written} previews to {out}")
