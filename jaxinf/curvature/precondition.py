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
``0.1 * mean(Lambda)`` of each layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxinf.curvature.eigen import Eigen

Array = jax.Array

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
HEURISTIC_DAMPING_SCALE = 0.1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Curvature:
    """What preconditioning needs: the strategy, the eigenbases (kfac, ekfac) and ``Lambda``."""

    strategy: str = dataclasses.field(metadata=dict(static=True))
    Q_A: dict[str, Array] | None
    Q_S: dict[str, Array] | None
    Lambda: dict[str, Array] | None

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


def damping(curv: Curvature, value: float | None) -> dict[str, Array] | None:
    """``lambda`` per layer (shape ``[*lead]``): ``value``, or ``0.1 * mean(Lambda)`` when ``value`` is None."""
    if curv.Lambda is None:
        return None
    if value is None:
        return {k: HEURISTIC_DAMPING_SCALE * jnp.mean(L, axis=(-2, -1)) for k, L in curv.Lambda.items()}
    return {k: jnp.full(L.shape[:-2], value, L.dtype) for k, L in curv.Lambda.items()}


def inverse_eigenvalues(Lambda: Array, damp: Array) -> Array:
    """``1 / (Lambda + lambda)`` of one block, ``damp`` broadcast over the layer axes."""
    return 1.0 / (Lambda + damp[..., None, None])


def _per_example(x: Array, lead: int) -> Array:
    """Inserts the example axis after the ``lead`` layer axes of a factor, to broadcast against ``[*lead, n, ...]``."""
    return jnp.expand_dims(x, lead)


def precondition(G: Mapping[str, Array], curv: Curvature, damp: Mapping[str, Array] | None) -> dict[str, Array]:
    """``P(G) = Q_S [ (Q_S^T G Q_A) / (Lambda + lambda) ] Q_A^T`` for per-example gradients ``[*lead, n, d_out, d_in']``."""
    if curv.strategy == "identity":
        return dict(G)
    out = {}
    for k, g in G.items():
        lead = g.ndim - 3
        dtype = curv.Lambda[k].dtype
        inv = _per_example(inverse_eigenvalues(curv.Lambda[k], damp[k]), lead)
        g = g.astype(dtype)
        if curv.strategy == "diagonal":
            out[k] = g * inv
            continue
        Q_A = _per_example(curv.Q_A[k].astype(dtype), lead)
        Q_S = _per_example(curv.Q_S[k].astype(dtype), lead)
        rotated = jnp.swapaxes(Q_S, -1, -2) @ g @ Q_A
        out[k] = Q_S @ (rotated * inv) @ jnp.swapaxes(Q_A, -1, -2)
    return out
