"""The EK-FAC index in ``jaxinf run`` and ``jaxinf query``: built once, exact when full, certified tails when
truncated, new queries without a pass over the documents, and refusals in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pipeline_support import env, jaxinf, make_world, overrides

from jaxinf import config as cfg
from jaxinf import pipeline
from jaxinf.run import index_run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    w = {**make_world(root), "root": root, "cache": root / "xla-cache"}
    lines = w["queries"].read_text().splitlines()
    (root / "first.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (root / "second.jsonl").write_text("\n".join(lines[3:]) + "\n")
    return w


@pytest.fixture(scope="module")
def exact(world):
    """The exact run over all queries (the oracle), with a full index built after it."""
    out = world["root"] / "exact"
    pipeline.run(cfg.load(None, overrides(world, out, **{"index.k": "full"})))
    return out


def _topk(run):
    return {
        r["query"]: ([d["id"] for d in r["top"]], [d["id"] for d in r["bottom"]])
        for r in map(json.loads, (run / "topk.jsonl").read_text().splitlines())
    }


def test_a_full_index_scores_like_the_scoring_pass(world, exact, monkeypatch):
    """Also when the rows are read and multiplied a batch at a time (a slice is bounded by bytes, not rows: the
    bench world's whole full index was one slice of 12.9 GB)."""
    from jaxinf.run import index_store

    monkeypatch.setattr(index_store, "SLICE_BYTES", 1)  # one batch's rows per slice, the least there is
    out = world["root"] / "full"
    pipeline.run(cfg.load(None, overrides(world, out, **{"index.k": "full", "scores.mode": "index"})))
    got, want = np.load(out / "scores.npy"), np.load(exact / "scores.npy")
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    record = json.loads((out / "run.json").read_text())
    manifest = json.loads((out / "state" / "index" / "manifest.json").read_text())
    assert record["stages"]["scores"]["slices"] == manifest["batches"] > 1
    assert record["stages"]["scores"]["rescored"] == 0  # the bound is 0: nothing to certify
    assert "scores" not in {p.name for p in (out / "state").iterdir()} or record["stages"]["scores"]["mode"] == "index"
    assert _topk(out) == _topk(exact)


def test_under_the_empirical_fisher_the_lambda_pass_writes_the_index(world, tmp_path, monkeypatch):
    """factors.fisher=empirical: the Lambda pass's gradients are the scores', so it writes the index itself and a
    scores.mode=index run makes two passes over the corpus (covariance, Lambda); a full index scores like the exact
    scoring pass. Its rows are flushed every batch here (a buffer of one byte: rows too big to hold), so the Lambda
    checkpoint follows them batch by batch, with the same result."""
    monkeypatch.setattr(index_run, "BUFFER_BYTES", 1)
    empirical = {"factors.fisher": "empirical"}
    oracle = tmp_path / "oracle"
    pipeline.run(cfg.load(None, overrides(world, oracle, **empirical)))
    out = tmp_path / "fused"
    pipeline.run(cfg.load(None, overrides(world, out, **{**empirical, "index.k": "full", "scores.mode": "index"})))
    got, want = np.load(out / "scores.npy"), np.load(oracle / "scores.npy")
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert stages["index"]["status"] == "done" and stages["index"]["timing"] == stages["lambda"]["timing"]


def test_a_lambda_pass_resumed_past_the_index_rows_leaves_the_index_to_a_pass_of_its_own(
    world, tmp_path, monkeypatch, caplog
):
    """A run stopped in its Lambda pass before it was asked for an index (so no rows were written beside its
    checkpoints), then resumed with ``index.k=full``: the resumed Lambda pass cannot write rows it has passed, so it
    runs alone and the index is built by a pass of its own; its scores are the exact pass's. Had the index ridden on
    the resumed pass, its first rows would have been zeros marked written."""
    empirical = {"factors.fisher": "empirical", "factors.save_every": 2}
    out = tmp_path / "resumed"
    monkeypatch.setenv("JAXINF_FAULT", "lambda:5:raise")
    with pytest.raises(RuntimeError, match="fault injected"):
        pipeline.run(cfg.load(None, overrides(world, out, **empirical)))
    monkeypatch.delenv("JAXINF_FAULT")
    oracle = tmp_path / "oracle"
    pipeline.run(cfg.load(None, overrides(world, oracle, **empirical)))
    with caplog.at_level("INFO", logger="jaxinf"):
        pipeline.run(cfg.load(None, overrides(world, out, **{**empirical, "index.k": "full", "scores.mode": "index"})))
    assert "lambda: resuming at batch 4" in caplog.text and "a pass of its own follows" in caplog.text
    got, want = np.load(out / "scores.npy"), np.load(oracle / "scores.npy")
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert stages["index"]["status"] == "done" and stages["index"]["timing"] != stages["lambda"]["timing"]


@pytest.mark.heavy  # the kill/resume of the index's own pass is in CI (test_a_killed_index_build_resumes_...)
def test_killed_in_the_lambda_pass_that_writes_the_index_resumes_to_the_same_index(world, tmp_path):
    """factors.fisher=empirical, killed in the Lambda pass that writes the index: the rerun resumes Lambda and the
    index together from the last checkpoint (the rows before it were flushed first), so every row comes from the one
    statistic, and ends with the index and scores of an uninterrupted run, bit for bit."""
    empirical = {"factors.fisher": "empirical"}
    out = tmp_path / "fused"
    pipeline.run(cfg.load(None, overrides(world, out, **{**empirical, "index.k": "full", "scores.mode": "index"})))
    got = np.load(out / "scores.npy")
    killed = tmp_path / "killed"
    args = ["run", *overrides(world, killed, **{**empirical, "index.k": "full", "scores.mode": "index"})]
    e = env(world["cache"])
    r = jaxinf(args, {**e, "JAXINF_FAULT": "lambda:5"})
    assert r.returncode == -9, r.stderr[-2000:]
    final = jaxinf(args, e)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "lambda: resuming at batch 4 of 12" in final.stderr
    assert "index: written by the Lambda pass" in final.stderr and "a pass of its own follows" not in final.stderr
    for name in ("cells", "bands", "documents"):
        np.testing.assert_array_equal(
            np.load(killed / "state" / "index" / f"{name}.npy"), np.load(out / "state" / "index" / f"{name}.npy")
        )
    np.testing.assert_array_equal(np.load(killed / "scores.npy"), got)


def test_new_queries_against_the_index_match_an_exact_run(world, exact, tmp_path):
    """``jaxinf query``: a new query file against the run's index gives the exact run's scores for those queries."""
    first = tmp_path / "first"
    pipeline.run(
        cfg.load(None, overrides(world, first, **{"index.k": "full", "data.queries": world["root"] / "first.jsonl"}))
    )
    out = tmp_path / "answers"
    r = jaxinf(["query", first, world["root"] / "second.jsonl", "--out", out], env(world["cache"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "state" / "covariance").exists() and not (out / "state" / "index").exists()
    got, want = np.load(out / "scores.npy"), np.load(exact / "scores.npy")[3:]
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    assert (out / "topk_tokens.jsonl").exists() and "EK-FAC index, predicted correlation" in (
        out / "report" / "index.html"
    ).read_text()
    # an index built from other documents is refused in one line, nothing written
    bad = jaxinf(["query", tmp_path / "nowhere", world["root"] / "second.jsonl"], env(world["cache"]))
    assert bad.returncode == 2 and "not a jaxinf run directory" in bad.stderr and "Traceback" not in bad.stderr


def test_a_truncated_index_certifies_the_exact_tails(world, exact, tmp_path):
    out = tmp_path / "k2"
    pipeline.run(cfg.load(None, overrides(world, out, **{"index.k": 2, "scores.mode": "index"})))
    record = json.loads((out / "run.json").read_text())
    assert record["stages"]["scores"]["rescored"] > 0
    assert _topk(out) == _topk(exact)
    got, want = np.load(out / "scores.npy"), np.load(exact / "scores.npy")
    bound = np.load(out / "index_bounds.npy")
    assert np.all(np.abs(got - want) <= bound * (1 + 1e-4) + 1e-5 * np.max(np.abs(want)))
    report = json.loads((out / "index.json").read_text())
    assert report["rescored_documents"] == record["stages"]["scores"]["rescored"]
    assert all(0 < q["predicted_correlation"] <= 1 for q in report["queries"])
    # the certifying pass kept the breakdowns of the top documents it rescored; the exact run (whose scoring pass
    # wrote the index and kept none) scored them all again: the same per-layer scores either way
    again = [
        json.loads((d / "run.json").read_text())["stages"]["exports"]["documents_scored_again"] for d in (out, exact)
    ]
    assert again[0] < again[1], again
    mine, theirs = np.load(out / "layer_scores.npy"), np.load(exact / "layer_scores.npy")
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


def test_changed_documents_invalidate_the_index(world, tmp_path):
    import shutil

    docs = tmp_path / "docs.jsonl"
    shutil.copy(world["docs"], docs)
    out = tmp_path / "run"
    args = overrides(world, out, **{"index.k": 2, "data.documents": docs})
    pipeline.run(cfg.load(None, args))
    before = np.load(out / "state" / "index" / "cells.npy").copy()
    lines = docs.read_text().splitlines()
    row = json.loads(lines[5])
    row["text"] = "a different text " + row["text"]
    lines[5] = json.dumps(row)
    docs.write_text("\n".join(lines) + "\n")
    pipeline.run(cfg.load(None, args))
    after = np.load(out / "state" / "index" / "cells.npy")
    assert before.shape == after.shape and not np.array_equal(before, after)


def test_a_killed_index_build_resumes_to_the_same_index(world, exact, tmp_path):
    """SIGKILL in the index pass (its own pass over a finished run) after batch 7: the rerun resumes at the last
    flushed batch (6, with index.save_every=2) and ends with the index of an uninterrupted build."""
    out = tmp_path / "killed"
    args = [
        "run",
        *overrides(world, out, **{"factors.from": exact, "index.k": 2, "index.save_every": 2, "scores.mode": "index"}),
    ]
    e = env(world["cache"])
    r = jaxinf(args, {**e, "JAXINF_FAULT": "index:7"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert json.loads((out / "state" / "index" / "manifest.json").read_text())["written"] == 6
    final = jaxinf(args, e)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "index: resuming at batch 6 of 12" in final.stderr
    again = tmp_path / "uninterrupted"
    assert (
        jaxinf(
            ["run", *overrides(world, again, **{"factors.from": exact, "index.k": 2, "scores.mode": "index"})], e
        ).returncode
        == 0
    )
    for name in ("cells", "bands", "documents"):
        np.testing.assert_array_equal(
            np.load(out / "state" / "index" / f"{name}.npy"), np.load(again / "state" / "index" / f"{name}.npy")
        )
    np.testing.assert_array_equal(np.load(out / "scores.npy"), np.load(again / "scores.npy"))
    # a run that reused another's factors: jaxinf query reads its index and the curvature where it lives
    answers = tmp_path / "answers"
    r = jaxinf(["query", out, world["root"] / "second.jsonl", "--out", answers], e)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((answers / "run.json").read_text())["config"]
    assert record["factors"]["from"] == str(exact) and record["index"]["from"] == str(out)
    assert _topk(answers) == {q: t for q, t in _topk(exact).items() if q in _topk(answers)}


def test_an_index_answers_a_run_that_batches_its_documents_differently(world, exact, tmp_path):
    """The index's rows are the documents' rows, whatever batches and processes they were grouped in: a run that
    batches them by 8 (as one on another number of processes does) scores from the index of one that batched them by
    4, like the exact run; a run that cuts them into other rows (another data.max_length) is refused in one line, at
    its start: nothing computed, nothing left behind (it was refused at its scores stage, after its query gradients,
    leaving run.json, state/ and its lock)."""
    reuse = {"factors.from": exact, "index.from": exact, "scores.mode": "index"}
    out = tmp_path / "by8"
    pipeline.run(cfg.load(None, overrides(world, out, **reuse, **{"data.batch_size": 8})))
    got, want = np.load(out / "scores.npy"), np.load(exact / "scores.npy")
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    with pytest.raises(index_run.IndexError_, match=r"manifest.json: built over documents cut into other rows \(anot"):
        pipeline.run(cfg.load(None, overrides(world, tmp_path / "short", **reuse, **{"data.max_length": 64})))
    assert not (tmp_path / "short").exists()


def test_a_torn_index_is_refused_in_one_line(world, exact, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(exact, run)
    cells = run / "state" / "index" / "cells.npy"
    with open(cells, "r+b") as f:
        f.truncate(cells.stat().st_size // 2)
    r = jaxinf(["query", run, world["root"] / "second.jsonl", "--out", tmp_path / "out"], env(world["cache"]))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "cells.npy" in r.stderr.strip().splitlines()[-1]


def test_index_rows_are_flushed_before_they_outgrow_the_buffer():
    manifest = {"cells": 1000, "dtype": "float32", "bands": 9}  # 4,052 bytes per row
    per_batch = 8 * (1000 * 4 + 4 * 9 + 16)
    assert index_run.flush_every(100, manifest, 8) == 100  # 3 MiB: index.save_every as set
    assert index_run.flush_every(100, {**manifest, "cells": 10**7}, 8) == 3  # 320 MB per batch: 3 fit in 1 GiB
    assert index_run.flush_every(100, {**manifest, "cells": 10**9}, 8) == 1  # never fewer than one
    assert index_run.BUFFER_BYTES // per_batch >= 100


def test_query_refuses_its_own_run_as_out_and_a_directory_as_queries(world, exact, tmp_path, capsys):
    """``--out`` naming the run the queries are scored against was refused only after ``--overwrite`` had set the
    run aside, as "factors.from: ... has no finished curvature"; a directory as QUERIES was "no such queries file"."""
    from jaxinf import cli

    before = sorted(p.relative_to(exact) for p in exact.rglob("*"))
    for out in (str(exact), str(exact) + "/."):
        assert cli.main(["query", str(exact), str(world["queries"]), "--out", out, "--overwrite"]) == 2
        assert "is the run whose index and curvature the queries are scored against" in capsys.readouterr().err
    assert sorted(p.relative_to(exact) for p in exact.rglob("*")) == before
    assert cli.main(["query", str(exact), str(world["root"])]) == 2
    assert f"{world['root']}: is a directory, not a queries file" in capsys.readouterr().err


def test_an_index_of_an_earlier_format_is_refused_by_a_query_and_rebuilt_by_a_rerun(world, exact, tmp_path):
    """An index written before the kept cells became those of the largest ``e_S e_A`` (format 1: a square block)
    holds other cells under the same manifest fields: a query against it says so in one line and names what
    rebuilds it, and the run run again rebuilds it (nothing else recomputed) to the same rows as the original."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(exact, run)
    manifest = run / "state" / "index" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "format": 1}))
    r = jaxinf(["query", run, world["root"] / "second.jsonl", "--out", tmp_path / "out"], env(world["cache"]))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"{manifest}: an index of format 1, written by an earlier jaxinf; this one reads format "
            f"{m['format']} (run the run {run} again to rebuild it)"
        )
    )
    record = json.loads((run / "run.json").read_text())
    r = jaxinf(["run", *overrides(world, run, **{"index.k": "full"})], env(world["cache"]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(manifest.read_text())["format"] == m["format"]
    after = json.loads((run / "run.json").read_text())["stages"]
    for stage in ("covariance", "lambda", "scores"):
        assert after[stage] == record["stages"][stage], stage  # only the index was built again
    for name in ("cells", "bands", "documents"):
        np.testing.assert_array_equal(
            np.load(run / "state" / "index" / f"{name}.npy"), np.load(exact / "state" / "index" / f"{name}.npy")
        )
