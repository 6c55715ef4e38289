"""Tokenization, plans and batches: chunk map, bucketing, resume, per-host slices, and the causal-LM losses."""

from __future__ import annotations

import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_support import corpus_texts, documents_file, make_tokenizer

from jaxinf.data.batching import (
    DocumentBatches,
    bucket_lengths,
    chunk_counts,
    document_batches,
    document_lengths,
    make_batch_plan,
    prefetch,
    scatter_columns,
)
from jaxinf.data.documents import JsonlDocuments
from jaxinf.data.errors import DataError
from jaxinf.data.queries import Query, encode_queries, query_batches
from jaxinf.data.tokenize import TextEncoder, load_tokenizer, special_tokens_around
from jaxinf.engine import tasks, testing
from jaxinf.engine.capture import Tap


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(make_tokenizer("both"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, encoder):
    path = documents_file(tmp_path_factory.mktemp("corpus") / "docs.jsonl", 90)
    docs = JsonlDocuments(path)
    return docs, document_lengths(docs, encoder, chunk=16)


class CountingSource:
    """A document source that records which documents were read."""

    def __init__(self, inner):
        self.inner, self.name, self.report, self.read = inner, inner.name, inner.report, []

    def __len__(self):
        return len(self.inner)

    def texts(self, indices):
        self.read.extend(int(i) for i in indices)
        return self.inner.texts(indices)

    def documents(self, indices):
        return self.inner.documents(indices)


# --------------------------------------------------------------------------- tokenization


def test_tokenizer_copy_without_truncation_or_padding(tmp_path):
    tok = make_tokenizer("bos")
    tok.enable_truncation(4)
    tok.enable_padding(length=50)
    tok.save(str(tmp_path / "tokenizer.json"))
    text = corpus_texts(1)[0] + " the river of zorv"
    for source in (tok, tmp_path / "tokenizer.json", tmp_path):
        t = load_tokenizer(source)
        assert t.truncation is None and t.padding is None
        assert len(TextEncoder(source).encode_documents([text])[0]) == len(t.encode(text).ids) > 4
    assert tok.truncation is not None  # the caller's tokenizer is unchanged
    with pytest.raises(DataError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "template, prefix, suffix", [("bos", (1,), ()), ("eos", (), (2,)), ("both", (1,), (2,)), ("none", (), ())]
)
def test_special_tokens_documents_and_queries(template, prefix, suffix):
    tok = make_tokenizer(template)
    enc = TextEncoder(tok)
    assert special_tokens_around(tok) == (prefix, suffix) == (enc.prefix, enc.suffix)
    text = "the mountain of quab"
    assert enc.encode_documents([text])[0].tolist() == tok.encode(text).ids  # as configured
    plain = tok.encode(text, add_special_tokens=False).ids
    assert enc.document_lengths([text, ""]).tolist() == [
        len(prefix) + len(plain) + len(suffix),
        len(prefix) + len(suffix),
    ]
    (q,) = enc.encode_queries(["what is"], [" tall."])
    p, c = tok.encode("what is", add_special_tokens=False).ids, tok.encode(" tall.", add_special_tokens=False).ids
    assert q.ids.tolist() == list(prefix) + p + c  # BOS in front, no EOS after the completion
    assert q.prompt_length == len(prefix) + len(p) and q.completion_length == len(c)


# --------------------------------------------------------------------------- plans


def test_bucket_lengths():
    assert bucket_lengths(2048) == (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
    assert bucket_lengths(1000) == (64, 128, 192, 256, 384, 512, 768, 1000)
    assert bucket_lengths(64) == (64,) and bucket_lengths(5) == (5,)
    assert bucket_lengths(40, smallest=8) == (8, 16, 24, 32, 40)


def test_split_chunks_cover_every_target_once():
    rng = np.random.default_rng(0)
    L = 7
    lengths = np.concatenate([[0, 1, 2, 6, 7, 8, 13, 14, 50], rng.integers(0, 60, 200)])
    plan = make_batch_plan(lengths, batch_size=3, max_length=L, long_documents="split", buckets=(4, 7))
    assert np.array_equal(np.bincount(plan.row_document, minlength=len(lengths)), chunk_counts(lengths, L, "split"))
    for d, n in enumerate(lengths):
        rows = np.flatnonzero(plan.row_document == d)
        assert np.array_equal(plan.row_chunk[rows], np.arange(len(rows)))
        assert np.all(plan.row_length[rows] <= L)
        targets = np.concatenate([np.arange(s + 1, s + m) for s, m in zip(plan.row_start[rows], plan.row_length[rows])])
        assert np.array_equal(targets, np.arange(1, max(n, 1))), d  # each target once, in order
        assert plan.row_start[rows][0] == 0 and plan.row_start[rows][-1] + plan.row_length[rows][-1] == n
    assert plan.report.targets == int(np.maximum(lengths - 1, 0).sum())
    assert plan.report.documents_without_targets == int((lengths < 2).sum())
    per_row = np.stack([np.maximum(plan.row_length - 1, 0), np.ones(plan.num_rows)])  # targets and chunks per row
    assert np.array_equal(plan.sum_chunks(per_row)[0], np.maximum(lengths - 1, 0))
    assert np.array_equal(plan.sum_chunks(per_row)[1], chunk_counts(lengths, L, "split"))


def test_truncate_counts():
    plan = make_batch_plan([3, 10, 12, 0], batch_size=2, max_length=10)
    assert plan.num_rows == 4 and plan.row_length.tolist() == [3, 10, 10, 0]
    r = plan.report
    assert (r.truncated_documents, r.truncated_tokens, r.split_documents, r.tokens) == (1, 2, 0, 23)
    assert "1 documents truncated (2 tokens cut)" in r.summary()


@pytest.mark.parametrize("mode", ["truncate", "split"])
@pytest.mark.parametrize("hosts", [1, 3])
def test_plan_hosts_windows_and_shapes(mode, hosts):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 300, 1000)
    kw = dict(batch_size=8, max_length=128, long_documents=mode, window_batches=4, process_count=hosts)
    plan = make_batch_plan(lengths, **kw)
    again = make_batch_plan(lengths.copy(), **kw)
    assert np.array_equal(plan.order, again.order) and np.array_equal(plan.step_length, again.step_length)
    assert set(plan.step_length.tolist()) <= set(bucket_lengths(128))
    seen = []
    for s in range(plan.num_steps):
        for h in range(hosts):
            rows = plan.host_rows(s, h)
            assert len(rows) <= 8
            assert np.all(plan.row_length[rows] <= plan.step_length[s])  # one shape per step, on every host
            seen.extend(rows.tolist())
    assert sorted(seen) == list(range(plan.num_rows))  # every row exactly once, over all hosts
    G = hosts * 8
    assert plan.num_steps == -(-plan.num_rows // G)
    W = 4 * G
    for lo in range(0, plan.num_rows, W):  # windows hold consecutive rows, sorted longest first
        win = plan.order[lo : lo + W]
        assert sorted(win.tolist()) == list(range(lo, min(lo + W, plan.num_rows)))
        assert np.all(np.diff(plan.row_length[win]) <= 0)
    unsorted = make_batch_plan(lengths, **dict(kw, window_batches=1_000_000 // G, batch_size=8))
    assert plan.report.padding_fraction < 0.35 and unsorted.report.padding_fraction < plan.report.padding_fraction


def test_plan_rejects_bad_settings():
    with pytest.raises(DataError, match="data.long_documents"):
        make_batch_plan([1], batch_size=1, max_length=8, long_documents="drop")
    with pytest.raises(DataError, match="data.batch_size"):
        make_batch_plan([1], batch_size=0, max_length=8)
    with pytest.raises(DataError, match="data.buckets"):
        make_batch_plan([1], batch_size=1, max_length=8, buckets=(4,))
    with pytest.raises(DataError, match="at least 2 tokens"):
        make_batch_plan([1], batch_size=1, max_length=1, long_documents="split")


# --------------------------------------------------------------------------- batches


def _check_batch(batch, plan, tokens_of, B, T):
    assert batch["tokens"].shape == batch["mask"].shape == batch["weights"].shape == (B, T)
    assert batch["tokens"].dtype == np.int32 and batch["mask"].dtype == batch["weights"].dtype == np.float32
    assert batch["index"].shape == batch["chunk"].shape == batch["row"].shape == (B,)
    for j in range(B):
        r = int(batch["row"][j])
        if r < 0:
            assert batch["index"][j] == -1 and batch["chunk"][j] == -1
            assert not batch["mask"][j].any() and not batch["weights"][j].any() and not batch["tokens"][j].any()
            continue
        d, s, n = int(plan.row_document[r]), int(plan.row_start[r]), int(plan.row_length[r])
        assert batch["index"][j] == d and batch["chunk"][j] == plan.row_chunk[r]
        assert batch["tokens"][j, :n].tolist() == tokens_of[d][s : s + n].tolist()
        assert batch["mask"][j].tolist() == [1.0] * n + [0.0] * (T - n)
        assert batch["weights"][j].tolist() == [0.0] + [1.0] * (n - 1) + [0.0] * (T - n) if n else True


@pytest.mark.parametrize("mode", ["truncate", "split"])
def test_batches_hold_the_planned_tokens(corpus, encoder, mode):
    docs, lengths = corpus
    tokens_of = encoder.encode_documents(docs.texts(range(len(docs))))
    assert [len(t) for t in tokens_of] == lengths.tolist()
    batches = document_batches(
        docs,
        encoder,
        batch_size=4,
        max_length=32,
        long_documents=mode,
        window_batches=3,
        buckets=(8, 16, 32),
        lengths=lengths,
    )
    seen = []
    for s, batch in enumerate(batches):
        _check_batch(batch, batches.plan, tokens_of, 4, int(batches.plan.step_length[s]))
        seen.extend(batch["row"][batch["row"] >= 0].tolist())
    assert sorted(seen) == list(range(batches.plan.num_rows))
    assert batches.plan.num_rows > len(docs) if mode == "split" else batches.plan.report.truncated_documents > 0
    # Without given lengths, document_batches counts them itself (one pass) and plans the same batches.
    counted = document_batches(
        docs, encoder, batch_size=4, max_length=32, long_documents=mode, window_batches=3, buckets=(8, 16, 32)
    )
    assert np.array_equal(counted.plan.order, batches.plan.order)


def test_resume_reads_only_what_it_needs(corpus, encoder):
    docs, lengths = corpus
    plan = make_batch_plan(
        lengths, batch_size=4, max_length=32, long_documents="split", window_batches=3, buckets=(16, 32)
    )
    full = list(DocumentBatches(docs, encoder, plan))
    src = CountingSource(docs)
    resumed = DocumentBatches(src, encoder, plan, group_steps=2)
    k = 7
    tail = list(resumed.iterate(k))
    assert len(tail) == len(full) - k
    for a, b in zip(tail, full[k:]):
        assert all(np.array_equal(a[key], b[key]) for key in a)
    needed = {int(plan.row_document[r]) for s in range(k, plan.num_steps) for r in plan.host_rows(s)}
    assert set(src.read) == needed  # nothing before batch k is tokenized
    groups = [range(lo, min(lo + 2, plan.num_steps)) for lo in range(k, plan.num_steps, 2)]
    per_group = [{int(plan.row_document[r]) for s in g for r in plan.host_rows(s)} for g in groups]
    assert len(src.read) == sum(map(len, per_group))  # each document once per group of batches it appears in
    one = resumed.batch(k + 1)
    assert all(np.array_equal(one[key], full[k + 1][key]) for key in one)


@pytest.mark.parametrize("mode", ["truncate", "split"])
def test_hosts_get_disjoint_slices_of_equal_count_and_shape(corpus, encoder, mode):
    docs, lengths = corpus
    P = 3
    plan = make_batch_plan(lengths, batch_size=5, max_length=32, long_documents=mode, window_batches=2, process_count=P)
    per_host = [list(DocumentBatches(docs, encoder, plan, process_index=h)) for h in range(P)]
    assert len({len(b) for b in per_host}) == 1 and len(per_host[0]) == plan.num_steps
    rows = []
    for s in range(plan.num_steps):
        assert len({b[s]["tokens"].shape for b in per_host}) == 1  # same shape on every host at every step
        for b in per_host:
            rows.extend(b[s]["row"][b[s]["row"] >= 0].tolist())
    assert sorted(rows) == list(range(plan.num_rows))
    with pytest.raises(DataError, match="process index 3 out of range"):
        DocumentBatches(docs, encoder, plan, process_index=3)


def test_stale_lengths_are_an_error(corpus, encoder):
    docs, lengths = corpus
    wrong = lengths.copy()
    wrong[5] += 1
    batches = DocumentBatches(docs, encoder, make_batch_plan(wrong, batch_size=len(docs), max_length=512))
    with pytest.raises(DataError, match=r'docs\.jsonl:6: document "d5" has \d+ tokens but the plan counted'):
        batches.batch(0)
    with pytest.raises(DataError, match="the plan was made for 3"):
        DocumentBatches(docs, encoder, make_batch_plan([1, 2, 3], batch_size=1, max_length=8))


def test_scatter_columns_and_chunk_sums():
    plan = make_batch_plan([3, 20, 5], batch_size=2, max_length=8, long_documents="split")
    values = np.arange(2 * plan.num_rows, dtype=np.float64).reshape(2, plan.num_rows) + 1
    by_batches = np.zeros((2, 3))
    for s in range(plan.num_steps):
        rows = plan.host_rows(s)
        index = np.full(2, -1)
        index[: len(rows)] = plan.row_document[rows]
        batch_vals = np.zeros((2, 2))
        batch_vals[:, : len(rows)] = values[:, rows]
        batch_vals[:, len(rows) :] = 1e9  # padding rows never land anywhere
        scatter_columns(by_batches, batch_vals, index)
    assert np.allclose(by_batches, plan.sum_chunks(values))
    assert np.allclose(plan.sum_chunks(values).sum(), values.sum())


def test_prefetch_order_errors_and_close():
    assert list(prefetch(iter(range(100)), size=3)) == list(range(100))

    def failing():
        yield 1
        raise DataError("x.jsonl:2: broken")

    it = prefetch(failing())
    assert next(it) == 1
    with pytest.raises(DataError, match="broken"):
        next(it)

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = prefetch(endless(), size=2)
    assert [next(it) for _ in range(5)] == list(range(5))
    it.close()
    time.sleep(0.2)
    n = len(produced)
    time.sleep(0.2)
    assert len(produced) == n <= 5 + 4  # the producer stopped
    assert not any(t.name == "jaxinf-prefetch" and t.is_alive() for t in threading.enumerate())


# --------------------------------------------------------------------------- the causal-LM task on these batches


def _sequence_losses(params, batch):
    """``tasks.next_token_losses`` of the tiny GPT's logits, summed per sequence: ``[B]``."""
    logits = testing.tiny_lm_apply(params, batch["tokens"], batch["mask"], Tap({}))
    return tasks.next_token_losses(logits, batch, None).sum(axis=1)


_sequence_losses_jit = jax.jit(_sequence_losses)


def _model_batch(b):
    return {k: jnp.asarray(b[k]) for k in ("tokens", "mask", "weights")}


@pytest.mark.parametrize("mode", ["truncate", "split"])
def test_batched_losses_equal_unpadded_one_by_one(corpus, encoder, mode):
    """Summed NLL per row from a padded, bucketed batch = the same sequence's loss alone, unpadded."""
    docs, lengths = corpus
    batches = document_batches(
        docs,
        encoder,
        batch_size=8,
        max_length=24,
        long_documents=mode,
        window_batches=2,
        buckets=(12, 24),
        lengths=lengths,
    )
    params = testing.tiny_lm_init(jax.random.key(0), vocab=encoder.vocab_size, d_model=16, d_ff=32, max_len=24)
    tokens_of = encoder.encode_documents(docs.texts(range(len(docs))))
    plan = batches.plan
    checked = 0
    for s in (0, len(batches) - 1):  # the longest batch and the last (with padding rows)
        b = batches.batch(s)
        got = np.asarray(_sequence_losses_jit(params, _model_batch(b)))
        for j, r in enumerate(b["row"].tolist()):
            if r < 0:
                assert got[j] == 0.0
                continue
            st, n = int(plan.row_start[r]), int(plan.row_length[r])
            seq = tokens_of[int(plan.row_document[r])][st : st + n].tolist()
            alone = float(_sequence_losses_jit(params, tasks.lm_batch([seq]))[0])  # [1, n]: no padding at all
            np.testing.assert_allclose(got[j], alone, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked > 8


def test_query_losses_equal_completion_nll_one_by_one(encoder):
    """A padded query batch gives each query's summed completion NLL, as the unpadded query alone does."""
    queries = [
        Query(i, str(i), p, c, origin=f"q:{i}")
        for i, (p, c) in enumerate(
            [
                ("the river of zorv is", " long and tall."),
                ("three plus four makes", " seven"),
                ("", "every day people walk"),
                ("naïve café", " — 42."),
            ]
        )
    ]
    encoded = encode_queries(queries, encoder)
    params = testing.tiny_lm_init(jax.random.key(1), vocab=encoder.vocab_size, d_model=16, d_ff=32, max_len=64)
    batches = query_batches(encoded, batch_size=3, max_length=64)  # the second: one query and two padding rows
    got = np.concatenate([np.asarray(_sequence_losses_jit(params, _model_batch(b))) for b in batches])
    for e, value in zip(encoded, got):
        alone = tasks.lm_batch([e.ids.tolist()], prompt_lengths=[e.prompt_length])
        np.testing.assert_allclose(value, float(_sequence_losses_jit(params, alone)[0]), rtol=1e-5, atol=1e-5)
        # and by hand: -log p of each completion token given everything before it
        logits = testing.tiny_lm_apply(params, jnp.asarray(e.ids[None]), jnp.ones((1, len(e.ids))), Tap({}))[0]
        logp = jax.nn.log_softmax(logits, axis=-1)
        by_hand = -sum(float(logp[t - 1, e.ids[t]]) for t in range(e.prompt_length, len(e.ids)))
        np.testing.assert_allclose(value, by_hand, rtol=1e-5, atol=1e-5)
    assert got[4:].tolist() == [0.0, 0.0]  # padding rows


def test_empty_corpus_plan_and_out_of_range_batches(corpus, encoder):
    plan = make_batch_plan(np.zeros(0, np.int64), batch_size=4, max_length=16)
    assert (plan.num_rows, plan.num_steps, plan.report.padding_fraction) == (0, 0, 0.0)
    assert plan.sum_chunks(np.zeros((2, 0))).shape == (2, 0)
    docs, lengths = corpus
    batches = DocumentBatches(docs, encoder, make_batch_plan(lengths, batch_size=64, max_length=32))
    assert len(batches) == 2 and list(batches.iterate(2)) == []
    with pytest.raises(IndexError, match="batch 2 out of range for 2 batches"):
        batches.batch(2)


def test_a_huge_document_is_tokenized_in_a_bounded_prefix(tmp_path, encoder):
    """Issue 25, case 6: a truncated document is tokenized in a prefix, and its first max_length tokens are exactly
    those of the whole text (documents, lengths and the batches that breakdowns use alike)."""
    from jaxinf.data.tokenize import prefix_chars

    huge = " ".join(corpus_texts(4000, seed=3))  # about 200k characters, one line
    small = corpus_texts(3)
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for i, text in enumerate([small[0], huge, small[1]]):
            f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    docs = JsonlDocuments(path)
    whole = encoder.encode_documents([huge])[0]
    calls = []
    original = encoder.tokenizer

    class Spy:
        def __getattr__(self, name):
            return getattr(original, name)

        def encode(self, text, *a, **k):
            calls.append(len(text))
            return original.encode(text, *a, **k)

    encoder.tokenizer = Spy()
    try:
        lengths = document_lengths(docs, encoder, limit=32)
        batches = document_batches(docs, encoder, batch_size=3, max_length=32, lengths=lengths)
        (batch,) = list(batches)
    finally:
        encoder.tokenizer = original
    assert calls and max(calls) <= 4 * prefix_chars(32) < len(huge)  # never the whole text
    assert 32 < lengths[1] < len(whole)  # a lower bound above the limit
    row = int(np.nonzero(batch["index"] == 1)[0][0])
    assert batch["tokens"][row].tolist() == whole[:32].tolist()
    assert batches.plan.report.truncated_documents == 3
    # Counted whole (an older plan), the same batch: only the first max_length tokens are used either way.
    full = document_lengths(docs, encoder)
    (again,) = list(document_batches(docs, encoder, batch_size=3, max_length=32, lengths=full))
    assert np.array_equal(again["tokens"], batch["tokens"])


def test_the_plan_takes_four_bytes_a_row_per_array():
    """The plan's per-row arrays are int32 (row and token numbers below 2**31), one row a document needs no repeat of
    the chunk counts, and the batch order is sorted a block of windows at a time: tracemalloc's peak below 40 bytes a
    document (90 with int64 arrays and np.lexsort over the whole plan), kept below 24 (49 before)."""
    import tracemalloc

    lengths = np.random.default_rng(0).integers(70, 800, 200_000)
    tracemalloc.start()
    try:
        plan = make_batch_plan(lengths, batch_size=16, max_length=512)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plan.row_document.dtype == plan.order.dtype == plan.row_length.dtype == np.int32
    assert peak / len(lengths) < 40 and kept / len(lengths) < 24, (peak / len(lengths), kept / len(lengths))
