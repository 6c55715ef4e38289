"""Which data sources the top and bottom documents come from (Ruis et al. 2024, section 5.2).

A source is over-represented among a query's top-k documents when its share there exceeds
its share of the corpus. The multiplier is that ratio, by document count and by tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def default_ks(n_documents: int) -> list[int]:
    """k from 50 to 10% of the corpus: the 1-2-5 series 50, 100, 200, 500, 1000, ... below ``ceil(0.1 N)``, then
    ``ceil(0.1 N)`` itself. A corpus under 500 documents gets the single k = ``ceil(0.1 N)``."""
    cap = max(1, math.ceil(0.1 * n_documents - 1e-9))
    ks = []
    decade = 10
    while decade < cap:
        ks += [decade * m for m in (1, 2, 5) if 50 <= decade * m < cap]
        decade *= 10
    return ks + [cap]


def corpus_shares(codes: np.ndarray, n_sources: int, tokens: np.ndarray | None) -> dict:
    """Each source's share of the corpus: ``C_s / N`` by count and ``T_s / T`` by tokens."""
    counts = np.bincount(codes, minlength=n_sources).astype(np.float64)
    out = {"count": counts / counts.sum(), "counts": counts}
    if tokens is not None:
        tok = np.bincount(codes, weights=tokens.astype(np.float64), minlength=n_sources)
        out["tokens"] = tok / tok.sum() if tok.sum() > 0 else np.full(n_sources, np.nan)
        out["token_counts"] = tok
    return out


def source_multipliers(
    ranked_codes: np.ndarray,
    ks: Sequence[int],
    corpus_count_share: np.ndarray,
    ranked_tokens: np.ndarray | None = None,
    corpus_token_share: np.ndarray | None = None,
) -> dict:
    """Over-representation of each source among the first k ranked documents.

    By count: ``m_s(k) = (c_s(k) / k) / (C_s / N)``, with c_s(k) the number of the first k ranked
    documents from source s. By tokens: ``m^tok_s(k) = (t_s(k) / t(k)) / (T_s / T)``, with t_s(k)
    their tokens from source s and t(k) all their tokens. 1 means "as in the corpus".
    ``ranked_codes`` are the source codes of the documents in rank order (top: descending
    score; bottom: ascending score). Returns [len(ks), S] arrays.
    """
    S = corpus_count_share.size
    by_count = np.empty((len(ks), S))
    by_tokens = np.full((len(ks), S), np.nan) if ranked_tokens is not None else None
    with np.errstate(divide="ignore", invalid="ignore"):
        for i, k in enumerate(ks):
            c = np.bincount(ranked_codes[:k], minlength=S)
            by_count[i] = (c / k) / corpus_count_share
            if by_tokens is not None and ranked_tokens is not None:  # both or neither
                t = np.bincount(ranked_codes[:k], weights=ranked_tokens[:k].astype(np.float64), minlength=S)
                if t.sum() > 0:
                    by_tokens[i] = (t / t.sum()) / corpus_token_share
    out = {"count": by_count}
    if by_tokens is not None:
        out["tokens"] = by_tokens
    return out
