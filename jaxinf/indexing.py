"""The EK-FAC index: each document's gradient kept in the Kronecker eigenbasis, so new queries need no pass
over the corpus.

For a tracked layer the influence of document n on query q is (:mod:`jaxinf.scoring`)

    <P(G_q), G[n]>_F = sum_ij  Pr_q[i, j] R_n[i, j],     Pr_q = Q_S^T P(G_q) Q_A,   R_n = Q_S^T G[n] Q_A

because ``Q_S`` and ``Q_A`` are orthogonal. The index stores, per document and layer, the block
``R_n[rows, cols]`` of the eigen-directions with the largest eigenvalues (``k_S`` of ``S``, ``k_A`` of ``A``:
:func:`select_cells`), the document's gradient energy ``||G[n]||_F^2 = ||R_n||_F^2`` and the block's energy.
Nothing about the queries, the damping or the eigenvalue correction is baked in: a query set, a damping
sweep, or K-FAC instead of EK-FAC, is one matrix product against the stored blocks
(:func:`index_scores`).

What the block leaves out is bounded. By Cauchy-Schwarz, per layer,

    |exact - index| = |sum_{ij not kept} Pr_q[i, j] R_n[i, j]| <= ||Pr_q,rest||_F ||R_n,rest||_F,

and ``||R_n,rest||_F^2 = ||G[n]||_F^2 - ||R_n,kept||_F^2`` (:func:`score_bounds`). Documents whose bound
reaches across a query's k-th score are scored exactly again (:func:`certify_candidates`), so the top and
bottom k reported are exactly EK-FAC's. With every cell kept the bound is 0 and the index scores are the
exact scores.

A query's expected fidelity follows from EK-FAC's own model of the rotated gradients (independent entries of
variance ``Lambda``): the correlation over documents of index and exact scores is

    rho_q = sqrt( sum_kept Pr_q^2 Lambda / sum_all Pr_q^2 Lambda )          (:func:`predicted_correlation`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.capture import LayerSpec
from jaxinf.curvature.correction import rotated_gradient
from jaxinf.curvature.eigen import Eigen
from jaxinf.precision import working_dtype
from jaxinf.scoring import QueryGradients

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
    """The kept eigen-directions of every block: ``rows`` ``[*lead, k_S]`` (columns of ``Q_S``) and ``cols``
    ``[*lead, k_A]`` (columns of ``Q_A``), each ordered by decreasing eigenvalue."""

    rows: dict[str, Array]
    cols: dict[str, Array]


def block_sizes(layers: Mapping[str, LayerSpec], k: int | None) -> dict[str, tuple[int, int]]:
    """``(k_S, k_A)`` of each block: ``min(k, d_out)``, ``min(k, d_in')`` (``k=None``: every direction)."""
    return {name: (s.d_out if k is None else min(k, s.d_out), s.d_in_aug if k is None else min(k, s.d_in_aug))
            for name, s in layers.items()}


def select_cells(eigen: Eigen, sizes: Mapping[str, tuple[int, int]]) -> Selection:
    """The ``k_S`` largest eigenvalues of ``S`` and the ``k_A`` largest of ``A`` per layer (indices, largest first)."""
    def top(e, k):
        return jnp.argsort(-e, axis=-1, stable=True)[..., :k].astype(jnp.int32)

    return Selection(rows={k: top(eigen.e_S[k], sizes[k][0]) for k in sizes},
                     cols={k: top(eigen.e_A[k], sizes[k][1]) for k in sizes})


def kept_basis(Q_A: Mapping[str, Array], Q_S: Mapping[str, Array], selection: Selection) -> dict[str, dict]:
    """Per block, the kept columns of the eigenbases: ``{"Q_A": [*lead, d_in', k_A], "Q_S": [*lead, d_out, k_S]}``
    (the context of :func:`index_statistic`)."""
    def take(Q, idx):
        return jnp.take_along_axis(Q, idx[..., None, :], axis=-1)

    return {k: {"Q_A": take(Q_A[k], selection.cols[k]), "Q_S": take(Q_S[k], selection.rows[k])} for k in selection.rows}


def gradient_energy(a: Array, g: Array) -> Array:
    """``||G[n]||_F^2 = sum_{t,t'} (a_t . a_t') (g_t . g_t')`` per sequence ``[B]``, from the tokens' Gram matrices
    (``T^2 (d_in' + d_out)`` products per sequence instead of the ``T d_out d_in'`` of forming ``G[n]``)."""
    Ka = jnp.einsum("bti,bsi->bts", a, a)
    Kg = jnp.einsum("bto,bso->bts", g, g)
    return jnp.sum(Ka * Kg, axis=(-2, -1))


def index_statistic(a: Array, g: Array, mask: Array, basis: Mapping[str, Array], *, dtype=None) -> dict[str, Array]:
    """One layer's index rows of a batch: the kept block ``R_n[rows, cols] = Q_S,kept^T G[n] Q_A,kept``
    ``[B, k_S, k_A]``, the gradient energy ``||G[n]||_F^2`` and the block's energy ``||R_n,kept||_F^2`` ``[B]``.

    ``basis``: the layer's :func:`kept_basis`. Computed in ``dtype`` (by default the working dtype of ``a``, ``g``)."""
    dtype = working_dtype(a, g) if dtype is None else dtype
    a, g = a.astype(dtype), g.astype(dtype)
    block = rotated_gradient(a, g, basis["Q_A"], basis["Q_S"], dtype)
    return {"cells": block, "energy": gradient_energy(a, g), "kept": jnp.sum(block * block, axis=(-2, -1))}


def _rows_first(x: Array, lead: int, trailing: int) -> Array:
    """``[*lead, B, *trailing]`` -> ``[B, prod(lead) * prod(trailing)]`` (a block's entries of one row, in order)."""
    x = jnp.moveaxis(x, lead, 0)
    return x.reshape(x.shape[0], -1) if x.ndim > 1 else x[:, None]


def flatten_rows(blocks: Mapping[str, Mapping[str, Array]], layers: Mapping[str, LayerSpec]) -> dict[str, Array]:
    """Per-block :func:`index_statistic` results (``[*lead, B, ...]``) as one row per sequence: ``cells``
    ``[B, C]`` (blocks in name order, each ``[*lead, k_S, k_A]`` flattened), ``energy`` and ``kept`` ``[B, L]``
    (one column per tracked layer)."""
    names = sorted(layers)
    lead = {k: len(layers[k].lead) for k in names}
    return {"cells": jnp.concatenate([_rows_first(blocks[k]["cells"], lead[k], 2) for k in names], axis=1),
            "energy": jnp.concatenate([_rows_first(blocks[k]["energy"], lead[k], 0) for k in names], axis=1),
            "kept": jnp.concatenate([_rows_first(blocks[k]["kept"], lead[k], 0) for k in names], axis=1)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IndexQueries:
    """Queries in index space: ``cells`` ``[Q, C]`` (the kept block of ``Pr_q = Q_S^T P(G_q) Q_A``, laid out as the
    index's rows), ``rest`` ``[Q, L]`` (``||Pr_q,rest||_F`` per tracked layer) and ``fidelity`` ``[Q]``
    (:func:`predicted_correlation`)."""

    cells: Array
    rest: Array
    fidelity: Array


def rotated_queries(qg: QueryGradients, Q_A: Mapping[str, Array], Q_S: Mapping[str, Array]) -> dict[str, Array]:
    """``Pr_q = Q_S^T P(G_q) Q_A`` per block ``[*lead, Q, d_out, d_in']``; a rank-r ``P = left right^T`` is rotated
    as ``(Q_S^T left)(Q_A^T right)^T``."""
    out = {}
    for k in list(qg.full) + list(qg.left):
        QA, QS = jnp.expand_dims(Q_A[k], -3), jnp.expand_dims(Q_S[k], -3)
        if k in qg.full:
            P = qg.full[k].astype(QA.dtype)
            out[k] = jnp.swapaxes(QS, -1, -2) @ P @ QA
        else:
            left = jnp.swapaxes(QS, -1, -2) @ qg.left[k].astype(QS.dtype)
            right = jnp.swapaxes(QA, -1, -2) @ qg.right[k].astype(QA.dtype)
            out[k] = left @ jnp.swapaxes(right, -1, -2)
    return out


def kept_mask(selection: Selection, layers: Mapping[str, LayerSpec], name: str) -> Array:
    """``[*lead, d_out, d_in']``: 1 at the kept cells of block ``name``, 0 elsewhere."""
    s = layers[name]
    rows = jax.nn.one_hot(selection.rows[name], s.d_out).sum(-2)       # [*lead, d_out]
    cols = jax.nn.one_hot(selection.cols[name], s.d_in_aug).sum(-2)    # [*lead, d_in']
    return rows[..., :, None] * cols[..., None, :]


def predicted_correlation(kept: Array, total: Array) -> Array:
    """``rho_q = sqrt(sum_kept Pr_q^2 Lambda / sum_all Pr_q^2 Lambda)``: the correlation over documents of index and
    exact scores if the rotated document gradients had independent entries of variance ``Lambda`` (1 where the
    query has no curvature-weighted energy)."""
    return jnp.where(total > 0, jnp.sqrt(jnp.clip(kept / jnp.where(total > 0, total, 1), 0, 1)), 1.0)


def index_queries(qg: QueryGradients, Q_A: Mapping[str, Array], Q_S: Mapping[str, Array], variance: Mapping[str, Array],
                  selection: Selection, layers: Mapping[str, LayerSpec]) -> IndexQueries:
    """Prepared queries (:class:`~jaxinf.scoring.QueryGradients`, damping and truncation already applied) in index
    space: the kept cells of ``Pr_q``, the norm of the rest per layer, and the predicted correlation with the
    exact scores under ``variance`` (the fitted EK-FAC ``Lambda``)."""
    Pr = rotated_queries(qg, Q_A, Q_S)
    names = sorted(layers)
    cells, rest, num, den = [], [], 0.0, 0.0
    for k in names:
        lead = len(layers[k].lead)
        P = Pr[k]
        block = jnp.take_along_axis(P, jnp.expand_dims(selection.rows[k], -2)[..., None], axis=-2)
        block = jnp.take_along_axis(block, jnp.expand_dims(selection.cols[k], -2)[..., None, :], axis=-1)
        cells.append(_rows_first(block, lead, 2))
        outside = 1.0 - jnp.expand_dims(kept_mask(selection, layers, k), -3).astype(P.dtype)
        rest.append(_rows_first(jnp.sqrt(jnp.sum(P * P * outside, axis=(-2, -1))), lead, 0))
        var = jnp.expand_dims(variance[k].astype(P.dtype), -3)
        total = P * P * var
        axes = tuple(range(lead)) + (lead + 1, lead + 2)
        den = den + jnp.sum(total, axis=axes)
        num = num + jnp.sum(total * (1.0 - outside), axis=axes)
    return IndexQueries(cells=jnp.concatenate(cells, axis=1), rest=jnp.concatenate(rest, axis=1),
                        fidelity=predicted_correlation(num, den))


def residual_norms(energy: np.ndarray, kept: np.ndarray, eps: float) -> np.ndarray:
    """``||R_n,rest||_F = sqrt(||G[n]||^2 - ||R_n,kept||^2)`` per row and layer, with ``eps ||G[n]||^2`` added under
    the root for the round-off of the subtraction (``eps``: the storage dtype's resolution), so the bound holds."""
    energy = energy.astype(np.float64)
    return np.sqrt(np.maximum(energy - kept.astype(np.float64), 0.0) + eps * np.abs(energy))


def index_scores(queries: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """``[Q, R]``: ``sum_kept Pr_q R_n`` of every stored row against every query (one matrix product)."""
    return queries @ cells.T


def score_bounds(rest_q: np.ndarray, rest_n: np.ndarray) -> np.ndarray:
    """``[Q, R]``: ``sum_layers ||Pr_q,rest||_F ||R_n,rest||_F``, a bound on ``|exact - index|`` of every pair."""
    return rest_q @ rest_n.T


def certify_candidates(scores: np.ndarray, bounds: np.ndarray, k: int) -> np.ndarray:
    """Documents that may belong to some query's exact top or bottom ``k``, given index ``scores`` and ``bounds``
    ``[Q, N]``: those whose interval ``[s - b, s + b]`` reaches the k-th best lower bound (top) or the k-th best
    upper bound (bottom). Every other document is certainly outside both tails, so scoring the candidates exactly
    gives the exact tails. Returns a boolean ``[N]`` mask (the union over queries and tails)."""
    N = scores.shape[1]
    k = min(k, N)
    lower, upper = scores - bounds, scores + bounds
    kth_lower = -np.partition(-lower, k - 1, axis=1)[:, k - 1:k]     # the k-th largest lower bound
    kth_upper = np.partition(upper, k - 1, axis=1)[:, k - 1:k]       # the k-th smallest upper bound
    return ((upper >= kth_lower) | (lower <= kth_upper)).any(axis=0)
