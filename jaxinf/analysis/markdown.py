"""``report/summary.md``: the summary's findings and tables as markdown, for a terminal or a pull request. Text
from the run is made inert (HTML-escaped, table pipes escaped) as the HTML report escapes it."""

from __future__ import annotations

from jaxinf.analysis import findings as fnd
from jaxinf.analysis import seeds as sd
from jaxinf.analysis.groups import present_kinds
from jaxinf.analysis.report import esc


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
    if s.get("seeds"):
        t = s["seeds"]
        L += ["", f"Over {len(t['seeds'])} training seeds (`seeds.json`):", ""]
        L += [f"- **{a['name']}**: {sd.agreement_text(a)}." for a in t["agreement"]]
    c = s["correlations"]
    L += ["", "## Within-task correlations", "", "| task | kind | pairs | mean r | std |", "|---|---|---|---|---|"]
    for t, d in c["within_task"].items():
        L.append(f"| {_md(t)} | {d['kind']} | {d['n']} | {_m(d['mean'])} | {_m(d['std'])} |")
    L += ["", "| comparison | mean A - mean B | p (permutation) |", "|---|---|---|"]
    for x in c["comparisons"]:
        L.append(f"| {x['name']} | {_m(x['difference'])} | {_m(x['p_value'])} |")
    cs = s["concentration"]
    L += [
        "",
        "## Concentration (mean share of positive influence)",
        "",
        "| kind | " + " | ".join(f"top {100 * f:g}%" for f in cs["fractions"]) + " |",
        "|---|" + "---|" * len(cs["fractions"]),
    ]
    for kind in present_kinds(s["queries"]["kind"]):
        L.append(
            f"| {kind} | " + " | ".join(_m(cs["by_kind"]["positive"][f][kind]["mean"]) for f in cs["fractions"]) + " |"
        )
    if cs["per_nat"] is None:
        L += ["", "Per-nat totals: not available (no completion NLL)."]
    else:
        L += [
            "",
            "Mean total |influence| per nat: "
            + ", ".join(f"{k} {_m(d['mean'])}" for k, d in cs["per_nat"]["by_kind"]["absolute"].items()),
        ]
    p = s["powerlaw"]["positive"]
    L += [
        "",
        "## Power-law tails (top scores)",
        "",
        "| kind | mean slope | mean alpha | share plausible |",
        "|---|---|---|---|",
    ]
    for k in p["slope_by_kind"]:
        L.append(
            f"| {k} | {_m(p['slope_by_kind'][k]['mean'])} | {_m(p['alpha_by_kind'][k]['mean'])} | "
            f"{_m(p['plausible_share_by_kind'][k]['share'])} |"
        )
    a = s["answers"]
    L += ["", "## Answers in the top documents", ""]
    if not a.get("available"):
        L.append(f"Not available: {a.get('reason')}.")
    else:
        L += ["| kind | " + " | ".join(f"any item, top {k}" for k in a["ks"]) + " |", "|---|" + "---|" * len(a["ks"])]
        for kind, v in a["share_found_any_by_kind"].items():
            L.append(f"| {kind} | " + " | ".join(_m(x) for x in v) + " |")
    L += [
        "",
        f"Layers: {'exported' if s['layers'].get('available') else 'not exported'}; "
        f"tokens: {'exported' if s['tokens'].get('available') else 'not exported'}.",
        "",
    ]
    return "\n".join(L)


def _m(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}"
