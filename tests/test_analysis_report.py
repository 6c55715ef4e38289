"""The report escapes everything it shows: a hostile document, loaded in headless Chromium,
runs no script, and every figure of the report loads."""

from __future__ import annotations

import numpy as np
from analysis_fixtures import FAST, make_run
from chromium_cdp import chromium_path, inspect_page
from conftest import require_oracle

from jaxinf.analysis import analyze
from jaxinf.exports import formats as aio

SCRIPT = "<script>window.__pwned = 'script'; document.title = 'PWNED';</script>"
IMG = "<img src=x onerror=\"window.__pwned = 'img'; document.title = 'PWNED'\">"
PAYLOAD = f"Before {SCRIPT} middle {IMG} after"


def _hostile_run(tmp_path):
    rng = np.random.default_rng(0)
    Q, N = 6, 300
    s = rng.normal(size=(Q, N))
    s[:, 7] = 50.0   # the hostile document is every query's top document
    s[:, 8] = -50.0  # and another one is every query's bottom document
    texts = [f"plain text {n}" for n in range(N)]
    texts[7] = PAYLOAD
    texts[8] = IMG + " 42"
    sources = ["web"] * N
    sources[7] = "<script>window.__pwned='source'</script>"
    doc_ids = [f"d{n}" for n in range(N)]
    doc_ids[8] = "<img src=y onerror=\"window.__pwned='id'\">"
    run = make_run(tmp_path / "run", s, kinds=["reasoning", "reasoning", "factual", "factual", "control", "<b>kind"],
                   tasks=["t<script>", "t<script>", "f", "f", "c", None], sources=sources, texts=texts,
                   doc_ids=doc_ids, prompts=[f"{SCRIPT} prompt {q}" for q in range(Q)],
                   completions=[f"{IMG} = 42" for _ in range(Q)], query_ids=[f"q{q}<i>" for q in range(Q)])
    aio.write_topk(run / "topk.jsonl", [{"query": f"q{q}<i>", "top": [{"id": "d7", "score": 50.0}], "bottom": []}
                                        for q in range(Q)])
    aio.write_topk_tokens(run / "topk_tokens.jsonl", [
        {"query": f"q{q}<i>", "document": "d7", "rank": 0,
         "tokens": [{"text": SCRIPT, "score": 30.0}, {"text": IMG, "score": 20.0}]} for q in range(Q)])
    return run


def test_hostile_text_is_escaped_in_the_html(tmp_path):
    run = _hostile_run(tmp_path)
    analyze(run, FAST, log=lambda *_: None)
    html = (run / "report" / "index.html").read_text()
    low = html.lower()
    assert "<script" not in low and "onerror=" not in low.replace("onerror=&quot;", "")
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

    page = inspect_page((run / "report" / "index.html").as_uri(), exe)
    assert page["pwned"] is None and page["title"] == "jaxinf analysis"
    assert page["scripts"] == 0 and page["handlers"] == 0
    pngs = sorted(p.name for p in (run / "report").glob("*.png"))
    assert sorted(i["src"] for i in page["images"]) == pngs
    assert len(pngs) >= 6
    for img in page["images"]:
        assert img["complete"] and img["width"] > 0, img
    assert SCRIPT in page["text"] and "onerror=" in page["text"]  # shown as text
