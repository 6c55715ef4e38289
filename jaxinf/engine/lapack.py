"""Dense decompositions on stacks of matrices, one matrix at a time.

On the CPU, jaxlib 0.10 spreads a *batched* LAPACK call (``eigh``, ``svd``,
``qr`` over a leading batch axis) over XLA's own thread pool and waits on it from
inside: a program holding several of them can deadlock on a host with few cores,
and with several simulated devices executing at once (a mesh) every pool thread
can end up waiting. So every decomposition of a stack runs as ``lax.map`` of the
unbatched one (:func:`per_matrix`), which costs nothing where each decomposition
is the bulk of the work, and on a mesh each device maps over its own share of a
sharded stack. (Mapped is also faster on a few cores: docs/benchmarks.md,
"Measurements behind code decisions".)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def per_matrix(fn: Callable, *stacks: Array):
    """``fn`` of each matrix of ``stacks`` (each ``[*lead, m, n]``, the same ``lead``), one after another; the
    results keep ``lead`` in front."""
    lead = stacks[0].shape[:-2]
    flat = tuple(x.reshape((-1,) + x.shape[-2:]) for x in stacks)
    out = jax.lax.map(lambda xs: fn(*xs), flat)
    return jax.tree.map(lambda y: y.reshape(lead + y.shape[1:]), out)


def thin_svd(M: Array) -> tuple[Array, Array, Array]:
    """``M = U diag(s) V^T`` (reduced) of each matrix of ``M`` ``[*lead, m, n]``: ``U, s, V^T``, each matrix
    decomposed standing up, a wide one as its transpose (``M^T = V diag(s) U^T``), which LAPACK through XLA does
    faster (docs/benchmarks.md, "Measurements behind code decisions")."""
    svd = lambda m: jnp.linalg.svd(m, full_matrices=False)
    if M.shape[-2] >= M.shape[-1]:
        return per_matrix(svd, M)
    V, s, Ut = per_matrix(svd, jnp.swapaxes(M, -1, -2))
    return jnp.swapaxes(Ut, -1, -2), s, jnp.swapaxes(V, -1, -2)


def orthonormal_basis(Y: Array) -> Array:
    """An orthonormal basis (reduced QR's ``Q``) of the columns of each matrix of ``Y`` ``[*lead, m, k]``, ``m >= k``."""
    return per_matrix(lambda y: jnp.linalg.qr(y)[0], Y)
