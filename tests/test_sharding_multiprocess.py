"""Two processes of one jax.distributed run on localhost compute what one process does.

The default suite runs :func:`test_two_processes_reduce_and_score_like_one`: two
processes with one CPU device each, a few seconds of work (the covariance reduced
across them and the scores split between them), failing with the name of a
process that died or hung. The heavy test runs the whole pipeline:

Each process has two simulated CPU devices and the mesh is 2 x 2: `data`
across the processes, `model` within each. The two processes split every
step's documents (each reads only its own slice of the corpus), reduce A, S and
Lambda with cross-process collectives, save the Orbax checkpoints collectively,
and process 0 alone writes the exports and the report. The Fisher is the
empirical one: with two processes the documents are grouped into batches
differently, and the sampled labels of batch i depend on i.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from pipeline_support import make_world, overrides
from sharding_support import TOLERANCE, device_env, run_distributed, run_processes

from jaxinf import config as cfg
from jaxinf import pipeline


def test_two_processes_reduce_and_score_like_one(tmp_path):
    """The path every multi-host run takes: jax.distributed on two local processes, the config agreement, each
    process's rows put into one global batch, cross-process collectives; against one device, same tolerance."""
    reports = run_distributed("distributed", [tmp_path / "p0.json", tmp_path / "p1.json"], timeout=240)
    assert [(r["process"], r["processes"]) for r in reports] == [(0, 2), (1, 2)]
    assert sorted(r["group"] for r in reports) == [0, 1]  # each process feeds its own data row
    for r in reports:
        assert set(r["errors"]) == {"A", "S", "scores"} and max(r["errors"].values()) <= TOLERANCE, r
        # each process's index rows reach every process bit for bit (float64 through devices without x64)
        assert r["exchanged"] == [
            {"documents": [0], "scores": [[0.1], [0.1]], "loss": [0.0]},
            {"documents": [0, 1], "scores": [[1.1, 1.1], [1.1, 1.1]], "loss": [0.0, 0.0]},
        ], r["exchanged"]
        assert r["refused"] == "rows 4-8 damaged"  # one process's damaged rows stop both, in the same words
        # each process is its group's one writer, and has its group's rows of a per-row output (rows 2g and 2g + 1)
        # whether its devices hold them (read locally) or only their columns (gathered and cut)
        own = [[2.0 * (2 * r["group"] + i), 2.0 * (2 * r["group"] + i) + 1] for i in range(2)]
        assert r["writes_group"] and r["local"] == {"rows": [True, own], "columns": [False, own]}, r["local"]


def test_a_process_that_dies_or_hangs_is_named(tmp_path):
    """The harness itself: a worker that fails is named with its exit status and its last lines, the other (stuck
    waiting for it in jax.distributed.initialize) as hung."""
    with pytest.raises(
        AssertionError,
        match=r"(?s)^process 1 of 2 exited with 1:.*stopped on purpose\n"
        r"process 0 of 2 hung: not finished \d+ s after the start",
    ):
        run_distributed("lost-peer", [tmp_path / "p0.json", tmp_path / "p1.json"], timeout=60, grace=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return {**make_world(root, n_documents=24, n_queries=4), "root": root}


SETTINGS = {"factors.fisher": "empirical", "data.max_length": 32, "factors.save_every": 3, "scores.save_every": 3}


@pytest.mark.heavy  # 100 s on 2 cores per case: two processes each compiling every stage
@pytest.mark.parametrize("fsdp", [False, True])
def test_two_processes_give_the_scores_of_one(world, tmp_path, fsdp):
    """Also with ``mesh.fsdp``: parameters and query gradients stored over ``data``, here across the processes, and
    gathered one layer at a time by every step."""
    one = tmp_path / "one"
    pipeline.run(cfg.load(None, overrides(world, one, **SETTINGS)))
    two = tmp_path / "two"
    env = device_env(2, world["root"] / "xla-cache")  # two devices per process
    mesh = {"mesh.data": 2, "mesh.model": 2, "mesh.fsdp": fsdp}
    rs = run_processes(2, ["run", *overrides(world, two, **SETTINGS, **mesh)], env, timeout=900)
    for i, r in enumerate(rs):
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-4000:]}"
        assert f"process {i} of 2 (2 local device(s), 4 in all)" in r.stderr
        assert "mesh data=2 x model=2 (4 cpu devices)" in r.stderr
        assert "documents: 24 documents, 24 rows" in r.stderr and "3 batches per host" in r.stderr
    assert "report:" in rs[0].stderr and "report:" not in rs[1].stderr  # process 0 alone writes the report
    a, b = np.load(one / "scores.npy"), np.load(two / "scores.npy")
    err = float(np.abs(a - b).max() / np.abs(a).max())
    assert a.shape == b.shape == (4, 24) and err <= TOLERANCE, err
    record = json.loads((two / "run.json").read_text())
    assert all(v["status"] == "done" for k, v in record["stages"].items() if k != "index")
    assert record["stages"]["scores"]["plan"]["processes"] == 2
    top_one = [json.loads(line)["top"][0]["id"] for line in (one / "topk.jsonl").read_text().splitlines()]
    top_two = [json.loads(line)["top"][0]["id"] for line in (two / "topk.jsonl").read_text().splitlines()]
    assert top_one == top_two


@pytest.mark.heavy  # about 3 minutes on 2 cores: two processes, one for reference and a query from one process
def test_two_processes_build_an_index_that_one_process_queries(world, tmp_path):
    """index.k=full with scores.mode=index on two processes: in the index pass (its own pass on a mesh) each process
    writes the rows of its own slice of the corpus, from its own devices, into a part of its own; each process then
    reads and multiplies its own slices of the rows and they exchange the products; the scores are those of one process's
    exact run. jaxinf query on one process (another batch plan, no coordinator)
    answers new queries from that index with the same scores."""
    one = tmp_path / "one"
    pipeline.run(cfg.load(None, overrides(world, one, **SETTINGS)))
    two = tmp_path / "two"
    env = device_env(2, world["root"] / "xla-cache")
    indexed = {"mesh.data": 2, "mesh.model": 2, "index.k": "full", "scores.mode": "index"}
    rs = run_processes(2, ["run", *overrides(world, two, **SETTINGS, **indexed)], env, timeout=900)
    for i, r in enumerate(rs):
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-4000:]}"
    # each reads its own slice of the 24 rows (two parts of 12): here the part it wrote
    for r in rs:
        assert "this process read 12 of the index's 24 rows" in r.stderr, r.stderr[-3000:]
    a, b = np.load(one / "scores.npy"), np.load(two / "scores.npy")
    assert float(np.abs(a - b).max() / np.abs(a).max()) <= TOLERANCE
    manifest = json.loads((two / "state" / "index" / "manifest.json").read_text())
    assert manifest["written"] == manifest["batches"] == 3 and manifest["rows_per_batch"] == 2 * 4
    # each process wrote the rows of its own slice of the corpus, in a part of its own: 3 batches of 4 rows each
    assert manifest["parts"] == 2
    for i, r in enumerate(rs):
        assert f"index: this process wrote part {i} of 2" in r.stderr, r.stderr[-3000:]
        part = two / "state" / "index" / f"part-{i}-of-2"
        assert np.load(part / "cells.npy", mmap_mode="r").shape[0] == 3 * 4
    answers = tmp_path / "answers"
    r = subprocess.run(
        [sys.executable, "-m", "jaxinf", "query", str(two), str(world["queries"]), "--out", str(answers)]
        + ["mesh.data=1", "mesh.model=1"],
        env=device_env(1, world["root"] / "xla-cache"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    c = np.load(answers / "scores.npy")
    assert float(np.abs(a - c).max() / np.abs(a).max()) <= TOLERANCE


@pytest.mark.heavy  # about 4 minutes on 2 cores: a two-process run killed, restarted, and one process for reference
def test_a_process_killed_mid_stage_stops_the_other_in_one_line_and_a_restart_resumes(world, tmp_path):
    """Process 1 of two is killed in the Lambda pass (SIGKILL after its second batch): process 0, waiting for it in
    the next batch's collective, used to end with a traceback and then, at exit, JAX's shutdown barrier aborting it
    with pages of fatal errors. It now says so in one line (exit 4, the stage named) and leaves; the same command
    on both processes resumes from the last checkpoint both committed and gives the scores of one process."""
    one = tmp_path / "one"
    pipeline.run(cfg.load(None, overrides(world, one, **SETTINGS)))
    two = tmp_path / "two"
    env = device_env(2, world["root"] / "xla-cache")
    args = ["run", *overrides(world, two, **SETTINGS, **{"mesh.data": 2, "mesh.model": 2})]
    rs = run_processes(2, args, env, timeout=900, per_process_env=[{}, {"JAXINF_FAULT": "lambda:1"}])
    assert rs[1].returncode == -9, rs[1].stderr[-3000:]
    err = rs[0].stderr
    lines = [line for line in err.splitlines() if line.startswith("jaxinf run: error: ")]
    assert rs[0].returncode == 4 and len(lines) == 1, err[-4000:]
    assert "another process of this run stopped" in lines[0] and "stage lambda" in lines[0], lines[0]
    assert "Traceback" not in err and "Check failure" not in err and "Terminating process" not in err, err[-4000:]
    rs = run_processes(2, args, env, timeout=900)
    for i, r in enumerate(rs):
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-4000:]}"
    a, b = np.load(one / "scores.npy"), np.load(two / "scores.npy")
    assert float(np.abs(a - b).max() / np.abs(a).max()) <= TOLERANCE
