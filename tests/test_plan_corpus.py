"""``jaxinf plan --corpus`` (issue 28): the corpus's documents, tokens and rows, and the passes a run makes."""

from __future__ import annotations

import json

import pytest
from pipeline_support import make_world, overrides

from jaxinf import cli
from jaxinf.data.tokenize import load_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("plan_corpus"), n_documents=40)


def test_the_corpus_is_counted_and_its_passes_named(world, tmp_path, capsys):
    args = overrides(
        world,
        tmp_path / "run",
        **{"factors.max_documents": 15, "data.long_documents": "split", "data.max_length": 16, "index.k": 4},
    )
    assert cli.main(["plan", *args, "--corpus", "--no-compile", "--json", str(tmp_path / "plan.json")]) == 0
    corpus = json.loads((tmp_path / "plan.json").read_text())["corpus"]
    tok = load_tokenizer(world["model"])
    texts = [json.loads(line)["text"] for line in world["docs"].read_text().splitlines()]
    lengths = [len(tok.encode(t).ids) for t in texts]  # split: no prefix bound, every token counted
    assert corpus["counted_documents"] == 40 and corpus["counted_tokens"] == sum(lengths)
    plan = corpus["plan"]
    assert plan["rows"] > 40 and plan["split_documents"] == sum(n > 16 for n in lengths)
    stages = [(p["stage"], p["documents"]) for p in corpus["passes"]]
    assert stages == [("covariance", 15), ("lambda", 15), ("scores", 40), ("index", 40)]
    assert corpus["passes"][2]["rows"] == plan["rows"] and corpus["passes"][0]["rows"] < plan["rows"]
    assert corpus["tokens_read"] == sum(p["tokens"] for p in corpus["passes"])
    out = capsys.readouterr().out
    assert f"token counts: {sum(lengths):,} tokens in 40 documents" in out
    assert f"hours: {plan['rows']:,} documents" in out and "passes over the corpus: covariance (15 documents" in out


def test_a_long_document_is_counted_in_a_bounded_prefix_when_truncated(world, tmp_path):
    args = overrides(world, tmp_path / "run", **{"data.max_length": 8})
    assert cli.main(["plan", *args, "--corpus", "--no-compile", "--json", str(tmp_path / "plan.json")]) == 0
    corpus = json.loads((tmp_path / "plan.json").read_text())["corpus"]
    assert corpus["bounded_prefix"] == 8
    assert corpus["plan"]["rows"] == 40 and corpus["plan"]["tokens"] <= 40 * 8
    assert [p["stage"] for p in corpus["passes"]] == ["covariance", "lambda", "scores"]


def test_a_missing_corpus_is_one_line(world, tmp_path, capsys):
    args = overrides(world, tmp_path / "run", **{"data.documents": tmp_path / "nope.jsonl"})
    assert cli.main(["plan", *args, "--corpus", "--no-compile"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        (
            f"jaxinf plan: error: {tmp_path / 'nope.jsonl'}: no such file or directory (documents are a JSONL, Parquet "
            "or Arrow file, a directory or glob of them, a TFDS dataset directory or tfds:NAME)"
        )
    ]


def test_token_counts_are_kept_for_every_run_of_the_same_corpus(world, tmp_path, monkeypatch):
    """``jaxinf plan --corpus`` counts into the shared cache; a run of the same corpus and tokenizer (any run.out)
    takes the counts from there without tokenizing; a damaged cached copy is counted again, never trusted; an
    edited corpus is another entry."""
    import numpy as np

    from jaxinf import config as cfg
    from jaxinf.data import batching
    from jaxinf.data.sources import open_documents
    from jaxinf.data.tokenize import TextEncoder
    from jaxinf.run import inputs
    from jaxinf.run.store import RunStore

    cache = tmp_path / "counts"
    monkeypatch.setenv(inputs.TOKEN_COUNT_CACHE, str(cache))
    args = overrides(world, tmp_path / "run")
    assert cli.main(["plan", *args, "--corpus", "--no-compile"]) == 0
    (kept,) = cache.glob("*.npy")
    config = cfg.load(None, args)
    limit = config.data.max_length if config.data.long_documents == "truncate" else None
    documents, encoder = open_documents(world["docs"]), TextEncoder(load_tokenizer(world["model"]))
    real = batching.document_lengths

    def refuse(*a, **k):
        raise AssertionError("the corpus was tokenized again")

    monkeypatch.setattr(batching, "document_lengths", refuse)
    store = RunStore.open(config, overwrite=False)
    counted = inputs.document_lengths(store, documents, encoder, limit)
    np.testing.assert_array_equal(counted, np.load(kept))
    np.testing.assert_array_equal(np.load(store.path("state", "plan", "lengths.npy")), counted)
    kept.write_bytes(b"not an array")  # damaged: counted again, rewritten
    monkeypatch.setattr(batching, "document_lengths", real)
    np.testing.assert_array_equal(inputs.document_lengths(None, documents, encoder, limit), counted)
    np.testing.assert_array_equal(np.load(kept), counted)
    edited = tmp_path / "docs.jsonl"
    edited.write_text(world["docs"].read_text().replace("a", "b", 1))
    inputs.document_lengths(None, open_documents(edited), encoder, limit)
    assert len(list(cache.glob("*.npy"))) == 2


def test_token_counts_edited_into_another_valid_array_are_counted_again(world, tmp_path, monkeypatch, capsys):
    """The shared token-count cache (or a run's state/plan/lengths.npy) rewritten as another valid array of the same
    size (bit rot, a hand edit, another tool) was trusted: every run on the corpus stopped at its first batch with
    'document "..." has 41 tokens but the plan counted 2', naming neither the cache file nor a way out. The counts
    are kept with their checksum, and counts that do not match it are counted again."""
    import numpy as np

    from jaxinf.run import inputs

    cache = tmp_path / "counts"
    monkeypatch.setenv(inputs.TOKEN_COUNT_CACHE, str(cache))
    assert cli.main(["-q", "plan", *overrides(world, tmp_path / "run"), "--corpus", "--no-compile"]) == 0
    (kept,) = cache.glob("*.npy")
    counted = np.load(kept)
    np.save(kept, np.full_like(counted, 2))
    assert cli.main(["-q", "run", *overrides(world, tmp_path / "run", **{"data.batch_size": 8})]) == 0
    np.testing.assert_array_equal(np.load(kept), counted)  # counted again and kept again
    lengths = tmp_path / "run" / "state" / "plan" / "lengths.npy"
    np.testing.assert_array_equal(np.load(lengths), counted)
    np.save(lengths, np.full_like(counted, 2))
    np.save(kept, np.full_like(counted, 2))
    capsys.readouterr()
    assert cli.main(["-q", "run", *overrides(world, tmp_path / "run", **{"data.batch_size": 8})]) == 0
    np.testing.assert_array_equal(np.load(lengths), counted)
