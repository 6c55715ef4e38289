"""Documents: the records influence is scored for, read from JSONL or from a TFDS dataset.

Every source gives random access to its documents by *index*: the document's
position among the kept documents of the file, 0-based, which is the column of
``scores.npy`` ("document-file order").

JSONL (one JSON object per line, UTF-8; a leading byte-order mark and ``\\r\\n``
line ends are accepted)::

    {"id": "doc-17", "text": "...", "source": "wiki", "url": "..."}

The rules, each applied the same way by every reader (and by ``jaxinf prepare``):

- ``text`` is required and must be a string. A document whose text is empty
  or only whitespace is *skipped and counted* (``ReadReport.empty``); it gets
  no index. Every other problem is a :class:`~jaxinf.data.errors.DataError`
  naming the file and line.
- ``id`` is a string or an integer (kept as its decimal string). When absent
  it is the 1-based line number, as a string, and counted
  (``ReadReport.default_ids``). Ids are unique within a file (a duplicate is an
  error naming both lines).
- ``source`` is a string; when absent it is ``"unknown"``, counted
  (``ReadReport.default_sources``).
- Any other field is kept as given in ``Document.extra``.
- Lines holding only whitespace are skipped and counted (``ReadReport.blank_lines``).

TFDS: a dataset directory (one holding ``dataset_info.json``, as written by
``jaxinf prepare``) or a dataset name that ``tfds.data_source`` finds (written
``tfds:NAME``), read through ``tfds.data_source`` / ``builder.as_data_source``
(array_record, random access, TensorFlow is never imported). Its features
``text`` (required), ``id`` and ``source`` follow the rules above; ids absent
from a dataset default to the 0-based record number. Other features go to
``extra``. Empty texts in datasets not written by ``jaxinf prepare`` are found
by one scan when the dataset is opened, skipped and counted.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jaxinf.data.errors import DataError, type_name, where

DEFAULT_SOURCE = "unknown"
DEFAULT_FIELDS = ("id", "text", "source")  # (data.id_field, data.text_field, data.source_field)
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Document:
    """One document. ``index`` is its column in the scores (0-based among the kept documents).

    ``line`` is where it came from: the 1-based line of the JSONL file (kept by
    ``jaxinf prepare``), or for other TFDS datasets the 0-based record number.
    """

    index: int
    id: str
    text: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)
    line: int = 0


@dataclass
class ReadReport:
    """What a reader kept, skipped and defaulted; nothing is dropped without being counted here."""

    path: str
    documents: int = 0
    empty: int = 0
    blank_lines: int = 0
    default_ids: int = 0
    default_sources: int = 0
    ignored_files: int = 0
    shard_sources: bool = False  # a corpus of several shards: missing sources are the shard's name
    duplicates: int = 0  # data.dedupe: exact: documents skipped as exact duplicates of an earlier one
    duplicate_examples: list = field(default_factory=list)  # the first few, "id = id of the kept document"

    def summary(self) -> str:
        """One line for a log: counts of kept, skipped and defaulted documents."""
        parts = [f"{self.documents} documents"]
        if self.empty:
            parts.append(f"{self.empty} empty documents skipped")
        if self.blank_lines:
            parts.append(f"{self.blank_lines} blank lines skipped")
        if self.default_ids:
            parts.append(f"{self.default_ids} ids defaulted to the line number")
        if self.default_sources:
            to = "their shard's name" if self.shard_sources else f'"{DEFAULT_SOURCE}"'
            parts.append(f"{self.default_sources} sources defaulted to {to}")
        if self.duplicates:
            parts.append(f"{self.duplicates} exact duplicates skipped (" + ", ".join(self.duplicate_examples)
                         + (", ..." if self.duplicates > len(self.duplicate_examples) else "") + ")")
        if self.ignored_files:
            parts.append(f"{self.ignored_files} files of other kinds ignored")
        return f"{self.path}: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class DocumentSource(Protocol):
    """What the batching layer needs from a corpus: its size and texts by index."""

    name: str
    report: ReadReport

    def __len__(self) -> int: ...

    def texts(self, indices: Sequence[int]) -> list[str]: ...

    def documents(self, indices: Sequence[int]) -> list[Document]: ...


# --------------------------------------------------------------------------- JSONL


def decode_line(raw: bytes, path: str, line: int, *, strip_bom: bool = False) -> Any | None:
    """The JSON value of one line, or ``None`` for a blank line.

    Raises :class:`DataError` for invalid UTF-8 (naming the byte, counted from 1
    within the line) or invalid JSON (naming the parser's reason and column).
    """
    text_bytes = raw[len(BOM):] if strip_bom and raw.startswith(BOM) else raw
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + (len(raw) - len(text_bytes)) + 1
        raise DataError(f"{where(path, line)}: invalid UTF-8 at byte {offset}") from None
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where(path, line)}: invalid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where(path, line)}: invalid JSON (nested too deeply)") from None


def check_string(value: Any, name: str, path: str, line: int | None) -> str:
    """``value`` if it is a string encodable as UTF-8, else :class:`DataError` naming the field."""
    if not isinstance(value, str):
        raise DataError(f'{where(path, line)}: field "{name}" must be a string, got {type_name(value)}')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f'{where(path, line)}: field "{name}" holds an unpaired surrogate at character {e.start + 1}'
        ) from None
    return value


def check_id(value: Any, path: str, line: int | None, name: str = "id") -> str:
    """A document or query id as a string: a string as is, an integer as its decimal string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return check_string(value, name, path, line)
    raise DataError(f'{where(path, line)}: field "{name}" must be a string or an integer, got {type_name(value)}')


def parse_document(obj: Any, path: str, line: int, default_id: str, fields: tuple[str, str, str] = DEFAULT_FIELDS,
                   default_source: str = DEFAULT_SOURCE) -> dict[str, Any] | None:
    """The validated fields of one document line, or ``None`` when its text is empty (to skip).

    ``fields`` names the id, text and source fields (``data.id_field``, ``data.text_field``,
    ``data.source_field``). Returns ``{"id", "text", "source", "extra", "line", "default_id", "default_source"}``.
    """
    id_field, text_field, source_field = fields
    if not isinstance(obj, dict):
        raise DataError(f"{where(path, line)}: expected a JSON object, got {type_name(obj)}")
    if text_field not in obj:
        raise DataError(f'{where(path, line)}: missing field "{text_field}"')
    text = check_string(obj[text_field], text_field, path, line)
    has_id = id_field in obj
    doc_id = check_id(obj[id_field], path, line, id_field) if has_id else default_id
    has_source = source_field in obj
    source = check_string(obj[source_field], source_field, path, line) if has_source else default_source
    if not text.strip():
        return None
    extra = {k: v for k, v in obj.items() if k not in fields}
    return {"id": doc_id, "text": text, "source": source, "extra": extra, "line": line,
            "default_id": not has_id, "default_source": not has_source}


class _IdChecker:
    """Finds duplicate ids among millions without keeping the ids: 64-bit hashes, then a second look on collision."""

    def __init__(self) -> None:
        self._hashes: list[np.ndarray] = []
        self._pending: list[int] = []

    def add(self, doc_id: str) -> None:
        self._pending.append(hash(doc_id))
        if len(self._pending) >= 65536:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._hashes.append(np.asarray(self._pending, np.int64))
            self._pending = []

    def suspects(self) -> set[int]:
        """Hashes seen more than once (true duplicates, or, vanishingly rarely, a collision)."""
        self._flush()
        if not self._hashes:
            return set()
        h = np.sort(np.concatenate(self._hashes))
        return set(h[1:][h[1:] == h[:-1]].tolist())


def _iter_raw_lines(path: str) -> Iterator[tuple[int, int, bytes]]:
    """``(line number from 1, byte offset, raw bytes without the newline)`` for every line of a file."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        offset = 0
        for number, raw in enumerate(f, start=1):
            yield number, offset, raw.rstrip(b"\n")
            offset += len(raw)


def iter_jsonl_documents(path: str | os.PathLike, report: ReadReport | None = None,
                         line_digests: bytearray | None = None) -> Iterator[tuple[int, int, dict]]:
    """Validates a documents JSONL file line by line: yields ``(byte offset, byte end, record)`` of each kept document.

    ``record`` is as :func:`parse_document` returns. ``report`` (if given) is
    filled with the counts as the lines go by. After the last line, duplicate
    ids raise :class:`DataError` naming both lines, so a consumer that reaches
    the end has seen a valid file. ``line_digests`` (if given) gets the 8-byte
    BLAKE2b digest of each kept document's line appended, in order.
    """
    path = str(path)
    report = report if report is not None else ReadReport(path)
    ids = _IdChecker()
    for number, offset, raw in _iter_raw_lines(path):
        obj = decode_line(raw, path, number, strip_bom=number == 1)
        if obj is None:
            report.blank_lines += 1
            continue
        rec = parse_document(obj, path, number, str(number))
        if rec is None:
            report.empty += 1
            continue
        report.documents += 1
        report.default_ids += rec["default_id"]
        report.default_sources += rec["default_source"]
        ids.add(rec["id"])
        if line_digests is not None:
            line_digests += hashlib.blake2b(raw, digest_size=8).digest()
        yield offset, offset + len(raw), rec
    suspects = ids.suspects()
    if suspects:
        _raise_duplicate(path, suspects)


def _raise_duplicate(path: str, suspects: set[int]) -> None:
    first: dict[str, int] = {}
    for number, _, raw in _iter_raw_lines(path):
        obj = decode_line(raw, path, number, strip_bom=number == 1)
        rec = None if obj is None else parse_document(obj, path, number, str(number))
        if rec is None or hash(rec["id"]) not in suspects:
            continue
        if rec["id"] in first:
            raise DataError(f'{where(path, number)}: duplicate id "{rec["id"]}" (first at line {first[rec["id"]]})')
        first[rec["id"]] = number


class JsonlDocuments:
    """Random access to the documents of a JSONL file, after one validating scan.

    The scan (:func:`iter_jsonl_documents`) keeps only byte offsets, so memory
    is 24 bytes per document. Reading a document re-reads its line; a file
    that changed since the scan is an error, never a silent mix of versions.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.name = self.path
        self.report = ReadReport(self.path)
        starts, ends, lines = [], [], []
        self._digests = bytearray()
        for start, end, rec in iter_jsonl_documents(self.path, self.report, self._digests):
            starts.append(start)
            ends.append(end)
            lines.append(rec["line"])
        self._start = np.asarray(starts, np.int64)
        self._end = np.asarray(ends, np.int64)
        self._line = np.asarray(lines, np.int64)
        self._stamp = self._file_stamp()

    def content_digest(self, n: int | None = None) -> str:
        """SHA-256 of the first ``n`` kept documents (all when None): over the 8-byte BLAKE2b digests of their
        lines, taken during the validating scan (no other pass over the file)."""
        count = len(self) if n is None else min(int(n), len(self))
        return hashlib.sha256(bytes(self._digests[:8 * count])).hexdigest()

    def _file_stamp(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_size, st.st_mtime_ns

    def __len__(self) -> int:
        return len(self._start)

    def _records(self, indices: Sequence[int]) -> list[dict]:
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"document index {i} out of range for {len(self)} documents")
        out = []
        with open(self.path, "rb") as f:
            if (os.fstat(f.fileno()).st_size, os.fstat(f.fileno()).st_mtime_ns) != self._stamp:
                raise DataError(f"{self.path}: the file changed after it was indexed; open it again")
            fd = f.fileno()
            for i in indices:
                start, end, line = int(self._start[i]), int(self._end[i]), int(self._line[i])
                raw = os.pread(fd, end - start, start)
                rec = parse_document(decode_line(raw, self.path, line, strip_bom=line == 1), self.path, line, str(line))
                if rec is None:  # pragma: no cover - the stamp check makes this unreachable
                    raise DataError(f"{where(self.path, line)}: the document is empty now; open the file again")
                out.append(rec)
        return out

    def texts(self, indices: Sequence[int]) -> list[str]:
        """The texts of the documents at ``indices``, in that order."""
        return [r["text"] for r in self._records(indices)]

    def documents(self, indices: Sequence[int]) -> list[Document]:
        """The documents at ``indices``, in that order."""
        return [_document(int(i), r) for i, r in zip(indices, self._records(indices))]

    def __getitem__(self, i: int) -> Document:
        return self.documents([i])[0]

    def __iter__(self) -> Iterator[Document]:
        return iter_documents(self)


def _document(index: int, rec: dict) -> Document:
    return Document(index=index, id=rec["id"], text=rec["text"], source=rec["source"], extra=rec["extra"],
                    line=rec["line"])


def iter_documents(source: DocumentSource, chunk: int = 1024) -> Iterator[Document]:
    """Every document of ``source`` in index order, read ``chunk`` at a time."""
    for lo in range(0, len(source), chunk):
        yield from source.documents(range(lo, min(lo + chunk, len(source))))


# --------------------------------------------------------------------------- TFDS

PREPARED_FEATURES = ("id", "text", "source", "extra", "line")
PREPARED_MARK = "jaxinf.prepare"


def _plain(value: Any, path: str, name: str) -> Any:
    """A TFDS feature value as a plain Python value (bytes as UTF-8 text, arrays as lists)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f'{path}: feature "{name}" is not valid UTF-8 at byte {e.start + 1}') from None
    if isinstance(value, np.ndarray):
        return [_plain(v, path, name) for v in value] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v, path, f"{name}/{k}") for k, v in value.items()}
    return value


class TfdsDocuments:
    """Random access to the documents of a TFDS data source (``tfds.data_source`` / ``as_data_source``).

    A dataset of ``jaxinf prepare`` is fingerprinted by the SHA-256 of each of its array_record files (a read at
    disk speed, no pass over the records). Any other is read once when opened (the validating scan): the kept
    records, and an 8-byte BLAKE2b digest of each kept document's id, source and text. From either come
    :meth:`content_digest` and :meth:`shard_digests` (a content fingerprint, shard by shard).
    """

    def __init__(self, data_source: Any, name: str, *, feature_names: Sequence[str], prepared: bool,
                 report: ReadReport | None = None, fields: tuple[str, str, str] = DEFAULT_FIELDS,
                 shard_lengths: Sequence[int] | None = None, shard_files: Sequence[Any] | None = None):
        self._ds = data_source
        self.name = name
        self._id_field, self._text_field, self._source_field = self._fields = self.field_names = tuple(fields)
        features = set(feature_names)
        if self._text_field not in features:
            raise DataError(f'{name}: the dataset has no feature "{self._text_field}" (it has '
                            f'{", ".join(sorted(features))}; set data.text_field)')
        self._prepared = prepared
        self._has_id = self._id_field in features
        self._has_source = self._source_field in features
        self.report = report if report is not None else ReadReport(name)
        self._shard_lengths = [int(n) for n in shard_lengths] if shard_lengths else [len(data_source)]
        self._files = [str(f) for f in shard_files] if shard_files else []
        if prepared and len(self._files) == len(self._shard_lengths) and sum(self._shard_lengths) == len(data_source):
            # Written by jaxinf prepare (no empty texts): fingerprinted by its files' bytes, no pass over the records.
            self._rows, self._digests, self._kept_per_shard = None, None, list(self._shard_lengths)
            self._file_digests = [_file_sha256(f) for f in self._files]
            self.report.documents = len(data_source)
        else:
            self._rows, self._digests, self._kept_per_shard = self._scan()

    def _scan(self) -> tuple[np.ndarray | None, bytes, list[int]]:
        """Record numbers of the non-empty documents and their digests (one pass over the records), counting what is
        skipped or defaulted."""
        keep = array.array("q")
        digests = bytearray()
        n = len(self._ds)
        bounds = np.cumsum(self._shard_lengths) if sum(self._shard_lengths) == n else np.asarray([n])
        kept_per_shard = [0] * len(bounds)
        shard = 0
        for lo in range(0, n, 1024):
            for r, raw in zip(range(lo, min(lo + 1024, n)), self._get(range(lo, min(lo + 1024, n)))):
                while r >= bounds[shard]:
                    shard += 1
                where_ = f"{self.name} record {r}"
                text = check_string(_plain(raw[self._text_field], self.name, self._text_field), self._text_field,
                                    where_, None)
                if not text.strip():
                    continue
                doc_id = check_id(_plain(raw[self._id_field], self.name, self._id_field), where_, None,
                                  self._id_field) if self._has_id else str(r)
                source = (check_string(_plain(raw[self._source_field], self.name, self._source_field),
                                       self._source_field, where_, None) if self._has_source else DEFAULT_SOURCE)
                keep.append(r)
                kept_per_shard[shard] += 1
                digests += hashlib.blake2b(doc_id.encode() + b"\0" + source.encode() + b"\0" + text.encode(),
                                           digest_size=8).digest()
        if not self._prepared:
            self.report.documents = len(keep)
            self.report.empty = n - len(keep)
            if not self._has_id:
                self.report.default_ids = len(keep)
            if not self._has_source:
                self.report.default_sources = len(keep)
        elif len(keep) != n:  # pragma: no cover - jaxinf prepare writes no empty text
            raise DataError(f"{self.name}: {n - len(keep)} empty documents in a dataset written by jaxinf prepare")
        self.report.documents = len(keep)
        rows = None if len(keep) == n else np.frombuffer(keep, np.int64)
        return rows, bytes(digests), kept_per_shard

    def content_digest(self, n: int | None = None) -> str:
        """SHA-256 of the first ``n`` kept documents (all when None): of their digests taken during the scan; for a
        dataset of ``jaxinf prepare``, of the SHA-256 of each array_record file wholly among them and the digests of
        the records of the one cut by ``n`` (read for that alone)."""
        count = len(self) if n is None else min(int(n), len(self))
        if self._digests is not None:
            return hashlib.sha256(self._digests[: 8 * count]).hexdigest()
        h, lo = hashlib.sha256(b"files"), 0
        for length, digest in zip(self._shard_lengths, self._file_digests):
            if lo + length <= count:
                h.update(bytes.fromhex(digest))
            elif lo < count:
                for r in range(lo, count, 1024):
                    for doc in self.documents(range(r, min(r + 1024, count))):
                        h.update(hashlib.blake2b(f"{doc.id}\0{doc.source}\0{doc.text}".encode(), digest_size=8).digest())
            lo += length
        return h.hexdigest()

    def shard_digests(self) -> list[dict]:
        """``[{"name", "count", "sha256"}]`` per array_record shard of the split: from the scan's digests, or the
        file's SHA-256 (``jaxinf prepare``)."""
        out, lo = [], 0
        for k, count in enumerate(self._kept_per_shard):
            digest = (hashlib.sha256(self._digests[8 * lo: 8 * (lo + count)]).hexdigest() if self._digests is not None
                      else self._file_digests[k])
            name = os.path.basename(self._files[k]) if k < len(self._files) else f"shard {k}"
            out.append({"name": name, "count": count, "sha256": digest})
            lo += count
        return out

    def _get(self, rows: Sequence[int]) -> list[dict]:
        rows = [int(r) for r in rows]
        getitems = getattr(self._ds, "__getitems__", None)
        return list(getitems(rows)) if getitems is not None else [self._ds[r] for r in rows]

    def __len__(self) -> int:
        return self.report.documents

    def _records(self, indices: Sequence[int]) -> list[tuple[int, dict]]:
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"document index {i} out of range for {len(self)} documents")
        rows = indices if self._rows is None else [int(self._rows[i]) for i in indices]
        return list(zip(rows, self._get(rows)))

    def texts(self, indices: Sequence[int]) -> list[str]:
        """The texts of the documents at ``indices``, in that order."""
        return [_plain(raw[self._text_field], self.name, self._text_field) for _, raw in self._records(indices)]

    def documents(self, indices: Sequence[int]) -> list[Document]:
        """The documents at ``indices``, in that order."""
        out = []
        for i, (row, raw) in zip(indices, self._records(indices)):
            rec = {k: _plain(v, self.name, k) for k, v in raw.items()}
            where_ = f"{self.name} record {row}"
            text = check_string(rec.pop(self._text_field), self._text_field, where_, None)
            doc_id = check_id(rec.pop(self._id_field), where_, None, self._id_field) if self._has_id else str(row)
            source = (check_string(rec.pop(self._source_field), self._source_field, where_, None)
                      if self._has_source else DEFAULT_SOURCE)
            if self._prepared:
                extra = json.loads(rec.pop("extra"))
                line = int(rec.pop("line"))
            else:
                extra, line = rec, row
            out.append(Document(index=int(i), id=doc_id, text=text, source=source, extra=extra, line=line))
        return out

    def __getitem__(self, i: int) -> Document:
        return self.documents([i])[0]

    def __iter__(self) -> Iterator[Document]:
        return iter_documents(self)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def _from_builder(builder: Any, name: str, split: str, data_source: Any = None,
                  fields: tuple[str, str, str] = DEFAULT_FIELDS) -> TfdsDocuments:
    if split not in builder.info.splits:
        raise DataError(f'{name}: no split "{split}" (it has {", ".join(sorted(builder.info.splits))})')
    features = list(builder.info.features.keys())
    metadata = dict(builder.info.metadata or {})
    prepared = (metadata.get("writer") == PREPARED_MARK and set(PREPARED_FEATURES) <= set(features)
                and tuple(fields) == DEFAULT_FIELDS)
    report = ReadReport(name)
    if prepared:
        for k in ("empty", "blank_lines", "default_ids", "default_sources"):
            setattr(report, k, int(metadata.get(k, 0)))
    ds = builder.as_data_source(split=split) if data_source is None else data_source
    info = builder.info.splits[split]
    shard_lengths = list(getattr(info, "shard_lengths", None) or [])
    try:
        shard_files = list(getattr(info, "filepaths", None) or [])
    except Exception:  # a split without files of its own
        shard_files = []
    return TfdsDocuments(ds, name, feature_names=features, prepared=prepared, report=report, fields=fields,
                         shard_lengths=shard_lengths, shard_files=shard_files)


def open_tfds_directory(path: str | os.PathLike, split: str = "train",
                        fields: tuple[str, str, str] = DEFAULT_FIELDS) -> TfdsDocuments:
    """The documents of a TFDS dataset directory (one holding ``dataset_info.json``), via ``as_data_source``."""
    path = str(path)
    if not (Path(path) / "dataset_info.json").is_file():
        raise DataError(f"{path}: not a TFDS dataset directory (no dataset_info.json)")
    try:
        builder = _tfds().builder_from_directory(path)
    except Exception as e:  # TFDS raises many types for a broken directory
        raise DataError(f"{path}: cannot open the TFDS dataset ({_one_line(e)})") from None
    return _from_builder(builder, path, split, fields=fields)


def open_tfds_name(name: str, data_dir: str | os.PathLike | None = None, split: str = "train",
                   fields: tuple[str, str, str] = DEFAULT_FIELDS) -> TfdsDocuments:
    """The documents of a TFDS dataset found by name (``tfds.data_source(name, data_dir=...)``); never downloads."""
    tfds = _tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:
        raise DataError(f"tfds:{name}: cannot find the dataset ({_one_line(e)})") from None
    if not builder.is_prepared():
        raise DataError(f"tfds:{name}: the dataset is not prepared in {builder.data_dir}")
    if split not in builder.info.splits:
        raise DataError(f'tfds:{name}: no split "{split}" (it has {", ".join(sorted(builder.info.splits))})')
    # Read through tfds.data_source itself, so the name resolves exactly as TFDS resolves it.
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return _from_builder(builder, f"tfds:{name}", split, ds, fields=fields)


def open_documents(spec: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
                   split: str = "train", text_field: str = "text", id_field: str = "id",
                   source_field: str = "source", dedupe: str = "none") -> DocumentSource:
    """The document source ``data.documents`` names.

    - a directory holding ``dataset_info.json`` but no ``state.json`` (what ``jaxinf prepare`` writes): a TFDS
      dataset directory;
    - ``tfds:NAME`` (``NAME[/CONFIG][:VERSION]``): a TFDS dataset found by name in ``data_dir``;
    - one plain JSONL file with the default field names: :class:`JsonlDocuments`;
    - any other file, directory or glob of JSONL, gzip/zstd JSONL, Parquet or Arrow shards (a ``datasets``
      ``save_to_disk`` directory too): :class:`jaxinf.data.shards.ShardedDocuments`.

    ``text_field``, ``id_field`` and ``source_field`` (``data.text_field`` ...) name the columns. ``dedupe``
    (``data.dedupe``): ``exact`` skips documents whose text equals an earlier one's (counted in the report);
    not for TFDS datasets.
    """
    from jaxinf.data.shards import ShardedDocuments, is_glob, shard_format

    spec = str(spec)
    fields = (id_field, text_field, source_field)
    p = Path(spec)
    tfds_dir = p.is_dir() and (p / "dataset_info.json").is_file() and not (p / "state.json").is_file()
    if dedupe != "none" and (spec.startswith("tfds:") or tfds_dir):
        raise DataError(f"{spec}: data.dedupe={dedupe} is not supported for TFDS datasets (de-duplicate the JSONL, "
                        "Parquet or Arrow shards instead)")
    if spec.startswith("tfds:"):
        return open_tfds_name(spec[len("tfds:"):], data_dir, split, fields)
    if tfds_dir:
        return open_tfds_directory(p, split, fields)
    if p.is_file() and fields == DEFAULT_FIELDS and dedupe == "none" and shard_format(p) in (None, ("jsonl", None)):
        return JsonlDocuments(p)
    if p.exists() or is_glob(spec):
        return ShardedDocuments(spec, text_field=text_field, id_field=id_field, source_field=source_field,
                                dedupe=dedupe)
    raise DataError(f"{spec}: no such file or directory (documents are a JSONL, Parquet or Arrow file, a directory "
                    "or glob of them, a TFDS dataset directory or tfds:NAME)")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] if text else type(e).__name__
