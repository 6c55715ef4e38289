"""Hand-made run directories for the analysis tests (written through jaxinf.run.exports.formats's writers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxinf.analysis import Options
from jaxinf.run.exports.formats import write_documents, write_queries, write_scores

#: Small options so that tests stay fast; statistics are unchanged, only the resampling counts shrink.
FAST = Options(powerlaw_bootstrap=10, permutations=200)


def make_run(
    run_dir: Path,
    scores: np.ndarray,
    kinds=None,
    tasks=None,
    sources=None,
    tokens=None,
    texts=None,
    losses=None,
    answers=None,
    query_ids=None,
    doc_ids=None,
    prompts=None,
    completions=None,
) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    Q, N = scores.shape
    qs = []
    for q in range(Q):
        r = {
            "id": query_ids[q] if query_ids else f"q{q}",
            "prompt": prompts[q] if prompts else f"prompt {q}",
            "completion": completions[q] if completions else f"completion {q}",
        }
        if kinds is not None and kinds[q] is not None:
            r["kind"] = kinds[q]
        if tasks is not None and tasks[q] is not None:
            r["task"] = tasks[q]
        if losses is not None and losses[q] is not None:
            r["loss"] = losses[q]
        if answers is not None and answers[q] is not None:
            r["answer"] = answers[q]
        qs.append(r)
    write_queries(run_dir / "queries.jsonl", qs)
    ds = []
    for n in range(N):
        r = {"id": doc_ids[n] if doc_ids else f"d{n}"}
        if sources is not None and sources[n] is not None:
            r["source"] = sources[n]
        if tokens is not None and tokens[n] is not None:
            r["tokens"] = int(tokens[n])
        if texts is not None and texts[n] is not None:
            r["text"] = texts[n]
        ds.append(r)
    write_documents(run_dir / "documents.jsonl", ds)
    write_scores(run_dir / "scores.npy", scores)
    return run_dir


def structured_scores(rng: np.random.Generator, tasks: list[str], n_docs: int, within: float = 0.8) -> np.ndarray:
    """Scores where queries of a task share a heavy-tailed task component (correlated within task)."""
    names = sorted(set(tasks))
    comp = {t: rng.pareto(1.5, n_docs) * rng.choice([-1, 1], n_docs, p=[0.3, 0.7]) for t in names}
    rows = [within * comp[t] + (1 - within) * rng.pareto(1.5, n_docs) * rng.choice([-1, 1], n_docs) for t in tasks]
    return np.asarray(rows, np.float64)
