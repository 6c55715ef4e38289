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

from jaxinf.engine import capture
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
    config = ModelConfig(
        family="mixtral",
        vocab_size=61,
        hidden_size=16,
        intermediate_size=24,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        num_experts=EXPERTS,
        experts_per_token=TOP_K,
        dtype="float64",
        scan=False,
    )
    lm = abstract(config)  # random weights drawn here (init would compile an initializer: slower)
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(
            1.0 + 0.2 * rng.standard_normal(leaf.shape)
            if path[-1].key == "scale"
            else rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2] if path[-1].key == "kernel" else 1)
        ),
        lm.params,
    )
    router = params["model"]["layers"]["0"]["mlp"]["gate"]
    w0, w1 = router["kernel"][:, 0], router["kernel"][:, 1]  # kernel [hidden, experts]
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
        assert list(capture.select_layers(layers, "mlp")) == [*router, *experts]  # factors.track: mlp

        def row_loss(p, tokens, mask, weights):
            one = {"tokens": tokens[None], "mask": mask[None], "weights": weights[None]}
            return loss_fn(p, one, None).sum()

        @jax.jit
        def run(params, batch):
            cap = capture_ag(loss_fn, params, batch, {**router, **experts})
            per_doc = jax.vmap(jax.grad(row_loss), in_axes=(None, 0, 0, 0))(
                params, batch["tokens"], batch["mask"], batch["weights"]
            )
            return cap, per_doc

        cap, per_doc = run(params, batch)

        # which tokens the router sends to each expert: from the router's own input
        (router_name,) = router
        x = cap.a[router_name]  # [B, T, hidden]
        _, routed = route(x @ params["model"]["layers"]["0"]["mlp"]["gate"]["kernel"], TOP_K)
        routed = np.asarray(routed) & (np.asarray(batch["mask"]) > 0)[:, :, None]
        assert not routed[..., EMPTY].any()  # expert 4 gets no token
        assert routed[..., :EMPTY].any(axis=(0, 1)).all()  # the others do

        for name in experts:
            expert, proj = int(name.split(".")[5]), name.split(".")[-1]
            G = np.asarray(capture.per_sequence_gradient(cap.a[name], cap.g[name]))  # [B, d_out, d_in]
            oracle = np.asarray(per_doc["model"]["layers"]["0"]["mlp"]["experts"][str(expert)][proj]["kernel"])
            oracle = np.swapaxes(oracle, -1, -2)  # kernel [d_in, d_out] -> G's
            np.testing.assert_allclose(G, oracle, rtol=0, atol=1e-10, err_msg=name)
            active = np.abs(np.asarray(cap.a[name])).max(-1) > 0  # [B, T]
            np.testing.assert_array_equal(active, routed[..., expert], err_msg=name)
            if expert == EMPTY:
                assert np.abs(G).max() == 0 and np.abs(oracle).max() == 0
            else:
                assert np.abs(G).max() > 1e-6, name


def test_expert_factors_are_averages_over_its_own_tokens_against_a_dense_oracle():
    """Each expert's ``A``, ``S`` (covariance stage) and ``Lambda`` (eigenvalue correction) over its own tokens.

    Oracle, float64, 1e-10: ``A_e = sum_{routed (n,t)} a a^T / N_e`` and ``S_e`` alike, with ``a``, ``g`` the tap's
    and the routed tokens ``N_e`` from the router; ``Lambda_e = sum_n (Q_S^T G[n] Q_A)^2 / N_seq,e`` with ``G[n]``
    the ``vmap(grad)`` per-document gradient and ``N_seq,e`` the sequences with a token routed to ``e``. The router
    (an ordinary layer) counts every token. The expert that receives no token has count 0 and zero factors, and the
    scores and self-influence (heuristic damping, which is 0 for it) stay finite, that expert contributing nothing.
    """
    from jaxinf.engine import stages

    with jax.enable_x64(True):
        lm, params = _model()
        task = lm.task()
        loss_fn = lambda p, b, pr: task.train_loss(p, b, pr, None)  # noqa: E731
        batch = {k: jnp.asarray(v) for k, v in padded_batch().items()}
        found = capture.find_layers(loss_fn, params, batch)
        layers = capture.select_layers(found, ["*.mlp.gate", "*.mlp.experts.*"])
        (router_name,) = capture.select_layers(found, ["*.mlp.gate"])

        def row_loss(p, tokens, mask, weights):
            one = {"tokens": tokens[None], "mask": mask[None], "weights": weights[None]}
            return loss_fn(p, one, None).sum()

        @jax.jit
        def oracle_inputs(params, batch):
            cap = capture_ag(loss_fn, params, batch, layers)
            per_doc = jax.vmap(jax.grad(row_loss), in_axes=(None, 0, 0, 0))(
                params, batch["tokens"], batch["mask"], batch["weights"]
            )
            return cap, per_doc

        cap, per_doc = oracle_inputs(params, batch)
        curv, pieces = stages.fit_curvature(task, layers, params, [batch], strategy="ekfac", fisher="empirical")
        cov, eigen = pieces["covariance"], pieces["eigen"]

        mask = np.asarray(batch["mask"]) > 0
        _, routed = route(cap.a[router_name] @ params["model"]["layers"]["0"]["mlp"]["gate"]["kernel"], TOP_K)
        routed = np.asarray(routed) & mask[:, :, None]  # [B, T, experts]
        assert float(cov.count[router_name]) == mask.sum()

        for name in layers:
            if name == router_name:
                continue
            expert, proj = int(name.split(".")[5]), name.split(".")[-1]
            r = routed[..., expert]
            n_tok, n_seq = r.sum(), r.any(-1).sum()
            assert float(cov.count[name]) == n_tok, name
            a = np.asarray(cap.a[name]) * r[..., None]
            g = np.asarray(cap.g[name]) * r[..., None]
            A = np.einsum("bti,btj->ij", a, a) / max(n_tok, 1)
            S = np.einsum("bti,btj->ij", g, g) / max(n_tok, 1)
            np.testing.assert_allclose(np.asarray(cov.A[name]), A, rtol=0, atol=1e-10, err_msg=name)
            np.testing.assert_allclose(np.asarray(cov.S[name]), S, rtol=0, atol=1e-10, err_msg=name)
            G = np.swapaxes(
                np.asarray(per_doc["model"]["layers"]["0"]["mlp"]["experts"][str(expert)][proj]["kernel"]), -1, -2
            )  # [B, d_out, d_in]
            Q_A, Q_S = np.asarray(eigen.Q_A[name]), np.asarray(eigen.Q_S[name])
            Lambda = np.sum((Q_S.T @ G @ Q_A) ** 2, axis=0) / max(n_seq, 1)
            np.testing.assert_allclose(np.asarray(curv.Lambda[name]), Lambda, rtol=0, atol=1e-10, err_msg=name)
            if expert == EMPTY:
                assert n_tok == 0 and n_seq == 0
                for x in (cov.A[name], cov.S[name], curv.Lambda[name]):
                    assert np.isfinite(np.asarray(x)).all() and np.abs(np.asarray(x)).max() == 0, name
            else:
                assert 0 < n_tok < mask.sum() and np.abs(A).max() > 1e-6 and np.abs(S).max() > 1e-12, name

        @jax.jit
        def scores_of(params, curv, batch):
            queries = stages.prepared_queries(task, layers, params, batch, curv, None, None)
            return stages.score_batch(task, layers, params, queries, batch, per_layer=True, curv=curv)[0]

        scores = scores_of(params, curv, batch)
        assert np.isfinite(np.asarray(scores.total)).all() and np.isfinite(np.asarray(scores.self)).all()
        assert np.abs(np.asarray(scores.total)).max() > 0
        for name in layers:
            if ".experts.4." in name:
                assert np.abs(np.asarray(scores.per_layer[name])).max() == 0, name
