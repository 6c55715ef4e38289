"""Convert the released data of Ruis et al. (2024) into a run directory.

The release (``release_7B.json`` / ``release_35B.json``) holds 100 queries and 80 hand-picked
documents with their EK-FAC influence (``influences_dot``). The converter writes
``scores.npy`` (from ``influences_dot``), ``queries.jsonl`` (kinds and tasks from the index
layout below), ``documents.jsonl`` (ids, sources, texts) and ``conversion.json``
(provenance and notes). It writes no ``run.json``: the run was not produced by jaxinf.

Index layout: 0-39 factual; 40-59 two-step arithmetic (7B) or linear equations (35B) and
60-79 slopes, both reasoning; 80-89 factual controls; 90-99 reasoning controls.

Some documents appear twice in the release (4 of 80 in both files: the same id and the same
scores, texts equal up to leading whitespace). The converter keeps the first occurrence of
each id, says so in conversion.json, and refuses a release whose repeated ids have different
scores.

What the release lacks, and so the converted run lacks: completion NLLs (no per-nat
numbers), document token counts (no by-token source multipliers), layer and token
breakdowns. The 80 documents were chosen by the authors (they contain answers or slope
procedures), so corpus-level statistics over them are not the paper's 5M-document ones.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from jaxinf.run.exports.formats import AnalysisError, write_documents, write_queries, write_scores

REASONING_TASK = {"7B": "arithmetic", "35B": "linear_equations"}
NOTES = [
    "converted from the released data of Ruis et al. (2024); scores are influences_dot",
    "the release has no completion NLLs, so queries.jsonl has no loss and per-nat numbers are unavailable",
    "the release has no document token counts, so documents.jsonl has no tokens",
    "the 80 documents were hand-picked by the authors (they contain answers or procedures), not a random sample "
    "of the 5M-document corpus; concentration, power-law and source statistics over them are not the paper's",
]


def query_labels(model: str, index: int) -> tuple[str, str]:
    """(kind, task) of release query ``index`` for the given model size."""
    if model not in REASONING_TASK:
        raise AnalysisError(f"release: field model must be one of {sorted(REASONING_TASK)}, got {model!r}")
    if 0 <= index < 40:
        return "factual", "factual"
    if 40 <= index < 60:
        return "reasoning", REASONING_TASK[model]
    if 60 <= index < 80:
        return "reasoning", "slopes"
    if 80 <= index < 90:
        return "control", "factual_control"
    if 90 <= index < 100:
        return "control", "reasoning_control"
    raise AnalysisError(f"release: query index {index} is outside the documented layout 0-99")


def load_release(path: Path) -> dict:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise AnalysisError(f"{path}: cannot read the release ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnalysisError(f"{path}: cannot read the release (invalid JSON: {e})") from None
    if not isinstance(d, dict):
        raise AnalysisError(f"{path}: cannot read the release (expected a JSON object)")
    for key in (
        "model",
        "test_ids",
        "prompts",
        "completions",
        "training_ids",
        "training_sequences",
        "training_sources",
        "influences_dot",
    ):
        if key not in d:
            raise AnalysisError(f"{path}: missing field {key}")
    Q, N = len(d["test_ids"]), len(d["training_ids"])
    scores = np.asarray(d["influences_dot"], np.float64)
    if scores.shape != (Q, N):
        raise AnalysisError(f"{path}: influences_dot has shape {scores.shape}, expected ({Q}, {N})")
    for key, n in (("prompts", Q), ("completions", Q), ("training_sequences", N), ("training_sources", N)):
        if len(d[key]) != n:
            raise AnalysisError(f"{path}: {key} has {len(d[key])} entries, expected {n}")
    return d


def convert_release(path: Path, run_dir: Path) -> Path:
    """Write the release at ``path`` as a run directory at ``run_dir`` (absent or empty)."""
    d = load_release(path)
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise AnalysisError(f"{run_dir}: not empty; convert into a new directory")
    model = d["model"]
    scores = np.asarray(d["influences_dot"], np.float64)
    keep, dropped = [], []
    first: dict = {}
    for n, did in enumerate(d["training_ids"]):
        if did in first:
            if not np.array_equal(scores[:, first[did]], scores[:, n]):
                raise AnalysisError(
                    f"{Path(path).name}: training id {did} appears at positions {first[did]} and {n} "
                    "with different influences_dot columns"
                )
            dropped.append(n)
        else:
            first[did] = n
            keep.append(n)
    notes = list(NOTES)
    if dropped:
        notes.insert(
            1,
            f"{len(dropped)} of {len(d['training_ids'])} documents appear twice in the release (same id, "
            f"same scores); the first occurrence of each is kept, leaving {len(keep)} documents "
            f"(dropped positions {dropped})",
        )
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".release-", dir=run_dir.parent))
    try:
        queries = []
        for i, qid in enumerate(d["test_ids"]):
            kind, task = query_labels(model, i)
            queries.append(
                {"id": qid, "prompt": d["prompts"][i], "completion": d["completions"][i], "kind": kind, "task": task}
            )
        write_queries(tmp / "queries.jsonl", queries)
        write_documents(
            tmp / "documents.jsonl",
            (
                {"id": d["training_ids"][n], "source": d["training_sources"][n], "text": d["training_sequences"][n]}
                for n in keep
            ),
        )
        write_scores(tmp / "scores.npy", scores[:, keep])
        (tmp / "conversion.json").write_text(
            json.dumps(
                {
                    "converted_from": str(Path(path).resolve()),
                    "model": model,
                    "scores": "influences_dot",
                    "release_positions": keep,
                    "notes": notes,
                },
                indent=1,
            )
        )
        if run_dir.exists():
            run_dir.rmdir()
        os.replace(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir
