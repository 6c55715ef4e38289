"""The paper's two headline findings as tests that a run passes or fails (Ruis et al. 2024, sections 5.1-5.2).

Each finding is a claim about the model, a statistic computed from this run's
summary, a test with a p-value, and a verdict: ``holds`` is true when the
effect goes the claimed way *and* ``p < ALPHA``, false when it does not, and
None when the run lacks the queries to test it (no factual or no reasoning
queries, no document texts). Nothing here knows which world produced the
scores; the demo's report reads the same verdicts as a user's run.

1. *Procedural knowledge.* Reasoning queries of one task draw on the same
   documents, factual queries on different ones: the mean within-task Pearson
   correlation of influence is higher for reasoning queries than for factual
   ones, *and* higher than for template-matched controls of the same task.
   Queries of one task that share a surface template share tokens, and shared
   wording alone correlates influence; a template-matched control (kind
   ``control`` with the task of the reasoning queries it matches: the same
   prompt and completion template, a completion that needs no procedure) shares
   the wording and not the procedure, so only the excess over it can be
   credited to the procedure. Tests: (a) the permutation test of "within task:
   reasoning vs factual" ((kind, task) labels permuted across queries,
   two-sided); (b) the permutation test of "within task: reasoning vs
   template-matched control" (kinds permuted among the queries of each task,
   two-sided), over the tasks that have both kinds. The finding holds when both
   differences are positive and both p < ALPHA: an intersection-union test,
   whose p-value is the larger of the two, so requiring both needs no
   correction for testing twice. Without template-matched controls the
   finding is not testable (comparison (a) alone cannot tell procedure from
   wording); comparison (a) is still reported.
2. *Answers are retrieved for facts, not for reasoning.* A factual query's
   answer occurs in its top-k documents more often than a reasoning query's.
   A query counts as found when every one of its answer items occurs in one of
   its top-k documents (:mod:`jaxinf.analysis.answers`). Both kinds are
   searched for the same kind of answer: the verdict uses the *correct*
   answers (the ``answer`` field, over the queries that have one) when both
   kinds have them, else the *model's own* answers (``model_answer``, or the
   items taken from the completion); the other variant is reported beside it
   (``variants``). Test: one-sided Fisher exact test on the 2 x 2 table
   (factual, reasoning) x (found, not). ``k`` is the largest searched k within
   the top 1% of the documents (the paper's 500 of 5 million is 0.01%), or the
   smallest searched k if none is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ALPHA = 0.01
TOP_SHARE = 0.01


def answer_k(ks: Sequence[int], n_documents: int) -> int:
    """The k of finding 2: the largest of ``ks`` that is at most ``TOP_SHARE * n_documents``, else the smallest."""
    within = [k for k in ks if k <= TOP_SHARE * n_documents]
    return max(within) if within else min(ks)


def _verdict(effect_right_way: bool, p: float) -> bool:
    return bool(effect_right_way and p < ALPHA)


FACTUAL = "within task: reasoning vs factual"
CONTROLS = "within task: reasoning vs template-matched control"


def procedural_correlation(correlations: dict) -> dict:
    """Finding 1 from the correlation block: its comparisons :data:`FACTUAL` and :data:`CONTROLS` (module
    docstring); ``p_value`` is the larger of their two p-values (the intersection-union test)."""
    out: dict[str, Any] = {
        "name": "procedural knowledge",
        "claim": "reasoning queries of one task correlate more with each other (within-task Pearson r of their "
        "influence over all documents) than factual queries do, and than template-matched controls "
        "(same surface form, no procedure needed) of the same task do",
        "test": f"two permutation tests, two-sided: vs factual ((kind, task) labels permuted across queries) "
        f"and vs template-matched controls (kinds permuted within each task); holds if both "
        f"differences are positive and both p < {ALPHA} (p shown: the larger)",
    }
    cmps = {c["name"]: c for c in correlations["comparisons"]}
    f, c = cmps.get(FACTUAL), cmps.get(CONTROLS)
    parts = []
    for name, cmp, group in (("factual", f, "factual"), ("template-matched controls", c, None)):
        if cmp is None or cmp["p_value"] is None:
            need = "two factual queries of a task" if group else "two reasoning and two control queries of one task"
            parts.append(f"vs {name}: not testable (needs at least {need})")
        else:
            parts.append(
                f"vs {name}: difference {cmp['difference']:+.3g} (pairs {cmp['n_pairs_a']} vs "
                f"{cmp['n_pairs_b']}), p = {cmp['p_value']:.2g}"
            )
    by_kind, matched = correlations["within_task_by_kind"], correlations.get("template_matched", {})
    means = {
        "reasoning": (by_kind.get("reasoning") or {}).get("mean"),
        "factual": (by_kind.get("factual") or {}).get("mean"),
        "reasoning_matched": (matched.get("reasoning") or {}).get("mean"),
        "control_matched": (matched.get("control") or {}).get("mean"),
    }
    shown = ", ".join(
        f"{label} {means[k]:.3g}"
        for k, label in (
            ("reasoning", "reasoning"),
            ("factual", "factual"),
            ("reasoning_matched", "reasoning in tasks with controls"),
            ("control_matched", "template-matched controls"),
        )
        if means[k] is not None
    )
    statistic = f"mean within-task r: {shown}; " + "; ".join(parts)
    loss = correlations.get("template_matched_loss") or {}
    if all((loss.get(k) or {}).get("median") is not None for k in ("reasoning", "control")):
        means["loss_reasoning_matched"] = loss["reasoning"]["median"]
        means["loss_control_matched"] = loss["control"]["median"]
        statistic += (
            f"; median completion NLL: reasoning {means['loss_reasoning_matched']:.3g}, "
            f"template-matched controls {means['loss_control_matched']:.3g} nats"
        )
    out.update(
        means,
        statistic=statistic,
        vs_factual=None if f is None else {k: f[k] for k in ("difference", "p_value", "n_pairs_a", "n_pairs_b")},
        vs_controls=None if c is None else {k: c[k] for k in ("difference", "p_value", "n_pairs_a", "n_pairs_b")},
    )
    if f is None or c is None or f["p_value"] is None or c["p_value"] is None:
        return {**out, "holds": None, "p_value": None, "difference": None if f is None else f["difference"]}
    p = max(f["p_value"], c["p_value"])
    return {
        **out,
        "holds": _verdict(f["difference"] > 0 and c["difference"] > 0, p),
        "p_value": p,
        "difference": f["difference"],
    }


VARIANTS = ("correct answer", "model's answer")


def fisher_greater(factual: Sequence[bool], reasoning: Sequence[bool]) -> tuple[list[list[int]], float]:
    """The 2 x 2 table ``[[found, not] factual, [found, not] reasoning]`` and the one-sided Fisher exact p of
    "factual queries are found more often" (the hypergeometric tail of the factual found count)."""
    from scipy.stats import fisher_exact

    table = [[sum(factual), len(factual) - sum(factual)], [sum(reasoning), len(reasoning) - sum(reasoning)]]
    return table, float(fisher_exact(table, alternative="greater").pvalue)


def _answer_variant(answers: dict, j: int, variant: str) -> dict:
    """Found flags at k index ``j`` of one variant (:data:`VARIANTS`), its table and one-sided p."""
    found: dict[str, list[bool]] = {"factual": [], "reasoning": []}
    for q in answers["per_query"]:
        if q["kind"] not in found:
            continue
        if variant == "correct answer" and q["rule"] != "answer field":
            continue
        row = (q["by_k"] if variant == "correct answer" else q["model"]["by_k"])[j]
        if row["recall"] is not None:
            found[q["kind"]].append(bool(row["found_all"]))
    f, r = found["factual"], found["reasoning"]
    if not f or not r:
        return {"testable": False, "n_factual": len(f), "n_reasoning": len(r)}
    table, p = fisher_greater(f, r)
    return {
        "testable": True,
        "table": table,
        "p_value": p,
        "factual": sum(f) / len(f),
        "reasoning": sum(r) / len(r),
        "n_factual": len(f),
        "n_reasoning": len(r),
    }


def answers_retrieved(answers: dict, n_documents: int) -> dict:
    """Finding 2 from the answers block: factual vs reasoning queries whose answer occurs in the top k, for the
    correct answers and for the model's own (module docstring)."""
    out = {
        "name": "answers in the top documents",
        "claim": "factual queries find their answer in their top documents more often than reasoning queries do",
        "test": f"one-sided Fisher exact test (factual, reasoning) x (every answer item found in the top k, "
        f"not), the same kind of answer for both kinds (correct if both have it, else the model's "
        f"own); holds if the factual share is larger and p < {ALPHA}",
    }
    if not answers.get("available"):
        return {**out, "holds": None, "p_value": None, "statistic": "not testable: no document texts"}
    k = answer_k(answers["ks"], n_documents)
    j = list(answers["ks"]).index(k)
    variants = {v: _answer_variant(answers, j, v) for v in VARIANTS}
    used = next((v for v in VARIANTS if variants[v]["testable"]), None)

    def text(v: str) -> str:
        x = variants[v]
        if not x["testable"]:
            return f"{v}: not testable ({x['n_factual']} factual, {x['n_reasoning']} reasoning queries with one)"
        (ff, _), (rf, _) = x["table"]
        return f"{v}: factual {ff}/{x['n_factual']}, reasoning {rf}/{x['n_reasoning']}, p = {x['p_value']:.2g}"

    statistic = f"answer in the top {k}: " + "; ".join(
        text(v) + (" (the verdict)" if v == used else "") for v in VARIANTS
    )
    if used is None:
        return {
            **out,
            "k": k,
            "holds": None,
            "p_value": None,
            "variants": variants,
            "answer": None,
            "statistic": "not testable: the run needs factual and reasoning queries with answer items; " + statistic,
        }
    x = variants[used]
    return {
        **out,
        "k": k,
        "answer": used,
        "variants": variants,
        "holds": _verdict(x["factual"] > x["reasoning"], x["p_value"]),
        "p_value": x["p_value"],
        "factual": x["factual"],
        "reasoning": x["reasoning"],
        "table": x["table"],
        "statistic": statistic,
    }


def evaluate(correlations: dict, answers: dict, n_documents: int) -> list[dict]:
    """Both findings, in the paper's order."""
    return [procedural_correlation(correlations), answers_retrieved(answers, n_documents)]


def verdict_text(f: dict) -> str:
    """One line: "holds", "does not hold" or "not testable", with the p-value."""
    if f["holds"] is None:
        return "not testable"
    return ("holds" if f["holds"] else "does not hold") + f" (p = {f['p_value']:.2g})"
