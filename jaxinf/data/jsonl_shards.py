"""One JSONL shard of a corpus, plain or compressed with gzip or zstd: its validating scan and its reads.

A compressed shard cannot seek: the scan decompresses it once into a spill file (in ``$JAXINF_SPILL_DIR``,
else the system's temporary directory), which later reads ``pread`` as a plain JSONL shard.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from jaxinf.data.documents import ReadReport, decode_line, parse_document
from jaxinf.data.errors import DataError, one_line, where
from jaxinf.data.shard_files import Fields, Shard


class JsonlShard:
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
                        raise DataError(
                            f"{where(self.display, number + 1)}: cannot decompress "
                            f"({self.shard.compression}: {one_line(e)})"
                        ) from None
                    except Exception as e:  # zstandard.ZstdError
                        if type(e).__name__ != "ZstdError":
                            raise
                        raise DataError(
                            f"{where(self.display, number + 1)}: cannot decompress (zstd: {one_line(e)})"
                        ) from None
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

    def scan(self, fields: Fields, default_id, default_source: str, report: ReadReport):
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
            yield (
                number,
                offset,
                offset + len(raw),
                hashlib.blake2b(raw, digest_size=8).digest(),
                rec["id"],
                rec["default_id"],
                rec["default_source"],
            )

    def read(
        self, items: list[tuple[int, int, int]], fields: Fields, default_id, default_source: str, text_only: bool
    ) -> list[dict]:
        out = []
        with open(self.data_path, "rb") as f:
            fd = f.fileno()
            for line, start, end in items:
                raw = os.pread(fd, end - start, start)
                rec = parse_document(
                    decode_line(raw, self.display, line, strip_bom=line == 1),
                    self.display,
                    line,
                    default_id(line),
                    fields.names,
                    default_source,
                )
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
