"""The errors jaxinf raises on purpose, in one hierarchy the command line maps to its exit codes.

- :class:`UserError`: bad input, a bad config or run directory, a setting that cannot work; the message is one
  line naming the file, line, key or path, and nothing computed is lost (exit 2).
- :class:`EnvironmentFailure`: the machine refused what the work needs (no space left, a read-only or
  unwritable directory); one line naming the path and the stage, everything finished kept (exit 3).

Anything else that escapes a command is a bug and is shown with its traceback (exit 1). Each module keeps its own
subclass (``DataError``, ``StoreError``, ...), so an error says where it comes from; every subclass is also a
``ValueError`` (or, for run directories, a ``RuntimeError``) as it was before this hierarchy.
"""

from __future__ import annotations

import os


class JaxinfError(Exception):
    """Every error jaxinf raises on purpose."""

    exit_code = 1


class UserError(JaxinfError, ValueError):
    """Bad input, config, setting or run directory: reported in one line, exit 2."""

    exit_code = 2


class EnvironmentFailure(JaxinfError, RuntimeError):
    """The machine refuses what a run needs (no space left, a read-only or unwritable run directory): exit 3."""

    exit_code = 3


def missing(path: str | os.PathLike, absent: str = "file is missing") -> str:
    """Why ``path``, which does not exist as far as ``Path.exists`` can tell, cannot be read, in a few words: a
    symbolic link to nothing (a target moved or a volume not mounted) or a loop of links is named as such, so that
    the user does not look for a file that is there; anything else is ``absent``. The one wording of every message
    about a file that cannot be found."""
    return "a symbolic link to nothing (or a loop of links)" if os.path.islink(path) else absent
