"""The report's figures: one PNG per section of ``report/index.html`` (:mod:`jaxinf.analysis.report`), drawn with
matplotlib's object API (no pyplot state). Labels that come from the run pass through :func:`lab`, so ``$`` in a
name is just a dollar (never matplotlib math text).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from jaxinf.analysis.groups import present_kinds
from jaxinf.analysis.layers import BINS

KIND_COLORS = {"factual": "#1f77b4", "reasoning": "#d62728", "control": "#7f7f7f", "unknown": "#9467bd"}
RC: dict[matplotlib.typing.RcKeyType, float] = {"font.size": 9, "axes.titlesize": 10}  # what rc_context takes


def lab(x) -> str:
    """A figure label from run data: ``$`` escaped so matplotlib never parses it as math text."""
    return ("" if x is None else str(x)).replace("$", r"\$")


def _save(fig: Figure, path: Path) -> None:
    import warnings

    with warnings.catch_warnings():  # a label with a character the font lacks (an emoji in a query id) shows as a box
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from (current )?font", category=UserWarning)
        try:
            fig.savefig(path, dpi=110, bbox_inches="tight")
        except OSError as e:  # PIL's failed write names no file ("a write: no space left"): name the figure
            if e.filename is None:
                raise OSError(e.errno, e.strerror, str(path)) from e
            raise


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
            ax.set_title(
                f"{side.capitalize()} influence held by the {'top' if side == 'positive' else 'bottom'} documents"
            )
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
            line = ax.loglog(
                r, v, lw=1, color=KIND_COLORS[k], alpha=0.8, label=lab(f"{t or '(none)'} ({s['queries']['ids'][q]})")
            )
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
                    ax.bar(
                        np.arange(len(names)),
                        mean[0],
                        color=[cmap(si % 10) for si in range(len(names))],
                        label=[lab(n) for n in names],
                    )
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
