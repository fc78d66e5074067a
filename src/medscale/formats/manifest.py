"""Finding shards: the prep manifest, local or remote, one prep output or several.

``data.shards`` names where ``manifest.json`` lives:

- a directory written by `medscale prep`, or the manifest file itself;
- a brace or glob pattern over several prep outputs (``/data/ct-{000..003}``, ``/data/ct-*``),
  whose manifests are merged (same task and classes required);
- a URL prefix opened with webdataset's ``gopen``: ``http(s)://host/prep``, ``s3://bucket/prep``
  (through ``aws s3 cp``), ``gs://...``, or ``pipe:CMD`` where ``{}`` in CMD is replaced by the
  file name (``pipe:aws s3 cp s3://b/prep/{} -``); without ``{}`` the name is appended after a "/".

Relative shard paths in a manifest resolve against that manifest's location; absolute paths and
URLs are used as they are.
"""

from __future__ import annotations

import glob
import importlib
import json
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand

# webdataset's package namespace exports the gopen *function*; the module holds the scheme table.
wds_gopen = importlib.import_module("webdataset.gopen")

__all__ = ["load_manifest", "join_url", "is_local", "is_remote", "local_path", "open_url"]


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """Stream an s3:// object through the AWS CLI (webdataset has no native s3 opener)."""
    return wds_gopen.gopen_pipe(f"pipe:aws s3 cp {shlex.quote(url)} -", mode, bufsize, **kw)


# A user's own registration wins (setdefault).
wds_gopen.gopen_schemes.setdefault("s3", _gopen_s3)


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
    """The location of ``name`` (a manifest-relative path) under ``root``."""
    if is_remote(name) or name.startswith("/"):
        return name
    if root.startswith("pipe:") and "{}" in root:
        return root.replace("{}", name)
    if root.endswith("manifest.json"):
        root = root[: -len("manifest.json")]
    return f"{root.rstrip('/')}/{name}" if root else name


def open_url(url: str) -> Any:
    """A binary file object for a local path or any URL webdataset's gopen understands."""
    if is_local(url):
        return open(local_path(url), "rb")
    return wds_gopen.gopen(url, "rb")


def _read_one(root: str) -> dict[str, Any]:
    url = root if root.endswith("manifest.json") else join_url(root, "manifest.json")
    if is_local(url):
        path = Path(local_path(url))
        if not path.exists():
            raise FileNotFoundError(f"no manifest.json in {root!r}; point data.shards at a `medscale prep` output")
        text = path.read_text()
    else:
        try:
            with wds_gopen.gopen(url, "rb") as f:
                text = f.read().decode()
        except Exception as e:  # noqa: BLE001 - re-raised with the URL named
            raise FileNotFoundError(f"cannot read {url}: {type(e).__name__}: {e}") from e
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{url} is not valid JSON: {e}") from e
    if not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{url} has no 'shards' list; is it a `medscale prep` manifest?")
    for s in manifest["shards"]:
        for k in ("path", "split", "samples"):
            if k not in s:
                raise ValueError(f"{url}: a shard entry lacks {k!r}: {s}")
        s["url"] = join_url(root, s["path"])
    return manifest


def _expand(root: str) -> list[str]:
    if is_remote(root):
        return list(braceexpand.braceexpand(root))
    roots: list[str] = []
    for item in braceexpand.braceexpand(root):
        if glob.has_magic(item):
            roots += sorted(glob.glob(item))
        else:
            roots.append(item)
    return roots


def load_manifest(root: str) -> dict[str, Any]:
    """Read (and if ``root`` is a pattern, merge) prep manifests; each shard gets its ``url``."""
    roots = _expand(root)
    if not roots:
        raise FileNotFoundError(f"data.shards pattern {root!r} matches nothing")
    parts = [_read_one(r) for r in roots]
    manifest = parts[0]
    if len(parts) > 1:
        manifest = dict(parts[0])
        manifest["shards"] = []
        splits: dict[str, dict[str, int]] = {}
        for r, m in zip(roots, parts):
            for k in ("task", "classes"):
                if m.get(k) != parts[0].get(k):
                    raise ValueError(f"cannot merge manifests: {k} of {r!r} is {m.get(k)!r}, "
                                     f"of {roots[0]!r} {parts[0].get(k)!r}")
            manifest["shards"] += m["shards"]
            for s in m["shards"]:
                d = splits.setdefault(s["split"], {"shards": 0, "samples": 0})
                d["shards"] += 1
                d["samples"] += s["samples"]
        manifest["splits"] = splits
        manifest["samples"] = sum(s["samples"] for s in manifest["shards"])
        manifest["roots"] = roots
    manifest["root"] = root
    return manifest
