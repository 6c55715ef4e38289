"""Stage 1, covariance: the Kronecker factors ``A`` and ``S`` of every tracked layer.

    A = sum_{n,t} a[n,t] a[n,t]^T / N_tok        S = sum_{n,t} g[n,t] g[n,t]^T / N_tok

over unmasked tokens (padding excluded), with ``N_tok`` counted per layer. This
is kronfluence's normalization: both factors are divided by the token count,
so their Kronecker product approximates the Fisher per token.

Each layer's sums are formed inside the backward pass by
:func:`covariance_statistic` (:func:`jaxinf.capture.layer_statistics`); the
token count is the batch's, the same for every layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxinf.capture import LayerSpec
from jaxinf.precision import float_dtype
from jaxinf.sharding import constrain

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CovarianceState:
    """Running sums of the covariance stage: ``sum a a^T``, ``sum g g^T`` and token counts per block."""

    A: dict[str, Array]
    S: dict[str, Array]
    count: dict[str, Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Covariance:
    """The finished factors: ``A`` ``[*lead, d_in', d_in']`` and ``S`` ``[*lead, d_out, d_out]``, and ``N_tok``."""

    A: dict[str, Array]
    S: dict[str, Array]
    count: dict[str, Array]


def covariance_init(layers: Mapping[str, LayerSpec], dtype=None) -> CovarianceState:
    """Zero sums for every tracked block (in the working precision unless ``dtype`` is given)."""
    dtype = dtype or float_dtype()
    return CovarianceState(
        A={k: jnp.zeros(s.lead + (s.d_in_aug, s.d_in_aug), dtype) for k, s in layers.items()},
        S={k: jnp.zeros(s.lead + (s.d_out, s.d_out), dtype) for k, s in layers.items()},
        count={k: jnp.zeros((), dtype) for k in layers},
    )


def token_outer_sum(x: Array, dtype) -> Array:
    """``sum_{n,t} x[n,t] x[n,t]^T`` over the batch and token axes of ``x`` ``[B, T, d]``."""
    x = x.astype(dtype)
    return jnp.einsum("bti,btj->ij", x, x)


def covariance_statistic(a: Array, g: Array, context=None) -> dict[str, Array]:
    """One layer's share of a batch: ``{"A": sum a a^T, "S": sum g g^T}`` (in the working precision)."""
    dtype = float_dtype()
    return {"A": constrain(token_outer_sum(a, dtype), ("rows", "cols"), "factor"),
            "S": constrain(token_outer_sum(g, dtype), ("rows", "cols"), "factor")}


def covariance_update(state: CovarianceState, stats: Mapping[str, dict[str, Array]], mask: Array) -> CovarianceState:
    """Adds one batch: ``A += sum a a^T``, ``S += sum g g^T`` (``stats``: per block), ``N_tok += sum mask``."""
    tokens = mask.sum()
    A, S, count = {}, {}, {}
    for k in state.A:
        A[k] = state.A[k] + stats[k]["A"].astype(state.A[k].dtype)
        S[k] = state.S[k] + stats[k]["S"].astype(state.S[k].dtype)
        count[k] = state.count[k] + tokens.astype(state.count[k].dtype)
    return CovarianceState(A=A, S=S, count=count)


def covariance_finalize(state: CovarianceState) -> Covariance:
    """``A = sum a a^T / N_tok`` and ``S = sum g g^T / N_tok``."""
    A = {k: v / state.count[k] for k, v in state.A.items()}
    S = {k: v / state.count[k] for k, v in state.S.items()}
    return Covariance(A=A, S=S, count=dict(state.count))
