"""A bfloat16 model against its float32 self, in jaxinf and in kronfluence, on the same weights and data (issue 26).

The paper's model runs in bfloat16 with float32 statistics. This script fits
EK-FAC on the MLP layers and scores every document against every query, on one
world, in five runs:

- jaxinf ``model.dtype: float32`` and ``model.dtype: bfloat16``, both with
  ``run.precision: float32`` (``jaxinf.pipeline.run``, every stage);
- kronfluence 1.0 (``tests/kronfluence_reference.py``: ``CausalLMTask``, every
  statistic dtype float32, eigendecomposition float64) with the model in
  float32; with the model's weights cast to bfloat16 (``model.to(torch.bfloat16)``,
  no autocast: the same mode as jaxinf's, the forward and backward pass in
  bfloat16, the tracked activations and gradients cast to float32 for the
  statistics); and with the float32 model under autocast
  (``FactorArguments.amp_dtype = ScoreArguments.amp_dtype = torch.bfloat16``:
  matmuls in bfloat16, weights and the rest in float32).

Each pair is compared on the score matrix ``[queries, documents]``: per query,
the Pearson and Spearman correlations over documents (mean and min over
queries) and the overlap of the 10 most positive and the 10 most negative
documents; the largest entry error ``max |x - ref| / max |ref|`` and the
relative Frobenius error; and the factors ``A``, ``S``, ``Lambda`` (relative
Frobenius error, the largest over the tracked layers).

Worlds: ``demo`` (default) is the trained model of a ``jaxinf demo`` output
directory (``--demo``; its config's ``data.max_length``) with its first
``--documents`` documents and first ``--queries`` queries; ``tiny`` / ``small``
are ``scripts/bench_vs_kronfluence.py``'s random Llamas and random text.
Queries are kept at full rank unless ``--query-rank`` (then the full SVD on
both sides). ``--fisher`` defaults to ``empirical`` so that the two libraries
see the same labels; ``sampled`` (the paper's true Fisher) adds each library's
own label draws (the same seed in a library's two runs, so a bfloat16 run
draws from slightly different probabilities, and the cross-library rows
measure sampling noise as well).

    python scripts/bf16_agreement.py [--world demo --demo /tmp/demo-seeds | --world tiny]
        [--documents 256] [--queries 32] [--fisher empirical|sampled] [--query-rank R] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "scripts"))

TOPK = 10


# --------------------------------------------------------------------------- metrics


def agreement(x: np.ndarray, ref: np.ndarray, k: int = TOPK) -> dict:
    """How far the score matrix ``x`` is from ``ref`` (both ``[queries, documents]``): per-query
    correlations and top/bottom-k overlaps (mean and min over queries), the largest entry error over
    ``max |ref|``, and the relative Frobenius error."""
    from jaxinf.analysis.correlations import pearson, spearman, topk_overlap

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if x.shape != ref.shape or x.ndim != 2:
        raise ValueError(f"agreement: two [queries, documents] matrices of one shape, got {x.shape} and {ref.shape}")
    per = {
        "pearson": [pearson(a, b) for a, b in zip(x, ref)],
        "spearman": [spearman(a, b) for a, b in zip(x, ref)],
        "top": [topk_overlap(a, b, k) for a, b in zip(x, ref)],
        "bottom": [topk_overlap(-a, -b, k) for a, b in zip(x, ref)],
    }
    out: dict = {}
    for name, values in per.items():
        out[f"mean_{name}"] = float(np.mean(values))
        out[f"min_{name}"] = float(np.min(values))
    out["max_entry_error"] = float(np.abs(x - ref).max() / np.abs(ref).max())
    out["rel_error"] = float(np.linalg.norm(x - ref) / np.linalg.norm(ref))
    return out


def factor_errors(x: dict, ref: dict) -> dict:
    """Largest relative Frobenius error over the layers of each factor; ``x`` and ``ref`` map a module name
    to its ``{"A", "S", "Lambda"}``."""
    if set(x) != set(ref):
        raise ValueError(f"factor_errors: different modules {sorted(set(x) ^ set(ref))}")
    return {
        f: max(float(np.linalg.norm(x[m][f] - ref[m][f]) / np.linalg.norm(ref[m][f])) for m in ref)
        for f in ("A", "S", "Lambda")
    }


# --------------------------------------------------------------------------- the world


def demo_world(demo: Path, root: Path, n_documents: int, n_queries: int) -> dict:
    """The trained model of a ``jaxinf demo`` directory with the first documents and queries of its data."""
    import yaml

    config = yaml.safe_load((demo / "config.yaml").read_text())
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, path, n in (
        ("docs", config["data"]["documents"], n_documents),
        ("queries", config["data"]["queries"], n_queries),
    ):
        with open(path) as f:
            lines = [line for line in f if line.strip()][:n]
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(lines))
    return {
        "model": Path(config["model"]["checkpoint"]),
        "length": int(config["data"]["max_length"]),
        "name": f"demo ({demo})",
        **files,
    }


def bench_world(size: str, root: Path, n_documents: int | None, n_queries: int | None) -> dict:
    """``scripts/bench_vs_kronfluence.py``'s random Llama world of one size."""
    from bench_vs_kronfluence import SIZES, build

    s = dict(SIZES[size])
    s["documents"] = n_documents or s["documents"]
    s["queries"] = n_queries or s["queries"]
    w = build(root, s)
    return {**w, "length": s["length"], "name": f"bench {size}"}


def counts(docs: Path, queries: Path) -> tuple[int, int]:
    return tuple(sum(1 for line in open(p) if line.strip()) for p in (docs, queries))  # type: ignore[return-value]


# --------------------------------------------------------------------------- jaxinf


def run_jaxinf(w: dict, dtype: str, args, out: Path) -> dict:
    from jaxinf import config as cfg
    from jaxinf import pipeline
    from jaxinf.interop import transfer

    n_docs, n_queries = counts(w["docs"], w["queries"])
    config = cfg.load(
        None,
        [
            f"model.checkpoint={w['model']}",
            f"model.dtype={dtype}",
            "run.precision=float32",
            f"data.documents={w['docs']}",
            f"data.queries={w['queries']}",
            f"data.max_length={w['length']}",
            f"data.batch_size={args.batch_size}",
            f"data.query_batch_size={n_queries}",
            "factors.strategy=ekfac",
            f"factors.fisher={args.fisher}",
            "factors.track=mlp",
            f"scores.query_rank={'null' if args.query_rank is None else args.query_rank}",
            "scores.query_svd=full",
            f"run.out={out}",
        ],
    )
    t0 = time.perf_counter()
    run_dir = pipeline.run(config, overwrite=True)
    seconds = time.perf_counter() - t0
    scores = np.load(run_dir / "scores.npy")
    run = transfer.load_run(run_dir)
    layers = run.layers
    A, S = transfer.per_layer(run.covariance.A, layers), transfer.per_layer(run.covariance.S, layers)
    n = transfer.per_layer(run.covariance.count, layers)
    L = transfer.per_layer(run.Lambda, layers)
    factors = {
        m: {
            "A": np.asarray(A[m], np.float64) / float(n[m]),
            "S": np.asarray(S[m], np.float64) / float(n[m]),
            "Lambda": np.asarray(L[m], np.float64),
        }
        for m in A
    }
    print(f"  jaxinf {dtype}: {seconds:.0f}s", flush=True)
    return {"scores": scores, "factors": factors, "seconds": seconds}


# --------------------------------------------------------------------------- kronfluence


def run_kronfluence(w: dict, mode: str, args, out: Path) -> dict:
    """``mode``: ``float32``; ``bf16-model`` (weights cast to bfloat16); ``bf16-amp`` (autocast, float32 weights)."""
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model

    from jaxinf.interop import kronfluence as kf

    sys.path.insert(0, str(ROOT / "tests"))  # the PyTorch reference side lives with the tests, not in the package
    import kronfluence_reference as ref

    doc_ids, encoded = ref.encoded_inputs(w["model"], w["docs"], w["queries"], w["length"])
    documents = ref.Examples(ref.document_examples(doc_ids, w["length"]))
    queries = ref.Examples(ref.query_examples(encoded))
    factor_args = ref.factor_arguments("ekfac", args.fisher, "float32")
    score_args = ref.score_arguments(None, args.query_rank, "float32", svd="full")
    if mode == "bf16-amp":
        factor_args = dataclasses.replace(factor_args, amp_dtype=torch.bfloat16)
        score_args = dataclasses.replace(score_args, amp_dtype=torch.bfloat16)
    t0 = time.perf_counter()
    with ref.quiet():
        model = ref.load_model(w["model"], "float32", attention="eager")
        if mode == "bf16-model":
            model = model.to(torch.bfloat16)
        task = ref.CausalLMTask(ref.tracked_modules(model, "mlp"), torch.Generator().manual_seed(0))
        model = prepare_model(model, task)
        analyzer = Analyzer(mode, model, task, cpu=True, disable_tqdm=True, output_dir=str(out))
        common = dict(factors_name="ekfac", factor_args=factor_args, overwrite_output_dir=True)
        analyzer.fit_covariance_matrices(dataset=documents, per_device_batch_size=args.batch_size, **common)
        analyzer.perform_eigendecomposition(**common)
        analyzer.fit_lambda_matrices(dataset=documents, per_device_batch_size=args.batch_size, **common)
        analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name="ekfac",
            query_dataset=queries,
            train_dataset=documents,
            per_device_query_batch_size=len(queries),
            per_device_train_batch_size=args.batch_size,
            score_args=score_args,
            overwrite_output_dir=True,
        )
    seconds = time.perf_counter() - t0
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"].float().numpy()
    fac = kf.read_factors(out / mode / "factors_ekfac", groups=("covariance", "eigen", "lambda"))
    factors = {m: {"A": fac.A(m), "S": fac.S(m), "Lambda": fac.Lambda(m)} for m in fac.modules}
    print(f"  kronfluence {mode}: {seconds:.0f}s", flush=True)
    return {"scores": scores, "factors": factors, "seconds": seconds}


# --------------------------------------------------------------------------- report

PAIRS = (
    # (what, x, reference)
    ("jaxinf: bf16 model vs f32 model", "jaxinf bf16", "jaxinf f32"),
    ("kronfluence: bf16 model vs f32 model", "kronfluence bf16-model", "kronfluence f32"),
    ("kronfluence: bf16 autocast vs f32", "kronfluence bf16-amp", "kronfluence f32"),
    ("cross, f32: jaxinf vs kronfluence", "jaxinf f32", "kronfluence f32"),
    ("cross, bf16 model: jaxinf vs kronfluence", "jaxinf bf16", "kronfluence bf16-model"),
    ("cross, bf16: jaxinf model vs kronfluence autocast", "jaxinf bf16", "kronfluence bf16-amp"),
)


def table(rows: list[dict]) -> str:
    lines = [
        "| comparison (x vs reference) | Pearson mean / min | Spearman mean / min | top-10 mean / min "
        "| bottom-10 mean / min | max entry error | rel. error | A | S | Lambda |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, f = r["scores"], r["factors"]
        lines.append(
            f"| {r['what']} | {s['mean_pearson']:.6f} / {s['min_pearson']:.6f} "
            f"| {s['mean_spearman']:.5f} / {s['min_spearman']:.5f} | {s['mean_top']:.2f} / {s['min_top']:.1f} "
            f"| {s['mean_bottom']:.2f} / {s['min_bottom']:.1f} | {s['max_entry_error']:.1e} "
            f"| {s['rel_error']:.1e} | {f['A']:.1e} | {f['S']:.1e} | {f['Lambda']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", default="demo", choices=["demo", "tiny", "small"])
    ap.add_argument("--demo", default="/tmp/demo-seeds", help="a `jaxinf demo` output directory (--world demo)")
    ap.add_argument("--documents", type=int, default=256, help="the first N documents (demo; bench: its size's)")
    ap.add_argument("--queries", type=int, default=32, help="the first N queries (demo; bench: its size's)")
    ap.add_argument("--fisher", default="empirical", choices=["empirical", "sampled"])
    ap.add_argument("--query-rank", type=int, default=None, help="rank of the query gradients (default: full)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--workdir", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--json", help="write every measurement to this file")
    args = ap.parse_args(argv)

    import jax
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        if args.world == "demo":
            w = demo_world(Path(args.demo), work / "world", args.documents, args.queries)
        else:
            w = bench_world(args.world, work / "world", args.documents, args.queries)
        n_docs, n_queries = counts(w["docs"], w["queries"])
        load = os.getloadavg()[0]
        header = (
            f"{datetime.date.today().isoformat()}; world {w['name']}: {n_docs} documents (up to {w['length']} "
            f"tokens), {n_queries} queries; EK-FAC, MLP layers, {args.fisher} Fisher, queries at "
            f"{'full rank' if args.query_rank is None else f'rank {args.query_rank} (full SVD)'}, damping "
            f"0.1 x mean(Lambda); {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
            f"average {load:.1f} at start; jax {jax.__version__} ({jax.devices()[0].platform}), "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
        )
        print(header, flush=True)
        runs = {
            "jaxinf f32": run_jaxinf(w, "float32", args, work / "jaxinf-f32"),
            "jaxinf bf16": run_jaxinf(w, "bfloat16", args, work / "jaxinf-bf16"),
        }
        for mode, name in (("float32", "f32"), ("bf16-model", "bf16-model"), ("bf16-amp", "bf16-amp")):
            runs[f"kronfluence {name}"] = run_kronfluence(w, mode, args, work / "kronfluence")
    rows = [
        {
            "what": what,
            "x": x,
            "reference": ref,
            "scores": agreement(runs[x]["scores"], runs[ref]["scores"]),
            "factors": factor_errors(runs[x]["factors"], runs[ref]["factors"]),
        }
        for what, x, ref in PAIRS
    ]
    print()
    print(header)
    print()
    print(table(rows))
    if args.json:
        report = {
            "header": header,
            "args": vars(args),
            "seconds": {k: v["seconds"] for k, v in runs.items()},
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
