"""Mixture of experts: each expert a tracked layer over the tokens routed to it, against a dense oracle.

The oracle is per-document parameter gradients by ``jax.vmap(jax.grad(...))``
over the rows of the batch (each row's loss alone): for every expert's
``gate_proj``, ``up_proj`` and ``down_proj`` of every layer, the per-document
gradient ``sum_t g a^T`` that the engine forms from the tap's ``a`` and ``g``
equals it (float64, 1e-10), including an expert that receives no token (both
are exactly zero). The tap's ``a`` of an expert is nonzero exactly at the
tokens the router sends to it, so the expert's ``A``, ``S`` and ``Lambda`` sums
run over its own tokens. Parity of the model with transformers' Mixtral is in
test_models_parity.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from engine_fixtures import capture_ag
from models_support import padded_batch

from jaxinf import capture
from jaxinf.models import ModelConfig, abstract
from jaxinf.models.parts import route

EXPERTS, TOP_K, EMPTY = 5, 2, 4


def _model():
    """A random 1-layer mixture (5 experts, 2 per token; unit-scale weights) whose router never picks expert 4.

    Router columns ``[w0, -w0, w1, -w1, 0]``: every token has two positive logits
    from different pairs, so the zero logit of expert 4 is never among its top 2.
    (One unstacked layer: the smallest program to compile; stacked layers are
    captured alike, test_models_engine.)
    """
    config = ModelConfig(family="mixtral", vocab_size=61, hidden_size=16, intermediate_size=24, num_layers=1,
                         num_heads=4, num_kv_heads=2, num_experts=EXPERTS, experts_per_token=TOP_K,
                         dtype="float64", scan=False)
    lm = abstract(config)   # random weights drawn here (init would compile an initializer: slower)
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(
            1.0 + 0.2 * rng.standard_normal(leaf.shape) if path[-1].key == "scale" else
            rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2] if path[-1].key == "kernel" else 1)),
        lm.params)
    router = params["model"]["layers"]["0"]["mlp"]["gate"]
    w0, w1 = router["kernel"][:, 0], router["kernel"][:, 1]                  # kernel [hidden, experts]
    router["kernel"] = jnp.stack([w0, -w0, w1, -w1, jnp.zeros_like(w0)], axis=-1)
    return lm, params


def test_expert_gradients_equal_per_document_gradients_of_a_dense_oracle():
    with jax.enable_x64(True):
        lm, params = _model()
        task = lm.task()
        loss_fn = lambda p, b, pr: task.train_loss(p, b, pr, None)  # noqa: E731
        batch = {k: jnp.asarray(v) for k, v in padded_batch().items()}
        layers = capture.find_layers(loss_fn, params, batch)
        experts = capture.select_layers(layers, ["*.mlp.experts.*"])
        router = capture.select_layers(layers, ["*.mlp.gate"])
        assert len(experts) == 3 * EXPERTS
        assert list(capture.select_layers(layers, "mlp")) == [*router, *experts]   # factors.track: mlp

        def row_loss(p, tokens, mask, weights):
            one = {"tokens": tokens[None], "mask": mask[None], "weights": weights[None]}
            return loss_fn(p, one, None).sum()

        @jax.jit
        def run(params, batch):
            cap = capture_ag(loss_fn, params, batch, {**router, **experts})
            per_doc = jax.vmap(jax.grad(row_loss), in_axes=(None, 0, 0, 0))(
                params, batch["tokens"], batch["mask"], batch["weights"])
            return cap, per_doc

        cap, per_doc = run(params, batch)

        # which tokens the router sends to each expert: from the router's own input
        (router_name,) = router
        x = cap.a[router_name]                                                # [B, T, hidden]
        _, routed = route(x @ params["model"]["layers"]["0"]["mlp"]["gate"]["kernel"], TOP_K)
        routed = np.asarray(routed) & (np.asarray(batch["mask"]) > 0)[:, :, None]
        assert not routed[..., EMPTY].any()                                   # expert 4 gets no token
        assert routed[..., :EMPTY].any(axis=(0, 1)).all()                     # the others do

        for name in experts:
            expert, proj = int(name.split(".")[5]), name.split(".")[-1]
            G = np.asarray(capture.per_sequence_gradient(cap.a[name], cap.g[name]))   # [B, d_out, d_in]
            oracle = np.asarray(per_doc["model"]["layers"]["0"]["mlp"]["experts"][str(expert)][proj]["kernel"])
            oracle = np.swapaxes(oracle, -1, -2)                                      # kernel [d_in, d_out] -> G's
            np.testing.assert_allclose(G, oracle, rtol=0, atol=1e-10, err_msg=name)
            active = np.abs(np.asarray(cap.a[name])).max(-1) > 0                      # [B, T]
            np.testing.assert_array_equal(active, routed[..., expert], err_msg=name)
            if expert == EMPTY:
                assert np.abs(G).max() == 0 and np.abs(oracle).max() == 0
            else:
                assert np.abs(G).max() > 1e-6, name
