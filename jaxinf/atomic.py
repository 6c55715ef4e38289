"""Atomic file writes: a reader sees the old file or the new one, never half of either; and the one digest of a
file's bytes (:func:`file_sha256`) that checkpoints, input fingerprints and prepared datasets record.

Shared by the run store, the data layer and the analysis (which does not import JAX).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


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
