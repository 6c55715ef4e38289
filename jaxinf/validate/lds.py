"""The linear datamodeling score (LDS; Park et al. 2023, the convention of kronfluence and dattri).

For query q and subsets S_1 .. S_M of the documents, the scores predict the
measurement of a model retrained on S_m by the group influence
``pred[m, q] = sum_{n in S_m} I(q, n)``; the actual outcome is the query's
log-probability under the retrained models, ``actual[m, q] = -mean_seeds
measurement_q(theta_{S_m, seed})`` (minus the NLL: positive influence means
the document raised the completion's log-probability). The LDS of a query is
the Spearman rank correlation of ``pred[:, q]`` and ``actual[:, q]`` over the
M subsets; the score of a method is its mean over queries.

Its 95% interval (:func:`bootstrap_ci95`) resamples the retrainings (the
subsets, each with its seeds' mean), not the queries: every query's LDS is
measured on the same retrained models, so the queries' values are not
independent draws. The Student-t interval over queries (:func:`mean_ci95`) is
kept beside it as ``ci95_queries``.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from jaxinf.analysis.correlations import spearman


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties sharing their mean rank."""
    return stats.rankdata(x, axis=-1)


def group_predictions(scores: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """``pred[m, q] = sum_{n in S_m} scores[q, n]`` for ``scores`` ``[Q, N]`` and subsets ``[M, size]``: ``[M, Q]``."""
    return np.stack([scores[:, s].sum(1) for s in subsets])


def lds_per_query(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman over subsets, per query: ``predicted``, ``actual`` ``[M, Q]`` -> ``[Q]``."""
    return np.asarray([spearman(predicted[:, q], actual[:, q]) for q in range(predicted.shape[1])])


def mean_ci95(values: np.ndarray) -> tuple[float, tuple[float, float]]:
    """Mean over the finite values and its 95% Student-t interval ``mean -/+ t_{0.975, n-1} s / sqrt(n)``."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), (float("nan"), float("nan"))
    mean = float(v.mean())
    if v.size < 2:
        return mean, (float("nan"), float("nan"))
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return mean, (mean - half, mean + half)


BOOTSTRAP_CHUNK = 2**22
"""Elements (resamples x queries x subsets) of the rank arrays :func:`bootstrap_ci95` forms at a time."""


def _resampled_lds(predicted: np.ndarray, actual: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The LDS of each resample ``idx`` ``[B, M]`` whose value is defined for some query (:func:`bootstrap_ci95`)."""
    rp, ra = rankdata(np.moveaxis(predicted[idx], 1, -1)), rankdata(np.moveaxis(actual[idx], 1, -1))  # [B, Q, M]
    rp, ra = rp - rp.mean(-1, keepdims=True), ra - ra.mean(-1, keepdims=True)
    denom = np.sqrt((rp**2).sum(-1) * (ra**2).sum(-1))
    rho = np.where(denom > 0, (rp * ra).sum(-1) / np.where(denom > 0, denom, 1.0), np.nan)  # [B, Q]
    defined = np.isfinite(rho)
    per_resample = np.where(defined, rho, 0.0).sum(-1) / np.maximum(defined.sum(-1), 1)
    return per_resample[defined.any(-1)]


def bootstrap_ci95(
    predicted: np.ndarray, actual: np.ndarray, resamples: int, seed: int
) -> tuple[tuple[float, float], int]:
    """The 95% percentile-bootstrap interval of the LDS over the retrainings, and the number of resamples left out.

    With ``predicted``, ``actual`` ``[M, Q]`` (one row per subset), resample b draws the subsets
    ``i_b = (i_b1 .. i_bM)`` uniformly with replacement (row b of ``numpy.random.default_rng(seed).integers(0, M,
    (resamples, M))``) and computes ``LDS_b = mean over the queries q whose value is defined of
    spearman(predicted[i_b, q], actual[i_b, q])`` (repeated subsets tie); the interval is the 2.5th and the 97.5th
    percentile of the defined ``LDS_b`` (``numpy.percentile``, linear interpolation). A resample whose LDS is
    defined for no query is left out and counted; NaN when all are.
    """
    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    idx = np.random.default_rng(seed).integers(0, predicted.shape[0], (resamples, predicted.shape[0]))
    step = max(1, BOOTSTRAP_CHUNK // max(predicted.size, 1))  # resamples at a time: memory flat in ``resamples``
    kept = np.concatenate([_resampled_lds(predicted, actual, idx[lo : lo + step]) for lo in range(0, resamples, step)])
    if kept.size == 0:
        return (float("nan"), float("nan")), resamples
    lo, hi = np.percentile(kept, [2.5, 97.5])
    return (float(lo), float(hi)), int(resamples - kept.size)


def lds(
    scores: np.ndarray, subsets: np.ndarray, measurements: np.ndarray, resamples: int = 1000, seed: int = 0
) -> dict:
    """``{"mean", "per_query", "ci95", "ci95_queries", "undefined", "bootstrap_undefined"}`` of one method's
    ``scores`` ``[Q, N]`` against the retrained ``measurements`` ``[M, S, Q]`` (NLLs; averaged over seeds,
    negated). ``ci95`` is :func:`bootstrap_ci95` over the subsets (``resamples``, ``seed``; it leaves out
    ``bootstrap_undefined`` resamples), ``ci95_queries`` :func:`mean_ci95` over the queries. ``undefined``
    counts the queries whose LDS is not defined (a constant prediction or outcome: null in ``per_query``), which
    the mean and both intervals leave out."""
    predicted, actual = group_predictions(scores, subsets), -measurements.mean(1)
    per_query = lds_per_query(predicted, actual)
    mean, ci_queries = mean_ci95(per_query)
    ci, left_out = bootstrap_ci95(predicted, actual, resamples, seed)
    return {
        "mean": mean,
        "per_query": [None if not np.isfinite(x) else float(x) for x in per_query],
        "ci95": list(ci),
        "ci95_queries": list(ci_queries),
        "undefined": int((~np.isfinite(per_query)).sum()),
        "bootstrap_undefined": left_out,
    }
