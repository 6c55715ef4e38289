"""jaxinf analyze on hand-made run directories: end to end, the formats, bad input and fallbacks."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from analysis_fixtures import FAST, make_run, structured_scores

from jaxinf import cli
from jaxinf.analysis import AnalysisError, analyze
from jaxinf.analysis.texts import jsonl_text_source
from jaxinf.run.exports import formats as aio

KINDS = ["factual"] * 4 + ["reasoning"] * 8 + ["control"] * 4
TASKS = ["factual"] * 4 + ["arith"] * 4 + ["slopes"] * 4 + ["reasoning_control"] * 4


def _snapshot(d):
    return sorted(
        (p.relative_to(d).as_posix(), p.stat().st_size, p.read_bytes() if p.is_file() else b"") for p in d.rglob("*")
    )


def _basic(tmp_path, **kw):
    rng = np.random.default_rng(0)
    s = structured_scores(rng, TASKS, 600)
    args = dict(
        kinds=KINDS,
        tasks=TASKS,
        sources=[["web", "code", "wiki"][n % 3] for n in range(600)],
        tokens=[10 + n % 7 for n in range(600)],
        texts=[f"document {n} says {n * 7}" for n in range(600)],
        losses=[1.0 + q for q in range(16)],
    )
    args.update(kw)
    return make_run(tmp_path / "run", s, **args), s


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_numbers_match_direct_computations(tmp_path):
    run, s = _basic(tmp_path)
    s32 = s.astype(np.float32).astype(np.float64)  # what scores.npy holds
    out = analyze(run, FAST, log=lambda *_: None)
    summary = json.loads((run / "summary.json").read_text())
    # correlations: the streamed matrix is np.corrcoef of the stored scores
    np.testing.assert_allclose(np.asarray(summary["correlations"]["matrix"]), np.corrcoef(s32), atol=1e-10)
    r = np.corrcoef(s32)
    arith = [4, 5, 6, 7]
    direct = np.mean([r[i, j] for i in arith for j in arith if i < j])
    assert summary["correlations"]["within_task"]["arith"]["mean"] == pytest.approx(direct, abs=1e-10)
    # concentration and per nat, by direct sort
    for q in (0, 9):
        row = s32[q]
        pos = np.clip(row, 0, None)
        k = math.ceil(0.01 * 600)
        assert summary["concentration"]["per_query"][q]["positive"][1] == pytest.approx(
            np.sort(pos)[::-1][:k].sum() / pos.sum(), rel=1e-9
        )
        assert summary["concentration"]["per_nat"]["per_query"][q]["absolute"] == pytest.approx(
            np.abs(row).sum() / (1.0 + q), rel=1e-9
        )
    # top documents are the argsort of the row
    top = [e["id"] for e in summary["top_documents"][3]["top"]]
    assert top == [f"d{i}" for i in np.argsort(-s32[3], kind="stable")[:10]]
    assert summary["sources"]["by_tokens"] is True
    assert summary["answers"]["available"] is True
    assert summary["layers"]["available"] is False and "not exported" in summary["layers"]["reason"]
    assert out["n_queries"] == 16
    html = (run / "report" / "index.html").read_text()
    assert "not exported" in html
    assert (run / "report" / "summary.md").read_text().startswith("# Influence analysis")
    # the paper's findings are tested on the run's own numbers and head the report
    from jaxinf.analysis import findings

    first, second = summary["findings"]
    assert first["name"] == "procedural knowledge" and second["name"] == "answers in the top documents"
    # finding 1 recomputed from the stored scores: the mean within-task r of reasoning pairs minus factual pairs
    same = lambda kind: [
        r[i, j] for i in range(16) for j in range(i + 1, 16) if KINDS[i] == KINDS[j] == kind and TASKS[i] == TASKS[j]
    ]
    d = np.mean(same("reasoning")) - np.mean(same("factual"))
    assert first["reasoning"] == pytest.approx(np.mean(same("reasoning")), abs=1e-10)
    assert first["difference"] == pytest.approx(d, abs=1e-10)
    n = summary["correlations"]["comparisons"][0]["n_permutations"]
    p = first["vs_factual"]["p_value"]
    assert n == FAST.permutations and 1 <= p * (1 + n) <= 1 + n  # (1 + hits) / (1 + permutations)
    assert p * (1 + n) == pytest.approx(round(p * (1 + n)), abs=1e-9)
    # no control shares a task with the reasoning queries here, so shared wording cannot be ruled out
    assert first["holds"] is None and first["vs_controls"]["p_value"] is None
    assert "vs template-matched controls: not testable" in first["statistic"]
    assert second["holds"] is None and "answer items" in second["statistic"]  # no query here has an answer
    assert 'id="findings"' in html and findings.verdict_text(second) in html
    assert findings.verdict_text(first) in (run / "report" / "summary.md").read_text()
    for name in ("correlations.png", "concentration.png", "per_nat.png", "powerlaw.png", "sources.png", "answers.png"):
        assert (run / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{name}"' in html


def test_answers_are_searched_as_the_correct_answer_and_as_the_models_own(tmp_path):
    """Issue 24: each query's top documents are searched for its ``answer`` and for its ``model_answer`` (else
    what the rules take from the completion); finding 2 reports both."""
    answers = ["14"] * 4 + ["77"] * 8 + [None] * 4  # "document n says 7n": 14 is in d2 and d14
    completions = ["so 21 ."] * 16
    run, s = _basic(tmp_path, answers=answers, completions=completions)
    rows = [json.loads(line) for line in (run / "queries.jsonl").read_text().splitlines()]
    for r in rows[4:12]:
        r["model_answer"] = ["9999"]  # in no document
    aio.write_queries(run / "queries.jsonl", rows)
    out = analyze(run, FAST, write=False, log=lambda *_: None)
    per = out["answers"]["per_query"]
    assert per[0]["rule"] == "answer field" and per[0]["items"] == ["14"]
    assert per[0]["model"] == {"rule": "numbers and key phrases", "items": ["21"], "by_k": per[0]["model"]["by_k"]}
    assert per[5]["model"]["rule"] == "model_answer field" and per[5]["model"]["items"] == ["9999"]
    assert not any(b["found_all"] for b in per[5]["model"]["by_k"])
    s32 = s.astype(np.float32)
    for q, holders in ((0, (2, 14)), (5, (11, 77))):  # found at k when a document stating it is in the top k
        order = np.argsort(-s32[q], kind="stable")
        rank = min(int(np.flatnonzero(order == n)[0]) for n in holders)
        assert [b["found_all"] for b in per[q]["by_k"]] == [rank < k for k in out["answers"]["ks"]]
    second = out["findings"][1]
    assert second["answer"] == "correct answer" and set(second["variants"]) == {"correct answer", "model's answer"}
    assert second["variants"]["model's answer"]["table"][1] == [0, 8]


def test_report_shows_finding_one_against_template_matched_controls(tmp_path):
    """Issue 24: whatever the verdict, the report lists finding 1's comparison with factual queries and with the
    controls that share the reasoning queries' task, and finding 2's two kinds of answer."""
    from jaxinf.analysis import findings
    from jaxinf.analysis.report import fmt

    tasks = TASKS[:12] + ["arith", "arith", "slopes", "slopes"]  # the controls match the reasoning tasks
    rng = np.random.default_rng(0)
    run = make_run(
        tmp_path / "run",
        structured_scores(rng, tasks, 600),
        kinds=KINDS,
        tasks=tasks,
        texts=[f"document {n} says {n * 7}" for n in range(600)],
        answers=["14"] * 16,
        losses=[1.0 + q for q in range(16)],
    )
    analyze(run, FAST, log=lambda *_: None)
    summary = json.loads((run / "summary.json").read_text())
    first, second = summary["findings"]
    cmp = next(c for c in summary["correlations"]["comparisons"] if c["name"] == findings.CONTROLS)
    assert cmp["n_pairs_b"] == 2 and cmp["permuted"] == "kinds within each task"
    assert first["vs_controls"]["p_value"] == cmp["p_value"] and first["holds"] is not None
    assert summary["correlations"]["within_task"]["arith (control)"]["n"] == 1
    # the completion NLLs of the matched groups: reasoning queries 4-11 (losses 5-12), controls 12-15 (13-16)
    assert (first["loss_reasoning_matched"], first["loss_control_matched"]) == (8.5, 14.5)
    assert "median completion NLL: reasoning 8.5, template-matched controls 14.5 nats" in first["statistic"]
    html = (run / "report" / "index.html").read_text()
    details = html[html.index("reasoning queries against each comparison group") :]
    row = details[details.index("vs template-matched controls") :]
    for v in (first["reasoning_matched"], first["control_matched"], cmp["difference"], cmp["p_value"]):
        assert fmt(v) in row[: row.index("</tr>")]
    assert "correct answer (the verdict)" in html and "model&#x27;s answer" in html
    assert second["answer"] == "correct answer"


def test_chunk_size_does_not_change_the_numbers(tmp_path):
    run, _ = _basic(tmp_path)
    from dataclasses import replace

    a = analyze(run, replace(FAST, chunk_columns=7), write=False, log=lambda *_: None)
    b = analyze(run, replace(FAST, chunk_columns=100_000), write=False, log=lambda *_: None)
    np.testing.assert_allclose(a["correlations"]["matrix"], b["correlations"]["matrix"], atol=1e-12)
    assert a["concentration"]["per_query"] == b["concentration"]["per_query"]


def test_planted_sources_through_the_pipeline(tmp_path):
    """600 documents: A (first 300, 1 token), B (next 200, 3 tokens), C (last 100, 6 tokens).
    Every query's top 50 are 10 A, 10 B, 30 C; its bottom 50 are 50 A."""
    N = 600
    src = ["A"] * 300 + ["B"] * 200 + ["C"] * 100
    tok = [1] * 300 + [3] * 200 + [6] * 100
    rng = np.random.default_rng(1)
    s = rng.uniform(-1, 1, (3, N))
    top = list(range(0, 10)) + list(range(300, 310)) + list(range(500, 530))
    bottom = list(range(100, 150))
    s[:, top] = rng.uniform(10, 20, (3, 50))
    s[:, bottom] = rng.uniform(-20, -10, (3, 50))
    run = make_run(tmp_path / "run", s, kinds=["reasoning"] * 3, tasks=["t"] * 3, sources=src, tokens=tok)
    from dataclasses import replace

    out = analyze(run, replace(FAST, source_ks=(50,)), write=False, log=lambda *_: None)
    m = np.asarray(out["sources"]["by_kind"]["top"]["count"]["reasoning"]["mean"])[0]
    names = out["sources"]["sources"]
    want = {"A": (10 / 50) / 0.5, "B": (10 / 50) / (200 / 600), "C": (30 / 50) / (100 / 600)}
    for name, v in want.items():
        assert m[names.index(name)] == pytest.approx(v, rel=1e-12)
    mt = np.asarray(out["sources"]["by_kind"]["top"]["tokens"]["reasoning"]["mean"])[0]
    top_tok = np.array([10 * 1, 10 * 3, 30 * 6], float)
    corpus_tok = np.array([300 * 1, 200 * 3, 100 * 6], float)
    want_t = (top_tok / top_tok.sum()) / (corpus_tok / corpus_tok.sum())
    for i, name in enumerate("ABC"):
        assert mt[names.index(name)] == pytest.approx(want_t[i], rel=1e-12)
    mb = np.asarray(out["sources"]["by_kind"]["bottom"]["count"]["reasoning"]["mean"])[0]
    assert mb[names.index("A")] == pytest.approx(2.0) and mb[names.index("C")] == 0


# ----------------------------------------------------------------------------- bad input


def test_nan_score_names_the_row_and_column_and_leaves_the_run_as_it_was(tmp_path):
    run, s = _basic(tmp_path)
    s = s.copy()
    s[2, 417] = np.nan
    aio.write_scores(run / "scores.npy", s)
    before = _snapshot(run)
    with pytest.raises(AnalysisError) as e:
        analyze(run, FAST, log=lambda *_: None)
    assert str(e.value) == "scores.npy: NaN at query row 2 (id 'q2'), document column 417 (id 'd417')"
    assert _snapshot(run) == before


def test_infinite_score_is_an_error(tmp_path):
    run, s = _basic(tmp_path)
    s = s.copy()
    s[0, 5] = -np.inf
    aio.write_scores(run / "scores.npy", s)
    with pytest.raises(AnalysisError, match=r"inf at query row 0 .* document column 5"):
        analyze(run, FAST, write=False, log=lambda *_: None)


def test_failed_rerun_keeps_the_previous_outputs(tmp_path):
    run, s = _basic(tmp_path)
    analyze(run, FAST, log=lambda *_: None)
    before = _snapshot(run)
    with open(run / "queries.jsonl", "a") as f:
        f.write('{"id": "extra", "prompt": "p", "completion": "c"}\n')
    with pytest.raises(AnalysisError, match=r"^scores.npy: shape \(16, 600\) but queries.jsonl has 17 lines$"):
        analyze(run, FAST, log=lambda *_: None)
    after = [x for x in _snapshot(run) if x[0] != "queries.jsonl"]
    assert after == [x for x in before if x[0] != "queries.jsonl"]


def test_shape_disagreeing_with_documents(tmp_path):
    run, s = _basic(tmp_path)
    aio.write_scores(run / "scores.npy", s[:, :599])
    with pytest.raises(AnalysisError, match=r"^scores.npy: shape \(16, 599\) but documents.jsonl has 600 lines$"):
        analyze(run, FAST, write=False, log=lambda *_: None)


@pytest.mark.parametrize(
    "array,message",
    [
        (np.zeros(5, np.float32), "expected a 2-D"),
        (np.zeros((2, 3), np.int32), "is not floating point"),
        (np.asfortranarray(np.zeros((2, 3), np.float32)), "Fortran-ordered"),
    ],
)
def test_bad_score_arrays(tmp_path, array, message):
    np.save(tmp_path / "scores.npy", array)
    with pytest.raises(AnalysisError, match=message):
        aio.ScoreMatrix(tmp_path / "scores.npy")


def test_truncated_and_foreign_score_files(tmp_path):
    np.save(tmp_path / "scores.npy", np.zeros((4, 100), np.float32))
    data = (tmp_path / "scores.npy").read_bytes()
    (tmp_path / "scores.npy").write_bytes(data[:-8])
    with pytest.raises(AnalysisError, match=r"^scores\.npy: cut short \(1,720 bytes, its header describes 1,728\)"):
        aio.ScoreMatrix(tmp_path / "scores.npy")
    (tmp_path / "scores.npy").write_bytes(b"not numpy at all")
    with pytest.raises(AnalysisError, match=r"^scores\.npy: not a numpy array file \(no \.npy header\)$"):
        aio.ScoreMatrix(tmp_path / "scores.npy")


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"id": "a", "prompt": "p"}', "queries.jsonl line 2: missing field completion"),
        (
            '{"id": "a", "prompt": "p", "completion": "c", "loss": -1}',
            "queries.jsonl line 2: field loss must be a positive",
        ),
        ('{"id": "q0", "prompt": "p", "completion": "c"}', "queries.jsonl line 2: duplicate id 'q0' (first on line 1)"),
        ('{"id": "a", "prompt": "p", "completion": "c", "answer": {"x": 1}}', "queries.jsonl line 2: field answer"),
        ('{"id": "a", "prompt": "p", "completion": "c", "task": 3}', "queries.jsonl line 2: field task"),
        ('{"id": "a", "prompt": ', "queries.jsonl line 2: invalid JSON"),
        ("[1, 2]", "queries.jsonl line 2: expected a JSON object"),
    ],
)
def test_bad_query_lines(tmp_path, line, message):
    (tmp_path / "queries.jsonl").write_text('{"id": "q0", "prompt": "p", "completion": "c"}\n' + line + "\n")
    with pytest.raises(AnalysisError) as e:
        aio.read_exported_queries(tmp_path / "queries.jsonl")
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"source": "web"}', "documents.jsonl line 2: missing field id"),
        ('{"id": "d1", "tokens": -3}', "documents.jsonl line 2: field tokens must be a non-negative integer"),
        ('{"id": "d1", "source": 7}', "documents.jsonl line 2: field source must be a string"),
        ('{"id": "d0"}', "documents.jsonl line 2: duplicate id 'd0' (first on line 1)"),
    ],
)
def test_bad_document_lines(tmp_path, line, message):
    (tmp_path / "documents.jsonl").write_text('{"id": "d0", "source": "web"}\n' + line + "\n")
    with pytest.raises(AnalysisError) as e:
        aio.read_documents(tmp_path / "documents.jsonl")
    assert str(e.value).startswith(message)


def test_integer_and_string_ids_are_the_same_id(tmp_path):
    (tmp_path / "documents.jsonl").write_text('{"id": 7}\n{"id": "7"}\n')
    with pytest.raises(AnalysisError, match="duplicate id '7'"):
        aio.read_documents(tmp_path / "documents.jsonl")


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    run, s = _basic(tmp_path)
    aio.write_scores(run / "scores.npy", s[:3])
    assert cli.main(["analyze", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == "jaxinf analyze: error: scores.npy: shape (3, 600) but queries.jsonl has 16 lines\n"


def test_missing_files_are_named(tmp_path):
    run, _ = _basic(tmp_path)
    os.remove(run / "documents.jsonl")
    with pytest.raises(AnalysisError, match=r"^documents.jsonl: missing"):
        analyze(run, FAST, write=False, log=lambda *_: None)


# ----------------------------------------------------------------------------- fallbacks


def test_unknown_kinds_and_missing_sources_are_visible(tmp_path):
    kinds = list(KINDS)
    kinds[0] = "reasonning"
    kinds[1] = None
    sources = [["web", "code", None][n % 3] for n in range(600)]
    run, _ = _basic(tmp_path, kinds=kinds, sources=sources, tokens=None)
    out = analyze(run, FAST, log=lambda *_: None)
    assert out["queries"]["kinds"]["unknown"] == 2
    assert any("2 queries have a missing or unknown kind ('reasonning', None)" in n for n in out["notes"])
    assert out["documents"]["sources"]["unknown"]["count"] == 200
    assert any("200 of 600 documents have no source" in n for n in out["notes"])
    assert any("no token count" in n for n in out["notes"]) and out["sources"]["by_tokens"] is False
    assert "unknown" in out["concentration"]["by_kind"]["positive"][0.01]
    html = (run / "report" / "index.html").read_text()
    assert "Notes and fallbacks" in html and "&#x27;reasonning&#x27;" in html
    assert "<td>unknown</td>" in html
    md = (run / "report" / "summary.md").read_text()
    assert "unknown kind" in md


def test_without_loss_per_nat_is_skipped_and_said(tmp_path):
    run, _ = _basic(tmp_path, losses=None)
    out = analyze(run, FAST, log=lambda *_: None)
    assert out["concentration"]["per_nat"] is None
    assert any("no loss" in n and "per-nat numbers are skipped" in n for n in out["notes"])
    assert not (run / "report" / "per_nat.png").exists()
    assert "Per-nat totals: not available" in (run / "report" / "index.html").read_text()


def test_scores_already_per_nat_are_not_divided_again(tmp_path):
    run, s = _basic(tmp_path)
    (run / "run.json").write_text(json.dumps({"config": {"scores": {"normalize": "per_nat"}}}))
    out = analyze(run, FAST, write=False, log=lambda *_: None)
    s32 = s.astype(np.float32).astype(np.float64)
    assert out["concentration"]["per_nat"]["per_query"][5]["absolute"] == pytest.approx(np.abs(s32[5]).sum(), rel=1e-9)


def test_texts_from_the_corpus_named_in_run_json(tmp_path):
    run, _ = _basic(tmp_path, texts=None)
    corpus = tmp_path / "corpus.jsonl"
    # even lines start with their id (skipped unparsed when not wanted), odd ones do not
    aio.write_jsonl(
        corpus,
        (
            {"id": f"d{n}", "text": f"corpus text {n}", "source": "x"}
            if n % 2 == 0
            else {"text": f"corpus text {n}", "id": f"d{n}"}
            for n in range(600)
        ),
    )
    want = ["d3", "d4", "d599", "d0", "nope"]
    assert jsonl_text_source(corpus)(want) == {f"d{n}": f"corpus text {n}" for n in (3, 4, 599, 0)}
    (run / "run.json").write_text(json.dumps({"config": {"data": {"documents": str(corpus)}}}))
    out = analyze(run, FAST, write=False, log=lambda *_: None)
    assert out["answers"]["available"] and "run.json" in out["text_source"]
    assert out["top_documents"][0]["top"][0]["id"] in {f"d{n}" for n in range(600)}
    assert not any("texts were not found" in n for n in out["notes"])
    calls = []

    def source(ids):
        calls.append(list(ids))
        return {i: f"given {i}" for i in ids}

    (run / "run.json").unlink()
    out = analyze(run, FAST, text_source=source, write=False, log=lambda *_: None)
    assert out["text_source"] == "text source given by the caller" and len(calls) == 1
    assert out["answers"]["available"]


def test_a_relative_corpus_path_is_read_where_the_run_was_started(tmp_path, monkeypatch):
    """Issue 25: run.json names the corpus as the config gave it (relative to where ``jaxinf run`` started); analyze
    started from another directory finds it through run.json's ``cwd``, and without that field it does not."""
    run, _ = _basic(tmp_path, texts=None)
    started = tmp_path / "project"
    (started / "data").mkdir(parents=True)
    aio.write_jsonl(
        started / "data" / "corpus.jsonl", ({"id": f"d{n}", "text": f"corpus text {n}"} for n in range(600))
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    record = {"config": {"data": {"documents": "data/corpus.jsonl"}}}
    (run / "run.json").write_text(json.dumps(record))
    out = analyze(run, FAST, write=False, log=lambda *_: None)
    assert out["text_source"] == "none" and any("not found" in n for n in out["notes"])
    (run / "run.json").write_text(json.dumps({**record, "cwd": str(started)}))
    out = analyze(run, FAST, write=False, log=lambda *_: None)
    assert out["answers"]["available"] and out["text_source"].startswith(str(started / "data" / "corpus.jsonl"))


def test_no_texts_at_all(tmp_path):
    run, _ = _basic(tmp_path, texts=None)
    out = analyze(run, FAST, log=lambda *_: None)
    assert out["answers"] == {"available": False, "reason": "no document texts"}
    assert any("no document texts are available" in n for n in out["notes"])
    assert "(text not available)" in (run / "report" / "index.html").read_text()


# ----------------------------------------------------------------------------- layer and token exports


def _with_exports(tmp_path, K=5):
    run, s = _basic(tmp_path)
    s32 = s.astype(np.float32).astype(np.float64)
    Q = s.shape[0]
    names = [f"model.layers.{i}.mlp.{p}" for i in range(6) for p in ("up_proj", "down_proj")]
    rng = np.random.default_rng(3)
    topk, ls, toks = [], np.zeros((Q, K, len(names))), []
    for q in range(Q):
        order = np.argsort(-s32[q], kind="stable")[:K]
        topk.append(
            {
                "query": f"q{q}",
                "top": [{"id": f"d{i}", "source": "x", "score": float(s32[q, i]), "snippet": ""} for i in order],
                "bottom": [],
            }
        )
        for k, i in enumerate(order):
            w = rng.dirichlet(np.ones(len(names)))
            ls[q, k] = w * s32[q, i]
            tw = rng.dirichlet(np.ones(4))
            toks.append(
                {
                    "query": f"q{q}",
                    "document": f"d{i}",
                    "rank": k,
                    "tokens": [
                        {"text": t, "score": float(v * s32[q, i])}
                        for t, v in zip(["doc", "ument", " <b>tok</b>", f" {i}"], tw)
                    ],
                }
            )
    aio.write_topk(run / "topk.jsonl", topk)
    aio.write_layer_exports(run, names, ls)
    aio.write_topk_tokens(run / "topk_tokens.jsonl", toks)
    return run, names, ls


def test_layer_and_token_exports_round_trip(tmp_path):
    run, names, ls = _with_exports(tmp_path)
    got_names, got = aio.read_layer_exports(run)
    assert got_names == names and np.allclose(got, ls.astype(np.float32))
    out = analyze(run, FAST, log=lambda *_: None)
    la = out["layers"]
    assert la["available"] and la["bins"][:4] == ["lower"] * 4 and la["bins"][-4:] == ["upper"] * 4
    a = np.abs(ls.astype(np.float32).astype(np.float64)).sum(1)
    direct_upper = a[:, 8:].sum(1) / a.sum(1)
    np.testing.assert_allclose(la["bin_share_per_query"]["upper"], direct_upper, rtol=1e-9)
    assert la["sum_check_max_relative_difference"] < 1e-5
    to = out["tokens"]
    assert to["available"] and to["sum_check_max_relative_difference"] < 1e-5
    assert not any("do not sum" in n for n in out["notes"])
    html = (run / "report" / "index.html").read_text()
    assert "layers.png" in html and "<mark" in html
    assert "&lt;b&gt;tok&lt;/b&gt;" in html and "<b>tok</b>" not in html


def test_layer_exports_that_disagree_with_scores_are_flagged(tmp_path):
    run, names, ls = _with_exports(tmp_path)
    aio.write_layer_exports(run, names, ls * 2)
    out = analyze(run, FAST, write=False, log=lambda *_: None)
    assert any("per-layer scores do not sum to scores.npy" in n for n in out["notes"])


def test_inconsistent_layer_exports_are_errors(tmp_path):
    run, names, ls = _with_exports(tmp_path)
    (run / "layers.json").write_text(json.dumps({"names": names[:-1]}))
    with pytest.raises(AnalysisError, match=r"^layer_scores.npy: shape \(16, 5, 12\) but layers.json has 11 names"):
        analyze(run, FAST, write=False, log=lambda *_: None)
    aio.write_layer_exports(run, names, ls)
    os.remove(run / "topk.jsonl")
    with pytest.raises(AnalysisError, match="topk.jsonl is missing"):
        analyze(run, FAST, write=False, log=lambda *_: None)
    os.remove(run / "layers.json")
    with pytest.raises(AnalysisError, match="^layers.json: missing while layer_scores.npy is present"):
        analyze(run, FAST, write=False, log=lambda *_: None)


def test_token_export_naming_an_unknown_document(tmp_path):
    run, names, ls = _with_exports(tmp_path)
    with open(run / "topk_tokens.jsonl", "a") as f:
        f.write(json.dumps({"query": "q0", "document": "nope", "rank": 9, "tokens": []}) + "\n")
    with pytest.raises(AnalysisError, match="document 'nope' is not in documents.jsonl"):
        analyze(run, FAST, write=False, log=lambda *_: None)


# ----------------------------------------------------------------------------- degenerate sizes


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("Q,N", [(1, 1), (2, 2), (3, 1), (1, 5)])
def test_tiny_runs_complete_without_warnings(tmp_path, Q, N):
    s = np.arange(Q * N, dtype=float).reshape(Q, N) - 1
    run = make_run(
        tmp_path / "run",
        s,
        kinds=["reasoning"] * Q,
        tasks=["t"] * Q,
        sources=["a"] * N,
        tokens=[0] * N,
        texts=["x 1"] * N,
    )
    out = analyze(run, FAST, log=lambda *_: None)
    assert (run / "report" / "index.html").exists()
    assert any("token count of 0" in n for n in out["notes"])
    if N == 1:
        assert any("same score for every document" in n for n in out["notes"])
        assert json.loads((run / "summary.json").read_text())["correlations"]["matrix"][0][0] is None


@pytest.mark.heavy
def test_memory_stays_bounded_on_a_large_matrix(tmp_path):
    """80 x 1,000,000 (305 MiB of float32): the whole analysis stays within 300 MB of the
    resident memory of merely reading the inputs (bound set before measuring)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_analysis.py"
    sys.path.insert(0, str(script.parent))
    import bench_analysis

    bench_analysis.generate(tmp_path, 80, 1_000_000)
    rss = {}
    for stage in ("baseline", "analyze"):
        out = subprocess.run(
            [sys.executable, str(script), "--stage", stage, "--dir", str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
        )
        rss[stage] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    assert rss["analyze"] - rss["baseline"] < 300, rss
