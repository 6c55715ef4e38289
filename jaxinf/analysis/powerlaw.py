"""Power-law tails of the ranked influence scores (Grosse et al. 2023; Ruis et al. 2024).

Two fits of one query's top-N scores ``s_(1) >= s_(2) >= ... > 0``:

- the rank-size line: ordinary least squares of ``log10 s_(r)`` on ``log10 r``
  (:func:`loglog_fit`), whose slope is what the papers plot;
- a Clauset, Shalizi & Newman (2009) fit of the scores as samples of a continuous power law
  ``p(x) ~ x^-alpha`` for ``x >= x_min``: maximum-likelihood alpha, x_min chosen to minimize the
  Kolmogorov-Smirnov distance, and a bootstrap goodness-of-fit p-value (:func:`clauset_fit`).

If the scores follow ``p(x) ~ x^-alpha`` the rank-size slope is about ``-1 / (alpha - 1)``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def loglog_fit(values_desc: np.ndarray) -> dict:
    """OLS fit ``log10 s_(r) = a + b log10 r`` over r = 1..n of positive scores sorted descending.

    Returns slope b, its standard error ``sqrt(SSE / (n - 2) / sum (x - mean x)^2)``, intercept a
    and r^2; None values when fewer than 3 points. The standard error is the OLS one, valid for
    independent noise around the line; successive ranked scores are not independent, so read
    it as a measure of fit, not a confidence interval for the population.
    """
    v = np.asarray(values_desc, np.float64)
    if v.size and (np.any(v <= 0) or np.any(np.diff(v) > 0)):
        raise ValueError("loglog_fit needs positive scores sorted descending")
    n = v.size
    if n < 3:
        return {"n": int(n), "slope": None, "slope_se": None, "intercept": None, "r2": None}
    x = np.log10(np.arange(1, n + 1, dtype=np.float64))
    y = np.log10(v)
    res = stats.linregress(x, y)
    return {
        "n": int(n),
        "slope": float(res.slope),
        "slope_se": float(res.stderr),
        "intercept": float(res.intercept),
        "r2": float(res.rvalue**2),
    }


def mle_alpha(tail: np.ndarray, x_min: float) -> tuple[float, float]:
    """Continuous power-law MLE ``alpha = 1 + n / sum_i ln(x_i / x_min)`` and its standard
    error ``(alpha - 1) / sqrt(n)`` (Clauset et al. 2009, eqs. 3.1 and 3.2), for x_i >= x_min."""
    t = np.asarray(tail, np.float64)
    s = float(np.log(t / x_min).sum())
    if t.size == 0 or s <= 0:
        return math.nan, math.nan
    alpha = 1.0 + t.size / s
    return alpha, (alpha - 1.0) / math.sqrt(t.size)


def candidate_tail_sizes(n: int, min_tail: int, n_candidates: int) -> np.ndarray:
    """Tail sizes k tried for x_min = s_(k): up to n_candidates values, log-spaced from
    ``max(min_tail, ceil(n / 10))`` to n (a tail is at least a tenth of the top-N ranking)."""
    lo = max(min_tail, math.ceil(n / 10))
    if n < lo:
        return np.zeros(0, np.int64)
    return np.unique(np.round(np.geomspace(lo, n, n_candidates)).astype(np.int64))


def _scan(x_desc: np.ndarray, ks: np.ndarray) -> tuple[int, float, float]:
    """For each tail size k: alpha_k by MLE with x_min = x_(k), and the KS distance
    ``D_k = max_x |S_k(x) - P_k(x)|`` between the tail's empirical CDF and
    ``P_k(x) = 1 - (x / x_min)^(1 - alpha_k)``. Returns the k minimizing D_k, its alpha and D."""
    n = x_desc.size
    logx = np.log(x_desc)
    c = np.cumsum(logx)
    xmin = x_desc[ks - 1]
    L = c[ks - 1] - ks * np.log(xmin)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = 1.0 + ks / L
    ok = np.isfinite(alpha) & (L > 0)
    if not ok.any():
        return -1, math.nan, math.nan
    ks, xmin, alpha = ks[ok], xmin[ok], alpha[ok]
    i = np.arange(n)[None, :]
    kk = ks[:, None]
    mask = i < kk
    with np.errstate(over="ignore", invalid="ignore"):
        F = 1.0 - np.exp((1.0 - alpha[:, None]) * (logx[None, :] - np.log(xmin)[:, None]))
    upper = (kk - i) / kk
    lower = (kk - i - 1) / kk
    d = np.where(mask, np.maximum(np.abs(upper - F), np.abs(lower - F)), -np.inf).max(axis=1)
    j = int(np.argmin(d))
    return int(ks[j]), float(alpha[j]), float(d[j])


def clauset_fit(
    values: np.ndarray, min_tail: int = 10, n_candidates: int = 50, n_bootstrap: int = 100, seed: int = 0
) -> dict:
    """Power-law fit of positive scores, Clauset-style.

    x_min is the candidate (see :func:`candidate_tail_sizes`) minimizing the KS distance D;
    alpha is the MLE (:func:`mle_alpha`) over the scores >= x_min. Goodness of fit: ``p`` is
    the share of ``n_bootstrap`` synthetic data sets whose own best fit has a KS distance >= D,
    each drawn with ``Binomial(n, n_tail / n)`` points from the fitted power law and the rest
    resampled from the scores below x_min. ``p >= 0.1`` means a power law is plausible.
    """
    x = np.sort(np.asarray(values, np.float64))[::-1]
    if x.size and x[-1] <= 0:
        raise ValueError("clauset_fit needs positive values")
    n = x.size
    none = {
        "n": int(n),
        "alpha": None,
        "alpha_se": None,
        "x_min": None,
        "n_tail": None,
        "ks_d": None,
        "p_value": None,
        "n_bootstrap": 0,
    }
    ks = candidate_tail_sizes(n, min_tail, n_candidates)
    if ks.size == 0:
        return none
    k, _, d = _scan(x, ks)
    if k < 0:
        return none
    x_min = float(x[k - 1])
    alpha, se = mle_alpha(x[:k], x_min)
    out = {
        "n": int(n),
        "alpha": alpha,
        "alpha_se": se,
        "x_min": x_min,
        "n_tail": int(k),
        "ks_d": d,
        "p_value": None,
        "n_bootstrap": int(n_bootstrap),
    }
    if n_bootstrap <= 0:
        return out
    rng = np.random.default_rng(seed)
    body = x[k:]
    hits = 0
    for _ in range(n_bootstrap):
        m = rng.binomial(n, k / n) if body.size else n
        u = rng.random(m)
        syn_tail = x_min * (1.0 - u) ** (-1.0 / (alpha - 1.0))
        syn_body = rng.choice(body, n - m, replace=True) if n - m else np.zeros(0)
        s = np.sort(np.concatenate([syn_tail, syn_body]))[::-1]
        _, _, ds = _scan(s, candidate_tail_sizes(n, min_tail, n_candidates))
        hits += bool(ds >= d)
    out["p_value"] = hits / n_bootstrap
    return out


def tail_fits(
    values_desc: np.ndarray,
    top_n: int,
    min_tail: int = 10,
    n_candidates: int = 50,
    n_bootstrap: int = 100,
    seed: int = 0,
) -> dict:
    """Both fits of the positive part of the top ``top_n`` scores of one sorted-descending tail."""
    v = np.asarray(values_desc[:top_n], np.float64)
    v = v[v > 0]
    return {
        "top_n": int(top_n),
        "loglog": loglog_fit(v),
        "clauset": clauset_fit(v, min_tail, n_candidates, n_bootstrap, seed),
    }
