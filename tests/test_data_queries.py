"""Queries: JSONL, the release format of Ruis et al. (2024), completion masks, and the missing-oracle rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_support import make_tokenizer, write_jsonl

from jaxinf.data.errors import DataError
from jaxinf.data.queries import (
    Query,
    encode_queries,
    query_batches,
    read_queries,
    read_queries_jsonl,
    read_release,
    release_documents,
)
from jaxinf.data.tokenize import TextEncoder

RELEASE_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ruis2024"


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(make_tokenizer("both"))


def test_jsonl_queries(tmp_path):
    path = write_jsonl(
        tmp_path / "queries.jsonl",
        [
            {
                "id": "q1",
                "prompt": "What is 3+4?",
                "completion": " 7.",
                "kind": "reasoning",
                "task": "sums",
                "answer": 7,
                "note": "kept",
            },
            {"prompt": "", "completion": "Hello."},
        ],
    )
    q = read_queries(path)
    assert q == [
        Query(0, "q1", "What is 3+4?", " 7.", "reasoning", "sums", "7", {"note": "kept"}, f"{path}:1"),
        Query(1, "2", "", "Hello.", None, None, None, {}, f"{path}:2"),
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"id": "q7", "prompt": "p", "completion": ""}', 'queries.jsonl:2: query "q7" has an empty completion'),
        (b'{"id": "q7", "prompt": "p", "completion": " \\n"}', 'queries.jsonl:2: query "q7" has an empty completion'),
        (b'{"id": "q7", "prompt": "p"}', 'queries.jsonl:2: missing field "completion"'),
        (b'{"completion": "c"}', 'queries.jsonl:2: missing field "prompt"'),
        (b'{"prompt": 1, "completion": "c"}', 'queries.jsonl:2: field "prompt" must be a string, got int'),
        (
            b'{"prompt": "p", "completion": "c", "kind": "fact"}',
            'queries.jsonl:2: field "kind" must be one of factual, reasoning, control, got "fact"',
        ),
        (
            b'{"prompt": "p", "completion": "c", "answer": [1]}',
            'queries.jsonl:2: field "answer" must be a string or a number, got list',
        ),
        (b'{"prompt": "p", "completion": "c"', "queries.jsonl:2: invalid JSON (Expecting ',' delimiter, column 34)"),
        (b'{"prompt": "\xc3", "completion": "c"}', "queries.jsonl:2: invalid UTF-8 at byte 13"),
        (
            b'{"prompt": "p", "completion": "c", "prompt": "q"}',
            'queries.jsonl:2: field "prompt" appears twice (which one is meant?)',
        ),
        (
            b'{"id": "a", "prompt": "p", "completion": "c"}',
            'queries.jsonl:2: duplicate query id "a" (first at queries.jsonl:1)',
        ),
    ],
)
def test_jsonl_query_errors(tmp_path, monkeypatch, line, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("queries.jsonl"), [{"id": "a", "prompt": "p", "completion": "c"}, {}], raw_lines={2: line})
    with pytest.raises(DataError) as e:
        read_queries("queries.jsonl")
    assert str(e.value) == message


def test_query_masks_cover_exactly_the_completion(encoder):
    queries = [
        Query(0, "a", "the river of zorv is", " long.", origin="q:1"),
        Query(1, "b", "three plus four makes", " seven", origin="q:2"),
        Query(2, "c", "", "every day", origin="q:3"),
    ]
    encoded = encode_queries(queries, encoder)
    tok = encoder.tokenizer
    (batch,) = query_batches(encoded)
    assert batch["tokens"].shape == (3, max(len(e.ids) for e in encoded))
    for j, q in enumerate(queries):
        completion = tok.encode(q.completion, add_special_tokens=False).ids
        prompt = tok.encode(q.prompt, add_special_tokens=False).ids
        n = 1 + len(prompt) + len(completion)  # BOS, prompt, completion; no EOS
        assert batch["tokens"][j, :n].tolist() == [1] + prompt + completion
        assert batch["mask"][j].tolist() == [1.0] * n + [0.0] * (batch["mask"].shape[1] - n)
        assert np.flatnonzero(batch["weights"][j]).tolist() == list(range(1 + len(prompt), n))
        assert batch["tokens"][j][batch["weights"][j] == 1].tolist() == completion
    assert batch["index"].tolist() == [0, 1, 2]

    batches = query_batches(encoded, batch_size=2, max_length=64)
    assert [b["tokens"].shape for b in batches] == [(2, 64), (2, 64)]
    assert batches[1]["index"].tolist() == [2, -1] and not batches[1]["mask"][1].any()


def test_query_token_errors():
    no_bos = TextEncoder(make_tokenizer("none"))
    with pytest.raises(DataError, match=r'^q:1: query "a": nothing precedes the completion'):
        encode_queries([Query(0, "a", "", "every day", origin="q:1")], no_bos)
    enc = TextEncoder(make_tokenizer("bos"))
    long_query = Query(0, "z", "the river " * 40, "long.", origin="q:9")
    with pytest.raises(DataError, match=r'^q:9: query "z" has \d+ tokens, more than data.max_length \(32\)$'):
        encode_queries([long_query], enc, max_length=32)


def test_release_format_errors(tmp_path):
    good = {"model": "7B", "test_ids": list(range(100)), "prompts": ["p"] * 100, "completions": ["c"] * 100}
    path = tmp_path / "release.json"
    for change, message in [
        ({"model": "13B"}, 'release.json: field "model" must be "7B" or "35B", got "13B"'),
        ({"prompts": ["p"] * 99}, 'release.json: field "prompts" must be a list of 100 items, got 99 items'),
        ({"completions": ["c"] * 12 + [""] + ["c"] * 87}, 'release.json: query 12: query "12" has an empty completion'),
        (
            {"completions": ["c"] * 5 + [None] + ["c"] * 94},
            'release.json: field "completions[5]" must be a string, got null',
        ),
    ]:
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(DataError) as e:
            read_release(path)
        assert str(e.value).replace(str(tmp_path) + "/", "") == message
    path.write_text(json.dumps(good)[:-5])
    with pytest.raises(DataError, match=r"release\.json:1: invalid JSON"):
        read_release(path)
    path.write_text(json.dumps(good))
    assert [q.task for q in read_release(path)][::20] == [
        "factual",
        "factual",
        "two_step_arithmetic",
        "slopes",
        "factual_control",
    ]


@pytest.mark.parametrize("model", ["7B", "35B"])
def test_paper_release_queries_load_tokenize_and_mask(model, encoder, require_oracle):
    """The 100 + 100 released queries of Ruis et al.: kinds by index range, tokens, completion masks."""
    path = require_oracle(
        RELEASE_DIR / f"release_{model}.json",
        f"the released queries of Ruis et al. are not at {RELEASE_DIR} (../shared/data/ruis2024)",
    )
    queries = read_queries(path)
    raw = json.loads(Path(path).read_text())
    assert len(queries) == 100
    assert [q.id for q in queries] == [str(i) for i in raw["test_ids"]]
    assert [q.prompt for q in queries] == raw["prompts"] and [q.completion for q in queries] == raw["completions"]
    kinds = [q.kind for q in queries]
    assert kinds == ["factual"] * 40 + ["reasoning"] * 40 + ["control"] * 20
    tasks_ = [q.task for q in queries]
    middle = "two_step_arithmetic" if model == "7B" else "linear_equations"
    assert (
        tasks_
        == ["factual"] * 40 + [middle] * 20 + ["slopes"] * 20 + ["factual_control"] * 10 + ["reasoning_control"] * 10
    )
    encoded = encode_queries(queries, encoder, max_length=2048)
    batches = query_batches(encoded, batch_size=32, max_length=2048)
    assert len(batches) == 4 and len({b["tokens"].shape for b in batches}) == 1
    tok = encoder.tokenizer
    for q, e in zip(queries, encoded):
        b = batches[q.index // 32]
        j = q.index % 32
        assert b["index"][j] == q.index
        target_ids = b["tokens"][j][b["weights"][j] == 1].tolist()
        assert target_ids == tok.encode(q.completion, add_special_tokens=False).ids
        assert tok.decode(target_ids) == q.completion  # byte-level BPE decodes back to the text
        assert b["weights"][j].sum() == e.completion_length > 0
        assert b["mask"][j].sum() == len(e.ids)
    docs = release_documents(path)
    assert len(docs) == 80 and [d.id for d in docs] == [str(i) for i in raw["training_ids"]]
    assert {d.source for d in docs} <= {
        "arxiv_markdown",
        "code",
        "general_knowledge",
        "math_and_trivia",
        "multilingual",
        "stackexchange",
        "webdata",
        "wiki",
    }


def test_missing_oracle_skips_or_fails(monkeypatch, tmp_path, require_oracle):
    monkeypatch.delenv("JAXINF_REQUIRE_ORACLES", raising=False)
    assert require_oracle(tmp_path, "present") == tmp_path
    with pytest.raises(pytest.skip.Exception, match="data not here"):
        require_oracle(tmp_path / "nope", "data not here")
    with pytest.raises(pytest.skip.Exception):
        require_oracle(False, "no torch")
    monkeypatch.setenv("JAXINF_REQUIRE_ORACLES", "1")
    with pytest.raises(pytest.fail.Exception, match="data not here"):
        require_oracle(tmp_path / "nope", "data not here")


def test_read_queries_jsonl_needs_a_query(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no queries"):
        read_queries_jsonl(path)
    with pytest.raises(DataError, match="no such file"):
        read_queries(tmp_path / "missing.jsonl")
