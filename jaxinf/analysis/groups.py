"""Per-kind summaries of per-query statistics, and their comparison between kinds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from jaxinf.run.exports.formats import KINDS, UNKNOWN

ALL_KINDS = (*KINDS, UNKNOWN)


def describe(values) -> dict:
    """n, mean, standard deviation (ddof=1), median and range of the finite values."""
    v = np.asarray([np.nan if x is None else x for x in np.ravel(values)], np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else None,
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def present_kinds(kinds: Sequence[str]) -> list[str]:
    return [k for k in ALL_KINDS if k in kinds]


def by_kind(values: Sequence | np.ndarray, kinds: Sequence[str]) -> dict:
    """describe() of the per-query values of each kind present."""
    v = np.asarray([np.nan if x is None else x for x in values], np.float64)
    k = np.asarray(kinds)
    return {kind: describe(v[k == kind]) for kind in present_kinds(kinds)}


def compare_kinds(values: Sequence, kinds: Sequence[str]) -> list[dict]:
    """Two-sided Mann-Whitney U test of the per-query values of every pair of kinds present.

    Queries are the independent units here (one value per query), unlike query pairs in the
    correlation analysis. Pairs with fewer than 2 finite values on a side get p = None.
    """
    v = np.asarray([np.nan if x is None else x for x in values], np.float64)
    k = np.asarray(kinds)
    kinds_here = present_kinds(kinds)
    out = []
    for i, a in enumerate(kinds_here):
        for b in kinds_here[i + 1 :]:
            va, vb = v[(k == a) & np.isfinite(v)], v[(k == b) & np.isfinite(v)]
            p = None
            if va.size >= 2 and vb.size >= 2:
                p = float(stats.mannwhitneyu(va, vb, alternative="two-sided").pvalue)
            out.append(
                {
                    "a": a,
                    "b": b,
                    "n_a": int(va.size),
                    "n_b": int(vb.size),
                    "median_a": float(np.median(va)) if va.size else None,
                    "median_b": float(np.median(vb)) if vb.size else None,
                    "test": "Mann-Whitney U, two-sided",
                    "p_value": p,
                }
            )
    return out
