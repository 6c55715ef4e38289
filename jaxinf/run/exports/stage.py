"""The exports stage of ``jaxinf run``: the scores and what explains them, written in the formats of
:mod:`jaxinf.run.exports.formats`.

From the scoring stage's results: ``scores.npy`` (normalized as ``scores.normalize`` asks),
``self_influence.npy``, ``queries.jsonl``, ``documents.jsonl`` and ``topk.jsonl``; then the per-layer and
per-token breakdowns of each query's top documents (``layers.json``, ``layer_scores.npy``, ``topk_tokens.jsonl``,
:func:`export_breakdowns`): kept by the scoring pass as it went (:mod:`jaxinf.engine.tails`), and computed by one
more pass, through the per-batch loop of :mod:`jaxinf.engine.loop`, for the documents it did not keep. Every
process computes (the breakdown pass runs on the mesh); process 0 writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import jax
import numpy as np

from jaxinf import config as cfg
from jaxinf.atomic import save_npy
from jaxinf.data.tokenize import token_pieces
from jaxinf.engine import programs, scoring
from jaxinf.engine import tails as running_tails
from jaxinf.engine.loop import Kept, run_batches
from jaxinf.engine.tails import Tails
from jaxinf.faults import fault_point
from jaxinf.run import fingerprint
from jaxinf.run.executor import Executor
from jaxinf.run.exports import formats
from jaxinf.run.inputs import Inputs, non_finite_loss
from jaxinf.run.store import RunStore

log = logging.getLogger("jaxinf")


def export(config: cfg.Config, store: RunStore, inputs: Inputs, results: dict, qg, encoded, executor: Executor) -> None:
    """``scores.npy``, ``queries.jsonl``, ``documents.jsonl``, ``topk.jsonl``, and the per-layer and per-token
    breakdowns of each query's top documents (``layers.json``, ``layer_scores.npy``, ``topk_tokens.jsonl``).

    ``results`` are the scoring stage's per-document sums (``scores``, ``loss``, optionally ``self``), ``qg`` the
    prepared query gradients, ``encoded`` the encoded queries."""
    t0 = time.perf_counter()
    primary = jax.process_index() == 0  # every process computes (the breakdowns run on the mesh); process 0 writes
    qloss = executor.fetch(qg.loss).astype(np.float64)
    scores = scoring.normalize(results["scores"], qloss, config.scores.normalize)
    if primary:
        formats.write_scores(store.path("scores.npy"), scores)
        if "self" in results:
            save_npy(store.path("self_influence.npy"), results["self"].astype(np.float32))
        formats.write_queries(
            store.path("queries.jsonl"),
            (
                {
                    "id": q.id,
                    "prompt": q.prompt,
                    "completion": q.completion,
                    "kind": q.kind,
                    "task": q.task,
                    "answer": q.answer,
                    "loss": float(qloss[i]),
                    "tokens": len(encoded[i].ids),
                    "completion_tokens": encoded[i].completion_length,
                    **({"supports": list(q.supports)} if q.supports else {}),
                    **({"model_answer": q.extra["model_answer"]} if q.extra.get("model_answer") is not None else {}),
                }
                for i, q in enumerate(inputs.queries)
            ),
        )
        formats.write_documents(store.path("documents.jsonl"), _document_rows(inputs, results["loss"]))
        if "bound" in results:  # scores.mode: index (jaxinf.run.index_run)
            _write_index_exports(store, inputs, results, qloss, config.scores.normalize)
    k = min(config.scores.topk, inputs.plan.num_documents)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    bottom = np.argsort(scores, axis=1, kind="stable")[:, :k]
    needed = sorted(set(top.ravel().tolist()) | set(bottom.ravel().tolist()))
    docs = {d.index: d for d in inputs.documents.documents(needed)}

    def entry(q, d):
        text = " ".join(docs[d].text.split())
        return {
            "id": docs[d].id,
            "source": docs[d].source,
            "score": float(scores[q, d]),
            "snippet": text[:300] + ("..." if len(text) > 300 else ""),
        }

    if primary:
        formats.write_topk(
            store.path("topk.jsonl"),
            (
                {
                    "query": q.id,
                    "top": [entry(i, int(d)) for d in top[i]],
                    "bottom": [entry(i, int(d)) for d in bottom[i]],
                }
                for i, q in enumerate(inputs.queries)
            ),
        )
    again = export_breakdowns(config, store, inputs, qg, top, docs, executor, results.get("tails"))
    store.mark(
        "exports",
        "done",
        seconds=round(time.perf_counter() - t0, 3),
        documents_scored_again=again,
        files=fingerprint.written(store, fingerprint.EXPORT_FILES) if primary else {},
    )


def _write_index_exports(store: RunStore, inputs: Inputs, results: dict, qloss: np.ndarray, normalize: str) -> None:
    """``index_bounds.npy`` (a bound on ``|exact - scores.npy|`` per query and document, 0 where the score is exact,
    normalized like the scores) and ``index.json`` (per query: the predicted correlation with the exact scores,
    the largest bound; the documents scored exactly to certify the tails)."""
    from jaxinf.atomic import write_json

    bound = np.abs(scoring.normalize(results["bound"], qloss, normalize))
    save_npy(store.path("index_bounds.npy"), np.ascontiguousarray(bound, np.float32))
    write_json(
        store.path("index.json"),
        {
            "rescored_documents": int(results["certified"].sum()),
            "queries": [
                {
                    "id": q.id,
                    "predicted_correlation": float(results["fidelity"][i]),
                    "max_bound": float(bound[i].max(initial=0.0)),
                }
                for i, q in enumerate(inputs.queries)
            ],
        },
    )


def _document_rows(inputs: Inputs, losses: np.ndarray) -> Iterator[dict]:
    from jaxinf.data.documents import iter_documents

    for doc in iter_documents(inputs.documents, chunk=4096):
        yield {
            "id": doc.id,
            "source": doc.source,
            "tokens": int(inputs.lengths[doc.index]),
            "loss": float(losses[doc.index]),
        }


def export_breakdowns(
    config, store, inputs: Inputs, qg, top: np.ndarray, docs: dict, executor: Executor, tails: Tails | None = None
) -> int:
    """Per-layer and per-token scores of each query's top documents (``layers.json``, ``layer_scores.npy``,
    ``topk_tokens.jsonl``): from the scoring pass's ``tails`` (:mod:`jaxinf.engine.tails`, host arrays) where they
    hold a document whole, and from one more pass over the documents they do not (:func:`_breakdown_pass`). Returns
    how many documents that pass scored."""
    t0 = time.perf_counter()
    Q, K = top.shape
    names = scoring.layer_order(inputs.layers)
    rows = np.bincount(inputs.plan.row_document, minlength=inputs.plan.num_documents)  # rows per document
    layer_top = np.zeros((Q, K, len(names)))  # [Q, K, L]
    kept: dict[tuple[int, int], tuple[list[int], np.ndarray]] = {}  # (query, rank) -> (ids, per-token scores)
    for q in range(Q):
        for rank, d in enumerate(top[q].tolist()):
            slot = None if tails is None else running_tails.found(tails, q, d, single_row=bool(rows[d] == 1))
            if tails is not None and slot is not None:
                n = int(tails.length[q, slot])
                layer_top[q, rank] = tails.layers[q, slot]
                kept[q, rank] = tails.ids[q, slot, :n].tolist(), np.asarray(tails.tokens[q, slot, :n])
    wanted = sorted({int(top[q, rank]) for q in range(Q) for rank in range(K) if (q, rank) not in kept})
    position = {d: i for i, d in enumerate(wanted)}
    tokens: dict[int, list[tuple[int, list[int], np.ndarray]]] = {}
    if wanted:
        per_layer, tokens = _breakdown_pass(config, inputs, qg, wanted, executor)
        for q in range(Q):
            for rank, d in enumerate(top[q].tolist()):
                if (q, rank) not in kept:
                    layer_top[q, rank] = per_layer[:, q, position[d]]
    log.info(
        "exports: breakdowns of %d of %d top documents kept by the scoring pass, %d documents scored again (%.1fs)",
        len(kept),
        Q * K,
        len(wanted),
        time.perf_counter() - t0,
    )
    if jax.process_index() != 0:
        return len(wanted)
    formats.write_layer_exports(store.root, names, layer_top)
    fault_point("exports", 1)  # half the exports written: what a Ctrl-C or a kill here leaves must not count
    vocab = inputs.encoder.tokenizer

    def records():
        for q, query in enumerate(inputs.queries):
            for rank, d in enumerate(top[q].tolist()):
                ids, sc = kept[q, rank] if (q, rank) in kept else _join_chunks(tokens[position[d]], q)
                yield {
                    "query": query.id,
                    "document": docs[d].id,
                    "rank": rank,
                    "tokens": [
                        {"text": vocab.id_to_token(t) or "", "piece": piece, "score": float(v)}
                        for t, piece, v in zip(ids, token_pieces(vocab, ids), sc)
                    ],
                }

    formats.write_topk_tokens(store.path("topk_tokens.jsonl"), records())
    return len(wanted)


def _breakdown_pass(config, inputs: Inputs, qg, wanted: list[int], executor: Executor):
    """Per-layer scores ``[L, Q, len(wanted)]`` and per-token scores (subset document -> ``[(chunk, ids, [Q, n])]``)
    of the documents ``wanted``, from a pass over just those.

    The pass is not resumed (the exports stage runs again whole) and checks no loss: the scoring stage has already
    checked these documents'."""
    subset, batches = inputs.subset_batches(config, wanted, executor)
    fn = programs.breakdowns(config, inputs.task, inputs.layers).jit(executor, batches)

    def step(carry, batch, i):
        return carry, fn(inputs.lm.params, qg, batch), None

    kept = Kept(every=1)  # each batch's outputs brought to the host at once
    run_batches(
        "breakdowns",
        step,
        batches.iterate,
        None,
        kept,
        total=len(batches),
        non_finite=non_finite_loss(subset, "document"),
        device=executor,
        fields=("index", "chunk", "mask", "tokens"),
    )  # every process's rows
    per_layer = np.zeros((len(scoring.layer_order(inputs.layers)), qg.num_queries, len(wanted)))
    tokens: dict[int, list[tuple[int, list[int], np.ndarray]]] = {}
    for (stacked, token_scores), rows in kept.batches:
        for j, d in enumerate(rows["index"].tolist()):
            if d < 0:
                continue
            per_layer[:, :, d] += stacked[:, :, j]
            n = int(rows["mask"][j].sum())
            tokens.setdefault(d, []).append(
                (int(rows["chunk"][j]), rows["tokens"][j, :n].tolist(), token_scores[:, j, :n])
            )
    return per_layer, tokens


def _join_chunks(chunks: list, q: int) -> tuple[list[int], np.ndarray]:
    """A document's tokens and query ``q``'s per-token scores, its chunks joined (a shared token's scores added)."""
    chunks = sorted(chunks, key=lambda c: c[0])
    ids, scores = list(chunks[0][1]), list(chunks[0][2][q])
    for _, more_ids, more in chunks[1:]:
        scores[-1] += more[q][0]
        ids += more_ids[1:]
        scores += list(more[q][1:])
    return ids, np.asarray(scores)
