"""Query-query correlations of influence scores (Ruis et al. 2024, finding 1).

Two queries whose score vectors over the whole corpus are correlated rely on the same
documents. The statistics here are over the Q x Q Pearson matrix, grouped by query kind and
task; groups of query *pairs* are compared with a permutation test over query labels,
because pairs sharing a query are not independent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxinf.analysis.groups import ALL_KINDS, describe


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r of two vectors (NaN when either side is constant)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: :func:`pearson` of the ranks, ties sharing their mean rank (NaN when either side is
    constant)."""
    from scipy.stats import rankdata

    return pearson(rankdata(x), rankdata(y))


def topk_overlap(x: np.ndarray, ref: np.ndarray, k: int) -> float:
    """Share of ``ref``'s ``k`` largest entries that are among ``x``'s ``k`` largest (ties broken by position;
    NaN for ``k = 0``). The bottom ``k`` are ``topk_overlap(-x, -ref, k)``."""
    if k < 0:
        raise ValueError(f"topk_overlap: k must be at least 0, got {k}")
    k = min(k, len(ref))
    if k == 0:
        return float("nan")
    top_x = set(np.argsort(-np.asarray(x), kind="stable")[:k].tolist())
    top_ref = set(np.argsort(-np.asarray(ref), kind="stable")[:k].tolist())
    return len(top_x & top_ref) / k


class PearsonAccumulator:
    """Streaming Pearson correlation of the rows of a [Q, N] matrix fed in column chunks.

    ``r_ij = C_ij / sqrt(C_ii C_jj)`` with ``C = sum_n (x_in - m_i)(x_jn - m_j)``. To stay
    accurate in one pass it accumulates shifted sums: with a fixed shift ``k_i`` (the first
    chunk's row mean), ``u = x - k``, ``C = sum_n u u^T - (sum_n u)(sum_n u)^T / N``.
    """

    def __init__(self, n_rows: int):
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s1 = np.zeros(n_rows)
        self.s2 = np.zeros((n_rows, n_rows))

    def update(self, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk, np.float64)
        if self.shift is None:
            self.shift = chunk.mean(axis=1)
        u = chunk - self.shift[:, None]
        self.n += chunk.shape[1]
        self.s1 += u.sum(axis=1)
        self.s2 += u @ u.T

    def result(self) -> np.ndarray:
        """The Q x Q Pearson matrix; a row with zero variance gets NaN correlations."""
        c = self.s2 - np.outer(self.s1, self.s1) / self.n
        d = np.sqrt(np.clip(np.diag(c), 0.0, None))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = c / np.outer(d, d)
        r = np.clip(r, -1.0, 1.0)
        np.fill_diagonal(r, np.where(d > 0, 1.0, np.nan))
        return r


def pearson_matrix(scores: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Pearson correlation of every pair of rows of an in-memory [Q, N] matrix (see PearsonAccumulator)."""
    acc = PearsonAccumulator(scores.shape[0])
    for s in range(0, scores.shape[1], chunk):
        acc.update(scores[:, s : s + chunk])
    return acc.result()


# ----------------------------------------------------------------------------- pair groups

PairRule = Callable[[np.ndarray, np.ndarray], np.ndarray]
_KIND_CODE = {k: i for i, k in enumerate(ALL_KINDS)}


def encode_labels(kinds: Sequence[str], tasks: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes for kinds (index into ALL_KINDS) and tasks (-1 for a missing task)."""
    names = {t: i for i, t in enumerate(sorted({t for t in tasks if t is not None}))}
    k = np.asarray([_KIND_CODE[x] for x in kinds], np.int64)
    t = np.asarray([-1 if x is None else names[x] for x in tasks], np.int64)
    return k, t


def within_task(kind: str | None = None) -> PairRule:
    """Pairs of queries with the same (known) task, optionally both of the given kind."""

    def rule(k, t):
        m = (t[:, None] == t[None, :]) & (t >= 0)[:, None]
        if kind is not None:
            c = k == _KIND_CODE[kind]
            m &= c[:, None] & c[None, :]
        return m

    return rule


def across_tasks(kind: str | None = None) -> PairRule:
    """Pairs of queries with different (known) tasks, optionally both of the given kind."""

    def rule(k, t):
        known = t >= 0
        m = (t[:, None] != t[None, :]) & known[:, None] & known[None, :]
        if kind is not None:
            c = k == _KIND_CODE[kind]
            m &= c[:, None] & c[None, :]
        return m

    return rule


def template_matched(kind: str) -> PairRule:
    """Pairs of queries of the given kind with the same task, in a task that has both reasoning and control
    queries: a control query whose task is a reasoning task's is a *template-matched control* of it (the
    same surface form, a completion that needs no procedure; docs/analysis.md)."""

    def rule(k, t):
        m = _matched(k, t, kind)
        return (t[:, None] == t[None, :]) & m[:, None] & m[None, :]

    return rule


def _matched(k: np.ndarray, t: np.ndarray, kind: str) -> np.ndarray:
    """Which queries are of ``kind`` in a task that has both reasoning and control queries (codes of
    :func:`encode_labels`)."""
    r, c = k == _KIND_CODE["reasoning"], k == _KIND_CODE["control"]
    both = np.intersect1d(t[r & (t >= 0)], t[c & (t >= 0)])
    return (k == _KIND_CODE[kind]) & np.isin(t, both)


def kind_pair(a: str, b: str) -> PairRule:
    """Pairs with one query of kind a and one of kind b (unordered)."""

    def rule(k, t):
        ia, ib = k == _KIND_CODE[a], k == _KIND_CODE[b]
        return (ia[:, None] & ib[None, :]) | (ib[:, None] & ia[None, :])

    return rule


def one_task(task_code: int, kind: str | None = None) -> PairRule:
    """Pairs of queries that both have the task with the given code (and, optionally, both the given kind)."""

    def rule(k, t):
        m = t == task_code
        if kind is not None:
            m &= k == _KIND_CODE[kind]
        return m[:, None] & m[None, :]

    return rule


def pair_mask(rule: PairRule, kinds: Sequence[str], tasks: Sequence[str | None]) -> np.ndarray:
    """Boolean [Q, Q] mask of the pairs i < j selected by a rule (each unordered pair once)."""
    return np.triu(np.asarray(rule(*encode_labels(kinds, tasks)), bool), 1)


def group_values(r: np.ndarray, rule: PairRule, kinds, tasks) -> np.ndarray:
    return r[pair_mask(rule, kinds, tasks)]


def _permutation(rng: np.random.Generator, task_codes: np.ndarray, within_task: bool) -> np.ndarray:
    """A random permutation of the queries: of all of them, or only among the queries of each task."""
    if not within_task:
        return rng.permutation(len(task_codes))
    perm = np.arange(len(task_codes))
    for t in np.unique(task_codes):
        idx = np.flatnonzero(task_codes == t)
        perm[idx] = idx[rng.permutation(idx.size)]
    return perm


def permutation_test(
    r: np.ndarray,
    kinds: Sequence[str],
    tasks: Sequence[str | None],
    rule_a: PairRule,
    rule_b: PairRule,
    n_permutations: int = 2000,
    seed: int = 0,
    within_task: bool = False,
) -> dict:
    """Difference of the mean pair correlation of two groups, with a permutation p-value.

    Statistic ``d = mean_{(i,j) in A} r_ij - mean_{(i,j) in B} r_ij``. Under the null hypothesis
    the (kind, task) labels are exchangeable between queries, so the labels are permuted
    jointly across queries (the matrix stays fixed) and
    ``p = (1 + #{|d_perm| >= |d_obs|}) / (1 + n_permutations)`` (two-sided). Permutations that
    leave a group empty are not counted. With ``within_task`` the null is narrower: within each
    task the kind labels are exchangeable, so kinds are permuted only among the queries of one
    task (tasks stay in place). That is the test of reasoning queries against template-matched
    controls: it asks whether the kind matters among queries of the same surface form.
    """
    kind_codes, task_codes = encode_labels(kinds, tasks)
    finite = np.isfinite(r)

    def stat(k, t):
        ma = np.triu(np.asarray(rule_a(k, t), bool), 1) & finite
        mb = np.triu(np.asarray(rule_b(k, t), bool), 1) & finite
        if not ma.any() or not mb.any():
            return np.nan, int(ma.sum()), int(mb.sum())
        return float(r[ma].mean() - r[mb].mean()), int(ma.sum()), int(mb.sum())

    d, na, nb = stat(kind_codes, task_codes)
    out = {
        "difference": None if np.isnan(d) else d,
        "n_pairs_a": na,
        "n_pairs_b": nb,
        "p_value": None,
        "n_permutations": 0,
    }
    if np.isnan(d):
        return out
    rng = np.random.default_rng(seed)
    hits = used = 0
    for _ in range(n_permutations):
        perm = _permutation(rng, task_codes, within_task)
        dp, _, _ = stat(kind_codes[perm], task_codes[perm])
        if np.isnan(dp):
            continue
        used += 1
        hits += abs(dp) >= abs(d) - 1e-12
    out["n_permutations"] = used
    out["p_value"] = (1 + hits) / (1 + used)
    return out


@dataclass(frozen=True)
class Comparison:
    name: str
    a: str
    b: str
    rule_a: PairRule
    rule_b: PairRule
    within_task: bool = False  # permute kinds only within each task (see permutation_test)


#: The comparisons reported by default, named after the groups they compare.
DEFAULT_COMPARISONS = (
    Comparison(
        "within task: reasoning vs factual",
        "reasoning, same task",
        "factual, same task",
        within_task("reasoning"),
        within_task("factual"),
    ),
    Comparison(
        "within task: reasoning vs template-matched control",
        "reasoning, same task (with controls)",
        "control, same task as reasoning",
        template_matched("reasoning"),
        template_matched("control"),
        True,
    ),
    Comparison(
        "reasoning: within task vs across tasks",
        "reasoning, same task",
        "reasoning, different tasks",
        within_task("reasoning"),
        across_tasks("reasoning"),
    ),
    Comparison(
        "within task: reasoning vs control",
        "reasoning, same task",
        "control, same task",
        within_task("reasoning"),
        within_task("control"),
    ),
    Comparison(
        "reasoning-reasoning vs reasoning-control",
        "reasoning-reasoning",
        "reasoning-control",
        kind_pair("reasoning", "reasoning"),
        kind_pair("reasoning", "control"),
    ),
    Comparison(
        "all queries: within task vs across tasks", "same task", "different tasks", within_task(), across_tasks()
    ),
)


def heatmap_order(kinds: Sequence[str], tasks: Sequence[str | None]) -> np.ndarray:
    """Query order for the heat map: by kind (factual, reasoning, control, unknown), then task, then file order."""
    return np.asarray(sorted(range(len(kinds)), key=lambda i: (_KIND_CODE[kinds[i]], tasks[i] or "", i)))


def correlation_summary(
    r: np.ndarray,
    kinds: Sequence[str],
    tasks: Sequence[str | None],
    n_permutations: int = 2000,
    seed: int = 0,
    losses: Sequence[float] | np.ndarray | None = None,
) -> dict:
    """Every group statistic and comparison of the Pearson matrix r. With the queries' completion ``losses``
    (nats), the template-matched groups also describe them: a control far less likely than the reasoning
    queries it matches is not matched in what dominates its gradient."""
    present = [k for k in ALL_KINDS if k in kinds]
    task_names = sorted({t for t in tasks if t is not None})
    task_kinds: dict[str, list[str]] = {}
    for k in ALL_KINDS:
        for kk, t in zip(kinds, tasks):
            if t is not None and kk == k and k not in task_kinds.setdefault(t, []):
                task_kinds[t].append(k)
    within: dict[str, dict] = {}  # keyed by task, or by "task (kind)" for a task with queries of several kinds
    for i, t in enumerate(task_names):
        for k in task_kinds[t]:
            key = t if len(task_kinds[t]) == 1 else f"{t} ({k})"
            within[key] = {"kind": k, "task": t, **describe(group_values(r, one_task(i, k), kinds, tasks))}
    out: dict[str, Any] = {
        "within_task": within,
        "kind_pairs": {},
        "within_task_by_kind": {k: describe(group_values(r, within_task(k), kinds, tasks)) for k in present},
        "across_tasks_by_kind": {k: describe(group_values(r, across_tasks(k), kinds, tasks)) for k in present},
        "template_matched": {
            k: describe(group_values(r, template_matched(k), kinds, tasks)) for k in ("reasoning", "control")
        },
        "template_matched_loss": None
        if losses is None
        else {
            k: describe(np.asarray(losses, np.float64)[_matched(*encode_labels(kinds, tasks), k)])
            for k in ("reasoning", "control")
        },
        "within_task_all": describe(group_values(r, within_task(), kinds, tasks)),
        "across_tasks_all": describe(group_values(r, across_tasks(), kinds, tasks)),
        "comparisons": [],
        "test": "permutation of (kind, task) labels across queries (of kinds within each task for template-matched "
        "controls); two-sided; p = (1 + hits) / (1 + permutations)",
    }
    for i, a in enumerate(present):
        for b in present[i:]:
            out["kind_pairs"][f"{a}-{b}"] = describe(group_values(r, kind_pair(a, b), kinds, tasks))
    for c in DEFAULT_COMPARISONS:
        res = permutation_test(r, kinds, tasks, c.rule_a, c.rule_b, n_permutations, seed, c.within_task)
        out["comparisons"].append(
            {
                "name": c.name,
                "group_a": c.a,
                "group_b": c.b,
                "permuted": "kinds within each task" if c.within_task else "(kind, task) labels",
                **res,
            }
        )
    return out
