"""Copies of one DICOM instance among a chunk's inputs, found from a byte scan of each file's header.

Real exports hold the same image twice; `in_preference_order` puts the copies next to each other,
the best first (a lossless transfer syntax, then path order), so prep keeps that one.
"""

from __future__ import annotations

import struct
from pathlib import Path

from medscale.prep.discover import PHOTO_SUFFIXES, Source

__all__ = ["in_preference_order", "scan_instance"]


_LOSSLESS_SYNTAXES = frozenset({
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
})


def in_preference_order(sources: list[Source]) -> list[Source]:
    """This chunk's inputs, copies of one instance next to each other, the best copy first.

    Real exports hold the same image twice (exported again, or in two transfer syntaxes). Both
    get the same sample keys, and a reader groups a tar's adjacent members by key, so they would
    merge into one corrupt sample: the first copy converted is kept, the others are rejected as
    ``duplicate`` (by their keys, after the full read). This order makes the kept one the best:
    a lossless transfer syntax, then the first in path order, so every rerun keeps the same file;
    a copy that fails to convert gives the next one its turn. Inputs keep path order otherwise; a
    group goes where its first member sorts. The UIDs come from a byte scan of each file's first
    16 kB (a third of a pydicom header parse): a wrong or missing one only changes the order.
    """
    found = {s.position: scan_instance(s.path) for s in sources
             if Path(s.path).suffix.lower() not in PHOTO_SUFFIXES}
    groups: dict[str, list[tuple[bool, int, Source]]] = {}
    for s in sources:
        if found.get(s.position):
            uid, syntax = found[s.position]
            groups.setdefault(uid, []).append((syntax not in _LOSSLESS_SYNTAXES, s.position, s))
    order: list[Source] = []
    placed: set[str] = set()
    for s in sources:
        uid = found[s.position][0] if found.get(s.position) else None
        if uid is None or len(groups[uid]) == 1:
            order.append(s)
        elif uid not in placed:
            placed.add(uid)
            order.extend(g[2] for g in sorted(groups[uid], key=lambda g: g[:2]))
    return order


_UID_CHARS = frozenset(b"0123456789.")


def scan_instance(path: str) -> tuple[str, str] | None:
    """(SOPInstanceUID, TransferSyntaxUID) found in a DICOM file's first 16 kB, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16384)
    except OSError:
        return None
    if head[128:132] != b"DICM":
        return None

    def value(at: int, length_format: str) -> str:
        size = struct.calcsize(length_format)
        (n,) = struct.unpack_from(length_format, head, at)
        raw = head[at + size:at + size + n].rstrip(b"\0 ")
        return raw.decode("ascii") if raw and n <= 64 and set(raw) <= _UID_CHARS else ""

    i = head.find(b"\x02\x00\x10\x00UI", 132)  # the file meta group is always explicit little endian
    syntax = value(i + 6, "<H") if i >= 0 and i + 8 <= len(head) else ""
    # The tag's bytes also turn up inside other elements (a length of 0x18): try each occurrence.
    for tag, order in ((b"\x08\x00\x18\x00", "<"), (b"\x00\x08\x00\x18", ">")):
        j = head.find(tag, 132)
        while 0 <= j <= len(head) - 12:
            vr = head[j + 4:j + 6]
            if vr == b"UI":
                uid = value(j + 6, order + "H")
            elif vr == b"UN":  # explicit VR with a 4-byte length after 2 reserved bytes
                uid = value(j + 8, order + "I")
            else:  # implicit VR (little endian only)
                uid = value(j + 4, "<I") if order == "<" else ""
            if uid:
                return uid, syntax
            j = head.find(tag, j + 1)
    return None
