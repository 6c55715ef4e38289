"""Compiling a pass's other programs while its first batches run.

A pass calls one jitted step per batch, and its batches come in a few lengths (the plan's buckets,
:func:`jaxinf.data.batching.bucket_lengths`): one program per length. Called plainly, each program compiles at the
first batch of its length, while the host waits and the device idles. :class:`Ahead` wraps the step: after its
first call (whose program compiles with every core) it hands every other length the pass will meet (``upcoming``:
batches of padding of each length, as the pass places them) to one background thread of the lowest priority,
which lowers and compiles the step for each, in the order the pass meets them, while the batches run. A batch of
a length compiled ahead runs that program (waiting for it, if it is not ready yet); any other call runs the jitted
step as before.

The programs are the ones the step compiles itself (the same function, the same abstract arguments: every argument
of the first call as its shape, dtype and sharding, with the batch's leaves replaced), so the results are the same
bits. Compiling ahead only moves the work: it pays where the host has cores the steps leave idle (an accelerator's
host), not where the steps use them all (a CPU host: off there unless asked for, :func:`enabled`), and it writes what
it compiles to the persistent compilation cache as the step itself would. A program that fails to compile ahead is
compiled again by the step, which reports the error where it would have.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import jax

log = logging.getLogger("jaxinf")

SWITCH = "JAXINF_COMPILE_AHEAD"
"""The environment variable that turns compiling ahead on (``1``) or off (``0``) whatever the backend, e.g. to
measure it (``scripts/bench_compile_ahead.py``)."""


def enabled() -> bool:
    """Whether passes compile their other programs ahead: on an accelerator, whose host's cores idle while the device
    computes; not on the CPU, whose steps already use every core (measured slower there, docs/benchmarks.md,
    "Compiling ahead"). ``$JAXINF_COMPILE_AHEAD`` (``1`` or ``0``) decides instead where it is set."""
    setting = os.environ.get(SWITCH, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    return jax.default_backend() != "cpu"


def abstract(x) -> Any:
    """``x``'s shape, dtype and sharding, without its value (leaves that are not arrays as they are). An array not
    committed to its device (made outside any placement, as a batch's PRNG key is) has no sharding here: a jitted
    call moves it where the others are, and so must the program compiled ahead."""
    if isinstance(x, jax.Array):
        sharding = x.sharding if getattr(x, "committed", True) else None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding, weak_type=getattr(x, "weak_type", False))
    return x


def signature(tree) -> tuple:
    """What picks a step's program for ``tree``: its structure and every leaf's shape and dtype."""
    leaves, structure = jax.tree.flatten(tree)
    return (structure, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in leaves))


def lowest_priority() -> None:
    """The calling thread, and the threads it starts, yield the cores to every other (Linux: a thread's nice value
    is its own; elsewhere nothing changes)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class Ahead:
    """``fn`` (a jitted step), with the programs for the batches ``upcoming`` compiled in a background thread from
    its first call on. ``batch``: the position of the batch among ``fn``'s arguments."""

    def __init__(self, fn: Any, batch: int, upcoming: Sequence[Any]):  # fn: a jitted function (its lower, too)
        self.fn, self.batch, self.upcoming = fn, batch, list(upcoming)
        self.compiled: dict[tuple, Future] = {}
        self.calls_ahead = 0  # calls that ran a program compiled ahead

    def __call__(self, *args):
        key = signature(args[self.batch])
        program = self.compiled.get(key)
        if program is not None:
            try:
                compiled = program.result()
            except Exception:  # noqa: BLE001 - not compiled ahead: the step below compiles it, and raises its error
                compiled = None
            if compiled is not None:
                try:
                    out = compiled(*args)  # arguments are checked before anything runs or is donated
                except (TypeError, ValueError) as e:  # not the arguments it was compiled for (a layout that moved)
                    log.debug("compiled ahead for other arguments (%s); the step compiles its own", e)
                else:
                    self.calls_ahead += 1
                    return out
            self.compiled.pop(key)  # the step's own program for this shape from now on
        if not self.upcoming:
            return self.fn(*args)
        shapes = [abstract(x) for x in jax.tree.leaves(args)]  # before the call, which may donate them
        out = self.fn(*args)  # the first call's program, compiled with every core
        self._start(args, shapes)
        return out

    def _start(self, args: tuple, shapes: list) -> None:
        """Compiles the step for each upcoming batch but the first call's, in a daemon thread of the lowest
        priority (it takes the cores the steps leave idle; a run that ends or fails does not wait for it)."""
        first = signature(args[self.batch])
        base = list(jax.tree.unflatten(jax.tree.structure(args), shapes))
        todo: list[tuple[Future, tuple]] = []
        for batch in self.upcoming:
            key = signature(batch)
            if key == first or key in self.compiled:
                continue
            call = [*base[: self.batch], jax.tree.map(abstract, batch), *base[self.batch + 1 :]]
            self.compiled[key] = Future()
            todo.append((self.compiled[key], tuple(call)))
        self.upcoming = []

        def compile_all() -> None:
            lowest_priority()
            for future, call in todo:
                try:
                    future.set_result(self.fn.lower(*call).compile())
                except Exception as e:  # noqa: BLE001 - handed to the call that needs it
                    future.set_exception(e)

        if todo:
            threading.Thread(target=compile_all, name="jaxinf-compile-ahead", daemon=True).start()
