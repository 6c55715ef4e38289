"""What a per-batch pass of ``jaxinf run`` saves in its run directory, and resumes from: the :class:`~jaxinf.engine.loop.Saves`
of :func:`jaxinf.engine.loop.run_batches` backed by the run's checkpoints (:mod:`jaxinf.run.store`)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from jaxinf.run.store import RunStore, StoreError

log = logging.getLogger("jaxinf")


def batch_plan_key(plan) -> dict:
    """What fixes which documents batch ``i`` holds: a checkpoint numbered by batch index is only valid under it."""
    return {"processes": int(plan.process_count), "batch_size": int(plan.batch_size), "batches": int(plan.num_steps)}


def check_plan(store: RunStore, name: str, plan) -> None:
    """Refuses to resume a stage whose checkpoints were made with documents grouped into batches differently."""
    saved = store.record["stages"].get(name, {}).get("plan")
    if saved is not None and saved != batch_plan_key(plan) and store.status(name) != "done":
        raise StoreError(
            f"{store.root}: stage {name} was checkpointed with {saved['processes']} process(es) x "
            f"{saved['batch_size']} documents per batch ({saved['batches']} batches); resume it with the "
            f"same number of processes, or use --overwrite"
        )


class _InRunDirectory:
    """A stage of the run directory saved every ``every`` batches of ``plan``; its progress recorded in ``run.json``."""

    local: tuple[str, ...] = ()  # every output fetched whole

    def __init__(self, store: RunStore, name: str, plan, every: int, keep: int | None):
        check_plan(store, name, plan)
        self.store, self.name, self.every, self.key = store, name, every, batch_plan_key(plan)
        self.steps = store.stage(name, keep=keep)
        self.total: int | None = None

    def begin(self, start: int, total: int | None) -> None:
        self.total = total
        if start == total and self.store.status(self.name) == "done":
            return  # nothing to compute: a finished stage's record (its timing) stays as it is
        self.store.mark(self.name, "running", step=start, total=total, plan=self.key)

    def _saved(self, step: int) -> None:
        self.store.mark(self.name, "running", step=step, total=self.total, plan=self.key)


class SavedState(_InRunDirectory):
    """The carry is the result so far (the covariance and Lambda sums): step ``k`` of the stage's store holds the
    carry after batch ``k`` (the last two kept); a resumed pass starts from the newest step that verifies."""

    noun = "checkpoints"

    def __init__(self, store: RunStore, name: str, plan, every: int):
        super().__init__(store, name, plan, every, keep=2)

    def resume(self, carry) -> tuple[int, Any]:
        resumed = self.steps.latest(carry)
        start, carry = (0, carry) if resumed is None else resumed
        self.steps.discard_after(start if resumed else None)
        return start, carry

    def save(self, step: int, carry, batches: list[tuple[Any, dict]]) -> None:
        self.steps.save(step, carry)
        self._saved(step)


class SavedChunks(_InRunDirectory):
    """The outputs are the result (the scores): step ``k`` of the stage's store holds the batches since the previous
    step, joined along their last (row) axis: ``index`` (the rows' documents), the ``outputs`` and ``start`` (the
    first batch). ``chunks`` holds them all on the host, the resumed ones first; a resumed pass keeps the chunks that
    continue each other from batch 0 and starts after them.

    With ``carry``, the pass's carry (the scoring pass's tails, :mod:`jaxinf.engine.tails`) is saved after each
    chunk, the newest only (:meth:`RunStore.carry`), and a resumed pass starts from it where it was saved at the
    batch the chunks end at; anywhere else (a save cut short between the two, a carry of other shapes) the pass starts
    from the fresh carry, which is what a carry that misses the skipped batches means to its reader."""

    noun = "chunks"

    def __init__(self, store: RunStore, name: str, plan, every: int, outputs: tuple[str, ...], carry: bool = False):
        super().__init__(store, name, plan, every, keep=None)
        self.keys = {"index", "start", *outputs}
        self.chunks: list[dict] = []
        self.end = 0
        self.carry = store.carry(name) if carry else None

    def resume(self, carry) -> tuple[int, Any]:
        chunks, end = [], 0
        for step in self.steps.steps():
            try:
                chunk = {k: np.asarray(v) for k, v in self.steps.restore(step).items()}
            except Exception as e:  # corrupted or unreadable: recompute from here
                log.warning("%s: chunk %d not used (%s); recomputing from batch %d", self.steps.root, step, e, end)
                break
            if int(chunk["start"]) != end or set(chunk) != self.keys:
                break
            chunks.append(chunk)
            end = step
        self.steps.discard_after(end if chunks else None)
        self.chunks, self.end = chunks, end
        if self.carry is not None:
            self.carry.discard_after(end if chunks else None)
            if chunks and carry is not None and end in self.carry.steps():
                try:
                    carry = self.carry.restore(end, carry)
                except Exception as e:  # corrupted, or saved with other shapes (another scores.topk): start afresh
                    log.warning(
                        "%s: carry %d not used (%s); starting it afresh at batch %d", self.carry.root, end, e, end
                    )
        return end, carry

    def save(self, step: int, carry, batches: list[tuple[Any, dict]]) -> None:
        chunk = {"index": np.concatenate([rows["index"] for _, rows in batches]).astype(np.int64)}
        for key in batches[0][0]:
            chunk[key] = np.concatenate([out[key] for out, _ in batches], axis=-1)
        chunk["start"] = np.asarray(self.end, np.int64)
        self.steps.save(step, chunk)
        if self.carry is not None and carry is not None:
            self.carry.save(step, carry)
        self.chunks.append(chunk)
        self.end = step
        self._saved(step)
