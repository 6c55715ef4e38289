"""Benchmark of `jaxinf analyze` on a paper-sized score matrix: time and peak memory per analysis.

    python scripts/bench_analysis.py [--queries 80] [--documents 5000000] [--dir DIR] [--keep]

Writes a synthetic run directory (float32 scores with planted structure: per-task shared
components, heavy tails, one source favoured by the reasoning tasks; documents.jsonl with
ids, sources and token counts) to a temporary directory, then runs, each in a fresh Python
process so that its peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is
its own:

- ``baseline``: imports and reading queries.jsonl + documents.jsonl;
- ``correlations``: the column pass (NaN check, streamed Pearson matrix, totals) and its group statistics;
- ``concentration``, ``powerlaw``, ``sources``: a row pass computing only that analysis;
- ``analyze``: the whole of ``jaxinf.analysis.analyze`` including answers (texts from a
  synthetic text source) and the report.

Prints a markdown table (and JSON) of wall time and peak RSS per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SOURCES = [
    "webdata",
    "code",
    "wiki",
    "stackexchange",
    "arxiv_markdown",
    "math_and_trivia",
    "multilingual",
    "general_knowledge",
]
SOURCE_P = [0.55, 0.15, 0.08, 0.07, 0.05, 0.04, 0.04, 0.02]
KINDS = [("factual", "factual")] * 40 + [("reasoning", "arithmetic")] * 20 + [("reasoning", "slopes")] * 20


def labels(Q: int) -> list[tuple[str, str]]:
    base = KINDS + [("control", "factual_control")] * 10 + [("control", "reasoning_control")] * 10
    return [base[q % len(base)] for q in range(Q)] if Q != 80 else KINDS


def generate(d: Path, Q: int, N: int, seed: int = 0) -> None:
    """Write scores.npy (row by row), queries.jsonl and documents.jsonl into d."""
    rng = np.random.default_rng(seed)
    lab = labels(Q)
    src = rng.choice(len(SOURCES), N, p=SOURCE_P).astype(np.int8)
    tokens = rng.integers(64, 2048, N)
    with open(d / "documents.jsonl", "w") as f:
        for start in range(0, N, 100_000):
            f.write(
                "".join(
                    f'{{"id": "doc{n:08d}", "source": "{SOURCES[src[n]]}", "tokens": {tokens[n]}}}\n'
                    for n in range(start, min(N, start + 100_000))
                )
            )
    with open(d / "queries.jsonl", "w") as f:
        for q, (kind, task) in enumerate(lab):
            f.write(
                json.dumps(
                    {
                        "id": f"q{q}",
                        "prompt": f"question {q} about {task}",
                        "completion": f"the answer is {q * 7 + 3} = {q * 7 + 3}",
                        "kind": kind,
                        "task": task,
                        "loss": 5.0 + q % 7,
                    }
                )
                + "\n"
            )
    tasks = sorted({t for _, t in lab})
    heavy = lambda: rng.standard_t(2.0, N).astype(np.float32)  # noqa: E731
    comp = {t: heavy() for t in tasks}
    favoured = (src == SOURCES.index("math_and_trivia")).astype(np.float32) * 3.0
    with open(d / "scores.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (Q, N)})
        for kind, task in lab:
            w = {"factual": 0.3, "reasoning": 0.8, "control": 0.2}[kind]
            row = w * comp[task] + (1 - w) * heavy()
            if kind == "reasoning":
                row += favoured * np.abs(row)
            f.write((row * 1e-6).astype("<f4").tobytes())


def text_source(ids):
    return {i: f"synthetic text of {i}: the answer is {int(i[3:]) % 600} and more" for i in ids}


def stage(name: str, d: Path) -> dict:
    """Run one stage in this (fresh) process; returns its wall time and peak RSS."""
    t0 = time.time()
    from jaxinf.analysis import concentration as conc
    from jaxinf.analysis import correlations as corr
    from jaxinf.analysis import driver as A
    from jaxinf.analysis import powerlaw as pl
    from jaxinf.analysis import sources as srcs
    from jaxinf.run.exports.formats import ScoreMatrix, read_documents, read_exported_queries

    opts = A.Options()
    queries = read_exported_queries(d / "queries.jsonl")
    docs = read_documents(d / "documents.jsonl")
    scores = ScoreMatrix(d / "scores.npy")
    Q, N = scores.shape
    t1 = time.time()
    if name == "correlations":
        with A.threadpool_limits(limits=opts.blas_threads, user_api="blas"):
            r, _ = A._column_pass(scores, queries, docs, opts.chunk_columns)
        corr.correlation_summary(r, queries.kinds, queries.tasks, opts.permutations, opts.seed)
    elif name in ("concentration", "powerlaw", "sources"):
        totals = None
        if name == "concentration":
            with A.threadpool_limits(limits=opts.blas_threads, user_api="blas"):
                _, totals = A._column_pass(scores, queries, docs, opts.chunk_columns)
        ks = srcs.default_ks(N)
        shares = srcs.corpus_shares(docs.source_codes, len(docs.source_names), docs.tokens)
        k = {
            "concentration": conc.top_count(max(opts.fractions), N),
            "powerlaw": min(opts.powerlaw_top, N),
            "sources": max(ks),
        }[name]
        for q in range(Q):
            row = scores.row(q)
            top, bottom = A._ranked(row, k, True), A._ranked(row, k, False)
            if name == "concentration":
                T = totals[q]
                conc.concentration_shares(row[top], row[bottom], T["positive"], T["negative"], N, opts.fractions)
            elif name == "powerlaw":
                pl.tail_fits(row[top], k, n_bootstrap=opts.powerlaw_bootstrap, seed=q)
                pl.tail_fits(-row[bottom], k, n_bootstrap=opts.powerlaw_bootstrap, seed=Q + q)
            else:
                for ranked in (top, bottom):
                    srcs.source_multipliers(
                        docs.source_codes[ranked], ks, shares["count"], docs.tokens[ranked], shares["tokens"]
                    )
    elif name == "analyze":
        A.analyze(d, opts, text_source=text_source, log=lambda *_: None)
    elif name != "baseline":
        raise SystemExit(f"unknown stage {name}")
    t2 = time.time()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "stage": name,
        "load_s": t1 - t0,
        "compute_s": t2 - t1,
        "wall_s": t2 - t0,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_mb": ru.ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=80)
    ap.add_argument("--documents", type=int, default=5_000_000)
    ap.add_argument("--dir", type=Path, default=None, help="reuse or create the synthetic run here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, args.dir)))
        return
    d = args.dir or Path(tempfile.mkdtemp(prefix="jaxinf-bench-analysis-"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        if not (d / "scores.npy").exists():
            t = time.time()
            generate(d, args.queries, args.documents)
            print(
                f"generated {args.queries} x {args.documents} in {time.time() - t:.0f} s "
                f"({(d / 'scores.npy').stat().st_size / 2**30:.2f} GiB scores) at {d}",
                flush=True,
            )
        rows = []
        load0 = os.getloadavg()[0]
        for name in ("baseline", "correlations", "concentration", "powerlaw", "sources", "analyze"):
            out = subprocess.run(
                [sys.executable, __file__, "--stage", name, "--dir", str(d)],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONHASHSEED": "0"},
            )
            if out.returncode:
                raise SystemExit(f"stage {name} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(res)
            print(json.dumps(res), flush=True)
        print(
            f"\n{args.queries} x {args.documents}; 1-minute load average {load0:.1f} at start, "
            f"{os.getloadavg()[0]:.1f} at end, on {os.cpu_count()} CPUs"
        )
        print(
            "\n| stage | wall time (s) | of which loading inputs (s) | CPU time (s) | peak RSS (MB) |\n"
            "|---|---|---|---|---|"
        )
        for r in rows:
            print(
                f"| {r['stage']} | {r['wall_s']:.1f} | {r['load_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} |"
            )
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
