"""The linear datamodeling score (LDS; Park et al. 2023, the convention of kronfluence and dattri).

For query q and subsets S_1 .. S_M of the documents, the scores predict the
measurement of a model retrained on S_m by the group influence
``pred[m, q] = sum_{n in S_m} I(q, n)``; the actual outcome is the query's
log-probability under the retrained models, ``actual[m, q] = -mean_seeds
measurement_q(theta_{S_m, seed})`` (minus the NLL: positive influence means
the document raised the completion's log-probability). The LDS of a query is
the Spearman rank correlation of ``pred[:, q]`` and ``actual[:, q]`` over the
M subsets; the score of a method is its mean over queries.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties sharing their mean rank."""
    return stats.rankdata(x, axis=-1)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (NaN when either side is constant)."""
    rx, ry = rankdata(np.asarray(x, float)), rankdata(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


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


def lds(scores: np.ndarray, subsets: np.ndarray, measurements: np.ndarray) -> dict:
    """``{"mean", "per_query", "ci95", "undefined"}`` of one method's ``scores`` ``[Q, N]`` against the retrained
    ``measurements`` ``[M, S, Q]`` (NLLs; averaged over seeds, negated). ``undefined`` counts the queries whose
    LDS is not defined (a constant prediction or outcome: null in ``per_query``), which the mean and the
    interval leave out."""
    per_query = lds_per_query(group_predictions(scores, subsets), -measurements.mean(1))
    mean, ci = mean_ci95(per_query)
    return {"mean": mean, "per_query": [None if not np.isfinite(x) else float(x) for x in per_query],
            "ci95": list(ci), "undefined": int((~np.isfinite(per_query)).sum())}
