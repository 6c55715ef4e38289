"""The run directory's lock: one ``jaxinf run`` at a time writes a run directory.

An advisory lock (``fcntl.flock``, exclusive, non-blocking: :func:`jaxinf.atomic.hold_lock`) on ``RUN/.jaxinf.lock``,
held from before ``run.json`` is read until the process ends. The file holds the
holder's host and pid, for the message a second process gets; the lock itself is
the kernel's, released when the holder exits however it exits (SIGKILL, OOM,
a crash), so a file left behind by a killed run is no obstacle. In a multi-process
run, process 0 takes it (the others write only what process 0 tells them to).

Advisory locks bind on local file systems and on NFSv4 (Linux emulates ``flock``
with ``fcntl`` byte-range locks there); a file system without locks makes
``flock`` fail, which is reported as such rather than ignored.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from jaxinf.atomic import LockFailed, hold_lock, lock_holder, write_holder
from jaxinf.run.rundir import LOCK_FILE, StoreError, output_key


class RunLocked(StoreError):
    """Another process holds the run directory's lock (the message names its host and pid)."""


class RunLock:
    """The lock of run directory ``root`` (created if missing); ``acquire`` raises :class:`RunLocked` when held."""

    def __init__(self, root: str | Path, reader: bool = False):
        """``reader``: the command reads the run and writes only its own derived files into it (``jaxinf analyze``
        RUN_DIR): refused while another process holds it, without the hint to choose another output directory."""
        self.root = Path(root)
        self.reader = reader
        self.path = self.root / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        made = [p for p in (self.root, *self.root.parents) if not p.exists()]  # removed again if the lock fails
        had_file = self.path.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
                raise  # the machine refused a write: jaxinf.run.failures says it in one line, exit 3
            raise StoreError(f"{self.root}: cannot create the run directory ({e.strerror})") from None
        try:
            fd = hold_lock(self.path)
        except LockFailed as e:
            raise StoreError(f"{self.path}: cannot lock the run directory ({e.strerror})") from None
        if fd is None:
            holder = "reading it" if _only_read(self.path) else self.holder()
            raise RunLocked(
                f"{self.root}: in use by another jaxinf process ({holder}); wait for it to "
                + ("finish or stop it" if self.reader else f"finish or stop it, or choose another {output_key()}")
            )
        try:
            write_holder(fd)
        except OSError as e:  # a full disk: nothing left behind, and the message names the file
            os.close(fd)
            if not had_file:
                self.path.unlink(missing_ok=True)
            for p in made:
                try:
                    p.rmdir()
                except OSError:
                    break
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self._fd = fd
        return self

    def holder(self) -> str:
        """``host H pid P`` as the holder wrote it (or that it is unknown)."""
        return lock_holder(self.path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run(root: Path, overwrite: bool):
    """The run directory ``root`` claimed for writing, as ``jaxinf run`` and ``jaxinf kronfluence import`` write one:
    checked (never another kind of directory, :func:`jaxinf.run.rundir.check_target`), locked (:class:`RunLock`), a
    killed ``--overwrite`` finished (:func:`~jaxinf.run.rundir.recover_interrupted`), and with ``overwrite`` the old
    run set aside (:func:`~jaxinf.run.rundir.set_aside`). Returns the lock (release it when done) and what to undo
    if the command fails: the :class:`~jaxinf.run.rundir.Aside` (put the old run back; ``discard`` it once the new
    one is whole), or a :class:`~jaxinf.run.rundir.Fresh` for a directory created or found empty (``restore``
    leaves nothing), or None."""
    from jaxinf.run import rundir
    from jaxinf.run.store import check_writable

    check_writable(root)
    rundir.check_target(root, overwrite)
    fresh = rundir.Fresh(root, created=not root.exists()) if rundir.is_fresh(root) else None
    lock = RunLock(root).acquire()
    try:
        rundir.recover_interrupted(root)
        return lock, ((rundir.set_aside(root) if overwrite else None) or fresh)
    except BaseException:
        lock.release()
        raise


def claim_output(root: Path, kind: str):
    """The output directory of ``jaxinf validate --out`` or ``jaxinf demo --out`` (``kind``): checked
    (:func:`jaxinf.run.rundir.check_output`), created, locked with a run directory's lock (:class:`RunLock`) and marked as
    ``kind``'s; returns the lock (release it when done)."""
    from jaxinf.atomic import write_json
    from jaxinf.run.rundir import OUTPUT_MARKER, _output_kind, check_output
    from jaxinf.run.store import check_writable

    check_output(root, kind)
    check_writable(root)
    lock = RunLock(root).acquire()
    try:
        check_output(root, kind)  # again under the lock: another process may have written it meanwhile
        if _output_kind(root) != kind:
            write_json(root / OUTPUT_MARKER, {"format": f"jaxinf {kind}"})
    except BaseException:
        lock.release()
        raise
    return lock


def _shared_lock(path: Path) -> int | None:
    """A shared advisory lock on the lock file ``path``, opened for reading (never created, never through a link):
    its descriptor, or None when there is none to take (no lock file: a directory no jaxinf run writes, since every
    run keeps its lock file, or a file system without locks); raises ``BlockingIOError`` while a writer holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise BlockingIOError(e.errno, e.strerror) from None
        return None
    return fd


def _only_read(path: Path) -> bool:
    """Whether the lock ``path``, which this process could not take, is held only by readers (:func:`reading`)."""
    try:
        fd = _shared_lock(path)
    except BlockingIOError:
        return False
    if fd is None:
        return False
    os.close(fd)
    return True


@contextlib.contextmanager
def reading(roots: Iterable[str | Path | None], output: str | Path | None = None) -> Iterator[None]:
    """Shared locks on the run directories a command reads (``factors.from``, ``index.from``, ``jaxinf query``'s
    RUN, ``kronfluence export``'s RUN), held until the block ends: no ``jaxinf run`` (nor analyze, nor import) writes
    one meanwhile (its exclusive lock says the run is being read), and the command does not start while one writes
    it, which would have it read a run set aside or half recomputed ("the eigendecomposition is missing or
    corrupted"). Nothing is created in them. ``output``: the command's own run directory, never locked here (its
    exclusive lock is)."""
    mine = os.path.realpath(output) if output is not None else None
    fds: list[int] = []
    try:
        for root in dict.fromkeys(os.path.realpath(r) for r in roots if r is not None):
            if root == mine or not os.path.isdir(root):
                continue
            path = Path(root) / LOCK_FILE
            try:
                fd = _shared_lock(path)
            except BlockingIOError:
                raise RunLocked(
                    f"{root}: being written by another jaxinf process ({lock_holder(path)}); wait for it to "
                    "finish, then read it"
                ) from None
            if fd is not None:
                fds.append(fd)
        yield
    finally:
        for fd in fds:
            os.close(fd)
