"""Objectives by name: ``train.objective`` to the class that implements it.

Found in this order: a name registered in this process (`register_task`); a name in the entry-point
group ``medscale.objectives`` of any installed distribution (medscale's own are there too; a source
tree that is not installed falls back to them by name); ``package.module:Class``. This module
imports no objective until one is asked for, and nothing of medscale's but its errors, so the config
(`medscale.config`) can check ``train.objective`` without depending on any objective.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, Callable

from medscale.errors import ConfigError

__all__ = ["ENTRY_POINT_GROUP", "DEFAULT_OBJECTIVE", "register_task", "task_class", "task_names"]

ENTRY_POINT_GROUP = "medscale.objectives"
DEFAULT_OBJECTIVE = "classification"
# medscale's own objectives, as pyproject.toml registers them: a source tree run without installing
# (no entry points in its metadata) still finds them.
_BUILTIN = {"classification": "medscale.tasks.classification:ClassificationTask",
            "mae": "medscale.tasks.mae:MaeTask"}
_REGISTERED: dict[str, type] = {}


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: make a class available as ``train.objective=<name>`` in this process."""

    def add(cls: type) -> type:
        _REGISTERED[name] = cls
        return cls

    return add


def _entry_points() -> dict[str, str]:
    found: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name] != ep.value:
            raise ConfigError(f"objective {ep.name!r} is registered twice in the entry-point group {ENTRY_POINT_GROUP!r}: "
                              f"{found[ep.name]} and {ep.value}; uninstall one of them")
        found[ep.name] = ep.value
    return found


def task_names() -> list[str]:
    """Every objective that can be named without ``module:Class``."""
    return sorted({*_BUILTIN, *_entry_points(), *_REGISTERED})


def _load(target: str, name: str) -> type:
    module, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"train.objective={name!r}: cannot load {target} ({type(e).__name__}: {e})") from None
    if not isinstance(obj, type):
        raise ConfigError(f"train.objective={name!r}: {target} is not a class")
    return obj


def task_class(name: str) -> type:
    """The objective class that ``train.objective=<name>`` means (its ``name`` attribute set to it).

    Raises:
        ConfigError: no such objective, or one that cannot be imported; the message lists the known ones.
    """
    if name in _REGISTERED:
        cls = _REGISTERED[name]
    else:
        target = _entry_points().get(name) or _BUILTIN.get(name)
        if target is None and ":" in name:
            target = name
        if target is None:
            raise ConfigError(f"train.objective={name!r} is not a known objective; known: {task_names()} (or name "
                              "any class as package.module:Class, or register one in the entry-point group "
                              f"{ENTRY_POINT_GROUP!r})")
        cls = _load(target, name)
    missing = [m for m in ("build_model", "loss", "evaluate", "model_from_record") if not hasattr(cls, m)]
    if missing:
        raise ConfigError(f"train.objective={name!r}: {cls.__module__}.{cls.__qualname__} is not a medscale "
                          f"objective (it lacks {', '.join(missing)}; see docs/extending.md)")
    cls.name = name
    return cls
