"""``jaxinf demo``: the whole pipeline on a corpus and a model built here, in a few minutes on a laptop.

1. write the built-in corpus (:mod:`jaxinf.demo.corpus`) as ``data/documents.jsonl``;
2. train a small Llama on it with optax (:mod:`jaxinf.demo.train`; Orbax
   checkpoints, resumed after an interruption, reused by the next run) and write
   it as a Hugging Face checkpoint directory ``model/``;
3. let the model complete factual, reasoning and control prompts (``data/queries.jsonl``; the
   template-matched controls come with their completions);
4. ``jaxinf run`` on ``config.yaml``: EK-FAC on the MLP layers, scores of every
   document for every query, exports, the paper's analyses and ``run/report/index.html``.

It also writes ``data/queries_answer_tokens.jsonl`` (:func:`answer_token_row`), the queries
whose measured tokens are only their answers; scoring it is an option (docs/analysis.md).

Everything lands in ``--out`` (default ``runs/demo``); a second run reuses what exists, if the same code and
settings wrote it (:func:`written_by`, kept in ``written_by.json``); otherwise the corpus, the model and the
queries are made again.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from jaxinf.atomic import write_json, write_jsonl

log = logging.getLogger("jaxinf")

DEMO_CONFIG: dict[str, dict[str, Any]] = {
    "data": {"max_length": 64, "batch_size": 32, "query_batch_size": 8},
    "factors": {"strategy": "ekfac", "fisher": "sampled", "track": "mlp"},
    "scores": {"query_rank": 16, "topk": 10},
}


QUERIES_PER_TASK = 8


def main(out: str | Path = "runs/demo", n_documents: int = 3000, train_steps: int = 1200) -> Path:
    """Runs (or resumes, or reuses) every step of the demo; returns the run directory."""
    from jaxinf.run.lock import claim_output

    out = Path(out)
    lock = claim_output(out, "demo")  # the output-directory rule and lock of jaxinf run's
    try:
        return _main(out, n_documents, train_steps)
    finally:
        lock.release()


def _main(out: Path, n_documents: int, train_steps: int) -> Path:
    from jaxinf import config as cfg
    from jaxinf import pipeline
    from jaxinf.demo import corpus, train

    t0 = time.perf_counter()
    data = out / "data"
    stamp = written_by(n_documents, train_steps)
    discard_stale(out, stamp)
    data.mkdir(parents=True, exist_ok=True)
    write_json(out / STAMP, stamp)  # before anything is made: an interrupted demo resumes what it made
    docs_path = data / "documents.jsonl"
    docs = corpus.documents(0, n_documents)
    if not docs_path.exists():
        write_jsonl(docs_path, docs)
        log.info("demo: wrote %d documents to %s", len(docs), docs_path)
    lm, tok, model_dir = train.train(out, [d["text"] for d in docs], steps=train_steps)
    queries_path = data / "queries.jsonl"
    if not queries_path.exists():
        prompts = corpus.queries(0, QUERIES_PER_TASK)
        free = [q for q in prompts if not q.completion]  # the template-matched controls (last) have theirs
        completions = dict(zip((q.id for q in free), train.complete(lm, tok, [q.prompt for q in free])))
        rows = [query_row(q, q.completion or completions[q.id], docs) for q in prompts]
        write_jsonl(queries_path, rows)
        split = [r for r in map(answer_token_row, rows) if r is not None]
        write_jsonl(data / "queries_answer_tokens.jsonl", split)
        log.info("demo: the model completed %d queries (%s)", len(prompts), queries_path)
    config_path = out / "config.yaml"
    raw = {
        **DEMO_CONFIG,
        "model": {"checkpoint": str(model_dir)},
        "data": {**DEMO_CONFIG["data"], "documents": str(docs_path), "queries": str(queries_path)},
        "run": {"out": str(out / "run")},
    }
    config_path.write_text(
        "# written by jaxinf demo; rerun with: jaxinf run "
        + str(config_path)
        + "\n"
        + yaml.safe_dump(raw, sort_keys=False)
    )
    run_dir = pipeline.run(cfg.load(config_path))
    _print_highlights(run_dir)
    log.info("demo: done in %.0fs; open %s", time.perf_counter() - t0, run_dir / "report" / "index.html")
    return run_dir


STAMP = "written_by.json"
MADE = ("data", "model", "train")
"""What the demo makes before ``jaxinf run``: the corpus and queries, the model, its training checkpoints."""


def written_by(n_documents: int, train_steps: int) -> dict:
    """What the demo's corpus, model and queries depend on: the source of the code that makes them
    (``jaxinf/demo`` and ``jaxinf/models``, hashed), the versions of jax, flax and optax that train the model, and
    the demo's sizes."""
    import hashlib
    from importlib.metadata import version

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*(root / "demo").rglob("*.py"), *(root / "models").rglob("*.py")]):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return {
        "code": digest.hexdigest()[:16],
        **{name: version(name) for name in ("jax", "flax", "optax")},
        "documents": n_documents,
        "train_steps": train_steps,
    }


def discard_stale(out: Path, stamp: dict) -> list[str]:
    """Removes what the demo made in ``out`` (:data:`MADE`) when other code or settings made it (its
    ``written_by.json`` differs from ``stamp``, or is missing beside what it made); returns the keys that differed
    (empty: nothing removed). ``jaxinf run`` then recomputes what the new inputs change."""
    import shutil

    path = out / STAMP
    made = [out / name for name in MADE if (out / name).exists()]
    if not made:
        return []
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        before = {}
    changed = sorted(k for k in stamp if before.get(k) != stamp[k]) if isinstance(before, dict) else sorted(stamp)
    if not changed:
        return []
    log.warning(
        "demo: %s was made by other code or settings (%s differ); making the corpus, model and queries again",
        out,
        ", ".join(changed),
    )
    path.unlink(missing_ok=True)
    for p in made:
        shutil.rmtree(p)
    return changed


def query_row(q, completion: str, docs: list[dict]) -> dict:
    """A row of ``queries.jsonl``. Its ``answer`` is the correct answer (what the prompt determines); its
    ``model_answer`` the answer the model's completion gives in the same place (a factual completion's first
    word; a reasoning completion's number where the answer stands, :data:`jaxinf.demo.corpus.ANSWER_PLACE`),
    right or wrong. The analysis searches the top documents for both (finding 2 compares each kind of answer
    across query kinds); controls have no model answer (a template-matched control's completion is given)."""
    from jaxinf.analysis.answers import numbers_in
    from jaxinf.demo import corpus

    row = {
        "id": q.id,
        "prompt": q.prompt,
        "completion": completion,
        "kind": q.kind,
        "task": q.task,
        "answer": q.answer or None,
    }
    if q.kind == "reasoning":
        given = numbers_in(completion)
        row["model_answer"] = given[corpus.ANSWER_PLACE[q.task]] if given else None
    elif q.kind == "factual":
        words = completion.split()
        row["model_answer"] = words[0] if words else None
    if q.fact:
        row["supports"] = corpus.supports(docs, q)
    return row


def answer_token_row(row: dict) -> dict | None:
    """The query of a ``queries.jsonl`` row whose completion is only the answer its completion gives: the
    completion up to that answer moves to the end of the prompt, the rest after it is dropped. Scored, its
    influence comes from the answer's tokens alone (the demo's tokenizer splits on spaces, so the tokens are
    the original ones). The answer stands where :func:`query_row` takes ``model_answer`` from (a template-matched
    control's copied number likewise); None for queries without one (the other controls)."""
    from jaxinf.analysis.answers import NUMBER
    from jaxinf.demo import corpus

    completion = row["completion"]
    if row["kind"] == "factual":
        head, answer = "", (completion.split() or [""])[0]
    elif row["task"] in corpus.ANSWER_PLACE:
        numbers = list(NUMBER.finditer(completion))
        if not numbers:
            return None
        m = numbers[corpus.ANSWER_PLACE[row["task"]]]
        head, answer = completion[: m.start()].strip(), m.group(0)
    else:
        return None
    if not answer:
        return None
    return {**row, "prompt": f"{row['prompt']} {head}" if head else row["prompt"], "completion": answer}


def _print_highlights(run_dir: Path) -> None:
    """For one query of each task: its completion and the sources of its three most influential documents;
    then the verdict on each of the paper's findings (:mod:`jaxinf.analysis.findings`)."""
    from jaxinf.analysis.findings import verdict_text

    queries = {q["id"]: q for q in map(json.loads, (run_dir / "queries.jsonl").read_text().splitlines())}
    seen = set()
    for line in (run_dir / "topk.jsonl").read_text().splitlines():
        row = json.loads(line)
        q = queries[row["query"]]
        if q["task"] in seen:
            continue
        seen.add(q["task"])
        print(f"\n[{q['kind']}/{q['task']}] {q['prompt']!r} -> {q['completion']!r}")
        for doc in row["top"][:3]:
            print(f"  {doc['score']:+10.2f}  {doc['source']:<10}  {doc['snippet'][:90]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    print()
    for f in summary.get("findings", []):  # a summary written before findings were tested has none
        print(f"finding, {f['name']}: {verdict_text(f)}; {f['statistic']}")
