"""Strategies, damping and preconditioning: from the fitted curvature to ``P(G)``.

Every strategy preconditions a gradient ``G`` (``[d_out, d_in']`` per layer) as

    P(G) = Q_S [ (Q_S^T G Q_A) / (Lambda + lambda) ] Q_A^T        (elementwise division)

with its own basis and eigenvalues:

- ``identity``: no curvature, ``P(G) = G`` (damping is not used);
- ``diagonal``: ``Q_A = Q_S = I``, ``Lambda = sum_n G[n]^2 / N_seq``;
- ``kfac``: the eigenbases of ``A`` and ``S``, ``Lambda[i, j] = e_S[i] e_A[j]``,
  i.e. ``P(G) = (A kron S + lambda I)^-1 vec(G)``;
- ``ekfac``: the eigenbases of ``A`` and ``S`` and the corrected
  ``Lambda = sum_n (Q_S^T G[n] Q_A)^2 / N_seq``.

The damping ``lambda`` is a given value or, as in kronfluence, the heuristic
``0.1 * mean(Lambda)`` of each layer. Where ``Lambda + lambda = 0`` (a layer
that never received a token, with the heuristic damping) the inverse is 0: the
layer contributes nothing (:func:`inverse_eigenvalues`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxinf.axes import logical
from jaxinf.curvature.eigen import Eigen

Array = jax.Array

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
HEURISTIC_DAMPING_SCALE = 0.1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Curvature:
    """What preconditioning needs: the strategy, the eigenbases (kfac, ekfac) and ``Lambda``."""

    strategy: str = dataclasses.field(metadata=dict(static=True))
    Q_A: dict[str, Array] | None = logical("factor", "rows", "cols")
    Q_S: dict[str, Array] | None = logical("factor", "rows", "cols")
    Lambda: dict[str, Array] | None = logical("factor", "rows", "cols")

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"factors.strategy: unknown strategy {self.strategy!r} (choose from {', '.join(STRATEGIES)})")


def curvature(strategy: str, eigen: Eigen | None = None, Lambda: Mapping[str, Array] | None = None) -> Curvature:
    """Assembles a :class:`Curvature`, checking that the strategy has what it needs."""
    if strategy not in STRATEGIES:
        raise ValueError(f"factors.strategy: unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if strategy == "identity":
        return Curvature(strategy, None, None, None)
    if Lambda is None:
        raise ValueError(f"strategy {strategy!r} needs Lambda")
    if strategy == "diagonal":
        return Curvature(strategy, None, None, dict(Lambda))
    if eigen is None:
        raise ValueError(f"strategy {strategy!r} needs the eigendecomposition")
    return Curvature(strategy, dict(eigen.Q_A), dict(eigen.Q_S), dict(Lambda))


def block_damping(Lambda: Array, value: float | None) -> Array:
    """``lambda`` of a block's layers (shape ``[*lead]``): ``value``, or ``0.1 * mean(Lambda)`` of each layer."""
    if value is None:
        return HEURISTIC_DAMPING_SCALE * jnp.mean(Lambda, axis=(-2, -1))
    return jnp.full(Lambda.shape[:-2], value, Lambda.dtype)


def damping(curv: Curvature, value: float | None) -> dict[str, Array] | None:
    """:func:`block_damping` of every block (None for the identity strategy)."""
    if curv.Lambda is None:
        return None
    return {k: block_damping(L, value) for k, L in curv.Lambda.items()}


def inverse_eigenvalues(Lambda: Array, damp: Array) -> Array:
    """``1 / (Lambda + lambda)`` of one block, ``damp`` broadcast over the layer axes; 0 where ``Lambda + lambda = 0``.

    ``Lambda + lambda = 0`` only where no curvature was fitted: a layer that never received a token (an expert
    the router never chose) has ``Lambda = 0`` and heuristic damping ``0.1 * mean(Lambda) = 0``. Its inverse is
    defined as 0, so that layer contributes nothing to preconditioned gradients, scores or self-influence.
    """
    total = Lambda + damp[..., None, None]
    nonzero = total != 0
    return jnp.where(nonzero, 1.0 / jnp.where(nonzero, total, 1), 0)


def precondition_block(g: Array, strategy: str, factors: Mapping[str, Array] | None, damp: Array | None) -> Array:
    """``P(G) = Q_S [ (Q_S^T G Q_A) / (Lambda + lambda) ] Q_A^T`` of one block's gradients ``[*lead, n, d_out, d_in']``.

    ``factors``: the block's ``Lambda`` (and ``Q_A``, ``Q_S`` for kfac and ekfac), each
    ``[*lead, ...]``; ``damp``: ``[*lead]``. The example axis ``n`` broadcasts against them.
    """
    if strategy == "identity":
        return g
    dtype = factors["Lambda"].dtype
    inv = jnp.expand_dims(inverse_eigenvalues(factors["Lambda"], damp), -3)
    g = g.astype(dtype)
    if strategy == "diagonal":
        return g * inv
    Q_A = jnp.expand_dims(factors["Q_A"].astype(dtype), -3)
    Q_S = jnp.expand_dims(factors["Q_S"].astype(dtype), -3)
    rotated = jnp.swapaxes(Q_S, -1, -2) @ g @ Q_A
    return Q_S @ (rotated * inv) @ jnp.swapaxes(Q_A, -1, -2)


def curvature_context(curv: Curvature) -> dict[str, dict[str, Array]] | None:
    """Per block, the factors a preconditioning step needs (``Lambda``, ``Q_A``, ``Q_S``); None for identity."""
    if curv.Lambda is None:
        return None
    out = {}
    for k, L in curv.Lambda.items():
        out[k] = {"Lambda": L}
        if curv.Q_A is not None:
            out[k].update(Q_A=curv.Q_A[k], Q_S=curv.Q_S[k])
    return out


def precondition(G: Mapping[str, Array], curv: Curvature, damp: Mapping[str, Array] | None) -> dict[str, Array]:
    """:func:`precondition_block` of every block's per-example gradients ``[*lead, n, d_out, d_in']``."""
    context = curvature_context(curv)
    return {k: precondition_block(g, curv.strategy, None if context is None else context[k],
                                  None if damp is None else damp[k]) for k, g in G.items()}
