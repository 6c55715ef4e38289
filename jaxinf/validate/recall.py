"""Fact tracing: where the documents known to carry a query's answer land in a method's ranking.

For a query with supporting documents ``P`` (its ``supports`` field), rank
every document by descending score (rank 1 = most positive influence; ties
broken by document order). Then, as in bergson's ``recall`` and TrackStar's
fact-tracing evaluation:

- reciprocal rank ``RR = 1 / min_{p in P} rank(p)``, and ``MRR`` its mean over queries;
- ``Recall@k = |P intersect top_k| / |P|``, averaged over queries.

Queries without supporting documents take no part (their count is reported).
"""

from __future__ import annotations

import numpy as np


def ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every document in a query's descending ranking, ``[N]`` (ties: earlier document first)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    out = np.empty(len(order), np.int64)
    out[order] = np.arange(1, len(order) + 1)
    return out


def reciprocal_rank(scores: np.ndarray, supports: list[int]) -> float:
    """``1 / (best rank of a supporting document)``."""
    return 1.0 / float(ranks(scores)[supports].min())


def recall_at(scores: np.ndarray, supports: list[int], k: int) -> float:
    """Share of the supporting documents among the top ``k``."""
    return float((ranks(scores)[supports] <= k).mean())


def recall(scores: np.ndarray, supports: list[list[int]], ks: list[int]) -> dict:
    """``{"mrr", "recall_at": {k: ...}, "queries"}`` over the queries of ``scores`` ``[Q, N]`` that have supports."""
    rows = [q for q, s in enumerate(supports) if s]
    if not rows:
        return {"mrr": None, "recall_at": {str(k): None for k in ks}, "queries": 0}
    return {
        "mrr": float(np.mean([reciprocal_rank(scores[q], supports[q]) for q in rows])),
        "recall_at": {str(k): float(np.mean([recall_at(scores[q], supports[q], k) for q in rows])) for k in ks},
        "queries": len(rows),
    }
