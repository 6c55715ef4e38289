"""Failures of the machine rather than of the input, said in one line: no space left, read-only, no permission.

:func:`environment_failure` looks through an exception and its causes (Orbax
and TensorStore wrap the ``OSError`` of a failed write in their own types, or
keep only its text) for one of these conditions and, if found, returns the
:class:`~jaxinf.store.EnvironmentFailure` to raise instead: the path, the stage
that was running, and that everything finished is kept (saves are atomic, so a
failed save leaves the previous checkpoint, and the next run resumes from it).
"""

from __future__ import annotations

import errno
import logging
import re

from jaxinf.store import EnvironmentFailure

CONDITIONS = {  # errno -> (what it means, what to do)
    errno.ENOSPC: ("no space left on device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or raise the quota"),
    errno.EROFS: ("read-only file system", "make it writable or choose another run.out"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another run.out"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another run.out"),
}
_TEXTS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
          "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def find_condition(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, path or None) of the first out-of-space, read-only or permission error in ``exc``'s chain."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in CONDITIONS:
            return e.errno, e.filename if isinstance(e.filename, str) else None
    for e in _chain(exc):
        text = str(e)
        for needle, code in _TEXTS.items():
            if needle in text:
                m = re.search(r"(/[^\s'\":,]+)", text)
                return code, m.group(1) if m else None
    return None


def environment_failure(exc: BaseException, root, stage: str) -> EnvironmentFailure | None:
    """The one-line failure for ``exc`` raised while ``stage`` of the run in ``root`` was running, or None."""
    if type(exc).__module__.startswith("jaxinf"):  # already one line about an input, said by jaxinf itself
        return None
    found = find_condition(exc)
    if found is None:
        return None
    code, path = found
    what, todo = CONDITIONS[code]
    return EnvironmentFailure(f"{path or root}: {what} (stage {stage}); everything finished is kept in {root}; "
                              f"{todo} and run the same command again to resume")


class HideLibraryTracebacks(logging.Filter):
    """Drops a library's log record carrying a traceback of one of these conditions (Orbax logs the failed write of
    each of its writer threads so), since the run reports the condition itself in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "jaxinf" or not record.exc_info or record.exc_info[1] is None:
            return True
        return find_condition(record.exc_info[1]) is None
