"""Failures of the machine rather than of the input, said in one line: no space left, read-only, no permission, a
file-size limit.

:func:`environment_failure` looks through an exception and its causes (Orbax
and TensorStore wrap the ``OSError`` of a failed write in their own types, or
keep only its text) for one of these conditions and, if found, returns the
:class:`~jaxinf.errors.EnvironmentFailure` to raise instead: the path, the stage
that was running, and that everything finished is kept (saves are atomic, so a
failed save leaves the previous checkpoint, and the next run resumes from it).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from jaxinf.errors import EnvironmentFailure
from jaxinf.run.rundir import output_key

CONDITIONS = {  # errno -> (what it means, what to do: {key} is the output setting, jaxinf.run.rundir.output_key)
    errno.ENOSPC: ("no space left on device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or raise the quota"),
    errno.EROFS: ("read-only file system", "make it writable or choose another {key}"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another {key}"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another {key}"),
    errno.EFBIG: (  # a write past the process's file-size limit (SIGXFSZ, which Python ignores) or the file system's
        "file too large (over the file-size limit: ulimit -f, or the file system's largest file)",
        "raise the limit or choose another {key}",
    ),
}
_TEXTS = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
    "File too large": errno.EFBIG,
}


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def find_condition(exc: BaseException, root=None) -> tuple[int, str | None] | None:
    """(errno, path or None) of the first out-of-space, read-only or permission error in ``exc``'s chain.

    The path is the ``OSError``'s file name or, when the condition is known only from a library's message, the
    longest absolute path in the message under ``root`` (the run directory; any absolute path without ``root``); None
    when there is none.
    """
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in CONDITIONS:
            return e.errno, final_path(e.filename) if isinstance(e.filename, str) else None
    for e in _chain(exc):
        text = str(e)
        for needle, code in _TEXTS.items():
            if needle in text:
                under = str(Path(root).absolute()) if root is not None else None
                paths = [m for m in re.findall(r"/[^\s'\":;,()\[\]]+", text) if under is None or m.startswith(under)]
                return code, final_path(max(paths, key=len)) if paths else None
    return None


_ORBAX_TMP = re.compile(r"^(.+?)(?:\.partial_save)?\.orbax-checkpoint-tmp[^/]*$")


def final_path(path: str) -> str:
    """``path`` as the user will find it: a file inside a checkpoint Orbax was still writing (under its temporary
    directory ``STEP.orbax-checkpoint-tmp-NNN/...``, renamed to ``STEP`` once whole, removed on failure) is named
    by the checkpoint it was going to be, ``.../state/covariance/1``, not by a temporary path that is gone by the
    time the message is read (a file-size limit named ``1.orbax-checkpoint-tmp/default.orbax-checkpoint-tmp/
    ocdbt.process_0/d/ef13...``)."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        found = _ORBAX_TMP.match(part)
        if found is not None:
            return str(Path(*parts[:i], found.group(1)))
    return path


def environment_failure(exc: BaseException, root, stage: str, restored: bool = False) -> EnvironmentFailure | None:
    """The one-line failure for ``exc`` raised while ``stage`` of the run in ``root`` was running, or None.
    ``restored``: the run was an ``--overwrite`` whose previous run is back in ``root`` (:mod:`jaxinf.run.rundir`)."""
    if type(exc).__module__.startswith("jaxinf"):  # already one line about an input, said by jaxinf itself
        return None
    found = find_condition(exc, root)
    if found is None:
        return None
    code, path = found
    what, todo = CONDITIONS[code]
    todo = todo.format(key=output_key())
    if restored:
        return EnvironmentFailure(
            f"{path or root}: {what} (stage {stage}); --overwrite did not finish: the previous "
            f"run is back in {root} as it was and the new attempt is removed; {todo} and run the "
            "same command again to start it over"
        )
    return EnvironmentFailure(
        f"{path or root}: {what} (stage {stage}); everything finished is kept in {root}; "
        f"{todo} and run the same command again to resume"
    )


class LostProcess(EnvironmentFailure):
    """Another process of a multi-process run stopped (killed, preempted, crashed) while this one waited for it in a
    collective: one line, exit 4. The command then leaves without JAX's shutdown barrier, which would wait for the
    lost process and end this one with a fatal error of pages (:func:`jaxinf.cli.entry`)."""

    exit_code = 4


# What a collective or the coordination service says when a peer process is gone (Gloo on CPU hosts, NCCL on GPUs)
_LOST_PEER = re.compile(
    r"Gloo \w+ failed|Connection (?:closed|reset) by peer|heartbeat timeout|stopped sending heartbeats|"
    r"NCCL error|remote process exited"
)


def lost_process(exc: BaseException, root, stage: str, distributed: bool) -> LostProcess | None:
    """The one-line failure for ``exc`` when it is a collective of a multi-process run (``distributed``: this process
    is one of several, ``jax.distributed``) failing because another process stopped; None otherwise. Saves are
    collective and atomic, so every process resumes from the last checkpoint all of them committed."""
    if not distributed:
        return None
    for e in _chain(exc):
        found = _LOST_PEER.search(str(e))
        if found is not None:
            return LostProcess(
                f"another process of this run stopped ({found.group(0)}; stage {stage}); everything finished is "
                f"kept in {root}; start every process again with the same command to resume"
            )
    return None


def is_closed_loop_noise(exc_type, exc: BaseException, tb) -> bool:
    """Whether an exception that a C extension could not raise (``sys.unraisablehook``) is TensorStore completing a
    future of a failed Orbax write after Orbax closed its event loop (``RuntimeError: Event loop is closed`` raised
    in asyncio's ``call_soon_threadsafe``): noise of a failure that the run reports itself."""
    if exc_type is not RuntimeError or str(exc) != "Event loop is closed" or tb is None:
        return False
    return tb.tb_frame.f_code.co_name == "call_soon_threadsafe"


class UnraisableHook:
    """The process's ``sys.unraisablehook`` while jaxinf runs in it: one, however many commands run (:func:`unraisable_hook`).

    - A ``KeyboardInterrupt`` that could not propagate is given back to the main thread while a command runs
      (:meth:`command`). Python raises a SIGINT's ``KeyboardInterrupt`` in whatever code runs when the signal
      arrives; inside a garbage-collector callback (JAX's ``_xla_gc_callback``) or a ``__del__`` it cannot
      propagate, so Python printed it as a traceback and went on: the run finished as if Ctrl-C had never been
      pressed. It is raised again in the main thread once the callback has returned: from another thread, a moment
      later (a signal simulated at once would be handled inside the hook or the callback, unraisable again; should
      it be, the hook runs again), and only while a command still runs.
    - :func:`is_closed_loop_noise` is dropped, whenever it comes (also as the process exits).
    - Anything else goes to the hook it replaced.
    """

    def __init__(self, previous):
        import threading

        self.previous, self.commands, self.lock = previous, 0, threading.Lock()

    def __call__(self, unraisable) -> None:
        import _thread

        kind = unraisable.exc_type
        if kind is not None and issubclass(kind, KeyboardInterrupt) and self.commands:
            _thread.start_new_thread(self._interrupt_later, ())  # unlike threading.Thread.start: no waiting for it
        elif not is_closed_loop_noise(kind, unraisable.exc_value, unraisable.exc_traceback):
            self.previous(unraisable)

    def _interrupt_later(self) -> None:
        import _thread
        import time

        time.sleep(0.05)
        with self.lock:
            if self.commands:
                _thread.interrupt_main()

    @contextlib.contextmanager
    def command(self) -> Iterator[None]:
        """The block in which a command runs: a lost Ctrl-C inside it stops it."""
        with self.lock:
            self.commands += 1
        try:
            yield
        finally:
            with self.lock:
                self.commands -= 1


def unraisable_hook() -> UnraisableHook:
    """The process's :class:`UnraisableHook`, put in place over the hook it finds on first use (a second call, a
    second command in one process, reuses it rather than chaining one more)."""
    if not isinstance(sys.unraisablehook, UnraisableHook):
        sys.unraisablehook = UnraisableHook(sys.unraisablehook)
    return sys.unraisablehook


class HideLibraryTracebacks(logging.Filter):
    """Drops a library's log record carrying a traceback of one of these conditions (Orbax logs the failed write of
    each of its writer threads so), since the run reports the condition itself in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "jaxinf" or not record.exc_info or record.exc_info[1] is None:
            return True
        return find_condition(record.exc_info[1]) is None
