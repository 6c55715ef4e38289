"""Progress of a pass over the documents: documents/s, tokens/s and the time left, logged every few seconds.

A pass over millions of documents (the token counts of a new corpus: about 3 hours for the paper's 5M on
two cores, docs/benchmarks.md) says how far it is, how fast it goes and when it will end, instead of
staying silent until done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("jaxinf")


def format_duration(seconds: float) -> str:
    """``1h05m``, ``4m12s``, ``12s``: a duration as a person reads it."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class PassProgress:
    """Called as ``progress(documents, tokens)`` with the running totals of a pass over ``total`` documents: emits
    one line at most every ``every`` seconds, and always one when the pass is done (``documents == total``)."""

    def __init__(self, what: str, total: int, *, every: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 emit: Callable[[str], None] | None = None):
        self.what, self.total, self.every = what, int(total), float(every)
        self.clock = clock
        self.emit = emit or log.info
        self.start = self._last = clock()

    def __call__(self, documents: int, tokens: int) -> None:
        now = self.clock()
        if documents < self.total and now - self._last < self.every:
            return
        self._last = now
        self.emit(self.message(documents, tokens, now - self.start))

    def message(self, documents: int, tokens: int, elapsed: float) -> str:
        """``WHAT: DONE/TOTAL documents (P%), T tokens, R documents/s, M M tokens/s, ETA D`` (``done in D`` at the
        end)."""
        rate = documents / elapsed if elapsed > 0 else 0.0
        token_rate = tokens / elapsed if elapsed > 0 else 0.0
        share = 100.0 * documents / self.total if self.total else 100.0
        text = (f"{self.what}: {documents:,}/{self.total:,} documents ({share:.1f}%), {tokens:,} tokens, "
                f"{rate:,.0f} documents/s, {token_rate / 1e6:.2f} M tokens/s")
        if documents >= self.total:
            return text + f", done in {format_duration(elapsed)}"
        if rate <= 0:
            return text + ", ETA unknown"
        return text + f", ETA {format_duration((self.total - documents) / rate)}"
