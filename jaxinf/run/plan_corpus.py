"""``jaxinf plan --corpus``: the corpus a run would read, counted, and the passes the run makes over it.

Opens ``data.documents`` as a run opens it (the same reader, field names and ``data.dedupe``), counts every
document's tokens with the checkpoint's tokenizer (one tokenization pass, logged with its progress; a document
over ``data.max_length`` is counted in a bounded prefix when documents are truncated, as a run counts it) and
makes the run's batch plan from the counts: rows, the tokens kept, what truncation cuts, the padding. The time
estimate of :mod:`jaxinf.run.plan` is then made for these rows at their padded length instead of ``plan.documents``
of ``plan.tokens_per_document``.

The passes: the curvature is fitted in two passes over the first ``factors.max_documents`` documents
(covariance, then Lambda), none with ``factors.from``; ``scores.mode: exact`` scores every document in one pass;
an index (``index.k``) is built in one pass over every document. The counts go into the shared token-count cache
(:func:`jaxinf.run.inputs.token_count_cache`), where a run of the same corpus and tokenizer finds them instead of
counting again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxinf.run import preflight

if TYPE_CHECKING:
    from jaxinf import config as cfg


def corpus_plan(config) -> tuple[dict, cfg.Config]:
    """The corpus of ``config`` counted (a JSON-able dict: documents, tokens, the plan's report, the passes) and
    ``config`` with ``plan.documents`` and ``plan.tokens_per_document`` set to the corpus's rows and its batches'
    token slots per row (padding, padding rows of the last batches included: what the steps compute). Raises
    :class:`jaxinf.data.errors.DataError` for a bad corpus and :class:`jaxinf.run.preflight.PreflightError` for one
    without a document of 2 tokens (an empty one: planned as 0 documents in "1 rows of 48 tokens"), as a run would
    (the run's own reader and check: :func:`jaxinf.run.inputs.open_corpus`, :func:`jaxinf.run.preflight.check_corpus`)."""
    from jaxinf.data.batching import make_batch_plan
    from jaxinf.data.errors import DataError
    from jaxinf.data.tokenize import TextEncoder
    from jaxinf.models.hf import load_tokenizer
    from jaxinf.models.tokenizer import tokenizer_file
    from jaxinf.run.inputs import buckets, document_lengths, open_corpus

    d = config.data
    if d.documents is None:
        raise DataError("data.documents: not set (jaxinf plan --corpus counts the documents it names)")
    documents = open_corpus(config)
    encoder = TextEncoder(load_tokenizer(config.model.checkpoint))
    limit = d.max_length if d.long_documents == "truncate" else None
    lengths = document_lengths(None, documents, encoder, limit=limit)  # the shared cache's, or counted into it
    preflight.check_corpus(
        lengths,
        getattr(documents, "name", d.documents),
        config.factors.max_documents,
        str(tokenizer_file(config.model.checkpoint)),
    )
    args = dict(
        batch_size=d.batch_size, max_length=d.max_length, long_documents=d.long_documents, buckets=buckets(d.max_length)
    )
    report = make_batch_plan(lengths, **args).report
    n_fit = len(lengths) if config.factors.max_documents is None else min(config.factors.max_documents, len(lengths))
    fit = report if n_fit == len(lengths) else make_batch_plan(lengths[:n_fit], **args).report
    passes: list[dict[str, Any]] = []
    if config.factors.from_run is None:
        passes += [
            {"stage": "covariance", "documents": n_fit, "rows": fit.rows, "tokens": fit.tokens},
            {"stage": "lambda", "documents": n_fit, "rows": fit.rows, "tokens": fit.tokens},
        ]
    whole = {"documents": report.documents, "rows": report.rows, "tokens": report.tokens}
    if config.scores.mode == "exact":
        passes.append({"stage": "scores", **whole})
    if config.index.k is not None:
        passes.append({"stage": "index", **whole})
    out = {
        "documents": getattr(documents, "name", d.documents),
        "read": documents.report.summary(),
        "counted_documents": len(lengths),
        "counted_tokens": int(np.sum(lengths)),
        "bounded_prefix": limit,
        "plan": report.to_dict(),
        "passes": passes,
        "tokens_read": int(sum(p["tokens"] for p in passes)),
    }
    per_row = math.ceil(report.padded_tokens / report.rows) if report.rows else d.max_length
    timed = dataclasses.replace(
        config,
        plan=dataclasses.replace(config.plan, documents=max(report.rows, 1), tokens_per_document=max(per_row, 1)),
    )
    return out, timed


def format_corpus(c: dict, config) -> str:
    """The corpus block of ``jaxinf plan --corpus``'s text."""
    p = c["plan"]
    prefix = (
        f"; a document over data.max_length={c['bounded_prefix']} counted in a bounded prefix"
        if c["bounded_prefix"] is not None
        else ""
    )
    lines = [
        f"corpus {c['read']}",
        (
            f"  token counts: {c['counted_tokens']:,} tokens in {c['counted_documents']:,} documents (the "
            f"checkpoint's tokenizer, special tokens included{prefix})"
        ),
        f"  rows of data.max_length={config.data.max_length} (data.long_documents={config.data.long_documents}): "
        + ", ".join(
            [f"{p['rows']:,} rows", f"{p['tokens']:,} tokens kept"]
            + (
                [f"{p['truncated_documents']:,} documents truncated ({p['truncated_tokens']:,} tokens cut)"]
                if p["truncated_documents"]
                else []
            )
            + ([f"{p['split_documents']:,} documents split"] if p["split_documents"] else [])
            + [f"{100 * p['padding_fraction']:.1f}% padding"]
        ),
    ]
    if c["passes"]:
        lines.append(
            "  passes over the corpus: "
            + ", ".join(
                f"{q['stage']} ({q['documents']:,} documents, {q['rows']:,} rows, {q['tokens']:,} tokens)"
                for q in c["passes"]
            )
            + f"; {c['tokens_read']:,} tokens in all, after one token-count pass"
        )
    else:
        lines.append("  passes over the corpus: none (factors.from and scores from another run's index)")
    return "\n".join(lines)


def command(config, meshes: list[tuple[int, int]], compile: bool, json_out: str | None, chip=None) -> int:
    """``jaxinf plan --corpus``: :func:`jaxinf.run.plan_report.command` with the corpus counted and the time estimate made for
    it."""
    from jaxinf.run import plan, plan_report

    corpus, timed = corpus_plan(config)
    result = plan.plan(timed, meshes, compile=compile, chip=chip)
    result["corpus"] = corpus
    out = plan_report.table_stream(json_out)
    print(plan_report.format_plan(result, timed), file=out)
    print(file=out)
    print(format_corpus(corpus, timed), file=out)
    print(
        f"  hours above: the corpus's {corpus['plan']['padded_tokens']:,} token slots of its batches (padding "
        f"included) as {timed.plan.documents:,} rows of {timed.plan.tokens_per_document} tokens, in place of "
        "plan.documents and plan.tokens_per_document",
        file=out,
    )
    return plan_report.finish(result, config, json_out)
