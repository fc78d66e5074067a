"""Small file-system helpers shared by every stage."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

__all__ = ["atomic_write", "unsafe_relative_name", "SAFE_NAME_CHARS"]

SAFE_NAME_CHARS = "letters, digits and . _ + = @ , -"
# One path component of a name read from data (a manifest entry, a chunk marker, a tar member's key):
# no separator, no shell or URL syntax (':', '|', ';', '$', '`', quotes, spaces, '?', '#', '%'), and
# no leading '-' (substituted into a `pipe:` command it would read as an option).
_COMPONENT = re.compile(r"[A-Za-z0-9_.+=@,][A-Za-z0-9_.+=@,-]*")


def unsafe_relative_name(name: object) -> str | None:
    """Why ``name`` is not a plain relative file name below a directory, or None when it is one.

    Names read from data (a manifest's shard and index entries, prep's chunk markers) must stay
    below the directory the user pointed at and must never be read as a command or a URL: so no
    scheme (``pipe:``, ``http:``), no absolute path, no ``.`` or ``..`` component, nothing but
    `SAFE_NAME_CHARS` in each ``/``-separated component.
    """
    if not isinstance(name, str) or not name:
        return "it is not a non-empty string"
    if name.startswith("pipe:") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", name):
        return "it is a command or a URL"
    if name.startswith(("/", "\\")) or os.path.isabs(name):
        return "it is an absolute path"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return "it has an empty, '.' or '..' component"
        if not _COMPONENT.fullmatch(part):
            return f"it has characters other than {SAFE_NAME_CHARS}"
    return None


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part.

    The bytes go to a temporary name in the same directory (same file system), are flushed to
    disk, and are renamed over `path`: a kill at any moment leaves no torn file. The temporary
    name is the writer's own (pid and random suffix): processes that write the same file at once,
    such as the tasks of a Slurm prep array starting together, each rename a whole file.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
