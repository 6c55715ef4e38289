"""The engine through jaxinf.models: layer names, capture, probe gradients, abstract models, training, Orbax.

Fixed tolerances: float64 comparisons between two computations of the same
quantity use 1e-10 (gradients) and 1e-12 (scanned vs unscanned); float32 1e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import oracle
from engine_fixtures import capture_ag
from models_support import CHECKPOINTS, hf_model, padded_batch

from jaxinf.engine import capture, scoring, stages, tasks
from jaxinf.models import ModelConfig, abstract, config_from_hf, from_hf, init
from jaxinf.models.hf import param_sources


def _loss_fn(task):
    return lambda p, b, pr: task.train_loss(p, b, pr, None)


def _batch():
    return {k: jnp.asarray(v) for k, v in padded_batch().items()}


def _expanded_names(layers):
    return [n for spec in layers.values() for n in spec.layer_names]


def _hf_linear_names(name):
    """The linear maps of the transformers model: ``nn.Linear``, GPT-2's ``Conv1D``, a mixture's router, and
    each expert's ``{gate,up,down}_proj`` (transformers 5 stores an expert layer's experts as one fused module)."""
    torch = oracle("torch")
    from transformers.pytorch_utils import Conv1D

    out = []
    for n, m in hf_model(name).named_modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)) or type(m).__name__.endswith("TopKRouter"):
            out.append(n)
        elif type(m).__name__.endswith("Experts"):
            out += [f"{n}.{e}.{p}_proj" for e in range(m.num_experts) for p in ("gate", "up", "down")]
    return out


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_tracked_layers_are_the_transformers_linear_modules(hf_checkpoint, name):
    """Every nn.Linear of the transformers model is a tracked layer of the same name, scanned or not."""
    expected = _hf_linear_names(name)
    for scan in (True, False):
        lm, _ = from_hf(hf_checkpoint(name), scan=scan, tokenizer=False)
        layers = capture.find_layers(_loss_fn(lm.task()), lm.params, _batch())
        assert sorted(_expanded_names(layers)) == sorted(expected)
        if scan:
            assert all("*" in n for n in layers if n != "lm_head")
        mlp = capture.select_layers(layers, "mlp")
        assert sorted(_expanded_names(mlp)) == sorted(n for n in expected if ".mlp." in n)


EXPECTED_MLP = {
    "llama": ["model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj", "model.layers.*.mlp.down_proj"],
    "gpt_neox": ["gpt_neox.layers.*.mlp.dense_h_to_4h", "gpt_neox.layers.*.mlp.dense_4h_to_h"],
    "cohere": ["model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj", "model.layers.*.mlp.down_proj"],
}


@pytest.mark.parametrize("family", list(EXPECTED_MLP))
def test_track_mlp_selects_the_mlp_projections(family):
    config = ModelConfig(family=family, vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2)
    lm = abstract(config)
    layers = capture.find_layers(_loss_fn(lm.task()), lm.params, _batch())
    assert list(capture.select_layers(layers, "mlp")) == EXPECTED_MLP[family]
    one = capture.select_layers(layers, ["*.1.mlp.*"])
    assert all(spec.indices == (1,) for spec in one.values())


@pytest.fixture(scope="module")
def captured(hf_checkpoint):
    """``captured(name, scan)``: tracked layers, ``capture`` of a padded batch and the weight gradients
    of the summed loss, computed in one jitted float64 program per checkpoint and layout (cached)."""
    cache = {}

    def get(name, scan):
        if (name, scan) not in cache:
            batch = _batch()
            with jax.enable_x64(True):
                lm, _ = from_hf(hf_checkpoint(name), dtype="float64", scan=scan, tokenizer=False)
                task = lm.task()
                loss_fn = _loss_fn(task)
                layers = capture.find_layers(loss_fn, lm.params, batch)

                @jax.jit
                def run(params, batch):
                    cap = capture_ag(loss_fn, params, batch, layers)
                    grads = jax.grad(lambda p: loss_fn(p, batch, None).sum())(params)
                    return cap, grads

                cache[name, scan] = (lm, layers, *jax.device_get(run(lm.params, batch)))
        return cache[name, scan]

    return get


def test_scanned_and_unscanned_capture_agree(captured):
    """a and g under jit: ``lax.scan`` over stacked layers equals the unrolled loop, layer by layer (float64)."""
    (_, l1, c1, _), (_, _, c0, _) = captured("cohere", True), captured("cohere", False)
    with jax.enable_x64(True):
        pairs = ((capture.expand(c1.a, l1), c0.a), (capture.expand(c1.g, l1), c0.g))
        for got, want in pairs:
            assert got.keys() == want.keys()
            for k in got:
                assert got[k].dtype == jnp.float64
                np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(c1.loss, c0.loss, rtol=0, atol=1e-12)


def _param(params, layer_name):
    node = params
    for part in layer_name.replace("*.", "").split("."):
        node = node[part]
    return node


@pytest.mark.parametrize(
    "name,scan", [("gpt_neox", True), ("llama_variant", True), ("cohere", True), ("cohere", False)]
)
def test_probe_gradients_are_weight_gradients(captured, name, scan):
    """``sum_n G[n] = sum_n sum_t g a^T`` from the tap equals ``d(sum of losses)/d kernel`` transposed (bias last).

    Checks that the capture names, orientation and bias column are right for
    every tracked layer (a tied ``lm_head`` shares its weight with the
    embedding lookup, so its weight gradient has a second term: skipped).
    """
    lm, layers, cap, grads = captured(name, scan)
    checked = 0
    with jax.enable_x64(True):
        for layer, spec in layers.items():
            if layer == "lm_head" and lm.config.tie_embeddings:
                continue
            G = np.asarray(capture.per_sequence_gradient(cap.a[layer], cap.g[layer])).sum(axis=-3)
            g = _param(grads, layer)
            expected = np.swapaxes(g["kernel"], -1, -2)
            if spec.bias:
                expected = np.concatenate([expected, g["bias"][..., None]], axis=-1)
            assert G.shape == expected.shape
            np.testing.assert_allclose(G, expected, rtol=0, atol=1e-10, err_msg=layer)
            assert np.abs(expected).max() > 1e-3, layer
            checked += 1
    assert checked == len(layers) - lm.config.tie_embeddings


@pytest.mark.heavy
def test_ekfac_scores_do_not_depend_on_layer_stacking(hf_checkpoint):
    """EK-FAC end to end on the MLP layers: scanned and unscanned models give the same scores (float64).

    The empirical Fisher keeps the comparison basis-independent: with 22
    tokens the covariances are rank-deficient, and with sampled labels the
    Lambda stage's fresh samples have components in their null spaces, where
    ``eigh`` of a stacked and of a single matrix may pick different bases.
    """
    b = padded_batch()
    docs = {k: jnp.asarray(v) for k, v in b.items()}
    queries = {k: jnp.asarray(v) for k, v in padded_batch(seed=1, lengths=(6, 9)).items()}
    scores = {}
    with jax.enable_x64(True):
        for scan in (True, False):
            lm, _ = from_hf(hf_checkpoint("cohere"), dtype="float64", scan=scan, tokenizer=False)
            task = lm.task()
            layers = capture.select_layers(capture.find_layers(_loss_fn(task), lm.params, docs), "mlp")
            curv, _ = stages.fit_curvature(task, layers, lm.params, [docs], strategy="ekfac", fisher="empirical")
            G, qloss = stages.query_gradients(task, layers, lm.params, queries)
            qg = scoring.prepare_queries(G, qloss, curv, None, None)
            scores[scan] = np.asarray(stages.score_batch(task, layers, lm.params, qg, docs)[0].total)
    assert scores[True].shape == (2, 3) and np.isfinite(scores[True]).all()
    np.testing.assert_allclose(scores[True], scores[False], rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- abstract models

BIG = {  # public shapes of Command R 35B (v01), Pythia 12B and Llama 2 70B
    "cohere": dict(
        architectures=["CohereForCausalLM"],
        vocab_size=256000,
        hidden_size=8192,
        intermediate_size=22528,
        num_hidden_layers=40,
        num_attention_heads=64,
        num_key_value_heads=64,
        logit_scale=0.0625,
        rope_theta=8000000.0,
        layer_norm_eps=1e-5,
        use_qk_norm=False,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "gpt_neox": dict(
        architectures=["GPTNeoXForCausalLM"],
        vocab_size=50688,
        hidden_size=5120,
        intermediate_size=20480,
        num_hidden_layers=36,
        num_attention_heads=40,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        hidden_act="gelu",
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    ),
    "llama": dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=32000,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
}


@pytest.mark.parametrize("family", list(BIG))
def test_abstract_model_of_a_large_checkpoint(family):
    """Shapes only: parameter count and every checkpoint tensor's shape agree with transformers on the meta device."""
    torch = oracle("torch")
    transformers = oracle("transformers")
    raw = BIG[family]
    lm = abstract(config_from_hf(raw, dtype="bfloat16"))
    leaves = jax.tree.leaves(lm.params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.bfloat16 for x in leaves)
    cls = {"cohere": "Cohere", "gpt_neox": "GPTNeoX", "llama": "Llama"}[family]
    hf_kwargs = {k: v for k, v in raw.items() if k != "architectures"}
    with torch.device("meta"):
        hf = getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**hf_kwargs))
    assert lm.num_params == sum(p.numel() for p in hf.parameters())
    state = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    covered = set()
    for src in param_sources(lm):
        for names in src.names:
            hit = [n for n in names if n in state]
            assert hit and state[hit[0]] == src.tensor_shape, (names, src.tensor_shape)
            covered.add(hit[0])
    tied = {"lm_head.weight"} if raw["tie_word_embeddings"] else set()
    assert set(state) - covered == tied
    # the engine can plan on it: tracked layers from shapes alone
    batch = {
        "tokens": jax.ShapeDtypeStruct((1, 8), jnp.int32),
        "mask": jax.ShapeDtypeStruct((1, 8), jnp.float32),
        "weights": jax.ShapeDtypeStruct((1, 8), jnp.float32),
    }
    layers = capture.find_layers(_loss_fn(lm.task()), lm.params, batch)
    assert sum(len(s.layer_names) for s in layers.values()) == sum(isinstance(m, torch.nn.Linear) for m in hf.modules())


# --------------------------------------------------------------------------- training and saving


def _tiny(**kw):
    base = dict(
        family="cohere",
        vocab_size=23,
        hidden_size=16,
        intermediate_size=24,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        logit_scale=0.5,
        tie_embeddings=True,
        initializer_range=0.2,
    )
    return ModelConfig(**{**base, **kw})


def test_random_init_is_seeded_and_layers_are_independent():
    a, b, c = init(_tiny(), 0), init(_tiny(), 0), init(_tiny(), 1)
    ka = a.params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_array_equal(ka, b.params["model"]["layers"]["mlp"]["up_proj"]["kernel"])
    assert not np.array_equal(ka, c.params["model"]["layers"]["mlp"]["up_proj"]["kernel"])
    assert not np.array_equal(ka[0], ka[1])
    assert abs(float(jnp.std(ka)) - 0.2) < 0.05


def test_training_with_optax_and_remat():
    """``jax.grad`` + optax on the params dict lowers the loss; remat gives the same gradients."""
    lm = init(_tiny(), 0)
    task = lm.task()
    batch = tasks.lm_batch([[1, 2, 3, 4, 5, 6, 7, 8], [3, 5, 7, 9, 11, 13], [2, 4, 6, 8, 10]])

    def loss(p, lm=lm):
        return lm.task().train_loss(p, batch, None, None).sum() / batch["weights"].sum()

    remat = init(_tiny(remat=True), 0)
    g, g_remat = jax.jit(lambda p: (jax.grad(loss)(p), jax.grad(lambda q: loss(q, remat))(p)))(lm.params)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)

    opt = optax.adam(3e-2)
    params, state = lm.params, opt.init(lm.params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    first = None
    for _ in range(40):
        params, state, value = step(params, state)
        first = float(value) if first is None else first
    assert float(loss(params)) < 0.5 * first
    assert task is not None


@pytest.mark.parametrize("scan", [True, False])
def test_orbax_round_trip(tmp_path, scan):
    ocp = pytest.importorskip("orbax.checkpoint")
    lm = init(_tiny(scan=scan), 0)
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "params", lm.params)
    with ocp.StandardCheckpointer() as ck:
        restored = ck.restore(tmp_path / "params")
    assert jax.tree.structure(restored) == jax.tree.structure(lm.params)
    tokens = jnp.asarray([[1, 2, 3, 4]])
    np.testing.assert_array_equal(lm.apply(restored, tokens, jnp.ones((1, 4))), lm(tokens))
