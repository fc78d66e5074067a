"""The inputs of a prep: directories (by glob patterns), single files and file lists, in one sorted list."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from medscale.errors import InputNotFound

__all__ = ["Source", "discover_inputs", "PHOTO_SUFFIXES"]

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class Source:
    path: str  # absolute path, for reading
    rel: str  # path relative to its input root, for label lookup
    position: int = -1  # in the sorted input list: how markers and the plan name an input


def discover_inputs(inputs: Sequence[str], include: Sequence[str]) -> list[Source]:
    """Expand directories (by glob patterns), single files and file lists into a sorted list.

    A file ending in ``.txt`` or ``.lst`` is a list of paths, one per line.
    """
    found: dict[str, Source] = {}
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            root = p.resolve()
            for pattern in include:
                for f in root.glob(pattern):
                    if f.is_file() and not f.name.startswith("."):
                        found.setdefault(str(f), Source(str(f), f.relative_to(root).as_posix()))
        elif p.is_file() and p.suffix in (".txt", ".lst"):
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    f = (p.parent / line).resolve() if not os.path.isabs(line) else Path(line)
                    found.setdefault(str(f), Source(str(f), line))
        elif p.is_file():
            found.setdefault(str(p.resolve()), Source(str(p.resolve()), p.name))
        else:
            raise InputNotFound(f"prep input {item!r} does not exist")
    ordered = sorted(found.values(), key=lambda s: s.path)
    for i, s in enumerate(ordered):
        s.position = i
    return ordered
