"""Tar shards: the deterministic writer prep uses, the header scanner and the member-offset index.

A shard is a plain POSIX tar of members ``<key>.<extension>`` (`medscale.formats.sample`), the
members of one sample next to each other in sorted order, samples in the order prep wrote them.

Writing (`HashedTarWriter`, `ShardSequence`): members carry a fixed mtime (0), mode (0444) and
owner (``medscale``), so a rerun writes byte-identical shards and checksums stay comparable. The
tar is written member by member rather than through `tarfile`'s stream mode (why: BENCHMARKS.md,
prep) and hashed on the way out instead of being read back.

The index, ``<shard file name>.idx.json`` beside each shard (``train-000000-00.tar.idx.json``), is
written by prep when the shard is closed, since the writer knows where every member went. It lets
a reader open a shard without scanning its headers and lets class balancing read the labels
without touching the shards::

    {"format": "medscale-shard-index", "version": 1, "shard": "train-000000-00.tar",
     "bytes": 1234688,                       # size of the shard the index describes
     "samples": [{"key": "0f3a...", "members": {"json": [512, 301], "pix.zst": [1536, 9120]},
                  "label": 1},             # class index, 0/1 list, or null (unlabeled)
                 ...]}

``members`` maps an extension to ``[offset, size]``: where the member's data starts in the
shard and its length in bytes. A reader uses an index only when its version is one it knows and
``bytes`` equals the size of the shard it opened; otherwise it falls back to `scan_tar`, so a
shard without an index (older prep, hand-written tars) or one rewritten since keeps working.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from medscale.files import atomic_write

__all__ = ["HashedTarWriter", "ShardSequence", "DuplicateKey", "Index", "ShardIndex", "scan_tar", "index_name", "encode_index",
           "decode_index", "read_index", "INDEX_SUFFIX", "INDEX_VERSION", "INDEX_FORMAT"]

INDEX_SUFFIX = ".idx.json"
"""Appended to a shard's file name to name its index."""
INDEX_FORMAT = "medscale-shard-index"
INDEX_VERSION = 1
"""The index layout this code writes and the newest it reads."""

# Bytes read at once by the scanner: one read usually covers every header of a prep sample (its
# JSON and pixel members), so a sample costs one system call, not one per header.
_SCAN_READ = 4096
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)

Index = list[tuple[str, dict[str, tuple[int, int]]]]
"""Per sample, in shard order: key, {extension: (data offset, size)}."""


def index_name(shard_name: str) -> str:
    """The file name (or path, or URL) of a shard's index: the shard's with `INDEX_SUFFIX` appended."""
    return shard_name + INDEX_SUFFIX


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


class HashedTarWriter:
    """A tar file written member by member, hashed as it is written.

    Members carry fixed mtime, owner and mode, so the same members give the same bytes.
    """

    def __init__(self, path: str | Path):
        self.file: BinaryIO = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def _put(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.size += len(data)

    def add(self, name: str, data: bytes) -> tuple[int, int]:
        """Append one member; returns (offset of its data in the file, its size)."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = "medscale"
        self._put(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))  # a pax record only if needed
        offset = self.size
        self._put(data)
        if len(data) % tarfile.BLOCKSIZE:
            self._put(tarfile.NUL * (tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))
        return offset, len(data)

    def close(self) -> tuple[int, str]:
        """End the archive (two zero blocks, padded to a whole record, as tarfile does); size and sha256."""
        self._put(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        if self.size % tarfile.RECORDSIZE:
            self._put(tarfile.NUL * (tarfile.RECORDSIZE - self.size % tarfile.RECORDSIZE))
        self.file.close()
        return self.size, self.sha.hexdigest()


class DuplicateKey(ValueError):
    """A sample key that this `ShardSequence` has already written.

    Readers group adjacent members by key, so a repeated key would merge two samples into one
    (or, in the index, list one key twice); the sequence refuses it before writing anything.
    """

    def __init__(self, key: str, shard: str, first: str):
        self.key, self.shard, self.first = key, shard, first
        super().__init__(
            f"sample key {key!r} was already written to {first}; not writing it again (to {shard}): "
            "readers would merge the two samples"
        )

    def __reduce__(self) -> tuple[Any, tuple[str, str, str]]:
        # Raised in prep's worker processes; the default pickling would call __init__(message).
        return type(self), (self.key, self.shard, self.first)


class ShardSequence:
    """One split's shards of one prep chunk, ``{split}-{chunk:06d}-{part:02d}.tar``, rolling over
    at ``shard_bytes`` of member data; each shard gets its index when it is closed.

    Shards are written under a temporary name (``.tmp``) and renamed when complete; `close`
    returns one manifest entry per shard (path, split, samples, bytes, sha256, label_counts,
    index). A key is written at most once per sequence (`DuplicateKey`).
    """

    def __init__(self, out: Path, split: str, chunk: int, shard_bytes: int):
        self.out, self.split, self.chunk, self.limit = Path(out), split, chunk, shard_bytes
        self.part = 0
        self.done: list[dict[str, Any]] = []
        # key -> the part it went to: one small int per sample, so the error can name the shard.
        self._keys: dict[str, int] = {}
        self._open()

    def _shard_name(self, part: int) -> str:
        return f"{self.split}-{self.chunk:06d}-{part:02d}.tar"

    def _open(self) -> None:
        self.name = self._shard_name(self.part)
        self.tmp = self.out / (self.name + ".tmp")
        self.tar = HashedTarWriter(self.tmp)
        self.samples, self.bytes, self.labels = 0, 0, Counter()
        self.index: list[dict[str, Any]] = []

    def add(self, key: str, members: dict[str, bytes], label: Any = None,
            label_counts: dict[str, int] | None = None) -> None:
        """One sample: members ``{extension: bytes}`` stored as ``key.extension``, in sorted order.

        Args:
            key: the sample key (no dots).
            members: extension to bytes.
            label: the sample's label for the index (class index, 0/1 list, None if unlabeled).
            label_counts: class name to count this sample adds to the shard's ``label_counts``.

        Raises:
            DuplicateKey: ``key`` was already added to this sequence; nothing is written.
        """
        if key in self._keys:
            raise DuplicateKey(key, self.name, self._shard_name(self._keys[key]))
        if self.samples and self.bytes >= self.limit:
            self._close()
            self.part += 1
            self._open()
        self._keys[key] = self.part
        where = {}
        for ext in sorted(members):
            where[ext] = list(self.tar.add(f"{key}.{ext}", members[ext]))
            self.bytes += len(members[ext])
        self.index.append({"key": key, "members": where, "label": label})
        self.samples += 1
        self.labels.update(label_counts or {})

    def _close(self) -> None:
        size, digest = self.tar.close()  # an unclosed tar would leave a truncated last shard
        os.replace(self.tmp, self.out / self.name)
        idx = index_name(self.name)
        atomic_write(self.out / idx, encode_index(self.name, size, self.index))
        self.done.append(
            {"path": self.name, "split": self.split, "samples": self.samples, "bytes": size,
             "sha256": digest, "label_counts": dict(sorted(self.labels.items())), "index": idx}
        )

    def close(self) -> list[dict[str, Any]]:
        """Close the open shard; the manifest entries of every shard written."""
        self._close()
        return self.done


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------


@dataclass
class ShardIndex:
    """A parsed shard index: where each sample's members are, and each sample's label."""

    bytes: int
    samples: Index
    labels: list[Any]


def encode_index(shard: str, size: int, samples: list[dict[str, Any]]) -> bytes:
    """The index file's bytes (compact JSON, same input same bytes)."""
    doc = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shard": shard, "bytes": size, "samples": samples}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_index(data: bytes, source: str) -> ShardIndex:
    """Parse index bytes.

    Raises:
        ValueError: not an index, a newer version than this code reads, or malformed entries;
            the message names ``source``.
    """
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise ValueError(f"{source} is not a {INDEX_FORMAT} file")
    version = doc.get("version")
    if not isinstance(version, int) or not 1 <= version <= INDEX_VERSION:
        raise ValueError(f"{source} is index version {version!r}; this medscale reads versions 1 to {INDEX_VERSION}")
    try:
        size = int(doc["bytes"])
        samples: Index = []
        labels = []
        for s in doc["samples"]:
            members = {str(ext): (int(o), int(n)) for ext, (o, n) in s["members"].items()}
            for ext, (o, n) in members.items():
                # Offsets are data: a member outside the shard would make a reader seek or allocate anywhere.
                if o < 0 or n < 0 or o + n > size:
                    raise ValueError(f"member {ext!r} of {s['key']!r} at {o}+{n} lies outside the shard's {size} bytes")
            samples.append((str(s["key"]), members))
            labels.append(s.get("label"))
        return ShardIndex(size, samples, labels)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{source} has a malformed entry: {type(e).__name__}: {e}") from None


def read_index(path: str, shard_size: int | None) -> tuple[ShardIndex | None, str]:
    """The index at a local ``path`` if it describes a shard of ``shard_size`` bytes.

    Returns:
        (index, "") when usable; (None, why) when absent, unreadable, of another version or of
        another size (None ``shard_size`` skips the size check).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, "no index"
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror or e}"
    try:
        index = decode_index(data, path)
    except ValueError as e:
        return None, str(e)
    if shard_size is not None and index.bytes != shard_size:
        return None, f"{path} describes a shard of {index.bytes} bytes, the shard has {shard_size}"
    return index, ""


# ---------------------------------------------------------------------------------------------
# Scanning (shards without a usable index)
# ---------------------------------------------------------------------------------------------


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def scan_tar(fd: int, file_size: int) -> tuple[Index, str]:
    """Index a tar by reading its 512-byte headers and seeking over the data.

    Much cheaper than `tarfile` (figures in BENCHMARKS.md, loader), which matters because every
    worker indexes each shard it touches once per epoch when the shard has no index file.
    Handles ustar prefixes and the PAX and GNU long-name records Python's tarfile (and so
    webdataset's TarWriter) writes; a misaligned or damaged header fails the ustar magic (or, in
    old-style tars, the checksum). Returns the samples found before any problem, and a
    description of the problem or "".
    """
    block = tarfile.BLOCKSIZE
    samples: Index = []
    pos, long_name, last = 0, None, None
    buf, at = b"", 0

    def read(p: int, n: int) -> bytes:
        nonlocal buf, at
        if not (at <= p and p + n <= at + len(buf)):
            buf, at = os.pread(fd, max(n, _SCAN_READ), p), p
        return buf[p - at:p - at + n]

    while True:
        hdr = read(pos, block)
        if len(hdr) < block:
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
        data = pos + block
        pos = data + (size + block - 1) // block * block
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
