"""The errors a user can fix: they end a command with exit code 2 and one line naming what to fix.

Anything else is a bug or an environment failure and keeps its traceback (exit code 1). Both
classes derive from ValueError as well, so callers that catch ValueError for bad values still do.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "InputError", "InputNotFound", "CorruptShards", "RunStateError"]


class UserError(Exception):
    """Bad configuration or bad input: the message says what to change. ``medscale`` exits 2."""


class ConfigError(UserError, ValueError):
    """A config value or key is invalid; the message names the key and its source."""


class InputError(UserError, ValueError):
    """Input data (a file, a CSV, a manifest, shards) cannot be used; the message names it."""


class InputNotFound(UserError, FileNotFoundError):
    """A file or directory the command was pointed at does not exist; the message names it."""


class CorruptShards(InputError, RuntimeError):
    """More unreadable samples than ``data.max_corrupt_fraction`` allows: the shards need checking."""


class RunStateError(UserError, RuntimeError):
    """A run's files are not in a state the command can go on from (checkpoints that changed while it
    started, a damaged checkpoint): the message says what happened and what to do."""
