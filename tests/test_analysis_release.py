"""The released data of Ruis et al. (2024), converted to a run directory and analysed end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import require_oracle

from jaxinf import cli
from jaxinf.analysis import AnalysisError, page
from jaxinf.analysis.release import convert_release, query_labels

RELEASE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ruis2024"
TASKS = {"7B": "arithmetic", "35B": "linear_equations"}


def _release(model: str) -> Path:
    path = RELEASE / f"release_{model}.json"
    require_oracle(path.exists(), f"release data not found at {path} (../shared/data/ruis2024/)")
    return path


def test_index_layout():
    assert query_labels("7B", 0) == ("factual", "factual")
    assert query_labels("7B", 40) == ("reasoning", "arithmetic")
    assert query_labels("35B", 59) == ("reasoning", "linear_equations")
    assert query_labels("35B", 60) == ("reasoning", "slopes")
    assert query_labels("7B", 85) == ("control", "factual_control")
    assert query_labels("7B", 99) == ("control", "reasoning_control")
    with pytest.raises(AnalysisError):
        query_labels("7B", 100)


@pytest.mark.parametrize("model", ["7B", "35B"])
def test_release_end_to_end(tmp_path, model, capsys):
    path = _release(model)
    run = tmp_path / f"release_{model}"
    assert cli.main(["analyze", "--from-release", str(path), str(run)]) == 0
    printed = capsys.readouterr().out
    d = json.loads(path.read_text())
    s = json.loads((run / "summary.json").read_text())

    # the conversion: repeated documents (same id, same scores) are kept once
    ids = d["training_ids"]
    keep = [n for n in range(len(ids)) if ids.index(ids[n]) == n]
    ref = np.asarray(d["influences_dot"], np.float64)[:, keep]
    assert s["n_queries"] == 100 and s["n_documents"] == len(keep) == 76
    assert np.allclose(np.load(run / "scores.npy"), ref.astype(np.float32), rtol=0, atol=0)

    # within-task correlations per task, against np.corrcoef of the stored scores
    r = np.corrcoef(ref.astype(np.float32).astype(np.float64))
    groups = {
        "factual": range(0, 40),
        TASKS[model]: range(40, 60),
        "slopes": range(60, 80),
        "factual_control": range(80, 90),
        "reasoning_control": range(90, 100),
    }
    assert set(s["correlations"]["within_task"]) == set(groups)
    for task, idx in groups.items():
        got = s["correlations"]["within_task"][task]
        vals = [r[i, j] for i in idx for j in idx if i < j]
        assert got["n"] == len(vals)
        assert got["mean"] == pytest.approx(np.mean(vals), abs=1e-10)
        print(f"{model} within-task {task}: mean r = {got['mean']:.3f} (std {got['std']:.3f}, {got['n']} pairs)")

    # what the release lacks is said in the outputs
    notes = " ".join(s["notes"])
    assert "no completion NLLs" in notes and "per-nat numbers are skipped" in notes
    assert "appear twice in the release" in notes
    assert s["concentration"]["per_nat"] is None and s["layers"]["available"] is False
    assert "no completion NLLs" in (run / "report" / "summary.md").read_text()
    assert "no completion NLLs" in printed
    assert s["answers"]["available"] and s["answers"]["ks"] == [10, 50, 76]
    html = (run / "report" / "index.html").read_text()
    assert html.lower().count("<script") == 1 and html.count(page.SCRIPT) == 1  # only the report's own search box


def test_converter_refuses_a_non_empty_directory(tmp_path):
    path = _release("7B")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(AnalysisError, match="not empty"):
        convert_release(path, tmp_path / "x")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["keep.txt"]


def test_missing_oracle_skips_or_fails(monkeypatch):
    monkeypatch.delenv("JAXINF_REQUIRE_ORACLES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="gone"):
        require_oracle(False, "gone")
    monkeypatch.setenv("JAXINF_REQUIRE_ORACLES", "1")
    with pytest.raises(pytest.fail.Exception, match="required oracle missing under JAXINF_REQUIRE_ORACLES=1: gone"):
        require_oracle(False, "gone")
    require_oracle(True, "present")


@pytest.mark.parametrize("content", [None, b"[1]", b"\xff"])
def test_a_release_that_cannot_be_read_is_named_by_its_whole_path(tmp_path, capsys, content):
    """``analyze --from-release /nonexistent/release.json`` named only ``release.json``: the user could not tell
    which of several such files it meant. The whole path is named, with the reason, and nothing is written."""
    path = tmp_path / "nowhere" / "release.json"
    if content is not None:
        path.parent.mkdir()
        path.write_bytes(content)
    run = tmp_path / "run"
    assert cli.main(["-q", "analyze", "--from-release", str(path), str(run)]) == 2
    err = capsys.readouterr().err.strip()
    reason = {None: "No such file or directory", b"[1]": "expected a JSON object", b"\xff": "invalid JSON: "}[content]
    assert err.startswith(f"jaxinf analyze: error: {path}: cannot read the release ({reason}")
    assert len(err.splitlines()) == 1 and not run.exists()
