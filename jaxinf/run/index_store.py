"""The index on disk: one dense ``[rows, cells]`` array per run, written batch by batch, resumable after a kill.

A run's index lives in ``state/index/`` of its run directory (so a change of the documents or of the model
invalidates it like any other stage):

- ``manifest.json``: the format version, the cells of each block (``k_S``, ``k_A``, layers), ``index.dtype``,
  rows per batch and batches, the plan, ``rows`` (the digest of the documents' rows, whatever their batches:
  :meth:`jaxinf.data.batching.BatchPlan.rows_key`) and the fingerprints of the inputs it was built from (model, documents,
  eigenbasis), and ``written``: how many batches are on disk. ``written`` is raised only after those batches'
  rows have been flushed, so a killed build resumes at the first batch not written.
- ``cells.npy`` ``[rows, C]`` (``index.dtype``): each row's kept block of ``Q_S^T G Q_A`` (:mod:`jaxinf.engine.indexing`),
  a memory map: a query reads it in slices, never whole.
- ``bands.npy`` ``[rows, E]`` float32: the energy of ``Q_S^T G Q_A`` in each pair of bands of eigen-directions
  (:func:`jaxinf.engine.indexing.bands`; the kept block's first), block after block: they add up to ``||G||_F^2``.
- ``documents.npy`` ``[rows]`` int64: the document of each row (-1 for padding; a split document has several).
- ``loss.npy`` ``[rows]`` float64: each row's training loss (the data's labels).
- ``checks.npy`` ``[batches]`` uint32: the CRC-32 of each batch's rows as stored (:func:`batch_checksum`), written with
  them and checked as a query reads them, so a damaged index whose values stay finite is refused, not used.
- ``selection.npz``: the eigen-directions in decreasing eigenvalue (:class:`jaxinf.engine.indexing.Selection`).

Rows are those of the run's batch plan: batch ``i`` holds rows ``[i R, (i + 1) R)``.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxinf.atomic import ArrayFileError, load_npy, load_npz, npy_header, write_json
from jaxinf.errors import missing
from jaxinf.run.rundir import StoreError

log = logging.getLogger("jaxinf")

FORMAT = 1
DTYPES = {"float32": np.float32, "float16": np.float16}
ARRAYS = ("cells", "bands", "documents", "loss")
CHECKSUMS = "crc32"  # the manifest's "checksums": each batch's rows carry one (checks.npy)


def batch_checksum(rows: Mapping[str, np.ndarray]) -> int:
    """The CRC-32 of one batch's rows as stored: the bytes of its ``cells``, ``bands``, ``documents`` and ``loss``, in
    that order (one ``zlib.crc32`` chained over the four)."""
    crc = 0
    for name in ARRAYS:
        crc = zlib.crc32(np.ascontiguousarray(rows[name]).data, crc)
    return crc


class IndexError_(StoreError):
    """An index that cannot be used (missing, from other inputs, torn); the message names the file."""


def row_bytes(cells: int, dtype: str, bands: int) -> int:
    """Bytes of one row on disk: its ``cells`` in ``dtype`` (an ``index.dtype``), ``bands`` float32 band energies,
    and its document (int64) and loss (float64)."""
    return int(cells * np.dtype(DTYPES[dtype]).itemsize + 4 * bands + 16)


def manifest_path(root: Path) -> Path:
    return Path(root) / "manifest.json"


def read_manifest(root: Path) -> dict | None:
    """The manifest of the index at ``root``, or None if there is none; a malformed one raises naming the file."""
    path = manifest_path(root)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IndexError_(f"{path}: unreadable index manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexError_(f"{path}: not an index manifest of format {FORMAT}")
    return manifest


class IndexWriter:
    """The per-batch :class:`jaxinf.engine.loop.Saves` of the index pass: each save writes the rows of the batches since
    the previous one into the memory maps, flushes them, then records them as written in the manifest.

    With several processes, every process holds every batch's rows and only the ``primary`` one (process 0) writes
    them; the others resume from the same manifest and write nothing."""

    noun = "index rows"

    def __init__(self, root: Path, manifest: dict, every: int, primary: bool = True):
        self.root, self.every, self.primary = Path(root), every, primary
        old = read_manifest(self.root)
        manifest = {**manifest, "checksums": CHECKSUMS}
        keys = (
            "format",
            "blocks",
            "cells",
            "bands",
            "layers",
            "dtype",
            "batches",
            "plan",
            "rows",
            "inputs",
            "checksums",
        )
        if old is not None and any(old.get(k) != manifest.get(k) for k in keys):
            log.warning("%s: built from other inputs or settings; rebuilding the index", self.root)
            old = None
            for name in (*ARRAYS, "checks") if primary else ():
                (self.root / f"{name}.npy").unlink(missing_ok=True)
        self.manifest = dict(old) if old is not None else {**manifest, "written": 0, "rows_per_batch": None}
        self.maps: dict[str, np.memmap] | None = None

    def _open(self, rows_per_batch: int) -> None:
        m = self.manifest
        if m["rows_per_batch"] is None:
            m["rows_per_batch"] = int(rows_per_batch)
        elif m["rows_per_batch"] != rows_per_batch:
            raise IndexError_(
                f"{self.root}: {rows_per_batch} rows per batch, the index was begun with "
                f"{m['rows_per_batch']} (resume with the same number of processes)"
            )
        R = m["batches"] * m["rows_per_batch"]
        shapes = {
            "cells": ((R, m["cells"]), DTYPES[m["dtype"]]),
            "bands": ((R, m["bands"]), np.float32),
            "documents": ((R,), np.int64),
            "loss": ((R,), np.float64),
            "checks": ((m["batches"],), np.uint32),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        self.maps = {}
        for name, (shape, dtype) in shapes.items():
            path = self.root / f"{name}.npy"
            mode = "r+" if path.exists() and m["written"] > 0 else "w+"
            try:
                if mode == "r+":  # a file damaged by hand is named in jaxinf's words, not numpy's
                    npy_header(path)
                arr = np.lib.format.open_memmap(path, mode=mode, dtype=dtype, shape=shape if mode == "w+" else None)
            except ArrayFileError as e:
                raise IndexError_(f"{path}: cannot open the index array ({e.reason})") from None
            except (ValueError, OSError) as e:
                raise IndexError_(f"{path}: cannot open the index array ({e})") from None
            if arr.shape != shape or arr.dtype != dtype:
                raise IndexError_(f"{path}: shape {arr.shape} {arr.dtype}, expected {shape} {np.dtype(dtype)}")
            self.maps[name] = arr

    def resume(self, carry) -> tuple[int, Any]:
        start = int(self.manifest["written"])
        return start, carry

    def begin(self, start: int, total: int | None) -> None:
        if self.primary:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(manifest_path(self.root), self.manifest)

    def save(self, step: int, carry, batches: list[tuple[Any, dict]]) -> None:
        if not batches:
            return
        if not self.primary:
            self.manifest["written"] = int(step)
            return
        rows = len(batches[0][1]["index"])
        if self.maps is None:
            self._open(rows)
        assert self.maps is not None  # _open made them
        R = self.manifest["rows_per_batch"]
        first = step - len(batches)
        for j, (out, meta) in enumerate(batches):
            lo = (first + j) * R
            for name in ("cells", "bands"):
                self.maps[name][lo : lo + R] = np.asarray(out[name]).astype(self.maps[name].dtype)
            self.maps["loss"][lo : lo + R] = np.asarray(out["loss"], np.float64)
            self.maps["documents"][lo : lo + R] = np.asarray(meta["index"], np.int64)
            self.maps["checks"][first + j] = batch_checksum({n: self.maps[n][lo : lo + R] for n in ARRAYS})
        for arr in self.maps.values():
            arr.flush()
        self.manifest["written"] = int(step)
        write_json(manifest_path(self.root), self.manifest)


class IndexReader:
    """A finished index, opened read-only: its manifest, selection and memory-mapped arrays."""

    def __init__(self, root: Path):
        self.root = Path(root)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise IndexError_(f"{self.root}: no index here (no manifest.json; build one with index.k set)")
        for key in ("batches", "written", "rows_per_batch", "cells", "bands"):  # an edit: was a traceback or a
            value = manifest.get(key)  # riddle ("8 rows, the manifest says 8" of a string "8")
            if type(value) is not int or value < 0:
                raise IndexError_(
                    f"{manifest_path(self.root)}: its {key} ({value!r}) is not a count (a damaged manifest: rebuild it)"
                )
        inputs = manifest.get("inputs")
        if not isinstance(inputs, dict) or not {"documents", "eigen"} <= inputs.keys():
            raise IndexError_(
                f"{manifest_path(self.root)}: its inputs ({inputs!r}) do not say what the index was built from (a "
                f"damaged manifest: rebuild it)"
            )
        if manifest["written"] > manifest["batches"]:  # was "the index is incomplete (2 of 1 batches written)"
            raise IndexError_(
                f"{manifest_path(self.root)}: its written ({manifest['written']}) is more than its batches "
                f"({manifest['batches']}) (a damaged manifest: rebuild it)"
            )
        if manifest["written"] != manifest["batches"]:
            raise IndexError_(
                f"{manifest_path(self.root)}: the index is incomplete ({manifest['written']} of "
                f"{manifest['batches']} batches written); resume the run that builds it"
            )
        self.manifest = manifest
        self.arrays: dict[str, np.ndarray] = {}
        R = manifest["batches"] * manifest["rows_per_batch"]
        for name in ARRAYS:
            path = self.root / f"{name}.npy"
            try:
                arr = load_npy(path, mmap_mode="r")
            except ArrayFileError as e:
                raise IndexError_(f"{path}: unreadable index array: {e.reason}") from None
            except OSError as e:
                why = missing(path) if isinstance(e, FileNotFoundError) else e.strerror or e
                raise IndexError_(f"{path}: unreadable index array: {why}") from None
            if arr.shape[0] != R:
                raise IndexError_(f"{path}: {arr.shape[0]} rows, the manifest says {R} (a torn index)")
            self.arrays[name] = arr
        if self.arrays["cells"].shape[1] != manifest["cells"]:
            raise IndexError_(
                f"{self.root / 'cells.npy'}: {self.arrays['cells'].shape[1]} cells per row, the manifest "
                f"says {manifest['cells']}"
            )
        # the resolution its certificates allow for is the manifest's dtype's: one edited to another dtype (or to a
        # name jaxinf does not know, a KeyError traceback) would certify float16 rows as float32
        dtype, stored = manifest.get("dtype"), self.arrays["cells"].dtype
        if not isinstance(dtype, str) or dtype not in DTYPES or stored != np.dtype(DTYPES[dtype]):
            raise IndexError_(
                f"{manifest_path(self.root)}: its dtype ({dtype!r}) is not that of cells.npy ({stored}) (a damaged "
                f"manifest: rebuild it)"
            )
        self.checks: np.ndarray | None = None  # an index of jaxinf before the checksums: read unchecked
        if manifest.get("checksums") == CHECKSUMS:
            path = self.root / "checks.npy"
            try:
                self.checks = load_npy(path, mmap_mode="r")
            except ArrayFileError as e:
                raise IndexError_(f"{path}: unreadable index checksums: {e.reason}") from None
            except OSError as e:
                why = missing(path) if isinstance(e, FileNotFoundError) else e.strerror or e
                raise IndexError_(f"{path}: unreadable index checksums: {why}") from None
            if self.checks.shape != (manifest["batches"],):
                raise IndexError_(f"{path}: {self.checks.shape[0]} checksums, the manifest says {manifest['batches']}")
        try:
            self.selection = load_npz(self.root / "selection.npz")
        except ArrayFileError as e:
            raise IndexError_(f"{self.root / 'selection.npz'}: unreadable: {e.reason}") from None
        except OSError as e:
            why = missing(self.root / "selection.npz") if isinstance(e, FileNotFoundError) else e.strerror or e
            raise IndexError_(f"{self.root / 'selection.npz'}: unreadable: {why}") from None

    @property
    def rows(self) -> int:
        return int(self.arrays["cells"].shape[0])

    def slices(self, rows: int):
        """``(start, stop)`` of consecutive row slices of whole batches, at most ``rows`` rows (at least one batch)."""
        R = self.manifest["rows_per_batch"]
        step = max(R, rows - rows % R)
        for lo in range(0, self.rows, step):
            yield lo, min(lo + step, self.rows)

    def read(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows ``[lo, hi)`` (whole batches, :meth:`slices`) of every array as stored, each batch checked against its
        checksum: rows that were changed since they were written (a damaged disk, a copy gone wrong, an edit) are
        refused naming the batch, whatever their values."""
        rows = {name: np.asarray(self.arrays[name][lo:hi]) for name in ARRAYS}
        if self.checks is not None:
            R = self.manifest["rows_per_batch"]
            for b in range(lo // R, hi // R):
                part = {name: x[b * R - lo : (b + 1) * R - lo] for name, x in rows.items()}
                if batch_checksum(part) != int(self.checks[b]):
                    raise IndexError_(
                        f"{self.root}: the rows of batch {b} (rows {b * R} to {(b + 1) * R - 1}) do not match their "
                        f"checksum in checks.npy (a damaged index: remove its manifest.json and run the run "
                        f"{self.root.parent.parent} again)"
                    )
        return rows


def save_selection(root: Path, selection) -> None:
    """The order of the eigen-directions as ``selection.npz`` (``rows/NAME`` and ``cols/NAME`` per block)."""
    from jaxinf.atomic import write_atomic

    arrays = {f"rows/{k}": np.asarray(v) for k, v in selection.rows.items()}
    arrays.update({f"cols/{k}": np.asarray(v) for k, v in selection.cols.items()})
    Path(root).mkdir(parents=True, exist_ok=True)
    # the names are rows/... and cols/..., never savez's own keyword allow_pickle
    write_atomic(Path(root) / "selection.npz", lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def load_selection(arrays: dict[str, np.ndarray]):
    """The :class:`jaxinf.engine.indexing.Selection` saved by :func:`save_selection`."""
    import jax.numpy as jnp

    from jaxinf.engine.indexing import Selection

    rows = {k[len("rows/") :]: jnp.asarray(v) for k, v in arrays.items() if k.startswith("rows/")}
    cols = {k[len("cols/") :]: jnp.asarray(v) for k, v in arrays.items() if k.startswith("cols/")}
    return Selection(rows=rows, cols=cols)


def index_size(config, layers, devices: list[int]) -> dict:
    """The index of ``plan.documents`` documents (one row each) for ``jaxinf plan``: cells and bytes per document,
    the whole index, its share per device when the documents are split over every device, and a query's
    matrix-product FLOPs per document (``2 x cells``)."""
    from jaxinf.engine.indexing import bands, block_sizes

    sizes = block_sizes(layers, None if config.index.k == "full" else config.index.k)
    cells = sum(k_S * k_A * len(layers[n].layer_names) for n, (k_S, k_A) in sizes.items())
    n_bands = sum(
        len(bands(k_S, layers[n].d_out)) * len(bands(k_A, layers[n].d_in_aug)) * len(layers[n].layer_names)
        for n, (k_S, k_A) in sizes.items()
    )
    per_doc = row_bytes(cells, config.index.dtype, n_bands)
    total = per_doc * config.plan.documents
    return {
        "k": config.index.k,
        "dtype": config.index.dtype,
        "cells": int(cells),
        "bands": int(n_bands),
        "bytes_per_document": int(per_doc),
        "documents": config.plan.documents,
        "bytes": int(total),
        "bytes_per_device": {str(d): int(-(-total // d)) for d in devices},
        "query_flops_per_document": 2 * int(cells),
    }


def format_size(ix: dict) -> str:
    """:func:`index_size` as one line of ``jaxinf plan``'s output."""
    per_device = ", ".join(f"{b / 2**30:,.2f} GiB per device on {d}" for d, b in ix["bytes_per_device"].items())
    return (
        f"index (index.k={ix['k']}, {ix['dtype']}): {ix['cells']:,} cells, {ix['bytes_per_document'] / 2**10:,.1f} "
        f"KiB per document; {ix['documents']:,} documents: {ix['bytes'] / 2**40:,.3f} TiB ({per_device}); a query "
        f"costs {ix['query_flops_per_document']:,} FLOPs per document, the rows read in slices"
    )
