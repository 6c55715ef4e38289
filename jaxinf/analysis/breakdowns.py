"""The layer and token breakdowns a run exported, for ``jaxinf analyze``.

``layers.json`` with ``layer_scores.npy`` (each query's top documents' scores per layer, in the
order of topk.jsonl) and ``topk_tokens.jsonl`` (per-token scores of top documents) are optional.
They are read and cross-checked against queries.jsonl and documents.jsonl before the streaming
passes start, then summarised into summary.json's ``layers`` and ``tokens`` blocks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxinf.analysis import layers as lay
from jaxinf.analysis.groups import by_kind, present_kinds
from jaxinf.run.exports.formats import (
    AnalysisError,
    Documents,
    Queries,
    ScoreMatrix,
    TokenRecord,
    TopK,
    iter_topk_tokens,
    read_layer_exports,
    read_topk,
)


class Breakdowns(NamedTuple):
    """The exports as read: top lists, per-layer scores, per-token records, and the file position of every
    document they name."""

    topk: TopK | None
    layers: tuple[list[str], np.ndarray] | None  # layer names, layer_scores.npy [Q, K, L]
    tokens: list[TokenRecord]
    positions: dict[str, int]  # document id -> row of documents.jsonl


def read_breakdowns(run_dir: Path, queries: Queries, docs: Documents) -> Breakdowns:
    """The optional topk/layer/token exports, read and cross-checked (before any heavy work).

    Every document they name must be in documents.jsonl, every query in queries.jsonl, and
    ``layer_scores.npy`` needs topk.jsonl's top lists for its document order.
    """
    topk = read_topk(run_dir / "topk.jsonl")
    exported = read_layer_exports(run_dir)
    id_pos = {qid: i for i, qid in enumerate(queries.ids)}
    need_ids: dict[str, None] = {}
    if exported is not None:
        names, ls = exported
        if topk is None:
            raise AnalysisError(
                "layer_scores.npy: present but topk.jsonl is missing (its top lists give the document order)"
            )
        if ls.shape[0] != len(queries):
            raise AnalysisError(f"layer_scores.npy: shape {ls.shape} but queries.jsonl has {len(queries)} lines")
        for qid in queries.ids:
            top = topk.top.get(qid)
            if top is None:
                raise AnalysisError(f"topk.jsonl: no line for query {qid!r}, needed by layer_scores.npy")
            if len(top) < ls.shape[1]:
                raise AnalysisError(
                    f"layer_scores.npy: shape {ls.shape} but topk.jsonl lists {len(top)} top "
                    f"documents for query {qid!r}"
                )
            for e in top[: ls.shape[1]]:
                need_ids[str(e["id"])] = None
    records = []
    tok_path = run_dir / "topk_tokens.jsonl"
    if tok_path.exists():
        for rec in iter_topk_tokens(tok_path):
            if rec.query not in id_pos:
                raise AnalysisError(f"topk_tokens.jsonl: query {rec.query!r} is not in queries.jsonl")
            records.append(rec)
            need_ids[rec.document] = None
    index = _find_ids(docs, list(need_ids))
    for did in need_ids:
        if did not in index:
            raise AnalysisError(f"topk.jsonl/topk_tokens.jsonl: document {did!r} is not in documents.jsonl")
    return Breakdowns(topk, exported, records, index)


def summarize_breakdowns(
    breakdowns: Breakdowns, queries: Queries, scores: ScoreMatrix, tokens_shown: int, notes: list[str]
) -> tuple[dict, dict]:
    """summary.json's ``layers`` and ``tokens`` blocks.

    Layers: each query's share of ``|score|`` per layer and per depth bin over its top-K documents,
    by kind. Tokens: each exported document's ``tokens_shown`` highest-scoring tokens. Both check
    that the parts sum to scores.npy (a note when the largest relative difference exceeds 1e-3).
    """
    topk, exported, records, index = breakdowns
    layers_out: dict = {"available": False, "reason": "not exported (no layers.json / layer_scores.npy)"}
    id_pos = {qid: i for i, qid in enumerate(queries.ids)}
    if exported is not None:
        names, ls = exported
        numbers, rule = lay.layer_numbers(names)
        bins = lay.layer_bins(numbers)
        share = lay.layer_shares(ls)
        bshare = lay.bin_shares(share, bins)
        assert topk is not None  # read_breakdowns refuses layer scores without topk.jsonl
        resid = []
        for q, qid in enumerate(queries.ids):
            for k, e in enumerate(topk.top[qid][: ls.shape[1]]):
                total = scores_value(scores, q, index[str(e["id"])])
                resid.append(abs(ls[q, k].sum() - total) / max(abs(total), 1e-30))
        max_rel = float(max(resid)) if resid else None
        if max_rel is not None and max_rel > 1e-3:
            notes.append(
                f"layer_scores.npy: per-layer scores do not sum to scores.npy "
                f"(largest relative difference {max_rel:.3g}); layer shares may be off"
            )
        layers_out = {
            "available": True,
            "names": names,
            "block_numbers": numbers,
            "block_rule": rule,
            "bins": bins,
            "top_k": int(ls.shape[1]),
            "share_per_query": share,
            "bin_share_per_query": bshare,
            "bin_share_by_kind": {b: by_kind(bshare[b], queries.kinds) for b in lay.BINS},
            "mean_share_by_kind": {
                k: np.nanmean(share[np.asarray(queries.kinds) == k], axis=0) for k in present_kinds(queries.kinds)
            },
            "sum_check_max_relative_difference": max_rel,
            "definition": "share[q, l] = sum_k |I_l(q, d_k)| / sum_{k, l'} |I_l'(q, d_k)| over the top-K documents",
        }
    if not records:
        tokens_out = {"available": False, "reason": "not exported (no topk_tokens.jsonl)"}
    else:
        entries = []
        resid = []
        for rec in records:
            q = id_pos[rec.query]
            total = scores_value(scores, q, index[rec.document])
            resid.append(abs(rec.scores.sum() - total) / max(abs(total), 1e-30))
            entries.append(
                {
                    "query": rec.query,
                    "document": rec.document,
                    "rank": rec.rank,
                    "n_tokens": len(rec.texts),
                    "score": total,
                    "top_tokens": lay.top_tokens(rec.texts, rec.scores, tokens_shown),
                    "_texts": rec.pieces or rec.texts,
                    "_decoded": rec.pieces is not None,
                    "_scores": rec.scores,
                }
            )
        max_rel = float(max(resid))
        if max_rel > 1e-3:
            notes.append(
                f"topk_tokens.jsonl: per-token scores do not sum to scores.npy "
                f"(largest relative difference {max_rel:.3g})"
            )
        tokens_out = {"available": True, "records": entries, "sum_check_max_relative_difference": max_rel}
    return layers_out, tokens_out


def scores_value(scores: ScoreMatrix, q: int, n: int) -> float:
    """The single entry ``scores[q, n]`` of scores.npy, read from the file."""
    buf = np.empty(1, scores.dtype)
    with open(scores.path, "rb") as f:
        scores._read(f, buf, q, n)
    return float(buf[0])


def _find_ids(docs: Documents, ids: list[str]) -> dict[str, int]:
    """File positions of the given document ids (one streaming pass)."""
    want = set(ids)
    out: dict[str, int] = {}
    if not want:
        return out
    with open(docs.path, encoding="utf-8") as f:
        n = 0
        for line in f:
            if not line.strip():
                continue
            did = str(json.loads(line)["id"])
            if did in want:
                out[did] = n
                if len(out) == len(want):
                    break
            n += 1
    return out
