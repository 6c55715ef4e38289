"""Deterministic document batches: chunking, length bucketing, fixed shapes, resume and per-host slices.

Everything about *which* tokens go *where* is decided by a :class:`BatchPlan`, a
pure function of the documents' token counts and the settings; tokenization
only fills the batches in. So the same corpus, tokenizer and settings always
give the same batches, any batch can be made without making the ones before
it (resume), and every host knows every batch's shape without tokenizing what
other hosts read.

Rows. A document of ``n`` tokens longer than ``max_length = L`` is

- ``truncate`` (the default): one row, its first ``L`` tokens; the documents
  and tokens cut are counted;
- ``split``: rows ("chunks") ``c = 0, 1, ...`` holding tokens
  ``[c (L - 1), c (L - 1) + L)``. Consecutive chunks share one token, so every
  target of the document (every token but its first) is a target in exactly
  one chunk, and the sum of the chunks' losses counts each target once (each
  chunk sees only its own context).

A document of at most ``L`` tokens is one row. Rows are numbered in document
order; ``BatchPlan.row_document``, ``row_chunk``, ``row_start`` and ``row_length``
map every row to its document (the chunk map).

Steps. A step is ``P * B`` rows (``P`` hosts, ``B`` rows per host batch).
Rows are grouped in windows of ``window_batches`` steps, in row order; inside
a window they are sorted by length, longest first (ties in row order), so a
batch holds rows of similar length and padding stays small. Each step has one
length ``T``, the smallest bucket length (:func:`bucket_lengths`) that holds its
longest row, the same on every host, so a multi-host program sees one shape
per step and only a few shapes in all (few compilations). Host ``h`` takes
rows ``[h B, (h + 1) B)`` of each step; rows past the end are padding (mask 0,
``index`` -1). Every host has the same number of batches, ``BatchPlan.num_steps``.

A batch (numpy arrays, the causal-LM format of :mod:`jaxinf.engine.tasks`):

- ``tokens`` ``[B, T]`` int32, right-padded with 0;
- ``mask`` ``[B, T]`` float32, 1 at real tokens;
- ``weights`` ``[B, T]`` float32, 1 at targets: every real token of a row but its first;
- ``index`` ``[B]`` int32: the document (column of the scores) of each row, -1 for padding rows;
- ``chunk`` ``[B]`` int32: the chunk of the document (0 unless split), -1 for padding rows;
- ``row`` ``[B]`` int32: the row of the plan, -1 for padding rows.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxinf.data.documents import DocumentSource
from jaxinf.data.errors import DataError
from jaxinf.data.tokenize import TextEncoder

LONG_DOCUMENTS = ("truncate", "split")
Batch = dict[str, np.ndarray]


def _multipliers() -> Iterator[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ...: powers of two and the midpoints 3 * 2^(k-1) between them."""
    yield 1
    k = 1
    while True:
        yield 2**k
        yield 3 * 2 ** (k - 1)
        k += 1


def bucket_lengths(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """The padded lengths a batch may have: ``smallest * {1, 2, 3, 4, 6, 8, 12, 16, ...}`` below ``max_length``, then ``max_length``.

    Consecutive buckets differ by at most a factor 2 (at most 1.5 from the
    third on), so padding a row to its bucket costs little, and a 2048-token
    limit gives 10 shapes: 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048.
    """
    if max_length < 1:
        raise DataError(f"data.max_length: must be positive, got {max_length}")
    out: list[int] = []
    for m in _multipliers():
        if smallest * m >= max_length:
            return tuple(out) + (max_length,)
        out.append(smallest * m)
    raise AssertionError("unreachable")  # pragma: no cover


def chunk_counts(lengths: np.ndarray, max_length: int, long_documents: str) -> np.ndarray:
    """Rows per document: 1 when truncating; ``1 + ceil(max(0, n - L) / (L - 1))`` when splitting."""
    lengths = np.asarray(lengths, np.int64)
    if long_documents == "truncate":
        return np.ones_like(lengths)
    if max_length < 2:
        raise DataError("data.max_length: splitting documents needs at least 2 tokens per chunk")
    over = np.maximum(lengths - max_length, 0)
    return 1 + (over + max_length - 2) // (max_length - 1)


@dataclass(frozen=True, eq=False)
class BatchPlan:
    """Which rows go in which batch on which host; see the module docstring. Build it with :func:`make_batch_plan`."""

    lengths: np.ndarray
    batch_size: int
    max_length: int
    long_documents: str
    window_batches: int
    buckets: tuple[int, ...]
    process_count: int
    row_document: np.ndarray
    row_chunk: np.ndarray
    row_start: np.ndarray
    row_length: np.ndarray
    first_row: np.ndarray
    order: np.ndarray
    step_length: np.ndarray
    report: PlanReport = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def num_documents(self) -> int:
        return len(self.lengths)

    @property
    def num_rows(self) -> int:
        return len(self.row_document)

    @property
    def num_steps(self) -> int:
        """Batches per host (the same on every host)."""
        return len(self.step_length)

    def host_rows(self, step: int, process_index: int = 0) -> np.ndarray:
        """The rows (at most ``batch_size``) host ``process_index`` gets at ``step``, in batch order."""
        if not 0 <= step < self.num_steps:
            raise IndexError(f"batch {step} out of range for {self.num_steps} batches")
        if not 0 <= process_index < self.process_count:
            raise ValueError(f"process index {process_index} out of range for {self.process_count} processes")
        lo = step * self.process_count * self.batch_size + process_index * self.batch_size
        return self.order[lo : lo + self.batch_size]

    def rows_key(self) -> str:
        """A digest of the rows the documents are cut into (each row's document, first token and length, in document
        order), whatever their grouping into batches and hosts: what a result kept per row (the index) depends on."""
        h = hashlib.sha256()
        for x in (self.row_document, self.row_start, self.row_length):
            h.update(np.ascontiguousarray(x, np.int64).tobytes())
        return h.hexdigest()[:16]

    def sum_chunks(self, values: np.ndarray) -> np.ndarray:
        """Per-row values ``[..., R]`` summed over each document's chunks: ``[..., N]``."""
        values = np.asarray(values)
        if values.shape[-1] != self.num_rows:
            raise ValueError(f"expected {self.num_rows} rows on the last axis, got {values.shape[-1]}")
        if self.num_rows == 0:
            return np.zeros(values.shape, values.dtype)
        return np.add.reduceat(values, self.first_row, axis=-1)


@dataclass(frozen=True)
class PlanReport:
    """What the plan cuts, splits and pads; nothing is cut without being counted here."""

    documents: int
    rows: int
    truncated_documents: int
    truncated_tokens: int
    split_documents: int
    documents_without_targets: int
    tokens: int
    targets: int
    batches_per_host: int
    padded_tokens: int

    @property
    def padding_fraction(self) -> float:
        """Share of the batches' token slots (all hosts) that are padding."""
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def summary(self) -> str:
        """One line for a log."""
        parts = [f"{self.documents} documents", f"{self.rows} rows", f"{self.tokens} tokens"]
        if self.truncated_documents:
            parts.append(f"{self.truncated_documents} documents truncated ({self.truncated_tokens} tokens cut)")
        if self.split_documents:
            parts.append(
                f"{self.split_documents} documents split into {self.rows - self.documents + self.split_documents} chunks"
            )
        if self.documents_without_targets:
            parts.append(f"{self.documents_without_targets} documents with fewer than 2 tokens (no targets)")
        parts.append(f"{self.batches_per_host} batches per host, {100 * self.padding_fraction:.1f}% padding")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self), padding_fraction=self.padding_fraction)


def _narrowest_int(largest: int) -> np.dtype:
    """int32 for row and token numbers up to 2**31 - 1 (every corpus but one of billions of rows), else int64: the
    plan's per-row arrays take 4 bytes a row, not 8."""
    return np.dtype(np.int32 if largest < 2**31 else np.int64)


def _window_order(row_length: np.ndarray, max_length: int, window: int) -> np.ndarray:
    """The rows in batch order: windows of ``window`` rows in row order, longest first inside each, ties in row order.

    A stable sort by the key ``window number * (max_length + 1) + (max_length - length)``, made over blocks of whole
    windows (about 65,536 rows) so that the key and the sort's workspace stay that small whatever the corpus: the
    order itself is the one array of a row each (of ``row_length``'s type)."""
    R = len(row_length)
    order = np.empty(R, row_length.dtype)
    span = window * max(1, 65536 // window)
    for lo in range(0, R, span):
        block = row_length[lo : lo + span]
        key = np.arange(len(block), dtype=np.int64) // window
        key *= max_length + 1
        key += max_length - block
        order[lo : lo + len(block)] = lo + np.argsort(key, kind="stable")
    return order


def make_batch_plan(
    lengths: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    max_length: int,
    long_documents: str = "truncate",
    window_batches: int = 64,
    buckets: Sequence[int] | None = None,
    process_count: int = 1,
) -> BatchPlan:
    """The plan for documents of ``lengths`` tokens (special tokens included, before truncation).

    Deterministic: equal inputs give equal plans. ``buckets`` defaults to
    :func:`bucket_lengths` of ``max_length``; its largest must be at least ``max_length``.
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.ndim != 1:
        raise ValueError("lengths must be one count per document")
    if long_documents not in LONG_DOCUMENTS:
        raise DataError(f"data.long_documents: must be one of {', '.join(LONG_DOCUMENTS)}, got {long_documents!r}")
    for name, value in (
        ("batch_size", batch_size),
        ("window_batches", window_batches),
        ("process_count", process_count),
        ("max_length", max_length),
    ):
        if int(value) < 1:
            raise DataError(f"data.{name}: must be positive, got {value}")
    if len(lengths) and lengths.min() < 0:
        raise ValueError("token counts must be non-negative")
    buckets = tuple(sorted(set(int(b) for b in buckets))) if buckets is not None else bucket_lengths(max_length)
    if not buckets or buckets[0] < 1 or buckets[-1] < max_length:
        raise DataError(
            f"data.buckets: the largest bucket must be at least data.max_length ({max_length}), got {buckets}"
        )

    L = max_length
    if long_documents == "truncate" or (L > 1 and int(lengths.max(initial=0)) <= L):  # one row per document
        R = len(lengths)
        rows = _narrowest_int(max(R, L))
        row_document = first_row = np.arange(R, dtype=rows)
        row_chunk = row_start = np.zeros(R, rows)
        row_length = np.minimum(lengths, L).astype(rows)
        split = 0
    else:
        counts = chunk_counts(lengths, L, long_documents)
        R = int(counts.sum())
        rows = _narrowest_int(max(R, int(lengths.max(initial=0))))
        first_row = (np.cumsum(counts) - counts).astype(rows)
        row_document = np.repeat(np.arange(len(lengths), dtype=rows), counts)
        row_chunk = np.arange(R, dtype=rows) - np.repeat(first_row, counts)
        row_start = row_chunk * (L - 1)
        row_length = np.minimum(L, lengths[row_document] - row_start).astype(rows)
        split = int((counts > 1).sum())

    G = process_count * batch_size
    order = _window_order(row_length, L, window_batches * G)
    S = -(-R // G)
    longest = np.zeros(S * G, rows)
    longest[:R] = row_length[order]
    step_max = longest.reshape(S, G).max(axis=1) if S else np.zeros(0, rows)
    bucket_arr = np.asarray(buckets, np.int64)
    step_length = bucket_arr[np.searchsorted(bucket_arr, np.maximum(step_max, 1))]

    truncated = lengths > L if long_documents == "truncate" else np.zeros(len(lengths), bool)
    report = PlanReport(
        documents=len(lengths),
        rows=R,
        truncated_documents=int(truncated.sum()),
        truncated_tokens=int((lengths[truncated] - L).sum()),
        split_documents=split,
        documents_without_targets=int((lengths < 2).sum()),
        tokens=int(row_length.sum()),
        targets=int(np.maximum(row_length - 1, 0).sum()),
        batches_per_host=S,
        padded_tokens=int(step_length.sum()) * G,
    )
    return BatchPlan(
        lengths=lengths,
        batch_size=int(batch_size),
        max_length=L,
        long_documents=long_documents,
        window_batches=int(window_batches),
        buckets=buckets,
        process_count=int(process_count),
        row_document=row_document,
        row_chunk=row_chunk,
        row_start=row_start,
        row_length=row_length,
        first_row=first_row,
        order=order,
        step_length=step_length,
        report=report,
    )


def document_lengths(
    source: DocumentSource,
    encoder: TextEncoder,
    *,
    chunk: int = 2048,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Token count of every document of ``source`` (special tokens included): one tokenization pass.

    Reading the next chunk of texts overlaps with tokenizing the current one. ``limit`` (``data.max_length`` when
    documents are truncated): a very long document is counted in a bounded prefix
    (:meth:`TextEncoder.encode_documents`), a lower bound above ``limit``; pass the same limit to the plan's batches.
    ``progress`` (e.g. :meth:`jaxinf.engine.progress.Progress.at`) is called after each chunk with the documents
    and tokens counted so far.
    """
    n = len(source)
    spans = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    lengths, tokens = np.zeros(n, np.int64), 0
    for (lo, hi), texts in zip(spans, prefetch(source.texts(range(lo, hi)) for lo, hi in spans)):
        lengths[lo:hi] = encoder.document_lengths(texts, limit)
        tokens += int(lengths[lo:hi].sum())
        if progress is not None:
            progress(hi, tokens)
    return lengths


class DocumentBatches:
    """This host's batches of a :class:`BatchPlan`, filled in by tokenizing only the documents they hold.

    ``len(batches)`` is the number of batches (equal on every host);
    ``batches.batch(i)`` is batch ``i``; ``batches.iterate(start)`` yields batches
    ``start, start + 1, ...`` (resume), tokenizing ``group_steps`` batches'
    documents at a time (a document split over several of them is tokenized once).
    """

    def __init__(
        self,
        source: DocumentSource,
        encoder: TextEncoder,
        plan: BatchPlan,
        *,
        process_index: int = 0,
        group_steps: int = 8,
    ):
        if len(source) != plan.num_documents:
            raise DataError(f"{source.name}: {len(source)} documents, but the plan was made for {plan.num_documents}")
        if not 0 <= process_index < plan.process_count:
            raise DataError(f"process index {process_index} out of range for {plan.process_count} processes")
        self.source, self.encoder, self.plan = source, encoder, plan
        self.process_index = process_index
        self.group_steps = max(1, int(group_steps))

    def __len__(self) -> int:
        return self.plan.num_steps

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(0)

    def batch(self, step: int) -> Batch:
        """Batch ``step`` of this host."""
        if not 0 <= step < self.plan.num_steps:
            raise IndexError(f"batch {step} out of range for {self.plan.num_steps} batches")
        return next(self.iterate(step, step + 1))

    def iterate(self, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Batches ``start`` to ``stop`` (exclusive, default: the last) of this host, in order."""
        stop = self.plan.num_steps if stop is None else min(stop, self.plan.num_steps)
        if not 0 <= start <= self.plan.num_steps:
            raise IndexError(f"start batch {start} out of range for {self.plan.num_steps} batches")
        for lo in range(start, stop, self.group_steps):
            steps = range(lo, min(lo + self.group_steps, stop))
            rows = [self.plan.host_rows(s, self.process_index) for s in steps]
            docs = np.unique(self.plan.row_document[np.concatenate(rows)])
            ids = dict(zip(docs.tolist(), self._tokenize(docs)))
            for s, r in zip(steps, rows):
                yield self._fill(int(self.plan.step_length[s]), r, ids)

    def shapes(self) -> list[Batch]:
        """One batch of padding (no document) for each length the batches come in, in the order the batches first
        meet them: the shapes of the pass, for programs compiled ahead of their first batch
        (:class:`jaxinf.engine.ahead.Ahead`)."""
        lengths = dict.fromkeys(int(t) for t in self.plan.step_length)
        return [self._fill(t, np.zeros(0, np.int64), {}) for t in lengths]

    def _tokenize(self, docs: np.ndarray) -> list[np.ndarray]:
        limit = self.plan.max_length if self.plan.long_documents == "truncate" else None
        encoded = self.encoder.encode_documents(self.source.texts(docs.tolist()), limit)
        for d, ids in zip(docs.tolist(), encoded):
            counted = int(self.plan.lengths[d])
            if limit is not None and len(ids) > limit and counted > limit:
                continue  # truncated either way (counted whole or in a prefix): only the first `limit` ids are used
            if len(ids) != counted:
                doc = self.source.documents([d])[0]
                raise DataError(
                    f'{self.source.name}:{doc.line}: document "{doc.id}" has {len(ids)} tokens but the plan counted '
                    f"{int(self.plan.lengths[d])} (token counts from another tokenizer or another version of the file?)"
                )
        return encoded

    def _fill(self, T: int, rows: np.ndarray, ids: dict[int, np.ndarray]) -> Batch:
        p, B = self.plan, self.plan.batch_size
        batch = {
            "tokens": np.zeros((B, T), np.int32),
            "mask": np.zeros((B, T), np.float32),
            "weights": np.zeros((B, T), np.float32),
            "index": np.full((B,), -1, np.int32),
            "chunk": np.full((B,), -1, np.int32),
            "row": np.full((B,), -1, np.int32),
        }
        for j, r in enumerate(rows.tolist()):
            d, start, n = int(p.row_document[r]), int(p.row_start[r]), int(p.row_length[r])
            batch["tokens"][j, :n] = ids[d][start : start + n]
            batch["mask"][j, :n] = 1.0
            batch["weights"][j, 1:n] = 1.0
            batch["index"][j] = d
            batch["chunk"][j] = p.row_chunk[r]
            batch["row"][j] = r
        return batch


def document_batches(
    source: DocumentSource,
    encoder: TextEncoder,
    *,
    batch_size: int,
    max_length: int,
    long_documents: str = "truncate",
    window_batches: int = 64,
    buckets: Sequence[int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    lengths: np.ndarray | None = None,
) -> DocumentBatches:
    """This host's batches of ``source``: :func:`make_batch_plan` on ``lengths`` (counted by :func:`document_lengths` if not given)."""
    if lengths is None:
        lengths = document_lengths(source, encoder, limit=max_length if long_documents == "truncate" else None)
    plan = make_batch_plan(
        lengths,
        batch_size=batch_size,
        max_length=max_length,
        long_documents=long_documents,
        window_batches=window_batches,
        buckets=buckets,
        process_count=process_count,
    )
    return DocumentBatches(source, encoder, plan, process_index=process_index)


def scatter_columns(matrix: np.ndarray, values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Adds ``values[..., j]`` to ``matrix[..., index[j]]`` for every row ``j`` with ``index[j] >= 0``; returns ``matrix``.

    Chunks of one document add up in its column (``np.add.at``, repeated indices accumulate).
    """
    index = np.asarray(index)
    keep = index >= 0
    np.add.at(matrix, (..., index[keep]), np.asarray(values)[..., keep])  # type: ignore[arg-type]  # stubs: no tuple index
    return matrix


_END = object()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(items: Iterable, size: int = 2) -> Iterator:
    """``items`` produced by a background thread up to ``size`` ahead (tokenization overlaps the consumer's work).

    Yields the same items in the same order; an exception in the producer is
    raised in the consumer; closing the generator stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, size))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer
            put(_Raised(e))

    thread = threading.Thread(target=produce, daemon=True, name="jaxinf-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
