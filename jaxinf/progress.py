"""Progress of long stages: batches done, tokens/s and ETA, on one line per update interval.

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
    """``update(tokens)`` once per batch; ``close()`` prints the stage's totals."""

    def __init__(self, stage: str, total: int, start: int = 0, unit: str = "batches", interval: float = 10.0,
                 stream=None):
        self.stage, self.total, self.done, self.unit = stage, total, start, unit
        self.start_step = start
        self.tokens = 0
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.interval = 0.5 if self.tty else interval
        self.enabled = jax.process_index() == 0

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        steps = self.done - self.start_step
        eta = (self.total - self.done) * elapsed / steps if steps else float("nan")
        eta_text = _duration(eta) if steps else "?"
        return (f"{self.stage}: {self.done}/{self.total} {self.unit}, {rate:,.0f} tokens/s, "
                f"elapsed {_duration(elapsed)}, ETA {eta_text}")

    def update(self, tokens: int, steps: int = 1) -> None:
        self.done += steps
        self.tokens += int(tokens)
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.interval or self.done == self.total):
            self.last = now
            if self.tty:
                self.stream.write("\r" + self.line() + "\033[K")
                self.stream.flush()
            else:
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def close(self) -> float:
        """Ends the stage's progress line; returns its wall time in seconds."""
        elapsed = time.perf_counter() - self.t0
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        return elapsed
