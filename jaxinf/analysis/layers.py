"""Where influence comes from: layers (lower, middle, upper) and tokens of the top documents.

Reads the optional exports ``layers.json`` + ``layer_scores.npy`` and ``topk_tokens.jsonl``
(formats in :mod:`jaxinf.run.exports.formats`). Per the design, per-layer and per-token scores sum to
the total score; the sums are checked against ``scores.npy`` and the largest discrepancy is
reported.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

BINS = ("lower", "middle", "upper")
_LAYER_NUMBER = (
    re.compile(r"(?:^|[._/])(?:layers?|blocks?|h|decoder_layers?)[._/]?(\d+)(?:[._/]|$)"),
    re.compile(r"(?:^|[._/])(\d+)(?:[._/]|$)"),
)


def layer_numbers(names: Sequence[str]) -> tuple[list[int], str]:
    """The transformer block of each tracked layer, from its name (``model.layers.12.mlp.up_proj`` -> 12).

    The first rule that finds a number in every name wins: ``layers.N`` / ``blocks.N`` / ``h.N``,
    then any ``.N.`` component. When no rule fits every name, each name is its own block, in the
    order given (the order of layers.json is model order). Returns (numbers, rule used).
    """
    for rx, rule in zip(_LAYER_NUMBER, ("layers.N", ".N.")):
        found = [rx.search(n) for n in names]
        if all(found):
            return [int(m.group(1)) for m in found if m is not None], rule  # all found
    return list(range(len(names))), "position in layers.json"


def layer_bins(numbers: Sequence[int]) -> list[str]:
    """Split the distinct block numbers, in order, into three contiguous near-equal groups
    (``np.array_split``: lower, middle, upper); each layer gets its block's group."""
    blocks = sorted(set(numbers))
    groups = np.array_split(np.asarray(blocks), 3)
    where = {}
    for name, g in zip(BINS, groups):
        for b in g.tolist():
            where[b] = name
    return [where[n] for n in numbers]


def layer_shares(layer_scores: np.ndarray) -> np.ndarray:
    """Share of each query's absolute influence from each layer, over its top-K documents:
    ``share[q, l] = sum_k |I_l(q, d_k)| / sum_{k, l'} |I_l'(q, d_k)|`` for layer_scores [Q, K, L]."""
    a = np.abs(np.asarray(layer_scores, np.float64)).sum(axis=1)
    tot = a.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, a / tot, np.nan)


def bin_shares(shares: np.ndarray, bins: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-query share of each bin: the sum of the shares of its layers."""
    b = np.asarray(bins)
    return {name: shares[:, b == name].sum(axis=1) for name in BINS}


def top_tokens(texts: Sequence[str], scores: np.ndarray, m: int) -> list[dict]:
    """The m tokens with the largest per-token influence (descending), with their positions."""
    scores = np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="stable")[:m]
    return [{"position": int(i), "text": texts[i], "score": float(scores[i])} for i in order]
