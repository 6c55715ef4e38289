"""How concentrated each query's influence is on few documents (Ruis et al. 2024, section 5.1).

All functions here take one query's scores. The streaming driver passes the top and bottom
of the row already sorted, with the row totals, so a 5M-document row is never sorted whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def top_count(fraction: float, n_documents: int) -> int:
    """Number of documents in the top ``fraction`` of a corpus: ``max(1, ceil(fraction * N))``."""
    return max(1, math.ceil(fraction * n_documents - 1e-9))


def row_totals(row: np.ndarray) -> dict:
    """Totals of one query's scores: ``P = sum max(s, 0)``, ``M = sum max(-s, 0)``, ``|I| = P + M``, ``sum s``."""
    row = np.asarray(row, np.float64)
    pos = float(np.clip(row, 0, None).sum())
    neg = float(np.clip(-row, 0, None).sum())
    return {
        "positive": pos,
        "negative": neg,
        "absolute": pos + neg,
        "sum": float(row.sum()),
        "n_positive": int((row > 0).sum()),
        "n_negative": int((row < 0).sum()),
    }


def concentration_shares(
    top_desc: np.ndarray,
    bottom_asc: np.ndarray,
    total_positive: float,
    total_negative: float,
    n_documents: int,
    fractions: Sequence[float],
) -> dict:
    """Share of a query's positive (negative) influence held by its top (bottom) documents.

    For a fraction f with ``k = top_count(f, N)`` and scores sorted descending ``s_(1) >= s_(2) ...``:
    ``positive_share(f) = sum_{r<=k} max(s_(r), 0) / sum_n max(s_n, 0)`` and, with scores sorted
    ascending, ``negative_share(f) = sum_{r<=k} max(-s_(r), 0) / sum_n max(-s_n, 0)``.
    ``top_desc`` / ``bottom_asc`` must hold at least the k largest / smallest scores. A query
    without positive (negative) scores gets None for that side.
    """
    out: dict[str, list] = {"fractions": [float(f) for f in fractions], "k": [], "positive": [], "negative": []}
    cpos = np.cumsum(np.clip(np.asarray(top_desc, np.float64), 0, None))
    cneg = np.cumsum(np.clip(-np.asarray(bottom_asc, np.float64), 0, None))
    for f in fractions:
        k = top_count(f, n_documents)
        if k > len(cpos) or k > len(cneg):
            raise ValueError(f"need the top {k} scores for fraction {f}, got {len(cpos)}")
        out["k"].append(k)
        out["positive"].append(float(cpos[k - 1] / total_positive) if total_positive > 0 else None)
        out["negative"].append(float(cneg[k - 1] / total_negative) if total_negative > 0 else None)
    return out


def concentration(row: np.ndarray, fractions: Sequence[float]) -> dict:
    """concentration_shares of a whole in-memory row (sorts it)."""
    row = np.asarray(row, np.float64)
    t = row_totals(row)
    s = np.sort(row)
    return concentration_shares(s[::-1], s, t["positive"], t["negative"], row.size, fractions)


def per_nat(totals: dict, loss: float, already_per_nat: bool = False) -> dict | None:
    """Influence per nat of query information: ``sum_n |I(q, n)| / NLL(completion)``, and the
    same for the positive and negative totals. None when the loss is unknown. When the run's
    scores were already normalized per nat (``scores.normalize=per_nat``) the totals are returned as they are.
    """
    if already_per_nat:
        d = 1.0
    elif loss is None or not np.isfinite(loss):
        return None
    else:
        d = float(loss)
    return {"absolute": totals["absolute"] / d, "positive": totals["positive"] / d, "negative": totals["negative"] / d}
