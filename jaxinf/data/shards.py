"""Corpora in shards: a file, a directory or a glob of JSONL, compressed JSONL, Parquet or Arrow files.

``data.documents`` may name

- one file: ``.jsonl`` / ``.json`` / ``.ndjson`` (JSON lines), the same compressed with gzip (``.gz``) or
  zstd (``.zst``, ``.zstd``), ``.parquet``, or ``.arrow`` (Arrow IPC, stream or file format);
- a directory: every such file below it, in sorted path order (files of other kinds, and names starting
  with ``.`` or ``_``, are ignored and counted in the report);
- a Hugging Face ``datasets`` ``save_to_disk`` directory (``state.json`` listing its ``.arrow`` files; a
  ``DatasetDict`` directory is read through its ``train`` split);
- a glob (``corpus/*.parquet``, ``shards/**/*.jsonl.zst``), matched in sorted order.

The documents of the shards follow one another in that order: a document's *index* (its column of
``scores.npy``) counts the kept documents of every shard before it. The rules of
:mod:`jaxinf.data.documents` apply to every format, with the field names of ``data.text_field``,
``data.id_field`` and ``data.source_field``; for a corpus of several shards a missing id defaults to
``SHARD:LINE`` (ids are unique across the corpus) and a missing source to the shard's name (its path below
the directory, or its file name, without the format's suffixes).

What each format costs (see docs/data.md):

- JSONL: one validating scan that keeps each document's byte offsets; a document is read again with one
  ``pread`` (random access at the cost of one line).
- gzip / zstd JSONL: the validating scan decompresses each shard once into a temporary file (in
  ``$JAXINF_SPILL_DIR``, else the system's temporary directory; disk = the uncompressed size, deleted when the
  corpus is closed or the process exits); documents are then read from it as from JSONL. Neither format can
  seek, so this is the one indexed scan that gives the later stages random access.
- Parquet: the scan reads the id, text and source columns batch by batch; a document is read by reading its
  row group (the last one read is kept, so the reads of a batch plan, which stay inside a window of the
  corpus, decode each row group about once per pass).
- Arrow: the file is memory-mapped; rows are taken from the mapped columns (no copy of the corpus in memory).

Memory: per document, only fixed-size arrays (:mod:`jaxinf.data.locations`: line or row, byte offset and size,
an 8-byte content digest; 20 bytes while the shards are under 4 GiB) and, during the scan, a 64-bit id hash:
whatever the corpus's text. A document's shard is found from the documents per shard.

Content digest of a document (8-byte BLAKE2b): of its line for JSONL (compressed or not), of its id, source
and text for Parquet and Arrow. The corpus's fingerprint is the SHA-256 of those in order; each shard's
fingerprint is the SHA-256 of its own, so a changed shard is named when a resumed run recomputes.
"""

from __future__ import annotations

import array
import hashlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxinf.data.documents import DEFAULT_SOURCE, Document, IdChecker, ReadReport, iter_documents
from jaxinf.data.errors import DataError, where, where_row
from jaxinf.data.jsonl_shards import JsonlShard
from jaxinf.data.locations import LocationsBuilder
from jaxinf.data.shard_files import Fields, list_shards
from jaxinf.data.table_shards import OpenTables, TableShard


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


# --------------------------------------------------------------------------- the corpus


class ShardedDocuments:
    """Random access to the documents of one or more shards (JSONL, compressed JSONL, Parquet, Arrow).

    Opening validates every shard in one scan (the module docstring says what each format keeps); after it,
    ``len``, ``texts``, ``documents`` and the content digests need no other pass. A shard that changed since the
    scan is an error when it is read, never a silent mix of versions.
    """

    def __init__(
        self,
        spec: str | os.PathLike,
        *,
        text_field: str = "text",
        id_field: str = "id",
        source_field: str = "source",
        spill_dir: str | os.PathLike | None = None,
        dedupe: str = "none",
    ):
        if dedupe not in ("none", "exact"):
            raise DataError(f"data.dedupe: must be none or exact, got {dedupe!r}")
        self.name = str(spec)
        self.fields = Fields(text_field, id_field, source_field)
        self.field_names = self.fields.names
        shards, ignored = list_shards(self.name)
        self.shards = shards
        self.report = ReadReport(self.name)
        self.report.ignored_files = len(ignored)
        self._single = len(shards) == 1
        self.report.shard_sources = not self._single
        spill = spill_dir or os.environ.get("JAXINF_SPILL_DIR") or None
        self._spill_tmp = None
        if any(s.compression for s in shards):
            self._spill_tmp = tempfile.mkdtemp(prefix="jaxinf-spill-", dir=spill)
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._spill_tmp, True)
        tables = OpenTables()
        self._readers = [
            JsonlShard(s, Path(self._spill_tmp) if self._spill_tmp else None)
            if s.kind == "jsonl"
            else TableShard(s, tables)
            for s in shards
        ]
        locations = LocationsBuilder()
        ids = IdChecker()
        counts = []
        self._stamps = []
        for k, reader in enumerate(self._readers):
            self._stamps.append(_stamp(reader.shard.path))
            before = len(locations)
            for line, start, end, digest, doc_id, d_id, d_src in reader.scan(
                self.fields, self._default_id(k), self._default_source(k), self.report
            ):
                locations.add(line, start, end, digest)
                ids.add(doc_id)
                self.report.default_ids += d_id
                self.report.default_sources += d_src
            counts.append(len(locations) - before)
            if _stamp(reader.shard.path) != self._stamps[-1]:
                raise DataError(f"{reader.display}: changed while it was being read; open the corpus again")
        self._locations = locations.finish()
        self.report.documents = len(self._locations)
        self._set_counts(np.asarray(counts, np.int64))
        suspects = ids.suspects()
        if suspects:
            self._raise_duplicate(suspects)
        self.duplicates: list[tuple[str, str]] = []
        self._dropped = (np.zeros(0, np.int64), np.zeros(0, np.int64))  # see duplicate_of
        if dedupe == "exact":
            self._dedupe()

    def _dedupe(self, listed: int = 1000) -> None:
        """Exact de-duplication (``data.dedupe: exact``): of documents with the same text (16-byte BLAKE2b of it,
        from one more sequential read of the documents), the first is kept; the others are skipped and counted
        (``report.duplicates``), the first ``listed`` kept as (id, id of the document kept) pairs, and every one
        findable by its id (:meth:`duplicate_of`: 16 bytes a skipped document)."""
        n = len(self)
        text_digests = bytearray()
        id_hashes = array.array("q")
        for lo in range(0, n, 4096):
            for doc in self.documents(range(lo, min(lo + 4096, n))):
                text_digests += hashlib.blake2b(doc.text.encode("utf-8"), digest_size=16).digest()
                id_hashes.append(hash(doc.id))
        keys = np.frombuffer(bytes(text_digests), np.uint64).reshape(n, 2) if n else np.zeros((0, 2), np.uint64)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        keep = np.zeros(n, bool)
        keep[first] = True
        dropped = np.nonzero(~keep)[0]
        if not len(dropped):
            return
        pairs = list(zip(dropped[:listed].tolist(), first[inverse[dropped[:listed]]].tolist()))
        docs = {d.index: d.id for d in self.documents(sorted({i for p in pairs for i in p}))}
        self.duplicates = [(docs[a], docs[b]) for a, b in pairs]
        self.report.duplicates = int(len(dropped))
        self.report.duplicate_examples = [f"{a} = {b}" for a, b in self.duplicates[:3]]
        hashes, kept_as = np.frombuffer(id_hashes, np.int64)[dropped], (np.cumsum(keep) - 1)[first[inverse[dropped]]]
        order = np.argsort(hashes, kind="stable")
        self._dropped = (hashes[order], kept_as[order].astype(np.int64))
        shard = np.repeat(np.arange(len(self.shards)), self.shard_counts)
        self._set_counts(np.bincount(shard[keep], minlength=len(self.shards)).astype(np.int64))
        self._locations = self._locations.keep(keep)
        self.report.documents = len(self._locations)

    def duplicate_of(self, doc_id: str) -> str | None:
        """The id of the document kept in place of the document ``doc_id`` that ``data.dedupe: exact`` skipped (the
        first with its text), or None when no skipped document has that id (found by its 64-bit hash: a collision
        with another id, vanishingly rare, would name that id's kept document)."""
        hashes, kept_as = self._dropped
        at = int(np.searchsorted(hashes, hash(doc_id)))
        if at == len(hashes) or hashes[at] != hash(doc_id):
            return None
        return self.documents([int(kept_as[at])])[0].id

    def _set_counts(self, counts: np.ndarray) -> None:
        """Documents per shard; a document's shard is found from their running sum (no per-document shard number)."""
        self.shard_counts = counts
        self._shard_end = np.cumsum(counts)

    def _default_id(self, k: int):
        if self._single:
            return str
        name = self.shards[k].name
        return lambda line: f"{name}:{line}"

    def _default_source(self, k: int) -> str:
        return DEFAULT_SOURCE if self._single else self.shards[k].name

    def _raise_duplicate(self, suspects: set[int]) -> None:
        first: dict[str, str] = {}
        for k, reader in enumerate(self._readers):
            scratch = ReadReport(self.name)
            for line, _, _, _, doc_id, _, _ in reader.scan(
                self.fields, self._default_id(k), self._default_source(k), scratch
            ):
                if hash(doc_id) not in suspects:
                    continue
                here = where(reader.display, line) if reader.shard.kind == "jsonl" else where_row(reader.display, line)
                if doc_id in first:
                    raise DataError(f'{here}: duplicate id "{doc_id}" (first at {first[doc_id]})')
                first[doc_id] = here

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self._locations)

    def content_digest(self, n: int | None = None) -> str:
        """SHA-256 of the first ``n`` kept documents' 8-byte digests (all when None), taken during the scan."""
        return self._locations.digest_of(0, len(self) if n is None else min(int(n), len(self)))

    def shard_digests(self) -> list[dict]:
        """``[{"name", "count", "sha256"}]`` per shard, from the scan's digests."""
        out, lo = [], 0
        for shard, count in zip(self.shards, self.shard_counts.tolist()):
            out.append(
                {
                    "name": shard.name,
                    "count": count,
                    "sha256": self._locations.digest_of(lo, lo + count),
                }
            )
            lo += count
        return out

    def _records(self, indices: Sequence[int], text_only: bool) -> list[dict]:
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"document index {i} out of range for {len(self)} documents")
        out: list[dict | None] = [None] * len(indices)
        if not indices:
            return []
        idx = np.asarray(indices, np.int64)
        shard_of = np.searchsorted(self._shard_end, idx, side="right")
        for k in np.unique(shard_of).tolist():
            reader = self._readers[k]
            if _stamp(reader.shard.path) != self._stamps[k]:
                raise DataError(
                    f"{reader.display}: the file changed after it was indexed (while it was being read); "
                    "open it again (a jaxinf command: run it again; what the change affects is recomputed)"
                )
            where_k = np.nonzero(shard_of == k)[0]
            order = where_k[np.argsort(idx[where_k], kind="stable")]
            items = list(self._locations.items(idx[order]))
            recs = reader.read(items, self.fields, self._default_id(k), self._default_source(k), text_only)
            for j, rec in zip(order.tolist(), recs):
                out[j] = rec
        return out  # type: ignore[return-value]

    def texts(self, indices: Sequence[int]) -> list[str]:
        """The texts of the documents at ``indices``, in that order."""
        return [r["text"] for r in self._records(indices, True)]

    def documents(self, indices: Sequence[int]) -> list[Document]:
        """The documents at ``indices``, in that order (``line``: the line of a JSONL shard, the 1-based row of a
        Parquet or Arrow shard)."""
        return [
            Document(index=int(i), id=r["id"], text=r["text"], source=r["source"], extra=r["extra"], line=r["line"])
            for i, r in zip(indices, self._records(indices, False))
        ]

    def shard_of(self, index: int) -> str:
        """The path of the shard holding document ``index``."""
        return self._readers[int(np.searchsorted(self._shard_end, int(index), side="right"))].display

    def __getitem__(self, i: int) -> Document:
        return self.documents([i])[0]

    def __iter__(self) -> Iterator[Document]:
        return iter_documents(self)

    def close(self) -> None:
        """Deletes the spilled copies of compressed shards (also done when the object is collected or at exit)."""
        for r in self._readers:
            r.close()
        if self._spill_tmp is not None:
            self._finalizer()
