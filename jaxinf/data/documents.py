"""Documents: the records influence is scored for, and the reader of one JSONL file.

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

The other readers follow the same rules: :mod:`jaxinf.data.tfds_documents` (TFDS datasets),
:mod:`jaxinf.data.shards` (files, directories and globs of JSONL, compressed JSONL, Parquet
and Arrow shards); :func:`jaxinf.data.sources.open_documents` picks one for ``data.documents``.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from jaxinf.data.errors import DataError, type_name, where
from jaxinf.data.locations import LocationsBuilder

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
            parts.append(
                f"{self.duplicates} exact duplicates skipped ("
                + ", ".join(self.duplicate_examples)
                + (", ..." if self.duplicates > len(self.duplicate_examples) else "")
                + ")"
            )
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


COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
COMPRESSED_SUFFIX = {"gzip": ".jsonl.gz", "zstd": ".jsonl.zst"}


class DuplicateKey(ValueError):
    """A JSON object that names one key twice (the key in ``args[0]``)."""


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # json.loads keeps the last value of a repeated key without a word
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return obj


STRICT_JSON = json.JSONDecoder(object_pairs_hook=_unique_object)  # JSON whose objects name each key once


def decode_line(raw: bytes, path: str, line: int, *, strip_bom: bool = False) -> Any | None:
    """The JSON value of one line, or ``None`` for a blank line.

    Raises :class:`DataError` for invalid UTF-8 (naming the byte, counted from 1
    within the line), invalid JSON (naming the parser's reason and column) or an
    object that names one key twice (naming the key).
    """
    text_bytes = raw[len(BOM) :] if strip_bom and raw.startswith(BOM) else raw
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + (len(raw) - len(text_bytes)) + 1
        packed = (
            next((name for magic, name in COMPRESSED_MAGIC.items() if raw.startswith(magic)), None)
            if line == 1
            else None
        )
        hint = (
            (
                f" (the file is {packed}-compressed: documents are read compressed only when the name ends in "
                f"{COMPRESSED_SUFFIX[packed]}; queries must be decompressed)"
            )
            if packed
            else ""
        )
        raise DataError(f"{where(path, line)}: invalid UTF-8 at byte {offset}{hint}") from None
    if not text.strip():
        return None
    try:
        return STRICT_JSON.decode(text)
    except DuplicateKey as e:
        raise DataError(f'{where(path, line)}: field "{e.args[0]}" appears twice (which one is meant?)') from None
    except json.JSONDecodeError as e:
        before = text[: e.pos]  # a value, then a bare carriage return (JSON whitespace, but no line end here)
        if e.msg == "Extra data" and "\r" in before[len(before.rstrip()) :]:
            runs = text.rstrip().count("\r") + 1
            raise DataError(
                f"{where(path, line)}: {runs} lines separated by a carriage return alone (\\r, old Mac line ends); "
                "JSONL lines end in \\n (or \\r\\n): convert the file (tr '\\r' '\\n' < OLD > NEW)"
            ) from None
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


def parse_document(
    obj: Any,
    path: str,
    line: int,
    default_id: str,
    fields: tuple[str, str, str] = DEFAULT_FIELDS,
    default_source: str = DEFAULT_SOURCE,
) -> dict[str, Any] | None:
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
    return {
        "id": doc_id,
        "text": text,
        "source": source,
        "extra": extra,
        "line": line,
        "default_id": not has_id,
        "default_source": not has_source,
    }


class IdChecker:
    """Finds duplicate ids among millions without keeping the ids: 64-bit hashes, then a second look on collision.

    The hashes grow in one array of 8 bytes a document, sorted in place at the end (no copy of them)."""

    def __init__(self) -> None:
        self._hashes = array.array("q")

    def add(self, doc_id: str) -> None:
        self._hashes.append(hash(doc_id))

    def suspects(self) -> set[int]:
        """Hashes seen more than once (true duplicates, or, vanishingly rarely, a collision)."""
        if not self._hashes:
            return set()
        h = np.frombuffer(self._hashes, np.int64)
        h.sort()
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


def iter_jsonl_documents(
    path: str | os.PathLike, report: ReadReport | None = None, locations: LocationsBuilder | None = None
) -> Iterator[tuple[int, int, dict]]:
    """Validates a documents JSONL file line by line: yields ``(byte offset, byte end, record)`` of each kept document.

    ``record`` is as :func:`parse_document` returns. ``report`` (if given) is
    filled with the counts as the lines go by. After the last line, duplicate
    ids raise :class:`DataError` naming both lines, so a consumer that reaches
    the end has seen a valid file. ``locations`` (if given) gets each kept
    document's line, byte range and the 8-byte BLAKE2b digest of its line, in order.
    """
    path = str(path)
    report = report if report is not None else ReadReport(path)
    ids = IdChecker()
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
        if locations is not None:
            locations.add(number, offset, offset + len(raw), hashlib.blake2b(raw, digest_size=8).digest())
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

    The scan (:func:`iter_jsonl_documents`) keeps only each document's line,
    byte range and digest (:mod:`jaxinf.data.locations`: 20 bytes a document
    in a file under 4 GiB, no Python object per document). Reading a document re-reads its line; a file
    that changed since the scan is an error, never a silent mix of versions.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.name = self.path
        self.report = ReadReport(self.path)
        locations = LocationsBuilder()
        for _ in iter_jsonl_documents(self.path, self.report, locations):
            pass
        self._locations = locations.finish()
        self._stamp = self._file_stamp()

    def content_digest(self, n: int | None = None) -> str:
        """SHA-256 of the first ``n`` kept documents (all when None): over the 8-byte BLAKE2b digests of their
        lines, taken during the validating scan (no other pass over the file)."""
        return self._locations.digest_of(0, len(self) if n is None else min(int(n), len(self)))

    def _file_stamp(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_size, st.st_mtime_ns

    def __len__(self) -> int:
        return len(self._locations)

    def _records(self, indices: Sequence[int]) -> list[dict]:
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"document index {i} out of range for {len(self)} documents")
        out = []
        with open(self.path, "rb") as f:
            if (os.fstat(f.fileno()).st_size, os.fstat(f.fileno()).st_mtime_ns) != self._stamp:
                raise DataError(
                    f"{self.path}: the file changed after it was indexed (while it was being read); "
                    "open it again (a jaxinf command: run it again; what the change affects is recomputed)"
                )
            fd = f.fileno()
            for line, start, end in self._locations.items(np.asarray(indices, np.int64)):
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
    return Document(
        index=index, id=rec["id"], text=rec["text"], source=rec["source"], extra=rec["extra"], line=rec["line"]
    )


def iter_documents(source: DocumentSource, chunk: int = 1024) -> Iterator[Document]:
    """Every document of ``source`` in index order, read ``chunk`` at a time."""
    for lo in range(0, len(source), chunk):
        yield from source.documents(range(lo, min(lo + chunk, len(source))))
