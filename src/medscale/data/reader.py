"""Raw samples by (shard, index within shard), for one data-loader worker.

Local shards are read by random access: the tar headers are scanned once per worker and epoch
(skipping over member data, about 11 us a prep sample), then each wanted sample costs one seek and
reads of its own members. A worker therefore reads the bytes of its own samples and the tar
headers of the shards it touches, nothing else, and never decodes a sample it does not use.

Remote shards (http, s3, pipe:) cannot seek. With a ``cache_dir`` (node-local disk), a shard is
downloaded there once per node when a worker first needs it (webdataset's ``download``: a
temporary file renamed when complete; a lock file makes the other processes wait instead of
downloading it again) and then read like a local one. Without one, the shard is streamed through
webdataset's tar iterator when the worker first needs it, and the members of the samples this
worker will ask for later in the epoch are kept (undecoded) until asked for; other members are
passed over without being copied. Memory is bounded by the worker's share of the shards it has
open.

Failures never raise here: a shard that cannot be opened, is truncated, or holds fewer samples
than the manifest says yields ``None`` for the missing samples and is recorded in `errors`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from webdataset import tariterators

from medscale.formats.manifest import is_local, local_path, open_url

__all__ = ["ShardReader", "ReadErrors", "sample_key", "scan_tar", "cached_copy"]

log = logging.getLogger("medscale.data")

Raw = dict[str, Any]


def sample_key(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a tar member, as webdataset groups them (key = up to the first dot)."""
    return tariterators.base_plus_ext(name)


def _wanted_member(ext: str, only_json: bool) -> bool:
    return ext == "json" or (not only_json and ext.startswith("pix."))


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


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


Index = list[tuple[str, dict[str, tuple[int, int]]]]  # per sample: key, {extension: (offset, size)}


def scan_tar(fd: int, file_size: int) -> tuple[Index, str]:
    """Index a tar by reading its 512-byte headers and seeking over the data.

    About 3 us a header (a prep sample has two, JSON and pixels; webdataset's TarWriter adds a
    PAX record to each), ten times faster than `tarfile`, which matters because every worker
    indexes each shard it touches once per epoch. Handles ustar prefixes and the PAX and
    GNU long-name records Python's tarfile (and so webdataset's TarWriter) writes; a misaligned
    or damaged header fails the ustar magic (or, in old-style tars, the checksum). Returns the
    samples found before any problem, and a description of the problem or "".
    """
    samples: Index = []
    pos, long_name, last = 0, None, None
    buf, at = b"", 0  # one 4 KiB read usually covers all headers of a sample (PAX, json, pixels)

    def read(p: int, n: int) -> bytes:
        nonlocal buf, at
        if not (at <= p and p + n <= at + len(buf)):
            buf, at = os.pread(fd, max(n, 4096), p), p
        return buf[p - at:p - at + n]

    while True:
        hdr = read(pos, 512)
        if len(hdr) < 512:
            return samples, ("" if not hdr else "truncated tar header")
        if hdr == _ZERO_BLOCK:
            return samples, ""
        ustar = hdr[257:262] == b"ustar"
        try:
            size = _octal(hdr[124:136])
            # The checksum field counts as spaces; ustar headers are checked by their magic.
            if not ustar and _octal(hdr[148:156]) != sum(hdr) - sum(hdr[148:156]) + 256:
                raise ValueError
        except ValueError:
            return samples, f"damaged or misaligned tar header at byte {pos}"
        kind = hdr[156:157]
        data = pos + 512
        pos = data + (size + 511) // 512 * 512
        if data + size > file_size:
            return samples, f"member at byte {data} runs past the end of the file (truncated)"
        if kind in (b"x", b"L"):  # the next member's long name
            payload = read(data, size)
            if kind == b"L":
                long_name = payload.rstrip(b"\0").decode("utf-8", "replace")
            else:
                for rec in payload.split(b"\n"):
                    _, _, kv = rec.partition(b" ")
                    if kv.startswith(b"path="):
                        long_name = kv[5:].decode("utf-8", "replace")
            continue
        name = long_name
        long_name = None
        if kind not in (b"0", b"\0", b"7"):
            continue  # directories, links, global headers
        if name is None:
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = hdr[345:500].split(b"\0", 1)[0] if ustar else b""
            if prefix:
                name = prefix.decode("utf-8", "replace") + "/" + name
        # webdataset's grouping (base_plus_ext) without its regex: key = up to the basename's first dot.
        dot = name.find(".", name.rfind("/") + 1)
        if dot <= name.rfind("/") + 1:
            continue
        key, ext = name[:dot], name[dot + 1:]
        if ext.startswith("__") and ext.endswith("__"):
            continue
        if key != last:
            samples.append((key, {}))
            last = key
        samples[-1][1][ext.lower()] = (data, size)


_ZERO_BLOCK = bytes(512)


_STALE_LOCK_S = 300.0  # a download lock this old is taken to belong to a dead process


def cached_copy(url: str, cache_dir: str, size: int | None = None, timeout: float = 3600.0) -> str:
    """The path of a node-local copy of ``url``, downloaded once per node.

    The first process to need it downloads it (to a temporary name, renamed when complete);
    the others wait for the file. ``size`` (the manifest's byte count) is checked.
    """
    from webdataset.cache import download

    names = re.findall(r"[^\s/?=]+\.tar\b", url)  # the shard's file name, also inside a pipe: command
    base = names[-1] if names else "shard.tar"
    dest = os.path.join(cache_dir, hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + base)
    lock = dest + ".lock"
    deadline = time.monotonic() + timeout
    while not os.path.exists(dest):
        os.makedirs(cache_dir, exist_ok=True)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                if time.time() - os.path.getmtime(lock) > _STALE_LOCK_S:
                    os.unlink(lock)
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for another process to download {url}") from None
            time.sleep(0.2)
            continue
        try:
            os.close(fd)
            if not os.path.exists(dest):
                download(url, dest)
        finally:
            os.unlink(lock)
    if size is not None and os.path.getsize(dest) != size:
        got = os.path.getsize(dest)
        os.unlink(dest)  # a later epoch downloads it again
        raise ValueError(f"downloaded {got} bytes, the manifest says {size}")
    return dest


class _LocalShard:
    """Random access into one local tar via a header index; the file is reopened on demand."""

    def __init__(self, url: str, path: str):
        self.url, self.path = url, path
        self.fd: int | None = os.open(path, os.O_RDONLY)
        try:
            self.samples, self.error = scan_tar(self.fd, os.fstat(self.fd).st_size)
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
        index_shards: shards whose tar index is kept; a worker's shards of the current shuffle
            block must fit, or it scans them again (an index costs about 300 bytes a sample).
        cache_dir: node-local directory for copies of remote shards ("" streams them).
        sizes: bytes per shard from the manifest (checks the cached copies), None where unknown.
    """

    def __init__(self, urls: list[str], counts: list[int], *, only_json: bool = False, max_open: int = 16,
                 index_shards: int = 64, cache_dir: str = "", sizes: list[int | None] | None = None):
        self.urls, self.counts, self.only_json, self.max_open = urls, counts, only_json, max_open
        self.index_shards = index_shards
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
                path = local_path(url) if is_local(url) else cached_copy(url, self.cache_dir, self.sizes[shard])
                s = _LocalShard(url, path)
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
        # Indexes are kept (a rescan costs ~10 us a sample); open files are capped separately.
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


def scan_json(urls: list[str], counts: list[int], parse: Callable[[bytes], Any]) -> tuple[list[list[Any]], ReadErrors]:
    """``parse(json bytes)`` for every sample of every shard (None where unreadable)."""
    reader = ShardReader(urls, counts, only_json=True, max_open=2)
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
