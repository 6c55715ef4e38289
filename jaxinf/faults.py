"""Fault injection for the kill/resume tests: a process killed (or stopped) at a named point of its work."""

from __future__ import annotations

import os
import signal
import time


def fault_point(where: str, step: int) -> None:
    """Fault injection for resume tests: SIGKILL this process when ``JAXINF_FAULT`` is ``f"{where}:{step}"``
    (SIGSTOP when it is ``f"{where}:{step}:stop"``: the process stays, holding what it holds, until killed;
    SIGINT, as Ctrl-C, when ``f"{where}:{step}:interrupt"``; a ``RuntimeError`` raised here, a failure the run
    did not foresee, when ``f"{where}:{step}:raise"``).

    Points: ``<stage>:<batch>`` after a batch of a per-batch pass is computed
    (:func:`jaxinf.engine.loop.run_batches`; before any save it triggers; the exports'
    pass is ``breakdowns``), ``exports:1`` half-way through writing the exports,
    ``<stage>:before-manifest:<step>`` after Orbax has
    committed a step but before its manifest is written, ``overwrite:0``
    after a run started with ``--overwrite`` has finished but before the old run
    is deleted, and ``prepare:0`` once ``jaxinf prepare`` has written the dataset
    in its temporary directory, before it is renamed into place.
    """
    point = os.environ.get("JAXINF_FAULT")
    if point == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    elif point == f"{where}:{step}:stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif point == f"{where}:{step}:interrupt":
        # Python's own Ctrl-C handler, even in a process started with SIGINT ignored (a background job of a
        # non-interactive shell, as some CI runners start the tests), so the injected Ctrl-C is one
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises KeyboardInterrupt between two bytecodes, well before this ends
    elif point == f"{where}:{step}:raise":
        raise RuntimeError(f"fault injected at {where}:{step} (JAXINF_FAULT)")
