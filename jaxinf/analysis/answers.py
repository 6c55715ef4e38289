"""Does a query's answer occur in its top documents? (Ruis et al. 2024, section 5.2.)

Answer items come from the query's ``answer`` field when it has one. Otherwise they are taken
from the completion, by rule:

- reasoning queries (kind ``reasoning``, or a task whose name contains ``reasoning``): the
  result of each step, i.e. every number that ends an equation whose left side applies an
  operator (``4 + 2 = 6``; not ``x = 95``, ``= 32 - 16`` or an equation copied from the prompt), then the completion's last number
  (its final answer);
- all other queries: the numbers of the completion that are not in the prompt, and its key
  phrases: runs of capitalized words (joined by ``of``/``the``/``and``/...), without a leading
  function word (``The``, ``In``, ...) or a trailing ``'s``, that have a word absent from the prompt.

Matching is case-insensitive on whole words with whitespace collapsed; numbers match as
numbers (``29,029`` = ``29029``, ``6.0`` = ``6``).

Each query is searched twice (:func:`answers_block`): for the items above (``answer`` is the
correct answer by the query file's contract), and for the *model's own* answer: the
``model_answer`` field when the query has one, else the items the rules take from the
completion. The paper's finding 2 compares one kind of answer across query kinds
(:mod:`jaxinf.analysis.findings`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from jaxinf.analysis.groups import describe, present_kinds

NUMBER = re.compile(r"(?<![\w.])[-\u2212]?\d+(?:,\d{3})*(?:\.\d+)?(?![\d])")
# A step result: a number right after "=" that is not itself followed by an operator.
STEP_RESULT = re.compile(
    r"=[ \t]*\**[ \t]*([-\u2212]?\d+(?:,\d{3})*(?:\.\d+)?)(?![ \t]*[-+*/\u00d7\u00f7^(])(?!\d|[.,]\d)"
)
OPERATION = re.compile(r"[\w)]\s*[-+*/\u00d7\u00f7]\s*[\w(\u2212-]")
_CAP = r"[A-Z][\w'\u2019-]*"
_JOIN = r"(?:of|the|and|for|de|la|von|van|del|da|du|y)"
PHRASE = re.compile(rf"{_CAP}(?:\s+(?:{_JOIN}\s+)*{_CAP})*")
_LEADING = {
    "the",
    "a",
    "an",
    "in",
    "on",
    "at",
    "this",
    "that",
    "these",
    "those",
    "it",
    "he",
    "she",
    "they",
    "we",
    "i",
    "you",
    "there",
    "here",
    "according",
    "yes",
    "no",
    "however",
    "therefore",
    "so",
    "to",
    "first",
    "then",
    "now",
    "finally",
    "next",
    "step",
    "its",
    "his",
    "her",
    "their",
    "our",
    "my",
    "as",
    "if",
    "for",
    "and",
    "but",
    "or",
    "of",
    "what",
    "which",
    "who",
    "when",
    "where",
    "why",
    "how",
    "after",
    "before",
}


def normalize_number(s: str) -> str:
    """Canonical text of a number: no thousands commas, unicode minus as '-', no trailing zeros."""
    s = s.replace(",", "").replace("\u2212", "-")
    try:
        d = Decimal(s).normalize()
    except InvalidOperation:
        return s
    if d == 0:
        return "0"
    return format(d, "f")


def numbers_in(text: str) -> list[str]:
    return [normalize_number(m.group(0)) for m in NUMBER.finditer(text)]


def is_reasoning(kind: str, task: str | None) -> bool:
    return kind == "reasoning" or (task is not None and "reasoning" in task.lower())


def step_results(prompt: str, completion: str) -> list[str]:
    """Results of the completion's computing steps, then its last number (its final answer).

    A step is ``lhs = number`` whose left side (back to the previous ``=`` or line start) applies
    an operator, e.g. ``4 + 2 = 6`` or ``(19 - 62) / 1 = -43``; restatements such as
    ``x = 95`` or ``8x = 16`` are not steps, nor is an equation copied from the prompt.
    """
    items = []
    flat_prompt = " ".join(prompt.split())
    for m in STEP_RESULT.finditer(completion):
        start = max(completion.rfind("=", 0, m.start()), completion.rfind("\n", 0, m.start())) + 1
        lhs = _math_tail(completion[start : m.start()])
        if OPERATION.search(lhs) and f"{lhs} = {m.group(1)}" not in flat_prompt:
            items.append(normalize_number(m.group(1)))
    nums = numbers_in(completion)
    if nums:
        items.append(nums[-1])
    return _dedupe(items)


def _math_tail(text: str) -> str:
    """The trailing run of whitespace-separated tokens that are numbers, single letters,
    operators or parentheses ("the equation 8x + 16" -> "8x + 16")."""
    toks = text.split()
    keep: list[str] = []
    for t in reversed(toks):
        if re.fullmatch(r"[(\[]*(?:[-\u2212]?\d[\w.,]*|[A-Za-z]|[-+*/\u00d7\u00f7^])[)\]]*", t):
            keep.append(t)
        else:
            break
    return " ".join(reversed(keep))


def key_phrases(prompt: str, completion: str) -> list[str]:
    """Capitalized word runs of the completion with at least one word absent from the prompt;
    leading function words ("The", "In", ...) and a trailing possessive 's are dropped."""
    prompt_words = {w.lower() for w in re.findall(r"[\w'\u2019-]+", prompt)}
    out = []
    for m in PHRASE.finditer(completion):
        words = m.group(0).split()
        while words and words[0].lower() in _LEADING:
            words = words[1:]
        while words and words[-1].lower() in {"of", "the", "and", "for"}:
            words = words[:-1]
        if words and re.search(r"['\u2019]s$", words[-1]):
            words[-1] = words[-1][:-2]
        if not words or not words[-1]:
            continue
        phrase = " ".join(words)
        if all(w.lower().strip("'\u2019") in prompt_words for w in words):
            continue
        out.append(phrase)
    return _dedupe(out)


def answer_items(
    prompt: str, completion: str, kind: str, task: str | None, answer: Sequence[str] | None
) -> tuple[list[str], str]:
    """(items, rule) for one query; rule is "answer field", "step results" or "numbers and key phrases"."""
    if answer:
        return _dedupe([a.strip() for a in answer if a.strip()]), "answer field"
    if is_reasoning(kind, task):
        return step_results(prompt, completion), "step results"
    prompt_numbers = set(numbers_in(prompt))
    nums = [x for x in numbers_in(completion) if x not in prompt_numbers]
    return _dedupe(nums + key_phrases(prompt, completion)), "numbers and key phrases"


def _dedupe(items: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for x in items:
        key = x.lower()
        if key not in seen:
            seen.add(key)
            out.append(x)
    return out


def _is_number(item: str) -> bool:
    return NUMBER.fullmatch(item.strip()) is not None


def item_in_text(item: str, text: str, text_numbers: set[str] | None = None) -> bool:
    """Whether an answer item occurs in a text: numbers as numbers, phrases as whole words (case-insensitive)."""
    if _is_number(item):
        nums = text_numbers if text_numbers is not None else set(numbers_in(text))
        return normalize_number(item.strip()) in nums
    words = item.split()
    if not words:
        return False
    pat = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
    return re.search(pat, text, flags=re.IGNORECASE) is not None


def find_items(items: Sequence[str], texts: Sequence[str]) -> list[bool]:
    """For each item, whether it occurs in at least one of the texts."""
    found = [False] * len(items)
    for text in texts:
        nums = set(numbers_in(text))
        for i, it in enumerate(items):
            if not found[i] and item_in_text(it, text, nums):
                found[i] = True
        if all(found):
            break
    return found


def answers_in_top(items: Sequence[str], ranked_texts: Sequence[str | None], ks: Sequence[int]) -> list[dict]:
    """For each k: which items occur in the top-k texts, ``found_all`` (every item occurs in some
    top-k document), ``found_any`` and ``recall`` (share of items found). Missing texts (None)
    are skipped and counted in ``n_texts``."""
    out = []
    for k in ks:
        texts = [t for t in ranked_texts[:k] if t is not None]
        found = find_items(items, texts) if items else []
        out.append(
            {
                "k": int(k),
                "n_texts": len(texts),
                "found": found,
                "found_all": bool(items) and all(found),
                "found_any": any(found),
                "recall": (sum(found) / len(items)) if items else None,
            }
        )
    return out


def share_by_kind(per_query: Mapping[str, list[dict]], kinds: Mapping[str, str], key: str) -> dict:
    """Share of queries of each kind whose ``key`` flag is true, per k index (queries without items excluded)."""
    out: dict[str, list] = {}
    for qid, rows in per_query.items():
        out.setdefault(kinds[qid], []).append(rows)
    res = {}
    for kind, lists in out.items():
        nk = len(lists[0])
        shares = []
        for j in range(nk):
            flags = [rows[j][key] for rows in lists if rows[j]["recall"] is not None]
            shares.append(sum(flags) / len(flags) if flags else None)
        res[kind] = shares
    return res


def answers_block(queries: Any, top_idx: Sequence, texts: Mapping[int, str], ks: Sequence[int]) -> tuple[dict, list]:
    """(the summary's ``answers`` block, ids of the queries without items) over each query's ranked top documents.

    ``queries`` is the exported query file (:class:`jaxinf.run.exports.formats.Queries`), ``top_idx[q]`` the
    document columns of query q's top documents in rank order, ``texts`` their texts by column. Per query:
    ``rule``, ``items`` and ``by_k`` (:func:`answers_in_top`) of :func:`answer_items`, and ``model``, the
    same for the model's own answer (module docstring). Shares by kind are of the first search.
    """
    per_query = []
    flags: dict[str, list] = {}
    model_answers = getattr(queries, "model_answers", None) or [None] * len(queries)
    for q in range(len(queries)):
        prompt, completion, kind, task = queries.prompts[q], queries.completions[q], queries.kinds[q], queries.tasks[q]
        ranked = [texts.get(int(i)) for i in top_idx[q][: max(ks)]]
        items, rule = answer_items(prompt, completion, kind, task, queries.answers[q])
        if model_answers[q]:
            own, own_rule = _dedupe([a.strip() for a in model_answers[q] if a.strip()]), "model_answer field"
        else:
            own, own_rule = answer_items(prompt, completion, kind, task, None)
        res = answers_in_top(items, ranked, ks)
        per_query.append(
            {
                "query": queries.ids[q],
                "kind": kind,
                "rule": rule,
                "items": items,
                "by_k": res,
                "model": {"rule": own_rule, "items": own, "by_k": answers_in_top(own, ranked, ks)},
            }
        )
        flags[queries.ids[q]] = res
    kinds = dict(zip(queries.ids, queries.kinds))
    no_items = [p["query"] for p in per_query if not p["items"]]
    return {
        "available": True,
        "ks": list(ks),
        "per_query": per_query,
        "share_found_all_by_kind": share_by_kind(flags, kinds, "found_all"),
        "share_found_any_by_kind": share_by_kind(flags, kinds, "found_any"),
        "mean_recall_by_kind": {
            k: [
                describe([r[j]["recall"] for qid, r in flags.items() if kinds[qid] == k])["mean"]
                for j in range(len(ks))
            ]
            for k in present_kinds(queries.kinds)
        },
        "n_without_items": len(no_items),
    }, no_items
