"""The damped inverse of preconditioning: the damping ``lambda`` and ``1 / (Lambda + lambda)``.

The damping ``lambda`` is a given value or, as in kronfluence, the heuristic
``0.1 * mean(Lambda)`` of each layer. Where ``Lambda + lambda = 0`` (a layer
that never received a token, with the heuristic damping) the inverse is 0: the
layer contributes nothing (:func:`inverse_eigenvalues`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

HEURISTIC_DAMPING_SCALE = 0.1


def block_damping(Lambda: Array, value: float | None) -> Array:
    """``lambda`` of a block's layers (shape ``[*lead]``): ``value``, or ``0.1 * mean(Lambda)`` of each layer."""
    if value is None:
        return HEURISTIC_DAMPING_SCALE * jnp.mean(Lambda, axis=(-2, -1))
    return jnp.full(Lambda.shape[:-2], value, Lambda.dtype)


def inverse_eigenvalues(Lambda: Array, damp: Array) -> Array:
    """``1 / (Lambda + lambda)`` of one block, ``damp`` broadcast over the layer axes; 0 where ``Lambda + lambda = 0``.

    ``Lambda + lambda = 0`` only where no curvature was fitted: a layer that never received a token (an expert
    the router never chose) has ``Lambda = 0`` and heuristic damping ``0.1 * mean(Lambda) = 0``. Its inverse is
    defined as 0, so that layer contributes nothing to preconditioned gradients, scores or self-influence.
    """
    total = Lambda + damp[..., None, None]
    nonzero = total != 0
    return jnp.where(nonzero, 1.0 / jnp.where(nonzero, total, 1), 0)
