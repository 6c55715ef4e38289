"""Tokenization + batching throughput next to scoring throughput, measured side by side in one run.

    python scripts/bench_data.py              # the numbers in docs/benchmarks.md (## Data)
    python scripts/bench_data.py --quick      # a smaller corpus, for a smoke run
    python scripts/bench_data.py --formats --docs 1000000 --shards 64   # corpora in every format (issue 28)

``--formats``: a synthetic corpus of ``--docs`` documents of 50-500 words in ``--shards`` shards is written
in every format jaxinf reads (JSONL, .jsonl.gz, .jsonl.zst, Parquet, Arrow, a datasets save_to_disk
directory, and a TFDS dataset written by ``jaxinf prepare``); then, one fresh process per format (so each
peak RSS is its own), the raw read of the same files (the limit: bytes read and decompressed, or the text
column decoded), the validating scan (``open_documents``), the token counts (one tokenization pass) and
one sequential pass of batches (read, tokenize, fill), with the process's peak RSS after each.

The corpus is synthetic but shaped like a pretraining sample: Zipf-distributed
pseudo-words with punctuation, digits and line breaks, document lengths drawn
from a log-normal (mean about 500 tokens, as in Ruis et al.: 2.5B tokens over
5M documents). A byte-level BPE with a 32k vocabulary is trained on part of it
here, with a BOS post-processor like a checkpoint's tokenizer.json. The corpus
is written as JSONL and read back through the data layer, so the data numbers
include reading, JSON parsing, tokenization and filling batches.

Scoring: ``jaxinf.engine.stages.score_batch`` on ``testing.tiny_lm_init`` (d_model 128,
4 layers, d_ff 512), MLP layers tracked, EK-FAC fitted on a few batches,
32 queries preconditioned at rank 32, over the same batches (each shape
compiled before timing). The model's vocabulary is measured twice: 32k (the
tokenizer's) and 512 (token ids taken modulo 512), the second being the faster,
so the ratio against it is the conservative one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from jaxinf.data.batching import DocumentBatches, document_lengths, make_batch_plan, prefetch  # noqa: E402
from jaxinf.data.documents import JsonlDocuments  # noqa: E402
from jaxinf.data.queries import Query, encode_queries, query_batches  # noqa: E402
from jaxinf.data.tokenize import TextEncoder  # noqa: E402


def synthetic_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of Zipf-distributed pseudo-words; lengths log-normal, about 280 words on average."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    letter_p = np.linspace(2.0, 0.2, len(letters))
    letter_p /= letter_p.sum()
    n_words = 60000
    word_lengths = rng.integers(1, 12, n_words)
    words = ["".join(rng.choice(letters, k, p=letter_p)) for k in word_lengths]
    for i in range(0, n_words, 17):
        words[i] = words[i].capitalize()
    zipf = 1.0 / np.arange(1, n_words + 1) ** 1.05
    zipf /= zipf.sum()
    punct = np.array([" ", " ", " ", " ", " ", " ", " ", ", ", ". ", ".\n", "; ", " (", ") ", ": "])
    out = []
    sizes = np.clip(rng.lognormal(mean=5.3, sigma=0.8, size=n_docs), 5, 6000).astype(int)
    for size in sizes:
        ids = rng.choice(n_words, size, p=zipf)
        seps = rng.choice(punct, size)
        parts = [words[i] + s for i, s in zip(ids, seps)]
        for j in rng.integers(0, size, max(1, size // 40)):
            parts[j] = f"{rng.integers(0, 10000)} "
        out.append("".join(parts))
    return out


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with a BOS post-processor, trained on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return tok


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn, repeat: int = 1):
    best, out = math.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def build_data(args, workdir: Path) -> dict:
    """The corpus as JSONL, the tokenizer, the JSONL index, the token counts and the plan (each timed once)."""
    texts = synthetic_corpus(args.docs)
    path = workdir / "corpus.jsonl"
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"doc{i}", "text": t, "source": ("web", "wiki", "code")[i % 3]}) + "\n")
    tok, train_s = timed(lambda: train_tokenizer(texts[: args.train_docs], args.vocab))
    encoder = TextEncoder(tok)
    docs, scan_s = timed(lambda: JsonlDocuments(path))
    lengths, lengths_s = timed(lambda: document_lengths(docs, encoder))
    plan = make_batch_plan(lengths, batch_size=args.batch_size, max_length=args.max_length)
    log(f"data ready: {len(docs)} documents, {int(lengths.sum())} tokens, plan: {plan.report.summary()}")
    return {
        "docs": docs,
        "encoder": encoder,
        "plan": plan,
        "lengths": lengths,
        "train_s": train_s,
        "scan_s": scan_s,
        "lengths_s": lengths_s,
    }


def batching_pass(docs, encoder, plan) -> tuple[int, float]:
    """Real tokens and seconds of one pass over every batch of the plan (read, tokenize, fill)."""
    t0 = time.perf_counter()
    tokens = 0
    for b in DocumentBatches(docs, encoder, plan):
        tokens += int(b["mask"].sum())
    return tokens, time.perf_counter() - t0


class Scorer:
    """score_batch on the tiny GPT over a fixed set of the plan's batches (steps spread over the whole plan)."""

    def __init__(self, docs, encoder, plan, *, vocab: int, n_batches: int, seed: int = 0):
        import jax
        import jax.numpy as jnp

        from jaxinf.engine import capture, scoring, stages, testing

        self.jax, self.vocab, self.encoder = jax, vocab, encoder
        self.batches = DocumentBatches(docs, encoder, plan)
        self.steps = sorted(set(np.linspace(0, plan.num_steps - 1, n_batches).round().astype(int).tolist()))
        host = [self.batches.batch(s) for s in self.steps]
        self.tokens = sum(int(b["mask"].sum()) for b in host)
        self.data = [self.to_model(b) for b in host]
        task = testing.tiny_lm_task(n_heads=4)
        self.params = testing.tiny_lm_init(
            jax.random.key(seed), vocab=vocab, d_model=128, n_layers=4, n_heads=4, d_ff=512, max_len=plan.max_length
        )
        layers = capture.select_layers(
            capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), self.params, self.data[-1]), "mlp"
        )
        self.layers = sorted(layers)
        t0 = time.perf_counter()
        curv, _ = stages.fit_curvature(
            task, layers, self.params, self.data[-1:], strategy="ekfac", key=jax.random.key(seed + 1)
        )
        log(f"EK-FAC fitted on one batch in {time.perf_counter() - t0:.1f} s")
        prompts = [docs.texts([i])[0][:200] for i in range(32)]
        completions = [docs.texts([i + 32])[0][:120] for i in range(32)]
        queries = [Query(i, str(i), p, c, origin=f"bench:{i}") for i, (p, c) in enumerate(zip(prompts, completions))]
        (qb,) = query_batches(encode_queries(queries, encoder, max_length=plan.max_length))
        G, qloss = stages.query_gradients(task, layers, self.params, self.to_model(qb))
        self.qg = scoring.prepare_queries(G, qloss, curv, None, 32)
        self.score = jax.jit(lambda p, q, b: stages.score_batch(task, layers, p, q, b)[0].total)
        t0 = time.perf_counter()
        self.shapes = sorted({b["tokens"].shape[1] for b in self.data})
        for T in self.shapes:  # compile every shape before timing
            jax.block_until_ready(
                self.score(self.params, self.qg, next(b for b in self.data if b["tokens"].shape[1] == T))
            )
        log(f"compiled score_batch for lengths {self.shapes} in {time.perf_counter() - t0:.1f} s")
        del jnp

    def to_model(self, b):
        out = {k: self.jax.numpy.asarray(b[k]) for k in ("tokens", "mask", "weights")}
        if self.vocab < self.encoder.vocab_size:
            out["tokens"] = out["tokens"] % self.vocab
        return out

    def scoring_pass(self) -> float:
        """Seconds to score the prepared batches (already on the device)."""
        t0 = time.perf_counter()
        out = None
        for b in self.data:
            out = self.score(self.params, self.qg, b)
        self.jax.block_until_ready(out)
        return time.perf_counter() - t0

    def fed_pass(self) -> float:
        """Seconds to make the same batches with the data layer (prefetch thread) and score them."""
        t0 = time.perf_counter()
        out = None
        for b in prefetch((self.batches.batch(s) for s in self.steps), size=2):
            out = self.score(self.params, self.qg, self.to_model(b))
        self.jax.block_until_ready(out)
        return time.perf_counter() - t0


# --------------------------------------------------------------------------- corpora in every format


def word_records(n_docs: int, seed: int = 0, words: int = 20000, length: tuple[int, int] = (50, 500)):
    """``n_docs`` records ``{"id", "text", "source"}`` of ``length`` (50-500) Zipf-distributed pseudo-words, generated
    in blocks."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = np.array(["".join(rng.choice(letters, k)) for k in rng.integers(1, 10, words)], dtype=object)
    zipf = 1.0 / np.arange(1, words + 1) ** 1.05
    zipf /= zipf.sum()
    for lo in range(0, n_docs, 10000):
        hi = min(lo + 10000, n_docs)
        sizes = rng.integers(length[0], length[1] + 1, hi - lo)
        ids = rng.choice(words, int(sizes.sum()), p=zipf)
        start = 0
        for i, size in zip(range(lo, hi), sizes.tolist()):
            text = " ".join(vocab[ids[start : start + size]].tolist())
            start += size
            yield {"id": f"doc{i}", "text": text, "source": ("web", "wiki", "code")[i % 3]}


FORMAT_NAMES = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow", "hf", "tfds")


def write_formats(root: Path, n_docs: int, shards: int, formats, length: tuple[int, int] = (50, 500)) -> dict:
    """Writes the corpus (documents of ``length`` words) once per format under ``root``; returns ``{format: (spec,
    bytes on disk, seconds)}``."""
    from jaxinf.data.prepare import prepare
    from jaxinf.data.shard_writer import write_shards

    out = {}
    per = -(-n_docs // shards)
    for fmt in formats:
        t0 = time.perf_counter()
        done = root / f".{fmt}-{n_docs}-{shards}.done"
        if done.exists():  # written by an earlier run in the same --workdir
            spec = str(root / fmt)
        elif fmt == "tfds":
            src = (
                out["jsonl"][0]
                if "jsonl" in out
                else str(write_shards(word_records(n_docs, length=length), root / "jsonl-src", "jsonl", shards, per))
            )
            prepare(src, root / "tfds")
            spec = str(root / "tfds")
        else:
            spec = str(write_shards(word_records(n_docs, length=length), root / fmt, fmt, shards, per))
        done.touch()
        size = sum(p.stat().st_size for p in Path(spec).rglob("*") if p.is_file())
        out[fmt] = (spec, size, time.perf_counter() - t0)
        log(f"wrote {fmt}: {size / 2**20:.0f} MiB in {out[fmt][2]:.0f} s")
    return out


def raw_read(fmt: str, spec: str) -> tuple[int, int]:
    """(documents, text bytes) read the plainest way the format allows: the limit of any reader."""
    import gzip

    docs = nbytes = 0
    files = sorted(p for p in Path(spec).rglob("*") if p.is_file())
    if fmt in ("jsonl", "jsonl.gz", "jsonl.zst"):
        for p in files:
            if fmt == "jsonl":
                f = open(p, "rb")
            elif fmt == "jsonl.gz":
                f = gzip.open(p, "rb")
            else:
                import zstandard

                f = zstandard.ZstdDecompressor().stream_reader(open(p, "rb"))
            with f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    nbytes += len(block)
                    docs += block.count(b"\n")
    elif fmt in ("parquet", "arrow", "hf"):
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        for p in files:
            if p.suffix == ".parquet":
                batches = pq.ParquetFile(str(p)).iter_batches(columns=["text"])
            elif p.suffix == ".arrow":
                batches = pa.ipc.open_stream(pa.memory_map(str(p))).read_all().select(["text"]).to_batches()
            else:
                continue
            for b in batches:
                docs += b.num_rows
                nbytes += int(pc.sum(pc.binary_length(b.column(0))).as_py() or 0)
    else:
        import tensorflow_datasets as tfds

        ds = tfds.builder_from_directory(spec).as_data_source("train")
        for lo in range(0, len(ds), 1024):
            for r in ds.__getitems__(list(range(lo, min(lo + 1024, len(ds))))):
                docs += 1
                nbytes += len(r["text"])
    return docs, nbytes


def measure_format(
    fmt: str, spec: str, tokenizer: str, max_length: int, batch_size: int, tokenize: bool = True
) -> dict:
    """One format in this process: raw read, validating scan, token counts, one pass of batches; peak RSS after each."""
    import resource

    from jaxinf.data.sources import open_documents

    def rss() -> float:
        """Peak RSS of this process so far, MiB: VmHWM (reset at exec, unlike ru_maxrss, which a child started by
        fork and exec inherits from its parent's size)."""
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10

    out = {"format": fmt, "rss_start_mib": rss()}
    encoder = TextEncoder(tokenizer)
    docs, t = timed(lambda: open_documents(spec))
    out.update(documents=len(docs), scan_s=t, rss_scan_mib=rss())
    chars, t = timed(
        lambda: sum(
            len(x) for lo in range(0, len(docs), 2048) for x in docs.texts(range(lo, min(lo + 2048, len(docs))))
        )
    )
    out.update(text_chars=chars, sequential_s=t, rss_sequential_mib=rss())
    picks = np.random.default_rng(0).choice(len(docs), min(1000, len(docs)), replace=False)
    _, t = timed(lambda: [docs.texts([int(i)]) for i in picks])
    out.update(random_docs=len(picks), random_s=t)
    picks = np.sort(np.random.default_rng(1).choice(len(docs), min(1000, len(docs)), replace=False))
    _, t = timed(lambda: docs.texts(picks.tolist()))  # as the stages read: one call, the indices sorted
    out.update(random_batch_s=t)
    if tokenize:
        lengths, t = timed(lambda: document_lengths(docs, encoder, limit=max_length))
        out.update(tokens=int(lengths.sum()), counts_s=t, rss_counts_mib=rss())
        plan = make_batch_plan(lengths, batch_size=batch_size, max_length=max_length)
        (tokens, t) = batching_pass(docs, encoder, plan)
        out.update(batch_tokens=tokens, batch_s=t)
    out["rss_peak_mib"] = rss()
    (docs_n, nbytes), t = timed(lambda: raw_read(fmt, spec))  # last: its own peak does not count in the above
    out.update(raw_docs=docs_n, raw_text_mib=nbytes / 2**20, raw_s=t, rss_with_raw_mib=rss())
    return out


def huge_line(mb: float, whole: bool, max_length: int) -> str:
    """One document of one ``mb`` MB line (and a small one): token counts and the first batch, truncated at
    ``max_length``, with the bounded prefix, or (``whole``) counting its tokens in the whole text as before issue 25.
    Run in a process of its own (peak RSS)."""
    from jaxinf.data.batching import document_batches

    words = [r["text"] for r in word_records(200, seed=2)]
    text, n = [], 0
    while n < mb * 2**20:
        text.append(words[len(text) % len(words)])
        n += len(text[-1]) + 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "huge.jsonl"
        with open(path, "w") as f:
            f.write(json.dumps({"id": "huge", "text": " ".join(text)}) + "\n" + json.dumps({"text": "a b c"}) + "\n")
        del text
        encoder = TextEncoder(train_tokenizer(words, 4000))
        docs = JsonlDocuments(path)
        t0 = time.perf_counter()
        lengths = document_lengths(docs, encoder, limit=None if whole else max_length)
        next(iter(document_batches(docs, encoder, batch_size=2, max_length=max_length, lengths=lengths)))
        t = time.perf_counter() - t0
    hwm = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) / 2**10
    return (
        f"one {mb:g} MB line, max_length {max_length}, {'whole text' if whole else 'bounded prefix'}: "
        f"token counts + first batch {t:.2f} s, {int(lengths[0])} tokens counted, peak RSS {hwm:.0f} MiB"
    )


def formats_main(args) -> dict:
    import subprocess

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-formats-"))
    root.mkdir(parents=True, exist_ok=True)
    formats = args.only.split(",") if args.only else FORMAT_NAMES
    tok_path = root / "tokenizer.json"
    if not tok_path.exists():
        train_tokenizer([r["text"] for r in word_records(args.train_docs, seed=1)], args.vocab).save(str(tok_path))
    written = write_formats(root, args.docs, args.shards, formats)
    rows = []
    for fmt in formats:
        spec = written[fmt][0]
        cmd = [
            sys.executable,
            __file__,
            "--measure",
            fmt,
            spec,
            "--tokenizer",
            str(tok_path),
            "--max-length",
            str(args.max_length),
            "--batch-size",
            str(args.batch_size),
        ]
        cmd += ["--no-tokenize"] if args.no_tokenize else []
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{fmt}: {res.stderr[-2000:]}")
        row = json.loads(res.stdout.splitlines()[-1])
        row.update(disk_mib=written[fmt][1] / 2**20, write_s=written[fmt][2])
        rows.append(row)
        log(json.dumps(row))
    print(
        f"{args.docs} documents of 50-500 words in {args.shards} shards; {os.cpu_count()} CPUs (shared), "
        f"load average {os.getloadavg()[0]:.1f}; max_length {args.max_length}"
    )
    print(
        "| format | on disk MiB | raw read docs/s | scan docs/s | sequential texts docs/s | random texts docs/s "
        "(one a call / 1,000 sorted in one call) | "
        "token counts docs/s (M tokens/s) | batches docs/s (M tokens/s) | peak RSS MiB (after scan / all) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["documents"]
        tok = (
            f"{n / r['counts_s']:,.0f} ({r['tokens'] / r['counts_s'] / 1e6:.2f}) | "
            f"{n / r['batch_s']:,.0f} ({r['batch_tokens'] / r['batch_s'] / 1e6:.2f})"
            if "counts_s" in r
            else "- | -"
        )
        print(
            f"| {r['format']} | {r['disk_mib']:.0f} | {r['raw_docs'] / r['raw_s']:,.0f} | {n / r['scan_s']:,.0f} | "
            f"{n / r['sequential_s']:,.0f} | {r['random_docs'] / r['random_s']:,.0f} / "
            f"{r['random_docs'] / r['random_batch_s']:,.0f} | {tok} | "
            f"{r['rss_scan_mib']:.0f} / {r['rss_peak_mib']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if not args.workdir:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return {"rows": rows}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20000, help="documents in the synthetic corpus")
    ap.add_argument("--train-docs", type=int, default=4000, help="documents the BPE is trained on")
    ap.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary size")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--score-vocab", type=int, default=512, help="the scoring model's vocabulary (token ids modulo it)")
    ap.add_argument("--score-batches", type=int, default=8, help="batches timed for scoring, spread over the plan")
    ap.add_argument(
        "--rounds", type=int, default=2, help="interleaved (data, scoring) rounds; the best of each is kept"
    )
    ap.add_argument("--quick", action="store_true", help="a small run (2000 documents, 8k vocabulary)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--formats", action="store_true", help="corpora in every format (see above) instead of scoring")
    ap.add_argument("--shards", type=int, default=64, help="--formats: shards per format")
    ap.add_argument("--only", help="--formats: a comma-separated subset of " + ",".join(FORMAT_NAMES))
    ap.add_argument("--workdir", help="--formats: keep the written corpora here (reused tokenizer)")
    ap.add_argument(
        "--no-tokenize",
        action="store_true",
        help="--formats: read only (raw, scan, sequential and random texts), no tokenization passes",
    )
    ap.add_argument(
        "--huge-line",
        type=float,
        metavar="MB",
        help="one document of one MB-sized line (issue 25): "
        "token counts and a batch at --max-length; with --whole, counted in the whole text",
    )
    ap.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--measure", nargs=2, metavar=("FORMAT", "SPEC"), help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.huge_line:
        print(huge_line(args.huge_line, args.whole, args.max_length))
        return {}
    if args.measure:
        print(
            json.dumps(
                measure_format(
                    args.measure[0],
                    args.measure[1],
                    args.tokenizer,
                    args.max_length,
                    args.batch_size,
                    not args.no_tokenize,
                )
            )
        )
        return {}
    if args.formats:
        return formats_main(args)
    if args.quick:
        args.docs, args.train_docs, args.vocab, args.score_batches, args.rounds = 2000, 1000, 8000, 4, 1

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        d = build_data(args, Path(tmp))
        docs, encoder, plan = d["docs"], d["encoder"], d["plan"]
        scorer = Scorer(docs, encoder, plan, vocab=args.score_vocab, n_batches=args.score_batches)
        batch_s, score_s, fed_s, batch_tokens = math.inf, math.inf, math.inf, 0
        for r in range(args.rounds):  # interleaved, so a change in machine load hits both sides
            batch_tokens, t = batching_pass(docs, encoder, plan)
            batch_s = min(batch_s, t)
            score_s = min(score_s, scorer.scoring_pass())
            fed_s = min(fed_s, scorer.fed_pass())
            log(
                f"round {r}: batching {batch_tokens / t / 1e6:.2f} M tokens/s, "
                f"scoring {scorer.tokens / score_s / 1e3:.2f} k tokens/s"
            )

    corpus_tokens = int(d["lengths"].sum())
    lengths_rate = corpus_tokens / d["lengths_s"]
    batch_rate = batch_tokens / batch_s
    score_rate = scorer.tokens / score_s
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {
            "documents": len(docs),
            "corpus_tokens": corpus_tokens,
            "vocab_size": encoder.vocab_size,
            "tokenizer_training_s": d["train_s"],
            "jsonl_scan_s": d["scan_s"],
            "token_counts_tokens_per_s": lengths_rate,
            "batch_tokens": batch_tokens,
            "batching_tokens_per_s": batch_rate,
            "plan": plan.report.to_dict(),
        },
        "scoring": {
            "vocab": args.score_vocab,
            "batches": len(scorer.data),
            "lengths": scorer.shapes,
            "tokens": scorer.tokens,
            "layers": scorer.layers,
            "queries": 32,
            "query_rank": 32,
            "scoring_tokens_per_s": score_rate,
            "fed_tokens_per_s": scorer.tokens / fed_s,
        },
        "ratio_batching_to_scoring": batch_rate / score_rate,
        "ratio_counts_and_batching_to_scoring": 1.0 / (1.0 / lengths_rate + 1.0 / batch_rate) / score_rate,
    }
    print(
        f"corpus: {len(docs)} documents, {corpus_tokens} tokens ({corpus_tokens / len(docs):.0f}/document), "
        f"BPE vocabulary {encoder.vocab_size}; {os.cpu_count()} CPUs, load average {load_before[0]:.1f}"
    )
    print(f"plan: {plan.report.summary()}")
    print(f"JSONL scan (validate + index)      {d['scan_s']:9.2f} s")
    print(f"token counts (one pass)            {lengths_rate / 1e6:9.2f} M tokens/s")
    print(f"tokenize + batch (one pass)        {batch_rate / 1e6:9.2f} M tokens/s")
    print(f"score_batch (tiny GPT, 32 queries) {score_rate / 1e6:9.4f} M tokens/s")
    print(f"  fed by the data layer (prefetch) {scorer.tokens / fed_s / 1e6:9.4f} M tokens/s")
    print(f"ratio tokenize+batch / scoring:                 {result['ratio_batching_to_scoring']:8.1f}x")
    print(f"ratio (token counts + tokenize+batch) / scoring: {result['ratio_counts_and_batching_to_scoring']:7.1f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
