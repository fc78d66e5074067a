"""Files that ship inside the package: run configs, DeepSpeed JSON and prep recipes.

A path the user gives names their own file when it exists (absolute, or relative to the current
directory); otherwise a relative path such as ``configs/demo.yaml``, ``ds_configs/zero2.json`` or
``data_prep/demo.yaml`` names the copy packaged with medscale, so the shipped configs work from any
directory after ``pip install``. In a checkout, the top-level ``configs``, ``ds_configs`` and
``data_prep`` are symlinks to the packaged directories: both spellings reach the same files.
"""

from __future__ import annotations

from pathlib import Path

from medscale.errors import InputNotFound

__all__ = ["RESOURCE_DIRS", "packaged_dir", "packaged_names", "resolve_resource"]

RESOURCE_DIRS = ("configs", "ds_configs", "data_prep")
"""The packaged directories, named as the paths that reach them: ``configs/demo.yaml``."""

# A plain directory beside this module, not importlib.resources: DeepSpeed and the launched ranks
# need real file paths, and medscale is never installed zipped.
_PACKAGE = Path(__file__).resolve().parent


def packaged_dir(kind: str) -> Path:
    """The installed directory of `kind`, one of RESOURCE_DIRS."""
    if kind not in RESOURCE_DIRS:
        raise ValueError(f"unknown resource directory {kind!r}; medscale ships {', '.join(RESOURCE_DIRS)}")
    return _PACKAGE / kind


def packaged_names(kind: str) -> list[str]:
    """The file names packaged in `kind` (e.g. ``['chestxray14_vit_base.yaml', ..., 'demo.yaml']``)."""
    d = packaged_dir(kind)
    return sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def resolve_resource(path: str | Path, kind: str | None = None, what: str = "file") -> Path:
    """The file `path` names: itself when it exists, else the packaged copy of a relative path.

    Args:
        path: What the user gave, e.g. ``configs/demo.yaml`` or ``/data/run.yaml``.
        kind: The packaged directory to try for a bare name (``demo.yaml`` with kind
            ``configs``); a path that starts with one of RESOURCE_DIRS needs no kind.
        what: How the error names the setting, e.g. ``--config`` or ``dist.deepspeed_config``.

    Raises:
        InputNotFound: the path exists nowhere; the message names it, every place looked in and
            the packaged files of the directory it meant.
    """
    p = Path(path).expanduser()
    if p.exists():
        return p
    looked = [str(p.absolute())]
    parts = p.parts  # pathlib drops "./", so ./configs/demo.yaml has parts (configs, demo.yaml)
    candidate: Path | None = None
    if not p.is_absolute() and parts:
        if len(parts) > 1 and parts[0] in RESOURCE_DIRS:
            kind, candidate = parts[0], _PACKAGE.joinpath(*parts)
        elif len(parts) == 1 and kind is not None:
            candidate = packaged_dir(kind) / parts[0]
    if candidate is not None:
        if candidate.exists():
            return candidate
        looked.append(f"{candidate} (packaged)")
    msg = f"{what} {path}: no such file; looked in {' and '.join(looked)}"
    if kind is not None:
        names = packaged_names(kind)
        msg += f"; packaged {kind}: {', '.join(names) if names else 'none'}"
    raise InputNotFound(msg)
