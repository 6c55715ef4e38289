"""The run directory: ``run.json``, Orbax checkpoints of every stage, and atomic exports.

Layout::

    RUN/
      run.json                 config, fingerprint, library versions, status of each stage
      state/<stage>/<step>/    Orbax checkpoints (covariance and Lambda sums every K batches,
                               eigendecomposition, Lambda, query gradients, score chunks)
      scores.npy, queries.jsonl, documents.jsonl, topk.jsonl, summary.json, report/

Saving is atomic twice over: Orbax writes a step into a temporary directory and
renames it when complete, and only then does the store write the step's
``jaxinf_manifest.json`` (SHA-256 of every file, written to a temporary name and
renamed). A step without a manifest was interrupted and is ignored; a step
whose files do not match their checksums is reported and never used: resume
falls back to the previous good step (or recomputes), saying so.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxinf import config as cfg
from jaxinf.atomic import file_sha256, write_json
from jaxinf.errors import EnvironmentFailure
from jaxinf.faults import fault_point
from jaxinf.hostenv import heap_mode
from jaxinf.run import rundir
from jaxinf.run.rundir import StoreError

log = logging.getLogger("jaxinf")
MANIFEST = "jaxinf_manifest.json"
PACKAGES = ("jaxinf", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow-datasets")


class CorruptCheckpoint(StoreError):
    """A saved step whose files do not match the checksums written when it was saved."""


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if "jaxinf" not in out:
        from jaxinf import __version__

        out["jaxinf"] = __version__
    return out


def _step_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: Path) -> None:
    """Checksums of every file of a finished step, written last (atomically)."""
    files = {
        str(p.relative_to(step_dir)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in _step_files(step_dir)
    }
    write_json(step_dir / MANIFEST, {"files": files})


def verify_manifest(step_dir: Path) -> None:
    """Raises :class:`CorruptCheckpoint` naming the first missing, truncated or altered file."""
    manifest = step_dir / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: the stage's or step's directory is a file
        raise CorruptCheckpoint(f"{step_dir}: incomplete checkpoint (no {MANIFEST})") from None
    except (ValueError, KeyError, IsADirectoryError):
        raise CorruptCheckpoint(f"{manifest}: unreadable manifest") from None
    for rel, info in files.items():
        path = step_dir / rel
        if not path.exists():
            raise CorruptCheckpoint(f"{path}: missing checkpoint file")
        if path.stat().st_size != info["bytes"]:
            raise CorruptCheckpoint(
                f"{path}: truncated or resized checkpoint file ({path.stat().st_size} bytes, saved {info['bytes']})"
            )
        if file_sha256(path) != info["sha256"]:
            raise CorruptCheckpoint(f"{path}: corrupted checkpoint file (checksum mismatch)")


def _abstract(tree):
    """``like`` as the targets Orbax restores onto: a leaf with a sharding onto it, a leaf without one into host memory
    (a numpy template). Orbax would otherwise take the sharding the checkpoint was saved with, and refuse it on any
    other topology: a run saved on a mesh or by several processes, read by one process on one device."""

    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return (
            np.empty(x.shape, x.dtype)
            if sharding is None
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        )

    return jax.tree.map(leaf, tree)


class StageStore:
    """Orbax checkpoints of one stage: numbered steps, each verified against its manifest."""

    def __init__(self, root: Path, keep: int | None):
        import orbax.checkpoint as ocp

        self.root = Path(root).absolute()  # Orbax refuses relative checkpoint paths (run.out=runs/mine)
        self._ocp = ocp
        self._keep = keep
        self._manager = None

    @property
    def manager(self):
        if self._manager is None:
            ocp = self._ocp
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self._keep, enable_async_checkpointing=False, create=True
            )
            self._manager = ocp.CheckpointManager(self.root, options=options)
        return self._manager

    def steps(self) -> list[int]:
        """Steps on disk with a manifest, ascending (unverified)."""
        if not self.root.exists():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.isdigit() and (p / MANIFEST).exists():
                out.append(int(p.name))
        return sorted(out)

    def save(self, step: int, tree) -> None:
        """Saves ``tree`` as ``step`` and writes its manifest once Orbax has committed it."""
        step_dir = self.root / str(step)
        if step_dir.exists():  # a leftover of an interrupted save (no manifest): replace it
            shutil.rmtree(step_dir)
            self._manager = None
        self.manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
        self.manager.wait_until_finished()
        fault_point(f"{self.root.name}:before-manifest", step)
        if jax.process_index() == 0:
            write_manifest(step_dir)

    def restore(self, step: int, like=None) -> Any:
        """The tree saved at ``step``, after verifying its checksums.

        ``like`` (arrays or ``jax.ShapeDtypeStruct``) gives shapes, dtypes and shardings; without it
        the tree comes back as saved, as host arrays.
        """
        verify_manifest(self.root / str(step))
        target = None if like is None else _abstract(like)
        return self.manager.restore(step, args=self._ocp.args.StandardRestore(target))

    def latest(self, like) -> tuple[int, Any] | None:
        """The newest step that verifies; corrupted steps are reported and skipped."""
        for step in reversed(self.steps()):
            try:
                return step, self.restore(step, like)
            except CorruptCheckpoint as e:
                log.warning("%s: not used; falling back to an earlier checkpoint", e)
        return None

    def discard_after(self, step: int | None) -> None:
        """Deletes every step after ``step`` (all when None): they are not part of the run being resumed."""
        if not self.root.exists():
            return
        for p in self.root.iterdir():
            if p.is_dir() and p.name.isdigit() and (step is None or int(p.name) > step):
                shutil.rmtree(p, ignore_errors=True)
        self._manager = None

    def clear(self) -> None:
        """Every step removed (and the stage's directory; a file or link in its place too: jaxinf's own path)."""
        if self.root.is_symlink() or (self.root.exists() and not self.root.is_dir()):
            self.root.unlink()
        shutil.rmtree(self.root, ignore_errors=True)
        self._manager = None


class RunStore:
    """A run directory: config and stage status in ``run.json``, stage checkpoints under ``state/``."""

    def __init__(self, root: Path, record: dict):
        self.root = Path(root)
        self.record = record
        # the content keys named otherwise on a resume -> the path the run read them from (_check_resume)
        self.moved: dict[str, str] = {}

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, config: cfg.Config, overwrite: bool = False) -> RunStore:
        """Creates ``config.run.out`` or resumes it.

        A run directory started with another config is refused when a key that
        changes results differs and the stage it affects has saved progress;
        ``overwrite`` deletes the run directory's contents and starts over (only
        a jaxinf run's: another non-empty directory is refused either way).
        ``jaxinf run --overwrite`` does not come here with ``overwrite`` but sets
        the old run aside first (:mod:`jaxinf.run.rundir`).
        """
        root = Path(config.run.out)
        record_path = root / "run.json"
        check_writable(root)
        rundir.check_target(root, overwrite)
        if overwrite and root.exists():
            rundir.recover_interrupted(root)
            for p in root.iterdir():
                if p.name not in rundir.OURS:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        record = rundir.read_record(root, output=True)
        if record is not None:
            try:
                old = cfg.from_dict(record["config"], str(record_path))
            except cfg.ConfigError as e:
                raise StoreError(
                    f"{record_path}: unreadable run record ({e}); --overwrite would delete "
                    f"{rundir.describe_contents(root)}"
                ) from None
            store = cls(root, record)
            store._check_resume(old, config)
            record["config"] = cfg.to_dict(config)
            record["fingerprint"] = cfg.results_key(config)
            record["versions"] = versions()
            record["heap"] = heap_mode()
            record["cwd"] = os.getcwd()
            record.setdefault("format", rundir.MARKER)
            return store  # written with the next update: a start refused before then leaves run.json as it was
        record = {
            "format": rundir.MARKER,
            "config": cfg.to_dict(config),
            "fingerprint": cfg.results_key(config),
            "versions": versions(),
            "heap": heap_mode(),
            "cwd": os.getcwd(),  # where the config's relative paths mean something (jaxinf analyze from elsewhere)
            "created": _now(),
            "stages": {s: {"status": "pending"} for s in cfg.STAGES},
        }
        store = cls(root, record)
        store._write()
        return store

    def _check_resume(self, old: cfg.Config, new: cfg.Config) -> None:
        """Refuses ``new`` when a key that changes results differs from ``old`` (the record's) and the stage it affects
        has saved progress; else marks the stages it affects pending. A path key differs only when both its spelling
        and what it names (from the working directory it was given in: the record's ``cwd``) differ: the same files
        by another path are not a change, nor the same relative paths of a run directory moved with its inputs. The
        model, documents and queries under another path (:data:`jaxinf.config.CONTENT_KEYS`) are no change of key at
        all: they are kept in ``moved`` and compared by their content once read (:mod:`jaxinf.run.fingerprint`)."""
        was = cfg.located(old, rundir.recorded_cwd(self.record) or os.getcwd())
        located = cfg.changed_keys(was, cfg.located(new, os.getcwd()))
        changed = [k for k in cfg.changed_keys(old, new) if k in located]
        # another path for the model, documents or queries: compared by content once they are read (reconcile)
        self.moved = {
            k: str(cfg.to_dict(was)[k.split(".")[0]][k.split(".")[1]]) for k, _ in changed if k in cfg.CONTENT_KEYS
        }
        changed = [(k, stage) for k, stage in changed if k not in self.moved]
        if not changed:
            return
        order = {s: i for i, s in enumerate(cfg.STAGES)}
        first = min(order[stage] for _, stage in changed)
        started = [s for s in cfg.STAGES[first:] if self.status(s) != "pending" or self.stage(s).steps()]
        redone = ("exports", "analysis")  # written from saved results alone: a key of theirs redoes them, never refused
        refused = [k for k, stage in changed if stage not in redone and any(order[s] >= order[stage] for s in started)]
        if refused:
            key = rundir.output_key()
            if (
                rundir.in_query()
            ):  # it sets data.queries and factors.from itself: named by its arguments, offered no key
                refused = [f"{k} (QUERIES)" if k == "data.queries" else k for k in refused]
            keep = (
                ""
                if rundir.in_query() or any(order[stage] <= order["lambda"] for k, stage in changed if k in refused)
                else f"; factors.from={old.factors.from_run} with another {key} keeps the curvature it reuses"
                if old.factors.from_run is not None  # fitted none of its own (a jaxinf query output, for one)
                else f"; factors.from={self.root} with another {key} keeps its fitted curvature"
            )
            raise StoreError(
                f"{self.root}: run started with another config; these keys would change results already saved: "
                f"{', '.join(refused)} (use --overwrite to start over, or another {key}{keep})"
            )
        for s in cfg.STAGES[first:]:
            self.record["stages"][s] = {"status": "pending"}

    # ------------------------------------------------------------------ status

    def _write(self) -> None:
        """``run.json``, then its copy ``state/run.json`` (from which a damaged ``run.json`` is restored)."""
        self.record["updated"] = _now()
        if jax.process_index() == 0:
            write_json(self.root / "run.json", self.record)
            write_json(self.root / "state" / "run.json", self.record)

    def update(self, **fields) -> None:
        """Sets top-level entries of ``run.json`` (such as ``inputs``) and writes it."""
        self.record.update(fields)
        self._write()

    def status(self, stage: str) -> str:
        return self.record["stages"].get(stage, {}).get("status", "pending")

    def mark(self, stage: str, status: str, **info) -> None:
        entry = {"status": status, **info}
        if status == "done":
            entry["finished"] = _now()
        self.record["stages"][stage] = entry
        self._write()

    def stage(self, name: str, keep: int | None = 2) -> StageStore:
        return StageStore(self.root / "state" / name, keep)

    def carry(self, name: str) -> StageStore:
        """The carry of a pass whose result is saved in chunks (the scoring pass's tails), beside its chunks: one
        step, the newest (cleared with the stage's checkpoints, :func:`jaxinf.run.fingerprint.invalidate`)."""
        return StageStore(self.root / "state" / f"{name}.carry", keep=1)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # ------------------------------------------------------------------ stage results

    def save_result(self, stage: str, tree, **info) -> None:
        """A finished stage's result, as the single step 0 of its store; marks the stage done (with ``info``)."""
        st = self.stage(stage, keep=1)
        st.clear()
        st.save(0, tree)
        self.mark(stage, "done", **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in info.items()})

    def load_result(self, stage: str, like) -> Any | None:
        """A done stage's result, or None (with a warning) if it is missing or corrupted."""
        if self.status(stage) != "done":
            return None
        try:
            return self.stage(stage, keep=1).restore(0, like)
        except (CorruptCheckpoint, FileNotFoundError) as e:
            log.warning("%s: stage %s will be recomputed", e, stage)
            self.mark(stage, "pending")
            return None

    # ------------------------------------------------------------------ score chunks

    def chunks(self, stage: str) -> StageStore:
        """Chunked results (one step per chunk, numbered by the batch index it ends at; all kept)."""
        return self.stage(stage, keep=None)


def check_writable(root: Path) -> None:
    """Raises :class:`EnvironmentFailure` when ``root`` cannot be created or written (nothing is written)."""
    probe = root
    while not probe.exists():
        if probe.is_symlink():  # dangling, or a loop: mkdir would fail with "File exists"
            raise StoreError(
                f"{root}: cannot create the run directory ({probe} is a symbolic link to "
                f"{os.readlink(probe)}, which does not resolve to a directory)"
            )
        probe = probe.parent
    if not probe.is_dir():
        raise StoreError(f"{root}: cannot create the run directory ({probe} is not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        import errno

        reason = "read-only file system" if _errno_of_write(probe) == errno.EROFS else "permission denied"
        raise EnvironmentFailure(
            f"{root}: output directory is not writable ({reason}; stage: start); nothing was written"
        )


def _errno_of_write(directory: Path) -> int:
    """The errno of creating a file in ``directory`` (0 when it can be created; the probe is removed)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=directory):
            return 0
    except OSError as e:
        return e.errno or 0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
