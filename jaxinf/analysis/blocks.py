"""The blocks of ``summary.json``, one function per block, each from what the two passes of
:mod:`jaxinf.analysis.driver` found (the column pass's correlations and totals, the row pass's
:class:`~jaxinf.analysis.driver.RowResults`): queries, documents, correlations, concentration,
power-law tails, sources and the listed top documents."""

from __future__ import annotations

import numpy as np

from jaxinf.analysis import concentration as conc
from jaxinf.analysis import correlations as corr
from jaxinf.analysis.groups import by_kind, compare_kinds, present_kinds
from jaxinf.run.exports.formats import Documents, Queries


def queries_block(queries: Queries) -> dict:
    kinds: dict[str, int] = {}
    tasks: dict[str, dict] = {}
    for k, t in zip(queries.kinds, queries.tasks):
        kinds[k] = kinds.get(k, 0) + 1
        key = t if t is not None else "(none)"
        tasks.setdefault(key, {"kind": k, "count": 0})["count"] += 1
    return {
        "kinds": kinds,
        "tasks": tasks,
        "ids": queries.ids,
        "kind": queries.kinds,
        "task": queries.tasks,
        "loss": [None if not np.isfinite(x) else float(x) for x in queries.loss],
    }


def documents_block(docs: Documents, shares: dict) -> dict:
    out = {}
    for s, name in enumerate(docs.source_names):
        d = {"count": int(shares["counts"][s]), "share_count": float(shares["count"][s])}
        if "tokens" in shares:
            d["tokens"] = int(shares["token_counts"][s])
            d["share_tokens"] = float(shares["tokens"][s])
        out[name] = d
    return {
        "sources": out,
        "n_missing_source": docs.n_missing_source,
        "n_missing_tokens": docs.n_missing_tokens,
        "n_with_text": docs.n_with_text,
    }


def correlations_block(r: np.ndarray, queries: Queries, permutations: int, seed: int) -> dict:
    """The correlations between queries' scores: pass 1's Pearson matrix, its group summaries and heat-map order."""
    correlations = corr.correlation_summary(r, queries.kinds, queries.tasks, permutations, seed, queries.loss)
    correlations["matrix"] = r
    correlations["order"] = corr.heatmap_order(queries.kinds, queries.tasks)
    return correlations


def concentration_block(queries, rows, totals, o, already_per_nat, N) -> dict:
    kinds = queries.kinds
    per_nat = [conc.per_nat(totals[q], queries.loss[q], already_per_nat) for q in range(len(kinds))]
    have_nat = any(p is not None for p in per_nat)
    out = {
        "fractions": list(o.fractions),
        "k": rows.concentration[0]["k"],
        "per_query": [{"positive": c["positive"], "negative": c["negative"]} for c in rows.concentration],
        "totals": totals,
        "by_kind": {},
        "compare_kinds": {},
        "per_nat": None,
    }
    for side in ("positive", "negative"):
        out["by_kind"][side] = {
            f: by_kind([c[side][i] for c in rows.concentration], kinds) for i, f in enumerate(o.fractions)
        }
        out["compare_kinds"][side] = {
            f: compare_kinds([c[side][i] for c in rows.concentration], kinds) for i, f in enumerate(o.fractions)
        }
    if have_nat:
        out["per_nat"] = {
            "per_query": per_nat,
            "already_per_nat": already_per_nat,
            "by_kind": {
                key: by_kind([p[key] if p else None for p in per_nat], kinds)
                for key in ("absolute", "positive", "negative")
            },
            "compare_kinds": compare_kinds([p["absolute"] if p else None for p in per_nat], kinds),
        }
    if N < 500:
        out["caveat"] = (
            f"the corpus has only {N} documents, so every fraction up to {1 / N:.2%} is the single top document"
        )
    return out


def powerlaw_block(queries, rows, top_n) -> dict:
    kinds = queries.kinds
    out = {"top_n": top_n, "positive": {}, "negative": {}}
    for side, tails in (("positive", rows.tail_pos), ("negative", rows.tail_neg)):
        slopes = [t["loglog"]["slope"] for t in tails]
        alphas = [t["clauset"]["alpha"] for t in tails]
        plausible = [None if t["clauset"]["p_value"] is None else t["clauset"]["p_value"] >= 0.1 for t in tails]
        out[side] = {
            "per_query": tails,
            "slope_by_kind": by_kind(slopes, kinds),
            "alpha_by_kind": by_kind(alphas, kinds),
            "plausible_share_by_kind": {
                k: _share([p for p, kk in zip(plausible, kinds) if kk == k]) for k in present_kinds(kinds)
            },
            "compare_slope": compare_kinds(slopes, kinds),
            "compare_alpha": compare_kinds(alphas, kinds),
        }
    return out


def _share(flags) -> dict:
    f = [x for x in flags if x is not None]
    return {"n": len(f), "share": (sum(f) / len(f)) if f else None}


def sources_block(queries, docs, rows, ks) -> dict:
    kinds = np.asarray(queries.kinds)
    out = {
        "ks": ks,
        "sources": docs.source_names,
        "by_kind": {},
        "per_query": {"top": [], "bottom": []},
        "by_tokens": docs.tokens is not None,
    }
    for side, lst in (("top", rows.src_top), ("bottom", rows.src_bottom)):
        out["per_query"][side] = lst
        out["by_kind"][side] = {}
        for measure in ("count", "tokens"):
            if measure not in lst[0]:
                continue
            stack = np.stack([m[measure] for m in lst])  # [Q, K, S]
            out["by_kind"][side][measure] = {
                kind: _mean_std(stack[kinds == kind]) for kind in present_kinds(queries.kinds)
            }
    return out


def _mean_std(stack: np.ndarray) -> dict:
    """Mean and standard deviation (ddof=1) over axis 0 of the finite entries; NaN where there are too few."""
    ok = np.isfinite(stack)
    n = ok.sum(axis=0)
    x = np.where(ok, stack, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = x.sum(axis=0) / n
        var = (np.where(ok, stack - mean, 0.0) ** 2).sum(axis=0) / (n - 1)
    return {"mean": np.where(n > 0, mean, np.nan), "std": np.where(n > 1, np.sqrt(var), np.nan)}


def top_documents(queries, rows, fetched, docs, listed) -> list[dict]:
    out = []
    for q, qid in enumerate(queries.ids):

        def entries(idx, val):
            return [
                {
                    "id": fetched[int(i)][0],
                    "source": docs.source_names[docs.source_codes[int(i)]],
                    "score": float(v),
                    "column": int(i),
                }
                for i, v in zip(idx[:listed], val[:listed])
            ]

        out.append(
            {
                "query": qid,
                "top": entries(rows.top_idx[q], rows.top_val[q]),
                "bottom": entries(rows.bottom_idx[q], rows.bottom_val[q]),
            }
        )
    return out
