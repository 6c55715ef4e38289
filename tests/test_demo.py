"""The demo's world: held-out query problems, digit-level numbers, and what its queries file records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxinf.demo import corpus


def _problem(text: str) -> tuple:
    """(task, the problem's numbers) read off a worked example or a prompt: every form states the problem's
    numbers first, in the order of ``corpus.PROBLEM``."""
    task = "slopes" if "slope" in text else "linear" if "solve" in text else "arithmetic"
    numbers = [int(w) for w in text.replace("#", " ").split() if w.isdigit()]
    return (task, *numbers[: len(corpus.PROBLEM[task])])


def test_no_document_works_a_query_problem():
    docs = [d for d in corpus.documents(0, 3000) if d["source"] in ("math_prose", "math_code")]
    queries = [q for q in corpus.queries(0, corpus.HELD_OUT) if q.kind == "reasoning"]
    asked = {_problem(q.prompt) for q in queries}
    assert len(asked) == 3 * corpus.HELD_OUT
    worked = {_problem(d["text"]) for d in docs}
    assert len(worked) > 1000 and not asked & worked
    controls = {_problem(q.prompt) for q in corpus.queries(0, corpus.HELD_OUT) if q.kind == "control" and q.completion}
    assert len(controls) >= 3 * corpus.HELD_OUT - 3 and not controls & worked


def test_template_controls_share_their_tasks_template_and_need_no_procedure():
    """Issue 24: each reasoning task has controls of its own surface form (prompt and completion) whose completion
    only copies the prompt's number (identity operands), so shared wording is controlled for in finding 1."""
    qs = corpus.queries(0, 8)
    for task in corpus.MAKERS:
        reasoning = [q for q in qs if q.task == task and q.kind == "reasoning"]
        controls = [q for q in qs if q.task == task and q.kind == "control"]
        assert len(controls) == len(reasoning) == 8
        for q in controls:
            n = int(q.answer)
            identity = {
                "arithmetic": dict(a=n, b=0, c=1, x=n, y=n),
                "slopes": dict(x1=0, y1=0, x2=1, y2=n, dy=n, dx=1, m=n),
                "linear": dict(a=1, b=0, c=n, ax=n, x=n),
            }[task]
            # the reasoning queries' prompt template and the corpus's worked-example template, word for word
            assert q.prompt == corpus.PROMPTS[task].format(**identity)
            assert q.prompt + " " + q.completion == corpus.PROSE[task].format(**identity)
            prompt_numbers = {int(w) for w in q.prompt.split() if w.isdigit()}
            assert {int(w) for w in q.completion.split() if w.isdigit()} <= prompt_numbers | {0, 1}
            assert q.next == "" and q.fact is None
    assert [q.kind for q in qs[-24:]] == ["control"] * 24  # last: the model completes the others as before
    assert all(not q.completion for q in qs[:-24])


def test_more_queries_extend_the_list_and_never_change_it():
    few, many = corpus.queries(0, 4), corpus.queries(0, 8)
    for task in corpus.MAKERS:
        for kind in ("reasoning", "control"):
            a = [q for q in few if q.task == task and q.kind == kind]
            b = [q for q in many if q.task == task and q.kind == kind]
            assert len(a) == 4 and a == b[: len(a)]
    import pytest

    with pytest.raises(ValueError, match="per_task=17"):
        corpus.queries(0, corpus.HELD_OUT + 1)


def test_reasoning_query_answers_follow_from_their_prompts():
    for q in corpus.queries(0, 8):
        if q.kind != "reasoning":
            continue
        if q.task == "arithmetic":
            a, b = (int(w) for w in q.prompt.split() if w.isdigit())
            assert int(q.next) == int(q.answer) == a + b
        elif q.task == "linear":
            a, b, c = [int(w) for w in q.prompt.split() if w.isdigit()][:3]
            assert a * int(q.answer) + b == c and int(q.next) == c - b
        elif q.task == "slopes":
            x1, y1, x2, y2 = [int(w) for w in q.prompt.split() if w.isdigit()][:4]
            assert (y2 - y1) == int(q.answer) * (x2 - x1)


def test_tokenizer_spells_numbers_digit_by_digit_and_decodes_back():
    from jaxinf.demo import train

    tok = train.build_tokenizer(["let x = 12 + 30 . so x = 42 ."])
    text = "let x = 987 + 6 . so x = 993 ."  # numbers the corpus never had
    enc = tok.encode(text, add_special_tokens=False)
    assert "<unk>" not in enc.tokens
    assert enc.tokens[3:6] == ["9", "##8", "##7"]
    assert tok.decode(enc.ids) == text
    assert tok.encode(tok.decode(enc.ids), add_special_tokens=False).ids == enc.ids


def test_queries_file_has_the_correct_answer_and_the_models_own():
    from jaxinf.demo import query_row

    docs = corpus.documents(0, 300)
    q = next(q for q in corpus.queries(0) if q.task == "linear")
    row = query_row(q, "514 - 41 = 472 . then x = 412 / 7 = 64 .", docs)
    assert row["answer"] == q.answer != "64" and row["model_answer"] == "64" and "supports" not in row
    assert query_row(q, "the .", docs)["model_answer"] is None
    a = next(q for q in corpus.queries(0) if q.task == "arithmetic")
    row = query_row(a, "50 . then y = x * 3 . so y = 150 .", docs)  # the answer to "so x =" is the first number
    assert row["model_answer"] == "50" and row["answer"] == q_x(a)
    f = next(q for q in corpus.queries(0) if q.kind == "factual")
    row = query_row(f, "vond .", docs)
    assert row["answer"] == f.answer and row["model_answer"] == "vond" and row["supports"] == corpus.supports(docs, f)
    c = next(q for q in corpus.queries(0) if q.kind == "control" and q.task == "slopes")
    row = query_row(c, c.completion, docs)
    assert "model_answer" not in row and row["answer"] == c.answer and row["completion"] == c.completion


def q_x(q) -> str:
    a, b = (int(w) for w in q.prompt.split() if w.isdigit())
    return str(a + b)


def test_answer_token_queries_measure_only_the_answer():
    """The optional answer-token queries: the same token sequence, cut after the answer, which alone is measured."""
    from jaxinf.demo import answer_token_row, query_row

    docs = corpus.documents(0, 300)
    qs = corpus.queries(0)
    lin = next(q for q in qs if q.task == "linear" and q.kind == "reasoning")
    row = answer_token_row(query_row(lin, "514 - 41 = 472 . then x = 412 / 7 = 64 .", docs))
    assert row["prompt"] == lin.prompt + " 514 - 41 = 472 . then x = 412 / 7 =" and row["completion"] == "64"
    ari = next(q for q in qs if q.task == "arithmetic" and q.kind == "reasoning")
    row = answer_token_row(query_row(ari, "50 . then y = x * 3 . so y = 150 .", docs))
    assert row["prompt"] == ari.prompt and row["completion"] == "50" and row["kind"] == "reasoning"
    ctl = next(q for q in qs if q.task == "slopes" and q.kind == "control")
    row = answer_token_row(query_row(ctl, ctl.completion, docs))
    assert row["completion"] == ctl.answer and row["prompt"].endswith(f"= {ctl.answer} / 1 =")
    fac = next(q for q in qs if q.kind == "factual")
    assert answer_token_row(query_row(fac, "vond .", docs))["completion"] == "vond"
    other = next(q for q in qs if q.task == "reasoning_control")
    assert answer_token_row(query_row(other, "people talked .", docs)) is None
    assert answer_token_row(query_row(lin, "the .", docs)) is None


def test_what_other_code_or_settings_made_is_made_again(tmp_path):
    """The demo reuses its corpus, model and queries only if the same code, library versions and sizes made them
    (issue 24: it reused them whatever code wrote them)."""
    from jaxinf import demo
    from jaxinf.atomic import write_json

    stamp = demo.written_by(3000, 1200)
    assert demo.written_by(3000, 1200) == stamp and demo.written_by(3000, 600) != stamp
    out = tmp_path / "demo"

    def make(written: dict | None) -> None:
        for name in demo.MADE:
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "x").write_text("made")
        if written is not None:
            write_json(out / demo.STAMP, written)

    make(stamp)
    assert demo.discard_stale(out, stamp) == [] and all((out / n / "x").exists() for n in demo.MADE)
    make({**stamp, "code": "0" * 16})
    assert demo.discard_stale(out, stamp) == ["code"]
    assert not any((out / n).exists() for n in demo.MADE) and not (out / demo.STAMP).exists()
    make(None)  # made before the stamp existed
    assert demo.discard_stale(out, stamp) == sorted(stamp) and not (out / "model").exists()
    (out / "run").mkdir()
    assert demo.discard_stale(out, stamp) == [] and (out / "run").exists()  # nothing made: nothing to check


def test_the_stamp_covers_the_training_seed():
    """A model trained from one seed is never reused for another: the seed is part of ``written_by.json``."""
    from jaxinf import demo

    assert demo.written_by(3000, 1200, 1) != demo.written_by(3000, 1200, 0) == demo.written_by(3000, 1200)
    assert demo.written_by(3000, 1200, 2)["seed"] == 2


def _summary(*verdicts) -> dict:
    names = ("procedural knowledge", "answers in the top documents")
    return {
        "findings": [
            {"name": n, "holds": v, "p_value": None if v is None else (0.001 if v else 0.2), "statistic": f"s {n}"}
            for n, v in zip(names, verdicts)
        ]
    }


def test_seed_table_counts_the_seeds_giving_each_verdict(tmp_path):
    from jaxinf.analysis import seeds as sd

    runs = [(0, tmp_path / "run", _summary(True, False)), (1, tmp_path / "s1", _summary(False, False))]
    runs.append((2, tmp_path / "s2", _summary(True, None)))
    table = sd.seed_table(runs)
    assert [r["seed"] for r in table["seeds"]] == [0, 1, 2]
    assert [f["holds"] for f in table["seeds"][1]["findings"]] == [False, False]
    first, second = table["agreement"]
    assert first["counts"] == {"holds": 2, "does not hold": 1, "not testable": 0} and first["agree"] == 2
    assert second["counts"] == {"holds": 0, "does not hold": 2, "not testable": 1} and second["seeds"] == 3
    assert sd.agreement_text(first) == "holds in 2 of 3 seeds, does not hold in 1"
    assert sd.agreement_text(second) == "does not hold in 2 of 3 seeds, not testable in 1"
    text = sd.seeds_markdown(table)
    assert "| 1 | does not hold (p = 0.2) | does not hold (p = 0.2) |" in text
    assert "| 2 | holds (p = 0.001) | not testable |" in text
    assert "- seed 2, answers in the top documents: s answers in the top documents" in text
    assert sd.read_table(tmp_path) is None
    (tmp_path / sd.FILE).write_text(json.dumps(table))
    assert sd.read_table(tmp_path) == table


def test_the_report_shows_the_table_when_the_run_has_one():
    from jaxinf.analysis import report
    from jaxinf.analysis import seeds as sd

    table = sd.seed_table([(0, "runs/demo/run", _summary(True, False)), (1, "x", _summary(False, False))])
    html = report._sec_seeds({"seeds": table})
    assert "over 2 training seeds" in html and "holds in 1 of 2 seeds, does not hold in 1" in html
    assert html.count("<tr><td>1</td>") == 3  # its verdicts, then its statistic of each finding
    assert report._sec_seeds({"seeds": None}) == ""


@pytest.mark.heavy  # minutes on 2 cores: two small models trained, two jaxinf runs, then the same again
def test_two_seeds_train_two_models_and_a_rerun_reuses_both(tmp_path):
    """``--seeds 2``: seed 0 where a one-seed demo puts it, seed 1 in ``seed-1``, their own weights, completions and
    runs; a table with a row per seed in ``seeds.json`` and in seed 0's summary and report; a second demo reuses
    every model and run."""
    from safetensors.numpy import load_file

    from jaxinf import demo
    from jaxinf.analysis import seeds as sd

    out = tmp_path / "demo"
    assert demo.main(out, n_documents=200, train_steps=10, seeds=2) == out / "run"
    made = [out / "model" / "model.safetensors", out / "seed-1" / "model" / "model.safetensors"]
    made += [out / "run" / "scores.npy", out / "seed-1" / "run" / "scores.npy"]
    assert all(p.exists() for p in made) and not (out / "seed-0").exists()
    assert not (out / "seed-1" / "data" / "documents.jsonl").exists()  # one corpus, at the one-seed place
    w0, w1 = (load_file(p) for p in made[:2])
    assert w0.keys() == w1.keys() and any(not np.array_equal(w0[k], w1[k]) for k in w0)
    assert json.loads((out / "seed-1" / demo.STAMP).read_text())["seed"] == 1
    table = json.loads((out / demo.SEEDS_JSON).read_text())
    assert [(r["seed"], r["run"]) for r in table["seeds"]] == [(0, str(out / "run")), (1, str(out / "seed-1" / "run"))]
    for row, run in zip(table["seeds"], (out / "run", out / "seed-1" / "run")):
        findings = json.loads((run / "summary.json").read_text())["findings"]
        assert [f["holds"] for f in row["findings"]] == [f["holds"] for f in findings]
    assert json.loads((out / "run" / "summary.json").read_text())["seeds"] == table == sd.read_table(out / "run")
    assert 'id="seeds"' in (out / "run" / "report" / "index.html").read_text()
    assert "Over 2 training seeds" in (out / "run" / "report" / "summary.md").read_text()
    assert "| 1 |" in (out / demo.SEEDS_MD).read_text()
    times = [p.stat().st_mtime_ns for p in made]
    demo.main(out, n_documents=200, train_steps=10, seeds=2)
    assert [p.stat().st_mtime_ns for p in made] == times
