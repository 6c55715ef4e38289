"""Declared logical axes: every model parameter and every engine pytree, against the name-based rules they replaced.

Before the declarations, jaxinf chose layouts by regular expressions over Hugging
Face parameter names and by a table of pytree field names. Those rules are kept
here, and only here, as an independent oracle: a declaration that drifts from
what the layouts always were fails these tests.
"""

import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import pytest
from engine_fixtures import doc_batch, layers_of, tiny_lm

from jaxinf import models
from jaxinf.engine import curvature, scoring
from jaxinf.models.families import FAMILIES
from jaxinf.sharding.axes import REPLICATED, Axes, AxesError, declared_axes, field_axes, logical

MOE = ("mixtral", "qwen3_moe", "olmoe")

_COLUMN = (
    r"(q_proj|k_proj|v_proj|qkv_proj|query_key_value|c_attn|gate_proj|up_proj|gate_up_proj|dense_h_to_4h|c_fc|fc_in)"
)
_ROW = r"(o_proj|down_proj|dense|dense_4h_to_h|c_proj|fc_out)"
PARAM_RULES = (  # dotted parameter path -> logical axes of the trailing dims (None: replicated)
    (rf"(^|\.){_COLUMN}\.kernel$", ("embed", "ff")),
    (rf"(^|\.){_COLUMN}\.bias$", ("ff",)),
    (rf"(^|\.){_ROW}\.kernel$", ("ff", "embed")),
    (r"(^|\.)(embed_tokens|embed_in|embed_out|wte)\.(embedding|weight)$", ("vocab", "embed")),
    (r"(^|\.)wpe\.embedding$", ("positions", "embed")),
    (r"(^|\.)embed$", ("vocab", "embed")),
    (r"(^|\.)lm_head\.kernel$", ("embed", "vocab")),
    (r"\.kernel$", ("in", "out")),
    (r".*", None),
)
FIELD_RULES = {  # engine pytree field -> (family, logical axes of the trailing dims)
    "A": ("factor", ("rows", "cols")),
    "S": ("factor", ("rows", "cols")),
    "Q_A": ("factor", ("rows", "cols")),
    "Q_S": ("factor", ("rows", "cols")),
    "Lambda": ("factor", ("rows", "cols")),
    "e_A": ("eigenvalues", ("rows",)),
    "e_S": ("eigenvalues", ("rows",)),
    "full": ("query", ("queries", "rows", "cols")),
    "left": ("query", ("queries", "rows", "rank")),
    "right": ("query", ("queries", "cols", "rank")),
    "count": ("replicated", ()),
    "loss": ("replicated", ()),
}


def param_axes(path: str, ndim: int) -> tuple[str, ...]:
    """The old rule: logical axes of a parameter from its dotted path, leading axes ``layers``."""
    axes = next(a for pattern, a in PARAM_RULES if re.search(pattern, path))
    if axes is None or len(axes) > ndim:
        return ("replicated",) * ndim
    return ("layers",) * (ndim - len(axes)) + axes


def logical_axes(field: str, ndim: int) -> tuple[str, tuple[str, ...]]:
    """The old rule: ``(family, axes)`` of an engine array under dataclass field ``field``."""
    family, axes = FIELD_RULES[field]
    if family == "replicated" or len(axes) > ndim:
        return "replicated", ("replicated",) * ndim
    return family, ("layers",) * (ndim - len(axes)) + axes


def _configs(family):
    """Tiny configs of a family: stacked and unstacked layers, tied and untied head, with and without biases."""
    for scan, tie, bias in itertools.product((True, False), (False, True), (True, False)):
        kw = dict(
            family=family,
            vocab_size=11,
            hidden_size=8,
            intermediate_size=12,
            num_layers=2,
            num_heads=2,
            scan=scan,
            tie_embeddings=tie,
            attention_bias=bias,
            mlp_bias=bias,
            qk_norm=True,
        )
        if family in MOE:
            kw.update(num_experts=3, experts_per_token=2)
        yield models.ModelConfig(**kw)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_declared_parameter_axes_equal_the_name_rules(family):
    """Each parameter's declared axes are what the old regular expressions over its path give."""
    for config in _configs(family):
        lm = models.abstract(config)
        declared = models.parameter_paths(declared_axes(lm.params, models.parameter_axes(config)))
        leaves = models.parameter_paths(lm.params)
        assert declared.keys() == leaves.keys()
        for path, leaf in leaves.items():
            axes = param_axes(path, leaf.ndim)
            family_rule = "replicated" if axes and axes[-1] == "replicated" else "param"
            assert (declared[path].family, declared[path].names) == (family_rule, axes), (config, path)


def _innermost_field(path):
    names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
    return names[-1] if names else ""


def _engine_trees():
    """Abstract covariance, eigen, Lambda, curvature and query-gradient trees of the tiny GPT (stacked blocks)."""
    task, params = tiny_lm(jnp.float32)
    layers = layers_of(task, params, doc_batch())
    state = jax.eval_shape(lambda: curvature.covariance_init(layers))
    cov = jax.eval_shape(curvature.covariance_finalize, state)
    eigen = jax.eval_shape(curvature.eigendecompose, cov)
    lstate = jax.eval_shape(lambda: curvature.lambda_init(layers))
    Lambda = jax.eval_shape(curvature.lambda_finalize, lstate)
    trees = {"covariance state": state, "covariance": cov, "eigen": eigen, "lambda state": lstate}
    G = {k: jnp.zeros(s.lead + (3, s.d_out, s.d_in_aug)) for k, s in layers.items()}
    for strategy in curvature.STRATEGIES:
        curv = (
            jax.eval_shape(lambda e, L: curvature.curvature(strategy, e, L), eigen, Lambda)
            if strategy != "identity"
            else curvature.curvature("identity")
        )
        trees[f"curvature {strategy}"] = curv
        for rank in (None, 2):
            trees[f"queries {strategy} rank {rank}"] = jax.eval_shape(
                lambda G, c: scoring.prepare_queries(G, jnp.zeros(3), c, None, rank), G, curv
            )
    return trees, Lambda


def test_declared_engine_axes_equal_the_field_name_rules():
    """Each array of every engine pytree gets the (family, axes) that the old field-name table gives it."""
    trees, Lambda = _engine_trees()
    for what, tree in trees.items():
        declared = declared_axes(tree)
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        got = jax.tree.leaves(declared)
        assert len(got) == len(flat), what
        for (path, leaf), axes in zip(flat, got):
            family, names = logical_axes(_innermost_field(path), len(leaf.shape))
            assert (axes.family, axes.names) == (family, names), (what, path)
    # a bare field value (the finalized Lambda) takes its field's declaration, as field="Lambda" did
    for axes, leaf in zip(
        jax.tree.leaves(declared_axes(Lambda, field_axes(curvature.LambdaState, "Lambda"))), jax.tree.leaves(Lambda)
    ):
        assert (axes.family, axes.names) == logical_axes("Lambda", len(leaf.shape))


def test_leading_axes_are_layers_and_short_arrays_are_replicated():
    assert Axes("factor", ("rows", "cols")).of_rank(4) == Axes("factor", ("layers", "layers", "rows", "cols"))
    assert Axes("factor", ("rows", "cols")).of_rank(1) == Axes("replicated", ("replicated",))
    assert REPLICATED.of_rank(2) == Axes("replicated", ("replicated", "replicated"))


def test_an_array_without_a_declared_layout_is_an_error():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class Half:
        declared: dict = logical("factor", "rows", "cols")
        forgotten: dict = dataclasses.field()

    tree = Half({"b": jnp.zeros((2, 2))}, {"b": jnp.zeros((2, 2))})
    with pytest.raises(AxesError, match=r"^state: Half\.forgotten: no logical axes declared"):
        declared_axes(tree, what="state")
    with pytest.raises(AxesError, match=r"^\['blocks'\]\['b'\]: an array \(2, 2\) with no declared logical axes"):
        declared_axes({"blocks": {"b": jnp.zeros((2, 2))}})
    with pytest.raises(AxesError, match=r"^Scores\.total: no logical axes declared"):
        declared_axes(scoring.Scores(jnp.zeros((2, 3))))
    with pytest.raises(AxesError, match=r"^Half\.forgotten: no logical axes declared"):
        field_axes(Half, "forgotten")
    with pytest.raises(AxesError, match="do not have the tree's structure"):
        declared_axes({"a": jnp.zeros(2)}, {"b": REPLICATED}, what="params")
