"""Each statistic of jaxinf.analysis against a direct computation with a known answer.

Tolerances are fixed here from the arithmetic involved: float64 sums (1e-10), and sampling
error for fitted exponents (binomial bounds stated next to each check).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from jaxinf.analysis import answers as ans
from jaxinf.analysis import concentration as conc
from jaxinf.analysis import correlations as corr
from jaxinf.analysis import layers as lay
from jaxinf.analysis import powerlaw as pl
from jaxinf.analysis import sources as src

# ----------------------------------------------------------------------------- correlations


def test_streamed_pearson_equals_corrcoef():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 1000)) * rng.uniform(1e-6, 1e3, (7, 1)) + rng.uniform(-1e4, 1e4, (7, 1))
    x[3] += 0.9 * x[2]
    for chunk in (1, 97, 1000, 5000):
        np.testing.assert_allclose(corr.pearson_matrix(x, chunk), np.corrcoef(x), rtol=0, atol=1e-10)


def test_constant_row_has_nan_correlations():
    x = np.vstack([np.arange(10.0), np.ones(10), np.arange(10.0) ** 2])
    r = corr.pearson_matrix(x, 3)
    assert np.isnan(r[1]).all() and np.isnan(r[:, 1]).all()
    assert r[0, 0] == 1 and np.isclose(r[0, 2], np.corrcoef(x[0], x[2])[0, 1], atol=1e-12)


def test_group_statistics_by_hand():
    r = np.array(
        [
            [1, 0.9, 0.1, 0.2, 0.0],
            [0.9, 1, 0.3, 0.4, 0.1],
            [0.1, 0.3, 1, 0.5, -0.2],
            [0.2, 0.4, 0.5, 1, 0.3],
            [0.0, 0.1, -0.2, 0.3, 1],
        ]
    )
    kinds = ["reasoning", "reasoning", "factual", "factual", "control"]
    tasks = ["slopes", "slopes", "factual", "factual", None]
    s = corr.correlation_summary(r, kinds, tasks, n_permutations=10)
    assert s["within_task"]["slopes"]["mean"] == pytest.approx(0.9) and s["within_task"]["slopes"]["n"] == 1
    assert s["within_task"]["factual"]["mean"] == pytest.approx(0.5)
    # same task: (0,1) and (2,3); different known tasks: (0,2) (0,3) (1,2) (1,3); query 4 has no task
    assert s["within_task_all"]["mean"] == pytest.approx((0.9 + 0.5) / 2)
    assert s["across_tasks_all"]["mean"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.4) / 4)
    assert s["kind_pairs"]["factual-reasoning"]["mean"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.4) / 4)
    assert s["kind_pairs"]["factual-control"]["mean"] == pytest.approx((-0.2 + 0.3) / 2)
    assert s["kind_pairs"]["reasoning-reasoning"]["n"] == 1


def test_permutation_p_value_matches_exact_enumeration():
    rng = np.random.default_rng(1)
    r = np.corrcoef(rng.normal(size=(6, 30)))
    kinds = ["reasoning"] * 3 + ["factual"] * 3
    tasks = ["a", "a", "a", "b", "b", "b"]
    rule_a, rule_b = corr.within_task("reasoning"), corr.within_task("factual")
    res = corr.permutation_test(r, kinds, tasks, rule_a, rule_b, n_permutations=4000, seed=0)
    k, t = corr.encode_labels(kinds, tasks)
    obs = res["difference"]
    hits = total = 0
    for perm in itertools.permutations(range(6)):
        p = np.asarray(perm)
        ma = np.triu(rule_a(k[p], t[p]), 1)
        mb = np.triu(rule_b(k[p], t[p]), 1)
        if ma.any() and mb.any():
            total += 1
            hits += abs(r[ma].mean() - r[mb].mean()) >= abs(obs) - 1e-12
    exact = hits / total
    # Monte Carlo standard error at 4000 draws is at most 0.008; allow 5 of them.
    assert abs(res["p_value"] - exact) < 0.04


def test_within_task_permutation_matches_exact_enumeration_and_keeps_tasks():
    rng = np.random.default_rng(4)
    r = np.corrcoef(rng.normal(size=(9, 30)))
    kinds = ["reasoning", "reasoning", "control", "control", "reasoning", "control", "control", "reasoning", "factual"]
    tasks = ["a", "a", "a", "a", "b", "b", "b", "b", "f"]
    rule_a, rule_b = corr.template_matched("reasoning"), corr.template_matched("control")
    res = corr.permutation_test(r, kinds, tasks, rule_a, rule_b, n_permutations=4000, seed=0, within_task=True)
    k, t = corr.encode_labels(kinds, tasks)
    ma, mb = np.triu(rule_a(k, t), 1), np.triu(rule_b(k, t), 1)
    assert ma.sum() == 2 and mb.sum() == 2  # (0,1), (4,7) against (2,3), (5,6); the factual query is in neither
    assert res["difference"] == pytest.approx(r[ma].mean() - r[mb].mean(), abs=1e-12)
    hits = total = 0  # every relabelling of kinds within task a and within task b
    for pa in itertools.permutations(range(4)):
        for pb in itertools.permutations(range(4, 8)):
            p = np.asarray([*pa, *pb, 8])
            ma, mb = np.triu(rule_a(k[p], t[p]), 1), np.triu(rule_b(k[p], t[p]), 1)
            total += 1
            hits += abs(r[ma].mean() - r[mb].mean()) >= abs(res["difference"]) - 1e-12
    # Monte Carlo standard error at 4000 draws is at most 0.008; allow 5 of them.
    assert abs(res["p_value"] - hits / total) < 0.04
    codes = rng.integers(-1, 3, 40)
    perm = corr._permutation(rng, codes, True)
    assert sorted(perm.tolist()) == list(range(40)) and (codes[perm] == codes).all() and (perm != np.arange(40)).any()


def test_permutation_detects_planted_within_task_correlation():
    rng = np.random.default_rng(2)
    base = {t: rng.normal(size=500) for t in "abcd"}
    tasks = list("aaaabbbbccccdddd")
    x = np.asarray([base[t] + 0.5 * rng.normal(size=500) for t in tasks])
    r = np.corrcoef(x)
    kinds = ["reasoning"] * 8 + ["factual"] * 8
    res = corr.permutation_test(r, kinds, tasks, corr.within_task(), corr.across_tasks(), 500, 0)
    assert res["difference"] > 0.5 and res["p_value"] < 0.01


def test_heatmap_order_groups_kinds_then_tasks():
    kinds = ["control", "factual", "reasoning", "factual", "unknown", "reasoning"]
    tasks = ["c", "f", "s", "f", None, "a"]
    assert corr.heatmap_order(kinds, tasks).tolist() == [1, 3, 5, 2, 0, 4]


# ----------------------------------------------------------------------------- concentration


def test_concentration_by_direct_sort():
    rng = np.random.default_rng(3)
    row = rng.standard_t(2, 5000)
    fractions = (0.002, 0.01, 0.02, 0.05)
    got = conc.concentration(row, fractions)
    pos, neg = np.clip(row, 0, None), np.clip(-row, 0, None)
    for i, f in enumerate(fractions):
        k = math.ceil(f * row.size)
        assert got["k"][i] == k
        assert got["positive"][i] == pytest.approx(np.sort(pos)[::-1][:k].sum() / pos.sum(), rel=1e-10)
        assert got["negative"][i] == pytest.approx(np.sort(neg)[::-1][:k].sum() / neg.sum(), rel=1e-10)


def test_concentration_hand_example():
    row = np.array([10.0, 5, 3, 2, -1, -4, 0, 0, 0, 0])
    got = conc.concentration(row, (0.1, 0.2, 0.5))
    assert got["k"] == [1, 2, 5]
    assert got["positive"] == pytest.approx([0.5, 0.75, 1.0])
    assert got["negative"] == pytest.approx([0.8, 1.0, 1.0])
    only_pos = conc.concentration(np.array([1.0, 2.0]), (0.5,))
    assert only_pos["negative"] == [None]


def test_per_nat_divides_by_the_completion_nll():
    t = conc.row_totals(np.array([2.0, -1.0, 3.0]))
    assert t["absolute"] == 6 and t["positive"] == 5 and t["negative"] == 1
    assert conc.per_nat(t, 4.0) == {"absolute": 1.5, "positive": 1.25, "negative": 0.25}
    assert conc.per_nat(t, float("nan")) is None
    assert conc.per_nat(t, float("nan"), already_per_nat=True)["absolute"] == 6


# ----------------------------------------------------------------------------- power laws


def _pareto(rng, alpha, n, x_min=1.0):
    return x_min * (1.0 - rng.random(n)) ** (-1.0 / (alpha - 1.0))


def test_planted_power_law_recovers_its_exponent_within_its_standard_error():
    """Over 200 planted samples (alpha = 2.5, n = 500), alpha lies within one standard error of
    the truth about 68% of the time and within two about 95%; the bounds allow 4 binomial sd."""
    rng = np.random.default_rng(4)
    z = []
    for _ in range(200):
        f = pl.clauset_fit(_pareto(rng, 2.5, 500), n_bootstrap=0)
        z.append((f["alpha"] - 2.5) / f["alpha_se"])
    z = np.abs(np.asarray(z))
    assert 0.55 <= np.mean(z < 1) <= 0.81
    assert np.mean(z < 2) >= 0.88


def test_mle_alpha_formula():
    t = np.array([1.0, 2.0, 4.0, 8.0])
    a, se = pl.mle_alpha(t, 1.0)
    assert a == pytest.approx(1 + 4 / (np.log(2) + np.log(4) + np.log(8)))
    assert se == pytest.approx((a - 1) / 2)


def test_clauset_finds_x_min_of_a_planted_tail():
    """A power-law tail above x_min = 1 on top of a uniform body below it."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.uniform(0.1, 1.0, 1000), _pareto(rng, 2.2, 1000)])
    f = pl.clauset_fit(x, n_bootstrap=0)
    assert 0.8 <= f["x_min"] <= 1.5
    assert abs(f["alpha"] - 2.2) < 3 * f["alpha_se"]


def test_goodness_of_fit_accepts_power_laws_and_rejects_a_uniform():
    """p >= 0.1 means plausible. For true power laws p is uniform, so ~10% fall below 0.1;
    allow up to 30% of 20. Uniform(1, 2) data is no power law: at the default top-N of 1000
    scores, p < 0.1 in at least 9 of 10 (at n = 300 the test has less power: about 8 in 10)."""
    rng = np.random.default_rng(6)
    low = [pl.clauset_fit(_pareto(rng, 2.5, 300), n_bootstrap=50, seed=i)["p_value"] < 0.1 for i in range(20)]
    assert sum(low) <= 6
    unif = [pl.clauset_fit(rng.uniform(1, 2, 1000), n_bootstrap=50, seed=i)["p_value"] < 0.1 for i in range(10)]
    assert sum(unif) >= 9


def test_loglog_slope_of_an_exact_rank_size_law():
    r = np.arange(1, 1001)
    f = pl.loglog_fit(3.0 * r**-0.8)
    assert f["slope"] == pytest.approx(-0.8, abs=1e-10)
    assert f["intercept"] == pytest.approx(np.log10(3.0), abs=1e-10)
    assert f["slope_se"] < 1e-10 and f["r2"] == pytest.approx(1.0)


def test_loglog_slope_of_a_pareto_sample_is_minus_one_over_alpha_minus_one():
    """Top 1000 of 100,000 Pareto(alpha = 2.5) samples: slope -1/(alpha-1) = -2/3 within 5%."""
    rng = np.random.default_rng(7)
    top = np.sort(_pareto(rng, 2.5, 100_000))[::-1][:1000]
    f = pl.loglog_fit(top)
    assert f["slope"] == pytest.approx(-1 / 1.5, rel=0.05)


def test_tail_fits_ignore_non_positive_scores():
    v = np.array([5.0, 4, 3, 2, 1, 0, -1])
    out = pl.tail_fits(v, top_n=7, n_bootstrap=0)
    assert out["loglog"]["n"] == 5
    assert pl.tail_fits(np.array([1.0, -1.0]), 2, n_bootstrap=0)["clauset"]["alpha"] is None


# ----------------------------------------------------------------------------- sources


def test_default_ks():
    assert src.default_ks(80) == [8]
    assert src.default_ks(1000) == [50, 100]
    ks = src.default_ks(5_000_000)
    assert ks[0] == 50 and ks[-1] == 500_000 and ks == sorted(ks)
    assert ks == [50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000, 500000]


def test_planted_source_multipliers():
    """Corpus: 600 A, 300 B, 100 C documents (tokens 1, 2, 10 each). The top 50 hold 10 A,
    25 B and 15 C: by count (10/50)/0.6, (25/50)/0.3, (15/50)/0.1; by tokens the top-50 token
    shares (10, 50, 150)/210 over the corpus shares (600, 600, 1000)/2200."""
    codes = np.array([0] * 600 + [1] * 300 + [2] * 100)
    tokens = np.array([1, 2, 10])[codes]
    shares = src.corpus_shares(codes, 3, tokens)
    ranked = np.array([0] * 10 + [1] * 25 + [2] * 15 + [0] * 590 + [1] * 275 + [2] * 85)
    rng = np.random.default_rng(8)
    ranked[:50] = rng.permutation(ranked[:50])
    m = src.source_multipliers(ranked, [50, 1000], shares["count"], np.array([1, 2, 10])[ranked], shares["tokens"])
    np.testing.assert_allclose(m["count"][0], [(10 / 50) / 0.6, (25 / 50) / 0.3, (15 / 50) / 0.1], rtol=1e-12)
    np.testing.assert_allclose(
        m["tokens"][0], (np.array([10, 50, 150]) / 210) / (np.array([600, 600, 1000]) / 2200), rtol=1e-12
    )
    np.testing.assert_allclose(m["count"][1], [1, 1, 1], rtol=1e-12)  # k = N: the corpus itself


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "completion,items",
    [
        ("4 + 2 = 6\n\nNow 6 * 15 = 90\n\nTherefore, the answer is 90.", ["6", "90"]),
        ("Slope = (26 - 3) / (94 - 95)\n\nSlope = (23) / (-1)\n\nSlope = -23", ["-23"]),
        ("8x + 16 - 16 = 32 - 16\n8x = 16\nx = 16 / 8\nx = 2", ["2"]),
        ("(11) * 144\n2. 1,344\nthe answer is 1,344.", ["1344"]),
        ("m = (19 - 62) / 1 = -43 / 1 = -43.", ["-43"]),
    ],
)
def test_step_results(completion, items):
    assert ans.step_results("Solve 8x + 16 = 32", completion) == items


def test_equation_copied_from_the_prompt_is_not_a_step():
    assert ans.step_results("Solve for x: 1x + 22 = 92", "Start with: 1x + 22 = 92\n1x = 70\nx = 70") == ["70"]


def test_factual_items_and_answer_field():
    items, rule = ans.answer_items(
        "What is the tallest mountain in the world?",
        "The tallest mountain is Mount Everest, 8,849 meters tall, between Nepal and Tibet.",
        "factual",
        "factual",
        None,
    )
    assert rule == "numbers and key phrases" and items == ["8849", "Mount Everest", "Nepal and Tibet"]
    assert ans.answer_items("p", "c", "factual", None, ["Paris", "paris"]) == (["Paris"], "answer field")
    assert ans.answer_items("p", "x = 1 + 1 = 2", "control", "reasoning_control", None)[1] == "step results"


def test_item_matching():
    text = "In 2021 it measured 29,029 feet; see mount everest. Not 1234 or 12.5."
    assert ans.item_in_text("29029", text) and ans.item_in_text("29,029", text)
    assert ans.item_in_text("Mount Everest", text)
    assert not ans.item_in_text("123", text) and not ans.item_in_text("12", text)
    assert ans.item_in_text("12.50", text)
    assert not ans.item_in_text("Everest Base", text)
    res = ans.answers_in_top(["2021", "nope"], [None, "x", text], [1, 3])
    assert res[0]["found"] == [False, False] and res[0]["n_texts"] == 0
    assert res[1]["found"] == [True, False] and res[1]["found_any"] and not res[1]["found_all"]
    assert res[1]["recall"] == 0.5


# ----------------------------------------------------------------------------- layers and tokens


def test_layer_numbers_and_bins():
    names = [f"model.layers.{i}.mlp.{p}" for i in range(10) for p in ("gate_proj", "up_proj", "down_proj")]
    nums, rule = lay.layer_numbers(names)
    assert rule == "layers.N" and nums == [i for i in range(10) for _ in range(3)]
    bins = lay.layer_bins(nums)
    # array_split of 10 blocks: 4, 3, 3
    assert bins[:12] == ["lower"] * 12 and bins[12:21] == ["middle"] * 9 and bins[21:] == ["upper"] * 9
    assert lay.layer_numbers(["h.0.mlp", "h.1.mlp"])[0] == [0, 1]
    assert lay.layer_numbers(["enc_a", "enc_b", "enc_c"]) == ([0, 1, 2], "position in layers.json")


def test_layer_shares_formula():
    rng = np.random.default_rng(9)
    ls = rng.normal(size=(2, 4, 6))
    share = lay.layer_shares(ls)
    direct = np.abs(ls).sum(1) / np.abs(ls).sum((1, 2))[:, None]
    np.testing.assert_allclose(share, direct, rtol=1e-12)
    b = lay.bin_shares(share, ["lower"] * 2 + ["middle"] * 2 + ["upper"] * 2)
    np.testing.assert_allclose(b["lower"] + b["middle"] + b["upper"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(b["upper"], share[:, 4:].sum(1), rtol=1e-12)


def test_top_tokens():
    out = lay.top_tokens(["a", "b", "c", "d"], np.array([0.1, 3.0, -2.0, 1.0]), 2)
    assert [(t["text"], t["position"]) for t in out] == [("b", 1), ("d", 3)]


def _findings_world(reasoning_shared: float, seed: int = 3, wording: float = 0.0, controls: int = 4):
    """Scores of 6 factual queries (one task, independent documents) and 3 reasoning tasks of 4 queries whose
    scores share a task component of weight ``reasoning_shared`` and a wording component of weight ``wording``;
    each task has ``controls`` template-matched controls (kind control, the same task) sharing only the wording."""
    rng = np.random.default_rng(seed)
    base = {t: rng.normal(size=400) for t in ("arith", "slopes", "linear")}
    words = {t: rng.normal(size=400) for t in base}
    rows, kinds, tasks = [], [], []
    for _ in range(6):
        rows.append(rng.normal(size=400)), kinds.append("factual"), tasks.append("facts")
    for t in base:
        for _ in range(4):
            rows.append(reasoning_shared * base[t] + wording * words[t] + rng.normal(size=400))
            kinds.append("reasoning"), tasks.append(t)
        for _ in range(controls):
            rows.append(wording * words[t] + rng.normal(size=400)), kinds.append("control"), tasks.append(t)
    return corr.correlation_summary(np.corrcoef(np.asarray(rows)), kinds, tasks, 1000, 0)


def test_procedural_finding_holds_only_for_a_planted_shared_component():
    from jaxinf.analysis import findings

    planted = findings.procedural_correlation(_findings_world(1.0))
    assert planted["holds"] is True and planted["p_value"] < findings.ALPHA
    assert planted["reasoning"] > 0.3 > abs(planted["factual"])
    assert planted["p_value"] == max(planted["vs_factual"]["p_value"], planted["vs_controls"]["p_value"])
    null = findings.procedural_correlation(_findings_world(0.0))
    assert null["holds"] is False and null["p_value"] > findings.ALPHA
    none = findings.procedural_correlation(
        corr.correlation_summary(
            np.corrcoef(np.random.default_rng(0).normal(size=(4, 50))), ["reasoning"] * 4, ["a", "a", "b", "b"], 100, 0
        )
    )
    assert none["holds"] is None and "not testable" in findings.verdict_text(none)


def test_procedural_finding_is_not_produced_by_shared_wording():
    """Issue 24: queries of one task share a template; wording alone must not make the finding hold."""
    from jaxinf.analysis import findings

    wording = _findings_world(0.0, wording=1.0)
    f = findings.procedural_correlation(wording)
    assert f["vs_factual"]["difference"] > 0.3 and f["vs_factual"]["p_value"] < findings.ALPHA  # the old verdict
    assert f["vs_controls"]["p_value"] > findings.ALPHA and f["holds"] is False
    assert abs(f["reasoning_matched"] - f["control_matched"]) < 0.1
    assert "template-matched controls" in f["statistic"]
    both = findings.procedural_correlation(_findings_world(1.0, wording=1.0))
    # expected r: reasoning (1 + 1) / (1 + 1 + 1) = 2/3, controls 1 / (1 + 1) = 1/2, a difference of 1/6
    assert both["holds"] is True and both["vs_controls"]["difference"] == pytest.approx(1 / 6, abs=0.06)
    # the per-task table keeps the kinds of a task apart
    assert wording["within_task"]["arith (control)"]["n"] == 6 and wording["within_task"]["facts"]["n"] == 15
    uncontrolled = findings.procedural_correlation(_findings_world(1.0, controls=0))
    assert uncontrolled["holds"] is None and uncontrolled["vs_factual"]["p_value"] < findings.ALPHA
    assert "vs template-matched controls: not testable" in uncontrolled["statistic"]


def _answers_block(factual: list[bool], reasoning: list[bool], ks=(10, 50, 500), own=None, rule="answer field") -> dict:
    """An answers block whose correct answers are found as flagged (at k = 10) and the model's own answers as
    ``own`` flags (default: the same), with the first search's items taken by ``rule``."""
    own = own or (factual, reasoning)

    def by_k(f):
        return [{"k": k, "found_all": f if k == 10 else True, "recall": float(f)} for k in ks]

    per_query = [
        {"query": f"{kind}-{i}", "kind": kind, "rule": rule, "by_k": by_k(f), "model": {"by_k": by_k(o)}}
        for kind, flags, owns in (("factual", factual, own[0]), ("reasoning", reasoning, own[1]))
        for i, (f, o) in enumerate(zip(flags, owns))
    ]
    return {"available": True, "ks": list(ks), "per_query": per_query}


def test_answer_finding_is_a_one_sided_fisher_test_at_the_top_one_percent():
    from jaxinf.analysis import findings

    assert findings.answer_k([10, 50, 500], 3000) == 10  # 1% of 3,000 is 30
    assert findings.answer_k([10, 50, 500], 5_000_000) == 500
    assert findings.answer_k([10, 50, 500], 200) == 10  # none within 1%: the smallest
    res = findings.answers_retrieved(_answers_block([True] * 6, [False] * 14 + [True] * 4), 3000)
    # hypergeometric tail by hand: 24 queries, 10 found, 6 factual all found
    assert res["k"] == 10 and res["table"] == [[6, 0], [4, 14]]
    assert res["p_value"] == pytest.approx(math.comb(10, 6) / math.comb(24, 6), rel=1e-9)
    assert res["holds"] is True
    same = findings.answers_retrieved(_answers_block([True, False] * 3, [True, False] * 9), 3000)
    assert same["holds"] is False and same["p_value"] > 0.5
    reversed_ = findings.answers_retrieved(_answers_block([False] * 6, [True] * 18), 3000)
    assert reversed_["holds"] is False
    assert findings.answers_retrieved({"available": False}, 3000)["holds"] is None
    assert findings.answers_retrieved(_answers_block([True] * 3, []), 3000)["holds"] is None


def test_answer_finding_compares_one_kind_of_answer_for_both_query_kinds():
    """Issue 24: the correct answer for both kinds, with the model's own answer reported beside it."""
    from jaxinf.analysis import findings

    # the correct answers say it holds, the model's own answers (found for reasoning too) say it does not
    block = _answers_block([True] * 8, [False] * 24, own=([True] * 8, [True] * 24))
    res = findings.answers_retrieved(block, 3000)
    assert res["answer"] == "correct answer" and res["holds"] is True
    assert res["table"] == [[8, 0], [0, 24]] and res["p_value"] == pytest.approx(1 / math.comb(32, 8), rel=1e-9)
    own = res["variants"]["model's answer"]
    assert own["table"] == [[8, 0], [24, 0]] and own["p_value"] == pytest.approx(1.0)
    assert "model's answer: factual 8/8, reasoning 24/24" in res["statistic"]
    assert "correct answer: factual 8/8, reasoning 0/24, p = " in res["statistic"]
    # no answer field anywhere: the model's own answers for both kinds decide, and say so
    derived = findings.answers_retrieved(
        _answers_block([True] * 8, [False] * 24, own=([True] * 8, [True] * 24), rule="step results"), 3000
    )
    assert derived["answer"] == "model's answer" and derived["holds"] is False and derived["table"] == own["table"]
    assert "correct answer: not testable" in derived["statistic"]
    # a correct answer for factual queries only is never compared with the model's answer of reasoning ones
    mixed = _answers_block([True] * 8, [False] * 24, own=([True] * 8, [True] * 24))
    for q in mixed["per_query"]:
        q["rule"] = "answer field" if q["kind"] == "factual" else "step results"
    assert findings.answers_retrieved(mixed, 3000)["answer"] == "model's answer"
