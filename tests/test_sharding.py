"""Sharded stages on 8 simulated CPU devices: equal to one device on every mesh, the expected collectives,
sharded (never replicated) factors, the partition rules, and one-line errors before any work.

The multi-device work runs in subprocesses (see sharding_support.py): the device
count is fixed when jax starts, and this process keeps its single device.
"""

from __future__ import annotations

import pytest
from sharding_support import FSDP_MESHES, MESHES, TOLERANCE, run_worker

from jaxinf.sharding import partitioning


@pytest.fixture(scope="module")
def stages_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    return run_worker("stages", root / "report.json", devices=8, cache=root / "xla-cache")


@pytest.mark.parametrize("mesh", [f"{d}x{m}" for d, m in MESHES] + [f"{d}x{m}-fsdp" for d, m in FSDP_MESHES])
def test_every_stage_equals_one_device(stages_report, mesh):
    """A, S, the eigendecomposition, Lambda, the query gradients and the scores, each from the same inputs; also with
    the parameters split over data (``mesh.fsdp``, gathered one layer at a time)."""
    errors = stages_report["meshes"][mesh]["errors"]
    assert set(errors) == {
        "A",
        "S",
        "eigen",
        "Lambda",
        "queries",
        "queries_identity",
        "queries_diagonal",
        "queries_kfac",
        "scores",
    }
    assert all(e <= TOLERANCE for e in errors.values()), errors


def test_compiled_programs_hold_the_expected_collectives(stages_report):
    for data, model in MESHES:
        c = stages_report["meshes"][f"{data}x{model}"]["collectives"]
        for stage in ("covariance", "lambda"):  # sums over documents reduced over `data` inside the step
            if data > 1:
                assert {"all-reduce", "reduce-scatter"} & set(c[stage]), (data, model, stage, c[stage])
        assert "all-to-all" in c["eigen"], c["eigen"]  # whole matrices moved to their devices, and back
        if model > 1:  # parameters / query gradients split over `model`
            assert c["scores"], (data, model)
        else:  # pure data parallelism: nothing to exchange
            assert c["scores"] == [], c["scores"]


def test_factors_and_queries_stay_sharded(stages_report):
    """No factor, eigenbasis, Lambda or query gradient is replicated on every device; parameters are split on model."""
    for data, model in MESHES:
        layouts = stages_report["meshes"][f"{data}x{model}"]["layouts"]
        # query gradients live on `model` only (every data shard scores its documents against all of them)
        for kind in ("covariance", "covariance_state", "eigen", "Lambda") + (("queries",) if model > 1 else ()):
            for name, leaf in layouts[kind].items():
                if len(leaf["shape"]) >= 3:
                    assert not leaf["replicated"], (data, model, kind, name, leaf)
        # A is [2 layers, 32, 32]: rows on model, columns on data, wherever they divide
        want = {
            (8, 1): "P(None, None, 'data')",
            (4, 2): "P(None, 'model', 'data')",
            (2, 4): "P(None, 'model', 'data')",
            (1, 8): "P(None, 'model', None)",
        }
        a = layouts["covariance"][".A['model.layers.*.mlp.up_proj']"]
        assert a["spec"] == want[(data, model)], a
        if model > 1:
            kernel = layouts["params"]["['model']['layers']['mlp']['up_proj']['kernel']"]
            assert kernel["spec"] == "P(None, None, 'model')", kernel  # [L, hidden, ff]: ff on model
        scores = layouts["scores"]["['scores']"]
        assert scores["spec"] == "P(None, 'data')" and scores["replicated"] == (data == 1), scores  # columns on data


def test_fsdp_splits_parameters_over_both_axes_and_gathers_them_in_the_layer_loop(stages_report):
    """With ``mesh.fsdp`` every large parameter and query gradient is stored over ``data`` and ``model`` (1/8 of it
    per device on 4x2, against 1/2 without), and the steps that run the model gather it over ``data`` (all-gather), one layer's slice
    at a time inside the layer loop: the stored stack is never whole on a device (no full rematerialization,
    below), and the results equal one device's (above)."""
    for data, model in FSDP_MESHES:
        r = stages_report["meshes"][f"{data}x{model}-fsdp"]
        plain = stages_report["meshes"][f"{data}x{model}"]
        kernel = "['model']['layers']['mlp']['up_proj']['kernel']"
        assert r["layouts"]["params"][kernel]["spec"] == "P(None, 'data', 'model')", r["layouts"]["params"][kernel]
        assert plain["layouts"]["params"][kernel]["spec"] == "P(None, None, 'model')"
        embedding = r["layouts"]["params"]["['model']['embed_tokens']['embedding']"]
        assert embedding["spec"] == "P('model', 'data')", embedding
        for stage in ("covariance", "lambda", "queries", "scores"):  # more gathers than with parameters on model only
            count = {name: c["collectives"][stage].count("all-gather") for name, c in (("fsdp", r), ("plain", plain))}
            assert count["fsdp"] > count["plain"], (stage, count)
        # the stored query gradients too: over data as well as model (the scoring step gathers each layer's)
        for name, leaf in r["layouts"]["queries"].items():
            if len(leaf["shape"]) >= 3:
                assert "data" in leaf["spec"] and "model" in leaf["spec"], (name, leaf)
                before = plain["layouts"]["queries"][name]
                assert "data" not in before["spec"], (name, before)


def test_no_full_rematerialization(stages_report):
    """XLA never had to replicate an array to change its layout (it warns when it does)."""
    assert "Involuntary full rematerialization" not in stages_report["stderr"]


@pytest.mark.heavy
def test_factors_split_along_their_layers_are_sliced_without_gathering_the_stack(tmp_path):
    """A Llama with MLP biases on 2x4: its factors' odd rows go on the layer axis when stored; the layer loops of
    Lambda, query preparation and scoring re-lay them out (``partitioning.streamed``) instead of letting XLA
    replicate the stack, and every result equals one device's. Heavy (about a minute on 2 cores: eight simulated
    devices compile every step); ``test_streamed_moves_a_layer_split_onto_padded_rows`` checks the layout in CI."""
    r = run_worker("biased", tmp_path / "biased.json")
    assert r["Q_A_spec"] == "P(('model', 'data'), None, None)", r  # the case at hand: stored split along layers
    assert all(e < TOLERANCE for e in r["errors"].values()), r["errors"]
    assert "Involuntary full rematerialization" not in r["stderr"]


# --------------------------------------------------------------------------- the rules, without devices


def test_rules_pick_the_first_dimension_that_divides():
    mesh = {"data": 4, "model": 8}
    resolve = partitioning.resolve
    assert resolve(mesh, "factor", ("layers", "rows", "cols"), (40, 8192, 8192), "A") == partitioning.P(
        None, "model", "data"
    )
    # a bias makes d_in + 1 odd: the factor of such a layer goes on the layer axis (both mesh axes if they fit)
    assert resolve(mesh, "factor", ("layers", "rows", "cols"), (32, 2049, 2049), "A") == partitioning.P(
        ("model", "data"), None, None
    )
    assert resolve(mesh, "factor", ("layers", "rows", "cols"), (24, 2049, 2049), "A") == partitioning.P(
        "model", None, None
    )  # 24 layers: split on model, replicated over data
    # Lambda [L, d_out, d_in + 1]: rows on model; the odd columns cannot take data, the rows can
    assert resolve(mesh, "factor", ("layers", "rows", "cols"), (24, 8192, 2049), "Lambda") == partitioning.P(
        None, ("model", "data"), None
    )
    # a parameter whose feature dimension does not divide falls back to its other dimension
    assert resolve(mesh, "param", ("vocab", "embed"), (50277, 2048), "embedding") == partitioning.P(None, "model")


def test_streamed_moves_a_layer_split_onto_padded_rows():
    """Inside a step traced under a mesh, a stack split along its layers is padded along its rows to a multiple
    of the devices that split the layers, and those devices move to the rows; other stacks are untouched."""
    import jax
    import jax.numpy as jnp

    from jaxinf.sharding.axes import Axes

    declared = {
        "A": Axes("factor", ("rows", "cols")),
        "e": Axes("eigenvalues", ("rows",)),
        "even": Axes("factor", ("rows", "cols")),
    }
    tree = {"A": jnp.zeros((32, 2049, 2049)), "e": jnp.zeros((32, 2049)), "even": jnp.zeros((32, 1024, 1024))}
    mesh = jax.sharding.AbstractMesh((4, 8), ("data", "model"))

    def traced(t):
        with jax.sharding.use_abstract_mesh(mesh):
            return partitioning.streamed(t, declared)

    out = jax.eval_shape(traced, tree)
    assert isinstance(out["A"], partitioning.Padded) and out["A"].shape == (2049, 2049)
    assert out["A"].array.shape == (32, 2080, 2049)  # 2049 rows padded to a multiple of 8 x 4 devices
    assert isinstance(out["e"], partitioning.Padded) and out["e"].array.shape == (32, 2056)  # model only: 8
    assert not isinstance(out["even"], partitioning.Padded)  # rows on model, columns on data: already whole layers
    x = jnp.arange(2 * 5 * 3.0).reshape(2, 5, 3)
    assert (
        partitioning.unpadded({"x": partitioning.Padded(jnp.pad(x, ((0, 0), (0, 3), (0, 0))), (5, 3))})["x"] == x
    ).all()
    assert partitioning.streamed(tree, declared) is tree  # outside a mesh: nothing to do


def test_a_dimension_the_model_axis_does_not_divide_is_named():
    with pytest.raises(
        partitioning.ShardingError,
        match=r"^mesh\.model=8 divides no dimension of parameter "
        r"model\.layers\.mlp\.up_proj\.kernel \[2, 36, 44\] \(embed=36, ff=44\); choose a mesh\.model "
        r"that divides one of them$",
    ):
        partitioning.resolve(
            {"data": 1, "model": 8},
            "param",
            ("layers", "embed", "ff"),
            (2, 36, 44),
            "parameter model.layers.mlp.up_proj.kernel",
        )
    with pytest.raises(partitioning.ShardingError, match=r"factor A of layers\.\*\.fc_in \[3, 33, 33\]"):
        partitioning.resolve(
            {"data": 1, "model": 2}, "factor", ("layers", "rows", "cols"), (3, 33, 33), "factor A of layers.*.fc_in"
        )


def test_both_executors_declare_the_executor_interface():
    """The pipeline drives stages only through executor.Executor; both executors provide every part of it."""
    import jax

    from jaxinf.run.executor import DeviceExecutor, Executor, MeshExecutor
    from jaxinf.sharding.meshes import make_mesh

    mesh = make_mesh(1, 1, jax.devices()[:1])
    for executor in (DeviceExecutor(), MeshExecutor(mesh, batch_size=4)):
        assert isinstance(executor, Executor), type(executor)
    assert DeviceExecutor().mesh is None and MeshExecutor(mesh).mesh is mesh


def test_blas_thread_limits_are_restored_after_the_block():
    """hostenv's limits hold inside the ``with`` block only: the process's BLAS pools are as they were after it."""
    import scipy.linalg  # noqa: F401  (the BLAS that lapack_threads limits, loaded before the outer limit)
    from threadpoolctl import threadpool_info, threadpool_limits

    from jaxinf.hostenv import lapack_threads

    def blas():
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    with threadpool_limits(limits=3, user_api="blas"):
        with lapack_threads(1):
            inside = blas()
        after = blas()
    assert inside and set(inside) == {1}, inside
    assert set(after) == {3}, after
