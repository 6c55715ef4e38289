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

Memory: per document, only fixed-size arrays (shard number, line or row, two byte offsets, an 8-byte content
digest, a 64-bit id hash during the scan): about 48 bytes, whatever the corpus's text.

Content digest of a document (8-byte BLAKE2b): of its line for JSONL (compressed or not), of its id, source
and text for Parquet and Arrow. The corpus's fingerprint is the SHA-256 of those in order; each shard's
fingerprint is the SHA-256 of its own, so a changed shard is named when a resumed run recomputes.
"""

from __future__ import annotations

import array
import glob as globmod
import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
import weakref
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxinf.data.documents import (
    DEFAULT_SOURCE,
    Document,
    ReadReport,
    _IdChecker,
    check_string,
    decode_line,
    iter_documents,
    parse_document,
)
from jaxinf.data.errors import DataError, where

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
UNSUPPORTED_COMPRESSIONS = (".bz2", ".xz", ".lz4", ".lzma", ".br", ".snappy", ".zip", ".7z", ".tar", ".z", ".lz")
GLOB_CHARS = "*?["


def is_glob(spec: str) -> bool:
    return any(c in spec for c in GLOB_CHARS)


def shard_format(path: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(kind, compression)`` of a shard by its name: kind ``jsonl``, ``parquet`` or ``arrow``; compression
    ``gzip``, ``zstd`` or None. None for a name of no known format; :class:`DataError` for an unsupported
    compression."""
    name = Path(path).name.lower()
    if name.endswith(".parquet"):
        return "parquet", None
    if name.endswith(".arrow"):
        return "arrow", None
    compression = None
    for suffix, kind in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = kind, name[: -len(suffix)]
            break
    else:
        for suffix in UNSUPPORTED_COMPRESSIONS:
            if name.endswith(suffix) and any(name[: -len(suffix)].endswith(s) for s in JSONL_SUFFIXES):
                raise DataError(f"{path}: unsupported compression {suffix} (JSON lines may be plain, "
                                ".gz or .zst)")
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    return None


def shard_name(path: Path, root: Path | None) -> str:
    """A shard's name (its default source): its path below ``root`` (else its file name) without format suffixes."""
    rel = path.relative_to(root).as_posix() if root is not None else path.name
    lower = rel.lower()
    for suffix in tuple(COMPRESSIONS) + (".parquet", ".arrow"):
        if lower.endswith(suffix):
            rel, lower = rel[: -len(suffix)], lower[: -len(suffix)]
            break
    for suffix in JSONL_SUFFIXES:
        if lower.endswith(suffix):
            return rel[: -len(suffix)]
    return rel


@dataclass(frozen=True)
class Shard:
    path: Path
    kind: str
    compression: str | None
    name: str


def _hidden(rel: Path) -> bool:
    return any(part.startswith((".", "_")) for part in rel.parts)


def list_shards(spec: str) -> tuple[list[Shard], list[str]]:
    """The shards ``spec`` names, in order, and the files of a directory that were ignored (other kinds)."""
    p = Path(spec)
    ignored: list[str] = []
    if is_glob(spec) and not p.exists():
        paths = sorted(Path(m) for m in globmod.glob(spec, recursive=True) if Path(m).is_file())
        if not paths:
            raise DataError(f"{spec}: no file matches")
        shards = []
        for q in paths:
            fmt = shard_format(q)
            if fmt is None:
                ignored.append(str(q))
                continue
            shards.append(Shard(q, fmt[0], fmt[1], shard_name(q, None)))
        if not shards:
            raise DataError(f"{spec}: no JSONL, Parquet or Arrow file matches (matched: {', '.join(ignored[:3])})")
        return shards, ignored
    if p.is_dir():
        hf = _datasets_arrow_files(p)
        if hf is not None:
            return [Shard(q, "arrow", None, shard_name(q, p)) for q in hf], ignored
        shards = []
        for q in sorted(x for x in p.rglob("*") if x.is_file()):
            rel = q.relative_to(p)
            fmt = None if _hidden(rel) else shard_format(q)
            if fmt is None:
                ignored.append(rel.as_posix())
                continue
            shards.append(Shard(q, fmt[0], fmt[1], shard_name(q, p)))
        if not shards:
            raise DataError(f"{spec}: no JSONL, Parquet or Arrow files in the directory (and no dataset_info.json "
                            "of a TFDS dataset)")
        return shards, ignored
    if p.is_file():
        fmt = shard_format(p)
        if fmt is None:
            raise DataError(f"{spec}: unknown document format (expected .jsonl, .json, .jsonl.gz, .jsonl.zst, "
                            ".parquet or .arrow)")
        return [Shard(p, fmt[0], fmt[1], shard_name(p, None))], ignored
    raise DataError(f"{spec}: no such file or directory (documents are a JSONL, Parquet or Arrow file, a directory "
                    "or glob of them, a TFDS dataset directory or tfds:NAME)")


def _datasets_arrow_files(root: Path) -> list[Path] | None:
    """The ``.arrow`` files of a ``datasets`` ``save_to_disk`` directory (its ``train`` split for a DatasetDict)."""
    if (root / "dataset_dict.json").is_file():
        try:
            splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{root / 'dataset_dict.json'}: not a datasets DatasetDict file ({e})") from None
        if "train" not in splits:
            raise DataError(f'{root}: no split "train" (it has {", ".join(map(str, splits))})')
        return _datasets_arrow_files(root / "train")
    state = root / "state.json"
    if not state.is_file():
        return None
    try:
        files = [root / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state}: not a datasets state.json ({e})") from None
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: listed in {state} but missing")
    return files


# --------------------------------------------------------------------------- one shard


class _Fields:
    def __init__(self, text: str, id: str, source: str):
        self.text, self.id, self.source = text, id, source
        self.names = (id, text, source)


class _JsonlShard:
    """A JSONL shard; a compressed one is decompressed once into a spill file that later reads ``pread``."""

    def __init__(self, shard: Shard, spill_dir: Path | None):
        self.shard = shard
        self.display = str(shard.path)
        self.data_path = shard.path
        self._spill_dir = spill_dir

    def _open_stream(self):
        try:
            f = open(self.shard.path, "rb")
        except OSError as e:
            raise DataError(f"{self.display}: cannot read ({e.strerror})") from None
        if self.shard.compression == "gzip":
            return io.BufferedReader(gzip.GzipFile(fileobj=f), buffer_size=1 << 20), f
        if self.shard.compression == "zstd":
            return io.BufferedReader(_ZstdReader(f), buffer_size=1 << 20), f
        return f, f

    def raw_lines(self) -> Iterator[tuple[int, int, bytes]]:
        """``(line from 1, byte offset in the data file, line without newline)``; a compressed shard is spilled."""
        stream, base = self._open_stream()
        spill = None
        if self.shard.compression is not None:
            fd, name = tempfile.mkstemp(prefix=Path(self.display).name + ".", suffix=".jsonl", dir=self._spill_dir)
            spill = os.fdopen(fd, "wb", buffering=1 << 20)
            self.data_path = Path(name)
        number, offset = 0, 0
        try:
            with base, stream:
                while True:
                    try:
                        raw = stream.readline()
                    except (OSError, EOFError, zlib.error) as e:
                        raise DataError(f"{where(self.display, number + 1)}: cannot decompress "
                                        f"({self.shard.compression}: {_one_line(e)})") from None
                    except Exception as e:  # zstandard.ZstdError
                        if type(e).__name__ != "ZstdError":
                            raise
                        raise DataError(f"{where(self.display, number + 1)}: cannot decompress "
                                        f"(zstd: {_one_line(e)})") from None
                    if not raw:
                        break
                    number += 1
                    if spill is not None:
                        spill.write(raw)
                    yield number, offset, raw.rstrip(b"\n")
                    offset += len(raw)
        finally:
            if spill is not None:
                spill.close()

    def scan(self, fields: _Fields, default_id, default_source: str, report: ReadReport):
        """Validates every line: yields ``(line, start, end, digest, id, default_id, default_source)`` per kept
        document."""
        for number, offset, raw in self.raw_lines():
            obj = decode_line(raw, self.display, number, strip_bom=number == 1)
            if obj is None:
                report.blank_lines += 1
                continue
            rec = parse_document(obj, self.display, number, default_id(number), fields.names, default_source)
            if rec is None:
                report.empty += 1
                continue
            yield (number, offset, offset + len(raw), hashlib.blake2b(raw, digest_size=8).digest(), rec["id"],
                   rec["default_id"], rec["default_source"])

    def read(self, items: list[tuple[int, int, int]], fields: _Fields, default_id, default_source: str,
             text_only: bool) -> list[dict]:
        out = []
        with open(self.data_path, "rb") as f:
            fd = f.fileno()
            for line, start, end in items:
                raw = os.pread(fd, end - start, start)
                rec = parse_document(decode_line(raw, self.display, line, strip_bom=line == 1), self.display, line,
                                     default_id(line), fields.names, default_source)
                if rec is None:  # pragma: no cover - the stamp check makes this unreachable
                    raise DataError(f"{where(self.display, line)}: the document is empty now; open the corpus again")
                out.append(rec)
        return out

    def close(self) -> None:
        if self.shard.compression is not None and self.data_path != self.shard.path:
            try:
                os.unlink(self.data_path)
            except OSError:
                pass


class _ZstdReader(io.RawIOBase):
    """Decompresses a zstd file frame after frame; a file that ends inside a frame is an error (``EOFError``),
    which ``zstandard``'s own stream reader does not report."""

    def __init__(self, f):
        import zstandard

        self._f, self._dctx = f, zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._buf = b""
        self._started = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            chunk = self._f.read(1 << 20)
            if not chunk:
                if self._started and not self._obj.eof:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            while chunk:
                self._started = True
                self._buf += self._obj.decompress(chunk)
                chunk = b""
                if self._obj.eof:
                    chunk = self._obj.unused_data
                    self._obj = self._dctx.decompressobj()
                    self._started = bool(chunk)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _row(path: str, row: int) -> str:
    return f"{path}: row {row}"


class _OpenTables:
    """The Parquet and Arrow shards of a corpus that are open now, at most ``size`` (least recently used closed):
    a mapped or open file per shard would make the resident memory (mapped pages) and the open files follow the
    number of shards, not the work at hand."""

    def __init__(self, size: int = 2):
        self.size, self.open = size, []

    def use(self, reader: "_TableShard") -> None:
        if reader in self.open:
            self.open.remove(reader)
        self.open.append(reader)
        while len(self.open) > self.size:
            self.open.pop(0)._release()


class _TableShard:
    """A Parquet or Arrow shard, read with pyarrow; opened only while it is read (:class:`_OpenTables`)."""

    def __init__(self, shard: Shard, tables: _OpenTables | None = None):
        self.shard = shard
        self.display = str(shard.path)
        self._tables = tables or _OpenTables()
        self._cache: tuple[Any, Any] | None = None
        self._table = self._pf = None
        self._open()
        self.schema = self._pf.schema_arrow if self._pf is not None else self._table.schema
        if self._pf is not None:
            meta = self._pf.metadata
            self._group_rows = np.asarray([meta.row_group(i).num_rows for i in range(meta.num_row_groups)], np.int64)
            self._group_start = np.concatenate([[0], np.cumsum(self._group_rows)])

    def _open(self) -> None:
        if self._table is None and self._pf is None:
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq

                if self.shard.kind == "parquet":
                    self._pf = pq.ParquetFile(str(self.shard.path))
                else:
                    self._table = _read_arrow(self.shard.path, pa)
            except Exception as e:  # pyarrow raises ArrowInvalid, ArrowIOError, OSError ... for a broken file
                raise DataError(f"{self.display}: not a readable {self.shard.kind.capitalize()} file "
                                f"({_one_line(e)})") from None
        self._tables.use(self)

    def _release(self) -> None:
        if self._pf is not None:
            self._pf.close()
        self._table = self._pf = None
        self._cache = None

    def check_columns(self, fields: _Fields) -> None:
        import pyarrow.types as t

        names = set(self.schema.names)
        if fields.text not in names:
            raise DataError(f'{self.display}: missing column "{fields.text}" (it has {", ".join(self.schema.names)};'
                            " set data.text_field)")
        checks = ((fields.text, "strings", lambda ty: t.is_string(ty) or t.is_large_string(ty)),
                  (fields.id, "strings or integers", lambda ty: t.is_string(ty) or t.is_large_string(ty)
                   or t.is_integer(ty)),
                  (fields.source, "strings", lambda ty: t.is_string(ty) or t.is_large_string(ty)))
        for name, what, ok in checks:
            if name in names and not ok(self.schema.field(name).type):
                raise DataError(f'{self.display}: column "{name}" must hold {what}, got {self.schema.field(name).type}')

    def _batches(self, columns: list[str]) -> Iterator[Any]:
        self._open()
        try:
            if self._table is not None:
                yield from self._table.select(columns).to_batches(max_chunksize=8192)
            else:
                yield from self._pf.iter_batches(batch_size=8192, columns=columns, use_threads=False)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{self.display}: cannot read ({_one_line(e)})") from None

    def scan(self, fields: _Fields, default_id, default_source: str, report: ReadReport):
        """Validates every row: yields ``(row from 1, row from 0, 0, digest, id, default_id, default_source)`` per
        kept document."""
        self.check_columns(fields)
        names = set(self.schema.names)
        has_id, has_source = fields.id in names, fields.source in names
        columns = [fields.text] + ([fields.id] if has_id else []) + ([fields.source] if has_source else [])
        row = 0
        blake = hashlib.blake2b
        for batch in self._batches(columns):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if has_id else None
            sources = batch.column(columns.index(fields.source)).to_pylist() if has_source else None
            for j, text in enumerate(texts):
                row += 1
                if text is None:
                    raise DataError(f'{_row(self.display, row)}: field "{fields.text}" is null')
                if not text or text.isspace():
                    report.empty += 1
                    continue
                doc_id = ids[j] if ids is not None else None
                if doc_id is None:
                    doc_id, defaulted_id = default_id(row), True
                else:
                    doc_id, defaulted_id = str(doc_id), False
                source = sources[j] if sources is not None else None
                defaulted_source = source is None
                if defaulted_source:
                    source = default_source
                try:
                    digest = blake(doc_id.encode() + b"\0" + source.encode() + b"\0" + text.encode(),
                                   digest_size=8).digest()
                except UnicodeEncodeError:
                    for name, value in ((fields.id, doc_id), (fields.source, source), (fields.text, text)):
                        check_string(value, name, _row(self.display, row), None)
                    raise
                yield row, row - 1, 0, digest, doc_id, defaulted_id, defaulted_source

    def _rows(self, rows: list[int], columns: list[str]) -> dict[str, list]:
        self._open()
        if self._table is not None:
            if rows and rows[-1] - rows[0] == len(rows) - 1 and rows == sorted(rows):  # a run of rows: one slice
                part = self._table.slice(rows[0], len(rows))
                return {c: part.column(c).to_pylist() for c in columns}
            # One element at a time: Table.take concatenates the chunks of every column first (0.3 s for a 26 MB
            # shard, for a single row); indexing a chunked column finds the row's chunk and copies nothing else.
            return {c: [self._table.column(c)[r].as_py() for r in rows] for c in columns}
        out: dict[str, list] = {c: [] for c in columns}
        groups = np.searchsorted(self._group_start, rows, side="right") - 1
        for r, g in zip(rows, groups.tolist()):
            key = (g, tuple(columns))
            if self._cache is None or self._cache[0] != key:
                try:
                    table = self._pf.read_row_group(g, columns=columns, use_threads=False)
                except Exception as e:
                    raise DataError(f"{self.display}: cannot read row group {g} ({_one_line(e)})") from None
                self._cache = (key, {c: table.column(c) for c in columns})
            cols = self._cache[1]
            k = r - int(self._group_start[g])
            for c in columns:
                out[c].append(cols[c][k].as_py())
        return out

    def read(self, items: list[tuple[int, int, int]], fields: _Fields, default_id, default_source: str,
             text_only: bool) -> list[dict]:
        names = self.schema.names
        columns = [fields.text] if text_only else list(names)
        values = self._rows([start for _, start, _ in items], columns)
        out = []
        for j, (line, _, _) in enumerate(items):
            text = values[fields.text][j]
            if text_only:
                out.append({"text": text})
                continue
            doc_id = values[fields.id][j] if fields.id in values else None
            source = values[fields.source][j] if fields.source in values else None
            extra = {c: values[c][j] for c in columns if c not in fields.names}
            out.append({"id": default_id(line) if doc_id is None else str(doc_id), "text": text,
                        "source": default_source if source is None else source, "extra": extra, "line": line})
        return out

    def close(self) -> None:
        self._release()


def _read_arrow(path: Path, pa) -> Any:
    """An Arrow IPC file (stream format, as ``datasets`` writes, or file format), memory-mapped."""
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source = pa.memory_map(str(path), "r")
        return pa.ipc.open_file(source).read_all()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] if text else type(e).__name__


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

    def __init__(self, spec: str | os.PathLike, *, text_field: str = "text", id_field: str = "id",
                 source_field: str = "source", spill_dir: str | os.PathLike | None = None, dedupe: str = "none"):
        if dedupe not in ("none", "exact"):
            raise DataError(f"data.dedupe: must be none or exact, got {dedupe!r}")
        self.name = str(spec)
        self.fields = _Fields(text_field, id_field, source_field)
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
        tables = _OpenTables()
        self._readers = [_JsonlShard(s, Path(self._spill_tmp) if self._spill_tmp else None) if s.kind == "jsonl"
                         else _TableShard(s, tables) for s in shards]
        shard_ix, lines, starts, ends = array.array("i"), array.array("q"), array.array("q"), array.array("q")
        digests = bytearray()
        ids = _IdChecker()
        counts = []
        self._stamps = []
        for k, reader in enumerate(self._readers):
            self._stamps.append(_stamp(reader.shard.path))
            before = len(lines)
            for line, start, end, digest, doc_id, d_id, d_src in reader.scan(
                    self.fields, self._default_id(k), self._default_source(k), self.report):
                shard_ix.append(k)
                lines.append(line)
                starts.append(start)
                ends.append(end)
                digests += digest
                ids.add(doc_id)
                self.report.default_ids += d_id
                self.report.default_sources += d_src
            counts.append(len(lines) - before)
            if _stamp(reader.shard.path) != self._stamps[-1]:
                raise DataError(f"{reader.display}: changed while it was being read; open the corpus again")
        self.report.documents = len(lines)
        self._shard = np.frombuffer(shard_ix, np.int32) if len(shard_ix) else np.zeros(0, np.int32)
        self._line = np.frombuffer(lines, np.int64) if len(lines) else np.zeros(0, np.int64)
        self._start = np.frombuffer(starts, np.int64) if len(starts) else np.zeros(0, np.int64)
        self._end = np.frombuffer(ends, np.int64) if len(ends) else np.zeros(0, np.int64)
        self._digests = bytes(digests)
        self.shard_counts = np.asarray(counts, np.int64)
        suspects = ids.suspects()
        if suspects:
            self._raise_duplicate(suspects)
        self.duplicates: list[tuple[str, str]] = []
        if dedupe == "exact":
            self._dedupe()

    def _dedupe(self, listed: int = 1000) -> None:
        """Exact de-duplication (``data.dedupe: exact``): of documents with the same text (16-byte BLAKE2b of it,
        from one more sequential read of the texts), the first is kept; the others are skipped and counted
        (``report.duplicates``), and the first ``listed`` are kept as (id, id of the document kept) pairs."""
        n = len(self)
        text_digests = bytearray()
        for lo in range(0, n, 4096):
            for text in self.texts(range(lo, min(lo + 4096, n))):
                text_digests += hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
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
        self._shard, self._line = self._shard[keep], self._line[keep]
        self._start, self._end = self._start[keep], self._end[keep]
        self._digests = np.frombuffer(self._digests, np.uint64)[keep].tobytes()
        self.shard_counts = np.bincount(self._shard, minlength=len(self.shards)).astype(np.int64)
        self.report.documents = len(self._line)

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
            for line, _, _, _, doc_id, _, _ in reader.scan(self.fields, self._default_id(k), self._default_source(k),
                                                         scratch):
                if hash(doc_id) not in suspects:
                    continue
                here = where(reader.display, line) if reader.shard.kind == "jsonl" else _row(reader.display, line)
                if doc_id in first:
                    raise DataError(f'{here}: duplicate id "{doc_id}" (first at {first[doc_id]})')
                first[doc_id] = here

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self._line)

    def content_digest(self, n: int | None = None) -> str:
        """SHA-256 of the first ``n`` kept documents' 8-byte digests (all when None), taken during the scan."""
        count = len(self) if n is None else min(int(n), len(self))
        return hashlib.sha256(self._digests[: 8 * count]).hexdigest()

    def shard_digests(self) -> list[dict]:
        """``[{"name", "count", "sha256"}]`` per shard, from the scan's digests."""
        out, lo = [], 0
        for shard, count in zip(self.shards, self.shard_counts.tolist()):
            out.append({"name": shard.name, "count": count,
                        "sha256": hashlib.sha256(self._digests[8 * lo: 8 * (lo + count)]).hexdigest()})
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
        shard_of = self._shard[idx]
        for k in np.unique(shard_of).tolist():
            reader = self._readers[k]
            if _stamp(reader.shard.path) != self._stamps[k]:
                raise DataError(f"{reader.display}: the file changed after it was indexed; open it again")
            where_k = np.nonzero(shard_of == k)[0]
            order = where_k[np.argsort(idx[where_k], kind="stable")]
            items = [(int(self._line[i]), int(self._start[i]), int(self._end[i])) for i in idx[order].tolist()]
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
        return [Document(index=int(i), id=r["id"], text=r["text"], source=r["source"], extra=r["extra"],
                         line=r["line"]) for i, r in zip(indices, self._records(indices, False))]

    def shard_of(self, index: int) -> str:
        """The path of the shard holding document ``index``."""
        return self._readers[int(self._shard[int(index)])].display

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


__all__ = ["ShardedDocuments", "Shard", "list_shards", "shard_format", "shard_name", "write_shards"]


# --------------------------------------------------------------------------- writing shards (tests, benchmarks)

WRITE_FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow", "hf")


def write_shards(records: Iterator[dict], out_dir: str | os.PathLike, fmt: str, shards: int = 1,
                 per_shard: int | None = None, row_group: int = 4096) -> Path:
    """Writes ``records`` (dicts with string values; ``per_shard`` per shard, else all in one) into ``out_dir`` as
    ``shards`` files of format ``fmt`` (:data:`WRITE_FORMATS`; ``hf``: the layout of a ``datasets``
    ``save_to_disk`` directory, Arrow stream files and ``state.json``). Streams: memory stays flat."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt not in WRITE_FORMATS:
        raise ValueError(f"format must be one of {WRITE_FORMATS}, got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    it = iter(records)
    names = []
    for k in range(shards):
        count = per_shard if k < shards - 1 or per_shard is not None else None
        suffix = {"hf": "arrow"}.get(fmt, fmt)
        name = f"data-{k:05d}-of-{shards:05d}.{suffix}"
        names.append(name)
        path = out / name
        taken = 0
        if fmt.startswith("jsonl"):
            if fmt == "jsonl.gz":
                f = gzip.open(path, "wb", compresslevel=6)
            elif fmt == "jsonl.zst":
                import zstandard

                f = zstandard.ZstdCompressor(level=3).stream_writer(open(path, "wb"), closefd=True)
            else:
                f = open(path, "wb")
            with f:
                for rec in it:
                    f.write(json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n")
                    taken += 1
                    if count is not None and taken >= count:
                        break
            continue
        writer = None
        while True:
            batch = []
            for rec in it:
                batch.append(rec)
                taken += 1
                if len(batch) >= row_group or (count is not None and taken >= count):
                    break
            if batch:
                table = pa.Table.from_pylist(batch)
                if writer is None:
                    writer = (pq.ParquetWriter(str(path), table.schema) if fmt == "parquet"
                              else pa.ipc.new_stream(str(path), table.schema))
                writer.write_table(table, row_group_size=row_group) if fmt == "parquet" else writer.write_table(table)
            if not batch or (count is not None and taken >= count):
                break
        if writer is not None:
            writer.close()
    if fmt == "hf":
        (out / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                    "_split": "train"}))
        (out / "dataset_info.json").write_text("{}")
    return out
