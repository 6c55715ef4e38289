"""Host environment: the process's BLAS/LAPACK thread pools, limited for a ``with`` block and restored after it.

On the CPU, XLA runs LAPACK (jaxlib's ``eigh``, ``svd``) inside its own thread
pool, and the BLAS library behind it starts threads of its own on top. On a
busy host the oversubscribed threads wait on each other, so the steps that call
LAPACK run inside :func:`lapack_threads`, and a run on a mesh of simulated CPU
devices inside :func:`mesh_lapack_threads`. Both restore the pools as they
found them when the block ends, so nothing of the process is changed for good.
"""

from __future__ import annotations

import contextlib
import importlib
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
