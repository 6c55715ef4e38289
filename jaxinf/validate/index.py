"""The EK-FAC index in ``jaxinf validate``: a strategy beside exact EK-FAC, and how close it comes at each size.

- The strategy ``ekfac-index`` (in ``validate.strategies``) is EK-FAC's scores as the index keeping ``index.k``
  directions per factor gives them (:mod:`jaxinf.engine.indexing`: the kept cells of every document's rotated
  gradient against the queries' rotated, damped gradients), before any certification: what LDS, recall and PBRF
  see is the approximation itself. With ``index.k: full`` it equals EK-FAC.
- The fidelity table (``validate.index_ks``, and ``index.k`` when ``ekfac-index`` is compared) sets three
  methods that store the same number of cells per document against exact EK-FAC at the primary damping:

  ``ekfac-index``       the index (the ``k_S k_A`` cells of the largest ``e_S e_A``,
                        :func:`jaxinf.engine.indexing.kept_cells`);
  ``kfac-eigenvalues``  the same cells with the queries preconditioned by K-FAC's eigenvalues ``e_S e_A``
                        instead of ``Lambda`` (LoGra's PCA projection, preconditioned in its own basis);
  ``random-kronecker``  a random Kronecker projection ``P_S G[n] P_A^T`` (``P`` Gaussian, entries of variance
                        ``1/k``, so ``E[P^T P] = I``), as the projected gradient indexes of bergson and LoGra
                        store them, scored against the projected preconditioned queries.

  Per method and ``k``: per query Pearson and Spearman over all documents, the overlap of the top and of the
  bottom 10 and 100 documents (each at most half the documents), and for the index its predicted correlation
  (:func:`jaxinf.engine.indexing.predicted_correlation`) beside the observed one.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from jaxinf.analysis.correlations import pearson, spearman, topk_overlap
from jaxinf.engine import curvature, indexing, stages
from jaxinf.engine.capture import LayerSpec
from jaxinf.engine.scoring import QueryGradients

INDEX_STRATEGY = "ekfac-index"
METHODS = ("ekfac-index", "kfac-eigenvalues", "random-kronecker")
TAILS = (10, 100)


def fitted_strategy(name: str) -> curvature.Strategy:
    """The curvature strategy whose fit a validated strategy uses (``ekfac-index``: EK-FAC's)."""
    return curvature.strategy("ekfac" if name == INDEX_STRATEGY else name)


def document_rows(
    task,
    layers: Mapping[str, LayerSpec],
    params,
    batches: list,
    basis: Mapping[str, dict],
    k: int | None,
    dtype: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """``([N, C], [N, E])``: every document's kept cells in ``basis`` (the index pass,
    :func:`jaxinf.engine.stages.index_step`, over in-memory batches of whole documents), rounded to the storage
    ``dtype`` (``index.dtype``), and the energies of its pairs of bands."""
    step = jax.jit(stages.index_step(task, layers, k))
    out = [step(params, basis, b) for b in batches]
    rows = np.concatenate([np.asarray(o["cells"]) for o in out]).astype(dtype).astype(np.float64)
    return rows, np.concatenate([np.asarray(o["bands"], np.float64) for o in out])


def eigen_basis(curv: curvature.Curvature, eigen, k: int | None) -> tuple[dict[str, dict], indexing.Selection]:
    """The index's basis (eigenvectors in decreasing eigenvalue, the cells kept at ``k``) and its selection."""
    selection = indexing.select_cells(eigen, k)
    assert curv.Q_A is not None and curv.Q_S is not None
    return indexing.ordered_basis(curv.Q_A, curv.Q_S, selection), selection


def random_basis(layers: Mapping[str, LayerSpec], k: int, seed: int) -> dict[str, dict]:
    """Per block, Gaussian ``P_A^T`` ``[*lead, d_in', k_A]`` and ``P_S^T`` ``[*lead, d_out, k_S]`` with entries of
    variance ``1/k`` (the random Kronecker projection at the index's cell count)."""
    out = {}
    key = jax.random.key(seed)
    for name in sorted(layers):
        s = layers[name]
        k_S, k_A = indexing.kept_size(k, s.d_out), indexing.kept_size(k, s.d_in_aug)
        key, ka, ks = jax.random.split(key, 3)
        out[name] = {
            "Q_A": jax.random.normal(ka, (*s.lead, s.d_in_aug, k_A), np.dtype(s.dtype)) / np.sqrt(k_A),
            "Q_S": jax.random.normal(ks, (*s.lead, s.d_out, k_S), np.dtype(s.dtype)) / np.sqrt(k_S),
        }
    return out


def projected_queries(qg: QueryGradients, basis: Mapping[str, dict], layers: Mapping[str, LayerSpec]) -> np.ndarray:
    """``[Q, C]``: the prepared queries projected by ``basis`` (``P_S P(G_q) P_A^T``, every cell of the projected
    block), laid out as the rows of :func:`document_rows` in the same basis."""
    P = indexing.rotated_queries(qg, {n: b["Q_A"] for n, b in basis.items()}, {n: b["Q_S"] for n, b in basis.items()})
    return np.concatenate(
        [
            np.asarray(indexing.rows_first(P[n].reshape(*P[n].shape[:-2], -1), len(layers[n].lead), 1), np.float64)
            for n in sorted(layers)
        ],
        axis=1,
    )


def index_queries(
    qg: QueryGradients,
    curv: curvature.Curvature,
    selection: indexing.Selection,
    layers: Mapping[str, LayerSpec],
    k: int | None,
) -> indexing.IndexQueries:
    """The prepared queries in index space (:func:`jaxinf.engine.indexing.index_queries`) under ``curv``'s basis."""
    assert curv.Q_A is not None and curv.Q_S is not None and curv.Lambda is not None
    return indexing.index_queries(qg, curv.Q_A, curv.Q_S, curv.Lambda, selection, layers, k)


def index_scores(
    qg: QueryGradients,
    curv: curvature.Curvature,
    selection: indexing.Selection,
    layers: Mapping[str, LayerSpec],
    k: int | None,
    rows: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """``([Q, N] scores, [Q] predicted correlation)`` of the prepared queries against the index ``rows``."""
    iq = index_queries(qg, curv, selection, layers, k)
    return indexing.index_scores(np.asarray(iq.cells, np.float64), rows), np.asarray(iq.fidelity, np.float64)


def rescored_share(
    iq: indexing.IndexQueries, scores: np.ndarray, bands: np.ndarray, dtype: str, k: int, exact: np.ndarray
) -> float:
    """The share of the documents that certification scores exactly again (:func:`jaxinf.engine.indexing.certify`'s
    two rounds, the union over queries, with ``exact`` ``[Q, N]`` as the rescoring) so that every query's top and
    bottom ``k`` are exact."""
    rest = indexing.residual_norms(bands, indexing.RESOLUTION[dtype])
    bounds = indexing.score_bounds(np.asarray(iq.rest, np.float64), rest)
    if not np.any(bounds > 0):
        return 0.0  # nothing left out (a full index): the run rescores nothing either
    return float(indexing.certify(scores, bounds, k, lambda docs: exact[:, docs])[2].mean())


def tails(n_documents: int) -> dict[int, int]:
    """Each tail of :data:`TAILS` as compared over ``n_documents``: at most half of them."""
    return {t: min(t, n_documents // 2) for t in TAILS}


def fidelity(exact: np.ndarray, approx: np.ndarray, predicted: np.ndarray | None = None) -> dict:
    """Per query and on average, how ``approx`` ``[Q, N]`` follows ``exact``: Pearson, Spearman, the overlap of the
    top and bottom :data:`TAILS` documents (each at most half of them), and the predicted correlation if given."""
    N = exact.shape[1]
    per_query: dict[str, list] = {
        "pearson": [pearson(a, e) for a, e in zip(approx, exact)],
        "spearman": [spearman(a, e) for a, e in zip(approx, exact)],
    }
    for t, k in tails(N).items():
        per_query[f"top{t}"] = [topk_overlap(a, e, k) for a, e in zip(approx, exact)]
        per_query[f"bottom{t}"] = [topk_overlap(-a, -e, k) for a, e in zip(approx, exact)]
    if predicted is not None:
        per_query["predicted"] = [float(x) for x in predicted]
    mean = {name: float(np.nanmean(v)) if np.isfinite(v).any() else None for name, v in per_query.items()}
    minimum = {name: float(np.nanmin(v)) if np.isfinite(v).any() else None for name, v in per_query.items()}
    return {"mean": mean, "min": minimum, "per_query": per_query, "tails": {str(t): k for t, k in tails(N).items()}}


def fidelity_table(
    task,
    layers: Mapping[str, LayerSpec],
    params,
    batches: list,
    G,
    qloss,
    curv,
    eigen,
    damping: float | None,
    ks: list,
    exact: np.ndarray,
    seed: int,
    dtype: str = "float32",
) -> dict:
    """The table of the module docstring: ``{str(k): {method: fidelity, "cells": cells per document}}``."""
    from jaxinf.engine import scoring

    kfac = curvature.curvature("kfac", eigen, curvature.kfac_lambda(eigen))  # Lambda = e_S e_A: no fit
    qg = scoring.prepare_queries(G, qloss, curv, damping, None)
    qg_kfac = scoring.prepare_queries(G, qloss, kfac, damping, None)
    out: dict = {}
    for k_value in ks:
        k = indexing.kept_directions(k_value)
        basis, selection = eigen_basis(curv, eigen, k)
        rows, bands = document_rows(task, layers, params, batches, basis, k, dtype)
        iq = index_queries(qg, curv, selection, layers, k)
        s_index = indexing.index_scores(np.asarray(iq.cells, np.float64), rows)
        s_kfac, _ = index_scores(qg_kfac, curv, selection, layers, k, rows)
        entry = {
            "cells": int(rows.shape[1]),
            "ekfac-index": {
                **fidelity(exact, s_index, np.asarray(iq.fidelity, np.float64)),
                "rescored": {
                    str(t): rescored_share(iq, s_index, bands, dtype, t_k, exact)
                    for t, t_k in tails(exact.shape[1]).items()
                },
            },
            "kfac-eigenvalues": fidelity(exact, s_kfac),
        }
        if k is not None:
            rand = random_basis(layers, k, seed)
            s_rand = (
                projected_queries(qg, rand, layers) @ document_rows(task, layers, params, batches, rand, k, dtype)[0].T
            )
            entry["random-kronecker"] = fidelity(exact, s_rand)
        out[str(k_value)] = entry
    return out
