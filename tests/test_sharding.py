"""Sharded stages on 8 simulated CPU devices: equal to one device on every mesh, the expected collectives,
sharded (never replicated) factors, the partition rules, and one-line errors before any work.

The multi-device work runs in subprocesses (see sharding_support.py): the device
count is fixed when jax starts, and this process keeps its single device.
"""

from __future__ import annotations

import json
import re

import pytest

from pipeline_support import make_world, overrides
from sharding_support import MESHES, TOLERANCE, device_env, run_processes, run_worker
from jaxinf import sharding


@pytest.fixture(scope="module")
def stages_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    return run_worker("stages", root / "report.json", devices=8, cache=root / "xla-cache")


@pytest.mark.parametrize("mesh", [f"{d}x{m}" for d, m in MESHES])
def test_every_stage_equals_one_device(stages_report, mesh):
    """A, S, the eigendecomposition, Lambda, the query gradients and the scores, each from the same inputs."""
    errors = stages_report["meshes"][mesh]["errors"]
    assert set(errors) == {"A", "S", "eigen", "Lambda", "queries", "queries_identity", "queries_diagonal",
                           "queries_kfac", "scores"}
    assert all(e <= TOLERANCE for e in errors.values()), errors


def test_compiled_programs_hold_the_expected_collectives(stages_report):
    for (data, model) in MESHES:
        c = stages_report["meshes"][f"{data}x{model}"]["collectives"]
        for stage in ("covariance", "lambda"):           # sums over documents reduced over `data` inside the step
            if data > 1:
                assert {"all-reduce", "reduce-scatter"} & set(c[stage]), (data, model, stage, c[stage])
        assert "all-to-all" in c["eigen"], c["eigen"]       # whole matrices moved to their devices, and back
        if model > 1:                                       # parameters / query gradients split over `model`
            assert c["scores"], (data, model)
        else:                                               # pure data parallelism: nothing to exchange
            assert c["scores"] == [], c["scores"]


def test_factors_and_queries_stay_sharded(stages_report):
    """No factor, eigenbasis, Lambda or query gradient is replicated on every device; parameters are split on model."""
    for (data, model) in MESHES:
        layouts = stages_report["meshes"][f"{data}x{model}"]["layouts"]
        # query gradients live on `model` only (every data shard scores its documents against all of them)
        for kind in ("covariance", "covariance_state", "eigen", "Lambda") + (("queries",) if model > 1 else ()):
            for name, leaf in layouts[kind].items():
                if len(leaf["shape"]) >= 3:
                    assert not leaf["replicated"], (data, model, kind, name, leaf)
        # A is [2 layers, 32, 32]: rows on model, columns on data, wherever they divide
        want = {(8, 1): "P(None, None, 'data')", (4, 2): "P(None, 'model', 'data')",
                (2, 4): "P(None, 'model', 'data')", (1, 8): "P(None, 'model', None)"}
        a = layouts["covariance"][".A['model.layers.*.mlp.up_proj']"]
        assert a["spec"] == want[(data, model)], a
        if model > 1:
            kernel = layouts["params"]["['model']['layers']['mlp']['up_proj']['kernel']"]
            assert kernel["spec"] == "P(None, None, 'model')", kernel     # [L, hidden, ff]: ff on model
        scores = layouts["scores"]["['scores']"]
        assert scores["spec"] == "P(None, 'data')" and scores["replicated"] == (data == 1), scores  # columns on data


def test_no_full_rematerialization(stages_report):
    """XLA never had to replicate an array to change its layout (it warns when it does)."""
    assert "Involuntary full rematerialization" not in stages_report["stderr"]


# --------------------------------------------------------------------------- the rules, without devices


def test_rules_pick_the_first_dimension_that_divides():
    mesh = {"data": 4, "model": 8}
    resolve = sharding.resolve
    assert resolve(mesh, "factor", ("layers", "rows", "cols"), (40, 8192, 8192), "A") == \
        sharding.P(None, "model", "data")
    # a bias makes d_in + 1 odd: the factor of such a layer goes on the layer axis (both mesh axes if they fit)
    assert resolve(mesh, "factor", ("layers", "rows", "cols"), (32, 2049, 2049), "A") == \
        sharding.P(("model", "data"), None, None)
    assert resolve(mesh, "factor", ("layers", "rows", "cols"), (24, 2049, 2049), "A") == \
        sharding.P("model", None, None)                   # 24 layers: split on model, replicated over data
    # Lambda [L, d_out, d_in + 1]: rows on model; the odd columns cannot take data, the rows can
    assert resolve(mesh, "factor", ("layers", "rows", "cols"), (24, 8192, 2049), "Lambda") == \
        sharding.P(None, ("model", "data"), None)
    assert sharding.param_axes("model.layers.mlp.up_proj.kernel", 3) == ("layers", "embed", "ff")
    assert sharding.param_axes("model.layers.3.mlp.down_proj.kernel", 2) == ("ff", "embed")
    assert sharding.param_axes("model.embed_tokens.embedding", 2) == ("vocab", "embed")
    assert sharding.param_axes("model.norm.scale", 1) == ("replicated",)
    # a parameter whose feature dimension does not divide falls back to its other dimension
    assert resolve(mesh, "param", ("vocab", "embed"), (50277, 2048), "embedding") == sharding.P(None, "model")


def test_a_dimension_the_model_axis_does_not_divide_is_named():
    with pytest.raises(sharding.ShardingError, match=r"^mesh\.model=8 divides no dimension of parameter "
                       r"model\.layers\.mlp\.up_proj\.kernel \[2, 36, 44\] \(embed=36, ff=44\); choose a mesh\.model "
                       r"that divides one of them$"):
        sharding.resolve({"data": 1, "model": 8}, "param", ("layers", "embed", "ff"), (2, 36, 44),
                         "parameter model.layers.mlp.up_proj.kernel")
    with pytest.raises(sharding.ShardingError, match=r"factor A of layers\.\*\.fc_in \[3, 33, 33\]"):
        sharding.resolve({"data": 1, "model": 2}, "factor", ("layers", "rows", "cols"), (3, 33, 33),
                         "factor A of layers.*.fc_in")


# --------------------------------------------------------------------------- bad input, before any work


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return {**make_world(root, n_documents=16, n_queries=4), "root": root}


def _jaxinf(args, devices, tmp_path):
    import subprocess
    import sys

    from sharding_support import REPO

    env = device_env(devices)
    return subprocess.run([sys.executable, "-m", "jaxinf", *map(str, args)], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def _one_error_line(r, pattern):
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("jaxinf run: error:")]
    assert r.returncode == 2 and len(lines) == 1 and re.search(pattern, lines[0]), r.stderr[-3000:]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("extra, pattern", [
    ({"mesh.data": 3, "mesh.model": 2},
     r"mesh\.data=3 x mesh\.model=2 = 6 devices, but 8 device\(s\) are available .*make mesh\.data x mesh\.model equal 8"),
    ({"mesh.data": 8, "mesh.model": 1, "data.batch_size": 4},
     r"data\.batch_size=4 does not split over the 8 position\(s\) of the data axis"),
])
def test_bad_meshes_are_one_line_errors_before_any_work(world, tmp_path, extra, pattern):
    out = tmp_path / "run"
    r = _jaxinf(["run", *overrides(world, out, **extra)], 8, tmp_path)
    _one_error_line(r, pattern)
    assert not out.exists()


def test_a_model_the_mesh_cannot_split_is_refused_naming_the_dimension(tmp_path):
    """hidden 36, MLP 44 and a vocabulary of 44 words: mesh.model=8 divides no dimension of the output projection (nor of the MLP)."""
    from jaxinf import models

    w = make_world(tmp_path / "odd", n_documents=4, n_queries=2)
    hf = json.loads((w["model"] / "config.json").read_text())
    hf.update(hidden_size=36, intermediate_size=44, num_attention_heads=2, num_key_value_heads=2)
    tok = models.load_tokenizer(w["model"])
    models.save_hf(models.init(models.config_from_hf(hf), 0), w["model"], hf, tok)
    out = tmp_path / "run"
    r = _jaxinf(["run", *overrides(w, out, **{"mesh.data": 1, "mesh.model": 8})], 8, tmp_path)
    _one_error_line(r, r"mesh\.model=8 divides no dimension of parameter lm_head\.kernel \[36, (\d+)\] "
                       r"\(embed=36, vocab=\1\); choose a mesh\.model that divides one of them$")
    assert not out.exists()


def test_processes_with_different_configs_refuse_to_start(world, tmp_path):
    env = device_env(1)
    env.pop("XLA_FLAGS")
    out = tmp_path / "run"
    rs = run_processes(2, ["run", *overrides(world, out, **{"mesh.data": 2})], env,
                       per_process=[[], ["data.batch_size=2"]], timeout=300)
    for r in rs:
        lines = [line for line in r.stderr.strip().splitlines() if line.startswith("jaxinf run: error:")]
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
        assert lines[0].endswith("process 1 was started with another config than process 0: data.batch_size "
                                 "(4 on process 0, 2 on process 1); start every process with the same config and "
                                 "overrides"), lines[0]
    assert not out.exists()
