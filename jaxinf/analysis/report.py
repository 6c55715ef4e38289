"""The report: ``report/index.html`` with PNG figures beside it (``report/summary.md`` is :mod:`jaxinf.analysis.markdown`).

The page has no external resource and one script of its own, the search box of
:mod:`jaxinf.analysis.page`, whose Content-Security-Policy lets no other script run; every
piece of text that comes from the run (document text, ids, sources, query text, kinds, tasks,
notes) passes through :func:`esc` (``html.escape`` with quotes). The figures are drawn by
:mod:`jaxinf.analysis.figures`. :data:`CSP` (no script at all) is the policy of the static
pages that have no search, such as ``jaxinf validate``'s report.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from jaxinf.analysis import findings as fnd
from jaxinf.analysis import page
from jaxinf.analysis import seeds as sd
from jaxinf.analysis.figures import (
    fig_answers,
    fig_concentration,
    fig_correlation_groups,
    fig_correlations,
    fig_layers,
    fig_per_nat,
    fig_powerlaw,
    fig_sources,
)
from jaxinf.analysis.groups import present_kinds
from jaxinf.analysis.layers import BINS

CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'none'; object-src 'none'"


def esc(x) -> str:
    """HTML-escaped text of anything (quotes too)."""
    return html.escape("" if x is None else str(x), quote=True)


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "&mdash;"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if not np.isfinite(x):
        return "&mdash;"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


# ----------------------------------------------------------------------------- HTML


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table; cells are already-escaped HTML."""
    h = "".join(f"<th>{c}</th>" for c in header)
    b = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>'


def _figure(name: str, alt: str) -> str:
    return f'<figure><img src="{esc(name)}" alt="{esc(alt)}"></figure>'


def _desc_cells(d: dict) -> list[str]:
    return [fmt(d["n"]), fmt(d["mean"]), fmt(d["std"]), fmt(d["median"])]


def _snippet(text: str | None, n: int) -> str:
    if text is None:
        return "<i>(text not available)</i>"
    t = " ".join(text.split())
    return esc(t[:n] + ("\u2026" if len(t) > n else ""))


def _highlight(texts: list[str], scores: np.ndarray, top: list[dict], window: int = 60, decoded: bool = False) -> str:
    """The document's tokens around its top tokens, top tokens in <mark> (each token escaped). ``decoded``: ``texts``
    are the tokens' decoded pieces (:func:`jaxinf.data.tokenize.token_pieces`), so each stretch shown is the
    tokenizer's decode of that window (its leading space dropped) with the marked tokens' text in <mark>; otherwise
    the raw token strings of an older export, run together."""
    marks = {t["position"] for t in top}
    keep: set[int] = set()
    for p in marks:
        keep.update(range(max(0, p - window // 2), min(len(texts), p + window // 2)))
    out, prev = [], -2
    for i in sorted(keep):
        tok = texts[i]
        if i != prev + 1:
            out.append(" \u2026 " if i > 0 else "")
            tok = tok.lstrip() if decoded else tok
        lead = tok[: len(tok) - len(tok.lstrip())] if decoded else ""  # a word's space stays outside its mark
        out.append(
            f'{esc(lead)}<mark title="{fmt(scores[i])}">{esc(tok[len(lead) :])}</mark>' if i in marks else esc(tok)
        )
        prev = i
    return "".join(out)


def write_report(out: Path, s: dict, *, queries, rows, fetched, texts, documents, options) -> None:
    """``out/index.html`` (the report) and its figures, from the summary ``s`` of
    :func:`jaxinf.analysis.driver.analyze` and what the report lists for each query: the exported ``queries``,
    their top and bottom ``rows``, the ``fetched`` listed documents (index -> (id, text or None)), the ``texts``
    shown for them, the exported ``documents`` (ids and sources) and the analysis ``options``."""
    out = Path(out)
    figs: dict[str, str] = {}

    def make(name, fn, *args):
        fn(out / name, *args)
        figs[name] = name

    make("correlations.png", fig_correlations, s)
    make("correlation_groups.png", fig_correlation_groups, s)
    make("concentration.png", fig_concentration, s)
    if s["concentration"]["per_nat"] is not None:
        make("per_nat.png", fig_per_nat, s)
    make("powerlaw.png", fig_powerlaw, s, rows.ranked_pos)
    make("sources.png", fig_sources, s)
    if s["sources"]["by_tokens"]:
        make("sources_tokens.png", fig_sources, s, "tokens")
    if s["answers"].get("available"):
        make("answers.png", fig_answers, s)
    if s["layers"].get("available"):
        make("layers.png", fig_layers, s)

    parts = [
        _head(s),
        _notes(s),
        _sec_findings(s),
        _sec_seeds(s),
        _sec_queries(s, queries, rows, fetched, texts, documents, options),
        _sec_correlations(s),
        _sec_concentration(s),
        _sec_powerlaw(s),
        _sec_sources(s),
        _sec_answers(s),
        _sec_layers_tokens(s, queries),
    ]  # each query's documents first: what a reader opens the report for
    (out / "index.html").write_text("".join(parts) + f"</main>{page.SCRIPT}</body></html>\n", encoding="utf-8")


def _head(s: dict) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{page.CSP}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>jaxinf analysis</title><style>{page.STYLE}</style></head><body><main>"
        f"<h1>Influence analysis</h1><p>Run directory <code>{esc(s['run_dir'])}</code>: "
        f"{s['n_queries']} queries &times; {s['n_documents']} documents. Every number is in "
        f'<code>summary.json</code>; a short version is in <a href="summary.md">summary.md</a>. '
        f"Document texts from: {esc(s['text_source'])}.</p>"
        + _table(["kind", "queries"], [[esc(k), fmt(n)] for k, n in s["queries"]["kinds"].items()])
        + _table(
            ["task", "kind", "queries"],
            [[esc(t), esc(d["kind"]), fmt(d["count"])] for t, d in s["queries"]["tasks"].items()],
        )
    )


def _notes(s: dict) -> str:
    if not s["notes"]:
        return '<section id="notes"><p>No fallbacks were used and nothing was skipped.</p></section>'
    items = "".join(f"<li>{esc(n)}</li>" for n in s["notes"])
    return f'<section id="notes" class="notes"><h2>Notes and fallbacks</h2><ul>{items}</ul></section>'


def _sec_findings(s: dict) -> str:
    rows = [
        [esc(f["name"]), esc(f["claim"]), esc(f["statistic"]), esc(f["test"]), esc(fnd.verdict_text(f))]
        for f in s.get("findings", [])
    ]
    return (
        '<section id="findings"><h2>Findings of Ruis et al. (2024), tested on this run</h2>'
        f"<p>Each finding holds when its effect goes the claimed way at p &lt; {fnd.ALPHA}; "
        "the sections below have the numbers behind it.</p>"
        + _table(["finding", "claim", "measured", "test", "verdict"], rows)
        + "".join(_finding_details(f) for f in s.get("findings", []))
        + "</section>"
    )


def _sec_seeds(s: dict) -> str:
    """The findings' verdicts over the training seeds (:mod:`jaxinf.analysis.seeds`), when the run has them."""
    t = s.get("seeds")
    if not t:
        return ""
    names = [a["name"] for a in t["agreement"]]
    verdicts = [
        [fmt(r["seed"]), *(esc(fnd.verdict_text(f)) for f in r["findings"]), f"<code>{esc(r['run'])}</code>"]
        for r in t["seeds"]
    ]
    stats = [[fmt(r["seed"]), esc(f["name"]), esc(f["statistic"])] for r in t["seeds"] for f in r["findings"]]
    items = "".join(f"<li><b>{esc(a['name'])}</b>: {esc(sd.agreement_text(a))}</li>" for a in t["agreement"])
    return (
        f'<section id="seeds"><h2>The findings over {len(t["seeds"])} training seeds</h2>'
        "<p>The same corpus, queries and schedule, a model trained from each seed (its initialization and batch "
        "order), each completing its own queries and scored in its own run; this run is one of them.</p>"
        + _table(["seed", *map(esc, names), "run"], verdicts)
        + f"<ul>{items}</ul>"
        + _table(["seed", "finding", "measured"], stats)
        + "</section>"
    )


def _finding_details(f: dict) -> str:
    """The comparisons behind finding 1 (vs factual, vs template-matched controls) and the answer variants of
    finding 2, one table each, whatever the verdict."""
    if "vs_factual" in f:
        means = {
            "vs factual": (f.get("reasoning"), f.get("factual")),
            "vs template-matched controls": (f.get("reasoning_matched"), f.get("control_matched")),
        }
        rows = [
            [
                esc(name),
                fmt(means[name][0]),
                fmt(means[name][1]),
                fmt(c and c["n_pairs_a"]),
                fmt(c and c["n_pairs_b"]),
                fmt(c and c["difference"]),
                fmt(c and c["p_value"]),
            ]
            for name, c in (("vs factual", f["vs_factual"]), ("vs template-matched controls", f["vs_controls"]))
        ]
        return "<h3>Procedural knowledge: reasoning queries against each comparison group</h3>" + _table(
            ["comparison", "mean r, reasoning", "mean r, other", "pairs, reasoning", "pairs, other", "difference", "p"],
            rows,
        )
    if "variants" in f:
        rows = []
        for name, v in f["variants"].items():
            label = esc(name) + (" (the verdict)" if name == f.get("answer") else "")
            if not v["testable"]:
                rows.append([label, f"{v['n_factual']} queries", f"{v['n_reasoning']} queries", "not testable"])
                continue
            (ff, _), (rf, _) = v["table"]
            rows.append([label, f"{ff} of {v['n_factual']}", f"{rf} of {v['n_reasoning']}", fmt(v["p_value"])])
        return f"<h3>Answers in the top {fmt(f.get('k'))}: each kind of answer, for both query kinds</h3>" + _table(
            ["answer searched", "factual: found", "reasoning: found", "p (one-sided Fisher)"], rows
        )
    return ""


def _sec_correlations(s: dict) -> str:
    c = s["correlations"]
    within = _table(
        ["task", "kind", "pairs", "mean r", "std", "median"],
        [[esc(t), esc(d["kind"]), *_desc_cells(d)] for t, d in c["within_task"].items()],
    )
    kp = _table(
        ["kinds", "pairs", "mean r", "std", "median"], [[esc(k), *_desc_cells(d)] for k, d in c["kind_pairs"].items()]
    )
    groups = _table(
        ["group", "pairs", "mean r", "std", "median"],
        [[esc(f"same task, {k}"), *_desc_cells(d)] for k, d in c["within_task_by_kind"].items()]
        + [[esc(f"different tasks, {k}"), *_desc_cells(d)] for k, d in c["across_tasks_by_kind"].items()]
        + [
            ["same task, all", *_desc_cells(c["within_task_all"])],
            ["different tasks, all", *_desc_cells(c["across_tasks_all"])],
        ],
    )
    comp = _table(
        ["comparison", "A", "B", "pairs A", "pairs B", "mean A - mean B", "p"],
        [
            [
                esc(x["name"]),
                esc(x["group_a"]),
                esc(x["group_b"]),
                fmt(x["n_pairs_a"]),
                fmt(x["n_pairs_b"]),
                fmt(x["difference"]),
                fmt(x["p_value"]),
            ]
            for x in c["comparisons"]
        ],
    )
    return (
        '<section id="correlations"><h2>1. Query-query correlations</h2>'
        "<p>Pearson correlation of the score vectors of every pair of queries over all documents.</p>"
        + _figure("correlations.png", "correlation heat map")
        + "<h3>Within each task</h3>"
        + within
        + "<h3>By kind</h3>"
        + kp
        + groups
        + "<h3>Differences between groups</h3>"
        + f"<p>Test: {esc(c['test'])}.</p>"
        + comp
        + _figure("correlation_groups.png", "correlations by group")
        + "</section>"
    )


def _sec_concentration(s: dict) -> str:
    cs = s["concentration"]
    kinds = present_kinds(s["queries"]["kind"])
    rows = []
    for side in ("positive", "negative"):
        for f, k in zip(cs["fractions"], cs["k"]):
            for kind in kinds:
                d = cs["by_kind"][side][f][kind]
                rows.append([esc(side), f"{100 * f:g}% (k={k})", esc(kind), *_desc_cells(d)])
    html_ = (
        '<section id="concentration"><h2>2. Concentration of influence</h2>'
        "<p>Share of a query's total positive (negative) influence held by its top (bottom) documents.</p>"
        + (f"<p><b>Caveat:</b> {esc(cs['caveat'])}.</p>" if cs.get("caveat") else "")
        + _figure("concentration.png", "concentration")
        + _table(["side", "fraction", "kind", "queries", "mean share", "std", "median"], rows)
    )
    if cs["per_nat"] is None:
        html_ += "<p>Per-nat totals: not available (no completion NLL in queries.jsonl).</p>"
    else:
        pn = cs["per_nat"]
        html_ += (
            "<h3>Influence per nat</h3><p>Total absolute influence divided by the completion's NLL.</p>"
            + _figure("per_nat.png", "influence per nat")
            + _table(
                ["kind", "queries", "mean", "std", "median"],
                [[esc(k), *_desc_cells(d)] for k, d in pn["by_kind"]["absolute"].items()],
            )
            + _compare_table(pn["compare_kinds"])
        )
    return html_ + "</section>"


def _compare_table(cmp: list[dict]) -> str:
    if not cmp:
        return ""
    return _table(
        ["kind A", "kind B", "n A", "n B", "median A", "median B", "p (Mann-Whitney)"],
        [
            [
                esc(c["a"]),
                esc(c["b"]),
                fmt(c["n_a"]),
                fmt(c["n_b"]),
                fmt(c["median_a"]),
                fmt(c["median_b"]),
                fmt(c["p_value"]),
            ]
            for c in cmp
        ],
    )


def _sec_powerlaw(s: dict) -> str:
    p = s["powerlaw"]
    out = [
        '<section id="powerlaw"><h2>3. Power-law tails</h2>'
        f"<p>Fits of each query's top {p['top_n']} scores (positive part): the log-log rank-size slope (OLS, "
        "with its standard error) and a Clauset-style maximum-likelihood exponent alpha with x_min chosen by "
        "the Kolmogorov-Smirnov distance and a bootstrap goodness-of-fit p (a power law is plausible when "
        "p &ge; 0.1). A rank-size slope b corresponds to alpha &asymp; 1 - 1/b.</p>",
        _figure("powerlaw.png", "power laws"),
    ]
    for side in ("positive", "negative"):
        d = p[side]
        rows = [
            [
                esc(k),
                *_desc_cells(d["slope_by_kind"][k]),
                *_desc_cells(d["alpha_by_kind"][k])[1:],
                fmt(d["plausible_share_by_kind"][k]["share"]),
            ]
            for k in d["slope_by_kind"]
        ]
        out.append(
            f"<h3>{'Top (positive) scores' if side == 'positive' else 'Bottom (negative) scores, as magnitudes'}</h3>"
            + _table(
                ["kind", "queries", "mean slope", "std", "median", "mean alpha", "std", "median", "share plausible"],
                rows,
            )
            + "<p>Slopes compared between kinds:</p>"
            + _compare_table(d["compare_slope"])
        )
    return "".join(out) + "</section>"


def _sec_sources(s: dict) -> str:
    so = s["sources"]
    docs = s["documents"]["sources"]
    corpus = _table(
        ["source", "documents", "share", "tokens", "token share"],
        [
            [esc(n), fmt(d["count"]), fmt(d["share_count"]), fmt(d.get("tokens")), fmt(d.get("share_tokens"))]
            for n, d in docs.items()
        ],
    )
    rows = []
    for side in ("top", "bottom"):
        for measure, by in so["by_kind"][side].items():
            for kind, d in by.items():
                mean = np.asarray(d["mean"])
                for i, k in enumerate(so["ks"]):
                    rows.append([esc(side), esc(measure), esc(kind), fmt(k)] + [fmt(v) for v in mean[i]])
    return (
        '<section id="sources"><h2>4. Data sources of the top and bottom documents</h2>'
        "<p>Multiplier = share of a source among a query's top-k (bottom-k) documents divided by its share of "
        "the corpus, by document count and by tokens, averaged over the queries of a kind (1 = as in the corpus).</p>"
        + corpus
        + _figure("sources.png", "sources by count")
        + (
            _figure("sources_tokens.png", "sources by tokens")
            if so["by_tokens"]
            else "<p>By tokens: not available (documents without token counts).</p>"
        )
        + _table(["side", "by", "kind", "k", *[esc(n) for n in so["sources"]]], rows)
        + "</section>"
    )


def _sec_answers(s: dict) -> str:
    a = s["answers"]
    if not a.get("available"):
        return f'<section id="answers"><h2>5. Answers in the top documents</h2><p>Not available: {esc(a.get("reason"))}.</p></section>'
    rows = []
    for kind in a["share_found_any_by_kind"]:
        for i, k in enumerate(a["ks"]):
            rows.append(
                [
                    esc(kind),
                    fmt(k),
                    fmt(a["share_found_any_by_kind"][kind][i]),
                    fmt(a["share_found_all_by_kind"][kind][i]),
                    fmt(a["mean_recall_by_kind"][kind][i]),
                ]
            )
    return (
        '<section id="answers"><h2>5. Answers in the top documents</h2>'
        "<p>Answer items: the query's <code>answer</code> field, else numbers and key phrases of the completion "
        "(reasoning queries: the result of each step and the final answer). An item is found when it occurs in "
        "one of the query's top-k documents.</p>"
        + _figure("answers.png", "answers")
        + _table(
            ["kind", "k", "share with any item found", "share with every item found", "mean share of items found"], rows
        )
        + "</section>"
    )


def _sec_layers_tokens(s: dict, queries) -> str:
    out = ['<section id="layers"><h2>6. Layers and tokens</h2>']
    la = s["layers"]
    if not la.get("available"):
        out.append(f"<p>Layers: {esc(la['reason'])}.</p>")
    else:
        out.append(
            f"<p>Share of the absolute influence of each query's top {la['top_k']} documents coming from "
            f"each layer; layers binned by block number ({esc(la['block_rule'])}) into lower, middle and "
            f"upper thirds. Per-layer sums match scores.npy to a relative "
            f"{fmt(la['sum_check_max_relative_difference'])}.</p>"
            + _figure("layers.png", "layers")
            + _table(
                ["bin", "kind", "queries", "mean share", "std", "median"],
                [[esc(b), esc(k), *_desc_cells(d)] for b in BINS for k, d in la["bin_share_by_kind"][b].items()],
            )
        )
    to = s["tokens"]
    if not to.get("available"):
        out.append(f"<p>Tokens: {esc(to['reason'])}.</p>")
    else:
        out.append(
            f"<p>Tokens with the largest per-token influence in each top document (highlighted; hover for "
            f"the score). Per-token sums match scores.npy to a relative {fmt(to['sum_check_max_relative_difference'])}.</p>"
        )
        rows = []
        for e in to["records"]:
            tops = ", ".join(f"<code>{esc(t['text'])}</code> ({fmt(t['score'])})" for t in e["top_tokens"])
            rows.append(
                [
                    esc(e["query"]),
                    esc(e["document"]),
                    fmt(e["rank"]),
                    fmt(e["score"]),
                    tops,
                    '<div class="doc">'
                    + _highlight(e["_texts"], e["_scores"], e["top_tokens"], decoded=e.get("_decoded", False))
                    + "</div>",
                ]
            )
        out.append(_table(["query", "document", "rank", "score", "top tokens", "context"], rows))
    return "".join(out) + "</section>"


OPEN_QUERIES = 40
"""Reports with at most this many queries show every query's documents expanded."""


def _sec_queries(s, queries, rows, fetched, texts, documents, options) -> str:
    ans = {p["query"]: p for p in s["answers"].get("per_query", [])} if s["answers"].get("available") else {}
    out = [
        '<section id="queries"><h2>Queries and their top and bottom documents</h2>'
        "<p>One collapsible entry per query. The box below keeps the queries whose kind, task, id, prompt or "
        "completion hold every word typed, and in the others the documents (id, source, text) that do; the "
        "browser's find (Ctrl+F) also searches and opens closed entries.</p>" + page.SEARCH_BOX
    ]
    n = options.report_documents
    opened = " open" if len(queries.ids) <= OPEN_QUERIES else ""  # long reports start collapsed
    for q, qid in enumerate(queries.ids):
        a = ans.get(qid)
        items = ""
        if a is not None:
            last = a["by_k"][-1]
            marks = ", ".join(
                f"{esc(it)} {'&#10003;' if f else '&#10007;'}" for it, f in zip(a["items"], last["found"])
            )
            items = f"<p>Answer items ({esc(a['rule'])}), found in the top {last['k']}: {marks or '<i>none</i>'}</p>"
        fid = (
            f" (EK-FAC index, predicted correlation {fmt(s['index']['predicted_correlation'][qid])})"
            if s.get("index")
            else ""
        )
        body = [
            f'<details class="query"{opened}><summary class="qtext">[{esc(queries.kinds[q])} / '
            f"{esc(queries.tasks[q] or '(none)')}] <b>{esc(qid)}</b>{fid}: {_snippet(queries.prompts[q], 160)}</summary>"
            f'<p><b>Prompt</b></p><div class="doc qtext">{esc(queries.prompts[q])}</div>'
            f'<p><b>Completion</b></p><div class="doc qtext">{esc(queries.completions[q])}</div>{items}'
        ]
        for side, idx, val in (
            ("top", rows.top_idx[q], rows.top_val[q]),
            ("bottom", rows.bottom_idx[q], rows.bottom_val[q]),
        ):
            trs = []
            for rank, (i, v) in enumerate(zip(idx[:n], val[:n]), 1):
                i = int(i)
                trs.append(
                    [
                        fmt(rank),
                        esc(fetched[i][0]),
                        esc(documents.source_names[documents.source_codes[i]]),
                        fmt(v),
                        f'<div class="doc">{_snippet(texts.get(i), options.snippet_chars)}</div>',
                    ]
                )
            body.append(
                f"<p><b>{side.capitalize()} {len(trs)}</b></p>" + _table(["rank", "id", "source", "score", "text"], trs)
            )
        body.append("</details>")
        out.append("".join(body))
    return "".join(out) + "</section>"
