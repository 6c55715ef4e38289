"""The per-batch loop: one step driven over batches, resumable, with the checks every pass needs.

Every per-batch pass runs through :func:`run_batches`: the covariance and Lambda sums and the
scores of ``jaxinf run`` (:mod:`jaxinf.pipeline`), the per-layer and per-token breakdowns of its
exports (:mod:`jaxinf.run.exports.stage`), and the library's in-memory :func:`jaxinf.engine.stages.run_stage`.
For each batch ``i``, from the point the pass resumes at, it

- calls ``step(carry, batch, i) -> (carry, outputs, losses)`` (compiled once by the caller);
- checks the previous batch's losses while this one runs (one batch late: the host never waits
  on the device), and every unchecked batch before a save (:func:`check_losses`);
- reports progress (:class:`jaxinf.engine.progress.Progress`);
- offers the fault point ``<name>:<i + 1>`` of the kill/resume tests (:func:`jaxinf.faults.fault_point`),
  after the batch is computed and before any save it triggers;
- every ``saves.every`` batches and after the last, hands the carry and the outputs since the
  previous save to the pass's :class:`Saves`, which a resumed pass restarts from.

The saves are where a pass's result goes: :class:`Kept` keeps the outputs in memory (a pass that is
not resumed); in a run directory, :class:`jaxinf.run.saved.SavedState` checkpoints the carry (the running
sums of the covariance and Lambda) and :class:`jaxinf.run.saved.SavedChunks` writes the outputs in chunks
(the scores). The loop imports nothing of run directories or checkpoints. The loop knows no device:
the caller passes how batches are placed and results fetched (an executor), or :data:`IN_MEMORY`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import jax
import numpy as np

from jaxinf.engine.capture import CaptureError
from jaxinf.engine.progress import Progress
from jaxinf.faults import fault_point

log = logging.getLogger("jaxinf")

#: ``(carry, batch, i) -> (carry, outputs or None, losses [B] or None)``: one batch of a pass.
Step = Callable[[Any, Any, int], tuple[Any, Any, Any]]
#: ``(batch, row, document index or None, loss) -> message``: names a row whose loss is not finite.
NonFinite = Callable[[int, int, "int | None", float], str]


class Device(Protocol):
    """How the loop meets the device: the part of :class:`jaxinf.run.executor.Executor` it uses (the loop sits below
    the executors, so that :func:`jaxinf.engine.stages.run_stage` can use it too)."""

    def put(self, batch: dict) -> dict: ...

    def fetch(self, x) -> np.ndarray: ...

    def gather_rows(self, local: np.ndarray) -> np.ndarray: ...

    def local_rows(self, x) -> np.ndarray: ...


class _InMemory:
    """Batches used as given (arrays already), results read with ``np.asarray``: the library's in-memory loops."""

    def put(self, batch):
        return batch

    def fetch(self, x) -> np.ndarray:
        return np.asarray(x)

    def gather_rows(self, local) -> np.ndarray:
        return np.asarray(local)

    def local_rows(self, x) -> np.ndarray:
        return np.asarray(x)


IN_MEMORY = _InMemory()


class Saves(Protocol):
    """Where a pass's result goes, and where a resumed pass restarts from."""

    # read-only members (properties here), so that a saver's own narrower attribute (every: int) satisfies them
    @property
    def every(self) -> int | None:
        """Save after every this many batches (None: after the last only)."""

    @property
    def noun(self) -> str:
        """What the closing log line says the saving time was spent on ("" for nothing saved)."""

    @property
    def local(self) -> tuple[str, ...]:
        """The outputs (keys of a batch's dict of outputs) it needs only this process's rows of
        (:meth:`Device.local_rows`: never gathered from the other processes); the others are fetched whole."""

    def resume(self, carry) -> tuple[int, Any]:
        """The first batch to compute and the carry to start from (``carry`` is the fresh one)."""

    def begin(self, start: int, total: int | None) -> None:
        """The pass starts at batch ``start`` of ``total``."""

    def save(self, step: int, carry, batches: list[tuple[Any, dict]]) -> None:
        """Batches up to ``step`` are done: ``carry`` after them, and the outputs (on the host) and rows of each
        batch since the previous save."""


def check_losses(losses: np.ndarray, index: np.ndarray | None, batch: int, non_finite: NonFinite) -> None:
    """Raises :class:`~jaxinf.engine.capture.CaptureError` naming the first row of ``batch`` whose loss is not finite;
    rows whose document ``index`` is negative are padding and not checked."""
    bad = ~np.isfinite(losses)
    if index is not None:
        bad &= index >= 0
    rows = np.flatnonzero(bad)
    if rows.size:
        row = int(rows[0])
        raise CaptureError(non_finite(batch, row, None if index is None else int(index[row]), float(losses[row])))


def _fetch(device: Device, out, local: tuple[str, ...]):
    """A batch's outputs on the host: the keys ``local`` names as this process's rows, the rest whole."""
    if not local:
        return jax.tree.map(device.fetch, out)
    return {k: (device.local_rows(v) if k in local else jax.tree.map(device.fetch, v)) for k, v in out.items()}


def run_batches(
    name: str,
    step: Step,
    batches: Callable[[int], Iterable[dict]],
    carry,
    saves: Saves,
    *,
    total: int | None,
    non_finite: NonFinite,
    device: Device = IN_MEMORY,
    fields: tuple[str, ...] = ("index",),
    report: bool = True,
) -> tuple[Any, dict]:
    """Drives ``step`` over ``batches(start)`` (the batches from the resume point on); returns the final carry and
    the timing of this pass (seconds, seconds saving, batches computed, and ``compile_seconds``: the first batch's
    call, which traces and compiles the step while the host waits; the computations themselves run asynchronously).

    ``fields`` are the batch's host arrays brought back with its outputs (every process's rows: ``index`` names the
    documents, the others are the caller's); ``report`` shows progress and logs the pass's totals."""
    start, carry = saves.resume(carry)
    if start:
        log.info("%s: resuming at batch %d of %d", name, start, total)
    saves.begin(start, total)
    progress = Progress(name, total, start) if report and total is not None else None  # a line needs a total
    t0 = time.perf_counter()
    unchecked: list[tuple[int, Any, np.ndarray | None]] = []  # (batch, losses on the device, document index)
    unsaved: list[tuple[Any, dict]] = []  # (outputs on the device, rows) since the last save
    save_seconds, end = 0.0, start

    def check() -> None:
        while unchecked:
            i, losses, index = unchecked.pop(0)
            check_losses(device.fetch(losses), index, i, non_finite)

    def save(at: int) -> None:
        nonlocal save_seconds, unsaved
        check()
        fetched = [(None if out is None else _fetch(device, out, saves.local), rows) for out, rows in unsaved]
        t_save = time.perf_counter()
        saves.save(at, carry, fetched)
        save_seconds += time.perf_counter() - t_save
        unsaved = []

    compile_seconds = None
    for i, batch in enumerate(batches(start), start=start):
        t_call = time.perf_counter()
        carry, outputs, losses = step(carry, device.put(batch), i)
        if compile_seconds is None:  # the first call traces and compiles; the computation itself runs asynchronously
            compile_seconds = time.perf_counter() - t_call
        rows = {k: device.gather_rows(batch[k]) for k in fields}
        check()  # the previous batch's losses, while this batch runs
        if losses is not None:
            unchecked.append((i, losses, rows.get("index")))
        unsaved.append((outputs, rows))
        if progress is not None:
            progress.update(int(batch["mask"].sum()))
        fault_point(name, i + 1)
        end = i + 1
        if (saves.every is not None and end % saves.every == 0) or end == total:
            save(end)
    if unsaved:
        save(end)
    seconds = progress.close() if progress is not None else time.perf_counter() - t0
    if report:
        log.info(
            "%s: %d batches in %.1fs%s",
            name,
            end - start,
            seconds,
            f" ({save_seconds:.1f}s saving {saves.noun})" if saves.noun else "",
        )
    timing = {"seconds": round(seconds, 3), "save_seconds": round(save_seconds, 3), "batches": end - start}
    if compile_seconds is not None:
        timing["compile_seconds"] = round(compile_seconds, 3)
    return carry, timing


# --------------------------------------------------------------------------- what a pass saves


class Kept:
    """Outputs kept in memory (``batches``: each batch's outputs and rows, in order), nothing written: a pass that
    is not resumed. ``every=1`` brings each batch's outputs to the host as soon as the next one is running."""

    noun = ""
    local: tuple[str, ...] = ()

    def __init__(self, every: int | None = None):
        self.every = every
        self.batches: list[tuple[Any, dict]] = []

    def resume(self, carry) -> tuple[int, Any]:
        return 0, carry

    def begin(self, start: int, total: int | None) -> None:
        pass

    def save(self, step: int, carry, batches: list[tuple[Any, dict]]) -> None:
        self.batches.extend(batches)
