"""``manifest.json``: what a prep output holds; schema, version check, read, write and merge.

Schema (version 2; written by `build_manifest`, once per prep output)::

    version             MANIFEST_VERSION (absent: 1)
    task                "multiclass", "multilabel" or "unlabeled" (prep ran without labels)
    classes             class names in index order ([] when unlabeled)
    encoding            pixel encoding; pixel_extension its member extension (pix.zst...)
    samples, inputs, accepted_inputs, rejected, reject_reasons, lossy_samples,
    largest_patient_samples, stratified_samples, warnings, key_fingerprint, config
    splits              {split: {shards, samples, bytes, patients, label_counts}}
    shards              [{path, split, samples, bytes, sha256, label_counts, index}], sorted by path;
                        ``index`` names the shard's member-offset index (`medscale.formats.tar`)

Version 2 added ``task: "unlabeled"`` and the per-shard ``index``; a version 1 manifest reads as
before, and one that says multiclass with no classes and no label counts counts as unlabeled
(`has_labels`). A manifest newer than `MANIFEST_VERSION` is refused with a message naming both.

``data.shards`` names where ``manifest.json`` lives:

- a directory written by `medscale prep`, or the manifest file itself;
- a brace or glob pattern over several prep outputs (``/data/ct-{000..003}``, ``/data/ct-*``),
  whose manifests are merged (same task and classes required; per split the shards, samples,
  bytes, patients and label counts are summed);
- a URL prefix opened with webdataset's ``gopen``: ``http(s)://host/prep``, ``s3://bucket/prep``
  (through ``aws s3 cp``), ``gs://...``, or ``pipe:CMD`` where ``{}`` in CMD is replaced by the
  file name (``pipe:aws s3 cp s3://b/prep/{} -``); without ``{}`` the name is appended after a "/".

A manifest is data: shards are shared between teams and copied from buckets. Its shard and index
entries must be plain relative names below the manifest's own location (`medscale.files.
unsafe_relative_name`): a ``pipe:`` command, a URL, an absolute path or a ``..`` component is refused
(`UnsafeManifestEntry`) before anything is opened. URLs and ``pipe:`` stay allowed where the user
writes them, in ``data.shards``. `load_manifest` adds ``url`` (and ``index_url`` where the shard has
an index) to each shard entry.
"""

from __future__ import annotations

import glob
import os
import importlib
import json
import logging
import shlex
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import braceexpand

from medscale.errors import InputError, InputNotFound
from medscale.files import atomic_write, unsafe_relative_name
from medscale.formats.sample import UNLABELED

_GOPEN: Any = None

__all__ = ["UnsafeManifestEntry", "MANIFEST_VERSION", "load_manifest", "build_manifest", "write_manifest",
           "merge_manifests", "has_labels", "task_of", "check_version", "check_entries", "join_url", "is_local",
           "is_remote", "local_path", "open_url", "gopen_module"]

log = logging.getLogger("medscale.formats")

MANIFEST_VERSION = 2
"""The manifest layout this code writes and the newest it reads."""
MANIFEST_NAME = "manifest.json"
PREP_LOG_SUFFIX = ".logs"
"""Prep's log directory, OUT + this suffix beside OUT (it names source files, so never inside it)."""


class UnsafeManifestEntry(InputError):
    """A manifest entry that names a command, a URL or a path outside the manifest's directory."""


def gopen_module() -> Any:
    """webdataset's ``gopen`` module, with an ``s3://`` opener registered (a user's own registration wins).

    Imported on first use: importing webdataset imports torch (over a second and hundreds of MB),
    which prep and every reader of local manifests do without.
    """
    global _GOPEN
    if _GOPEN is None:
        # webdataset's package namespace exports the gopen *function*; the module holds the scheme table.
        module = importlib.import_module("webdataset.gopen")

        def s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
            """Stream an s3:// object through the AWS CLI (webdataset has no native s3 opener)."""
            return module.gopen_pipe(f"pipe:aws s3 cp {shlex.quote(url)} -", mode, bufsize, **kw)

        module.gopen_schemes.setdefault("s3", s3)
        _GOPEN = module
    return _GOPEN


def is_remote(root: str) -> bool:
    """True for URLs (a scheme of two letters or more: not a Windows drive) and ``pipe:`` commands."""
    scheme = urlparse(root).scheme
    return root.startswith("pipe:") or (len(scheme) > 1 and scheme != "file")


def is_local(url: str) -> bool:
    """True for paths that can be opened and seeked (no scheme, or file://)."""
    return not is_remote(url)


def local_path(url: str) -> str:
    """The file system path of a local url (``file://`` stripped)."""
    return urlparse(url).path if url.startswith("file://") else url


def join_url(root: str, name: str) -> str:
    """The location of ``name`` (a manifest-relative path) under ``root``.

    Raises:
        UnsafeManifestEntry: ``name`` is not a plain relative name (`unsafe_relative_name`): a name
            read from data never becomes a command, a URL or a path outside ``root``.
    """
    why = unsafe_relative_name(name)
    if why is not None:
        raise UnsafeManifestEntry(f"{name!r} under {root!r} is refused: {why}")
    if root.startswith("pipe:") and "{}" in root:
        return root.replace("{}", name)
    if root.endswith("manifest.json"):
        root = root[: -len("manifest.json")]
    return f"{root.rstrip('/')}/{name}" if root else name


def open_url(url: str) -> Any:
    """A binary file object for a local path or any URL webdataset's gopen understands."""
    if is_local(url):
        return open(local_path(url), "rb")
    return gopen_module().gopen(url, "rb")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def check_version(manifest: Mapping[str, Any], source: str) -> int:
    """The manifest's version (absent: 1).

    Raises:
        InputError: a version newer than `MANIFEST_VERSION`, or not a positive integer.
    """
    version = manifest.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InputError(f"{source}: manifest version {version!r} is not a positive integer")
    if version > MANIFEST_VERSION:
        raise InputError(f"{source} is manifest version {version}, newer than this medscale reads "
                         f"(up to version {MANIFEST_VERSION}): upgrade medscale, or prep the data again with this one")
    return version


def _read_one(root: str) -> dict[str, Any]:
    url = root if root.endswith(MANIFEST_NAME) else join_url(root, MANIFEST_NAME)
    if is_local(url):
        path = Path(local_path(url))
        if not path.exists():
            raise InputNotFound(f"no {MANIFEST_NAME} in {root!r}; point data.shards at a `medscale prep` output")
        text = path.read_text()
    else:
        try:
            with gopen_module().gopen(url, "rb") as f:
                text = f.read().decode()
        except Exception as e:  # noqa: BLE001 - re-raised with the URL named
            raise InputNotFound(f"cannot read {url}: {type(e).__name__}: {e}") from e
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{url} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise InputError(f"{url} has no 'shards' list; is it a `medscale prep` manifest?")
    check_version(manifest, url)
    for s in manifest["shards"]:
        if not isinstance(s, dict):
            raise InputError(f"{url}: a shard entry is not an object: {s!r}")
        for k in ("path", "split", "samples"):
            if k not in s:
                raise InputError(f"{url}: a shard entry lacks {k!r}: {s}")
        check_entries(s, url)
        s["url"] = join_url(root, s["path"])
        if s.get("index"):
            s["index_url"] = join_url(root, s["index"])
    return manifest


def check_entries(shard: Mapping[str, Any], source: str) -> None:
    """Refuse a shard entry whose ``path`` or ``index`` is not a plain relative name.

    Raises:
        UnsafeManifestEntry: naming ``source`` (the manifest or marker) and the entry.
    """
    for field in ("path", "index"):
        if field == "index" and not shard.get("index"):
            continue
        why = unsafe_relative_name(shard.get(field))
        if why is not None:
            raise UnsafeManifestEntry(
                f"{source}: shard {field} {shard.get(field)!r} is refused: {why}. Entries must be relative names "
                "below the manifest's own directory; a manifest is data and never names a command, a URL or "
                "another place (put URLs and pipe: commands in data.shards instead)")


def _expand(root: str) -> list[str]:
    if is_remote(root):
        return list(braceexpand.braceexpand(root))
    roots: list[str] = []
    for item in braceexpand.braceexpand(root):
        if glob.has_magic(item):
            # Prep's log directory (OUT.logs, beside OUT) matches OUT's pattern too (ct-* finds ct-0.logs).
            roots += sorted(p for p in glob.glob(item)
                            if not (p.endswith(PREP_LOG_SUFFIX) and not os.path.exists(os.path.join(p, MANIFEST_NAME))))
        else:
            roots.append(item)
    return roots


def load_manifest(root: str) -> dict[str, Any]:
    """Read (and if ``root`` is a pattern, merge) prep manifests; each shard gets its ``url``.

    Raises:
        InputNotFound: no manifest where ``root`` points, or a pattern that matches nothing.
        InputError: a manifest that is not valid, is too new, or cannot be merged with the others.
    """
    roots = _expand(root)
    if not roots:
        raise InputNotFound(f"data.shards pattern {root!r} matches nothing")
    parts = [_read_one(r) for r in roots]
    manifest = parts[0] if len(parts) == 1 else merge_manifests(parts, roots)
    manifest["root"] = root
    return manifest


def has_labels(manifest: Mapping[str, Any]) -> bool:
    """Whether the samples carry labels.

    False for task ``unlabeled``, and for older manifests that say multiclass but list no classes
    and count no labels anywhere (what prep wrote before version 2 when it had neither a labels
    CSV nor classes in its recipe).
    """
    if manifest.get("task") == UNLABELED:
        return False
    if manifest.get("classes"):
        return True
    return any(d.get("label_counts") for d in (manifest.get("splits") or {}).values()) or \
        any(s.get("label_counts") for s in manifest.get("shards", ()))


def task_of(manifest: Mapping[str, Any]) -> str:
    """``multiclass``, ``multilabel`` or ``unlabeled`` (see `has_labels`)."""
    return (manifest.get("task") or "multiclass") if has_labels(manifest) else UNLABELED


# ---------------------------------------------------------------------------------------------
# Merging several prep outputs
# ---------------------------------------------------------------------------------------------


def _add(total: dict[str, Any], key: str, value: Any) -> None:
    """Sum ``value`` into ``total[key]``; a None anywhere makes the total unknown (None)."""
    if value is None or (key in total and total[key] is None):
        total[key] = None
    elif isinstance(value, Mapping):
        total[key] = total.get(key, Counter()) + Counter(value)
    else:
        total[key] = total.get(key, 0) + value


def merge_manifests(parts: Sequence[Mapping[str, Any]], roots: Sequence[str]) -> dict[str, Any]:
    """One manifest over several prep outputs (shards with their ``url`` already set).

    Per split, ``shards`` and ``samples`` are counted from the shard entries, ``bytes`` summed
    over them, and ``patients`` and ``label_counts`` summed over the parts' splits (a patient
    present in two prep outputs counts twice); a value that some part lacks is left out rather
    than under-counted.

    Raises:
        InputError: the parts disagree on the task or the classes.
    """
    first = parts[0]
    for r, m in zip(roots, parts):
        for name, get in (("task", task_of), ("classes", lambda x: x.get("classes") or [])):
            if get(m) != get(first):
                raise InputError(f"cannot merge manifests: {name} of {r!r} is {get(m)!r}, "
                                 f"of {roots[0]!r} {get(first)!r}")
    splits: dict[str, dict[str, Any]] = {}
    for m in parts:
        for s in m["shards"]:
            d = splits.setdefault(s["split"], {})
            _add(d, "shards", 1)
            _add(d, "samples", s["samples"])
            _add(d, "bytes", s.get("bytes"))
        for name in {s["split"] for s in m["shards"]}:
            own = (m.get("splits") or {}).get(name, {})
            _add(splits[name], "patients", own.get("patients"))
            _add(splits[name], "label_counts", own.get("label_counts"))
    for d in splits.values():
        for k in [k for k, v in d.items() if v is None]:
            del d[k]
        if "label_counts" in d:
            d["label_counts"] = dict(sorted(d["label_counts"].items()))
    warnings = [w for m in parts for w in m.get("warnings", [])]
    fingerprints = {m.get("key_fingerprint") for m in parts} - {None}
    if len(fingerprints) > 1:
        warnings.append(f"the merged prep outputs were pseudonymized with {len(fingerprints)} different keys: "
                        "one patient in two of them has unrelated pseudonyms and may sit in different splits")
        log.warning(warnings[-1])
    merged = dict(first)
    merged.update(
        task=task_of(first),
        shards=[s for m in parts for s in m["shards"]],
        splits=dict(sorted(splits.items())),
        samples=sum(s["samples"] for m in parts for s in m["shards"]),
        warnings=warnings,
        roots=list(roots),
    )
    for key in ("inputs", "accepted_inputs", "rejected", "lossy_samples"):
        if all(isinstance(m.get(key), int) for m in parts):
            merged[key] = sum(m[key] for m in parts)
    if all(isinstance(m.get("reject_reasons"), Mapping) for m in parts):
        merged["reject_reasons"] = dict(sorted(sum((Counter(m["reject_reasons"]) for m in parts), Counter()).items()))
    if all(isinstance(m.get("largest_patient_samples"), int) for m in parts):
        merged["largest_patient_samples"] = max(m["largest_patient_samples"] for m in parts)
    return merged


# ---------------------------------------------------------------------------------------------
# Writing (prep)
# ---------------------------------------------------------------------------------------------


def build_manifest(shards: Sequence[Mapping[str, Any]], patients: Mapping[str, int], *, task: str,
                   classes: Sequence[str], encoding: str, pixel_extension: str, key_fingerprint: str,
                   config: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest of one prep output.

    Args:
        shards: the shard entries `medscale.formats.tar.ShardSequence` returned, sorted by path.
        patients: distinct patients per split.
        task, classes: what the labels are (``unlabeled`` and [] without labels).
        encoding, pixel_extension: the pixel codec.
        key_fingerprint: identifies the pseudonym key without revealing it.
        config: the resolved prep config.
        run: prep's counts and findings, copied as they are: inputs, accepted_inputs,
            largest_patient_samples, warnings, stratified_samples, lossy_samples, rejected,
            reject_reasons.
    """
    if task == UNLABELED and classes:
        raise ValueError(f"an unlabeled manifest lists classes {list(classes)}")
    splits: dict[str, Any] = {}
    for s in shards:
        d = splits.setdefault(s["split"], {"shards": 0, "samples": 0, "bytes": 0, "label_counts": Counter()})
        d["shards"] += 1
        d["samples"] += s["samples"]
        d["bytes"] += s["bytes"]
        d["label_counts"].update(s["label_counts"])
    for name, d in splits.items():
        d["patients"] = patients.get(name, 0)
        d["label_counts"] = dict(sorted(d["label_counts"].items()))
    run = dict(run)
    header = {k: run.pop(k) for k in ("inputs", "accepted_inputs") if k in run}
    return {
        "version": MANIFEST_VERSION,
        **header,
        "samples": sum(s["samples"] for s in shards),
        **run,
        "task": task,
        "classes": list(classes),
        "encoding": encoding,
        "pixel_extension": pixel_extension,
        "key_fingerprint": key_fingerprint,
        "splits": dict(sorted(splits.items())),
        "shards": list(shards),
        "config": dict(config),
    }


def wids_index(split: str, shards: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A wids shard index of one split (for readers that use webdataset's wids)."""
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": split,
        "shardlist": [{"url": s["path"], "nsamples": s["samples"]} for s in shards if s["split"] == split],
    }


def write_manifest(out: str | Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` and one ``<split>.wids.json`` per split into ``out``, atomically each."""
    out = Path(out)
    atomic_write(out / MANIFEST_NAME, json.dumps(manifest, indent=1))
    for split in manifest["splits"]:
        atomic_write(out / f"{split}.wids.json", json.dumps(wids_index(split, manifest["shards"]), indent=1))
