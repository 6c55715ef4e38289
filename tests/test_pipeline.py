"""``jaxinf run`` end to end: exports against the engine, kill and resume, refusals, reused factors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pipeline_support import env, jaxinf, make_world, overrides

from jaxinf import config as cfg
from jaxinf import pipeline
from jaxinf.engine import programs, scoring, stages
from jaxinf.run import store
from jaxinf.run.inputs import load_inputs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return {**make_world(root), "root": root, "cache": root / "xla-cache"}


@pytest.fixture(scope="module")
def reference(world):
    """One uninterrupted run, in this process."""
    out = world["root"] / "reference"
    pipeline.run(cfg.load(None, overrides(world, out)))
    return out


def test_exports_match_the_engine_document_by_document(world, reference):
    """scores.npy, column by column, equals scoring each document alone with the run's curvature and queries."""
    from jaxinf import models
    from jaxinf.data.queries import encode_queries, query_batches, read_queries
    from jaxinf.data.sources import open_documents
    from jaxinf.data.tokenize import TextEncoder

    scores = np.load(reference / "scores.npy")
    assert scores.shape == (6, 48) and scores.dtype == np.float32
    lm, tok = models.from_hf(world["model"])
    config = cfg.load(None, overrides(world, reference))
    run = store.RunStore.open(config)
    layers = load_inputs(config, run).layers
    shapes = programs.fitted_shapes(lm.task(), layers)
    eigen = run.load_result("eigen", shapes["eigen"])
    Lambda = run.load_result("lambda", shapes["lambda"])
    curv = pipeline.curvature.curvature("ekfac", eigen, Lambda)
    encoder = TextEncoder(tok)
    (qb,) = query_batches(encode_queries(read_queries(world["queries"]), encoder))
    qb = {k: jnp.asarray(v) for k, v in qb.items() if k != "index"}
    G, qloss = stages.query_gradients(lm.task(), layers, lm.params, qb)
    qg = scoring.prepare_queries(G, qloss, curv, None, None)
    docs = open_documents(world["docs"])
    score = jax.jit(lambda b: stages.score_batch(lm.task(), layers, lm.params, qg, b)[0].total)
    for n in (0, 7, 23, 47):
        ids = encoder.encode_documents(docs.texts([n]))[0]
        one = {
            "tokens": jnp.asarray(ids[None]),
            "mask": jnp.ones((1, len(ids))),
            "weights": jnp.ones((1, len(ids))).at[0, 0].set(0.0),
        }
        np.testing.assert_allclose(
            np.asarray(score(one))[:, 0], scores[:, n], rtol=2e-4, atol=2e-4 * np.abs(scores).max()
        )
    rows = [json.loads(line) for line in (reference / "queries.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in rows], np.asarray(qloss), rtol=1e-5)
    assert rows[0]["supports"] == ["doc00000"] and all("supports" not in r for r in rows[1:])
    documents = [json.loads(line) for line in (reference / "documents.jsonl").read_text().splitlines()]
    assert [d["id"] for d in documents] == [f"doc{i:05d}" for i in range(48)]
    top = [json.loads(line) for line in (reference / "topk.jsonl").read_text().splitlines()]
    assert [t["id"] for t in top[0]["top"]] == [f"doc{i:05d}" for i in np.argsort(-scores[0], kind="stable")[:3]]
    record = json.loads((reference / "run.json").read_text())
    assert all(v["status"] == "done" for k, v in record["stages"].items() if k != "index")
    assert record["stages"]["index"] == {"status": "pending", "note": "no index requested (index.k: null)"}
    for stage in ("covariance", "lambda", "scores"):  # each pass's compile time (its first call) within its time
        timing = record["stages"][stage]["timing"]
        assert 0 < timing["compile_seconds"] <= timing["seconds"], (stage, timing)
    assert record["heap"] in ("huge-pages", "default") and record["cwd"] == os.getcwd()
    assert (reference / "report" / "index.html").exists() and (reference / "summary.json").exists()
    names = json.loads((reference / "layers.json").read_text())["names"]
    assert names == [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    layer_scores = np.load(reference / "layer_scores.npy")  # [Q, K, L] sums to the top scores
    top_scores = np.asarray([[d["score"] for d in t["top"]] for t in top])
    np.testing.assert_allclose(layer_scores.sum(-1), top_scores, rtol=1e-3, atol=1e-3 * np.abs(top_scores).max())


def _failure(stderr: str) -> str:
    """A failed run's stderr without the interpreter-shutdown noise of Orbax's pending reads (which would push the
    error itself out of an assertion message's tail)."""
    kept, skipping = [], False
    for line in stderr.splitlines():
        if line.startswith("Exception ignored in") or (skipping and line.startswith((" ", "Traceback", "ImportError"))):
            skipping = True
            continue
        skipping = False
        kept.append(line)
    return "\n".join(kept)[-3000:]


def test_compiling_ahead_runs_the_same_programs(world, reference, tmp_path, monkeypatch):
    """A run whose passes compile their other batch lengths in the background (``JAXINF_COMPILE_AHEAD=1``, the
    accelerators' default, :mod:`jaxinf.engine.ahead`) writes the reference run's scores to the bit: the reference
    compiles each length at its first batch (the CPU's default). The world's documents come in several lengths, so
    every pass runs programs compiled ahead."""
    from jaxinf.engine import ahead

    made: list[ahead.Ahead] = []
    init = ahead.Ahead.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(ahead.Ahead, "__init__", recording)
    monkeypatch.setenv("JAXINF_COMPILE_AHEAD", "1")
    out = tmp_path / "ahead"
    pipeline.run(cfg.load(None, overrides(world, out)))
    for name in ("scores.npy", "layer_scores.npy"):
        np.testing.assert_array_equal(np.load(out / name), np.load(reference / name))
    compiled = [[f.exception() for f in a.compiled.values()] for a in made]
    assert len(made) == 3 and all(c and not any(c) for c in compiled)  # covariance, Lambda, scores: ran ahead
    assert all(a.calls_ahead > 0 for a in made)


def _saved_steps(run_dir: Path, stage: str) -> list[int]:
    root = run_dir / "state" / stage
    return sorted(int(p.name) for p in root.iterdir() if (p / store.MANIFEST).exists()) if root.exists() else []


def test_killed_anywhere_resumes_to_identical_scores(world, reference, tmp_path):
    """SIGKILL inside the covariance, Lambda and scoring stages (once between an Orbax commit and its
    manifest); each resume starts at the last complete save and the final scores equal the reference."""
    e = env(world["cache"])
    out = tmp_path / "killed"
    args = ["run", *overrides(world, out)]
    kills = [("covariance:5", "covariance", 4), ("lambda:before-manifest:4", "lambda", 2), ("scores:7", "scores", 6)]
    previous = None
    for point, stage, expected_resume in kills:
        r = jaxinf(args, {**e, "JAXINF_FAULT": point})
        assert r.returncode == -9, r.stderr[-2000:]
        if previous is not None:
            prev_stage, prev_resume = previous
            assert f"{prev_stage}: resuming at batch {prev_resume} of 12" in r.stderr, r.stderr[-3000:]
        assert _saved_steps(out, stage)[-1] == expected_resume
        previous = (stage, expected_resume)
    final = jaxinf(args, e)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "scores: resuming at batch 6 of 12" in final.stderr
    for done in ("covariance", "lambda"):  # finished stages are not run again
        assert not re.search(rf"^{done}: \d+/", final.stderr, re.M), final.stderr
    np.testing.assert_array_equal(np.load(out / "scores.npy"), np.load(reference / "scores.npy"))
    # The reference kept every top document's breakdowns in its scoring pass; the resumed pass started from the tails
    # saved with its chunk at batch 6, so neither scored a document again, and the breakdowns are the same.
    scored_again = [
        json.loads((d / "run.json").read_text())["stages"]["exports"]["documents_scored_again"]
        for d in (reference, out)
    ]
    assert scored_again == [0, 0], scored_again
    # A finished scoring pass run again (the exports deleted, so written anew) returns its saved tails, computing
    # no batch: the exports score nothing again either.
    (out / "topk.jsonl").unlink()
    again = jaxinf(args, e)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["stages"]["exports"]["documents_scored_again"] == 0
    ref_layers, layers = np.load(reference / "layer_scores.npy"), np.load(out / "layer_scores.npy")
    np.testing.assert_allclose(layers, ref_layers, rtol=1e-5, atol=1e-5 * np.abs(ref_layers).max())
    ref_tokens, tokens = (
        [json.loads(line) for line in (d / "topk_tokens.jsonl").read_text().splitlines()] for d in (reference, out)
    )
    assert [(r["query"], r["document"], [t["text"] for t in r["tokens"]]) for r in tokens] == [
        (r["query"], r["document"], [t["text"] for t in r["tokens"]]) for r in ref_tokens
    ]
    scale = max(abs(t["score"]) for r in ref_tokens for t in r["tokens"])
    np.testing.assert_allclose(
        [t["score"] for r in tokens for t in r["tokens"]],
        [t["score"] for r in ref_tokens for t in r["tokens"]],
        rtol=1e-5,
        atol=1e-5 * scale,
    )


def test_resume_refuses_changes_that_would_change_saved_results(world, reference):
    e = env(world["cache"])
    r = jaxinf(["run", *overrides(world, reference, **{"scores.damping": 0.5, "factors.strategy": "kfac"})], e)
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "these keys would change results already saved: factors.strategy, scores.damping "
            "(use --overwrite to start over, or another run.out)"
        )
    )
    before = json.loads((reference / "run.json").read_text())
    assert before["config"]["factors"]["strategy"] == "ekfac"  # nothing rewritten


def test_corrupted_checkpoint_is_reported_and_not_used(world, reference, tmp_path):
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(reference, out)
    victim = max(
        (p for p in (out / "state" / "eigen" / "0").rglob("*") if p.is_file() and p.name != store.MANIFEST),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x55
    victim.write_bytes(bytes(data))
    for stage in ("queries", "scores", "exports", "analysis"):  # pretend the run stopped after eigen
        shutil.rmtree(out / "state" / stage, ignore_errors=True)
    record = json.loads((out / "run.json").read_text())
    for stage in ("lambda", "queries", "scores", "exports", "analysis"):
        record["stages"][stage] = {"status": "pending"}
    shutil.rmtree(out / "state" / "lambda")
    record["config"]["run"]["out"] = str(out)
    (out / "run.json").write_text(json.dumps(record))
    r = jaxinf(["run", *overrides(world, out)], env(world["cache"]))
    assert r.returncode == 0, _failure(r.stderr)
    assert re.search(r"corrupted checkpoint file \(checksum mismatch\).*stage eigen will be recomputed", r.stderr)
    np.testing.assert_allclose(np.load(out / "scores.npy"), np.load(reference / "scores.npy"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"data.documents": "missing.jsonl"}, r"data\.documents: missing\.jsonl: no such file or directory"),
        ({"factors.stratgy": "kfac"}, r"unknown key 'factors\.stratgy' \(did you mean 'factors\.strategy'\?\)"),
        ({"run.out": "FILE/run"}, r"is not a directory"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, extra, message):
    (tmp_path / "FILE").write_text("not a directory")
    extra = {k: (str(tmp_path / v) if k == "run.out" else v) for k, v in extra.items()}
    r = jaxinf(["run", *overrides(world, tmp_path / "out", **extra)], env(world["cache"]), cwd=tmp_path)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("jaxinf run: error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_factors_from_another_run_are_reused(world, reference, tmp_path):
    """New queries against factors fitted once: no curvature stage runs, and shared queries score the same."""
    out = tmp_path / "reuse"
    r = jaxinf(["run", *overrides(world, out, **{"factors.from": reference})], env(world["cache"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing the ekfac factors of" in r.stderr
    assert not (out / "state" / "covariance").exists() and not (out / "state" / "lambda").exists()
    np.testing.assert_allclose(np.load(out / "scores.npy"), np.load(reference / "scores.npy"), rtol=1e-5, atol=1e-6)
    bad = jaxinf(
        ["run", *overrides(world, tmp_path / "bad", **{"factors.from": reference, "factors.fisher": "empirical"})],
        env(world["cache"]),
    )
    assert bad.returncode == 2 and "was fitted with other settings: factors.fisher" in bad.stderr


def test_the_run_report_shows_top_documents_and_correlations_in_chromium(reference):
    """The run's report, loaded in headless Chromium: every query with its top documents and their sources,
    and the query-query correlation matrix, with every figure loaded."""
    from chromium_cdp import chromium_path, inspect_page
    from conftest import require_oracle

    exe = chromium_path()
    require_oracle(exe is not None, "chromium is not installed (apt-get install chromium)")
    page = inspect_page((reference / "report" / "index.html").as_uri(), exe)
    assert page["scripts"] == 1 and page["pwned"] is None  # the search box's script (jaxinf.analysis.page) alone
    text = page["text"]
    section = text[text.index("Queries and their top and bottom documents") :]
    for line in (reference / "topk.jsonl").read_text().splitlines():
        row = json.loads(line)
        at = section.index(row["query"])
        for doc in row["top"]:
            assert doc["id"] in section[at:] and doc["source"] in section[at:]
    images = {i["src"]: i for i in page["images"]}
    assert "correlations.png" in images
    assert all(i["complete"] and i["width"] > 0 for i in images.values())
