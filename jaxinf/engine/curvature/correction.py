"""Stage 3, eigenvalue correction: the EK-FAC ``Lambda`` of every tracked layer.

    Lambda = sum_n (Q_S^T G[n] Q_A)^2 / N_seq          (elementwise square)

the variance of the per-sequence gradients ``G[n] = sum_t g[n,t] a[n,t]^T`` in
the Kronecker eigenbasis, normalized per sequence (kronfluence's convention).
``N_seq`` is counted per layer: the sequences with at least one of the layer's
tokens (for an ordinary layer every non-padding sequence; for an expert of a
mixture, the sequences with a token routed to it). A layer with no token has
``Lambda = 0`` (see :func:`lambda_finalize`).
The rotated gradient is formed from rotated tokens,
``Q_S^T G[n] Q_A = sum_t (Q_S^T g[n,t]) (Q_A^T a[n,t])^T``, so no gradient is
ever materialized per token, only one ``[d_out, d_in']`` matrix per sequence.

Without an eigenbasis (``eigen=None``) the same accumulation gives the diagonal
strategy's ``Lambda = sum_n G[n]^2 / N_seq``.

Each layer's sum is formed inside the backward pass by :func:`lambda_statistic`
(:func:`jaxinf.engine.capture.layer_statistics`), with that layer's eigenbases as its
context, so the rotated gradients exist for one layer at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxinf.engine.capture import LayerSpec
from jaxinf.engine.curvature.covariance import per_count
from jaxinf.engine.curvature.eigen import Eigen
from jaxinf.engine.precision import layers_dtype, matmul_precision, working_dtype
from jaxinf.sharding.axes import field_axes, logical
from jaxinf.sharding.partitioning import constrain

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LambdaState:
    """Running sums ``sum_n (Q_S^T G[n] Q_A)^2`` and sequence counts ``N_seq`` ``[*lead]`` per block."""

    Lambda: dict[str, Array] = logical("factor", "rows", "cols")
    count: dict[str, Array] = logical("replicated")


LAMBDA_AXES = field_axes(LambdaState, "Lambda")
"""The layout of a finalized Lambda (:func:`lambda_finalize`'s bare dict of blocks): its field's declaration."""


def lambda_init(layers: Mapping[str, LayerSpec], dtype=None) -> LambdaState:
    """Zero sums for every tracked block in the statistics dtype ``dtype`` (by default the layers'
    :func:`~jaxinf.engine.precision.layers_dtype`)."""
    dtype = layers_dtype(layers) if dtype is None else dtype
    return LambdaState(
        Lambda={k: jnp.zeros(s.lead + (s.d_out, s.d_in_aug), dtype) for k, s in layers.items()},
        count={k: jnp.zeros(s.lead, dtype) for k, s in layers.items()},
    )


def rotated_gradient(a: Array, g: Array, Q_A: Array | None, Q_S: Array | None, dtype, precision=None) -> Array:
    """``Q_S^T G[n] Q_A = sum_t (Q_S^T g[n,t]) (Q_A^T a[n,t])^T`` per sequence: ``[B, d_out, d_in']``.

    Tokens are rotated before the sum over t, so the only parameter-sized
    tensor is one per sequence. With no eigenbasis this is ``G[n]`` itself. ``precision``: the matmul precision
    (:func:`~jaxinf.engine.precision.matmul_precision`).
    """
    precision = matmul_precision(precision)
    a = a.astype(dtype)
    g = g.astype(dtype)
    if Q_A is not None:
        assert Q_S is not None, "an eigenbasis has both Q_A and Q_S"
        a = jnp.einsum("bti,ij->btj", a, Q_A.astype(dtype), precision=precision)
        g = jnp.einsum("bto,op->btp", g, Q_S.astype(dtype), precision=precision)
    return jnp.einsum("btp,btj->bpj", g, a, precision=precision)


def lambda_statistic(
    a: Array, g: Array, mask: Array, eigen: Mapping[str, Array] | None, *, dtype=None, precision=None
) -> dict[str, Array]:
    """One layer's share of a batch: ``{"Lambda": sum_n (Q_S^T G[n] Q_A)^2, "count": N_seq}`` in the statistics
    dtype ``dtype`` (by default :func:`~jaxinf.engine.precision.working_dtype` of ``a`` and ``g``), at the matmul precision
    ``precision`` (``run.matmul_precision``).

    ``sum_n G[n]^2`` when ``eigen`` is None; ``eigen``: the layer's ``{"Q_A": ..., "Q_S": ...}``.
    ``N_seq`` is :func:`sequence_count` of the layer's own ``mask``.
    """
    dtype = working_dtype(a, g) if dtype is None else dtype
    Q_A = None if eigen is None else eigen["Q_A"]
    Q_S = None if eigen is None else eigen["Q_S"]
    R = constrain(rotated_gradient(a, g, Q_A, Q_S, dtype, precision), ("batch", "rows", "cols"))
    return lambda_sums(R, mask, precision)


def lambda_sums(R: Array, mask: Array, precision=None) -> dict[str, Array]:
    """``{"Lambda": sum_n R_n^2, "count": N_seq}`` of a batch's rotated gradients ``R`` ``[B, d_out, d_in']``
    (:func:`rotated_gradient`): :func:`lambda_statistic` of a pass that has ``R`` (and uses it for more)."""
    return {
        "Lambda": constrain(sum_over_sequences(R * R, precision), ("rows", "cols"), "factor"),
        "count": sequence_count(mask).astype(R.dtype),
    }


def sum_over_sequences(x: Array, precision=None) -> Array:
    """``sum_n x[n]`` over the leading (sequence) axis, written as the product of a row of ones with ``x``.

    The same sum as ``x.sum(0)``; XLA's CPU backend hands a reduction over a short leading axis to a library
    kernel that was the slowest operation of the Lambda step (the Lambda row of ``scripts/bench_engine.py``,
    before and after, in docs/benchmarks.md: 2.05x to 1.53x of a forward+backward step)."""
    return jnp.einsum("n,n...->...", jnp.ones(x.shape[:1], x.dtype), x, precision=matmul_precision(precision))


def lambda_context(eigen: Eigen | None) -> dict[str, dict[str, Array]] | None:
    """The per-block context of :func:`lambda_statistic`: each block's eigenbases (None: the diagonal strategy)."""
    if eigen is None:
        return None
    return {k: {"Q_A": eigen.Q_A[k], "Q_S": eigen.Q_S[k]} for k in eigen.Q_A}


def sequence_count(mask: Array) -> Array:
    """``N_seq`` of a mask ``[B, T]``: sequences with at least one unmasked token (padding rows do not count)."""
    return jnp.any(mask > 0, axis=-1).sum()


def lambda_update(state: LambdaState, stats: Mapping[str, dict[str, Array]]) -> LambdaState:
    """Adds one batch: ``Lambda += sum_n (Q_S^T G[n] Q_A)^2``, ``N_seq += sequences`` (``stats``: per block)."""
    out = {k: acc + stats[k]["Lambda"].astype(acc.dtype) for k, acc in state.Lambda.items()}
    count = {k: c + stats[k]["count"].astype(c.dtype) for k, c in state.count.items()}
    return LambdaState(Lambda=out, count=count)


def lambda_finalize(state: LambdaState) -> dict[str, Array]:
    """``Lambda = sum_n (Q_S^T G[n] Q_A)^2 / max(N_seq, 1)`` per layer (0 for a layer with no sequence)."""
    return {k: per_count(v, state.count[k]) for k, v in state.Lambda.items()}


def kfac_lambda(eigen: Eigen) -> dict[str, Array]:
    """K-FAC's eigenvalues of ``A kron S`` in the same layout: ``Lambda[i, j] = e_S[i] * e_A[j]``."""
    return {k: eigen.e_S[k][..., :, None] * eigen.e_A[k][..., None, :] for k in eigen.e_A}
