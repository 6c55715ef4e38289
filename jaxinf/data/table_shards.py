"""One Parquet or Arrow shard of a corpus, read with pyarrow: its validating scan and its reads.

Parquet is read batch by batch for the scan and row group by row group for documents (the last group read
is kept); Arrow is memory-mapped. At most two table shards are open at a time (:class:`OpenTables`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxinf.data.documents import ReadReport, check_string
from jaxinf.data.errors import DataError, one_line, where_row
from jaxinf.data.shard_files import Fields, Shard


class OpenTables:
    """The Parquet and Arrow shards of a corpus that are open now, at most ``size`` (least recently used closed):
    a mapped or open file per shard would make the resident memory (mapped pages) and the open files follow the
    number of shards, not the work at hand."""

    def __init__(self, size: int = 2):
        self.size = size
        self.open: list[TableShard] = []

    def use(self, reader: TableShard) -> None:
        if reader in self.open:
            self.open.remove(reader)
        self.open.append(reader)
        while len(self.open) > self.size:
            self.open.pop(0)._release()


class TableShard:
    """A Parquet or Arrow shard, read with pyarrow; opened only while it is read (:class:`OpenTables`)."""

    _table: Any = None  # the Arrow table, while open (set by _open; pyarrow has no type stubs)
    _pf: Any = None  # the Parquet file, while open

    def __init__(self, shard: Shard, tables: OpenTables | None = None):
        self.shard = shard
        self.display = str(shard.path)
        self._tables = tables or OpenTables()
        self._cache: tuple[Any, Any] | None = None
        self._open()
        self.schema = self._pf.schema_arrow if self._pf is not None else self._table.schema
        if self._pf is not None:
            meta = self._pf.metadata
            self._group_rows = np.asarray([meta.row_group(i).num_rows for i in range(meta.num_row_groups)], np.int64)
            self._group_start: np.ndarray = np.concatenate([[0], np.cumsum(self._group_rows)])

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
                raise DataError(
                    f"{self.display}: not a readable {self.shard.kind.capitalize()} file ({one_line(e)})"
                ) from None
        self._tables.use(self)

    def _release(self) -> None:
        if self._pf is not None:
            self._pf.close()
        self._table = self._pf = None
        self._cache = None

    def check_columns(self, fields: Fields) -> None:
        import pyarrow.types as t

        names = set(self.schema.names)
        if fields.text not in names:
            raise DataError(
                f'{self.display}: missing column "{fields.text}" (it has {", ".join(self.schema.names)};'
                " set data.text_field)"
            )
        checks = (
            (fields.text, "strings", lambda ty: t.is_string(ty) or t.is_large_string(ty)),
            (fields.id, "strings or integers", lambda ty: t.is_string(ty) or t.is_large_string(ty) or t.is_integer(ty)),
            (fields.source, "strings", lambda ty: t.is_string(ty) or t.is_large_string(ty)),
        )
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
            raise DataError(f"{self.display}: cannot read ({one_line(e)})") from None

    def scan(self, fields: Fields, default_id, default_source: str, report: ReadReport):
        """Validates every row: yields ``(row from 1, row from 0, row from 0, digest, id, default_id,
        default_source)`` per kept document (a row's location is its number; it has no byte range)."""
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
                    raise DataError(f'{where_row(self.display, row)}: field "{fields.text}" is null')
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
                if source is None:  # defaulted_source
                    source = default_source
                try:
                    digest = blake(
                        doc_id.encode() + b"\0" + source.encode() + b"\0" + text.encode(), digest_size=8
                    ).digest()
                except UnicodeEncodeError:
                    for name, value in ((fields.id, doc_id), (fields.source, source), (fields.text, text)):
                        check_string(value, name, where_row(self.display, row), None)
                    raise
                yield row, row - 1, row - 1, digest, doc_id, defaulted_id, defaulted_source

    def _rows(self, rows: list[int], columns: list[str]) -> dict[str, list]:
        self._open()
        if self._table is not None:
            if rows and rows[-1] - rows[0] == len(rows) - 1 and rows == sorted(rows):  # a run of rows: one slice
                part = self._table.slice(rows[0], len(rows))
                return {c: part.column(c).to_pylist() for c in columns}
            # One element at a time: Table.take concatenates the chunks of every column first, even for a single row
            # (docs/benchmarks.md); indexing a chunked column finds the row's chunk and copies nothing else.
            return {c: [self._table.column(c)[r].as_py() for r in rows] for c in columns}
        out: dict[str, list] = {c: [] for c in columns}
        groups = np.searchsorted(self._group_start, rows, side="right") - 1
        for r, g in zip(rows, groups.tolist()):
            key = (g, tuple(columns))
            if self._cache is None or self._cache[0] != key:
                try:
                    table = self._pf.read_row_group(g, columns=columns, use_threads=False)
                except Exception as e:
                    raise DataError(f"{self.display}: cannot read row group {g} ({one_line(e)})") from None
                self._cache = (key, {c: table.column(c) for c in columns})
            cols = self._cache[1]
            k = r - int(self._group_start[g])
            for c in columns:
                out[c].append(cols[c][k].as_py())
        return out

    def read(
        self, items: list[tuple[int, int, int]], fields: Fields, default_id, default_source: str, text_only: bool
    ) -> list[dict]:
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
            out.append(
                {
                    "id": default_id(line) if doc_id is None else str(doc_id),
                    "text": text,
                    "source": default_source if source is None else source,
                    "extra": extra,
                    "line": line,
                }
            )
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
