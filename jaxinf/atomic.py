"""Atomic file writes: a reader sees the old file or the new one, never half of either; the one digest of a
file's bytes (:func:`file_sha256`) that checkpoints, input fingerprints and prepared datasets record; and the one
reader of the ``.npy`` and ``.npz`` files a user (or a damaged disk) could have changed (:func:`load_npy`).

Shared by the run store, the data layer and the analysis (which does not import JAX).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxinf.errors import UserError


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only where /proc is missing)
    os.umask(mask)
    return mask


def usual_mode(directory: bool = False) -> int:
    """The permissions ``open``/``mkdir`` would give a new file or directory: 0666 or 0777 less the umask.

    Temporary files and directories are created 0600/0700; what is renamed into place gets these instead.
    """
    return (0o777 if directory else 0o666) & ~current_umask()


def make_temp_dir(prefix: str, parent: Path) -> Path:
    """A new temporary directory in ``parent`` with the usual permissions (for building a directory renamed later)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, usual_mode(directory=True))
    return tmp


class LockFailed(OSError):
    """``flock`` itself failed (a file system without locks), not because another process holds the lock."""


def hold_lock(path: Path) -> int | None:
    """An exclusive advisory lock (``flock``, non-blocking) on the file ``path``, created if missing: its descriptor
    (closing it releases the lock), or None while another process holds it. The lock is the kernel's, released
    however its holder ends (SIGKILL, OOM), so a file left behind is no obstacle. A lock file removed or replaced
    while this process waited for it is opened again, so its holder may remove it when done (:func:`drop_lock`).
    Raises the ``OSError`` of ``open`` as it is, and :class:`LockFailed` when ``flock`` cannot lock at all or
    ``path`` is a symbolic link (never followed)."""
    while True:  # O_NOFOLLOW: a link planted at the path would have this process truncate its target (ELOOP)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise LockFailed(
                e.errno, "a symbolic link where the lock file belongs, never followed: remove it", str(path)
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise LockFailed(e.errno, e.strerror, str(path)) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # removed by its holder meanwhile: lock the file now at the path


def drop_lock(path: Path, fd: int) -> None:
    """Removes the lock file ``path`` held through ``fd`` (:func:`hold_lock`), then releases it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


def lock_holder(path: Path) -> str:
    """``host H pid P`` as the holder of the lock file ``path`` wrote it (:func:`write_holder`), or that it is
    unknown."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def write_holder(fd: int) -> None:
    """Writes ``host H pid P`` of this process into the lock file held through ``fd``, for :func:`lock_holder`."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)


log = logging.getLogger("jaxinf")


@contextlib.contextmanager
def building_dir(prefix: str, parent: Path, busy: Callable[[str], Exception], final: Path) -> Iterator[Path]:
    """A new temporary directory ``parent/PREFIXxxxxxxxx`` to build the directory ``final`` in (the caller renames it,
    or moves its files, into place), removed at the end however the block ends, under the lock file
    ``parent/PREFIXlock`` (:func:`hold_lock`, removed at the end too): one process at a time builds with ``prefix``,
    and the others get ``busy(holder)`` raised (``host H pid P``). So a temporary directory with this prefix that
    another process left (one killed by SIGKILL, OOM or a lost machine, which could not remove it) is seen under the
    lock as a dead writer's and removed first, with a warning naming it; never one a live process is writing.

    A write refused inside the block (a full disk, a file-size limit) names the file where it was going in ``final``,
    not in the temporary directory, which is gone by the time the message is read: an ``OSError``'s file name, or a
    library's error that says so only in its text (array_record's writer, whose message named
    ``.OUT.prepare-xxxxxxxx/data/.../.records-0``)."""
    path = parent / f"{prefix}lock"
    fd = hold_lock(path)
    if fd is None:
        raise busy(lock_holder(path))
    try:
        with contextlib.suppress(OSError):
            write_holder(fd)
        left = [p for p in parent.iterdir() if _is_temp_dir(p, prefix)]
        for p in left:
            shutil.rmtree(p, ignore_errors=True)
        if left:
            log.warning(
                "%s: removed %s left by a process killed while it wrote (%s)",
                parent,
                "a temporary directory" if len(left) == 1 else f"{len(left)} temporary directories",
                ", ".join(sorted(p.name for p in left)),
            )
        tmp = make_temp_dir(prefix, parent)
        try:
            yield tmp
        except OSError as e:
            renamed = _named_in(e, tmp, final)
            if renamed is None:
                raise
            raise renamed from e
        except Exception as e:  # a library's failed write, known only from its text (array_record's, in prepare)
            if type(e).__module__.startswith("jaxinf") or str(tmp) not in str(e):
                raise
            raise RuntimeError(str(e).replace(str(tmp), str(final))) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        drop_lock(path, fd)


def _named_in(e: OSError, tmp: Path, final: Path) -> OSError | None:
    """``e`` (same errno and reason) naming the file of ``final`` that its file under ``tmp`` was to become; None when
    it names no file under ``tmp``."""
    if not isinstance(e.filename, str):
        return None
    try:
        inside = Path(e.filename).relative_to(tmp)
    except ValueError:
        return None
    return OSError(e.errno, e.strerror, str(final / inside) if inside.parts else str(final))


def _is_temp_dir(p: Path, prefix: str) -> bool:
    """Whether ``p`` is a directory ``tempfile.mkdtemp(prefix=prefix)`` makes: the prefix and 8 random characters
    (so that ``.ds.prepare-`` never takes the temporary directory of OUT ``ds.prepare-x`` for its own)."""
    rest = p.name[len(prefix) :] if p.name.startswith(prefix) else ""
    return re.fullmatch(r"[a-z0-9_]{8}", rest) is not None and p.is_dir() and not p.is_symlink()


def write_atomic(path: Path, data: bytes | str | Callable[[Any], None]) -> None:
    """Writes ``path`` through a temporary file in the same directory, ``fsync`` and a rename.

    ``data`` is the content, or a function that writes it to the open binary file. The file gets the usual
    permissions (:func:`usual_mode`, 0644 under umask 022), not the temporary file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, usual_mode())
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename (never a half-written .npy)."""
    write_atomic(path, lambda f: np.save(f, array))


def write_jsonl(path: Path, records: Iterable[Mapping]) -> None:
    """One JSON object per line (UTF-8, no ASCII escaping), atomically."""

    def write(f):
        for r in records:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))

    write_atomic(path, write)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, in hex, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class ArrayFileError(UserError):
    """A file that should hold a numpy array and does not: its message is ``NAME: REASON`` in one line, in jaxinf's
    words (never numpy's, which speak of ``allow_pickle``); ``reason`` is the part after the name."""

    def __init__(self, label: str, reason: str):
        super().__init__(f"{label}: {reason}")
        self.reason = reason


def npy_header(path: str | os.PathLike, name: str | None = None) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """The ``(shape, fortran_order, dtype, data offset)`` of the ``.npy`` file ``path``, checked: a file that is not
    one (no header, a header that does not parse), one that holds Python objects (a pickle inside, which jaxinf
    never loads) or one shorter than its header announces raises :class:`ArrayFileError` naming ``name`` (default:
    the path). An ``OSError`` (missing, unreadable) is raised as it is."""
    label = str(path) if name is None else name
    with open(path, "rb") as f:
        shape, fortran, dtype = _header(f, label)
        offset, size = f.tell(), os.fstat(f.fileno()).st_size
    need = offset + dtype.itemsize * math.prod(shape)
    if size < need:
        raise ArrayFileError(label, f"cut short ({size:,} bytes, its header describes {need:,}): a damaged file")
    return shape, fortran, dtype, offset


def _header(f, label: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
    except (ValueError, EOFError):
        raise ArrayFileError(label, "not a numpy array file (no .npy header)") from None
    try:
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ArrayFileError(label, f"a .npy file of version {version[0]}.{version[1]}, which jaxinf does not read")
    except (ValueError, EOFError, SyntaxError) as e:
        if isinstance(e, ArrayFileError):
            raise
        raise ArrayFileError(label, "not a valid numpy array file (its header does not parse)") from None
    if dtype.hasobject:
        raise ArrayFileError(label, "holds Python objects, not numbers (a pickle, which jaxinf never loads)")
    return shape, fortran, dtype


def load_npy(path: str | os.PathLike, *, mmap_mode: Any = None, name: str | None = None) -> np.ndarray:
    """The array of the ``.npy`` file ``path`` (memory-mapped with ``mmap_mode``), checked by :func:`npy_header`
    first: anything but a whole numeric array raises :class:`ArrayFileError` naming ``name`` (default: the path)."""
    npy_header(path, name)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, EOFError):  # a file changed between the check and the read
        raise ArrayFileError(str(path) if name is None else name, "not a valid numpy array file") from None


def load_npz(path: str | os.PathLike, *, name: str | None = None) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` archive ``path``, read whole and checked as :func:`load_npy` checks one (each
    named ``NAME[KEY]``); an archive that is not a zip file or is damaged raises :class:`ArrayFileError`."""
    label = str(path) if name is None else name
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                with z.open(info) as f:
                    _header(f, f"{label}[{info.filename.removesuffix('.npy')}]")
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as e:
        if isinstance(e, ArrayFileError):
            raise
        raise ArrayFileError(label, "not a numpy archive (.npz) file, or a damaged one") from None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError):
        raise ArrayFileError(label, "a damaged numpy archive (.npz) file (an array cut short)") from None
