"""jaxinf against kronfluence, side by side in one process: same model, documents, queries and settings.

For each size, a random Llama (transformers ``LlamaForCausalLM``) is saved as a
Hugging Face directory with a word-level tokenizer, with random documents and
queries; both libraries then fit EK-FAC on the MLP layers (true Fisher, sampled
labels) and score every document against every query at query rank ``r``, in
float32, with the same batch size. ``--query-svd`` picks how both libraries
truncate the query gradients: ``randomized`` (the default of both: jaxinf's range
finder, kronfluence's ``torch.svd_lowrank``) or ``full`` (the SVD of each whole
matrix on both sides):

- kronfluence 1.0 (``tests/kronfluence_reference.py``'s ``CausalLMTask`` on jaxinf's token ids):
  ``fit_covariance_matrices``, ``perform_eigendecomposition``,
  ``fit_lambda_matrices``, ``compute_pairwise_scores`` (query gradients, then the
  training gradients), after a warm-up of every stage on a few documents;
- jaxinf, through the pipeline's own stage functions (``jaxinf run`` minus the
  exports and the report): covariance and Lambda (``pipeline.accumulate``, through
  the per-batch loop of ``jaxinf.engine.loop``, one checkpoint at the end),
  eigendecomposition, query gradients, scores. A first
  pass compiles every program (its times, "cold", include compilation); the
  timed pass runs with the compiled programs in JAX's compilation cache, as a
  second ``jaxinf run`` on the same shapes does.

Per stage: wall time, tokens per second (tokens of the documents the stage
reads), peak resident memory during the stage (sampled every 10 ms) and its
increase over the stage's start, and kronfluence / jaxinf. kronfluence calls
``gc.collect()`` between steps; objects alive before its stages (JAX's among
them) are frozen out of the collector so that it is not charged for them.

    python scripts/bench_vs_kronfluence.py --size small [--size tiny ...] [--torch-threads N]
        [--scan-layers true --scan-layers false] [--json PATH] [--whole-process | --whole-process-only]

Both libraries in this process run on glibc's own heap settings; ``jaxinf run`` in its own process
(``--whole-process``) starts itself with huge pages as it does for a user (``jaxinf.hostenv``).

``--whole-process`` also times each library as a user meets it (``whole_process``): ``jaxinf run`` in a fresh
process with an empty compilation cache (every stage, exports and the report), the same again with the cache it
filled, and kronfluence's stages in a fresh process of their own.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

MiB = 2**20

SIZES = {
    # name: hidden, intermediate, layers, heads, vocab, documents, max tokens per document, queries
    "tiny": dict(hidden=64, intermediate=256, layers=2, heads=4, vocab=1024, documents=256, length=64, queries=8),
    "small": dict(hidden=256, intermediate=1024, layers=4, heads=4, vocab=4096, documents=1024, length=128, queries=16),
    "medium": dict(
        hidden=512, intermediate=2048, layers=6, heads=8, vocab=8192, documents=1024, length=256, queries=16
    ),
}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Stage:
    """Times a block and samples the process's resident memory while it runs."""

    def __init__(self):
        self.seconds = self.peak = self.start_rss = 0

    @contextlib.contextmanager
    def measure(self):
        stop = threading.Event()
        self.start_rss = self.peak = rss()

        def sample():
            while not stop.wait(0.01):
                self.peak = max(self.peak, rss())

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            self.seconds = time.perf_counter() - t0
            stop.set()
            t.join()
            self.peak = max(self.peak, rss())

    def row(self) -> dict:
        return {
            "seconds": self.seconds,
            "peak_mib": self.peak / MiB,
            "increase_mib": (self.peak - self.start_rss) / MiB,
        }


# --------------------------------------------------------------------------- the world


def run_settings(w: dict, size: dict, *, query_svd: str, batch_size: int = 8, query_rank: int = 32) -> list[str]:
    """The ``key=value`` settings of a ``jaxinf run`` of the world ``w`` (:func:`build`) as every bench runs it:
    EK-FAC under the true Fisher, the size's length and query batch, the queries at ``query_rank``."""
    return [
        f"model.checkpoint={w['model']}",
        f"data.documents={w['docs']}",
        f"data.queries={w['queries']}",
        f"data.max_length={size['length']}",
        f"data.batch_size={batch_size}",
        f"data.query_batch_size={size['queries']}",
        "factors.strategy=ekfac",
        "factors.fisher=sampled",
        f"scores.query_rank={query_rank}",
        f"scores.query_svd={query_svd}",
    ]


def build(root: Path, size: dict, seed: int = 0) -> dict:
    """A random Llama checkpoint with a word-level tokenizer, documents and queries."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        max_position_embeddings=max(512, size["length"]),
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, size["vocab"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "model" / "tokenizer.json"))
    rng = np.random.default_rng(seed)
    words = lambda n: " ".join(f"w{t}" for t in rng.integers(1, size["vocab"], n))  # noqa: E731
    L = size["length"]
    with open(root / "docs.jsonl", "w") as f:
        for i in range(size["documents"]):
            f.write(json.dumps({"id": f"d{i}", "text": words(int(rng.integers(L // 2, L + 1)))}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for i in range(size["queries"]):
            f.write(json.dumps({"id": f"q{i}", "prompt": words(24), "completion": words(8)}) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    return {"model": root / "model", "docs": root / "docs.jsonl", "queries": root / "queries.jsonl", "params": n_params}


# --------------------------------------------------------------------------- kronfluence


def run_kronfluence(w: dict, size: dict, args, out: Path, warmup: bool = True) -> dict:
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model

    sys.path.insert(0, str(ROOT / "tests"))  # the PyTorch reference side lives with the tests, not in the package
    import kronfluence_reference as ref

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    doc_ids, encoded = ref.encoded_inputs(w["model"], w["docs"], w["queries"], size["length"])
    documents = ref.Examples(ref.document_examples(doc_ids, size["length"]))
    queries = ref.Examples(ref.query_examples(encoded))
    warm_docs = ref.Examples(documents.examples[: 2 * args.batch_size])
    tokens = int(sum(int(e["attention_mask"].sum()) for e in documents.examples))
    factor_args = ref.factor_arguments("ekfac", "sampled", "float32")
    score_args = ref.score_arguments(None, args.query_rank, "float32", svd=args.query_svd)
    stages = {}
    with ref.quiet():
        model = ref.load_model(w["model"], "float32", attention="sdpa")  # transformers' default
        task = ref.CausalLMTask(ref.tracked_modules(model, "mlp"), torch.Generator().manual_seed(0))
        cuda = args.torch_device == "cuda" or (args.torch_device == "auto" and torch.cuda.is_available())
        if cuda:
            model = model.to("cuda")
        model = prepare_model(model, task)
        analyzer = Analyzer("bench", model, task, cpu=not cuda, disable_tqdm=True, output_dir=str(out))

        def all_stages(name, docs, timed):
            steps = [
                (
                    "covariance",
                    lambda: analyzer.fit_covariance_matrices(
                        name,
                        docs,
                        per_device_batch_size=args.batch_size,
                        factor_args=factor_args,
                        overwrite_output_dir=True,
                    ),
                ),
                (
                    "eigen",
                    lambda: analyzer.perform_eigendecomposition(
                        name, factor_args=factor_args, overwrite_output_dir=True
                    ),
                ),
                (
                    "lambda",
                    lambda: analyzer.fit_lambda_matrices(
                        name,
                        docs,
                        per_device_batch_size=args.batch_size,
                        factor_args=factor_args,
                        overwrite_output_dir=True,
                    ),
                ),
                (
                    "queries+scores",
                    lambda: analyzer.compute_pairwise_scores(
                        name,
                        name,
                        queries,
                        docs,
                        per_device_query_batch_size=len(queries),
                        per_device_train_batch_size=args.batch_size,
                        score_args=score_args,
                        overwrite_output_dir=True,
                    ),
                ),
            ]
            for stage, fn in steps:
                st = Stage()
                with st.measure():
                    fn()
                if timed:
                    stages[stage] = st.row()
                    print(f"  kronfluence {stage}: {st.seconds:.1f}s", flush=True)

        gc.collect()
        gc.freeze()
        try:
            if warmup:
                all_stages("warmup", warm_docs, False)
            all_stages("timed", documents, True)
        finally:
            gc.unfreeze()
    scores = analyzer.load_pairwise_scores("timed")["all_modules"].numpy()
    return {"stages": stages, "tokens": tokens, "scores": scores, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- jaxinf


def run_jaxinf(w: dict, size: dict, args, out: Path, timed: bool, compiled: dict, scan: bool = True) -> dict:
    """The jaxinf stages; ``compiled`` keeps this size's stage functions, so the timed pass reuses their programs."""
    import jax

    from jaxinf import config as cfg
    from jaxinf import pipeline
    from jaxinf.data.batching import DocumentBatches
    from jaxinf.engine import curvature, stages
    from jaxinf.hostenv import lapack_threads
    from jaxinf.run.executor import DeviceExecutor
    from jaxinf.run.inputs import load_inputs
    from jaxinf.run.store import RunStore

    config = cfg.load(
        None,
        [
            f"model.checkpoint={w['model']}",
            f"data.documents={w['docs']}",
            f"data.queries={w['queries']}",
            f"data.max_length={size['length']}",
            f"data.batch_size={args.batch_size}",
            f"data.query_batch_size={size['queries']}",
            "factors.strategy=ekfac",
            "factors.fisher=sampled",
            "factors.save_every=1000000",
            f"scores.query_rank={args.query_rank}",
            f"scores.query_svd={args.query_svd}",
            "scores.save_every=1000000",
            f"run.out={out}",
            f"model.scan_layers={str(scan).lower()}",
        ],
    )
    store = RunStore.open(config, overwrite=True)
    inputs = load_inputs(config, store)
    executor = DeviceExecutor()
    params = inputs.lm.params
    batches = DocumentBatches(inputs.fit_documents, inputs.encoder, inputs.fit_plan)
    key = jax.random.key(config.factors.seed)
    st = {}

    def stage(name, fn):
        s = Stage()
        with s.measure():
            result = jax.block_until_ready(fn())
        st[name] = s.row()
        print(
            f"  jaxinf{'' if scan else ' (unrolled)'}{'' if timed else ' (cold)'} {name}: {s.seconds:.1f}s", flush=True
        )
        return result

    if not compiled:
        compiled.update(
            cov=stages.covariance_stage(inputs.task, inputs.layers, "sampled"),
            lam=stages.lambda_stage(inputs.task, inputs.layers, "sampled"),
            eigh=jax.jit(curvature.eigendecompose),
        )
    cov_stage, lam_stage, eigh = compiled["cov"], compiled["lam"], compiled["eigh"]
    cov = stage(
        "covariance",
        lambda: pipeline.accumulate(
            store,
            "covariance",
            cov_stage,
            (params,),
            batches,
            jax.random.fold_in(key, 0),
            config.factors.save_every,
            executor,
            inputs,
        )[0],
    )

    def eigen_stage():
        with lapack_threads():  # as jaxinf run does
            e = jax.block_until_ready(eigh(cov))
        store.save_result("eigen", e)
        return e

    eigen = stage("eigen", eigen_stage)

    def lambda_stage():
        L, _ = pipeline.accumulate(
            store,
            "lambda",
            lam_stage,
            (params, eigen),
            batches,
            jax.random.fold_in(key, 1),
            config.factors.save_every,
            executor,
            inputs,
        )
        store.save_result("lambda", L)
        return L

    Lambda = stage("lambda", lambda_stage)
    curv = curvature.curvature("ekfac", eigen, Lambda)
    qg, _ = stage("queries", lambda: pipeline.queries_stage(config, store, inputs, curv, executor))
    results = stage("scores", lambda: pipeline.scores_stage(config, store, inputs, qg, curv, executor))
    st["queries+scores"] = {
        k: st["queries"][k] + st["scores"][k] if k == "seconds" else max(st["queries"][k], st["scores"][k])
        for k in st["scores"]
    }
    return {"stages": st, "tokens": int(inputs.plan.report.tokens), "scores": results["scores"]}


# --------------------------------------------------------------------------- report


def table(name: str, size: dict, w: dict, kf: dict, jx: dict, cold: dict, variant: str) -> str:
    lines = [
        f"### {name}, jaxinf {variant}: Llama {size['hidden']}/{size['intermediate']} x {size['layers']} "
        f"layers, vocab {size['vocab']}, {w['params'] / 1e6:.2f}M parameters; {size['documents']} documents "
        f"({kf['tokens']:,} tokens, up to {size['length']} each), {size['queries']} queries",
        "",
        "| stage | kronfluence s | jaxinf s | kronfluence / jaxinf | kronfluence tok/s | jaxinf tok/s "
        "| kronfluence peak MiB (+stage) | jaxinf peak MiB (+stage) | jaxinf cold s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in ("covariance", "eigen", "lambda", "queries+scores"):
        k, j, c = kf["stages"][stage], jx["stages"][stage], cold["stages"][stage]
        rate = (lambda s: "-") if stage == "eigen" else (lambda s: f"{kf['tokens'] / s:,.0f}")
        lines.append(
            f"| {stage} | {k['seconds']:.1f} | {j['seconds']:.1f} | {k['seconds'] / j['seconds']:.2f}x "
            f"| {rate(k['seconds'])} | {rate(j['seconds'])} | {k['peak_mib']:.0f} (+{k['increase_mib']:.0f}) "
            f"| {j['peak_mib']:.0f} (+{j['increase_mib']:.0f}) | {c['seconds']:.1f} |"
        )
    ks = sum(kf["stages"][s]["seconds"] for s in ("covariance", "eigen", "lambda", "queries+scores"))
    js = sum(jx["stages"][s]["seconds"] for s in ("covariance", "eigen", "lambda", "queries+scores"))
    cs = sum(cold["stages"][s]["seconds"] for s in ("covariance", "eigen", "lambda", "queries+scores"))
    lines.append(
        f"| **end to end** | **{ks:.1f}** | **{js:.1f}** | **{ks / js:.2f}x** | | | | | {cs:.1f} ({ks / cs:.2f}x) |"
    )
    j = jx["stages"]
    lines.append("")
    lines.append(
        f"jaxinf queries+scores = query gradients {j['queries']['seconds']:.1f}s + scores "
        f"{j['scores']['seconds']:.1f}s."
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", action="append", choices=list(SIZES), help="sizes to run (default: tiny, small)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--documents", type=int, help="override the size's number of documents")
    ap.add_argument("--query-rank", type=int, default=32)
    ap.add_argument(
        "--query-svd",
        default="randomized",
        choices=["randomized", "full"],
        help="how both libraries truncate the query gradients at --query-rank (default: randomized, the "
        "default of both)",
    )
    ap.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument(
        "--torch-device",
        default="cpu",
        choices=["cpu", "cuda", "auto"],
        help="where kronfluence runs (auto: the GPU when torch sees one; jaxinf runs on jax's default)",
    )
    ap.add_argument(
        "--scan-layers",
        action="append",
        choices=["true", "false"],
        help="jaxinf's model.scan_layers; repeat to time both (default: true, jaxinf's default)",
    )
    ap.add_argument("--workdir", help="where the models, data and results go (default: a temporary directory)")
    ap.add_argument("--json", help="write every measurement to this file")
    ap.add_argument(
        "--whole-process",
        action="store_true",
        help="also time each library as a whole fresh process, cold (jaxinf run twice: cold, then with "
        "its compilation cache)",
    )
    ap.add_argument(
        "--whole-process-only",
        action="store_true",
        help="only the whole-process timing (no stage-by-stage passes in this process)",
    )
    ap.add_argument("--kronfluence-process", help=argparse.SUPPRESS)
    ap.add_argument("--size-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.kronfluence_process:
        return kronfluence_process(args)
    sizes = args.size or ["tiny", "small"]

    import jax
    import torch

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-kronfluence-"))
    jax.config.update("jax_compilation_cache_dir", str(workdir / "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import kronfluence

    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(
        f"# jaxinf vs kronfluence {kronfluence.__version__ if hasattr(kronfluence, '__version__') else ''}: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load} at start; "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({args.torch_threads or torch.get_num_threads()} threads)",
        flush=True,
    )
    report = {
        "load_at_start": load,
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "sizes": {},
    }
    for name in sizes:
        size = dict(SIZES[name], **({"documents": args.documents} if args.documents else {}))
        root = workdir / name
        w = build(root, size)
        print(f"\n{name}: {w['params'] / 1e6:.2f}M parameters", flush=True)
        variants = [v == "true" for v in (args.scan_layers or ["true"])]
        compiled = {scan: {} for scan in variants}
        cold = (
            {}
            if args.whole_process_only
            else {
                scan: run_jaxinf(w, size, args, root / f"jaxinf-cold-{scan}", False, compiled[scan], scan)
                for scan in variants
            }
        )
        if args.whole_process or args.whole_process_only:
            res = whole_process(w, size, args, root)
            text = whole_process_table(name, res)
            print("\n" + text + "\n", flush=True)
            report.setdefault("whole_process", {})[name] = {
                k: {"seconds": v["seconds"], **({"pearson": v["pearson"]} if "pearson" in v else {})}
                for k, v in res.items()
            } | {"table": text}
        if args.whole_process_only:
            continue
        kf = run_kronfluence(w, size, args, root / "kronfluence")
        report["sizes"][name] = {"size": size, "params": w["params"], "kronfluence": _plain(kf)}
        for scan in variants:
            jx = run_jaxinf(w, size, args, root / f"jaxinf-{scan}", True, compiled[scan], scan)
            corr = [float(np.corrcoef(kf["scores"][q], jx["scores"][q])[0, 1]) for q in range(len(kf["scores"]))]
            with open("/proc/loadavg") as f:
                load_end = " ".join(f.read().split()[:3])
            variant = "model.scan_layers: " + str(scan).lower()
            text = table(name, size, w, kf, jx, cold[scan], variant)
            text += (
                f"\n\nScores agree across the libraries up to sampling noise (each draws its own labels): "
                f"per-query Pearson {min(corr):.3f}-{max(corr):.3f}. torch threads: {kf['threads']}. "
                f"Load average at the end: {load_end}."
            )
            print("\n" + text + "\n", flush=True)
            report["sizes"][name][variant] = {
                "jaxinf": _plain(jx),
                "jaxinf_cold": _plain(cold[scan]),
                "pearson": corr,
                "load_at_end": load_end,
                "table": text,
            }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


# --------------------------------------------------------------------------- whole processes, cold


def whole_process(w: dict, size: dict, args, root: Path) -> dict:
    """Each library as a user meets it: one fresh process each, cold, timed from start to exit.

    jaxinf: ``python -m jaxinf run`` (every stage, exports and the report included) with an empty compilation
    cache, then again with the cache the first run filled; kronfluence: this script's kronfluence stages with no
    warm-up (``--kronfluence-process``), in a process of its own. Same model, documents, queries and settings;
    the scores of both are compared per query (each library samples its own labels for the true Fisher).
    """
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    overrides = run_settings(w, size, query_svd=args.query_svd, batch_size=args.batch_size, query_rank=args.query_rank)
    out = {}
    for label, cache in (("jaxinf, cold", root / "xla-cold"), ("jaxinf, second run", root / "xla-cold")):
        run_dir = root / ("process-" + label.split(", ")[1].replace(" ", "-"))
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "jaxinf", "-q", "run", *overrides, f"run.out={run_dir}", "--overwrite"],
            env={**env, "JAXINF_COMPILATION_CACHE": str(cache)},
            capture_output=True,
            text=True,
        )
        if r.returncode:
            raise SystemExit(f"jaxinf run failed: {r.stderr[-2000:]}")
        out[label] = {"seconds": time.perf_counter() - t0, "scores": np.load(run_dir / "scores.npy")}
        print(f"  whole process, {label}: {out[label]['seconds']:.1f}s", flush=True)
    kf_dir = root / "process-kronfluence"
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            __file__,
            "--kronfluence-process",
            str(root),
            "--batch-size",
            str(args.batch_size),
            "--query-rank",
            str(args.query_rank),
            "--query-svd",
            args.query_svd,
            "--torch-threads",
            str(args.torch_threads),
            "--torch-device",
            args.torch_device,
            "--size-json",
            json.dumps(size),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise SystemExit(f"kronfluence process failed: {r.stderr[-2000:]}")
    out["kronfluence"] = {"seconds": time.perf_counter() - t0, "scores": np.load(kf_dir / "scores.npy")}
    print(f"  whole process, kronfluence: {out['kronfluence']['seconds']:.1f}s", flush=True)
    kf = out["kronfluence"]["scores"]
    for label in ("jaxinf, cold", "jaxinf, second run"):
        jx = out[label]["scores"]
        out[label]["pearson"] = [float(np.corrcoef(kf[q], jx[q])[0, 1]) for q in range(len(kf))]
    return out


def whole_process_table(name: str, res: dict) -> str:
    kf = res["kronfluence"]["seconds"]
    lines = [
        f"### {name}: whole process, cold (each library in its own fresh process)",
        "",
        "| process | wall s | kronfluence / this | per-query Pearson with kronfluence |",
        "|---|---|---|---|",
        f"| kronfluence (imports, all stages, no warm-up) | {kf:.1f} | 1.00x | - |",
    ]
    for label in ("jaxinf, cold", "jaxinf, second run"):
        r = res[label]
        lines.append(
            f"| `jaxinf run` ({label.split(', ')[1]}: every stage, exports, report) | {r['seconds']:.1f} | "
            f"{kf / r['seconds']:.2f}x | {min(r['pearson']):.3f}-{max(r['pearson']):.3f} |"
        )
    return "\n".join(lines)


def kronfluence_process(args) -> None:
    """``--kronfluence-process ROOT``: kronfluence alone on ROOT's world, no warm-up; scores to ROOT/process-kronfluence."""
    root = Path(args.kronfluence_process)
    w = {"model": root / "model", "docs": root / "docs.jsonl", "queries": root / "queries.jsonl"}
    out = root / "process-kronfluence"
    out.mkdir(parents=True, exist_ok=True)
    kf = run_kronfluence(w, json.loads(args.size_json), args, out, warmup=False)
    np.save(out / "scores.npy", kf["scores"])


def _plain(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "scores"}


if __name__ == "__main__":
    main()
