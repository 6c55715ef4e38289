"""The paper's findings across runs that differ only in the model's training seed (``jaxinf demo --seeds N``).

A verdict on one trained model says little about the recipe that trained it: another seed of the same
corpus and schedule may give another verdict. The table here puts each run's verdict and statistic side by
side and counts how many seeds give each verdict. A run directory holding the table (:data:`FILE`) shows it
in its summary (``seeds``) and report.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from jaxinf.analysis import findings as fnd
from jaxinf.run.exports.formats import AnalysisError

FILE = "seeds.json"

VERDICTS = (True, False, None)
VERDICT_WORDS = {True: "holds", False: "does not hold", None: "not testable"}


def seed_table(runs: list[tuple[int, Path, dict]]) -> dict:
    """The table of ``runs`` (seed, run directory, its summary): for each seed its findings' verdicts
    (``holds``: true, false or None when not testable), p-values and statistics; for each finding the number of
    seeds giving each verdict (``counts``) and the number giving the most common one (``agree``, of ``seeds``)."""
    rows: list[dict[str, Any]] = [
        {
            "seed": seed,
            "run": str(run),
            "findings": [
                {"name": f["name"], "holds": f["holds"], "p_value": f["p_value"], "statistic": f["statistic"]}
                for f in summary.get("findings", [])
            ],
        }
        for seed, run, summary in runs
    ]
    names = [f["name"] for f in rows[0]["findings"]] if rows else []
    agreement = []
    for i, name in enumerate(names):
        counts = Counter(row["findings"][i]["holds"] for row in rows)
        agreement.append(
            {
                "name": name,
                "counts": {VERDICT_WORDS[v]: counts[v] for v in VERDICTS},
                "agree": max(counts.values()),
                "seeds": len(rows),
            }
        )
    return {"seeds": rows, "agreement": agreement}


def agreement_text(a: dict) -> str:
    """One line: how many of the seeds give each verdict, e.g. "holds in 2 of 3 seeds, does not hold in 1"."""
    parts = [f"{word} in {n}" for word, n in a["counts"].items() if n]
    return f"{parts[0]} of {a['seeds']} seeds" + "".join(", " + p for p in parts[1:])


def read_table(run_dir: Path) -> dict | None:
    """The table kept in ``run_dir`` (:data:`FILE`), or None when there is none; a damaged one is an
    :class:`AnalysisError` naming it."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text())
        if (
            not isinstance(table, dict)
            or not isinstance(table["seeds"], list)
            or not isinstance(table["agreement"], list)
        ):
            raise ValueError("not a table of seeds")
    except (OSError, UnicodeDecodeError, ValueError, KeyError) as e:
        raise AnalysisError(
            f"{path}: not a table of the findings over seeds ({type(e).__name__}: {e}); "
            "jaxinf demo --seeds N writes it again"
        ) from None
    return table


def seeds_markdown(table: dict) -> str:
    """The table as markdown: one row per seed with each finding's verdict, then each finding's agreement line
    and every seed's statistic."""
    names = [a["name"] for a in table["agreement"]]
    L = [
        f"# The findings of Ruis et al. (2024) over {len(table['seeds'])} training seeds",
        "",
        "| seed | " + " | ".join(names) + " | run |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for row in table["seeds"]:
        L.append(
            f"| {row['seed']} | "
            + " | ".join(fnd.verdict_text(f) for f in row["findings"])
            + " | "
            + row["run"].replace("|", "\\|")
            + " |"
        )
    L.append("")
    for a in table["agreement"]:
        L.append(f"- **{a['name']}**: {agreement_text(a)}.")
    L.append("")
    for row in table["seeds"]:
        for f in row["findings"]:
            L.append(f"- seed {row['seed']}, {f['name']}: {f['statistic']}")
    return "\n".join(L) + "\n"
