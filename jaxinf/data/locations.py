"""Where each document of a corpus lies, in fixed-size columns: what a validating scan keeps per document.

Per document: its line (JSONL) or row (Parquet, Arrow), where its bytes start (the byte offset of its line, or
its row from 0), how many bytes it has (0 for a row), and an 8-byte digest of it. Each integer column takes 4
bytes a document while its values fit (below 2**32: a shard under 4 GiB, a line under 4 GiB) and 8 from the first
value that does not; the digests take 8. So 20 bytes a document (32 at most), and no Python object per document:
a corpus of 5 million documents keeps 100 MB, whatever its text (docs/benchmarks.md, the memory-flatness check).
"""

from __future__ import annotations

import array
import hashlib
from collections.abc import Iterator

import numpy as np


class UIntColumn:
    """A growing column of non-negative integers: 4 bytes each until a value needs 8, then 8 (one copy, once)."""

    def __init__(self) -> None:
        self._values = array.array("I")

    def append(self, value: int) -> None:
        try:
            self._values.append(value)
        except OverflowError:
            if self._values.typecode == "Q":
                raise
            self._values = array.array("Q", self._values)
            self._values.append(value)

    def to_numpy(self) -> np.ndarray:
        """The values so far as a NumPy view of the same memory (no copy); the column must not grow after."""
        if not len(self._values):
            return np.zeros(0, np.uint32)
        return np.frombuffer(self._values, np.dtype(f"u{self._values.itemsize}"))


class LocationsBuilder:
    """Collects the locations of a scan's documents, in order; :meth:`finish` gives the :class:`Locations`."""

    def __init__(self) -> None:
        self._line, self._start, self._size = UIntColumn(), UIntColumn(), UIntColumn()
        self._digests = bytearray()

    def add(self, line: int, start: int, end: int, digest: bytes) -> None:
        """One document: its line or row, its bytes ``[start, end)`` (``end == start`` for a row), its digest."""
        self._line.append(line)
        self._start.append(start)
        self._size.append(end - start)
        self._digests += digest

    def __len__(self) -> int:
        return len(self._digests) // 8

    def finish(self) -> Locations:
        return Locations(self._line.to_numpy(), self._start.to_numpy(), self._size.to_numpy(), self._digests)


class Locations:
    """The locations of a corpus's documents, index by index (see the module docstring)."""

    def __init__(self, line: np.ndarray, start: np.ndarray, size: np.ndarray, digests: bytes | bytearray):
        if not len(line) == len(start) == len(size) == len(digests) // 8:
            raise ValueError("locations: the columns have different lengths")
        self.line, self.start, self.size, self._digests = line, start, size, digests

    def __len__(self) -> int:
        return len(self.line)

    def items(self, indices: np.ndarray) -> Iterator[tuple[int, int, int]]:
        """``(line, start, end)`` of the documents at ``indices``, as Python ints."""
        line, start, size = self.line[indices].tolist(), self.start[indices].tolist(), self.size[indices].tolist()
        return ((a, b, b + c) for a, b, c in zip(line, start, size))

    def digest_of(self, lo: int, hi: int) -> str:
        """SHA-256 of the 8-byte digests of documents ``lo`` to ``hi - 1``, in order (no copy of them)."""
        return hashlib.sha256(memoryview(self._digests)[8 * lo : 8 * hi]).hexdigest()

    def keep(self, mask: np.ndarray) -> Locations:
        """The locations of the documents where ``mask`` is true, in order."""
        digests = np.frombuffer(self._digests, np.uint64)[mask].tobytes() if len(self) else b""
        return Locations(self.line[mask], self.start[mask], self.size[mask], digests)
