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
    args = overrides(world, tmp_path / "run", **{"factors.max_documents": 15, "data.long_documents": "split",
                                                   "data.max_length": 16, "index.k": 4})
    assert cli.main(["plan", *args, "--corpus", "--no-compile", "--json", str(tmp_path / "plan.json")]) == 0
    corpus = json.loads((tmp_path / "plan.json").read_text())["corpus"]
    tok = load_tokenizer(world["model"])
    texts = [json.loads(line)["text"] for line in world["docs"].read_text().splitlines()]
    lengths = [len(tok.encode(t).ids) for t in texts]          # split: no prefix bound, every token counted
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
        (f"jaxinf plan: error: {tmp_path / 'nope.jsonl'}: no such file or directory (documents are a JSONL, Parquet "
         "or Arrow file, a directory or glob of them, a TFDS dataset directory or tfds:NAME)")]
