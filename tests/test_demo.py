"""The demo's world: held-out query problems, digit-level numbers, and what its queries file records."""

from __future__ import annotations

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
