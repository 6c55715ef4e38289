"""Host environment: the process's BLAS/LAPACK thread pools, limited for a ``with`` block and restored after it;
and the C heap, set once at start-up so that XLA's CPU buffers are reused instead of faulted in every step.

On the CPU, XLA runs LAPACK (jaxlib's ``eigh``, ``svd``) inside its own thread
pool, and the BLAS library behind it starts threads of its own on top. On a
busy host the oversubscribed threads wait on each other, so the steps that call
LAPACK run inside :func:`lapack_threads`, and a run on a mesh of simulated CPU
devices inside :func:`mesh_lapack_threads`. Both restore the pools as they
found them when the block ends, so nothing of the process is changed for good.

The one lasting change is :func:`reuse_freed_memory`, which the ``jaxinf``
command calls before JAX starts (a library user calls it the same way).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.metadata
import importlib.util
import os
import platform
from collections.abc import Iterator

from jax.sharding import Mesh
from threadpoolctl import threadpool_limits


@contextlib.contextmanager
def lapack_threads(threads: int = 1) -> Iterator[None]:
    """Caps the BLAS/LAPACK threads of the ``eigh`` and SVD calls XLA makes on the CPU inside the block.

    On 2 shared cores the eigendecomposition of a 6M-parameter Llama's MLP
    factors took 23-33 s with OpenBLAS's default threads and 1.3 s with one BLAS
    thread (``scripts/bench_vs_kronfluence.py``). The computations must finish
    inside the block (block on their results); the previous limits are restored on exit.
    """
    importlib.import_module("scipy.linalg")  # loads the OpenBLAS that jaxlib's CPU LAPACK kernels call
    with threadpool_limits(limits=threads, user_api="blas"):
        yield


def mesh_lapack_threads(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """One BLAS thread per device inside the block, on a mesh of several CPU devices; no change otherwise.

    Simulated devices share the host's cores and every device calls LAPACK at once
    (the eigendecompositions, the query SVDs): 64 SVDs of 768 x 256 on 8 simulated
    devices of a 2-core host took 83 s with OpenBLAS's default threads and 0.4 s with one.
    """
    if mesh is None or mesh.devices.size == 1 or mesh.devices.flat[0].platform != "cpu":
        return contextlib.nullcontext()
    return lapack_threads(1)


M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
"""glibc's ``mallopt`` parameters (``malloc.h``)."""

HEAP_TRIM_THRESHOLD = 2**31 - 1
"""Free memory at the top of the heap that glibc keeps rather than returns (bytes; ``mallopt`` takes an int)."""


def computes_on_cpu(environ=os.environ) -> bool:
    """Whether JAX in this process will compute on the CPU, decided before it starts: ``JAX_PLATFORMS`` names only
    ``cpu``, or it is unset and no accelerator plugin (a ``jax_plugins`` entry point or package, ``libtpu``) is
    installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return {p.strip() for p in platforms.split(",")} == {"cpu"}
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and all(importlib.util.find_spec(m) is None for m in ("jax_plugins", "libtpu"))


def reuse_freed_memory(environ=os.environ) -> bool:
    """Keeps freed blocks of the C heap in the process, so that XLA's CPU buffers are reused from step to step.

    XLA's CPU backend allocates the buffers of every execution with ``malloc``: one 201 MiB block per
    forward+backward step of the Llama of ``scripts/bench_fwd_bwd.py``. glibc serves a block that large with a
    fresh ``mmap`` (always above 32 MiB, and from a thread's own arena whenever its 64 MiB heap is too small) and
    unmaps it on ``free``, so each step faults in every page of its temporaries again: 52,000 page faults per
    step there (the script prints them). With one arena (``M_ARENA_MAX=1``), no ``mmap`` (``M_MMAP_MAX=0``) and
    a 2 GiB trim threshold, freed blocks stay in the heap and the next step takes them again. The speed-up is in
    docs/benchmarks.md ("The C heap"); the price is that the heap keeps its peak size until the process exits.

    Applies when the C library is glibc, the process computes on the CPU (:func:`computes_on_cpu`: an
    accelerator's buffers are not the host's) and ``JAXINF_HOST_HEAP`` is ``reuse`` (or unset), not ``default``
    (glibc's own settings); any other value is a ``ValueError``. It must run before JAX starts its CPU client,
    whose threads choose their arena at their first allocation. Returns whether the settings were made.
    """
    choice = environ.get("JAXINF_HOST_HEAP", "reuse")
    if choice not in ("reuse", "default"):
        raise ValueError(f"JAXINF_HOST_HEAP={choice!r}: expected 'reuse' (the default) or 'default' "
                         "(glibc's own malloc settings)")
    if choice == "default" or platform.libc_ver()[0] != "glibc":
        return False
    if not computes_on_cpu(environ):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return all(mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)))
