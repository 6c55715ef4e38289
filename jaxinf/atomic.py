"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Shared by the run store and the analysis (which does not import JAX).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def write_atomic(path: Path, data: bytes | str | Callable[[Any], None]) -> None:
    """Writes ``path`` through a temporary file in the same directory, ``fsync`` and a rename.

    ``data`` is the content, or a function that writes it to the open binary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
