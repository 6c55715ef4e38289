"""The EK-FAC index: each document's gradient kept in the Kronecker eigenbasis, so new queries need no pass
over the corpus.

For a tracked layer the influence of document n on query q is (:mod:`jaxinf.engine.scoring`)

    <P(G_q), G[n]>_F = sum_ij  Pr_q[i, j] R_n[i, j],     Pr_q = Q_S^T P(G_q) Q_A,   R_n = Q_S^T G[n] Q_A

because ``Q_S`` and ``Q_A`` are orthogonal. The index stores, per document and layer, the ``k_S k_A`` cells of
``R_n`` whose K-FAC eigenvalues ``e_S[i] e_A[j]`` are the largest (:func:`kept_cells`: a staircase in the
directions of decreasing eigenvalue, not a square block, so a few dominant directions of one factor are kept with
many of the other's) and the energy of the rest, band by band (``||G[n]||_F^2 = ||R_n||_F^2`` in all).
Nothing about the queries, the damping or the eigenvalue correction is baked in: a query set, a damping
sweep, or K-FAC instead of EK-FAC, is one matrix product against the stored blocks
(:func:`index_scores`).

What the block leaves out is bounded. By Cauchy-Schwarz, per layer,

    |exact - index| = |sum_{ij not kept} Pr_q[i, j] R_n[i, j]|
                    <= sum_{bands (b, c)} ||Pr_q[b, c] off the kept cells||_F ||R_n[b, c] off the kept cells||_F

with the directions cut into :func:`bands` of growing width past the kept ones; the index stores each
document's energy in every pair of bands (:func:`score_bounds`). Documents whose bound
reaches across a query's k-th score are scored exactly again (:func:`certify_candidates`; :func:`certify` first
rescores each query's likeliest top and bottom, whose exact scores narrow the reach), so the top and
bottom k reported are exactly EK-FAC's. With every cell kept the bound is 0 and the index scores are the
exact scores.

A query's expected fidelity follows from EK-FAC's own model of the rotated gradients (independent entries of
variance ``Lambda``): the correlation over documents of index and exact scores is

    rho_q = sqrt( sum_kept Pr_q^2 Lambda / sum_all Pr_q^2 Lambda )          (:func:`predicted_correlation`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.engine.capture import LayerSpec
from jaxinf.engine.curvature.eigen import Eigen
from jaxinf.engine.precision import matmul_precision, working_dtype
from jaxinf.engine.scoring import QueryGradients
from jaxinf.sharding.axes import REPLICATED, field_axes

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
    """The eigen-directions of every block ordered by decreasing eigenvalue, ``rows`` ``[*lead, d_out]`` (columns
    of ``Q_S``) and ``cols`` ``[*lead, d_in']`` (columns of ``Q_A``), and the cells the index keeps in that order:
    ``cells`` ``[*lead, k_S k_A]``, flat positions ``i * d_in' + j`` (:func:`kept_cells`). Every other cell falls
    into :func:`bands`."""

    rows: dict[str, Array]
    cols: dict[str, Array]
    cells: dict[str, Array]


def block_sizes(layers: Mapping[str, LayerSpec], k: int | None) -> dict[str, tuple[int, int]]:
    """``(k_S, k_A)`` of each block: ``min(k, d_out)``, ``min(k, d_in')`` (``k=None``: every direction). The index
    keeps ``k_S k_A`` cells of the block (:func:`kept_cells`), and its :func:`bands` start at ``k_S`` and ``k_A``."""
    return {name: (kept_size(k, s.d_out), kept_size(k, s.d_in_aug)) for name, s in layers.items()}


def kept_directions(k: int | str | None) -> int | None:
    """``index.k`` as the directions kept per factor: an integer, or None for ``full`` (every direction)."""
    return None if isinstance(k, str) else k  # a string is "full" (config validation)


def kept_size(k: int | None, d: int) -> int:
    """Directions kept of a factor of ``d`` (``k=None``: all of them)."""
    return d if k is None else min(k, d)


def candidate_cells(n: int, d_out: int, d_in: int) -> np.ndarray:
    """The flat positions ``i * d_in' + j`` (row-major) of every cell that can be among the ``n`` kept
    (:func:`kept_cells`): those with ``(i + 1)(j + 1) <= n``. With both spectra in decreasing order, every cell above
    and to the left of a cell has at least its ``e_S e_A`` and an earlier position, so a kept cell brings its whole
    ``(i + 1) x (j + 1)`` corner along: about ``n ln n`` candidates, not ``d_out d_in'``."""
    rows = np.arange(min(n, d_out))
    widths = np.minimum(n // (rows + 1), d_in)
    return np.concatenate([i * d_in + np.arange(w) for i, w in zip(rows, widths)]).astype(np.int32)


def kept_cells(e_S: Array, e_A: Array, k: int | None) -> Array:
    """The cells the index keeps of a block whose eigenvalues, in decreasing order, are ``e_S`` ``[*lead, d_out]``
    and ``e_A`` ``[*lead, d_in']``: the ``n = k_S k_A`` cells ``(i, j)`` with the largest ``e_S[i] e_A[j]``
    (negative round-off clipped to 0; ties by position), as flat positions ``i * d_in' + j`` in increasing order
    ``[*lead, n]`` (every cell, in place, for a full index).

    ``e_S[i] e_A[j]`` is K-FAC's variance of cell ``(i, j)`` of a rotated gradient, known before the Lambda pass
    (which may write the index) begins. The kept cells form a staircase, not the square block of the ``k`` first
    directions of each factor: where one factor's first eigenvalues dwarf the rest, its first directions are kept
    with many of the other's. On factors whose spectra decay, as trained models' do, that keeps far more of a query's
    curvature-weighted energy in the same bytes (docs/benchmarks.md)."""
    d_out, d_in = e_S.shape[-1], e_A.shape[-1]
    n = kept_size(k, d_out) * kept_size(k, d_in)
    if n == d_out * d_in:
        return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (*e_S.shape[:-1], n))
    candidates = candidate_cells(n, d_out, d_in)
    P = jnp.maximum(e_S[..., candidates // d_in], 0) * jnp.maximum(e_A[..., candidates % d_in], 0)
    order = jnp.argsort(-P, axis=-1, stable=True)[..., :n]  # candidates are in position order: ties by position
    return jnp.sort(jnp.take(jnp.asarray(candidates), order), axis=-1)


def bands(k: int, d: int) -> list[tuple[int, int]]:
    """The eigen-directions ``0 .. d-1`` (decreasing eigenvalue) cut into bands: the first ``[0, k)``, then
    ``[k, 2k)``, ``[2k, 4k)``, ... (each twice the last) up to ``d``. The bound on a score's error is a
    Cauchy-Schwarz inequality per pair of bands over the cells not kept, so it is tight where a query's and a
    document's left-over energy sit in the same bands, and costs one stored number per pair."""
    out, lo, width = [(0, k)], k, k
    while lo < d:
        out.append((lo, min(lo + width, d)))
        lo, width = lo + width, 2 * width
    return out


def select_cells(eigen: Eigen, k: int | None) -> Selection:
    """Every block's eigen-directions of ``S`` and ``A`` ordered by decreasing eigenvalue, and the cells an index
    keeping ``k_S k_A`` of them keeps (:func:`kept_cells`)."""

    def order(e):
        return jnp.argsort(-e, axis=-1, stable=True).astype(jnp.int32)

    rows = {name: order(v) for name, v in eigen.e_S.items()}
    cols = {name: order(v) for name, v in eigen.e_A.items()}
    cells = {
        name: kept_cells(
            jnp.take_along_axis(eigen.e_S[name], rows[name], axis=-1),
            jnp.take_along_axis(eigen.e_A[name], cols[name], axis=-1),
            k,
        )
        for name in rows
    }
    return Selection(rows=rows, cols=cols, cells=cells)


BASIS_AXES = field_axes(Eigen, "Q_A")
"""The layout of an :func:`ordered_basis`'s eigenbases (a factor's eigenbasis, as :class:`Eigen` declares it)."""


def basis_axes(basis: Mapping[str, Mapping[str, Array]]) -> dict[str, dict]:
    """The declared layout of an :func:`ordered_basis`: the eigenbases as :class:`Eigen` lays them out, the kept
    cells' positions (a few integers per layer) on every device."""
    return {name: {key: (REPLICATED if key == "cells" else BASIS_AXES) for key in b} for name, b in basis.items()}


def ordered_basis(Q_A: Mapping[str, Array], Q_S: Mapping[str, Array], selection: Selection) -> dict[str, dict]:
    """Per block, the eigenbases with their columns in the selection's order and the kept cells: ``{"Q_A": [*lead,
    d_in', d_in'], "Q_S": [*lead, d_out, d_out], "cells": [*lead, k_S k_A]}`` (the context of
    :func:`index_statistic`)."""

    def take(Q, idx):
        return jnp.take_along_axis(Q, idx[..., None, :], axis=-1)

    return {
        k: {"Q_A": take(Q_A[k], selection.cols[k]), "Q_S": take(Q_S[k], selection.rows[k]), "cells": selection.cells[k]}
        for k in selection.rows
    }


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


def kept_mask(cells: Array, d_out: int, d_in: int) -> Array:
    """``[*lead, d_out, d_in']``: True at the kept cells (flat positions ``cells`` ``[*lead, n]``)."""
    flat = cells.reshape(-1, cells.shape[-1])
    mask = jax.vmap(lambda p: jnp.zeros(d_out * d_in, jnp.bool_).at[p].set(True))(flat)
    return mask.reshape(*cells.shape[:-1], d_out, d_in)


def kept_band_energies(kept: Array, cells: Array, d_in: int, rows: list[tuple[int, int]], cols: list[tuple[int, int]]):
    """``[B, bands_S, bands_A]``: the energy of the kept cells ``kept`` ``[B, n]`` (at flat positions ``cells``
    ``[n]`` of a block of ``d_in`` columns) in each pair of :func:`bands`."""
    bi = jnp.searchsorted(jnp.asarray([lo for lo, _ in rows]), cells // d_in, side="right") - 1
    bj = jnp.searchsorted(jnp.asarray([lo for lo, _ in cols]), cells % d_in, side="right") - 1
    sums = jax.ops.segment_sum((kept * kept).T, bi * len(cols) + bj, num_segments=len(rows) * len(cols))  # [pairs, B]
    return sums.T.reshape(kept.shape[0], len(rows), len(cols))


def index_statistic(
    a: Array, g: Array, mask: Array, basis: Mapping[str, Array], *, k: int | None, dtype=None, precision=None
) -> dict[str, Array]:
    """One layer's index rows of a batch: the kept cells of ``R_n = Q_S^T G[n] Q_A`` (directions in decreasing
    eigenvalue; ``basis["cells"]``, :func:`kept_cells`) ``[B, k_S k_A]``, and the energy off the kept cells in every pair of :func:`bands` ``[B, bands_S,
    bands_A]`` (the cells' and the bands' energies add up to ``||G[n]||_F^2``).

    ``basis``: the layer's :func:`ordered_basis`. Computed in ``dtype`` (by default the working dtype of ``a``, ``g``)
    at the matmul ``precision`` (:func:`~jaxinf.engine.precision.matmul_precision`). Cell ``(i, j)`` is
    ``sum_t (Q_S^T g_t)[i] (Q_A^T a_t)[j]``, a product over tokens of the rotated tokens' coordinates (``T`` products
    per cell and document, as many as a square block's); the bands' energies come from the tokens' Gram matrices
    (:func:`band_energies`), less the kept cells' own."""
    dtype = working_dtype(a, g) if dtype is None else dtype
    p = matmul_precision(precision)
    a = jnp.einsum("bti,ij->btj", a.astype(dtype), basis["Q_A"].astype(dtype), precision=p)
    g = jnp.einsum("bto,op->btp", g.astype(dtype), basis["Q_S"].astype(dtype), precision=p)
    d_out, d_in = g.shape[-1], a.shape[-1]
    k_S, k_A = kept_size(k, d_out), kept_size(k, d_in)
    rows, cols = bands(k_S, d_out), bands(k_A, d_in)
    if k_S * k_A == d_out * d_in:  # every cell kept, in place: the whole block, and nothing left over
        kept = jnp.einsum("btp,btj->bpj", g, a, precision=p).reshape(-1, d_out * d_in)
        return {"cells": kept, "bands": jnp.zeros((kept.shape[0], len(rows), len(cols)), kept.dtype)}
    cells = basis["cells"]
    kept = jnp.einsum("btn,btn->bn", g[..., cells // d_in], a[..., cells % d_in], precision=p)
    energies = band_energies(a, g, rows, cols, p) - kept_band_energies(kept, cells, d_in, rows, cols)
    return {"cells": kept, "bands": energies}


def index_from_rotated(R: Array, rows: Array, cols: Array, cells: Array, *, k: int | None) -> dict[str, Array]:
    """:func:`index_statistic`'s rows of one layer from its documents' rotated gradients ``R_n = Q_S^T G[n] Q_A``
    ``[B, d_out, d_in']`` in the eigenbasis's own order, as the Lambda pass forms them: the directions taken in the
    selection's order (``rows`` ``[d_out]``, ``cols`` ``[d_in']``, :func:`select_cells`), the kept ``cells``, and
    each pair of bands' energy off them as the sum of ``R_n^2`` over its other cells. The same rows at no second
    rotation: a pass that has ``R_n`` adds a gather and these sums."""
    R = jnp.take(jnp.take(R, rows, axis=-2), cols, axis=-1)
    d_out, d_in = R.shape[-2:]
    k_S, k_A = kept_size(k, d_out), kept_size(k, d_in)
    kept = jnp.take(R.reshape(-1, d_out * d_in), cells, axis=1)
    R2 = jnp.where(kept_mask(cells, d_out, d_in), 0, R * R)
    by_rows = jnp.stack([R2[:, lo:hi].sum(axis=1) for lo, hi in bands(k_S, d_out)], axis=1)
    energies = jnp.stack([by_rows[..., lo:hi].sum(axis=-1) for lo, hi in bands(k_A, d_in)], axis=-1)
    return {"cells": kept, "bands": energies}


def lambda_and_index_statistic(
    a: Array, g: Array, mask: Array, context: Mapping[str, Array], *, k: int | None, dtype=None, precision=None
) -> dict[str, dict[str, Array]]:
    """One layer's Lambda sums and index rows from one rotation: ``R_n = Q_S^T G[n] Q_A``
    (:func:`~jaxinf.engine.curvature.rotated_gradient`), then ``{"lambda":``
    :func:`~jaxinf.engine.curvature.lambda_sums` ``, "index":`` :func:`index_from_rotated` ``}``. ``context``: the
    layer's eigenbases ``Q_A``, ``Q_S`` and its selection's ``rows``, ``cols``, ``cells``."""
    from jaxinf.engine.curvature import lambda_sums, rotated_gradient
    from jaxinf.sharding.partitioning import constrain

    dtype = working_dtype(a, g) if dtype is None else dtype
    R = constrain(rotated_gradient(a, g, context["Q_A"], context["Q_S"], dtype, precision), ("batch", "rows", "cols"))
    return {
        "lambda": lambda_sums(R, mask, precision),
        "index": index_from_rotated(R, context["rows"], context["cols"], context["cells"], k=k),
    }


def rows_first(x: Array, lead: int, trailing: int) -> Array:
    """``[*lead, B, *trailing]`` -> ``[B, prod(lead) * prod(trailing)]`` (a block's entries of one row, in order)."""
    x = jnp.moveaxis(x, lead, 0)
    return x.reshape(x.shape[0], -1) if x.ndim > 1 else x[:, None]


def flatten_rows(blocks: Mapping[str, Mapping[str, Array]], layers: Mapping[str, LayerSpec]) -> dict[str, Array]:
    """Per-block :func:`index_statistic` results (``[*lead, B, ...]``) as one row per sequence: ``cells``
    ``[B, C]`` (blocks in name order, each ``[*lead, k_S k_A]`` flattened) and ``bands`` ``[B, E]`` (each block's
    ``[*lead, bands_S, bands_A]`` flattened)."""
    names = sorted(layers)
    lead = {k: len(layers[k].lead) for k in names}
    return {
        key: jnp.concatenate([rows_first(blocks[k][key], lead[k], trailing) for k in names], axis=1)
        for key, trailing in (("cells", 1), ("bands", 2))
    }


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IndexQueries:
    """Queries in index space: ``cells`` ``[Q, C]`` (the kept cells of ``Pr_q = Q_S^T P(G_q) Q_A``, laid out as the
    index's rows), ``rest`` ``[Q, E]`` (``||Pr_q[band_i, band_j]||_F`` off the kept cells, every pair of bands) and
    ``fidelity`` ``[Q]`` (:func:`predicted_correlation`)."""

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


def take_cells(x: Array, cells: Array) -> Array:
    """``x`` ``[*lead, Q, d_out, d_in']`` at each block's kept cells ``cells`` ``[*lead, n]``: ``[*lead, Q, n]``."""
    return jnp.take_along_axis(x.reshape(*x.shape[:-2], -1), jnp.expand_dims(cells, -2), axis=-1)


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
    space for an index keeping ``k_S k_A`` cells per block (``selection.cells``): the kept cells of ``Pr_q``, the norm
    off them in each pair of bands, and the predicted correlation with the exact scores under ``variance`` (the
    fitted ``Lambda``)."""
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
        P, at = Pr[name], selection.cells[name]  # [*lead, Q, d_out, d_in'], [*lead, n]
        cells.append(rows_first(take_cells(P, at), lead, 1))
        left = jnp.where(jnp.expand_dims(kept_mask(at, s.d_out, s.d_in_aug), -3), 0, P * P)
        rest.append(rows_first(jnp.sqrt(band_sums(left, bands(k_S, s.d_out), bands(k_A, s.d_in_aug))), lead, 2))
        var = jnp.take_along_axis(variance[name], selection.rows[name][..., :, None], axis=-2)
        var = jnp.expand_dims(jnp.take_along_axis(var, selection.cols[name][..., None, :], axis=-1), -3)
        weighted = P * P * var.astype(P.dtype)
        axes = tuple(range(lead)) + (lead + 1, lead + 2)
        den = den + jnp.sum(weighted, axis=axes)
        num = num + jnp.sum(take_cells(weighted, at), axis=tuple(range(lead)) + (lead + 1,))
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


def likely_tails(scores: np.ndarray, k: int) -> np.ndarray:
    """``[N]``: the documents among some query's ``k`` highest or ``k`` lowest ``scores`` ``[Q, N]`` (index scores).
    Each is a candidate of :func:`certify_candidates` whatever the bounds (its upper bound is at least its score, which
    is at least the k-th largest lower bound; and the reverse for the bottom)."""
    N = scores.shape[1]
    k = min(k, N)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    bottom = np.argpartition(scores, k - 1, axis=1)[:, :k]
    mask = np.zeros(N, bool)
    mask[top.ravel()] = True
    mask[bottom.ravel()] = True
    return mask


def certify(
    scores: np.ndarray, bounds: np.ndarray, k: int, rescore: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Every query's exact top and bottom ``k`` from index ``scores`` and ``bounds`` ``[Q, N]``, with ``rescore(docs)``
    (the exact scores ``[Q, len(docs)]`` of the documents ``docs``) called in two rounds:

    1. the :func:`likely_tails`, candidates whatever the bounds. Their exact scores have bound 0, which raises each
       query's k-th best lower bound (and lowers its k-th best upper bound) to about the k-th score;
    2. the documents :func:`certify_candidates` still finds in reach of those, not rescored yet.

    A subset of the one round of :func:`certify_candidates` on the index bounds (bounds only shrink), so never more
    documents rescored, and fewer where the bounds are wide against the gaps between scores. Returns the scores and
    bounds with the rescored documents' columns exact (bound 0), the mask of the rescored ``[N]``, and how many each
    round rescored."""
    scores, bounds = np.array(scores, np.float64), np.array(bounds, np.float64)
    done = np.zeros(scores.shape[1], bool)
    counts = []
    for wanted in (lambda: likely_tails(scores, k), lambda: certify_candidates(scores, bounds, k)):
        docs = np.flatnonzero(wanted() & ~done)
        if docs.size:
            scores[:, docs] = rescore(docs)
            bounds[:, docs] = 0.0
            done[docs] = True
        counts.append(int(docs.size))
    return scores, bounds, done, counts
