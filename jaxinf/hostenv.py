"""Host environment: the process's BLAS/LAPACK thread pools, limited for a ``with`` block and restored after it;
and the C heap's huge pages, set at start-up so that XLA's CPU buffers are not faulted in 4 KiB at a time.

On the CPU, XLA runs LAPACK (jaxlib's ``eigh``, ``svd``) inside its own thread
pool, and the BLAS library behind it starts threads of its own on top. On a
busy host the oversubscribed threads wait on each other, so the steps that call
LAPACK run inside :func:`lapack_threads`, and a run on a mesh of simulated CPU
devices inside :func:`mesh_lapack_threads`. Both restore the pools as they
found them when the block ends, so nothing of the process is changed for good.

The one lasting change is made at start-up: the ``jaxinf`` command restarts
itself in :func:`huge_page_environment` when that is not None, so that glibc
backs XLA's large CPU buffers with huge pages (a library user starts Python
with the same ``GLIBC_TUNABLES``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from threadpoolctl import threadpool_limits

if TYPE_CHECKING:  # the jaxinf command imports this module before anything else: it does not import JAX
    from jax.sharding import Mesh


def host_memory() -> int | None:
    """This host's physical memory in bytes (``sysconf``), or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@contextlib.contextmanager
def lapack_threads(threads: int = 1) -> Iterator[None]:
    """Caps the BLAS/LAPACK threads of the ``eigh`` and SVD calls XLA makes on the CPU inside the block.

    One BLAS thread makes the eigendecompositions many times faster on a busy host
    (docs/benchmarks.md, "Measurements behind code decisions"). The computations must finish
    inside the block (block on their results); the previous limits are restored on exit.
    """
    importlib.import_module("scipy.linalg")  # loads the OpenBLAS that jaxlib's CPU LAPACK kernels call
    with threadpool_limits(limits=threads, user_api="blas"):
        yield


def mesh_lapack_threads(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """One BLAS thread per device inside the block, on a mesh of several CPU devices; no change otherwise.

    Simulated devices share the host's cores and every device calls LAPACK at once
    (the eigendecompositions, the query SVDs), so the default threads oversubscribe the
    cores (docs/benchmarks.md, "Measurements behind code decisions").
    """
    if mesh is None or mesh.devices.size == 1 or mesh.devices.flat[0].platform != "cpu":
        return contextlib.nullcontext()
    return lapack_threads(1)


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
"""The glibc tunable (2.35 and later) with which ``malloc`` asks the kernel for huge pages: ``1`` advises them."""

THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def computes_on_cpu(environ=os.environ) -> bool:
    """Whether JAX in this process will compute on the CPU, decided before it starts: ``JAX_PLATFORMS`` names only
    ``cpu``, or it is unset and no accelerator plugin (a ``jax_plugins`` entry point or package, ``libtpu``) is
    installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return {p.strip() for p in platforms.split(",")} == {"cpu"}
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and all(importlib.util.find_spec(m) is None for m in ("jax_plugins", "libtpu"))


def transparent_huge_pages(path: str = THP_MODE) -> str:
    """The kernel's transparent huge page mode: ``always``, ``madvise`` or ``never`` (also when unreadable)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return "never"
    chosen = text[text.find("[") + 1 : text.find("]")] if "[" in text else ""
    return chosen if chosen in ("always", "madvise") else "never"


def huge_page_environment(
    environ=os.environ, libc: tuple[str, str] | None = None, thp: str | None = None
) -> dict[str, str] | None:
    """The environment in which to start this process again so that glibc backs its large blocks with
    transparent huge pages; None when nothing would change.

    XLA's CPU backend allocates the buffers of every execution with ``malloc``: one 201 MiB block per
    forward+backward step of the Llama of ``scripts/bench_fwd_bwd.py``. glibc serves a block that large with a
    fresh ``mmap`` and unmaps it on ``free``, so each step faults in every 4 KiB page of its temporaries again:
    about 53,000 page faults per step there (the script prints them). With the tunable ``glibc.malloc.hugetlb=1``
    glibc advises huge pages for such blocks and the kernel faults them in 2 MiB at a time: 2,000-3,000 faults
    per step. The speed-up is in docs/benchmarks.md ("The C heap"). glibc reads its tunables only when a
    process starts, hence a new start (the ``jaxinf`` command re-executes itself, same process id).

    Returns the environment (``GLIBC_TUNABLES`` extended) when the C library is glibc 2.35 or later, the kernel
    gives huge pages on advice (``thp``: :func:`transparent_huge_pages`), the process computes on the CPU
    (:func:`computes_on_cpu`: an accelerator's buffers are not the host's), ``GLIBC_TUNABLES`` does not set the
    tunable already, and ``JAXINF_HOST_HEAP`` is ``huge-pages`` (or unset), not ``default`` (glibc's own
    settings); any other value of it is a ``ValueError``.
    """
    choice = environ.get("JAXINF_HOST_HEAP", "huge-pages")
    if choice not in ("huge-pages", "default"):
        raise ValueError(
            f"JAXINF_HOST_HEAP={choice!r}: expected 'huge-pages' (the default) or 'default' "
            "(glibc's own malloc settings)"
        )
    name, version = platform.libc_ver() if libc is None else libc
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (
        choice == "default"
        or name != "glibc"
        or _version(version) < (2, 35)
        or (transparent_huge_pages() if thp is None else thp) == "never"
        or HUGE_PAGES_TUNABLE + "=" in tunables
        or not computes_on_cpu(environ)
    ):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, HUGE_PAGES_TUNABLE + "=1")))}


def restart_with_huge_pages() -> None:
    """Executes this process again in :func:`huge_page_environment` when that is not None (same process id,
    interpreter, options and arguments: ``sys.orig_argv``); returns when it is None. Call it first thing, before
    anything is read or written."""
    env = huge_page_environment()
    if env is not None and sys.executable:  # an embedded interpreter has no executable to start again
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def heap_mode(environ=os.environ) -> str:
    """How this process's C heap was set up: ``huge-pages`` when ``GLIBC_TUNABLES`` advises them
    (:func:`huge_page_environment`, set by the ``jaxinf`` command's restart or by the user), else ``default``
    (glibc's own settings: another C library, an old glibc, the kernel's refusal, an accelerator, a library caller,
    or ``JAXINF_HOST_HEAP=default``). Recorded in ``run.json``."""
    tunables = environ.get("GLIBC_TUNABLES", "").split(":")
    return "huge-pages" if HUGE_PAGES_TUNABLE + "=1" in tunables else "default"


def _version(text: str) -> tuple[int, ...]:
    """``"2.36"`` as ``(2, 36)``; ``()`` when it is not a dotted number."""
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return ()
