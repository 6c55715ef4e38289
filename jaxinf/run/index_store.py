"""The index on disk: one dense ``[rows, cells]`` array per run (in parts, one per slice of the corpus), written batch
by batch, resumable after a kill.

A run's index lives in ``state/index/`` of its run directory (so a change of the documents or of the model
invalidates it like any other stage):

- ``manifest.json``: the format version, the cells of each block (``k_S``, ``k_A``, layers), ``index.dtype``,
  rows per batch and batches, ``parts`` (below), the plan, ``rows`` (the digest of the documents' rows, whatever their batches:
  :meth:`jaxinf.data.batching.BatchPlan.rows_key`) and the fingerprints of the inputs it was built from (model, documents,
  eigenbasis), and ``written``: how many batches are on disk. ``written`` is raised only after those batches'
  rows have been flushed, so a killed build resumes at the first batch not written.
- ``cells.npy`` ``[rows, C]`` (``index.dtype``): each row's kept cells of ``Q_S^T G Q_A`` (:mod:`jaxinf.engine.indexing`,
  :func:`~jaxinf.engine.indexing.kept_cells`), a memory map: a query reads it in slices, never whole.
- ``bands.npy`` ``[rows, E]`` float32: the energy of ``Q_S^T G Q_A`` off the kept cells in each pair of bands of
  eigen-directions (:func:`jaxinf.engine.indexing.bands`), block after block: with the cells' own it adds up to
  ``||G||_F^2``.
- ``documents.npy`` ``[rows]`` int64: the document of each row (-1 for padding; a split document has several).
- ``loss.npy`` ``[rows]`` float64: each row's training loss (the data's labels).
- ``checks.npy`` ``[batches]`` uint32: the CRC-32 of each batch's rows (in its part) as stored (:func:`batch_checksum`), written with
  them and checked as a query reads them, so a damaged index whose values stay finite is refused, not used.
- ``selection.npz``: the eigen-directions in decreasing eigenvalue and the kept cells
  (:class:`jaxinf.engine.indexing.Selection`).

Rows are those of the run's batch plan. The arrays above (all but the manifest and the selection) are written in
``parts``, one per slice of the corpus that the processes read (their *data groups*,
:func:`jaxinf.sharding.meshes.data_groups`): each batch's ``R`` rows are ``parts`` runs of ``u = R / parts`` rows, the
g-th read by group g, and part g's files (:func:`part_root`: ``state/index`` itself for one part, else
``part-G-of-P/``) hold its run of every batch, batch ``i`` at rows ``[i u, (i + 1) u)``. Each group's first process
writes its own part from the rows its own devices computed, so no process gathers or writes another's rows. The
index's rows are read part after part: row ``g (batches u) + r`` is row ``r`` of part g.
"""

from __future__ import annotations

import json
import logging
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxinf.atomic import ArrayFileError, load_npy, load_npz, npy_header, write_json
from jaxinf.errors import missing
from jaxinf.run.failures import CONDITIONS
from jaxinf.run.rundir import StoreError

log = logging.getLogger("jaxinf")

FORMAT = 2
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


SLICE_BYTES = 2**30
"""The most bytes of index rows (as float32) a process reads and multiplies at a time: a full index of wide layers
makes rows of megabytes, and a slice of a fixed number of rows would be the whole index (12.9 GB at once, then a
float32 copy of it, on the bench world)."""


def rows_per_slice(manifest: dict) -> int:
    """Index rows read and multiplied per matrix product: :data:`SLICE_BYTES` of them as float32 (at least one)."""
    return max(1, SLICE_BYTES // row_bytes(manifest["cells"], "float32", manifest["bands"]))


def manifest_path(root: Path) -> Path:
    return Path(root) / "manifest.json"


def part_root(root: Path, part: int, parts: int) -> Path:
    """Where part ``part`` of ``parts`` keeps its arrays: the index's own directory when there is one part (an index
    built by one host reads as before parts existed), ``part-G-of-P/`` beside the manifest otherwise."""
    return Path(root) if parts == 1 else Path(root) / f"part-{part}-of-{parts}"


def read_manifest(root: Path, older: bool = False) -> dict | None:
    """The manifest of the index at ``root``, or None if there is none; a malformed one raises naming the file, and
    so does one of an earlier format (kept cells of another layout) unless ``older`` (a writer, which rebuilds it)."""
    path = manifest_path(root)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IndexError_(f"{path}: unreadable index manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), int):
        raise IndexError_(f"{path}: not an index manifest of format {FORMAT}")
    if manifest["format"] != FORMAT and not (older and manifest["format"] < FORMAT):
        raise IndexError_(
            f"{path}: an index of format {manifest['format']}, written by "
            f"{'an earlier' if manifest['format'] < FORMAT else 'a later'} jaxinf; this one reads format {FORMAT} "
            f"(run the run {Path(root).parent.parent} again to rebuild it)"
        )
    return manifest


class IndexWriter:
    """The per-batch :class:`jaxinf.engine.loop.Saves` of the index pass: each save writes this process's part of the
    rows of the batches since the previous one into the memory maps and flushes them; once every process has
    (a barrier), the ``primary`` process (process 0) records them as written in the manifest.

    ``part`` is ``(g, parts)``: this process reads slice g of the corpus (its data group). The loop hands it only
    those rows of each output (:attr:`local`, :meth:`jaxinf.run.executor.MeshExecutor.local_rows`) and every row's
    document; the group's first process (``writes``) writes them, the others of its group write nothing."""

    noun = "index rows"
    local = ("cells", "bands", "loss")  # this process's rows only, never gathered from the others

    def __init__(
        self,
        root: Path,
        manifest: dict,
        every: int,
        part: tuple[int, int] = (0, 1),
        *,
        writes: bool = True,
        primary: bool = True,
    ):
        self.root, self.every, self.part, self.writes, self.primary = Path(root), every, part, writes, primary
        self.files = part_root(self.root, *part)
        old = read_manifest(self.root, older=True)  # an earlier format's index is rebuilt, like one of other settings
        manifest = {**manifest, "checksums": CHECKSUMS, "parts": part[1]}
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
            if writes:  # this part's rows from the first batch (files of a part it does not write are left alone)
                for name in (*ARRAYS, "checks"):
                    (self.files / f"{name}.npy").unlink(missing_ok=True)
        if old is not None and old.get("parts", 1) != part[1] and old.get("written"):
            raise IndexError_(
                f"{manifest_path(self.root)}: begun in {old.get('parts', 1)} part(s), one per slice of the corpus the "
                f"processes read; this run reads it in {part[1]} (resume with the same mesh, or remove the manifest "
                f"to begin the index again)"
            )
        self.manifest = dict(old) if old is not None else {**manifest, "written": 0, "rows_per_batch": None}
        self.manifest["parts"] = part[1]
        if primary and not self.manifest["written"]:  # begun afresh: no rows of another layout left on the disk
            ours = {part_root(self.root, g, part[1]) for g in range(part[1])}
            for stale in self.root.glob("part-*-of-*") if self.root.is_dir() else ():
                if stale not in ours and stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
            if part[1] > 1:
                for name in (*ARRAYS, "checks"):
                    (self.root / f"{name}.npy").unlink(missing_ok=True)
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
        U = m["batches"] * (m["rows_per_batch"] // self.part[1])
        shapes = {
            "cells": ((U, m["cells"]), DTYPES[m["dtype"]]),
            "bands": ((U, m["bands"]), np.float32),
            "documents": ((U,), np.int64),
            "loss": ((U,), np.float64),
            "checks": ((m["batches"],), np.uint32),
        }
        self.files.mkdir(parents=True, exist_ok=True)
        self.maps = {}
        for name, (shape, dtype) in shapes.items():
            path = self.files / f"{name}.npy"
            mode = "r+" if path.exists() and m["written"] > 0 else "w+"
            try:
                if mode == "r+":  # a file damaged by hand is named in jaxinf's words, not numpy's
                    npy_header(path)
                arr = np.lib.format.open_memmap(path, mode=mode, dtype=dtype, shape=shape if mode == "w+" else None)
            except ArrayFileError as e:
                raise IndexError_(f"{path}: cannot open the index array ({e.reason})") from None
            except OSError as e:
                if e.errno in CONDITIONS:  # the machine refused the file (a full disk, ulimit -f): the run's one
                    raise OSError(e.errno, e.strerror, str(path)) from e  # line, exit 3, resumable (run.failures)
                raise IndexError_(f"{path}: cannot open the index array ({e})") from None
            except ValueError as e:
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
        if self.writes:
            rows = len(batches[0][1]["index"])  # every process's rows of a batch (its documents: gathered)
            if self.maps is None:
                self._open(rows)
            assert self.maps is not None  # _open made them
            g, u = self.part[0], rows // self.part[1]
            first = step - len(batches)

            def own(x) -> np.ndarray:  # an output the pass fetched whole (the scores' loss) cut to this part's rows
                x = np.asarray(x)
                return x[g * u : (g + 1) * u] if len(x) == rows else x

            for j, (out, meta) in enumerate(batches):
                lo = (first + j) * u
                for name in ("cells", "bands"):
                    self.maps[name][lo : lo + u] = own(out[name]).astype(self.maps[name].dtype)
                self.maps["loss"][lo : lo + u] = own(out["loss"]).astype(np.float64)
                self.maps["documents"][lo : lo + u] = own(meta["index"]).astype(np.int64)
                self.maps["checks"][first + j] = batch_checksum({n: self.maps[n][lo : lo + u] for n in ARRAYS})
            for arr in self.maps.values():
                arr.flush()
        from jaxinf.sharding.meshes import barrier  # jax, which jaxinf plan must not import before its devices are set

        barrier(f"index rows to batch {step} flushed")  # every part's, before the manifest says they are written
        self.manifest["written"] = int(step)
        if self.primary:
            write_json(manifest_path(self.root), self.manifest)


class _Part:
    """One part of a finished index, opened read-only: its directory, memory-mapped arrays and checksums, and the
    index row its first row is."""

    def __init__(self, files: Path, first: int, manifest: dict, rows: int):
        self.files, self.first = files, first
        self.arrays: dict[str, np.ndarray] = {}
        for name in ARRAYS:
            path = files / f"{name}.npy"
            try:
                arr = load_npy(path, mmap_mode="r")
            except ArrayFileError as e:
                raise IndexError_(f"{path}: unreadable index array: {e.reason}") from None
            except OSError as e:
                why = missing(path) if isinstance(e, FileNotFoundError) else e.strerror or e
                raise IndexError_(f"{path}: unreadable index array: {why}") from None
            if arr.shape[0] != rows:
                raise IndexError_(f"{path}: {arr.shape[0]} rows, the manifest says {rows} (a torn index)")
            self.arrays[name] = arr
        for name in ("cells", "bands"):
            shape = self.arrays[name].shape
            if len(shape) != 2 or shape[1] != manifest[name]:
                width = shape[1] if len(shape) == 2 else f"{len(shape) - 1}-dimensional"
                raise IndexError_(
                    f"{files / f'{name}.npy'}: {width} {name} per row, the manifest says {manifest[name]}"
                )
        self.checks: np.ndarray | None = None  # an index of jaxinf before the checksums: read unchecked
        if manifest.get("checksums") == CHECKSUMS:
            path = files / "checks.npy"
            try:
                self.checks = load_npy(path, mmap_mode="r")
            except ArrayFileError as e:
                raise IndexError_(f"{path}: unreadable index checksums: {e.reason}") from None
            except OSError as e:
                why = missing(path) if isinstance(e, FileNotFoundError) else e.strerror or e
                raise IndexError_(f"{path}: unreadable index checksums: {why}") from None
            if self.checks.shape != (manifest["batches"],):
                raise IndexError_(f"{path}: {self.checks.shape[0]} checksums, the manifest says {manifest['batches']}")


class IndexReader:
    """A finished index, opened read-only: its manifest, selection and parts (memory-mapped arrays)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        manifest = read_manifest(self.root)
        where = manifest_path(self.root)
        if manifest is None:
            raise IndexError_(f"{self.root}: no index here (no manifest.json; build one with index.k set)")
        manifest.setdefault("parts", 1)  # an index from before parts: its arrays beside the manifest
        for key in ("batches", "written", "rows_per_batch", "cells", "bands", "parts"):  # an edit: was a traceback
            value = manifest.get(key)  # or a riddle ("8 rows, the manifest says 8" of a string "8")
            if type(value) is not int or value < (key == "parts"):
                raise IndexError_(f"{where}: its {key} ({value!r}) is not a count (a damaged manifest: rebuild it)")
        inputs = manifest.get("inputs")
        if not isinstance(inputs, dict) or not {"documents", "eigen"} <= inputs.keys():
            raise IndexError_(
                f"{where}: its inputs ({inputs!r}) do not say what the index was built from (a damaged manifest: "
                f"rebuild it)"
            )
        if manifest["written"] > manifest["batches"]:  # was "the index is incomplete (2 of 1 batches written)"
            raise IndexError_(
                f"{where}: its written ({manifest['written']}) is more than its batches ({manifest['batches']}) (a "
                f"damaged manifest: rebuild it)"
            )
        if manifest["written"] != manifest["batches"]:
            raise IndexError_(
                f"{where}: the index is incomplete ({manifest['written']} of {manifest['batches']} batches "
                f"written); resume the run that builds it"
            )
        if manifest["rows_per_batch"] % manifest["parts"]:
            raise IndexError_(
                f"{where}: its {manifest['rows_per_batch']} rows per batch do not split into its {manifest['parts']} "
                f"parts (a damaged manifest: rebuild it)"
            )
        try:  # the blocks' cells and band energies are the rows' widths (bands were unchecked: an edit, a traceback)
            blocks = manifest["blocks"].values()
            widths = (
                sum(b["k_S"] * b["k_A"] * b["layers"] for b in blocks),
                sum(b["bands_S"] * b["bands_A"] * b["layers"] for b in blocks),
            )
        except (AttributeError, KeyError, TypeError):
            widths = None
        if widths != (manifest["cells"], manifest["bands"]):
            raise IndexError_(
                f"{where}: its blocks do not give its {manifest['cells']} cells and {manifest['bands']} band "
                f"energies per row (a damaged manifest: rebuild it)"
            )
        self.manifest = manifest
        self.unit = manifest["rows_per_batch"] // manifest["parts"]  # a batch's rows in one part
        self.per_part = manifest["batches"] * self.unit
        P = manifest["parts"]
        self.parts = [_Part(part_root(self.root, g, P), g * self.per_part, manifest, self.per_part) for g in range(P)]
        # the resolution its certificates allow for is the manifest's dtype's: one edited to another dtype (or to a
        # name jaxinf does not know, a KeyError traceback) would certify float16 rows as float32
        dtype, stored = manifest.get("dtype"), {p.arrays["cells"].dtype for p in self.parts}
        if not isinstance(dtype, str) or dtype not in DTYPES or stored != {np.dtype(DTYPES[dtype])}:
            raise IndexError_(
                f"{where}: its dtype ({dtype!r}) is not that of cells.npy ({', '.join(map(str, sorted(stored, key=str)))}) "
                f"(a damaged manifest: rebuild it)"
            )
        try:
            self.selection = load_npz(self.root / "selection.npz")
        except ArrayFileError as e:
            raise IndexError_(f"{self.root / 'selection.npz'}: unreadable: {e.reason}") from None
        except OSError as e:
            why = missing(self.root / "selection.npz") if isinstance(e, FileNotFoundError) else e.strerror or e
            raise IndexError_(f"{self.root / 'selection.npz'}: unreadable: {why}") from None

    @property
    def rows(self) -> int:
        return self.per_part * len(self.parts)

    def where(self, name: str, row: int) -> str:
        """Index row ``row`` as the file of array ``name`` that holds it and its row there: ``PATH: row R``."""
        part = self.parts[row // self.per_part]
        return f"{part.files / f'{name}.npy'}: row {row - part.first}"

    def slices(self, rows: int):
        """``(start, stop)`` of consecutive row slices of whole batches of one part each, at most ``rows`` rows (at
        least one batch's rows of a part)."""
        step = max(self.unit, rows - rows % self.unit)
        for part in self.parts:
            for lo in range(0, self.per_part, step):
                yield part.first + lo, part.first + min(lo + step, self.per_part)

    def read(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows ``[lo, hi)`` (whole batches of one part, :meth:`slices`) of every array as stored, each batch checked
        against its checksum: rows that were changed since they were written (a damaged disk, a copy gone wrong, an
        edit) are refused naming the batch, whatever their values."""
        part, u = self.parts[lo // self.per_part], self.unit
        a, b = lo - part.first, hi - part.first
        rows = {name: np.asarray(part.arrays[name][a:b]) for name in ARRAYS}
        if part.checks is not None:
            for i in range(a // u, b // u):
                piece = {name: x[i * u - a : (i + 1) * u - a] for name, x in rows.items()}
                if batch_checksum(piece) != int(part.checks[i]):
                    raise IndexError_(
                        f"{part.files}: the rows of batch {i} (rows {part.first + i * u} to "
                        f"{part.first + (i + 1) * u - 1}) do not match their checksum in checks.npy (a damaged index: "
                        f"remove its manifest.json and run the run {self.root.parent.parent} again)"
                    )
        return rows


PARTS = ("rows", "cols", "cells")
"""The fields of a :class:`jaxinf.engine.indexing.Selection`, each saved per block in ``selection.npz``."""


def save_selection(root: Path, selection) -> None:
    """The order of the eigen-directions and the kept cells as ``selection.npz`` (``rows/NAME``, ``cols/NAME`` and
    ``cells/NAME`` per block)."""
    from jaxinf.atomic import write_atomic

    arrays = {f"{part}/{k}": np.asarray(v) for part in PARTS for k, v in getattr(selection, part).items()}
    Path(root).mkdir(parents=True, exist_ok=True)
    # the names are rows/..., cols/... and cells/..., never savez's own keyword allow_pickle
    write_atomic(Path(root) / "selection.npz", lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def load_selection(arrays: dict[str, np.ndarray]):
    """The :class:`jaxinf.engine.indexing.Selection` saved by :func:`save_selection`."""
    import jax.numpy as jnp

    from jaxinf.engine.indexing import Selection

    return Selection(
        **{
            part: {k[len(part) + 1 :]: jnp.asarray(v) for k, v in arrays.items() if k.startswith(part + "/")}
            for part in PARTS
        }
    )


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
        "queries": config.plan.queries,
        "query_host_bytes": query_host_bytes(int(cells), int(n_bands), config.plan.queries, config.plan.documents),
    }


def query_host_bytes(cells: int, bands: int, queries: int, documents: int) -> int:
    """Host memory of a process answering ``queries`` from an index of ``documents`` rows (the product runs on the
    hosts, in slices, and needs no device memory): the rotated queries ``Q (4 cells + 8 bands)``, one slice of rows
    as float32 (:func:`rows_per_slice`, at most :data:`SLICE_BYTES`) and its scores and bounds ``16 Q rows``, and
    every document's score, bound and loss, which each process holds after the exchange: ``16 Q N + 8 N``."""
    rows = min(documents, rows_per_slice({"cells": cells, "bands": bands}))
    return (
        queries * (4 * cells + 8 * bands)
        + rows * (row_bytes(cells, "float32", bands) + 16 * queries)
        + documents * (16 * queries + 8)
    )


def format_size(ix: dict) -> str:
    """:func:`index_size` as one line of ``jaxinf plan``'s output."""
    per_device = ", ".join(f"{b / 2**30:,.2f} GiB per device on {d}" for d, b in ix["bytes_per_device"].items())
    return (
        f"index (index.k={ix['k']}, {ix['dtype']}): {ix['cells']:,} cells, {ix['bytes_per_document'] / 2**10:,.1f} "
        f"KiB per document; {ix['documents']:,} documents: {ix['bytes'] / 2**40:,.3f} TiB ({per_device}); a query "
        f"costs {ix['query_flops_per_document']:,} FLOPs per document, the rows read in slices; "
        f"{ix['queries']:,} queries (plan.queries) hold {ix['query_host_bytes'] / 2**30:,.2f} GiB of host memory "
        f"per process, no device memory"
    )
