"""The report escapes everything it shows: a hostile document, loaded in headless Chromium,
runs no script but the report's own search box (which filters queries and documents as typed),
every figure of the report loads, and the per-token context reads as the tokenizer decodes it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from analysis_fixtures import FAST, make_run
from chromium_cdp import chromium_path, inspect_page
from conftest import require_oracle

from jaxinf.analysis import analyze, page
from jaxinf.run.exports import formats as aio

SCRIPT = "<script>window.__pwned = 'script'; document.title = 'PWNED';</script>"
IMG = "<img src=x onerror=\"window.__pwned = 'img'; document.title = 'PWNED'\">"
PAYLOAD = f"Before {SCRIPT} middle {IMG} after"


def _hostile_run(tmp_path):
    rng = np.random.default_rng(0)
    Q, N = 6, 300
    s = rng.normal(size=(Q, N))
    s[:, 7] = 50.0  # the hostile document is every query's top document
    s[:, 8] = -50.0  # and another one is every query's bottom document
    texts = [f"plain text {n}" for n in range(N)]
    texts[7] = PAYLOAD
    texts[8] = IMG + " 42"
    sources = ["web"] * N
    sources[7] = "<script>window.__pwned='source'</script>"
    doc_ids = [f"d{n}" for n in range(N)]
    doc_ids[8] = "<img src=y onerror=\"window.__pwned='id'\">"
    run = make_run(
        tmp_path / "run",
        s,
        kinds=["reasoning", "reasoning", "factual", "factual", "control", "<b>kind"],
        tasks=["t<script>", "t<script>", "f", "f", "c", None],
        sources=sources,
        texts=texts,
        doc_ids=doc_ids,
        prompts=[f"{SCRIPT} prompt {q}" for q in range(Q)],
        completions=[f"{IMG} = 42" for _ in range(Q)],
        query_ids=[f"q{q}<i>" for q in range(Q)],
    )
    aio.write_topk(
        run / "topk.jsonl",
        [{"query": f"q{q}<i>", "top": [{"id": "d7", "score": 50.0}], "bottom": []} for q in range(Q)],
    )
    aio.write_topk_tokens(
        run / "topk_tokens.jsonl",
        [
            {
                "query": f"q{q}<i>",
                "document": "d7",
                "rank": 0,
                "tokens": [{"text": SCRIPT, "score": 30.0}, {"text": IMG, "score": 20.0}],
            }
            for q in range(Q)
        ],
    )
    return run


def test_hostile_text_is_escaped_in_the_html(tmp_path):
    run = _hostile_run(tmp_path)
    analyze(run, FAST, log=lambda *_: None)
    html = (run / "report" / "index.html").read_text()
    low = html.lower()
    assert low.count("<script") == 1 and html.count(page.SCRIPT) == 1  # the report's own script, nothing else
    assert "onerror=" not in low.replace("onerror=&quot;", "")
    assert "&lt;script&gt;window.__pwned = &#x27;script&#x27;" in html
    assert html.count("<img ") == len(list((run / "report").glob("*.png")))
    md = (run / "report" / "summary.md").read_text()
    assert "<script" not in md.lower()


def test_report_in_headless_chromium(tmp_path):
    exe = chromium_path()
    require_oracle(exe is not None, "chromium is not installed (apt-get install chromium)")
    run = _hostile_run(tmp_path)
    analyze(run, FAST, log=lambda *_: None)
    # The probe must be able to see a script run: the same payload, unescaped, is caught.
    bare = tmp_path / "unescaped.html"
    bare.write_text(f"<!DOCTYPE html><html><head><title>clean</title></head><body>{PAYLOAD}</body></html>")
    seen = inspect_page(bare.as_uri(), exe)
    assert seen["pwned"] is not None and seen["title"] == "PWNED"

    words = ["q3<i>", "middle", "prompt 3", "zzqx", ""]
    shown = inspect_page(
        (run / "report" / "index.html").as_uri(), exe, steps=tuple(SEARCH % json.dumps(w) for w in words)
    )
    assert shown["pwned"] is None and shown["title"] == "jaxinf analysis"
    assert shown["scripts"] == 1 and shown["handlers"] == 0  # the search box's script, allowed by its hash
    pngs = sorted(p.name for p in (run / "report").glob("*.png"))
    assert sorted(i["src"] for i in shown["images"]) == pngs
    assert len(pngs) >= 6
    for img in shown["images"]:
        assert img["complete"] and img["width"] > 0, img
    assert SCRIPT in shown["text"] and "onerror=" in shown["text"]  # shown as text
    # the search box, typed into: queries by their own text (whole), else documents by theirs (only those rows)
    by_word = dict(zip(words, shown["steps"]))
    ids = [f"q{q}<i>" for q in range(6)]
    everything = by_word[""]
    assert everything["count"] == "" and [e["id"] for e in everything["queries"]] == ids
    assert all(e["shown"] and e["open"] and e["rows"] == e["total"] > 2 for e in everything["queries"])
    one = by_word["q3<i>"]
    assert one["count"] == "1 of 6 queries"
    assert [e["id"] for e in one["queries"] if e["shown"]] == ["q3<i>"] and one["queries"][3]["rows"] == everything[
        "queries"
    ][3]["rows"]
    assert by_word["prompt 3"]["count"] == "1 of 6 queries"  # every word, in the same query
    middle = by_word["middle"]  # in document d7's text only: each query's top 1
    assert middle["count"] == "6 of 6 queries"
    assert all(e["shown"] and e["open"] and e["ids"] == ["d7"] for e in middle["queries"])
    assert by_word["zzqx"]["count"] == "0 of 6 queries" and not any(e["shown"] for e in by_word["zzqx"]["queries"])


SEARCH = """(function (word) {
  var box = document.getElementById("search");
  box.value = word;
  box.dispatchEvent(new Event("input"));
  return {count: document.getElementById("search-count").textContent,
          queries: Array.from(document.querySelectorAll("#queries details.query")).map(function (d) {
            var rows = Array.from(d.querySelectorAll("tbody tr"));
            var seen = rows.filter(function (r) { return getComputedStyle(r).display !== "none"; });
            return {id: d.querySelector("summary b").textContent, shown: getComputedStyle(d).display !== "none",
                    open: d.open, total: rows.length, rows: seen.length,
                    ids: seen.map(function (r) { return r.cells[1].textContent; })};
          })};
})(%s)"""


def _wordpiece():
    """A tiny WordPiece tokenizer (BERT's pre-tokenizer and decoder) over a fixed vocabulary; nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = [
        "[UNK]",
        "the",
        "cat",
        "dog",
        "sat",
        "on",
        "mat",
        "rug",
        "play",
        "##ed",
        "##ing",
        "un",
        "##believ",
        "##able",
        ".",
        ",",
        "and",
        "then",
        "slept",
    ]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def test_token_context_is_the_tokenizers_decoding(tmp_path):
    """Issue 25, case 13: the per-token context column is the tokenizer's decode of the token window with the scored
    tokens marked, not WordPiece tokens run together ("theplay##edon")."""
    import dataclasses
    import html
    import re

    from jaxinf.data.tokenize import token_pieces

    tok = _wordpiece()
    text = (
        "the cat played on the mat, and then the dog sat on the rug. " * 8
        + "the cat sat on the mat and then slept, unbelievable. the dog played."
    )
    ids = tok.encode(text).ids
    pieces = token_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)
    middle = [i for i, t in enumerate(ids) if tok.id_to_token(t) in ("##ed", "##able")]  # in the middle of words
    scored = [middle[0], middle[-2], middle[-1]]  # the first "played", "unbelievable", the last "played"
    scores = np.full(len(ids), 0.01)
    scores[scored] = [5.0, 4.0, 3.0]
    run = make_run(tmp_path / "run", np.array([[9.0, 1.0], [8.0, 2.0]]))
    aio.write_topk(
        run / "topk.jsonl", [{"query": q, "top": [{"id": "d0", "score": 9.0}], "bottom": []} for q in ("q0", "q1")]
    )
    aio.write_topk_tokens(
        run / "topk_tokens.jsonl",
        [
            {
                "query": "q0",
                "document": "d0",
                "rank": 0,
                "tokens": [
                    {"text": tok.id_to_token(t), "piece": p, "score": float(v)} for t, p, v in zip(ids, pieces, scores)
                ],
            }
        ],
    )
    analyze(run, dataclasses.replace(FAST, tokens_shown=len(scored)), log=lambda *_: None)
    page = (run / "report" / "index.html").read_text()
    cell = re.findall(r'<td><div class="doc">(.*?)</div></td>', page[page.index('id="layers"') :])[0]
    marked = [html.unescape(m) for m in re.findall(r"<mark[^>]*>(.*?)</mark>", cell)]
    assert sorted(marked) == ["able", "ed", "ed"]  # the text of the tokens in place ("##" is the vocabulary's)
    shown = html.unescape(re.sub(r"</?mark[^>]*>", "", cell)).split(" \u2026 ")
    keep = sorted({j for p in scored for j in range(max(0, p - 30), min(len(ids), p + 30))})
    runs, start = [], keep[0]
    for a, b in zip(keep, keep[1:] + [None]):
        if b != a + 1:
            runs.append((start, a + 1))
            start = b
    assert len(runs) == 2 and not any(tok.id_to_token(ids[a]).startswith("##") for a, _ in runs)
    assert shown == [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in runs]
    assert "played" in shown[0] and "play##ed" not in cell and "playedon" not in cell


def test_a_malformed_token_piece_is_one_line(tmp_path):
    from jaxinf.run.exports.formats import AnalysisError, iter_topk_tokens

    path = tmp_path / "topk_tokens.jsonl"
    aio.write_topk_tokens(
        path,
        [
            {
                "query": "q",
                "document": "d",
                "rank": 0,
                "tokens": [{"text": "a", "piece": "a", "score": 1.0}, {"text": "b", "score": 2.0}],
            }
        ],
    )
    with pytest.raises(
        AnalysisError,
        match=r"^topk_tokens\.jsonl line 1: field tokens\[1\]\.piece must be a string "
        r"\(every token has one or none does\)$",
    ):
        list(iter_topk_tokens(path))
