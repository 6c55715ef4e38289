"""The EK-FAC index: each document's gradient kept in the Kronecker eigenbasis, so new queries need no pass
over the corpus.

For a tracked layer the influence of document n on query q is (:mod:`jaxinf.engine.scoring`)

    <P(G_q), G[n]>_F = sum_ij  Pr_q[i, j] R_n[i, j],     Pr_q = Q_S^T P(G_q) Q_A,   R_n = Q_S^T G[n] Q_A

because ``Q_S`` and ``Q_A`` are orthogonal. The index stores, per document and layer, the block
``R_n[rows, cols]`` of the eigen-directions with the largest eigenvalues (``k_S`` of ``S``, ``k_A`` of ``A``:
:func:`select_cells`) and the energy of the rest, band by band (``||G[n]||_F^2 = ||R_n||_F^2`` in all).
Nothing about the queries, the damping or the eigenvalue correction is baked in: a query set, a damping
sweep, or K-FAC instead of EK-FAC, is one matrix product against the stored blocks
(:func:`index_scores`).

What the block leaves out is bounded. By Cauchy-Schwarz, per layer,

    |exact - index| = |sum_{ij not kept} Pr_q[i, j] R_n[i, j]|
                    <= sum_{bands (b, c) not kept} ||Pr_q[b, c]||_F ||R_n[b, c]||_F

with the directions cut into :func:`bands` of growing width past the kept ones; the index stores each
document's energy in every pair of bands (:func:`score_bounds`). Documents whose bound
reaches across a query's k-th score are scored exactly again (:func:`certify_candidates`), so the top and
bottom k reported are exactly EK-FAC's. With every cell kept the bound is 0 and the index scores are the
exact scores.

A query's expected fidelity follows from EK-FAC's own model of the rotated gradients (independent entries of
variance ``Lambda``): the correlation over documents of index and exact scores is

    rho_q = sqrt( sum_kept Pr_q^2 Lambda / sum_all Pr_q^2 Lambda )          (:func:`predicted_correlation`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.engine.capture import LayerSpec
from jaxinf.engine.curvature.eigen import Eigen
from jaxinf.engine.precision import matmul_precision, working_dtype
from jaxinf.engine.scoring import QueryGradients
from jaxinf.sharding.axes import field_axes

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
    """The eigen-directions of every block ordered by decreasing eigenvalue: ``rows`` ``[*lead, d_out]`` (columns
    of ``Q_S``) and ``cols`` ``[*lead, d_in']`` (columns of ``Q_A``). The index keeps the first ``k_S`` rows and
    ``k_A`` columns in this order (:func:`block_sizes`); the others fall into :func:`bands`."""

    rows: dict[str, Array]
    cols: dict[str, Array]


def block_sizes(layers: Mapping[str, LayerSpec], k: int | None) -> dict[str, tuple[int, int]]:
    """``(k_S, k_A)`` of each block: ``min(k, d_out)``, ``min(k, d_in')`` (``k=None``: every direction)."""
    return {name: (kept_size(k, s.d_out), kept_size(k, s.d_in_aug)) for name, s in layers.items()}


def kept_directions(k: int | str | None) -> int | None:
    """``index.k`` as the directions kept per factor: an integer, or None for ``full`` (every direction)."""
    return None if isinstance(k, str) else k  # a string is "full" (config validation)


def kept_size(k: int | None, d: int) -> int:
    """Directions kept of a factor of ``d`` (``k=None``: all of them)."""
    return d if k is None else min(k, d)


def bands(k: int, d: int) -> list[tuple[int, int]]:
    """The eigen-directions ``0 .. d-1`` (decreasing eigenvalue) cut into bands: the kept ``[0, k)``, then
    ``[k, 2k)``, ``[2k, 4k)``, ... (each twice the last) up to ``d``. The bound on a score's error is a
    Cauchy-Schwarz inequality per pair of bands, so it is tight where a query's and a document's energy sit in
    the same bands, and costs one stored number per pair."""
    out, lo, width = [(0, k)], k, k
    while lo < d:
        out.append((lo, min(lo + width, d)))
        lo, width = lo + width, 2 * width
    return out


def select_cells(eigen: Eigen) -> Selection:
    """Every block's eigen-directions of ``S`` and ``A`` ordered by decreasing eigenvalue."""

    def order(e):
        return jnp.argsort(-e, axis=-1, stable=True).astype(jnp.int32)

    return Selection(rows={k: order(v) for k, v in eigen.e_S.items()}, cols={k: order(v) for k, v in eigen.e_A.items()})


BASIS_AXES = field_axes(Eigen, "Q_A")
"""The layout of every array of an :func:`ordered_basis` (a factor's eigenbasis, as :class:`Eigen` declares it)."""


def ordered_basis(Q_A: Mapping[str, Array], Q_S: Mapping[str, Array], selection: Selection) -> dict[str, dict]:
    """Per block, the eigenbases with their columns in the selection's order: ``{"Q_A": [*lead, d_in', d_in'],
    "Q_S": [*lead, d_out, d_out]}`` (the context of :func:`index_statistic`)."""

    def take(Q, idx):
        return jnp.take_along_axis(Q, idx[..., None, :], axis=-1)

    return {k: {"Q_A": take(Q_A[k], selection.cols[k]), "Q_S": take(Q_S[k], selection.rows[k])} for k in selection.rows}


def gradient_energy(a: Array, g: Array, precision=None) -> Array:
    """``||G[n]||_F^2 = sum_{t,t'} (a_t . a_t') (g_t . g_t')`` per sequence ``[B]``, from the tokens' Gram matrices
    (``T^2 (d_in' + d_out)`` products per sequence instead of the ``T d_out d_in'`` of forming ``G[n]``)."""
    precision = matmul_precision(precision)
    Ka = jnp.einsum("bti,bsi->bts", a, a, precision=precision)
    Kg = jnp.einsum("bto,bso->bts", g, g, precision=precision)
    return jnp.sum(Ka * Kg, axis=(-2, -1))


def band_energies(
    a: Array, g: Array, rows: list[tuple[int, int]], cols: list[tuple[int, int]], precision=None
) -> Array:
    """``||R_n[band_i, band_j]||_F^2`` for every pair of a row band of ``S`` and a column band of ``A``:
    ``[B, bands_S, bands_A]``, from the rotated tokens ``a`` (``Q_A^T a``) and ``g`` (``Q_S^T g``) by
    :func:`gradient_energy` of each band's coordinates."""
    precision = matmul_precision(precision)
    Ka = jnp.stack(
        [jnp.einsum("bti,bsi->bts", a[..., lo:hi], a[..., lo:hi], precision=precision) for lo, hi in cols], axis=1
    )
    Kg = jnp.stack(
        [jnp.einsum("bto,bso->bts", g[..., lo:hi], g[..., lo:hi], precision=precision) for lo, hi in rows], axis=1
    )
    return jnp.einsum("bits,bjts->bij", Kg, Ka, precision=precision)


def index_statistic(
    a: Array, g: Array, mask: Array, basis: Mapping[str, Array], *, k: int | None, dtype=None, precision=None
) -> dict[str, Array]:
    """One layer's index rows of a batch: the kept block ``R_n[:k_S, :k_A]`` of ``R_n = Q_S^T G[n] Q_A`` (directions
    in decreasing eigenvalue) ``[B, k_S, k_A]``, and the energy of every pair of :func:`bands`
    ``[B, bands_S, bands_A]`` (the kept block's is ``[0, 0]``; they add up to ``||G[n]||_F^2``).

    ``basis``: the layer's :func:`ordered_basis`. Computed in ``dtype`` (by default the working dtype of ``a``, ``g``)
    at the matmul ``precision`` (:func:`~jaxinf.engine.precision.matmul_precision`)."""
    dtype = working_dtype(a, g) if dtype is None else dtype
    p = matmul_precision(precision)
    a = jnp.einsum("bti,ij->btj", a.astype(dtype), basis["Q_A"].astype(dtype), precision=p)
    g = jnp.einsum("bto,op->btp", g.astype(dtype), basis["Q_S"].astype(dtype), precision=p)
    k_S, k_A = kept_size(k, g.shape[-1]), kept_size(k, a.shape[-1])
    block = jnp.einsum("btp,btj->bpj", g[..., :k_S], a[..., :k_A], precision=p)
    return {"cells": block, "bands": band_energies(a, g, bands(k_S, g.shape[-1]), bands(k_A, a.shape[-1]), p)}


def index_from_rotated(R: Array, rows: Array, cols: Array, *, k: int | None) -> dict[str, Array]:
    """:func:`index_statistic`'s rows of one layer from its documents' rotated gradients ``R_n = Q_S^T G[n] Q_A``
    ``[B, d_out, d_in']`` in the eigenbasis's own order, as the Lambda pass forms them: the directions taken in the
    selection's order (``rows`` ``[d_out]``, ``cols`` ``[d_in']``, :func:`select_cells`), the kept block
    ``R_n[:k_S, :k_A]``, and each pair of bands' energy as the sum of ``R_n^2`` over its cells. The same rows at no
    second rotation: a pass that has ``R_n`` adds a gather and these sums."""
    R = jnp.take(jnp.take(R, rows, axis=-2), cols, axis=-1)
    k_S, k_A = kept_size(k, R.shape[-2]), kept_size(k, R.shape[-1])
    R2 = R * R
    by_rows = jnp.stack([R2[:, lo:hi].sum(axis=1) for lo, hi in bands(k_S, R.shape[-2])], axis=1)
    energies = jnp.stack([by_rows[..., lo:hi].sum(axis=-1) for lo, hi in bands(k_A, R.shape[-1])], axis=-1)
    return {"cells": R[:, :k_S, :k_A], "bands": energies}


def lambda_and_index_statistic(
    a: Array, g: Array, mask: Array, context: Mapping[str, Array], *, k: int | None, dtype=None, precision=None
) -> dict[str, dict[str, Array]]:
    """One layer's Lambda sums and index rows from one rotation: ``R_n = Q_S^T G[n] Q_A``
    (:func:`~jaxinf.engine.curvature.rotated_gradient`), then ``{"lambda":``
    :func:`~jaxinf.engine.curvature.lambda_sums` ``, "index":`` :func:`index_from_rotated` ``}``. ``context``: the
    layer's eigenbases ``Q_A``, ``Q_S`` and its selection's ``rows``, ``cols``."""
    from jaxinf.engine.curvature import lambda_sums, rotated_gradient
    from jaxinf.sharding.partitioning import constrain

    dtype = working_dtype(a, g) if dtype is None else dtype
    R = constrain(rotated_gradient(a, g, context["Q_A"], context["Q_S"], dtype, precision), ("batch", "rows", "cols"))
    return {
        "lambda": lambda_sums(R, mask, precision),
        "index": index_from_rotated(R, context["rows"], context["cols"], k=k),
    }


def rows_first(x: Array, lead: int, trailing: int) -> Array:
    """``[*lead, B, *trailing]`` -> ``[B, prod(lead) * prod(trailing)]`` (a block's entries of one row, in order)."""
    x = jnp.moveaxis(x, lead, 0)
    return x.reshape(x.shape[0], -1) if x.ndim > 1 else x[:, None]


def flatten_rows(blocks: Mapping[str, Mapping[str, Array]], layers: Mapping[str, LayerSpec]) -> dict[str, Array]:
    """Per-block :func:`index_statistic` results (``[*lead, B, ...]``) as one row per sequence: ``cells``
    ``[B, C]`` (blocks in name order, each ``[*lead, k_S, k_A]`` flattened) and ``bands`` ``[B, E]`` (each block's
    ``[*lead, bands_S, bands_A]`` flattened)."""
    names = sorted(layers)
    lead = {k: len(layers[k].lead) for k in names}
    return {
        key: jnp.concatenate([rows_first(blocks[k][key], lead[k], 2) for k in names], axis=1)
        for key in ("cells", "bands")
    }


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IndexQueries:
    """Queries in index space: ``cells`` ``[Q, C]`` (the kept block of ``Pr_q = Q_S^T P(G_q) Q_A``, laid out as the
    index's rows), ``rest`` ``[Q, E]`` (``||Pr_q[band_i, band_j]||_F`` of every pair of bands, 0 for the kept block)
    and ``fidelity`` ``[Q]`` (:func:`predicted_correlation`)."""

    cells: Array
    rest: Array
    fidelity: Array


def rotated_queries(
    qg: QueryGradients, Q_A: Mapping[str, Array], Q_S: Mapping[str, Array], precision=None
) -> dict[str, Array]:
    """``Pr_q = Q_S^T P(G_q) Q_A`` per block ``[*lead, Q, d_out, d_in']``; a rank-r ``P = left right^T`` is rotated
    as ``(Q_S^T left)(Q_A^T right)^T``."""
    mm = functools.partial(jnp.matmul, precision=matmul_precision(precision))
    out = {}
    for k in list(qg.full) + list(qg.left):
        QA, QS = jnp.expand_dims(Q_A[k], -3), jnp.expand_dims(Q_S[k], -3)
        if k in qg.full:
            P = qg.full[k].astype(QA.dtype)
            out[k] = mm(mm(jnp.swapaxes(QS, -1, -2), P), QA)
        else:
            left = mm(jnp.swapaxes(QS, -1, -2), qg.left[k].astype(QS.dtype))
            right = mm(jnp.swapaxes(QA, -1, -2), qg.right[k].astype(QA.dtype))
            out[k] = mm(left, jnp.swapaxes(right, -1, -2))
    return out


def predicted_correlation(kept: Array | float, total: Array | float) -> Array:
    """``rho_q = sqrt(sum_kept Pr_q^2 Lambda / sum_all Pr_q^2 Lambda)``: the correlation over documents of index and
    exact scores if the rotated document gradients had independent entries of variance ``Lambda`` (1 where the
    query has no curvature-weighted energy)."""
    return jnp.where(total > 0, jnp.sqrt(jnp.clip(kept / jnp.where(total > 0, total, 1), 0, 1)), 1.0)


def band_sums(x: Array, rows: list[tuple[int, int]], cols: list[tuple[int, int]]) -> Array:
    """``sum x[band_i, band_j]`` over the last two axes: ``[..., bands_S, bands_A]``."""
    return jnp.stack([jnp.stack([x[..., r0:r1, c0:c1].sum((-2, -1)) for c0, c1 in cols], -1) for r0, r1 in rows], -2)


def index_queries(
    qg: QueryGradients,
    Q_A: Mapping[str, Array],
    Q_S: Mapping[str, Array],
    variance: Mapping[str, Array],
    selection: Selection,
    layers: Mapping[str, LayerSpec],
    k: int | None,
    precision=None,
) -> IndexQueries:
    """Prepared queries (:class:`~jaxinf.engine.scoring.QueryGradients`, damping and truncation already applied) in index
    space for an index keeping ``k`` directions per factor: the kept cells of ``Pr_q``, the norm of each other pair
    of bands, and the predicted correlation with the exact scores under ``variance`` (the fitted ``Lambda``)."""
    basis = ordered_basis(Q_A, Q_S, selection)
    Pr = rotated_queries(
        qg, {n: b["Q_A"] for n, b in basis.items()}, {n: b["Q_S"] for n, b in basis.items()}, precision
    )
    cells: list[Array] = []
    rest: list[Array] = []
    num: Array | float = 0.0
    den: Array | float = 0.0
    for name in sorted(layers):
        lead, s = len(layers[name].lead), layers[name]
        k_S, k_A = kept_size(k, s.d_out), kept_size(k, s.d_in_aug)
        P = Pr[name]
        cells.append(rows_first(P[..., :k_S, :k_A], lead, 2))
        norms = jnp.sqrt(band_sums(P * P, bands(k_S, s.d_out), bands(k_A, s.d_in_aug)))
        rest.append(rows_first(norms.at[..., 0, 0].set(0.0), lead, 2))
        var = jnp.take_along_axis(variance[name], selection.rows[name][..., :, None], axis=-2)
        var = jnp.expand_dims(jnp.take_along_axis(var, selection.cols[name][..., None, :], axis=-1), -3)
        weighted = P * P * var.astype(P.dtype)
        axes = tuple(range(lead)) + (lead + 1, lead + 2)
        den = den + jnp.sum(weighted, axis=axes)
        num = num + jnp.sum(weighted[..., :k_S, :k_A], axis=axes)
    return IndexQueries(
        cells=jnp.concatenate(cells, axis=1),
        rest=jnp.concatenate(rest, axis=1),
        fidelity=predicted_correlation(num, den),
    )


RESOLUTION = {"float32": 2.0**-20, "float16": 2.0**-8}
"""Relative round-off allowed for in each row's residual energy (:func:`residual_norms`): the
storage dtype's resolution with a few bits of headroom for the sums that formed the energies."""


def residual_norms(bands: np.ndarray, eps: float) -> np.ndarray:
    """``||R_n[band_i, band_j]||_F`` per row and pair of bands ``[R, E]``, with ``eps`` times the row's whole energy
    added under the root for the round-off of the Gram sums that formed them, so the bound holds."""
    bands = bands.astype(np.float64)
    total = np.abs(bands).sum(axis=1, keepdims=True)
    return np.sqrt(np.maximum(bands, 0.0) + eps * total)


def index_scores(queries: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """``[Q, R]``: ``sum_kept Pr_q R_n`` of every stored row against every query (one matrix product)."""
    return queries @ cells.T


def score_bounds(rest_q: np.ndarray, rest_n: np.ndarray) -> np.ndarray:
    """``[Q, R]``: ``sum_layers sum_(i,j) != kept ||Pr_q[band_i, band_j]||_F ||R_n[band_i, band_j]||_F``, a bound on
    ``|exact - index|`` of every pair (Cauchy-Schwarz on each pair of bands)."""
    return rest_q @ rest_n.T


def certify_candidates(scores: np.ndarray, bounds: np.ndarray, k: int) -> np.ndarray:
    """Documents that may belong to some query's exact top or bottom ``k``, given index ``scores`` and ``bounds``
    ``[Q, N]``: those whose interval ``[s - b, s + b]`` reaches the k-th best lower bound (top) or the k-th best
    upper bound (bottom). Every other document is certainly outside both tails, so scoring the candidates exactly
    gives the exact tails. Returns a boolean ``[N]`` mask (the union over queries and tails)."""
    N = scores.shape[1]
    k = min(k, N)
    lower, upper = scores - bounds, scores + bounds
    kth_lower = -np.partition(-lower, k - 1, axis=1)[:, k - 1 : k]  # the k-th largest lower bound
    kth_upper = np.partition(upper, k - 1, axis=1)[:, k - 1 : k]  # the k-th smallest upper bound
    return ((upper >= kth_lower) | (lower <= kth_upper)).any(axis=0)
