"""The EK-FAC index against the exact scoring pass, on the bench world of ``bench_vs_kronfluence.py``.

    python scripts/bench_index.py [--size small] [--k 8 --k 32 --k full] [--documents N] [--topk 100] [--json PATH]

1. ``jaxinf run`` with ``scores.mode: exact`` (the oracle): every stage's time from its ``run.json``.
2. For each ``k``: ``jaxinf run`` with ``factors.from`` the oracle, ``index.k=k`` and ``scores.mode: index``
   (the index pass, then scores from the index with the tails certified): the index pass, the matrix product and
   the certification, and the agreement of its ``scores.npy`` with the oracle's per query (Pearson, Spearman,
   top-10 and top-100 overlap of both tails), beside each query's predicted correlation (``index.json``).
3. A new set of queries (as many as the world's, new text) against the largest-``k`` index with ``jaxinf query``
   (its own process, compilation cache warm from a first call) against ``jaxinf run`` of the same queries with
   ``factors.from`` (the exact scoring pass): whole process and scoring stage.

With ``--decay ALPHA`` the world's random Llama is given decaying spectra before anything runs (:func:`decay`): its
RMSNorm scales and the MLP's hidden units are scaled by ``i^-ALPHA`` (in a random order), so its Kronecker factors'
eigenvalues fall off as a trained model's do, where the random model's are nearly flat. The same documents and
queries; ``--root`` should then differ from the flat world's.

``--documents N`` overrides the size's number of documents (more random documents of the same kind) and ``--topk``
the tails every run reports and the index certifies (``scores.topk``, default 100). A new query's process pays a
fixed cost (its gradients, programs, the analysis) plus an exact rescoring of the documents in its certified tails,
at most ``2 x topk`` per query whatever the corpus; the exact rerun pays a whole scoring pass. Growing the corpus
with ``--documents`` at a small ``--topk`` shows where the first stops being a fraction of the second.

With ``--empirical-whole-run`` instead: under ``factors.fisher: empirical`` the Lambda pass writes the index, so
``jaxinf run index.k=full scores.mode=index`` makes two passes over the corpus where the exact run makes three;
both whole runs (fresh processes, the compilation cache warm from a first call of each), ``--repeat`` times
alternating, with their stage times and the agreement of the scores.

Each run is a fresh ``python -m jaxinf`` process; times are wall-clock seconds on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def jaxinf(args, cache: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXINF_COMPILATION_CACHE": str(cache)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "jaxinf", "-q", *map(str, args)], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"jaxinf {' '.join(map(str, args[:2]))} failed: {r.stderr[-3000:]}")
    return time.perf_counter() - t0


def stage_seconds(run: Path) -> dict:
    stages = json.loads((run / "run.json").read_text())["stages"]
    out = {}
    for name, st in stages.items():
        t = st.get("timing", {}).get("seconds", st.get("seconds"))
        if t is not None:
            out[name] = float(t)
    return out


def overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def agreement(got: np.ndarray, want: np.ndarray) -> dict:
    rows = []
    for q in range(len(want)):
        rows.append(
            {
                "pearson": float(np.corrcoef(got[q], want[q])[0, 1]),
                "spearman": float(stats.spearmanr(got[q], want[q]).statistic),
                "top10": overlap(got[q], want[q], 10),
                "top100": overlap(got[q], want[q], 100),
                "bottom10": overlap(-got[q], -want[q], 10),
                "bottom100": overlap(-got[q], -want[q], 100),
            }
        )
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} | {
        "min_spearman": min(r["spearman"] for r in rows)
    }


def decay(model: Path, alpha: float, seed: int = 0) -> None:
    """Rescales the Llama checkpoint at ``model`` in place so that its Kronecker factors' spectra decay: every
    RMSNorm scale becomes ``i^-alpha`` (``i = 1 .. hidden``, randomly permuted, normalized to keep the RMS), and each
    MLP's hidden unit ``i`` is scaled by ``i^-alpha`` on ``up_proj``'s output and, in another order, on
    ``down_proj``'s input. The inputs of every MLP projection, and the gradients reaching them, then have a few
    dominant directions."""
    import torch
    import transformers

    m = transformers.LlamaForCausalLM.from_pretrained(model)
    gen = torch.Generator().manual_seed(seed)

    def profile(n):
        p = torch.arange(1, n + 1, dtype=torch.float32) ** -alpha
        return (p * n**0.5 / p.norm())[torch.randperm(n, generator=gen)]

    with torch.no_grad():
        for layer in m.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(profile(norm.weight.shape[0]))
            hidden = profile(layer.mlp.up_proj.weight.shape[0])
            layer.mlp.up_proj.weight.mul_(hidden[:, None])
            layer.mlp.down_proj.weight.mul_(torch.roll(hidden, 7)[None, :])
        m.model.norm.weight.copy_(profile(m.model.norm.weight.shape[0]))
    m.save_pretrained(model)


def main(argv=None) -> None:
    import bench_vs_kronfluence as bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=list(bench.SIZES))
    ap.add_argument("--k", action="append", help="index.k values (default 8, 32, full)")
    ap.add_argument("--root", default="/tmp/jaxinf-bench-index")
    ap.add_argument("--query-rank", type=int, default=32)
    ap.add_argument("--documents", type=int, help="override the size's number of documents")
    ap.add_argument("--topk", type=int, default=100, help="scores.topk of every run (the tails certified)")
    ap.add_argument("--json")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="keep the runs a previous call left in --root (their numbers are not measured again)",
    )
    ap.add_argument(
        "--empirical-whole-run",
        action="store_true",
        help="the whole-run comparison under the empirical Fisher (see the module docstring)",
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decay", type=float, help="give the world's model decaying spectra (see the module docstring)")
    ap.add_argument(
        "--no-new-queries", action="store_true", help="skip step 3 (the new queries against the largest-k index)"
    )
    args = ap.parse_args(argv)
    ks = args.k or ["8", "32", "full"]
    size = dict(bench.SIZES[args.size], **({"documents": args.documents} if args.documents else {}))
    root = Path(args.root)
    w = (
        {
            "model": root / "world" / "model",
            "docs": root / "world" / "docs.jsonl",
            "queries": root / "world" / "queries.jsonl",
        }
        if args.reuse
        else bench.build(root / "world", size)
    )
    if args.decay and not args.reuse:
        decay(w["model"], args.decay)
    new_queries = root / "world" / "new_queries.jsonl"
    rng = np.random.default_rng(1)
    words = lambda n: " ".join(f"w{t}" for t in rng.integers(1, size["vocab"], n))  # noqa: E731
    new_queries.write_text(
        "".join(
            json.dumps({"id": f"n{i}", "prompt": words(24), "completion": words(8)}) + "\n"
            for i in range(size["queries"])
        )
    )
    base = [*bench.run_settings(w, size, query_svd="full", query_rank=args.query_rank), f"scores.topk={args.topk}"]
    cache = root / "xla"
    if args.empirical_whole_run:
        return empirical_whole_run(base, root, cache, args)
    result = {"size": args.size, "documents": size["documents"], "queries": size["queries"], "topk": args.topk, "k": {}}
    exact = root / "exact"

    def done(run: Path) -> bool:
        return args.reuse and (run / "scores.npy").exists()

    result["exact_process_seconds"] = (
        None if done(exact) else jaxinf(["run", *base, f"run.out={exact}", "--overwrite"], cache)
    )
    result["exact_stages"] = stage_seconds(exact)
    want = np.load(exact / "scores.npy")
    print(f"exact run: {result['exact_process_seconds']}s, stages {result['exact_stages']}", flush=True)
    for k in ks:
        out = root / f"index-{k}"
        seconds = (
            None
            if done(out)
            else jaxinf(
                [
                    "run",
                    *base,
                    f"run.out={out}",
                    f"factors.from={exact}",
                    f"index.k={k}",
                    "scores.mode=index",
                    "--overwrite",
                ],
                cache,
            )
        )
        record = json.loads((out / "run.json").read_text())["stages"]
        fid = json.loads((out / "index.json").read_text())
        row = {
            "process_seconds": seconds,
            "index_pass_seconds": record["index"]["timing"]["seconds"],
            "cells": record["index"]["cells"],
            "bytes_per_row": record["index"]["bytes_per_row"],
            "rotate_seconds": record["scores"].get("rotate_seconds"),
            "product_seconds": record["scores"]["product_seconds"],
            "rescored": record["scores"]["rescored"],
            "rescored_rounds": record["scores"].get("rescored_rounds"),
            "scores_stage_seconds": record["scores"]["seconds"],
            "predicted_correlation": float(np.mean([q["predicted_correlation"] for q in fid["queries"]])),
            **agreement(np.load(out / "scores.npy"), want),
        }
        result["k"][k] = row
        print(f"k={k}: {json.dumps(row)}", flush=True)
    result["decay"] = args.decay
    if args.no_new_queries:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return
    largest = root / f"index-{ks[-1]}"
    answers = root / "answers"
    jaxinf(["query", largest, new_queries, "--out", answers, "--overwrite"], cache)  # fills the cache
    q_seconds = jaxinf(["query", largest, new_queries, "--out", answers, "--overwrite"], cache)
    exact_new = root / "exact-new"
    jaxinf(
        ["run", *base, f"data.queries={new_queries}", f"run.out={exact_new}", f"factors.from={exact}", "--overwrite"],
        cache,
    )
    e_seconds = jaxinf(
        ["run", *base, f"data.queries={new_queries}", f"run.out={exact_new}", f"factors.from={exact}", "--overwrite"],
        cache,
    )
    qrec = json.loads((answers / "run.json").read_text())["stages"]
    result["new_queries"] = {
        "query_process_seconds": q_seconds,
        "exact_process_seconds": e_seconds,
        "index_product_seconds": qrec["scores"]["product_seconds"],
        "index_rotate_seconds": qrec["scores"].get("rotate_seconds"),
        "index_scores_stage_seconds": qrec["scores"]["seconds"],
        "exact_scores_stage_seconds": stage_seconds(exact_new).get("scores"),
        "rescored": qrec["scores"]["rescored"],
        "rescored_rounds": qrec["scores"].get("rescored_rounds"),
        "query_stages": stage_seconds(answers),
        "exact_stages": stage_seconds(exact_new),
        **agreement(np.load(answers / "scores.npy"), np.load(exact_new / "scores.npy")),
    }
    print(f"new queries: {json.dumps(result['new_queries'])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def empirical_whole_run(base: list[str], root: Path, cache: Path, args) -> None:
    """Whole ``jaxinf run`` processes under the empirical Fisher: exact scoring (covariance, Lambda, scores) against
    a full index written by the Lambda pass (covariance, Lambda+index, scores from the index)."""
    base = [b.replace("factors.fisher=sampled", "factors.fisher=empirical") for b in base]
    runs = {"exact": ["scores.mode=exact"], "index": ["index.k=full", "scores.mode=index"]}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for name, extra in runs.items():  # a first call of each fills the compilation cache
        jaxinf(["run", *base, *extra, f"run.out={root / ('whole-' + name)}", "--overwrite"], cache)
    for _ in range(args.repeat):
        for name, extra in runs.items():
            times[name].append(
                jaxinf(["run", *base, *extra, f"run.out={root / ('whole-' + name)}", "--overwrite"], cache)
            )
    result = {
        "size": args.size,
        "fisher": "empirical",
        **{
            name: {"process_seconds": sorted(t), "stages": stage_seconds(root / f"whole-{name}")}
            for name, t in times.items()
        },
        "ratio_of_medians": float(np.median(times["exact"]) / np.median(times["index"])),
        **agreement(np.load(root / "whole-index" / "scores.npy"), np.load(root / "whole-exact" / "scores.npy")),
    }
    print(json.dumps(result, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
