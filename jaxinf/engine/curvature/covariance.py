"""Stage 1, covariance: the Kronecker factors ``A`` and ``S`` of every tracked layer.

    A = sum_{n,t} a[n,t] a[n,t]^T / N_tok        S = sum_{n,t} g[n,t] g[n,t]^T / N_tok

over the layer's own unmasked tokens (padding excluded), with ``N_tok`` the
count of those tokens, per layer. This is kronfluence's normalization: both
factors are divided by the token count, so their Kronecker product
approximates the Fisher per token. For an ordinary layer the tokens are all
the batch's; for an expert of a mixture they are the tokens routed to it
(:meth:`jaxinf.engine.capture.Tap.linear`'s ``tokens``), so each expert's factors are
averages over its own tokens. A layer that never receives a token has zero
sums and ``N_tok = 0``: its factors are zero (see :func:`covariance_finalize`).

Each layer's sums and count are formed inside the backward pass by
:func:`covariance_statistic` (:func:`jaxinf.engine.capture.layer_statistics`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxinf.engine.capture import LayerSpec
from jaxinf.engine.precision import layers_dtype, matmul_precision, working_dtype
from jaxinf.sharding.axes import logical
from jaxinf.sharding.partitioning import constrain

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CovarianceState:
    """Running sums of the covariance stage: ``sum a a^T``, ``sum g g^T`` and the token counts ``[*lead]`` per block."""

    A: dict[str, Array] = logical("factor", "rows", "cols")
    S: dict[str, Array] = logical("factor", "rows", "cols")
    count: dict[str, Array] = logical("replicated")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Covariance:
    """The finished factors: ``A`` ``[*lead, d_in', d_in']`` and ``S`` ``[*lead, d_out, d_out]``, and ``N_tok``
    ``[*lead]`` (per layer)."""

    A: dict[str, Array] = logical("factor", "rows", "cols")
    S: dict[str, Array] = logical("factor", "rows", "cols")
    count: dict[str, Array] = logical("replicated")


def covariance_init(layers: Mapping[str, LayerSpec], dtype=None) -> CovarianceState:
    """Zero sums for every tracked block in the statistics dtype ``dtype`` (by default the layers'
    :func:`~jaxinf.engine.precision.layers_dtype`)."""
    dtype = layers_dtype(layers) if dtype is None else dtype
    return CovarianceState(
        A={k: jnp.zeros(s.lead + (s.d_in_aug, s.d_in_aug), dtype) for k, s in layers.items()},
        S={k: jnp.zeros(s.lead + (s.d_out, s.d_out), dtype) for k, s in layers.items()},
        count={k: jnp.zeros(s.lead, dtype) for k, s in layers.items()},
    )


def token_outer_sum(x: Array, dtype, precision=None) -> Array:
    """``sum_{n,t} x[n,t] x[n,t]^T`` over the batch and token axes of ``x`` ``[B, T, d]``, at the matmul precision
    ``precision`` (:func:`~jaxinf.engine.precision.matmul_precision`).

    Written as one product of the ``[B T, d]`` matrix with itself: XLA's CPU backend contracts one merged axis
    much faster than the batch and token axes of a 3-D einsum (the covariance row of ``scripts/bench_engine.py``,
    before and after, in docs/benchmarks.md: 1.59x to 1.17x of a forward+backward step)."""
    x = x.astype(dtype).reshape(-1, x.shape[-1])
    return jnp.einsum("ni,nj->ij", x, x, precision=matmul_precision(precision))


def covariance_statistic(
    a: Array, g: Array, mask: Array, context=None, *, dtype=None, precision=None
) -> dict[str, Array]:
    """One layer's share of a batch: ``{"A": sum a a^T, "S": sum g g^T, "count": sum mask}`` in the statistics dtype
    ``dtype`` (by default :func:`~jaxinf.engine.precision.working_dtype` of ``a`` and ``g``), at the matmul precision
    ``precision`` (``run.matmul_precision``).

    ``mask`` is the layer's own (an expert's: its routed tokens), so ``count`` is the layer's token count.
    """
    dtype = working_dtype(a, g) if dtype is None else dtype
    return {
        "A": constrain(token_outer_sum(a, dtype, precision), ("rows", "cols"), "factor"),
        "S": constrain(token_outer_sum(g, dtype, precision), ("rows", "cols"), "factor"),
        "count": mask.astype(dtype).sum(),
    }


def covariance_update(state: CovarianceState, stats: Mapping[str, dict[str, Array]]) -> CovarianceState:
    """Adds one batch: ``A += sum a a^T``, ``S += sum g g^T``, ``N_tok += sum mask`` (``stats``: per block)."""
    A, S, count = {}, {}, {}
    for k in state.A:
        A[k] = state.A[k] + stats[k]["A"].astype(state.A[k].dtype)
        S[k] = state.S[k] + stats[k]["S"].astype(state.S[k].dtype)
        count[k] = state.count[k] + stats[k]["count"].astype(state.count[k].dtype)
    return CovarianceState(A=A, S=S, count=count)


def per_count(total: Array, count: Array) -> Array:
    """``total / max(count, 1)`` with ``count`` ``[*lead]`` broadcast over ``total``'s two trailing axes.

    A layer that never received a token has ``total = 0`` and ``count = 0``: the result is 0, not NaN.
    """
    return total / jnp.maximum(count, 1)[..., None, None]


def covariance_finalize(state: CovarianceState) -> Covariance:
    """``A = sum a a^T / max(N_tok, 1)`` and ``S = sum g g^T / max(N_tok, 1)`` per layer (0 for a layer with no
    token)."""
    A = {k: per_count(v, state.count[k]) for k, v in state.A.items()}
    S = {k: per_count(v, state.count[k]) for k, v in state.S.items()}
    return Covariance(A=A, S=S, count=dict(state.count))
