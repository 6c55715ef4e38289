"""The report: ``report/index.html`` with PNG figures beside it, and ``report/summary.md``.

The page is static: no script, no external resource, a Content-Security-Policy that forbids
scripts, and every piece of text that comes from the run (document text, ids, sources, query
text, kinds, tasks, notes) passes through :func:`esc` (``html.escape`` with quotes). Figure
labels that come from the run pass through :func:`lab`, so ``$`` in a name is just a dollar
(never matplotlib math text).
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from jaxinf.analysis import findings as fnd
from jaxinf.analysis.groups import present_kinds
from jaxinf.analysis.layers import BINS

KIND_COLORS = {"factual": "#1f77b4", "reasoning": "#d62728", "control": "#7f7f7f", "unknown": "#9467bd"}
RC: dict[matplotlib.typing.RcKeyType, float] = {"font.size": 9, "axes.titlesize": 10}   # what rc_context takes
CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'none'; object-src 'none'"


def esc(x) -> str:
    """HTML-escaped text of anything (quotes too)."""
    return html.escape("" if x is None else str(x), quote=True)


def lab(x) -> str:
    """A figure label from run data: ``$`` escaped so matplotlib never parses it as math text."""
    return ("" if x is None else str(x)).replace("$", r"\$")


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


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")


# ----------------------------------------------------------------------------- figures


def fig_correlations(path: Path, s: dict) -> None:
    c = s["correlations"]
    r = np.asarray(c["matrix"], np.float64)
    order = np.asarray(c["order"])
    kinds = np.asarray(s["queries"]["kind"])[order]
    tasks = np.asarray([t if t is not None else "(none)" for t in s["queries"]["task"]], dtype=object)[order]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(7.5, 6.5))
        ax = fig.add_subplot()
        im = ax.imshow(r[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Pearson correlation")
        labels = [lab(f"{k}: {t}") for k, t in zip(kinds, tasks)]
        starts = [0] + [i for i in range(1, len(labels)) if labels[i] != labels[i - 1]]
        ends = starts[1:] + [len(labels)]
        for b in starts[1:]:
            ax.axhline(b - 0.5, color="k", lw=0.6)
            ax.axvline(b - 0.5, color="k", lw=0.6)
        mids = [(a + b - 1) / 2 for a, b in zip(starts, ends)]
        ax.set_yticks(mids, [labels[a] for a in starts])
        ax.set_xticks(mids, [labels[a] for a in starts], rotation=60, ha="right")
        ax.set_title("Query-query correlation of influence scores (ordered by kind and task)")
        _save(fig, path)


def fig_correlation_groups(path: Path, s: dict) -> None:
    c = s["correlations"]
    rows = [(f"within {t}", d) for t, d in c["within_task"].items()]
    rows += [(f"pairs {k}", d) for k, d in c["kind_pairs"].items()]
    rows = [(n, d) for n, d in rows if d["n"]]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(7, 0.3 * max(len(rows), 3) + 1))
        ax = fig.add_subplot()
        if not rows:
            ax.text(0.5, 0.5, "no query pairs", ha="center", va="center")
        else:
            y = np.arange(len(rows))
            means = [d["mean"] for _, d in rows]
            stds = [d["std"] or 0.0 for _, d in rows]
            ax.barh(y, means, xerr=stds, color="#8fb3d9", ecolor="k", capsize=2)
            ax.set_yticks(y, [lab(n) for n, _ in rows])
            ax.invert_yaxis()
            ax.axvline(0, color="k", lw=0.6)
        ax.set_xlabel("mean Pearson correlation of query pairs (+/- std)")
        ax.set_title("Correlations by group")
        _save(fig, path)


def fig_concentration(path: Path, s: dict) -> None:
    cs = s["concentration"]
    fr = np.asarray(cs["fractions"]) * 100
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(9, 3.6))
        for j, side in enumerate(("positive", "negative")):
            ax = fig.add_subplot(1, 2, j + 1)
            for kind in present_kinds(s["queries"]["kind"]):
                means = [cs["by_kind"][side][f][kind]["mean"] for f in cs["fractions"]]
                sd = [cs["by_kind"][side][f][kind]["std"] or 0.0 for f in cs["fractions"]]
                m = np.asarray([np.nan if v is None else v for v in means])
                ax.errorbar(fr, m, yerr=sd, marker="o", capsize=2, label=kind, color=KIND_COLORS[kind])
            ax.set_xscale("log")
            ax.set_xticks(fr, [f"{x:g}%" for x in fr])
            ax.minorticks_off()
            ax.set_xlabel("top documents (% of corpus)" if side == "positive" else "bottom documents (% of corpus)")
            ax.set_ylabel(f"share of total {side} influence")
            ax.set_title(f"{side.capitalize()} influence held by the {'top' if side == 'positive' else 'bottom'} documents")
            ax.legend()
        _save(fig, path)


def fig_per_nat(path: Path, s: dict) -> None:
    pn = s["concentration"]["per_nat"]
    kinds = s["queries"]["kind"]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(6, 3.6))
        ax = fig.add_subplot()
        ks = present_kinds(kinds)
        data = [[p["absolute"] for p, k in zip(pn["per_query"], kinds) if k == kind and p] for kind in ks]
        for i, (kind, d) in enumerate(zip(ks, data)):
            x: np.ndarray | list = np.full(len(d), i) + np.linspace(-0.15, 0.15, len(d)) if d else []
            ax.scatter(x, d, s=10, color=KIND_COLORS[kind])
            if d:
                ax.hlines(np.median(d), i - 0.3, i + 0.3, color="k")
        ax.set_xticks(range(len(ks)), ks)
        if any(v > 0 for d in data for v in d):
            ax.set_yscale("log")
        ax.set_ylabel("sum |influence| / completion NLL (per nat)")
        ax.set_title("Total absolute influence per nat of query information (bar: median)")
        _save(fig, path)


def fig_powerlaw(path: Path, s: dict, ranked_pos: list[np.ndarray]) -> None:
    p = s["powerlaw"]["positive"]
    kinds = s["queries"]["kind"]
    tasks = s["queries"]["task"]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(10, 3.8))
        ax = fig.add_subplot(1, 2, 1)
        shown = set()
        for q, (k, t) in enumerate(zip(kinds, tasks)):
            key = (k, t)
            if key in shown or len(ranked_pos[q]) < 3:
                continue
            shown.add(key)
            v = ranked_pos[q]
            r = np.arange(1, len(v) + 1)
            line = ax.loglog(r, v, lw=1, color=KIND_COLORS[k], alpha=0.8, label=lab(f"{t or '(none)'} ({s['queries']['ids'][q]})"))
            fit = p["per_query"][q]["loglog"]
            if fit["slope"] is not None:
                ax.loglog(r, 10 ** fit["intercept"] * r ** fit["slope"], ls="--", lw=0.8, color=line[0].get_color())
        if not shown:
            ax.text(0.5, 0.5, "fewer than 3 positive scores", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=7)
        ax.set_xlabel("rank")
        ax.set_ylabel("influence score")
        ax.set_title("Ranked positive scores, first query of each task (dashed: log-log fit)")
        ax2 = fig.add_subplot(1, 2, 2)
        ks = present_kinds(kinds)
        for i, kind in enumerate(ks):
            vals = [pq["loglog"]["slope"] for pq, k in zip(p["per_query"], kinds) if k == kind]
            vals = [v for v in vals if v is not None]
            if vals:
                ax2.scatter(i + np.linspace(-0.15, 0.15, len(vals)), vals, s=10, color=KIND_COLORS[kind])
                ax2.hlines(np.median(vals), i - 0.3, i + 0.3, color="k")
        ax2.set_xticks(range(len(ks)), ks)
        ax2.set_ylabel("log-log slope of the top scores")
        ax2.set_title("Power-law slope per query (bar: median)")
        _save(fig, path)


def fig_sources(path: Path, s: dict, measure: str = "count") -> None:
    """Mean multiplier (by count or tokens) of each source per kind: lines over k, or bars when there is one k."""
    so = s["sources"]
    kinds = present_kinds(s["queries"]["kind"])
    ks = np.asarray(so["ks"])
    names = so["sources"]
    cmap = matplotlib.colormaps["tab10"]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(3.2 * len(kinds) + 2, 6), layout="constrained")
        axes = fig.subplots(2, len(kinds), squeeze=False, sharey="row")
        for i, side in enumerate(("top", "bottom")):
            for j, kind in enumerate(kinds):
                ax = axes[i][j]
                mean = np.asarray(so["by_kind"][side][measure][kind]["mean"], np.float64)  # [K, S]
                if ks.size > 1:
                    for si, name in enumerate(names):
                        ax.plot(ks, mean[:, si], marker="o", ms=3, color=cmap(si % 10), label=lab(name))
                    ax.set_xscale("log")
                    ax.set_xlabel("k")
                else:
                    ax.bar(np.arange(len(names)), mean[0], color=[cmap(si % 10) for si in range(len(names))],
                           label=[lab(n) for n in names])
                    ax.set_xticks(np.arange(len(names)), [lab(n) for n in names], rotation=60, ha="right")
                ax.axhline(1, color="k", lw=0.6, ls=":")
                ax.set_title(lab(f"{kind}: {side}-{ks[0] if ks.size == 1 else 'k'}"))
                if j == 0:
                    ax.set_ylabel(f"multiplier vs corpus share (by {measure})")
        if ks.size > 1:
            axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
        _save(fig, path)


def fig_answers(path: Path, s: dict) -> None:
    a = s["answers"]
    kinds = [k for k in present_kinds(s["queries"]["kind"]) if k in a["share_found_any_by_kind"]]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(8, 3.5))
        for j, key in enumerate(("share_found_any_by_kind", "share_found_all_by_kind")):
            ax = fig.add_subplot(1, 2, j + 1)
            w = 0.8 / max(len(a["ks"]), 1)
            for i, k in enumerate(a["ks"]):
                vals = [a[key][kind][i] for kind in kinds]
                vals = [np.nan if v is None else v for v in vals]
                ax.bar(np.arange(len(kinds)) + (i - (len(a["ks"]) - 1) / 2) * w, vals, width=w, label=f"top {k}")
            ax.set_xticks(range(len(kinds)), [lab(k) for k in kinds])
            ax.set_ylim(0, 1)
            ax.set_ylabel("share of queries")
            ax.set_title("any answer item found" if j == 0 else "every answer item found")
            ax.legend(fontsize=7)
        _save(fig, path)


def fig_layers(path: Path, s: dict) -> None:
    la = s["layers"]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(8, 3.5))
        ax = fig.add_subplot()
        x = np.arange(len(la["names"]))
        bins = np.asarray(la["bins"])
        for b, shade in zip(BINS, ("#f2f2f2", "#e0e0e0", "#f2f2f2")):
            idx = np.flatnonzero(bins == b)
            if idx.size:
                ax.axvspan(idx.min() - 0.5, idx.max() + 0.5, color=shade, zorder=0)
                ax.text((idx.min() + idx.max()) / 2, 1.0, b, ha="center", va="top", transform=ax.get_xaxis_transform())
        for kind, m in la["mean_share_by_kind"].items():
            ax.plot(x, m, marker="o", ms=3, color=KIND_COLORS[kind], label=kind)
        ax.set_xlabel("tracked layer (model order)")
        ax.set_ylabel("share of |influence| of the top documents")
        ax.set_title("Influence by layer")
        ax.legend()
        _save(fig, path)


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


def _highlight(texts: list[str], scores: np.ndarray, top: list[dict], window: int = 60) -> str:
    """The document's tokens around its top tokens, top tokens in <mark> (each token escaped)."""
    marks = {t["position"] for t in top}
    keep: set[int] = set()
    for p in marks:
        keep.update(range(max(0, p - window // 2), min(len(texts), p + window // 2)))
    out, prev = [], -2
    for i in sorted(keep):
        if i != prev + 1:
            out.append(" \u2026 ")
        tok = esc(texts[i])
        out.append(f'<mark title="{fmt(scores[i])}">{tok}</mark>' if i in marks else tok)
        prev = i
    return "".join(out)


def write_report(out: Path, s: dict, queries, rows, fetched, texts, docs, o) -> None:
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

    parts = [_head(s), _notes(s), _sec_findings(s), _sec_queries(s, queries, rows, fetched, texts, docs, o),
             _sec_correlations(s), _sec_concentration(s), _sec_powerlaw(s), _sec_sources(s), _sec_answers(s),
             _sec_layers_tokens(s, queries)]   # each query's documents first: what a reader opens the report for
    (out / "index.html").write_text("".join(parts) + "</main></body></html>\n", encoding="utf-8")
    (out / "summary.md").write_text(summary_markdown(s), encoding="utf-8")


def _head(s: dict) -> str:
    css = ("body{font-family:sans-serif;margin:0;background:#fafafa;color:#222}main{max-width:1100px;margin:auto;"
           "padding:1em 2em}table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em}"
           "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}th{background:#eee}"
           "figure{margin:1em 0}img{max-width:100%}.notes{background:#fff4d6;border:1px solid #e6c35c;padding:.5em 1em}"
           "details{background:#fff;border:1px solid #ddd;margin:.3em 0;padding:.3em .6em}"
           "summary{cursor:pointer}.doc{font-family:monospace;font-size:.8em;white-space:pre-wrap;max-width:60em}"
           "mark{background:#ffd54f}code{background:#eee;padding:0 .2em}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>jaxinf analysis</title><style>{css}</style></head><body><main>"
            f"<h1>Influence analysis</h1><p>Run directory <code>{esc(s['run_dir'])}</code>: "
            f"{s['n_queries']} queries &times; {s['n_documents']} documents. Every number is in "
            f"<code>summary.json</code>; a short version is in <a href=\"summary.md\">summary.md</a>. "
            f"Document texts from: {esc(s['text_source'])}.</p>"
            + _table(["kind", "queries"], [[esc(k), fmt(n)] for k, n in s["queries"]["kinds"].items()])
            + _table(["task", "kind", "queries"],
                     [[esc(t), esc(d["kind"]), fmt(d["count"])] for t, d in s["queries"]["tasks"].items()]))


def _notes(s: dict) -> str:
    if not s["notes"]:
        return '<section id="notes"><p>No fallbacks were used and nothing was skipped.</p></section>'
    items = "".join(f"<li>{esc(n)}</li>" for n in s["notes"])
    return f'<section id="notes" class="notes"><h2>Notes and fallbacks</h2><ul>{items}</ul></section>'


def _sec_findings(s: dict) -> str:
    rows = [[esc(f["name"]), esc(f["claim"]), esc(f["statistic"]), esc(f["test"]), esc(fnd.verdict_text(f))]
            for f in s.get("findings", [])]
    return ('<section id="findings"><h2>Findings of Ruis et al. (2024), tested on this run</h2>'
            f"<p>Each finding holds when its effect goes the claimed way at p &lt; {fnd.ALPHA}; "
            "the sections below have the numbers behind it.</p>"
            + _table(["finding", "claim", "measured", "test", "verdict"], rows) + "</section>")


def _sec_correlations(s: dict) -> str:
    c = s["correlations"]
    within = _table(["task", "kind", "pairs", "mean r", "std", "median"],
                    [[esc(t), esc(d["kind"]), *_desc_cells(d)] for t, d in c["within_task"].items()])
    kp = _table(["kinds", "pairs", "mean r", "std", "median"], [[esc(k), *_desc_cells(d)] for k, d in c["kind_pairs"].items()])
    groups = _table(["group", "pairs", "mean r", "std", "median"],
                    [[esc(f"same task, {k}"), *_desc_cells(d)] for k, d in c["within_task_by_kind"].items()]
                    + [[esc(f"different tasks, {k}"), *_desc_cells(d)] for k, d in c["across_tasks_by_kind"].items()]
                    + [["same task, all", *_desc_cells(c["within_task_all"])],
                       ["different tasks, all", *_desc_cells(c["across_tasks_all"])]])
    comp = _table(["comparison", "A", "B", "pairs A", "pairs B", "mean A - mean B", "p"],
                  [[esc(x["name"]), esc(x["group_a"]), esc(x["group_b"]), fmt(x["n_pairs_a"]), fmt(x["n_pairs_b"]),
                    fmt(x["difference"]), fmt(x["p_value"])] for x in c["comparisons"]])
    return ('<section id="correlations"><h2>1. Query-query correlations</h2>'
            "<p>Pearson correlation of the score vectors of every pair of queries over all documents.</p>"
            + _figure("correlations.png", "correlation heat map") + "<h3>Within each task</h3>" + within
            + "<h3>By kind</h3>" + kp + groups + "<h3>Differences between groups</h3>"
            + f"<p>Test: {esc(c['test'])}.</p>" + comp + _figure("correlation_groups.png", "correlations by group")
            + "</section>")


def _sec_concentration(s: dict) -> str:
    cs = s["concentration"]
    kinds = present_kinds(s["queries"]["kind"])
    rows = []
    for side in ("positive", "negative"):
        for f, k in zip(cs["fractions"], cs["k"]):
            for kind in kinds:
                d = cs["by_kind"][side][f][kind]
                rows.append([esc(side), f"{100 * f:g}% (k={k})", esc(kind), *_desc_cells(d)])
    html_ = ('<section id="concentration"><h2>2. Concentration of influence</h2>'
             "<p>Share of a query's total positive (negative) influence held by its top (bottom) documents.</p>"
             + (f"<p><b>Caveat:</b> {esc(cs['caveat'])}.</p>" if cs.get("caveat") else "")
             + _figure("concentration.png", "concentration") + _table(["side", "fraction", "kind", "queries", "mean share", "std", "median"], rows))
    if cs["per_nat"] is None:
        html_ += "<p>Per-nat totals: not available (no completion NLL in queries.jsonl).</p>"
    else:
        pn = cs["per_nat"]
        html_ += ("<h3>Influence per nat</h3><p>Total absolute influence divided by the completion's NLL.</p>"
                  + _figure("per_nat.png", "influence per nat")
                  + _table(["kind", "queries", "mean", "std", "median"],
                           [[esc(k), *_desc_cells(d)] for k, d in pn["by_kind"]["absolute"].items()])
                  + _compare_table(pn["compare_kinds"]))
    return html_ + "</section>"


def _compare_table(cmp: list[dict]) -> str:
    if not cmp:
        return ""
    return _table(["kind A", "kind B", "n A", "n B", "median A", "median B", "p (Mann-Whitney)"],
                  [[esc(c["a"]), esc(c["b"]), fmt(c["n_a"]), fmt(c["n_b"]), fmt(c["median_a"]), fmt(c["median_b"]),
                    fmt(c["p_value"])] for c in cmp])


def _sec_powerlaw(s: dict) -> str:
    p = s["powerlaw"]
    out = ['<section id="powerlaw"><h2>3. Power-law tails</h2>'
           f"<p>Fits of each query's top {p['top_n']} scores (positive part): the log-log rank-size slope (OLS, "
           "with its standard error) and a Clauset-style maximum-likelihood exponent alpha with x_min chosen by "
           "the Kolmogorov-Smirnov distance and a bootstrap goodness-of-fit p (a power law is plausible when "
           "p &ge; 0.1). A rank-size slope b corresponds to alpha &asymp; 1 - 1/b.</p>",
           _figure("powerlaw.png", "power laws")]
    for side in ("positive", "negative"):
        d = p[side]
        rows = [[esc(k), *_desc_cells(d["slope_by_kind"][k]), *_desc_cells(d["alpha_by_kind"][k])[1:],
                 fmt(d["plausible_share_by_kind"][k]["share"])] for k in d["slope_by_kind"]]
        out.append(f"<h3>{'Top (positive) scores' if side == 'positive' else 'Bottom (negative) scores, as magnitudes'}</h3>"
                   + _table(["kind", "queries", "mean slope", "std", "median", "mean alpha", "std", "median",
                             "share plausible"], rows)
                   + "<p>Slopes compared between kinds:</p>" + _compare_table(d["compare_slope"]))
    return "".join(out) + "</section>"


def _sec_sources(s: dict) -> str:
    so = s["sources"]
    docs = s["documents"]["sources"]
    corpus = _table(["source", "documents", "share", "tokens", "token share"],
                    [[esc(n), fmt(d["count"]), fmt(d["share_count"]), fmt(d.get("tokens")), fmt(d.get("share_tokens"))]
                     for n, d in docs.items()])
    rows = []
    for side in ("top", "bottom"):
        for measure, by in so["by_kind"][side].items():
            for kind, d in by.items():
                mean = np.asarray(d["mean"])
                for i, k in enumerate(so["ks"]):
                    rows.append([esc(side), esc(measure), esc(kind), fmt(k)] + [fmt(v) for v in mean[i]])
    return ('<section id="sources"><h2>4. Data sources of the top and bottom documents</h2>'
            "<p>Multiplier = share of a source among a query's top-k (bottom-k) documents divided by its share of "
            "the corpus, by document count and by tokens, averaged over the queries of a kind (1 = as in the corpus).</p>"
            + corpus + _figure("sources.png", "sources by count")
            + (_figure("sources_tokens.png", "sources by tokens") if so["by_tokens"] else
               "<p>By tokens: not available (documents without token counts).</p>")
            + _table(["side", "by", "kind", "k", *[esc(n) for n in so["sources"]]], rows) + "</section>")


def _sec_answers(s: dict) -> str:
    a = s["answers"]
    if not a.get("available"):
        return f'<section id="answers"><h2>5. Answers in the top documents</h2><p>Not available: {esc(a.get("reason"))}.</p></section>'
    rows = []
    for kind in a["share_found_any_by_kind"]:
        for i, k in enumerate(a["ks"]):
            rows.append([esc(kind), fmt(k), fmt(a["share_found_any_by_kind"][kind][i]),
                         fmt(a["share_found_all_by_kind"][kind][i]), fmt(a["mean_recall_by_kind"][kind][i])])
    return ('<section id="answers"><h2>5. Answers in the top documents</h2>'
            "<p>Answer items: the query's <code>answer</code> field, else numbers and key phrases of the completion "
            "(reasoning queries: the result of each step and the final answer). An item is found when it occurs in "
            "one of the query's top-k documents.</p>" + _figure("answers.png", "answers")
            + _table(["kind", "k", "share with any item found", "share with every item found", "mean share of items found"], rows)
            + "</section>")


def _sec_layers_tokens(s: dict, queries) -> str:
    out = ['<section id="layers"><h2>6. Layers and tokens</h2>']
    la = s["layers"]
    if not la.get("available"):
        out.append(f"<p>Layers: {esc(la['reason'])}.</p>")
    else:
        out.append(f"<p>Share of the absolute influence of each query's top {la['top_k']} documents coming from "
                   f"each layer; layers binned by block number ({esc(la['block_rule'])}) into lower, middle and "
                   f"upper thirds. Per-layer sums match scores.npy to a relative "
                   f"{fmt(la['sum_check_max_relative_difference'])}.</p>"
                   + _figure("layers.png", "layers")
                   + _table(["bin", "kind", "queries", "mean share", "std", "median"],
                            [[esc(b), esc(k), *_desc_cells(d)] for b in BINS for k, d in la["bin_share_by_kind"][b].items()]))
    to = s["tokens"]
    if not to.get("available"):
        out.append(f"<p>Tokens: {esc(to['reason'])}.</p>")
    else:
        out.append(f"<p>Tokens with the largest per-token influence in each top document (highlighted; hover for "
                   f"the score). Per-token sums match scores.npy to a relative {fmt(to['sum_check_max_relative_difference'])}.</p>")
        rows = []
        for e in to["records"]:
            tops = ", ".join(f"<code>{esc(t['text'])}</code> ({fmt(t['score'])})" for t in e["top_tokens"])
            rows.append([esc(e["query"]), esc(e["document"]), fmt(e["rank"]), fmt(e["score"]), tops,
                         f'<div class="doc">{_highlight(e["_texts"], e["_scores"], e["top_tokens"])}</div>'])
        out.append(_table(["query", "document", "rank", "score", "top tokens", "context"], rows))
    return "".join(out) + "</section>"


OPEN_QUERIES = 40
"""Reports with at most this many queries show every query's documents expanded."""


def _sec_queries(s, queries, rows, fetched, texts, docs, o) -> str:
    ans = {p["query"]: p for p in s["answers"].get("per_query", [])} if s["answers"].get("available") else {}
    out = ['<section id="queries"><h2>Queries and their top and bottom documents</h2>'
           "<p>One collapsible entry per query; the browser's find (Ctrl+F) also searches and opens closed ones.</p>"]
    n = o.report_documents
    opened = " open" if len(queries.ids) <= OPEN_QUERIES else ""  # long reports start collapsed
    for q, qid in enumerate(queries.ids):
        a = ans.get(qid)
        items = ""
        if a is not None:
            last = a["by_k"][-1]
            marks = ", ".join(f"{esc(it)} {'&#10003;' if f else '&#10007;'}" for it, f in zip(a["items"], last["found"]))
            items = f"<p>Answer items ({esc(a['rule'])}), found in the top {last['k']}: {marks or '<i>none</i>'}</p>"
        fid = f" (EK-FAC index, predicted correlation {fmt(s['index']['predicted_correlation'][qid])})" if s.get("index") else ""
        body = [f"<details{opened}><summary>[{esc(queries.kinds[q])} / {esc(queries.tasks[q] or '(none)')}] "
                f"<b>{esc(qid)}</b>{fid}: {_snippet(queries.prompts[q], 160)}</summary>"
                f'<p><b>Prompt</b></p><div class="doc">{esc(queries.prompts[q])}</div>'
                f'<p><b>Completion</b></p><div class="doc">{esc(queries.completions[q])}</div>{items}']
        for side, idx, val in (("top", rows.top_idx[q], rows.top_val[q]), ("bottom", rows.bottom_idx[q], rows.bottom_val[q])):
            trs = []
            for rank, (i, v) in enumerate(zip(idx[:n], val[:n]), 1):
                i = int(i)
                trs.append([fmt(rank), esc(fetched[i][0]), esc(docs.source_names[docs.source_codes[i]]), fmt(v),
                            f'<div class="doc">{_snippet(texts.get(i), o.snippet_chars)}</div>'])
            body.append(f"<p><b>{side.capitalize()} {len(trs)}</b></p>" + _table(["rank", "id", "source", "score", "text"], trs))
        body.append("</details>")
        out.append("".join(body))
    return "".join(out) + "</section>"


# ----------------------------------------------------------------------------- markdown


def _md(x) -> str:
    """Text from the run, made inert in markdown: HTML-escaped, table pipes escaped."""
    return esc(x).replace("|", "\\|")


def summary_markdown(s: dict) -> str:
    """A short markdown summary of the headline numbers (document text never appears here;
    names and notes from the run are HTML-escaped)."""
    L = [f"# Influence analysis: {s['n_queries']} queries x {s['n_documents']} documents", ""]
    if s["notes"]:
        L += ["## Notes", ""] + [f"- {_md(n)}" for n in s["notes"]] + [""]
    L += ["## Findings of Ruis et al. (2024), tested on this run", ""]
    for f in s.get("findings", []):
        L.append(f"- **{f['name']}** ({f['claim']}): {fnd.verdict_text(f)}. {f['statistic']}. Test: {f['test']}.")
    c = s["correlations"]
    L += ["", "## Within-task correlations", "", "| task | kind | pairs | mean r | std |", "|---|---|---|---|---|"]
    for t, d in c["within_task"].items():
        L.append(f"| {_md(t)} | {d['kind']} | {d['n']} | {_m(d['mean'])} | {_m(d['std'])} |")
    L += ["", "| comparison | mean A - mean B | p (permutation) |", "|---|---|---|"]
    for x in c["comparisons"]:
        L.append(f"| {x['name']} | {_m(x['difference'])} | {_m(x['p_value'])} |")
    cs = s["concentration"]
    L += ["", "## Concentration (mean share of positive influence)", "",
          "| kind | " + " | ".join(f"top {100 * f:g}%" for f in cs["fractions"]) + " |",
          "|---|" + "---|" * len(cs["fractions"])]
    for kind in present_kinds(s["queries"]["kind"]):
        L.append(f"| {kind} | " + " | ".join(_m(cs["by_kind"]["positive"][f][kind]["mean"]) for f in cs["fractions"]) + " |")
    if cs["per_nat"] is None:
        L += ["", "Per-nat totals: not available (no completion NLL)."]
    else:
        L += ["", "Mean total |influence| per nat: " + ", ".join(
            f"{k} {_m(d['mean'])}" for k, d in cs["per_nat"]["by_kind"]["absolute"].items())]
    p = s["powerlaw"]["positive"]
    L += ["", "## Power-law tails (top scores)", "", "| kind | mean slope | mean alpha | share plausible |", "|---|---|---|---|"]
    for k in p["slope_by_kind"]:
        L.append(f"| {k} | {_m(p['slope_by_kind'][k]['mean'])} | {_m(p['alpha_by_kind'][k]['mean'])} | "
                 f"{_m(p['plausible_share_by_kind'][k]['share'])} |")
    a = s["answers"]
    L += ["", "## Answers in the top documents", ""]
    if not a.get("available"):
        L.append(f"Not available: {a.get('reason')}.")
    else:
        L += ["| kind | " + " | ".join(f"any item, top {k}" for k in a["ks"]) + " |", "|---|" + "---|" * len(a["ks"])]
        for kind, v in a["share_found_any_by_kind"].items():
            L.append(f"| {kind} | " + " | ".join(_m(x) for x in v) + " |")
    L += ["", f"Layers: {'exported' if s['layers'].get('available') else 'not exported'}; "
          f"tokens: {'exported' if s['tokens'].get('available') else 'not exported'}.", ""]
    return "\n".join(L)


def _m(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}"
