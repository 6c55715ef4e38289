"""The shards of a corpus: which files ``data.documents`` names, their formats and names.

A file, a directory (every shard below it, in sorted path order; files of other kinds and names starting
with ``.`` or ``_`` are ignored and counted), a ``datasets`` ``save_to_disk`` directory (the ``.arrow``
files its ``state.json`` lists) or a glob. :mod:`jaxinf.data.shards` reads them as one corpus.
"""

from __future__ import annotations

import glob as globmod
import json
import os
from dataclasses import dataclass
from pathlib import Path

from jaxinf.data.errors import DataError

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
                raise DataError(f"{path}: unsupported compression {suffix} (JSON lines may be plain, .gz or .zst)")
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
            raise DataError(
                f"{spec}: no JSONL, Parquet or Arrow files in the directory (and no dataset_info.json "
                "of a TFDS dataset)"
            )
        return shards, ignored
    if p.is_file():
        fmt = shard_format(p)
        if fmt is None:
            raise DataError(
                f"{spec}: unknown document format (expected .jsonl, .json, .jsonl.gz, .jsonl.zst, .parquet or .arrow)"
            )
        return [Shard(p, fmt[0], fmt[1], shard_name(p, None))], ignored
    raise DataError(
        f"{spec}: no such file or directory (documents are a JSONL, Parquet or Arrow file, a directory "
        "or glob of them, a TFDS dataset directory or tfds:NAME)"
    )


def _datasets_arrow_files(root: Path) -> list[Path] | None:
    """The ``.arrow`` files of a ``datasets`` ``save_to_disk`` directory (its ``train`` split for a DatasetDict)."""
    if (root / "dataset_dict.json").is_file():
        try:
            splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
            if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
                raise TypeError(f"its splits are not a list of names: {json.dumps(splits)[:80]}")
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{root / 'dataset_dict.json'}: not a datasets DatasetDict file ({e})") from None
        if "train" not in splits:
            raise DataError(f'{root}: no split "train" (it has {", ".join(map(str, splits))})')
        train = root / "train"
        if not (train / "state.json").is_file():  # never read the DatasetDict's own files as documents
            raise DataError(
                f"{train}: the split train of {root / 'dataset_dict.json'} is not a datasets save_to_disk "
                f"directory (no {'state.json in it' if train.is_dir() else 'such directory'})"
            )
        return _datasets_arrow_files(train)
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


class Fields:
    """The field (column) names of a corpus: ``data.text_field``, ``data.id_field``, ``data.source_field``."""

    def __init__(self, text: str, id: str, source: str):
        self.text, self.id, self.source = text, id, source
        self.names = (id, text, source)
