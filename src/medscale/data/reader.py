"""Raw samples by (shard, index within shard), for one data-loader worker.

Local shards are read by random access. Where to find each sample comes from the shard's index
file (written by prep, `medscale.formats.tar`) when it is there and matches the shard's size,
else from a scan of the tar headers (skipping over member data; costs in BENCHMARKS.md, loader),
once per worker and epoch; then each wanted sample costs one seek and reads of its own members. A
worker therefore reads the bytes of its own samples (and, for shards without an index, the tar
headers of the shards it touches), nothing else, and never decodes a sample it does not use.

Remote shards (http, s3, pipe:) cannot seek. With a ``cache_dir`` (node-local disk), a shard is
downloaded there once per node when a worker first needs it (webdataset's ``download``: a
temporary file renamed when complete; a file lock makes the other processes wait instead of
downloading it again) and then read like a local one (by a header scan: its index stays remote).
Without one, the shard is streamed through webdataset's tar iterator when the worker first needs
it, and the members of the samples this worker will ask for later in the epoch are kept
(undecoded) until asked for; other members are passed over without being copied. Memory is
bounded by the worker's share of the shards it has open.

Class balancing reads every sample's label from the shards' index files, local or remote
(`shard_labels`); only shards without one have their JSON members scanned.

Failures never raise here: a shard that cannot be opened, is truncated, or holds fewer samples
than the manifest says yields ``None`` for the missing samples and is recorded in `errors`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from filelock import FileLock, Timeout
from webdataset import tariterators

from medscale.formats.manifest import is_local, local_path, open_url
from medscale.formats.sample import JSON_MEMBER, PIXEL_PREFIX, stored_label
from medscale.formats.tar import INDEX_SUFFIX, Index, decode_index, read_index, scan_tar

__all__ = ["ShardReader", "ReadErrors", "sample_key", "cached_copy", "scan_json", "shard_labels",
           "DOWNLOAD_TIMEOUT_S"]

log = logging.getLogger("medscale.data")

Raw = dict[str, Any]

DOWNLOAD_TIMEOUT_S = 3600.0
"""How long a process waits for another one's download of the same shard (a big shard, a slow link)."""
# Hex characters of the URL's hash in a cached copy's name: shards of the same file name from
# different URLs get different copies.
_CACHE_HASH_CHARS = 16


def sample_key(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a tar member, as webdataset groups them (key = up to the first dot)."""
    return tariterators.base_plus_ext(name)


def _wanted_member(ext: str, only_json: bool) -> bool:
    return ext == JSON_MEMBER or (not only_json and ext.startswith(PIXEL_PREFIX))


@dataclass
class ReadErrors:
    """Shard-level problems seen by this reader (each shard once)."""

    shards: dict[str, str] = field(default_factory=dict)

    def add(self, url: str, why: str) -> bool:
        if url in self.shards:
            return False
        self.shards[url] = why
        log.warning("corrupt shard %s: %s (its missing samples are skipped and counted)", url, why)
        return True


def cached_copy(url: str, cache_dir: str, size: int | None = None, timeout: float = DOWNLOAD_TIMEOUT_S) -> str:
    """The path of a node-local copy of ``url``, downloaded once per node.

    The first process to need it downloads it (to a temporary name, renamed when complete) under
    a file lock; the others wait on the lock, then find the file. ``size`` (the manifest's byte
    count) is checked.
    """
    from webdataset.cache import download

    names = re.findall(r"[^\s/?=]+\.tar\b", url)  # the shard's file name, also inside a pipe: command
    base = names[-1] if names else "shard.tar"
    dest = os.path.join(cache_dir, hashlib.sha256(url.encode()).hexdigest()[:_CACHE_HASH_CHARS] + "-" + base)
    if not os.path.exists(dest):
        os.makedirs(cache_dir, exist_ok=True)
        lock = dest + ".lock"
        try:
            # The kernel releases a flock when its holder dies: no stale locks to age out.
            with FileLock(lock, timeout=timeout):
                if not os.path.exists(dest):
                    download(url, dest)
        except Timeout:
            raise TimeoutError(f"waited {timeout:.0f} s for another process to download {url}") from None
        # Tidy up once the copy exists. Safe against a waiter that still holds the unlinked lock
        # file, or a newcomer that makes a new one: whoever gets a lock finds the copy and leaves.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
    if size is not None and os.path.getsize(dest) != size:
        got = os.path.getsize(dest)
        os.unlink(dest)  # a later epoch downloads it again
        raise ValueError(f"downloaded {got} bytes, the manifest says {size}")
    return dest


class _LocalShard:
    """Random access into one local tar; the file is reopened on demand.

    Member offsets come from the shard's index file (``index_path``, default: beside the shard)
    when it describes a file of this size, else from a header scan.
    """

    def __init__(self, url: str, path: str, index_path: str | None = None):
        self.url, self.path = url, path
        self.fd: int | None = os.open(path, os.O_RDONLY)
        self.samples: Index = []
        self.error = ""
        self.indexed = False  # offsets came from the index file (no scan)
        try:
            size = os.fstat(self.fd).st_size
            index, why = read_index(index_path or path + INDEX_SUFFIX, size)
            if index is not None:
                self.samples, self.indexed = index.samples, True
            else:
                if why != "no index":
                    log.info("shard %s: index not used (%s); scanning its headers", url, why)
                self.samples, self.error = scan_tar(self.fd, size)
        except (OSError, ValueError) as e:
            self.samples, self.error = [], f"{type(e).__name__}: {e}"

    def read(self, index: int, only_json: bool) -> Raw | None:
        if index >= len(self.samples):
            return None
        key, members = self.samples[index]
        raw: Raw = {"__key__": key, "__url__": self.url}
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        for ext, (offset, size) in members.items():
            if not _wanted_member(ext, only_json):
                continue
            data = os.pread(self.fd, size, offset)
            if len(data) != size:
                return None  # truncated member
            raw[ext] = data
        return raw

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ShardReader:
    """Raw samples of a split's shards for one worker.

    Args:
        urls: shard locations, in global shard order.
        counts: samples per shard the manifest promises.
        only_json: read only the JSON members (label scans).
        max_open: local shard files kept open at once.
        index_shards: shards whose member offsets are kept in memory; a worker's shards of the
            current shuffle block must fit, or it reads their index (or scans them) again.
        cache_dir: node-local directory for copies of remote shards ("" streams them).
        sizes: bytes per shard from the manifest (checks the cached copies), None where unknown.
        indexes: where each local shard's index file is (the manifest's ``index_url``), None
            for beside the shard.
    """

    def __init__(self, urls: list[str], counts: list[int], *, only_json: bool = False, max_open: int = 16,
                 index_shards: int = 64, cache_dir: str = "", sizes: list[int | None] | None = None,
                 indexes: Sequence[str | None] | None = None):
        self.urls, self.counts, self.only_json, self.max_open = urls, counts, only_json, max_open
        self.index_shards = index_shards
        self.indexes = list(indexes) if indexes is not None else [None] * len(urls)
        self._fds: OrderedDict[int, None] = OrderedDict()  # shards whose file is open, least recent first
        self.cache_dir = cache_dir
        self.sizes = sizes or [None] * len(urls)
        self.errors = ReadErrors()
        self._open: OrderedDict[int, _LocalShard] = OrderedDict()
        self._needed: dict[int, dict[int, int]] = {}  # remote: shard -> index -> uses left
        self._buffer: dict[tuple[int, int], Raw] = {}
        self._streamed: set[int] = set()
        self._failed: set[int] = set()
        self.bytes_read = 0  # member bytes read from local shards (streams are not counted)

    # -- planning (remote streams keep only what the plan asks for) ---------------------------

    def expect(self, requests: Iterable[tuple[int, int]]) -> None:
        """Announce the (shard, index) requests to come, in any order, repeats included."""
        for j, i in requests:
            if self._random_access(int(j)):
                continue  # random access needs no plan
            uses = self._needed.setdefault(int(j), {})
            uses[int(i)] = uses.get(int(i), 0) + 1

    # -- reading ------------------------------------------------------------------------------

    def get(self, shard: int, index: int) -> Raw | None:
        """The raw sample, or None if it is missing or unreadable (recorded in `errors`)."""
        url = self.urls[shard]
        if self._random_access(shard):
            s = self._local(shard)
            raw = s.read(index, self.only_json) if s is not None else None
            if raw is not None:
                self.bytes_read += sum(len(v) for k, v in raw.items() if not k.startswith("__"))
            if raw is None and s is not None and not s.error and index < self.counts[shard]:
                if index >= len(s.samples):
                    self.errors.add(url, f"holds {len(s.samples)} samples, manifest says {self.counts[shard]}")
                else:
                    self.errors.add(url, f"sample {index} is truncated")
            return raw
        return self._remote(shard, index)

    def _local(self, shard: int) -> _LocalShard | None:
        s = self._open.get(shard)
        if s is None:
            if shard in self._failed:
                return None  # already failed (and logged) in this epoch
            url = self.urls[shard]
            try:
                if is_local(url):
                    index = self.indexes[shard]
                    s = _LocalShard(url, local_path(url), local_path(index) if index and is_local(index) else None)
                else:
                    s = _LocalShard(url, cached_copy(url, self.cache_dir, self.sizes[shard]))
            except Exception as e:  # noqa: BLE001 - any opener/download failure makes a corrupt shard
                self.errors.add(url, f"cannot open: {type(e).__name__}: {e}")
                self._failed.add(shard)
                return None
            if s.error:
                self.errors.add(url, f"unreadable after {len(s.samples)} samples: {s.error}")
            self._open[shard] = s
            while len(self._open) > self.index_shards:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(shard)
        # Member offsets are kept (reading them again costs a scan or an index read); open
        # files are capped separately.
        self._fds[shard] = None
        self._fds.move_to_end(shard)
        while len(self._fds) > self.max_open:
            old_shard, _ = self._fds.popitem(last=False)
            if old_shard in self._open:
                self._open[old_shard].close()
        return s

    @property
    def streams(self) -> bool:
        """Whether some shards are streamed (then `expect` must announce the requests)."""
        return not all(self._random_access(j) for j in range(len(self.urls)))

    def _random_access(self, shard: int) -> bool:
        return bool(self.cache_dir) or is_local(self.urls[shard])

    def _remote(self, shard: int, index: int) -> Raw | None:
        key = (shard, index)
        if key not in self._buffer and shard not in self._streamed:
            self._stream(shard)
        uses = self._needed.get(shard, {})
        left = uses.get(index, 0) - 1
        if left > 0:
            uses[index] = left
            return self._buffer.get(key)
        uses.pop(index, None)
        return self._buffer.pop(key, None)

    def _stream(self, shard: int) -> None:
        url = self.urls[shard]
        self._streamed.add(shard)
        needed = self._needed.get(shard, {})
        state = {"index": -1, "key": None}

        def select(name: str) -> bool:
            key, ext = sample_key(name)
            if key is None:
                return False
            if key != state["key"]:
                state["key"] = key
                state["index"] += 1
            return state["index"] in needed and _wanted_member(ext.lower(), self.only_json)

        failure: list[str] = []

        def handler(exn: Exception) -> bool:
            failure.append(f"{type(exn).__name__}: {exn}")
            return False  # stop this shard; what was read so far is kept

        try:
            stream = open_url(url)
        except Exception as e:  # noqa: BLE001 - any opener failure is a corrupt/unreachable shard
            self.errors.add(url, f"cannot open: {type(e).__name__}: {e}")
            return
        got = 0
        current: Raw | None = None
        try:
            for item in tariterators.tar_file_iterator(stream, handler=handler, select_files=select):
                key, ext = sample_key(item["fname"])
                if current is None or current["__key__"] != key:
                    current = {"__key__": key, "__url__": url}
                    self._buffer[(shard, state["index"])] = current
                    got += 1
                current[ext.lower()] = item["data"]
        except Exception as e:  # noqa: BLE001 - e.g. a pipe that exits non-zero on close
            failure.append(f"{type(e).__name__}: {e}")
        finally:
            try:
                stream.close()
            except Exception as e:  # noqa: BLE001 - webdataset's Pipe raises on a failed command
                failure.append(f"{type(e).__name__}: {e}")
        if failure:
            self.errors.add(url, f"stream failed after {state['index'] + 1} samples: {failure[0]}")
        elif state["index"] + 1 < self.counts[shard]:
            self.errors.add(url, f"holds {state['index'] + 1} samples, manifest says {self.counts[shard]}")

    def close(self) -> None:
        for s in self._open.values():
            s.close()
        self._open.clear()
        self._buffer.clear()


# Files a JSON scan keeps open: it reads the shards one after the other.
_SCAN_OPEN = 2


def scan_json(urls: list[str], counts: list[int], parse: Callable[[bytes], Any]) -> tuple[list[list[Any]], ReadErrors]:
    """``parse(json bytes)`` for every sample of every shard (None where unreadable)."""
    reader = ShardReader(urls, counts, only_json=True, max_open=_SCAN_OPEN)
    reader.expect((j, i) for j, n in enumerate(counts) for i in range(n))
    out: list[list[Any]] = []
    for j, n in enumerate(counts):
        vals = []
        for i in range(n):
            raw = reader.get(j, i)
            try:
                vals.append(parse(raw["json"]) if raw is not None and "json" in raw else None)
            except ValueError:
                vals.append(None)
        out.append(vals)
    reader.close()
    return out, reader.errors


def _index_labels(url: str, index_url: str | None, count: int, size: int | None) -> list[Any] | None:
    """A shard's labels from its index file, or None when there is no usable index."""
    if not index_url:
        if not is_local(url):
            return None
        index_url = url + INDEX_SUFFIX
    try:
        if is_local(index_url):
            shard = local_path(url)
            index, _ = read_index(local_path(index_url), os.path.getsize(shard) if is_local(url) else size)
        else:
            with open_url(index_url) as f:
                index = decode_index(f.read(), index_url)
            if size is not None and index.bytes != size:
                index = None
    except Exception as e:  # noqa: BLE001 - an unreachable or damaged index means: scan the JSON instead
        log.info("index %s not used: %s: %s", index_url, type(e).__name__, e)
        return None
    if index is None or len(index.labels) != count:
        return None
    return index.labels


def shard_labels(urls: list[str], counts: list[int], *, indexes: Sequence[str | None] | None = None,
                 sizes: Sequence[int | None] | None = None) -> list[list[Any]]:
    """Every sample's stored label (class index, 0/1 list, None if none or unreadable), per shard.

    Read from the shards' index files; only shards without a usable index are scanned (their
    JSON members, through `scan_json`; scan errors are logged).
    """
    indexes = list(indexes) if indexes is not None else [None] * len(urls)
    sizes = list(sizes) if sizes is not None else [None] * len(urls)
    out: list[list[Any] | None] = [_index_labels(u, i, n, z) for u, i, n, z in zip(urls, indexes, counts, sizes)]
    todo = [j for j, labels in enumerate(out) if labels is None]
    if todo:
        log.info("reading the labels of %d samples in %d shards without an index (JSON members only)",
                 sum(counts[j] for j in todo), len(todo))
        scanned, _ = scan_json([urls[j] for j in todo], [counts[j] for j in todo], _stored_label)
        for j, labels in zip(todo, scanned):
            out[j] = labels
    return [labels or [] for labels in out]


def _stored_label(data: bytes) -> Any:
    return stored_label(json.loads(data))
