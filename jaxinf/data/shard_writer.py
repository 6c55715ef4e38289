"""Writing a corpus as shards of any format :mod:`jaxinf.data.shards` reads (tests and benchmarks)."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WRITE_FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow", "hf")


def write_shards(
    records: Iterator[dict],
    out_dir: str | os.PathLike,
    fmt: str,
    shards: int = 1,
    per_shard: int | None = None,
    row_group: int = 4096,
) -> Path:
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
            f: Any  # a gzip, zstandard or plain binary file: each writes bytes
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
                    writer = (
                        pq.ParquetWriter(str(path), table.schema)
                        if fmt == "parquet"
                        else pa.ipc.new_stream(str(path), table.schema)
                    )
                writer.write_table(table, row_group_size=row_group) if fmt == "parquet" else writer.write_table(table)
            if not batch or (count is not None and taken >= count):
                break
        if writer is not None:
            writer.close()
    if fmt == "hf":
        (out / "state.json").write_text(
            json.dumps({"_data_files": [{"filename": n} for n in names], "_split": "train"})
        )
        (out / "dataset_info.json").write_text("{}")
    return out
