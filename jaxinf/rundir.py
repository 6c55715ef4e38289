"""What a run directory is, a safe ``--overwrite``, and a damaged ``run.json``.

A directory is a *jaxinf run* when it holds ``run.json`` or ``state/run.json``
(the copy the store writes beside every ``run.json``). Nothing here ever deletes
or empties a directory that is not one.

``--overwrite`` (:func:`set_aside`) moves the entries of the old run into
``RUN/.jaxinf-previous/`` (renames within the directory: no copy, no space
needed) and the new run starts in the emptied directory. Only once the new run
has started cleanly (config valid, model, documents and queries read,
fingerprints recorded) is the old run deleted (:meth:`Aside.discard`); if the
start fails, the new run's files are removed and the old run is moved back
(:meth:`Aside.restore`). A start killed before either leaves
``.jaxinf-previous/``, which the next start finds and moves back
(:func:`recover_interrupted`) before doing anything else; a kill during the
deletion leaves ``.jaxinf-discarded/``, which is deleted.

A ``run.json`` that cannot be read is restored from ``state/run.json`` when that
copy is intact (the stage results are then verified against their checksums as
always); otherwise the error says exactly what ``--overwrite`` would delete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("jaxinf")

RECORD = "run.json"
RECORD_COPY = ("state", "run.json")
PREVIOUS = ".jaxinf-previous"
DISCARDED = ".jaxinf-discarded"
LOCK_FILE = ".jaxinf.lock"
OURS = {LOCK_FILE, PREVIOUS, DISCARDED, ".gitkeep"}   # entries that never make a directory "not empty"


class StoreError(RuntimeError):
    """A run directory that cannot be used as asked (the message names the path)."""


def is_run(root: Path) -> bool:
    """Whether ``root`` is a jaxinf run directory (``run.json`` or its copy ``state/run.json``)."""
    return (root / RECORD).is_file() or root.joinpath(*RECORD_COPY).is_file()


def foreign_entries(root: Path) -> list[str]:
    """Entries of ``root`` that are not a jaxinf run's bookkeeping (non-empty: the directory holds something else)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name not in OURS)


def check_target(root: Path, overwrite: bool) -> None:
    """Refuses a ``run.out`` that exists, is not empty and is not a jaxinf run, with or without ``--overwrite``."""
    if not root.exists() or is_run(root) or (root / PREVIOUS).is_dir():
        return
    if not root.is_dir():
        raise StoreError(f"{root}: exists and is not a directory; choose another run.out")
    entries = foreign_entries(root)
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        verb = "will not be overwritten: it" if overwrite else "exists and"
        raise StoreError(f"{root}: {verb} is not a jaxinf run directory (no run.json; it holds {shown}); "
                         "choose another run.out")


def recover_interrupted(root: Path) -> None:
    """Finishes what a killed ``--overwrite`` left: moves an old run set aside back, deletes one being deleted."""
    if (root / DISCARDED).exists():
        shutil.rmtree(root / DISCARDED)
    if (root / PREVIOUS).is_dir():
        _remove_entries(root)
        _move_entries(root / PREVIOUS, root)
        (root / PREVIOUS).rmdir()
        log.warning("%s: an --overwrite was interrupted before the new run started; the previous run is restored",
                    root)


class Aside:
    """An old run moved into ``RUN/.jaxinf-previous/`` while a new one starts in ``RUN``."""

    def __init__(self, root: Path):
        self.root = root
        self.previous = root / PREVIOUS

    def restore(self) -> None:
        """The new run's files removed and the old run moved back (the start failed)."""
        if self.previous.is_dir():
            _remove_entries(self.root)
            _move_entries(self.previous, self.root)
            self.previous.rmdir()

    def discard(self) -> None:
        """The old run deleted (the new one started cleanly); renamed first so a kill cannot leave half of it."""
        if self.previous.is_dir():
            os.replace(self.previous, self.root / DISCARDED)
            shutil.rmtree(self.root / DISCARDED)


def set_aside(root: Path) -> Aside | None:
    """Moves the run in ``root`` into ``root/.jaxinf-previous/``; None when there is nothing to set aside."""
    if not root.is_dir() or not is_run(root):
        return None
    aside = Aside(root)
    aside.previous.mkdir()
    _move_entries(root, aside.previous)
    return aside


def _entries(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name not in OURS]


def _move_entries(src: Path, dst: Path) -> None:
    for p in _entries(src):
        os.replace(p, dst / p.name)


def _remove_entries(root: Path) -> None:
    for p in _entries(root):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def read_record(root: Path) -> dict | None:
    """``run.json``, or its intact copy ``state/run.json`` (restored, with a warning) when ``run.json`` is damaged
    or missing; None when neither exists. Raises ``StoreError`` saying what ``--overwrite`` would delete when
    neither can be read."""
    path, copy = root / RECORD, root.joinpath(*RECORD_COPY)
    if not path.exists() and not copy.exists():
        return None
    problem = None
    try:
        return _parse(path)
    except FileNotFoundError:
        problem = "missing"
    except (OSError, ValueError, KeyError) as e:
        problem = f"unreadable ({e})"
    try:
        record = _parse(copy)
    except (OSError, ValueError, KeyError) as e:
        raise StoreError(f"{path}: {problem}, and its copy {copy} is too ({type(e).__name__}); "
                         f"--overwrite would delete {describe_contents(root)}") from None
    log.warning("%s: %s; restored from its copy %s (saved results are verified against their checksums as usual)",
                path, problem, copy)
    return record


def _parse(path: Path) -> dict:
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or not isinstance(record["config"], dict) or not isinstance(record["stages"], dict):
        raise ValueError("not a run record")
    return record


def describe_contents(root: Path) -> str:
    """Everything in ``root`` (what ``--overwrite`` deletes), one line: each entry with its files and bytes."""
    parts, total_files, total_bytes = [], 0, 0
    for p in sorted(_entries(root), key=lambda p: p.name):
        files = [p] if not p.is_dir() else [f for f in p.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        total_files, total_bytes = total_files + len(files), total_bytes + size
        parts.append(f"{p.name}/ ({len(files)} files)" if p.is_dir() else p.name)
    return f"everything in {root}: {', '.join(parts)} ({total_files} files, {total_bytes:,} bytes)"
