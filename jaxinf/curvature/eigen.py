"""Stage 2, eigendecomposition of the Kronecker factors.

    A = Q_A diag(e_A) Q_A^T        S = Q_S diag(e_S) Q_S^T

Each factor is symmetrized first (``(M + M^T) / 2``), decomposed in float64
when x64 is enabled (float32 otherwise), and its eigenvalues are clipped at
zero: ``A`` and ``S`` are positive semi-definite, so a negative eigenvalue is
round-off. If ``eigh`` fails (NaN output on a finite input) the factor is
decomposed again after adding a small multiple of the identity, which is then
subtracted from the eigenvalues.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinf.curvature.covariance import Covariance
from jaxinf.precision import float_dtype

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Eigen:
    """Eigenvectors (columns) and eigenvalues of ``A`` and ``S`` per block."""

    Q_A: dict[str, Array]
    e_A: dict[str, Array]
    Q_S: dict[str, Array]
    e_S: dict[str, Array]


def symmetric_eigh(M: Array) -> tuple[Array, Array]:
    """``M = Q diag(e) Q^T`` of the symmetrized ``M`` (batched over leading axes), ``e >= 0``, ascending."""
    M = M.astype(float_dtype())
    M = 0.5 * (M + jnp.swapaxes(M, -1, -2))
    e, Q = jnp.linalg.eigh(M)
    failed = ~(jnp.all(jnp.isfinite(e)) & jnp.all(jnp.isfinite(Q)))

    def retry(M):
        n = M.shape[-1]
        jitter = 1e-7 * jnp.maximum(jnp.trace(M, axis1=-2, axis2=-1) / n, 1e-30)
        e, Q = jnp.linalg.eigh(M + jitter[..., None, None] * jnp.eye(n, dtype=M.dtype))
        return e - jitter[..., None], Q

    e, Q = jax.lax.cond(failed, retry, lambda M: (e, Q), M)
    return jnp.maximum(e, 0.0), Q


def eigendecompose(cov: Covariance) -> Eigen:
    """Eigendecomposition of every block's ``A`` and ``S``."""
    Q_A, e_A, Q_S, e_S = {}, {}, {}, {}
    for k in cov.A:
        e_A[k], Q_A[k] = symmetric_eigh(cov.A[k])
        e_S[k], Q_S[k] = symmetric_eigh(cov.S[k])
    return Eigen(Q_A=Q_A, e_A=e_A, Q_S=Q_S, e_S=e_S)
