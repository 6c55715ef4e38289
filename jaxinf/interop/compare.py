"""``jaxinf compare``: a kronfluence analysis against a jaxinf run, stage by stage, layer by layer, query by query.

Factors (each layer, kronfluence's module name = jaxinf's per-layer name):

- covariance: ``A = sum a a^T / N_tok``, ``S = sum g g^T / N_tok`` and the token counts;
- eigen: ``e_A``, ``e_S``, and ``Q_A``, ``Q_S`` with each column's sign aligned
  (an eigenvector is defined up to its sign; a cluster of nearly equal
  eigenvalues leaves even the span ill-determined, so large eigenvector errors
  there with small eigenvalue and Lambda errors are expected);
- lambda: ``Lambda`` (kronfluence's sum divided by its count; the diagonal
  strategy's ``sum G^2 / N_seq`` or EK-FAC's corrected eigenvalues).

Each is reported as the relative error ``||jaxinf - kronfluence||_F / ||kronfluence||_F``.

Scores: the relative error of the whole ``[queries, documents]`` matrix and,
per query, the Pearson and Spearman correlations of the two rows and the
overlap of their top-k documents (the share of kronfluence's k most positive
documents that are also among jaxinf's k most positive); self-influence: relative
error and correlations. The run's exports are compared: ``scores.npy`` (float32;
divided by the completion NLL when the run normalizes ``per_nat``, and
kronfluence's scores are divided the same way) and ``self_influence.npy``.
Rows and columns must be in the same order on both sides (queries in query-file
order, documents in document-file order).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxinf.analysis.correlations import pearson, spearman, topk_overlap
from jaxinf.atomic import ArrayFileError, load_npy
from jaxinf.errors import missing
from jaxinf.interop import kronfluence as kf
from jaxinf.interop import transfer
from jaxinf.interop.kronfluence import InteropError
from jaxinf.run.exports.formats import read_exported_queries


def rel_error(x: np.ndarray, ref: np.ndarray) -> float:
    """``||x - ref||_F / ||ref||_F`` (0 when both are zero; inf when only ``ref`` is)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    num, den = float(np.linalg.norm(x - ref)), float(np.linalg.norm(ref))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def aligned_columns(Q: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``Q`` with each column's sign flipped to point the way of ``ref``'s."""
    sign = np.sign(np.sum(np.asarray(Q, np.float64) * np.asarray(ref, np.float64), axis=0))
    sign[sign == 0] = 1.0
    return Q * sign


# --------------------------------------------------------------------------- the comparison


def _factor_rows(factors: kf.Factors, run: transfer.RunFactors) -> dict:
    layers = run.layers
    transfer.check_modules(factors, layers, f"the run {run.root}")
    unordered = transfer.layer_index(layers)
    index = {name: unordered[name] for name in factors.modules}  # kronfluence's module order
    out: dict[str, dict] = {}
    groups = factors.groups
    if "covariance" in groups and run.covariance is not None:
        c = run.covariance
        A, S = transfer.per_layer(c.A, layers), transfer.per_layer(c.S, layers)
        counts = transfer.per_layer(c.count, layers)
        rows = {}
        for name in index:
            n = float(counts[name])
            rows[name] = {
                "A": rel_error(A[name] / max(n, 1), factors.A(name)),
                "S": rel_error(S[name] / max(n, 1), factors.S(name)),
                "tokens": [factors.count("num_activation_covariance_processed", name), int(round(n))],
            }
        out["covariance"] = rows
    if "eigen" in groups and run.eigen is not None:
        e, t = run.eigen, factors.tensors
        QA, eA = transfer.per_layer(e.Q_A, layers), transfer.per_layer(e.e_A, layers)
        QS, eS = transfer.per_layer(e.Q_S, layers), transfer.per_layer(e.e_S, layers)
        rows = {}
        for name in index:
            rA, rS = t["activation_eigenvectors"][name], t["gradient_eigenvectors"][name]
            rows[name] = {
                "e_A": rel_error(eA[name], t["activation_eigenvalues"][name]),
                "e_S": rel_error(eS[name], t["gradient_eigenvalues"][name]),
                "Q_A": rel_error(aligned_columns(QA[name], rA), rA),
                "Q_S": rel_error(aligned_columns(QS[name], rS), rS),
            }
        out["eigen"] = rows
    if "lambda" in groups and run.Lambda is not None:
        L = transfer.per_layer(run.Lambda, layers)
        out["lambda"] = {name: {"Lambda": rel_error(L[name], factors.Lambda(name))} for name in index}
    return out


def _load_npy(path: Path) -> np.ndarray:
    if not path.exists():
        why = missing(path)
        raise InteropError(f"{path}: {why}{' (has the run finished its exports?)' if why == 'file is missing' else ''}")
    try:
        return load_npy(path)
    except ArrayFileError as e:  # cut short, or not a .npy file: a damaged export
        raise InteropError(str(e)) from None


def _query_info(run_dir: Path) -> tuple[list[str], np.ndarray | None]:
    """The ids and completion losses of the run's exported queries.jsonl, read as jaxinf analyze reads it (a damaged
    line is one error naming it); no ids and None without the file."""
    path = run_dir / "queries.jsonl"
    if not path.exists():
        return [], None
    queries = read_exported_queries(path)
    return queries.ids, queries.loss


def _score_rows(scores: kf.Scores, run: transfer.RunFactors, topk: int, notes: list[str]) -> dict:
    out: dict[str, dict] = {}
    ids, losses = _query_info(run.root)
    if scores.pairwise is not None:
        mine = _load_npy(run.root / "scores.npy").astype(np.float64)
        ref = scores.pairwise
        if mine.shape != ref.shape:
            raise InteropError(
                f"{scores.directory / kf.PAIRWISE}: scores of shape {ref.shape} (queries, documents), "
                f"but {run.root / 'scores.npy'} has {mine.shape}"
            )
        if run.config.scores.normalize == "per_nat":
            if losses is None or len(losses) != ref.shape[0]:
                raise InteropError(f"{run.root / 'queries.jsonl'}: needed for per-nat scores (scores.normalize)")
            ref = ref / losses[:, None]
            notes.append("the run's scores are per nat; kronfluence's are divided by the same completion NLLs")
        queries: list[dict[str, Any]] = []
        for q in range(ref.shape[0]):
            queries.append(
                {
                    "query": ids[q] if q < len(ids) else str(q),
                    "pearson": pearson(mine[q], ref[q]),
                    "spearman": spearman(mine[q], ref[q]),
                    "topk_overlap": topk_overlap(mine[q], ref[q], topk),
                    "rel_error": rel_error(mine[q], ref[q]),
                }
            )
        out["scores"] = {
            "rel_error": rel_error(mine, ref),
            "max_abs_error": float(np.max(np.abs(mine - ref))) if ref.size else 0.0,
            "min_pearson": min((r["pearson"] for r in queries), default=math.nan),
            "min_spearman": min((r["spearman"] for r in queries), default=math.nan),
            "mean_topk_overlap": float(np.mean([r["topk_overlap"] for r in queries])) if queries else math.nan,
            "topk": topk,
            "queries": queries,
        }
    if scores.self_influence is not None:
        path = run.root / "self_influence.npy"
        if not path.exists():
            notes.append(f"{path} is missing (run with scores.self_influence: true); self-influence not compared")
        else:
            mine = _load_npy(path).astype(np.float64)
            ref = scores.self_influence
            if mine.shape != ref.shape:
                raise InteropError(
                    f"{scores.directory / kf.SELF}: {ref.shape[0]} self-influence scores, but "
                    f"{path} has {mine.shape[0]}"
                )
            out["self_influence"] = {
                "rel_error": rel_error(mine, ref),
                "pearson": pearson(mine, ref),
                "spearman": spearman(mine, ref),
            }
    return out


def compare(
    kronfluence_dir: str | Path,
    run_dir: str | Path,
    *,
    factors: str | None = None,
    scores: str | list[str] | None = None,
    topk: int = 10,
) -> dict:
    """The comparison report (a JSON-able dict; see the module docstring)."""
    dirs = kf.locate(kronfluence_dir, factors=factors, scores=scores)
    run = transfer.load_run(run_dir)
    notes: list[str] = []
    named = lambda p: str(p) if p is not None else None  # noqa: E731
    report: dict = {
        "kronfluence": {
            "factors": named(dirs.factors),
            "pairwise": named(dirs.pairwise),
            "self_scores": named(dirs.self_scores),
        },
        "run": str(Path(run_dir)),
        "strategy": run.strategy.name,
        "stages": {},
        "notes": notes,
    }
    if dirs.factors is not None:
        fac = kf.read_factors(dirs.factors, groups=("covariance", "eigen", "lambda"))
        transfer.check_strategy(dirs.factors / kf.FACTOR_ARGUMENTS, fac.arguments, run.config, f"the run {run.root}")
        if fac.fisher != run.config.factors.fisher:
            notes.append(f"kronfluence used the {fac.fisher} Fisher, the run the {run.config.factors.fisher} one")
        elif fac.fisher == "sampled":
            notes.append(
                "both sides sample labels from the model (different draws): S, Lambda and the scores "
                "agree only up to sampling noise, A exactly"
            )
        report["stages"].update(_factor_rows(fac, run))
        for stage in ("covariance", "eigen", "lambda"):
            if stage in fac.groups and stage not in report["stages"]:
                notes.append(f"the run has no {stage} results to compare")
    for directory, kind in ((dirs.pairwise, "pairwise"), (dirs.self_scores, "self")):
        if directory is None:
            continue
        if (directory / kf.FACTOR_ARGUMENTS).exists():
            transfer.check_strategy(
                directory / kf.FACTOR_ARGUMENTS,
                kf.read_json(directory / kf.FACTOR_ARGUMENTS),
                run.config,
                f"the run {run.root}",
            )
        sc = kf.read_scores(directory)
        if kind == "pairwise":
            sc.self_influence = None
        else:
            sc.pairwise = None
        report["stages"].update(_score_rows(sc, run, topk, notes))
    if not report["stages"]:
        raise InteropError(f"{kronfluence_dir}: nothing to compare with {run_dir} (no factors or scores on both sides)")
    report["max_rel_error"] = _maxima(report["stages"])
    return report


def _maxima(stages: dict) -> dict:
    """Per stage and quantity, the largest relative error over layers."""
    out = {}
    for stage, rows in stages.items():
        if stage in ("scores", "self_influence"):
            out[stage] = rows["rel_error"]
            continue
        for values in rows.values():
            for q, v in values.items():
                if q != "tokens":
                    key = f"{stage}.{q}"
                    out[key] = max(out.get(key, 0.0), v)
    return out


# --------------------------------------------------------------------------- the table


def _fmt(x) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.4f}"
    return str(x)


def format_table(report: dict) -> str:
    """The report as plain-text tables: factors by layer, then scores by query."""
    k = report["kronfluence"]
    lines = [
        f"kronfluence: factors {k['factors'] or '-'}, pairwise scores {k['pairwise'] or '-'}, "
        f"self-influence {k['self_scores'] or '-'}",
        f"jaxinf run:  {report['run']} (strategy {report['strategy']})",
        "",
    ]
    stages = report["stages"]
    flagged = False
    for stage in ("covariance", "eigen", "lambda"):
        if stage not in stages:
            continue
        flagged |= any(v[0] != v[1] for values in stages[stage].values() for q, v in values.items() if q == "tokens")
        rows = stages[stage]
        quantities = list(next(iter(rows.values())))
        width = max(len(n) for n in rows)
        head = "".join(f" {'N_tok (kf, jaxinf)' if q == 'tokens' else q + ' rel. err':>18}" for q in quantities)
        lines.append(f"{stage}: {'layer':<{width}}{head}")
        for name, values in rows.items():
            cells = []
            for q in quantities:
                v = values[q]
                cells.append(
                    f" {f'{v[0]}, {v[1]}' + ('' if v[0] == v[1] else ' (!)'):>18}"
                    if q == "tokens"
                    else f" {_fmt(v):>18}"
                )
            lines.append(f"{' ' * len(stage)}  {name:<{width}}{''.join(cells)}")
        lines.append("")
    if "scores" in stages:
        s = stages["scores"]
        lines.append(
            f"scores: rel. error {_fmt(s['rel_error'])}, max |diff| {_fmt(s['max_abs_error'])}, "
            f"min Pearson {_fmt(s['min_pearson'])}, min Spearman {_fmt(s['min_spearman'])}, "
            f"mean top-{s['topk']} overlap {_fmt(s['mean_topk_overlap'])}"
        )
        lines.append(f"{'query':<24} {'Pearson':>9} {'Spearman':>9} {'top-' + str(s['topk']):>7} {'rel. error':>11}")
        for r in s["queries"]:
            lines.append(
                f"{r['query'][:24]:<24} {_fmt(r['pearson']):>9} {_fmt(r['spearman']):>9} "
                f"{_fmt(r['topk_overlap']):>7} {_fmt(r['rel_error']):>11}"
            )
        lines.append("")
    if "self_influence" in stages:
        s = stages["self_influence"]
        lines.append(
            f"self-influence: rel. error {_fmt(s['rel_error'])}, Pearson {_fmt(s['pearson'])}, "
            f"Spearman {_fmt(s['spearman'])}"
        )
        lines.append("")
    if flagged:
        lines.append(
            "note: (!) marks a layer whose token counts differ: the two fits saw different tokens (other "
            "documents, data.max_length, factors.max_documents or tokenizer), so their factors are not "
            "expected to agree"
        )
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines).rstrip() + "\n"
