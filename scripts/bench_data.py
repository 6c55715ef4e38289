"""Tokenization + batching throughput next to scoring throughput, measured side by side in one run.

    python scripts/bench_data.py              # the numbers in docs/benchmarks.md (## Data)
    python scripts/bench_data.py --quick      # a smaller corpus, for a smoke run

The corpus is synthetic but shaped like a pretraining sample: Zipf-distributed
pseudo-words with punctuation, digits and line breaks, document lengths drawn
from a log-normal (mean about 500 tokens, as in Ruis et al.: 2.5B tokens over
5M documents). A byte-level BPE with a 32k vocabulary is trained on part of it
here, with a BOS post-processor like a checkpoint's tokenizer.json. The corpus
is written as JSONL and read back through the data layer, so the data numbers
include reading, JSON parsing, tokenization and filling batches.

Scoring: ``jaxinf.stages.score_batch`` on ``testing.tiny_lm_init`` (d_model 128,
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

from jaxinf.data.batching import DocumentBatches, document_lengths, make_plan, prefetch  # noqa: E402
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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
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
    plan = make_plan(lengths, batch_size=args.batch_size, max_length=args.max_length)
    log(f"data ready: {len(docs)} documents, {int(lengths.sum())} tokens, plan: {plan.report.summary()}")
    return {"docs": docs, "encoder": encoder, "plan": plan, "lengths": lengths, "train_s": train_s,
            "scan_s": scan_s, "lengths_s": lengths_s}


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

        from jaxinf import capture, scoring, stages, testing

        self.jax, self.vocab, self.encoder = jax, vocab, encoder
        self.batches = DocumentBatches(docs, encoder, plan)
        self.steps = sorted(set(np.linspace(0, plan.num_steps - 1, n_batches).round().astype(int).tolist()))
        host = [self.batches.batch(s) for s in self.steps]
        self.tokens = sum(int(b["mask"].sum()) for b in host)
        self.data = [self.to_model(b) for b in host]
        task = testing.tiny_lm_task(n_heads=4)
        self.params = testing.tiny_lm_init(jax.random.key(seed), vocab=vocab, d_model=128, n_layers=4, n_heads=4,
                                         d_ff=512, max_len=plan.max_length)
        layers = capture.select_layers(
            capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), self.params, self.data[-1]), "mlp")
        self.layers = sorted(layers)
        t0 = time.perf_counter()
        curv, _ = stages.fit_curvature(task, layers, self.params, self.data[-1:], strategy="ekfac",
                                       key=jax.random.key(seed + 1))
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
            jax.block_until_ready(self.score(self.params, self.qg, next(b for b in self.data if b["tokens"].shape[1] == T)))
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20000, help="documents in the synthetic corpus")
    ap.add_argument("--train-docs", type=int, default=4000, help="documents the BPE is trained on")
    ap.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary size")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--score-vocab", type=int, default=512, help="the scoring model's vocabulary (token ids modulo it)")
    ap.add_argument("--score-batches", type=int, default=8, help="batches timed for scoring, spread over the plan")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved (data, scoring) rounds; the best of each is kept")
    ap.add_argument("--quick", action="store_true", help="a small run (2000 documents, 8k vocabulary)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
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
            log(f"round {r}: batching {batch_tokens / t / 1e6:.2f} M tokens/s, "
                f"scoring {scorer.tokens / score_s / 1e3:.2f} k tokens/s")

    corpus_tokens = int(d["lengths"].sum())
    lengths_rate = corpus_tokens / d["lengths_s"]
    batch_rate = batch_tokens / batch_s
    score_rate = scorer.tokens / score_s
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"documents": len(docs), "corpus_tokens": corpus_tokens, "vocab_size": encoder.vocab_size,
                 "tokenizer_training_s": d["train_s"], "jsonl_scan_s": d["scan_s"],
                 "token_counts_tokens_per_s": lengths_rate, "batch_tokens": batch_tokens,
                 "batching_tokens_per_s": batch_rate, "plan": plan.report.to_dict()},
        "scoring": {"vocab": args.score_vocab, "batches": len(scorer.data), "lengths": scorer.shapes,
                    "tokens": scorer.tokens, "layers": scorer.layers, "queries": 32, "query_rank": 32,
                    "scoring_tokens_per_s": score_rate, "fed_tokens_per_s": scorer.tokens / fed_s},
        "ratio_batching_to_scoring": batch_rate / score_rate,
        "ratio_counts_and_batching_to_scoring": 1.0 / (1.0 / lengths_rate + 1.0 / batch_rate) / score_rate,
    }
    print(f"corpus: {len(docs)} documents, {corpus_tokens} tokens ({corpus_tokens / len(docs):.0f}/document), "
          f"BPE vocabulary {encoder.vocab_size}; {os.cpu_count()} CPUs, load average {load_before[0]:.1f}")
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
