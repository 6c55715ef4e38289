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

With ``--seeds N`` it does steps 2-4 for training seeds ``0 .. N-1`` (the model's initialization and batch
order) on the same corpus, seed 0 in ``--out`` as above and seed ``k`` in ``--out/seed-k``, and writes the
findings' verdicts across the seeds (``seeds.json``, ``seeds.md``, and a section of seed 0's report).

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

from jaxinf.atomic import write_atomic, write_json, write_jsonl

log = logging.getLogger("jaxinf")

DEMO_CONFIG: dict[str, dict[str, Any]] = {
    "data": {"max_length": 64, "batch_size": 32, "query_batch_size": 8},
    "factors": {"strategy": "ekfac", "fisher": "sampled", "track": "mlp"},
    "scores": {"query_rank": 16, "topk": 10},
}


QUERIES_PER_TASK = 8


def main(out: str | Path = "runs/demo", n_documents: int = 3000, train_steps: int = 1200, seeds: int = 1) -> Path:
    """Runs (or resumes, or reuses) every step of the demo for training seeds ``0 .. seeds-1``; returns seed 0's
    run directory. With more than one seed it also writes the verdicts of the paper's findings across the seeds
    (:func:`jaxinf.analysis.seeds.seed_table`) as ``seeds.json`` and ``seeds.md`` in ``out``, and into seed 0's
    report."""
    from jaxinf.run.lock import claim_output
    from jaxinf.run.rundir import output_named

    if seeds < 1:
        raise ValueError(f"seeds={seeds}: the demo trains at least one model")
    out = Path(out)
    with output_named("--out"):  # the messages name the command's option, for the demo's runs too
        lock = claim_output(out, "demo")  # the output-directory rule and lock of jaxinf run's
        try:
            return _main(out, n_documents, train_steps, seeds)
        finally:
            lock.release()


def seed_dir(out: Path, seed: int) -> Path:
    """Where seed ``seed``'s model, queries and run are: ``out`` itself for seed 0 (the layout of a one-seed demo),
    ``out/seed-<seed>`` for the others."""
    return out if seed == 0 else out / f"seed-{seed}"


def _main(out: Path, n_documents: int, train_steps: int, seeds: int) -> Path:
    from jaxinf.demo import corpus

    t0 = time.perf_counter()
    docs_path = out / "data" / "documents.jsonl"
    docs = corpus.documents(0, n_documents)  # one corpus for every seed
    runs = []
    for seed in range(seeds):
        runs.append(_seed(seed_dir(out, seed), seed, docs, docs_path, n_documents, train_steps))
        if seeds > 1:
            print(f"\n=== training seed {seed}: {runs[-1]}")
        _print_highlights(runs[-1])
    if seeds > 1:
        _write_seed_table(out, runs)
    log.info("demo: done in %.0fs; open %s", time.perf_counter() - t0, runs[0] / "report" / "index.html")
    return runs[0]


def _seed(where: Path, seed: int, docs: list[dict], docs_path: Path, n_documents: int, train_steps: int) -> Path:
    """The demo for one training seed in ``where``: the corpus (written once, at ``docs_path``), the model, its
    completions of the queries, ``jaxinf run``; returns the run directory."""
    from jaxinf import config as cfg
    from jaxinf import pipeline
    from jaxinf.demo import corpus, train

    stamp = written_by(n_documents, train_steps, seed)
    if discard_stale(where, stamp) and seed == 0:  # seed 0's directory holds the table of the seeds
        for stale in (where / SEEDS_JSON, where / SEEDS_MD, where / "run" / SEEDS_JSON):
            stale.unlink(missing_ok=True)  # a table that seed 0's former run was part of
    data = where / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_json(where / STAMP, stamp)  # before anything is made: an interrupted demo resumes what it made
    if not docs_path.exists():
        write_jsonl(docs_path, docs)
        log.info("demo: wrote %d documents to %s", len(docs), docs_path)
    lm, tok, model_dir = train.train(where, [d["text"] for d in docs], steps=train_steps, seed=seed)
    queries_path = data / "queries.jsonl"
    if not queries_path.exists():
        prompts = corpus.queries(0, QUERIES_PER_TASK)
        free = [q for q in prompts if not q.completion]  # the template-matched controls (last) have theirs
        completions = dict(zip((q.id for q in free), train.complete(lm, tok, [q.prompt for q in free])))
        rows = [query_row(q, q.completion or completions[q.id], docs) for q in prompts]
        write_jsonl(queries_path, rows)
        split = [r for r in map(answer_token_row, rows) if r is not None]
        write_jsonl(data / "queries_answer_tokens.jsonl", split)
        log.info("demo: the model of seed %d completed %d queries (%s)", seed, len(prompts), queries_path)
    config_path = where / "config.yaml"
    raw = {
        **DEMO_CONFIG,
        "model": {"checkpoint": str(model_dir)},
        "data": {**DEMO_CONFIG["data"], "documents": str(docs_path), "queries": str(queries_path)},
        "run": {"out": str(where / "run")},
    }
    write_atomic(
        config_path,
        "# written by jaxinf demo; rerun with: jaxinf run "
        + str(config_path)
        + "\n"
        + yaml.safe_dump(raw, sort_keys=False),
    )
    return pipeline.run(cfg.load(config_path))


SEEDS_JSON = "seeds.json"
SEEDS_MD = "seeds.md"


def _write_seed_table(out: Path, runs: list[Path]) -> None:
    """The findings' verdicts of every seed's run (:func:`jaxinf.analysis.seeds.seed_table`): ``out/seeds.json``,
    ``out/seeds.md``, printed, and in seed 0's report (its ``seeds.json``, then the analysis run again if its
    summary has another table)."""
    from jaxinf.analysis import seeds as sd
    from jaxinf.analysis.driver import analyze
    from jaxinf.run.lock import RunLock

    table = sd.seed_table(
        [(seed, run, json.loads((run / "summary.json").read_text())) for seed, run in enumerate(runs)]
    )
    write_json(out / SEEDS_JSON, table)
    text = sd.seeds_markdown(table)
    write_atomic(out / SEEDS_MD, text)
    print("\n" + text)
    first = runs[0]
    if json.loads((first / "summary.json").read_text()).get("seeds") != table:
        write_json(first / sd.FILE, table)
        lock = RunLock(first).acquire()
        try:
            analyze(first, log=log.info)
        finally:
            lock.release()
        log.info("demo: the verdicts across seeds added to %s", first / "report" / "index.html")


STAMP = "written_by.json"
MADE = ("data", "model", "train")
"""What the demo makes before ``jaxinf run``: the corpus and queries, the model, its training checkpoints."""


def written_by(n_documents: int, train_steps: int, seed: int = 0) -> dict:
    """What the demo's corpus, model and queries depend on: the source of the code that makes them
    (``jaxinf/demo`` and ``jaxinf/models``, hashed), the versions of jax, flax and optax that train the model, the
    demo's sizes and the training seed."""
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
        "seed": seed,
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
