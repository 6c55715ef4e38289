"""What a run directory is, a safe ``--overwrite``, and a damaged ``run.json``.

A directory is a *jaxinf run* when its ``run.json`` or ``state/run.json`` (the
copy the store writes beside every ``run.json``) is a jaxinf run record: it
carries the marker ``"format": "jaxinf run"`` (runs started before the marker:
a config, stage status, config fingerprint and jaxinf version), never a file
name alone: other tools write files called ``run.json``. A run whose two
records are both damaged is still recognised by its lock file ``.jaxinf.lock``
(only jaxinf writes it), so that the error can say what ``--overwrite`` would
delete. Nothing here ever deletes or empties a directory that is not one.

``--overwrite`` (:func:`set_aside`) moves the entries of the old run into
``RUN/.jaxinf-previous/`` (renames within the directory: no copy, no space
needed) once every check that can be made before work starts has passed, and
the new run starts in the emptied directory. Only once the new run has
*finished* (every stage, the exports, the analysis and any index) is the old
run deleted (:meth:`Aside.discard`); a failure of any kind before that (an
input error at start-up, a non-finite value met by a later stage, an exception
in the exports, a full disk, Ctrl-C) removes the new attempt's files and moves
the old run back as it was, byte for byte (:meth:`Aside.restore`): a failed
``--overwrite`` keeps nothing of the new attempt, and the same command starts
it over. Until then both runs occupy the disk. A process killed before either
(SIGKILL, SIGTERM, the machine lost) leaves ``.jaxinf-previous/``, which the
next start finds and moves back (:func:`recover_interrupted`) before doing
anything else; a kill during the deletion leaves ``.jaxinf-discarded/``, which
is deleted. Entries move by renames, one by one; while the old run's entries
are moving (aside, or back), the marker ``.jaxinf-moving`` says that what
``RUN`` holds is the old run's, so that a kill half-way through a move is
finished by the next start without taking them for the new attempt's.

A ``run.json`` that cannot be read is restored from ``state/run.json`` when that
copy is intact (the stage results are then verified against their checksums as
always); otherwise the error says exactly what ``--overwrite`` would delete.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from jaxinf import config as cfg
from jaxinf.errors import UserError

log = logging.getLogger("jaxinf")

RECORD = "run.json"
RECORD_COPY = ("state", "run.json")
PREVIOUS = ".jaxinf-previous"
DISCARDED = ".jaxinf-discarded"
MOVING = ".jaxinf-moving"  # while it exists, every entry of RUN is the old run's (moving aside, or moving back)
LOCK_FILE = ".jaxinf.lock"
OURS = {LOCK_FILE, PREVIOUS, DISCARDED, MOVING, ".gitkeep"}  # entries that never make a directory "not empty"

_OUTPUT_KEY: contextvars.ContextVar[str] = contextvars.ContextVar("jaxinf_output_key", default="run.out")


def output_key() -> str:
    """The setting that names the output directory of the command running, as a message tells the user to change
    it: ``run.out`` (``jaxinf run``, and any caller of :func:`jaxinf.pipeline.run`), or ``--out`` inside
    :func:`output_named` (``jaxinf query``, ``validate``, ``demo``, where ``run.out`` is no option of theirs)."""
    return _OUTPUT_KEY.get()


@contextlib.contextmanager
def output_named(key: str) -> Iterator[None]:
    """The block of a command whose output directory is the option ``key`` (:func:`output_key`)."""
    token = _OUTPUT_KEY.set(key)
    try:
        yield
    finally:
        _OUTPUT_KEY.reset(token)


_QUERIED: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxinf_queried", default=False)


@contextlib.contextmanager
def queried() -> Iterator[None]:
    """The block of ``jaxinf query RUN_OR_INDEX``, which sets ``factors.from`` itself: its messages name the keys of
    the query that differ from its run's (:func:`jaxinf.run.factors_from.check`), not a ``factors.from`` the user
    never wrote, and a resumed query names its QUERIES argument (:class:`jaxinf.run.store.RunStore`)."""
    token = _QUERIED.set(True)
    try:
        yield
    finally:
        _QUERIED.reset(token)


def in_query() -> bool:
    """Whether this is the block of ``jaxinf query`` (:func:`queried`), whose messages name its arguments."""
    return _QUERIED.get()


class StoreError(UserError, RuntimeError):
    """A run directory that cannot be used as asked (the message names the path)."""


MARKER = "jaxinf run"  # run.json's "format": what makes a directory a jaxinf run


def is_record(record) -> bool:
    """Whether a parsed ``run.json`` is a jaxinf run's: the marker, or (a run started before the marker) a config,
    the stages' status, the config's fingerprint and the jaxinf version."""
    if not isinstance(record, dict):
        return False
    if record.get("format") == MARKER:
        return True
    versions = record.get("versions")
    return (
        isinstance(record.get("config"), dict)
        and isinstance(record.get("stages"), dict)
        and isinstance(record.get("fingerprint"), str)
        and isinstance(versions, dict)
        and "jaxinf" in versions
    )


def _holds_record(path: Path) -> bool | None:
    """True: ``path`` is a jaxinf run record; False: absent or another tool's; None: a file that cannot be parsed."""
    if not path.is_file():
        return False
    try:
        return is_record(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def is_run(root: Path) -> bool:
    """Whether ``root`` is a jaxinf run directory: ``run.json`` or its copy ``state/run.json`` is a jaxinf run record
    (:func:`is_record`), or neither can be parsed and the directory holds jaxinf's lock file (a damaged run)."""
    found = [_holds_record(root / RECORD), _holds_record(root.joinpath(*RECORD_COPY))]
    if any(f is True for f in found):
        return True
    return any(f is None for f in found) and (root / LOCK_FILE).is_file()


def why_not_run(root: Path) -> str:
    """Why ``root`` (not :func:`is_run`) is not a jaxinf run directory, in a few words."""
    if not root.is_dir():  # "no run.json" of a path that does not exist, or of a file
        return "a file, not a directory" if root.exists() else "no such directory"
    if (root / RECORD).exists() or root.joinpath(*RECORD_COPY).exists():
        return "its run.json is not a jaxinf run record"
    return "no run.json"


def foreign_entries(root: Path) -> list[str]:
    """Entries of ``root`` that are not a jaxinf run's bookkeeping (non-empty: the directory holds something else)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name not in OURS)


def is_whole(path: Path) -> bool:
    """Whether an exported file is in place and whole, cheaply: a ``.npy`` whose header and data length agree, a
    ``.json`` that parses, a ``.jsonl`` that ends its last line (a copy cut short, a damaged disk: redone on a rerun
    rather than kept as finished)."""
    try:
        if not path.is_file():
            return False
        if path.suffix == ".npy":
            from jaxinf.atomic import npy_header

            npy_header(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                return f.read(1) == b"\n"
    except (OSError, ValueError, EOFError):
        return False
    return True


def enclosing_run(root: Path) -> Path | None:
    """The jaxinf run directory that ``root`` lies inside (its path as given, or with links resolved), or None.
    A run's ``state/`` holds a copy of its record, so without this rule ``run.out=RUN/state --overwrite`` took it
    for a run and replaced the curvature, index and scores of RUN."""
    for path in dict.fromkeys((Path(os.path.abspath(root)), Path(os.path.realpath(root)))):
        found = [parent for parent in path.parents if is_run(parent)]
        if found:
            return found[-1]  # the outermost: RUN rather than RUN/state
    return None


def refuse_inside_run(root: Path, key: str, output: bool = False) -> None:
    """Refuses a directory inside another run directory: as an input (``factors.from``, ``index.from``, ``jaxinf
    query RUN``, ``analyze``, ``compare --run``, ``kronfluence export``), ``RUN/state`` holds a copy of RUN's record,
    so it read as a run whose stages were done and whose results were missing (``index not built yet (stage index
    done)``, ``stage eigen will be recomputed``, ``the eigendecomposition is missing or corrupted``); as an
    ``output`` (``key``: ``run.out``, ``--out``), a run written there would replace RUN's own files."""
    outer = enclosing_run(root)
    if outer is None:
        return
    if output:
        article = "an" if key[:1] in "AEIOU" else "a"  # a run.out, a --out, an OUT_DIR
        raise StoreError(f"{root}: is inside the jaxinf run directory {outer}; choose {article} {key} outside it")
    raise StoreError(f"{key}: {root}: is inside the jaxinf run directory {outer}; give the run directory itself")


def check_output_file(path: str, option: str) -> None:
    """Refuses, before any work, a file option's path (``--json`` of ``plan`` and ``compare``) that cannot take the
    file or must not: a directory, a missing directory, a path that exists and is not a regular file (the atomic
    write renames a new file over it: ``/dev/full`` or a FIFO was replaced by a regular file), or a path inside a
    jaxinf run directory (``--json RUN/scores.npy`` replaced the run's scores with the report)."""
    target = Path(path)
    if target.is_dir():
        raise StoreError(f"{option} {path}: is a directory; give the path of a file to write")
    if not target.parent.is_dir():
        raise StoreError(f"{option} {path}: no such directory {target.parent}")
    if target.exists() and not target.is_file():
        raise StoreError(
            f"{option} {path}: is not a regular file (a device, FIFO or socket, which the write would replace); give "
            f"the path of a file to write, or {option} - to print it"
        )
    refuse_inside_run(target, option, output=True)


def check_target(root: Path, overwrite: bool) -> None:
    """Refuses a ``run.out`` that exists, is not empty and is not a jaxinf run, with or without ``--overwrite``
    (the message names the setting: :func:`output_key`), and one inside another run directory."""
    key = output_key()
    refuse_inside_run(root, key, output=True)
    if not root.exists() or is_run(root) or (root / PREVIOUS).is_dir():
        return
    if not root.is_dir():
        raise StoreError(f"{root}: exists and is not a directory; choose another {key}")
    entries = foreign_entries(root)
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        verb = "will not be overwritten: it" if overwrite else "exists and"
        raise StoreError(
            f"{root}: {verb} is not a jaxinf run directory ({why_not_run(root)}; it holds {shown}); "
            f"choose another {key}"
        )


def recover_interrupted(root: Path) -> None:
    """Finishes what a killed ``--overwrite`` left: moves an old run set aside back, deletes one being deleted."""
    if (root / PREVIOUS).is_dir():
        _move_back(root)
        log.warning(
            "%s: an --overwrite was interrupted before the new run finished; the previous run is restored", root
        )
    (root / MOVING).unlink(missing_ok=True)
    if (root / DISCARDED).exists():
        shutil.rmtree(root / DISCARDED)


def _move_back(root: Path) -> None:
    """The old run in ``root/.jaxinf-previous/`` moved back, whatever entries ``root`` holds and wherever a kill
    stopped an earlier move. Every step is a rename, repeatable: the new attempt's entries go into
    ``.jaxinf-discarded/`` first (deleted last); the marker ``.jaxinf-moving`` then says that what ``root`` holds is
    the old run's (so a rerun after a kill moves the rest back without taking those for the new attempt's)."""
    if not (root / MOVING).exists():
        if (root / DISCARDED).exists():  # left by a kill: garbage either way
            shutil.rmtree(root / DISCARDED)
        (root / DISCARDED).mkdir()
        _move_entries(root, root / DISCARDED)
        (root / MOVING).touch()
    _move_entries(root / PREVIOUS, root)
    (root / PREVIOUS).rmdir()
    (root / MOVING).unlink()
    shutil.rmtree(root / DISCARDED, ignore_errors=True)


class Aside:
    """An old run moved into ``RUN/.jaxinf-previous/`` while a new one runs in ``RUN``."""

    def __init__(self, root: Path):
        self.root = root
        self.previous = root / PREVIOUS

    def restore(self) -> bool:
        """The new attempt's files removed and the old run moved back (the new run failed); whether there was one to
        move back (not once :meth:`discard` has begun)."""
        if not self.previous.is_dir():
            return False
        _wait_for_writers(self.root)
        _move_back(self.root)
        return True

    def discard(self) -> None:
        """The old run deleted (the new one finished); renamed first so a kill cannot leave half of it."""
        if self.previous.is_dir():
            os.replace(self.previous, self.root / DISCARDED)
            shutil.rmtree(self.root / DISCARDED)


WRITERS_QUIET_S, WRITERS_LIMIT_S = 0.5, 30.0


def _wait_for_writers(root: Path) -> None:
    """Until the temporary directories of a failed Orbax save under ``root/state`` stop changing (for
    :data:`WRITERS_QUIET_S`, at most :data:`WRITERS_LIMIT_S`): Orbax's writer threads (TensorStore) go on writing a
    failed save's other files, by path, after the failure is raised; moved away too early, those files would be
    written again into the old run put back in its place."""

    def state() -> list[tuple[str, int, int]]:
        found = []
        for tmp in (root / "state").rglob("*.orbax-checkpoint-tmp*") if (root / "state").is_dir() else ():
            files = [tmp] if tmp.is_file() else tmp.rglob("*")
            found += [(str(f), st.st_size, st.st_mtime_ns) for f in files if (st := _stat(f)) is not None]
        return sorted(found)

    before, deadline = state(), time.monotonic() + WRITERS_LIMIT_S
    while before and time.monotonic() < deadline:
        time.sleep(WRITERS_QUIET_S)
        now = state()
        if now == before:
            return
        before = now


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:  # renamed or removed meanwhile
        return None


def set_aside(root: Path) -> Aside | None:
    """Moves the run in ``root`` into ``root/.jaxinf-previous/``; None when there is nothing to set aside. The marker
    ``.jaxinf-moving`` stands while entries move, so that a kill half-way is undone by moving them back."""
    if not root.is_dir() or not is_run(root):
        return None
    aside = Aside(root)
    (root / MOVING).touch()
    aside.previous.mkdir()
    _move_entries(root, aside.previous)
    (root / MOVING).unlink()
    return aside


def _entries(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name not in OURS]


def _move_entries(src: Path, dst: Path) -> None:
    for p in _entries(src):
        os.replace(p, dst / p.name)


def _remove_entries(root: Path) -> None:
    for p in _entries(root):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def read_record(root: Path, output: bool = False, config_only: bool = False) -> dict | None:
    """``run.json``, or its intact copy ``state/run.json`` (restored, with a warning) when ``run.json`` is damaged
    or missing; None when neither exists. Raises ``StoreError`` when neither can be read, saying what
    ``--overwrite`` would delete when ``root`` is the ``output`` of the command (not a run it reads: ``factors.from``,
    ``jaxinf query RUN``, whose ``--overwrite`` never touches it). ``config_only``: any JSON object whose ``config``,
    if any, is an object (``jaxinf analyze`` of scores another tool wrote, with a run.json written for them)."""
    path, copy = root / RECORD, root.joinpath(*RECORD_COPY)
    if not path.exists() and not copy.exists():
        return None
    problem = None
    try:
        return _parse(path, config_only)
    except (OSError, ValueError, KeyError) as e:
        problem = _unreadable(e)
    try:
        record = _parse(copy, config_only)
    except (OSError, ValueError, KeyError) as e:
        raise StoreError(
            f"{path}: {problem}, and its copy {copy} is {_unreadable(e)}; "
            + (f"--overwrite would delete {describe_contents(root)}" if output else "the run cannot be read")
        ) from None
    log.warning(
        "%s: %s; restored from its copy %s (saved results are verified against their checksums as usual)",
        path,
        problem,
        copy,
    )
    return record


def recorded_config(record: dict, root: Path) -> cfg.Config:
    """The config the run in ``root`` recorded (its ``record``'s ``config``), each path key read as the run read it:
    from the directory it was started in (the record's ``cwd``; the working directory for a record without one).
    ``jaxinf query RUN``, ``factors.from`` and ``kronfluence export`` started elsewhere read a run's relative paths
    from their own directory ("model.checkpoint: model: no such directory"). Raises ``ConfigError``."""
    return cfg.located(cfg.from_dict(record["config"], str(root / RECORD)), recorded_cwd(record) or os.getcwd())


def recorded_cwd(record: dict) -> str | None:
    """The working directory the run of ``record`` was started in (its ``cwd``), against which its config's relative
    paths were read; None for a record without one (a run older than the field, or a damaged field): each reader
    then falls back as it must (this process's working directory, or the run directory too for the analysis)."""
    where = record.get("cwd")
    return where if isinstance(where, str) and where else None


_FILES = {"*": {"sha256": str}}
RECORD_SHAPE: dict = {
    "config": dict,
    "fingerprint": str,
    "stages": {"*": {"status": str, "files": _FILES, "plan": {"processes": int, "batch_size": int, "batches": int}}},
    "inputs": {
        "model": {"files": _FILES},
        "tokenizer": {"files": _FILES},
        "documents": dict,
        "queries": dict,
        "factors": {"sha256": str},
    },
    "imported": dict,
}
"""The fields of ``run.json`` that jaxinf reads, each with the type it writes there (a mapping: an object whose
fields have these shapes; ``"*"``: every entry of it). A field may be absent (a record of an older jaxinf), never
another type or null: one hand-edited or damaged field was a traceback wherever it was first read."""

_JSON_TYPES = {dict: "an object", str: "a string", int: "an integer", list: "a list"}


def _json_type(value) -> str:
    if value is None:
        return "null"
    for t, name in ((bool, "a boolean"), *_JSON_TYPES.items(), (float, "a number")):
        if isinstance(value, t):
            return name
    return type(value).__name__


def shape_problem(value, shape, where: str = "") -> str | None:
    """The first field of ``value`` (parsed JSON) that is not of ``shape`` (:data:`RECORD_SHAPE`), as ``field a.b
    is null, expected an object``; None when every field present is."""
    kind = dict if isinstance(shape, dict) else shape
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        return f"field {where or '(the record)'} is {_json_type(value)}, expected {_JSON_TYPES[kind]}"
    if isinstance(shape, dict):
        for key, sub in shape.items():
            for name in value if key == "*" else [key] if key in value else []:
                problem = shape_problem(value[name], sub, f"{where}.{name}" if where else str(name))
                if problem is not None:
                    return problem
    return None


def _unreadable(e: BaseException) -> str:
    """Why a run record could not be read, for a message naming its file: "missing", "unreadable (Permission
    denied)", "unreadable (not JSON: ...)" (the copy of a damaged run.json was named by its error type alone)."""
    if isinstance(e, FileNotFoundError):
        return "missing"
    if isinstance(e, json.JSONDecodeError):
        return f"unreadable (not JSON: {e.msg} at line {e.lineno}, column {e.colno})"
    if isinstance(e, UnicodeDecodeError):
        return f"unreadable (not UTF-8 text at byte {e.start + 1})"
    if isinstance(e, OSError):
        return f"unreadable ({e.strerror or e})"
    return f"unreadable ({e})"


def _parse(path: Path, config_only: bool = False) -> dict:
    record = json.loads(path.read_text())
    if not isinstance(record, dict):
        raise ValueError(f"not a run record: {_json_type(record)}, not an object")
    for key in () if config_only else ("config", "stages"):
        if key not in record:
            raise ValueError(f"not a run record: no field {key}")
    problem = shape_problem(record, {"config": dict} if config_only else RECORD_SHAPE)
    if problem is not None:
        raise ValueError(f"not a run record: {problem}")
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


# --------------------------------------------------------------------------- a refused start leaves nothing


class Fresh:
    """A run directory that this start created or found empty (bookkeeping aside): a start that fails removes what
    it wrote, its lock file, and the directory itself when it created it, so a refused start leaves nothing."""

    def __init__(self, root: Path, created: bool):
        self.root, self.created = root, created

    def restore(self) -> None:
        if not self.root.is_dir():
            return
        _remove_entries(self.root)
        (self.root / LOCK_FILE).unlink(missing_ok=True)
        if self.created:
            try:
                self.root.rmdir()
            except OSError:  # something else appeared in it meanwhile: left as it is
                pass

    def discard(self) -> None:
        pass


def is_fresh(root: Path) -> bool:
    """Whether ``root`` does not exist or holds nothing but bookkeeping (what :class:`Fresh` may remove); never when
    it holds an old run that a killed ``--overwrite`` set aside (:func:`recover_interrupted` moves it back)."""
    return not root.exists() or (root.is_dir() and not foreign_entries(root) and not (root / PREVIOUS).exists())


# --------------------------------------------------------------------------- validate --out, demo --out

OUTPUT_MARKER = ".jaxinf-output"  # in DIR of `jaxinf validate --out DIR` and `jaxinf demo --out DIR`: which command
LEGACY_OUTPUTS = {  # what the command wrote before the marker (a directory holding only these is its)
    "validate": ({"work"}, {"work", "validation.json", "report"}),
    "demo": ({"data"}, {"data", "model", "train", "config.yaml", "run"}),
}


def _output_kind(root: Path) -> str | None:
    try:
        record = json.loads((root / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    kind = record.get("format", "") if isinstance(record, dict) else ""
    return kind[len("jaxinf ") :] if kind.startswith("jaxinf ") else None


def check_output(root: Path, kind: str) -> None:
    """The rule of ``jaxinf validate --out`` and ``jaxinf demo --out`` (``kind``), as :func:`check_target` is
    ``jaxinf run``'s: a directory that does not exist, is empty, or is that command's own (its marker
    ``.jaxinf-output``, or only what that command writes) is accepted; a file, a jaxinf run directory, another
    command's directory and any other non-empty directory are refused (naming :func:`output_key`), and nothing is
    written."""
    key = output_key()
    refuse_inside_run(root, key, output=True)
    if not root.exists():
        return
    if not root.is_dir():
        raise StoreError(f"{root}: exists and is not a directory; choose another {key}")
    theirs = _output_kind(root)
    if theirs == kind:
        return
    if theirs is not None:
        raise StoreError(
            f"{root}: is the output directory of jaxinf {theirs}, not of jaxinf {kind}; choose another {key}"
        )
    if is_run(root):
        raise StoreError(f"{root}: is a jaxinf run directory (jaxinf run writes it); choose another {key}")
    entries = [e for e in foreign_entries(root) if e != OUTPUT_MARKER]
    required, allowed = LEGACY_OUTPUTS[kind]
    if not entries or (required <= set(entries) <= allowed):
        return
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise StoreError(f"{root}: exists and is not a jaxinf {kind} directory (it holds {shown}); choose another {key}")
