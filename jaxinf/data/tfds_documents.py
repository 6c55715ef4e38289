"""Documents of a TFDS dataset: a dataset directory or a dataset name, read with random access.

A dataset directory (one holding ``dataset_info.json``, as written by ``jaxinf prepare``) or a dataset name
that ``tfds.data_source`` finds (written ``tfds:NAME``), read through ``tfds.data_source`` /
``builder.as_data_source`` (array_record, random access, TensorFlow is never imported). Its features
``text`` (required), ``id`` and ``source`` follow the rules of :mod:`jaxinf.data.documents`; ids absent
from a dataset default to the 0-based record number. Other features go to ``extra``. Empty texts in
datasets not written by ``jaxinf prepare`` are found by one scan when the dataset is opened, skipped and
counted.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxinf.atomic import file_sha256
from jaxinf.data.documents import (
    DEFAULT_FIELDS,
    DEFAULT_SOURCE,
    Document,
    ReadReport,
    check_id,
    check_string,
    iter_documents,
)
from jaxinf.data.errors import DataError, one_line

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

    def __init__(
        self,
        data_source: Any,
        name: str,
        *,
        feature_names: Sequence[str],
        prepared: bool,
        report: ReadReport | None = None,
        fields: tuple[str, str, str] = DEFAULT_FIELDS,
        shard_lengths: Sequence[int] | None = None,
        shard_files: Sequence[Any] | None = None,
        file_digests: dict[str, str] | None = None,
    ):
        self._ds = data_source
        self.name = name
        self._id_field, self._text_field, self._source_field = self._fields = self.field_names = tuple(fields)
        features = set(feature_names)
        if self._text_field not in features:
            raise DataError(
                f'{name}: the dataset has no feature "{self._text_field}" (it has '
                f"{', '.join(sorted(features))}; set data.text_field)"
            )
        self._prepared = prepared
        self._has_id = self._id_field in features
        self._has_source = self._source_field in features
        self.report = report if report is not None else ReadReport(name)
        self._shard_lengths = [int(n) for n in shard_lengths] if shard_lengths else [len(data_source)]
        self._files = [str(f) for f in shard_files] if shard_files else []
        if prepared and len(self._files) == len(self._shard_lengths) and sum(self._shard_lengths) == len(data_source):
            # Written by jaxinf prepare (no empty texts): fingerprinted by its files' bytes, no pass over the records.
            self._rows, self._digests, self._kept_per_shard = None, None, list(self._shard_lengths)
            self._file_digests = [_sha256(f) for f in self._files]
            for f, digest in zip(self._files, self._file_digests):  # recorded by jaxinf prepare (when it did)
                if file_digests and file_digests.get(Path(f).name, digest) != digest:
                    raise DataError(
                        f"{f}: not the file jaxinf prepare wrote (its SHA-256 differs from the one in "
                        "metadata.json): the dataset is damaged; prepare it again"
                    )
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
                text = check_string(
                    _plain(raw[self._text_field], self.name, self._text_field), self._text_field, where_, None
                )
                if not text.strip():
                    continue
                doc_id = (
                    check_id(_plain(raw[self._id_field], self.name, self._id_field), where_, None, self._id_field)
                    if self._has_id
                    else str(r)
                )
                source = (
                    check_string(
                        _plain(raw[self._source_field], self.name, self._source_field), self._source_field, where_, None
                    )
                    if self._has_source
                    else DEFAULT_SOURCE
                )
                keep.append(r)
                kept_per_shard[shard] += 1
                digests += hashlib.blake2b(
                    doc_id.encode() + b"\0" + source.encode() + b"\0" + text.encode(), digest_size=8
                ).digest()
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
                        h.update(
                            hashlib.blake2b(f"{doc.id}\0{doc.source}\0{doc.text}".encode(), digest_size=8).digest()
                        )
            lo += length
        return h.hexdigest()

    def shard_digests(self) -> list[dict]:
        """``[{"name", "count", "sha256"}]`` per array_record shard of the split: from the scan's digests, or the
        file's SHA-256 (``jaxinf prepare``)."""
        out, lo = [], 0
        for k, count in enumerate(self._kept_per_shard):
            digest = (
                hashlib.sha256(self._digests[8 * lo : 8 * (lo + count)]).hexdigest()
                if self._digests is not None
                else self._file_digests[k]
            )
            name = os.path.basename(self._files[k]) if k < len(self._files) else f"shard {k}"
            out.append({"name": name, "count": count, "sha256": digest})
            lo += count
        return out

    def _get(self, rows: Sequence[int]) -> list[dict]:
        rows = [int(r) for r in rows]
        getitems = getattr(self._ds, "__getitems__", None)
        try:
            return list(getitems(rows)) if getitems is not None else [self._ds[r] for r in rows]
        except Exception as e:  # array_record raises RuntimeError for a truncated or corrupted file
            if isinstance(e, OSError) and e.errno is not None:
                raise
            where = f"record {rows[0]}" if len(rows) == 1 else f"records {rows[0]}..{rows[-1]}"
            raise DataError(
                f"{self.name}: cannot read {where} ({type(e).__name__}: {e}); the dataset's files are damaged"
            ) from None

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
            source = (
                check_string(rec.pop(self._source_field), self._source_field, where_, None)
                if self._has_source
                else DEFAULT_SOURCE
            )
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


def _sha256(path: str) -> str:
    """The SHA-256 of one of the dataset's array_record files; a file missing or unreadable is one line (TFDS's data
    source opens its files lazily, so a deleted shard was a FileNotFoundError traceback here)."""
    try:
        return file_sha256(path)
    except OSError as e:
        what = "missing" if isinstance(e, FileNotFoundError) else f"cannot be read ({e.strerror})"
        raise DataError(
            f"{path}: {what}, though dataset_info.json lists it: the dataset is damaged; prepare it again"
        ) from None


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def _from_builder(
    builder: Any, name: str, split: str, data_source: Any = None, fields: tuple[str, str, str] = DEFAULT_FIELDS
) -> TfdsDocuments:
    if split not in builder.info.splits:
        raise DataError(f'{name}: no split "{split}" (it has {", ".join(sorted(builder.info.splits))})')
    features = list(builder.info.features.keys())
    metadata = dict(builder.info.metadata or {})
    prepared = (
        metadata.get("writer") == PREPARED_MARK
        and set(PREPARED_FEATURES) <= set(features)
        and tuple(fields) == DEFAULT_FIELDS
    )
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
    files = metadata.get("files")
    return TfdsDocuments(
        ds,
        name,
        feature_names=features,
        prepared=prepared,
        report=report,
        fields=fields,
        shard_lengths=shard_lengths,
        shard_files=shard_files,
        file_digests=files if isinstance(files, dict) else None,
    )


def open_tfds_directory(
    path: str | os.PathLike, split: str = "train", fields: tuple[str, str, str] = DEFAULT_FIELDS
) -> TfdsDocuments:
    """The documents of a TFDS dataset directory (one holding ``dataset_info.json``), via ``as_data_source``."""
    path = str(path)
    if not (Path(path) / "dataset_info.json").is_file():
        raise DataError(f"{path}: not a TFDS dataset directory (no dataset_info.json)")
    try:
        builder = _tfds().builder_from_directory(path)
    except Exception as e:  # TFDS raises many types for a broken directory
        raise DataError(f"{path}: cannot open the TFDS dataset ({one_line(e)})") from None
    return _from_builder(builder, path, split, fields=fields)


def open_tfds_name(
    name: str,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    fields: tuple[str, str, str] = DEFAULT_FIELDS,
) -> TfdsDocuments:
    """The documents of a TFDS dataset found by name (``tfds.data_source(name, data_dir=...)``); never downloads."""
    tfds = _tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:
        raise DataError(f"tfds:{name}: cannot find the dataset ({one_line(e)})") from None
    if not builder.is_prepared():
        raise DataError(f"tfds:{name}: the dataset is not prepared in {builder.data_dir}")
    if split not in builder.info.splits:
        raise DataError(f'tfds:{name}: no split "{split}" (it has {", ".join(sorted(builder.info.splits))})')
    # Read through tfds.data_source itself, so the name resolves exactly as TFDS resolves it.
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return _from_builder(builder, f"tfds:{name}", split, ds, fields=fields)
