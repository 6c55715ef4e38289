"""Two processes of one jax.distributed run on localhost score like one process.

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

import numpy as np
import pytest

from pipeline_support import make_world, overrides
from sharding_support import TOLERANCE, device_env, run_processes
from jaxinf import config as cfg
from jaxinf import pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return {**make_world(root, n_documents=24, n_queries=4), "root": root}


SETTINGS = {"factors.fisher": "empirical", "data.max_length": 32, "factors.save_every": 3, "scores.save_every": 3}


@pytest.mark.heavy  # 100 s on 2 cores: two processes each compiling every stage
def test_two_processes_give_the_scores_of_one(world, tmp_path):
    one = tmp_path / "one"
    pipeline.run(cfg.load(None, overrides(world, one, **SETTINGS)))
    two = tmp_path / "two"
    env = device_env(2, world["root"] / "xla-cache")                  # two devices per process
    rs = run_processes(2, ["run", *overrides(world, two, **SETTINGS, **{"mesh.data": 2, "mesh.model": 2})], env,
                       timeout=900)
    for i, r in enumerate(rs):
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-4000:]}"
        assert f"process {i} of 2 (2 local device(s), 4 in all)" in r.stderr
        assert "mesh data=2 x model=2 (4 cpu devices)" in r.stderr
        assert "documents: 24 documents, 24 rows" in r.stderr and "3 batches per host" in r.stderr
    assert "report:" in rs[0].stderr and "report:" not in rs[1].stderr       # process 0 alone writes the report
    a, b = np.load(one / "scores.npy"), np.load(two / "scores.npy")
    err = float(np.abs(a - b).max() / np.abs(a).max())
    assert a.shape == b.shape == (4, 24) and err <= TOLERANCE, err
    record = json.loads((two / "run.json").read_text())
    assert all(v["status"] == "done" for v in record["stages"].values())
    assert record["stages"]["scores"]["plan"]["processes"] == 2
    top_one = [json.loads(line)["top"][0]["id"] for line in (one / "topk.jsonl").read_text().splitlines()]
    top_two = [json.loads(line)["top"][0]["id"] for line in (two / "topk.jsonl").read_text().splitlines()]
    assert top_one == top_two
