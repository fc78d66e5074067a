"""Small file-system helpers shared by every stage."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["atomic_write"]


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
