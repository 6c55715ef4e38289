"""Stage 2, eigendecomposition of the Kronecker factors.

    A = Q_A diag(e_A) Q_A^T        S = Q_S diag(e_S) Q_S^T

Each factor is symmetrized first (``(M + M^T) / 2``), decomposed in its own
dtype (the statistics dtype it was accumulated in, at least float32), and its
eigenvalues are clipped at zero: ``A`` and ``S`` are positive semi-definite, so
a negative eigenvalue is round-off. If ``eigh`` fails (NaN output on a finite input) the factor is
decomposed again after adding a small multiple of the identity, which is then
subtracted from the eigenvalues.

The matrices of a stacked block are decomposed one at a time
(:func:`jaxinf.engine.lapack.per_matrix`: a batched LAPACK ``eigh`` can deadlock XLA's
CPU thread pool). Decomposing layer by layer costs nothing (each ``eigh`` is
itself the bulk of the work), and on a mesh the layer axis is sharded, so each
device maps over its own layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxinf.engine.curvature.covariance import Covariance
from jaxinf.engine.lapack import per_matrix
from jaxinf.engine.precision import working_dtype
from jaxinf.sharding.axes import logical

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Eigen:
    """Eigenvectors (columns) and eigenvalues of ``A`` and ``S`` per block."""

    Q_A: dict[str, Array] = logical("factor", "rows", "cols")
    e_A: dict[str, Array] = logical("eigenvalues", "rows")
    Q_S: dict[str, Array] = logical("factor", "rows", "cols")
    e_S: dict[str, Array] = logical("eigenvalues", "rows")


def symmetric_eigh(M: Array) -> tuple[Array, Array]:
    """``M = Q diag(e) Q^T`` of one symmetrized matrix ``M`` ``[n, n]``: ``e >= 0`` ascending, ``Q`` orthonormal columns
    (in ``M``'s dtype, at least float32)."""
    M = M.astype(working_dtype(M))
    M = 0.5 * (M + M.T)
    e, Q = jnp.linalg.eigh(M)
    failed = ~(jnp.all(jnp.isfinite(e)) & jnp.all(jnp.isfinite(Q)))

    def retry(M):
        n = M.shape[-1]
        jitter = 1e-7 * jnp.maximum(jnp.trace(M) / n, 1e-30)
        e, Q = jnp.linalg.eigh(M + jitter * jnp.eye(n, dtype=M.dtype))
        return e - jitter, Q

    e, Q = jax.lax.cond(failed, retry, lambda M: (e, Q), M)
    return jnp.maximum(e, 0.0), Q


def stacked_eigh(M: Array) -> tuple[Array, Array]:
    """:func:`symmetric_eigh` of every matrix of ``M`` ``[*lead, n, n]``, one after another (see the module docstring)."""
    return per_matrix(symmetric_eigh, M)


def eigendecompose(cov: Covariance, eigh: Callable[[Array, str], tuple[Array, Array]] | None = None) -> Eigen:
    """Eigendecomposition of every block's ``A`` and ``S``, one factor after another.

    ``eigh(M, which)`` decomposes one factor ``M`` ``[*lead, n, n]`` (``which``: "A" or "S");
    by default :func:`stacked_eigh`. A driver passes its own (a jitted or distributed one), so that
    one program holds one factor at a time and a step's memory is that of the largest factor.
    """
    eigh = eigh or (lambda M, which: stacked_eigh(M))
    Q_A, e_A, Q_S, e_S = {}, {}, {}, {}
    for k in cov.A:
        e_A[k], Q_A[k] = eigh(cov.A[k], "A")
        e_S[k], Q_S[k] = eigh(cov.S[k], "S")
    return Eigen(Q_A=Q_A, e_A=e_A, Q_S=Q_S, e_S=e_S)
