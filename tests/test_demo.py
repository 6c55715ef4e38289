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


def test_more_queries_extend_the_list_and_never_change_it():
    few, many = corpus.queries(0, 4), corpus.queries(0, 8)
    for task in corpus.MAKERS:
        a = [q for q in few if q.task == task]
        b = [q for q in many if q.task == task]
        assert a == b[: len(a)]
    import pytest
    with pytest.raises(ValueError, match="per_task=17"):
        corpus.queries(0, corpus.HELD_OUT + 1)


def test_reasoning_query_answers_follow_from_their_prompts():
    for q in corpus.queries(0, 8):
        if q.task == "arithmetic":
            a, b = (int(w) for w in q.prompt.split() if w.isdigit())
            assert int(q.next) == a + b and int(q.answer) % (a + b) == 0
        elif q.task == "linear":
            a, b, c = [int(w) for w in q.prompt.split() if w.isdigit()][:3]
            assert a * int(q.answer) + b == c and int(q.next) == c - b
        elif q.task == "slopes":
            x1, y1, x2, y2 = [int(w) for w in q.prompt.split() if w.isdigit()][:4]
            assert (y2 - y1) == int(q.answer) * (x2 - x1)


def test_tokenizer_spells_numbers_digit_by_digit_and_decodes_back():
    from jaxinf.demo import train

    tok = train.build_tokenizer(["let x = 12 + 30 . so x = 42 ."])
    text = "let x = 987 + 6 . so x = 993 ."     # numbers the corpus never had
    enc = tok.encode(text, add_special_tokens=False)
    assert "<unk>" not in enc.tokens
    assert enc.tokens[3:6] == ["9", "##8", "##7"]
    assert tok.decode(enc.ids) == text
    assert tok.encode(tok.decode(enc.ids), add_special_tokens=False).ids == enc.ids


def test_queries_file_searches_for_the_answer_the_model_gave():
    from jaxinf.demo import query_row

    docs = corpus.documents(0, 300)
    q = next(q for q in corpus.queries(0) if q.task == "linear")
    row = query_row(q, "514 - 41 = 472 . then x = 412 / 7 = 64 .", docs)
    assert row["answer"] == "64" and row["correct_answer"] == q.answer and "supports" not in row
    assert query_row(q, "the .", docs)["answer"] is None
    f = next(q for q in corpus.queries(0) if q.kind == "factual")
    row = query_row(f, "vond .", docs)
    assert row["answer"] == f.answer and row["supports"] == corpus.supports(docs, f)
