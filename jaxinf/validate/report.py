"""``DIR/report/index.html`` of ``jaxinf validate``: LDS by strategy and damping, predicted vs actual per strategy.

Static, with the run report's escaping (:mod:`jaxinf.analysis.report`) but not
its search box: no script, a Content-Security-Policy that forbids scripts, every
text from the inputs through ``esc`` and every figure label through ``lab``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from jaxinf.analysis.figures import RC, _save, lab
from jaxinf.analysis.report import CSP, _figure, _table, esc, fmt
from jaxinf.atomic import write_atomic
from jaxinf.validate.index import METHODS


def standardize(x: np.ndarray) -> np.ndarray:
    """Each column (query) of ``x`` ``[M, Q]`` to zero mean and unit variance over subsets (constant columns: 0)."""
    sd = x.std(0)
    return (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)


def fig_lds(path: Path, result: dict) -> None:
    """Bars: mean LDS of each strategy at each damping, with the 95% interval (bootstrap over subsets)."""
    by = result["lds_by_damping"]
    strategies = list(by)
    labels = sorted({d for s in by.values() for d in s}, key=lambda d: (d != "heuristic", d))
    width = 0.8 / max(1, len(labels))
    cmap = matplotlib.colormaps["tab10"]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(1.6 + 1.3 * len(strategies), 3.2))
        ax = fig.add_subplot()
        for j, d in enumerate(labels):
            xs, ys, err = [], [], []
            for i, s in enumerate(strategies):
                if d in by[s] and by[s][d]["mean"] is not None:
                    e = by[s][d]
                    xs.append(i + (j - (len(labels) - 1) / 2) * width)
                    ys.append(e["mean"])
                    lo, hi = e["ci95"]
                    err.append([e["mean"] - lo if lo is not None else 0, hi - e["mean"] if hi is not None else 0])
            if xs:
                ax.bar(xs, ys, width, yerr=np.asarray(err).T, color=cmap(j), label=lab(f"damping {d}"), capsize=2)
        ax.set_xticks(range(len(strategies)), [lab(s) for s in strategies])
        ax.axhline(0, color="black", lw=0.6)
        ax.set_ylabel("LDS (mean Spearman over queries)")
        ax.legend(fontsize=7)
        _save(fig, path)


def fig_scatter(path: Path, strategy: str, predicted: np.ndarray, actual: np.ndarray) -> None:
    """Every (subset, query): predicted group influence vs actual log-probability, both standardized per query."""
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(3.2, 3.0))
        ax = fig.add_subplot()
        ax.scatter(standardize(predicted).ravel(), standardize(actual).ravel(), s=4, alpha=0.5)
        ax.set_title(lab(strategy))
        ax.set_xlabel("predicted (sum of scores), z per query")
        ax.set_ylabel("actual log-prob, z per query")
        _save(fig, path)


def write(out: Path, result: dict, predicted: dict[str, np.ndarray], actual: np.ndarray) -> None:
    """The page and its figures; ``predicted[strategy]`` and ``actual`` are ``[M, Q]``."""
    out.mkdir(parents=True, exist_ok=True)
    fig_lds(out / "lds.png", result)
    for i, s in enumerate(predicted):
        fig_scatter(out / f"scatter_{i}.png", s, predicted[s], actual)
    rows = []
    for s, e in result["lds"].items():
        rec = result["recall"][s]
        rows.append(
            [
                esc(s),
                fmt(e["mean"]),
                f"[{fmt(e['ci95'][0])}, {fmt(e['ci95'][1])}]",
                f"[{fmt(e['ci95_queries'][0])}, {fmt(e['ci95_queries'][1])}]",
                fmt(rec["mrr"]),
            ]
            + [fmt(x) for x in rec["recall_at"].values()]
            + [fmt(result["pbrf"].get(s))]
        )
    ks = next(iter(result["recall"].values()))["recall_at"]
    header = (
        ["strategy", "LDS", "95% CI (bootstrap over subsets)", "95% CI (t over queries)", "MRR"]
        + [f"Recall@{esc(k)}" for k in ks]
        + ["PBRF r"]
    )
    by_damping = [
        [esc(s), esc(d), fmt(e["mean"]), f"[{fmt(e['ci95'][0])}, {fmt(e['ci95'][1])}]"]
        for s, ds in result["lds_by_damping"].items()
        for d, e in ds.items()
    ]
    proc = result["procedure"]
    fidelity = _fidelity_section(result.get("index_fidelity"))
    scatters = "".join(_figure(f"scatter_{i}.png", f"predicted vs actual, {s}") for i, s in enumerate(predicted))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>jaxinf validate</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 8px;text-align:right}}
figure{{display:inline-block;margin:4px}}</style></head><body>
<h1>Validation of the influence scores</h1>
<p>{esc(result["world"])}. {fmt(result["subsets"])} subsets of {fmt(result["fraction"])} of the
{fmt(result["documents"])} documents, {fmt(result["seeds"])} seed(s) each; training from {esc(proc["from"])},
{fmt(proc["steps"])} steps of {esc(proc["optimizer"])}, learning rate {fmt(proc["learning_rate"])}, batch
{fmt(proc["batch_size"])}. Retraining protocol: steps {esc(proc["subset_steps"])} ({fmt(proc["retraining_steps"])}
steps per retraining), initialization {esc(proc["subset_init"])} (each retraining starts from
{esc(proc["retraining_start"])}). The LDS's 95% interval is a percentile bootstrap over the subsets
({fmt(result["bootstrap"]["resamples"])} resamples). Damping of the summary: {esc(result["damping"])}.
{fmt(result["seconds"])} s.</p>
<h2>Summary</h2>{_table(header, rows)}
<h2>LDS by strategy and damping</h2>{_figure("lds.png", "LDS by strategy and damping")}
{_table(["strategy", "damping", "LDS", "95% CI (bootstrap over subsets)"], by_damping)}
<h2>Predicted vs actual</h2><p>Each point is one subset and one query: the sum of the subset's scores against
the query's log-probability under the models retrained on the subset, both standardized per query.</p>
{scatters}
{fidelity}
</body></html>
"""
    write_atomic(out / "index.html", page)


def _fidelity_section(fidelity: dict | None) -> str:
    """The index fidelity table (:mod:`jaxinf.validate.index`): each size and method against exact EK-FAC."""
    if not fidelity:
        return ""
    cols = ["pearson", "spearman", "top10", "bottom10", "top100", "bottom100", "predicted"]
    rows = []
    for k, entry in fidelity["table"].items():
        for method in METHODS:
            if method in entry:
                mean, low = entry[method]["mean"], entry[method]["min"]
                rescored = entry[method].get("rescored", {})
                rows.append(
                    [esc(k), fmt(entry["cells"]), esc(method)]
                    + [fmt(mean.get(c)) for c in cols]
                    + [fmt(low.get("pearson"))]
                    + [fmt(rescored.get(t)) for t in ("10", "100")]
                )
    header = [
        "k",
        "cells per document",
        "method",
        "Pearson",
        "Spearman",
        "top-10 overlap",
        "bottom-10 overlap",
        "top-100 overlap",
        "bottom-100 overlap",
        "predicted r",
        "lowest Pearson",
        "rescored to certify the 10 (share)",
        "rescored to certify the 100 (share)",
    ]
    return (
        f"<h2>The EK-FAC index against exact EK-FAC</h2><p>Means over queries of each method's agreement with "
        f"exact EK-FAC (damping {esc(fidelity['damping'])}, cells stored as {esc(fidelity['dtype'])}); the three "
        f"methods store the same cells per document. Tails of at most half the documents. The last columns: the "
        f"share of the documents a run rescores exactly so that every query's top and bottom 10 (100) are EK-FAC's.</p>"
        f"{_table(header, rows)}"
    )
