"""``jaxinf analyze RUN_DIR``: every statistic of the paper over a run's exported results.

Two streaming passes over ``scores.npy``, so a 80 x 5,000,000 matrix never sits in memory:

1. column chunks of all queries: NaN/inf check, the Q x Q Pearson matrix, per-query totals;
2. one row (query) at a time: the top and bottom ``k_max`` documents (``argpartition``, then
   sorted), from which concentration, power-law tails and source multipliers are computed.

Then the texts of the needed top documents are fetched (documents.jsonl ``text``, else the
pluggable text source), answers are searched, optional layer/token exports are read, and the
outputs are written: ``summary.json``, ``report/`` (index.html, PNG figures, summary.md).
Every input is validated before anything is written, and outputs replace the old ones only
when complete, so a failed analysis leaves the run directory as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from jaxinf import atomic
from jaxinf.analysis import answers as ans
from jaxinf.analysis import blocks
from jaxinf.analysis import concentration as conc
from jaxinf.analysis import correlations as corr
from jaxinf.analysis import findings as fnd
from jaxinf.analysis import powerlaw as pl
from jaxinf.analysis import seeds as sd
from jaxinf.analysis import sources as src
from jaxinf.analysis.breakdowns import read_breakdowns, summarize_breakdowns
from jaxinf.analysis.texts import TextSource, corpus_changed, jsonl_text_source
from jaxinf.run.exports.formats import (
    UNKNOWN,
    AnalysisError,
    Documents,
    Queries,
    ScoreMatrix,
    read_documents,
    read_exported_queries,
    read_index_fidelity,
    read_run_record,
)
from jaxinf.run.rundir import recorded_cwd

SUMMARY_VERSION = 1


@dataclass(frozen=True)
class Options:
    """Knobs of the analysis; the defaults are the paper's choices where it states them."""

    fractions: tuple[float, ...] = (0.002, 0.01, 0.02, 0.05)
    source_ks: tuple[int, ...] | None = None  # None: sources.default_ks(N)
    answer_ks: tuple[int, ...] = (10, 50, 500)
    powerlaw_top: int = 1000
    powerlaw_min_tail: int = 10
    powerlaw_candidates: int = 50
    powerlaw_bootstrap: int = 100
    permutations: int = 2000
    seed: int = 0
    listed: int = 10  # top and bottom documents per query listed in summary.json
    report_documents: int = 5  # top and bottom documents per query shown with text in the report
    tokens_shown: int = 10
    chunk_columns: int = 65536
    # BLAS threads for the column pass's Q x Q products (None: the library default). One is
    # plenty for Q ~ 100, and multi-threaded BLAS slows down badly on a busy machine.
    blas_threads: int | None = 1
    snippet_chars: int = 400


@dataclass
class RowResults:
    totals: list = field(default_factory=list)
    concentration: list = field(default_factory=list)
    tail_pos: list = field(default_factory=list)
    tail_neg: list = field(default_factory=list)
    src_top: list = field(default_factory=list)
    src_bottom: list = field(default_factory=list)
    top_idx: list = field(default_factory=list)
    top_val: list = field(default_factory=list)
    bottom_idx: list = field(default_factory=list)
    bottom_val: list = field(default_factory=list)
    ranked_pos: list = field(default_factory=list)  # top scores for the rank-size figure


def _ranked(row: np.ndarray, k: int, descending: bool) -> np.ndarray:
    """Indices of the k largest (smallest) entries, sorted by score then index."""
    n = row.size
    key = -row if descending else row
    idx = np.argpartition(key, k - 1)[:k] if k < n else np.arange(n)
    order = np.lexsort((idx, key[idx]))
    return idx[order]


def _validate(run_dir: Path) -> tuple[Queries, Documents, ScoreMatrix]:
    if not run_dir.is_dir():
        raise AnalysisError(f"{run_dir}: not a directory")
    scores = ScoreMatrix(run_dir / "scores.npy")
    queries = read_exported_queries(run_dir / "queries.jsonl")
    docs = read_documents(run_dir / "documents.jsonl")
    Q, N = scores.shape
    if Q != len(queries):
        raise AnalysisError(f"scores.npy: shape {scores.shape} but queries.jsonl has {len(queries)} lines")
    if N != docs.n:
        raise AnalysisError(f"scores.npy: shape {scores.shape} but documents.jsonl has {docs.n} lines")
    return queries, docs, scores


def _column_pass(scores: ScoreMatrix, queries: Queries, docs: Documents, chunk: int):
    Q, N = scores.shape
    acc = corr.PearsonAccumulator(Q)
    pos = np.zeros(Q)
    neg = np.zeros(Q)
    tot = np.zeros(Q)
    npos = np.zeros(Q, np.int64)
    nneg = np.zeros(Q, np.int64)
    for start, x in scores.column_chunks(chunk):
        rowsum = x.sum(axis=1)
        if not np.isfinite(rowsum).all():  # a NaN/inf entry (or an overflowing sum: then nothing is reported)
            bad = ~np.isfinite(x)
            if bad.any():
                q, c = (int(v) for v in np.argwhere(bad)[0])
                n = start + c
                did = docs.fetch([n])[n][0]
                what = "NaN" if np.isnan(x[q, c]) else "inf"
                raise AnalysisError(
                    f"scores.npy: {what} at query row {q} (id {queries.ids[q]!r}), document column {n} (id {did!r})"
                )
        acc.update(x)
        tot += rowsum
        pos += np.maximum(x, 0.0).sum(axis=1)
        neg -= np.minimum(x, 0.0).sum(axis=1)
        npos += (x > 0).sum(axis=1)
        nneg += (x < 0).sum(axis=1)
    totals = [
        {
            "positive": float(pos[q]),
            "negative": float(neg[q]),
            "absolute": float(pos[q] + neg[q]),
            "sum": float(tot[q]),
            "n_positive": int(npos[q]),
            "n_negative": int(nneg[q]),
        }
        for q in range(Q)
    ]
    return acc.result(), totals


def analyze(
    run_dir, options: Options = Options(), text_source: TextSource | None = None, write: bool = True, log=print
) -> dict:
    """Analyse a run directory; returns the summary (also written to summary.json when ``write``).

    The phases, each timed in ``summary["timings"]``: the inputs validated and read, pass 1 over
    column chunks, pass 2 over rows, the texts of the documents the summary names, answers, the
    layer and token breakdowns, the summary's blocks, and the report.
    """
    run_dir = Path(run_dir)
    t_start = time.time()
    timings: dict[str, float] = {}
    queries, docs, scores = _validate(run_dir)
    record = read_run_record(run_dir)  # run.json, or its copy state/run.json when it is damaged
    config = record.get("config") or {}
    breakdowns = read_breakdowns(run_dir, queries, docs)
    Q, N = scores.shape
    notes: list[str] = _conversion_notes(run_dir)
    already_per_nat = _input_notes(queries, docs, config, notes)
    o = options

    t = time.time()
    log(f"analyze: {Q} queries x {N} documents; pass 1 (correlations, totals)")
    r, totals = _columns_phase(scores, queries, docs, o, notes)
    timings["pass_columns_s"] = time.time() - t

    t = time.time()
    log("analyze: pass 2 (concentration, power laws, sources)")
    sizes = row_sizes(o, N)
    shares = src.corpus_shares(docs.source_codes, len(docs.source_names), docs.tokens)
    rows = _row_pass(scores, totals, docs, shares, sizes, o)
    timings["pass_rows_s"] = time.time() - t

    t = time.time()
    fetched = docs.fetch(_needed_documents(rows))
    texts, text_origin = _texts(run_dir, record, fetched, text_source, notes)
    timings["fetch_texts_s"] = time.time() - t

    t = time.time()
    answers = _answers(queries, rows, fetched, texts, sizes.answer_ks, notes)
    timings["answers_s"] = time.time() - t

    t = time.time()
    layers_out, tokens_out = summarize_breakdowns(breakdowns, queries, scores, o.tokens_shown, notes)
    timings["layers_tokens_s"] = time.time() - t

    t = time.time()
    correlations = blocks.correlations_block(r, queries, o.permutations, o.seed)
    summary = {
        "version": SUMMARY_VERSION,
        "run_dir": str(run_dir),
        "n_queries": Q,
        "n_documents": N,
        "options": asdict(o),
        "notes": notes,
        "queries": blocks.queries_block(queries),
        "documents": blocks.documents_block(docs, shares),
        "correlations": correlations,
        "findings": fnd.evaluate(correlations, answers, N),
        "seeds": sd.read_table(run_dir),  # the findings over training seeds, when the run is one of several
        "concentration": blocks.concentration_block(queries, rows, totals, o, already_per_nat, N),
        "powerlaw": blocks.powerlaw_block(queries, rows, sizes.top_n),
        "sources": blocks.sources_block(queries, docs, rows, sizes.source_ks),
        "answers": answers,
        "layers": layers_out,
        "tokens": tokens_out,
        "top_documents": blocks.top_documents(queries, rows, fetched, docs, o.listed),
        "text_source": text_origin,
        "index": read_index_fidelity(run_dir / "index.json"),
    }
    timings["summaries_s"] = time.time() - t
    if write:
        t = time.time()
        _write_outputs(run_dir, summary, queries, rows, fetched, texts, docs, o)
        timings["report_s"] = time.time() - t
    timings["total_s"] = time.time() - t_start
    summary["timings"] = timings
    if write:
        _write_json_atomic(run_dir / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- phases


def _input_notes(queries: Queries, docs: Documents, config: dict, notes: list[str]) -> bool:
    """Notes on missing labels and fallbacks, appended to ``notes``; True when the scores are already per nat.

    Queries without a kind form the 'unknown' kind, queries without a task are left out of task
    groups, documents without a source form the 'unknown' source; without token counts (or with
    all of them 0, then ``docs.tokens`` is set to None) source multipliers are by count only;
    without query losses per-nat numbers are skipped.
    """
    N = docs.n
    unknown_kind = [i for i, k in enumerate(queries.kinds) if k == UNKNOWN]
    if unknown_kind:
        raw = sorted({repr(queries.raw_kinds[i]) for i in unknown_kind})
        notes.append(
            f"{len(unknown_kind)} queries have a missing or unknown kind ({', '.join(raw)}); "
            f"they form the 'unknown' kind: ids {_ids_text([queries.ids[i] for i in unknown_kind])}"
        )
    no_task = [i for i, t in enumerate(queries.tasks) if t is None]
    if no_task:
        notes.append(f"{len(no_task)} queries have no task; they are left out of within-task and across-task groups")
    if docs.n_missing_source:
        notes.append(f"{docs.n_missing_source} of {N} documents have no source; they form the 'unknown' source")
    if docs.tokens is None:
        notes.append(
            f"{docs.n_missing_tokens} of {N} documents have no token count; "
            "source multipliers by tokens are skipped (by count only)"
        )
    elif docs.tokens.sum() == 0:
        docs.tokens = None
        notes.append("every document has a token count of 0; source multipliers by tokens are skipped (by count only)")
    already_per_nat = (config.get("scores") or {}).get("normalize") == "per_nat"
    if already_per_nat:
        notes.append("run.json: scores.normalize=per_nat, so scores are already per nat; per-nat totals are the totals")
    elif not queries.has_loss:
        notes.append("queries.jsonl has no loss (completion NLL); per-nat numbers are skipped")
    elif not np.isfinite(queries.loss).all():
        notes.append(f"{int((~np.isfinite(queries.loss)).sum())} queries have no loss; their per-nat numbers are null")
    return already_per_nat


def _columns_phase(
    scores: ScoreMatrix, queries: Queries, docs: Documents, o: Options, notes: list[str]
) -> tuple[np.ndarray, list[dict]]:
    """Pass 1 (:func:`_column_pass` under ``o.blas_threads``): the Q x Q Pearson matrix and per-query totals.

    A query with the same score for every document has an undefined correlation (a note names it).
    """
    with threadpool_limits(limits=o.blas_threads, user_api="blas"):
        r, totals = _column_pass(scores, queries, docs, o.chunk_columns)
    constant = [queries.ids[q] for q in range(len(queries)) if not np.isfinite(r[q, q])]
    if constant:
        notes.append(
            f"{len(constant)} queries have the same score for every document; their correlations are "
            f"undefined (null, blank in the heat map): ids {_ids_text(constant)}"
        )
    return r, totals


@dataclass(frozen=True)
class RowSizes:
    """How many ranked documents pass 2 needs per query, each capped at the corpus size ``N``."""

    source_ks: list[int]  # the top-k of the source multipliers
    answer_ks: list[int]  # the top-k searched for answers
    top_n: int  # the top documents the power-law tails are fitted on
    k_max: int  # ranked on each side: the most any statistic needs
    keep_top: int  # top documents kept per query (answers, summary.json, report)
    keep_bottom: int  # bottom documents kept per query (summary.json, report)


def row_sizes(o: Options, N: int) -> RowSizes:
    """The :class:`RowSizes` of the options on a corpus of ``N`` documents."""
    source_ks = sorted(set(min(k, N) for k in (o.source_ks or src.default_ks(N))))
    answer_ks = sorted(set(min(k, N) for k in o.answer_ks))
    top_n = min(o.powerlaw_top, N)
    k_max = max([conc.top_count(max(o.fractions), N), *source_ks, *answer_ks, top_n, min(o.listed, N)])
    keep_top = max(*answer_ks, min(o.listed, N), min(o.report_documents, N))
    keep_bottom = min(max(o.listed, o.report_documents), N)
    return RowSizes(source_ks, answer_ks, top_n, k_max, keep_top, keep_bottom)


def _row_pass(
    scores: ScoreMatrix, totals: list[dict], docs: Documents, shares: dict, sizes: RowSizes, o: Options
) -> RowResults:
    """Pass 2, one query (row) at a time: its top and bottom ``k_max`` documents and what they give.

    Per query: concentration shares of the top/bottom fractions, power-law fits of both tails,
    source multipliers of both sides, and the kept top/bottom documents with their scores.
    """
    Q, N = scores.shape
    rows = RowResults()
    for q in range(Q):
        row = scores.row(q)
        top = _ranked(row, sizes.k_max, True)
        bottom = _ranked(row, sizes.k_max, False)
        tv, bv = row[top], row[bottom]
        T = totals[q]
        rows.concentration.append(conc.concentration_shares(tv, bv, T["positive"], T["negative"], N, o.fractions))
        rows.tail_pos.append(
            pl.tail_fits(tv, sizes.top_n, o.powerlaw_min_tail, o.powerlaw_candidates, o.powerlaw_bootstrap, o.seed + q)
        )
        rows.tail_neg.append(
            pl.tail_fits(
                -bv, sizes.top_n, o.powerlaw_min_tail, o.powerlaw_candidates, o.powerlaw_bootstrap, o.seed + Q + q
            )
        )
        for ranked, out in ((top, rows.src_top), (bottom, rows.src_bottom)):
            out.append(
                src.source_multipliers(
                    docs.source_codes[ranked],
                    sizes.source_ks,
                    shares["count"],
                    None if docs.tokens is None else docs.tokens[ranked],
                    shares.get("tokens"),
                )
            )
        # copies, not views: a view would keep the whole k_max-long arrays of every row alive
        rows.top_idx.append(top[: sizes.keep_top].copy())
        rows.top_val.append(tv[: sizes.keep_top].copy())
        rows.bottom_idx.append(bottom[: sizes.keep_bottom].copy())
        rows.bottom_val.append(bv[: sizes.keep_bottom].copy())
        rows.ranked_pos.append(tv[: sizes.top_n][tv[: sizes.top_n] > 0])
    return rows


def _needed_documents(rows: RowResults) -> set[int]:
    """The columns of every kept top and bottom document: the documents whose ids and texts are fetched."""
    need = set()
    for q in range(len(rows.top_idx)):
        need.update(rows.top_idx[q].tolist())
        need.update(rows.bottom_idx[q].tolist())
    return need


# ----------------------------------------------------------------------------- texts and answers


def _conversion_notes(run_dir: Path) -> list[str]:
    """Notes of conversion.json (written by converters such as jaxinf.analysis.release), if any."""
    p = run_dir / "conversion.json"
    if not p.exists():
        return []
    try:
        notes = json.loads(p.read_text()).get("notes", [])
    except (json.JSONDecodeError, AttributeError):
        raise AnalysisError("conversion.json: invalid JSON object") from None
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise AnalysisError("conversion.json: field notes must be a list of strings")
    return [f"conversion.json: {n}" for n in notes]


def _ids_text(ids, limit: int = 20) -> str:
    s = ", ".join(map(str, ids[:limit]))
    return s + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def _texts(run_dir, record, fetched, text_source, notes) -> tuple[dict[int, str], str]:
    config = record.get("config") or {}
    texts = {i: t for i, (_, t) in fetched.items() if t is not None}
    missing = [i for i in fetched if i not in texts]
    origin = "documents.jsonl"
    if missing:
        source = text_source
        if source is None:
            path = (config.get("data") or {}).get("documents")
            if isinstance(path, str) and path:
                p = Path(path)
                started = recorded_cwd(record)  # the run's own working directory, then the run's, then ours
                cands = (
                    [p] if p.is_absolute() else [*([Path(started, p)] if started else []), run_dir / p, Path.cwd() / p]
                )
                found = next((c for c in cands if c.is_file()), None)
                changed = None if found is None else corpus_changed(found, record, config.get("data") or {})
                if changed is not None:
                    notes.append(f"run.json: config.data.documents: {changed}; document texts unavailable")
                elif found is not None and found.suffix in (".jsonl", ".json"):
                    source = jsonl_text_source(found)
                    origin = f"{found} (run.json config.data.documents)"
                elif found is None and any(c.is_dir() for c in cands):  # shards, a save_to_disk or TFDS directory
                    notes.append(
                        f"run.json: config.data.documents={path!r} is a directory; the report takes document texts "
                        "from one JSONL file only (or documents.jsonl); document texts unavailable"
                    )
                elif found is None:
                    notes.append(f"run.json: config.data.documents={path!r} not found; document texts unavailable")
                else:
                    notes.append(
                        f"run.json: config.data.documents={path!r} is not a JSONL file; pass a text source to read it"
                    )
        else:
            origin = "text source given by the caller"
        if source is not None:
            got = source([fetched[i][0] for i in missing])
            for i in missing:
                tx = got.get(fetched[i][0])
                if isinstance(tx, str):
                    texts[i] = tx
        still = sum(1 for i in fetched if i not in texts)
        if still == len(fetched):
            origin = "none"
            notes.append(
                "no document texts are available (documents.jsonl has no text and no corpus file "
                "was found); answers are not searched and the report shows ids only"
            )
        elif still:
            notes.append(f"{still} of {len(fetched)} needed document texts were not found; they are skipped")
    return texts, origin


def _answers(queries, rows, fetched, texts, ks, notes) -> dict:
    """The answers block (:func:`jaxinf.analysis.answers.answers_block`), with a note on queries without items."""
    if not texts:
        return {"available": False, "reason": "no document texts"}
    block, no_items = ans.answers_block(queries, rows.top_idx, texts, ks)
    if no_items:
        notes.append(
            f"{len(no_items)} queries have no answer items (no answer field, and none found in "
            f"the completion); they are left out of the answer shares: ids {_ids_text(no_items)}"
        )
    return block


# ----------------------------------------------------------------------------- writing


def to_jsonable(obj):
    """Plain JSON types: arrays to lists, NaN/inf to null, private keys (leading '_') dropped."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _write_json_atomic(path: Path, obj) -> None:
    atomic.write_atomic(path, json.dumps(to_jsonable(obj), indent=1, ensure_ascii=False, allow_nan=False))


def _write_outputs(run_dir, summary, queries, rows, fetched, texts, docs, o) -> None:
    """Build report/ (the page, its figures and summary.md) in a fresh temporary directory, then swap it in for
    the old one. One analysis of a run at a time builds (:func:`jaxinf.atomic.building_dir`), so what a killed one
    left in the run directory (its temporary directory, or the old report it was replacing) is removed first."""
    from jaxinf.analysis import markdown, report  # matplotlib: only when a report is written

    def busy(holder: str) -> AnalysisError:
        return AnalysisError(f"{run_dir}: its report is being written by another process ({holder}); wait for it")

    with atomic.building_dir(".report-", run_dir, busy, run_dir / "report") as tmp:
        report.write_report(
            tmp, summary, queries=queries, rows=rows, fetched=fetched, texts=texts, documents=docs, options=o
        )
        (tmp / "summary.md").write_text(markdown.summary_markdown(summary), encoding="utf-8")
        for stale in run_dir.glob(".report-old-*"):  # a killed swap's old report (report/ is rewritten below)
            _remove(stale)
        final = run_dir / "report"
        old = None
        if final.exists():
            old = run_dir / f".report-old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            _remove(old)


def _remove(path: Path) -> None:
    """``path`` removed, a directory with its files or a file (``report`` made a file by hand), as far as it can."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
