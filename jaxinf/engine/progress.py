"""Progress of long passes (the stages' batches, the token counts of a corpus, training steps): done of total, the
rate in units and tokens per second, and the ETA, on one line per update interval.

On a terminal the line is rewritten in place; in a log file (a TPU job's
stdout, CI) a line is printed every ``interval`` seconds, so logs stay short.
Only process 0 prints.
"""

from __future__ import annotations

import logging
import sys
import time

import jax

log = logging.getLogger("jaxinf")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """``update(tokens)`` once per step (or ``at(done, tokens)`` with running totals); ``close()`` ends the line and
    returns the pass's wall time. ``clock``: the time source (``time.perf_counter``)."""

    def __init__(
        self,
        stage: str,
        total: int,
        start: int = 0,
        unit: str = "batches",
        interval: float = 10.0,
        stream=None,
        clock=None,
    ):
        self.stage, self.total, self.done, self.unit = stage, total, start, unit
        self.start_step = start
        self.tokens = 0
        self.clock = clock or time.perf_counter
        self.t0 = self.clock()
        self.last = 0.0
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.interval = 0.5 if self.tty else interval
        self.enabled = jax.process_index() == 0
        self.first: tuple[int, int, float] | None = None  # (steps done, tokens, time) after the first step

    def line(self) -> str:
        """``STAGE: DONE/TOTAL UNIT, R UNIT/s, T tokens/s, elapsed H:MM:SS, ETA H:MM:SS``. Rates and ETA from the
        steady state: the steps after the first one of this pass, whose time is mostly compilation (counting it as
        throughput made the first ETA of a five-minute stage read two hours)."""
        now = self.clock()
        elapsed = now - self.t0
        if self.first is not None and self.done > self.first[0]:  # steady
            done0, tokens0, t1 = self.first
            seconds = now - t1
            rate = (self.tokens - tokens0) / seconds if seconds > 0 else 0.0
            steps = (self.done - done0) / seconds if seconds > 0 else 0.0
            eta_text = _duration((self.total - self.done) * seconds / (self.done - done0))
        else:
            rate = self.tokens / elapsed if elapsed > 0 else 0.0
            steps = (self.done - self.start_step) / elapsed if elapsed > 0 else 0.0
            eta_text = _duration(0) if self.done >= self.total else "?"
        return (
            f"{self.stage}: {self.done:,}/{self.total:,} {self.unit}, {steps:,.{1 if steps < 100 else 0}f} "
            f"{self.unit}/s, {rate:,.0f} tokens/s, elapsed {_duration(elapsed)}, ETA {eta_text}"
        )

    def update(self, tokens: int, steps: int = 1) -> None:
        self.done += steps
        self.tokens += int(tokens)
        now = self.clock()
        if self.first is None:  # the end of the first (compiling) step: where the steady state starts
            self.first = (self.done, self.tokens, now)
        if self.enabled and (now - self.last >= self.interval or self.done == self.total):
            self.last = now
            if self.tty:
                self.stream.write("\r" + self.line() + "\033[K")
                self.stream.flush()
            else:
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def at(self, done: int, tokens: int) -> None:
        """:meth:`update` from running totals: ``done`` steps and ``tokens`` tokens so far (a callback of
        :func:`jaxinf.data.batching.document_lengths`)."""
        self.update(tokens - self.tokens, done - self.done)

    def close(self) -> float:
        """Ends the stage's progress line; returns its wall time in seconds."""
        elapsed = self.clock() - self.t0
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        return elapsed
