"""Scores against brute-force per-example gradients, their breakdowns, low rank, invariances and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_fixtures import (
    DOCS,
    QUERIES,
    doc_batch,
    layers_of,
    mlp_init,
    mlp_task,
    per_example_grads,
    query_batch,
    rel_err,
    tiny_lm,
)

from jaxinf.engine import curvature, scoring, stages, tasks
from jaxinf.engine.capture import CaptureError

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")


def _scores(task, layers, params, curv, docs_batch, qbatch, damping=None, rank=None, **kw):
    """Query gradients, preconditioning and scores, each traced once under jit."""
    G, qloss = jax.jit(lambda p, b: stages.query_gradients(task, layers, p, b))(params, qbatch)
    qg = jax.jit(lambda G, l, c: scoring.prepare_queries(G, l, c, damping, rank))(G, qloss, curv)
    return jax.jit(lambda p, q, b: stages.score_batch(task, layers, p, q, b, **kw)[0])(params, qg, docs_batch)


@pytest.mark.parametrize("track", ["all", "mlp"])
def test_identity_scores_equal_per_example_gradient_dot_products(track):
    with jax.enable_x64(True):
        task, params = tiny_lm()
        docs, queries = doc_batch(), query_batch()
        layers = layers_of(task, params, docs, track)
        scores = _scores(task, layers, params, curvature.curvature("identity"), docs, queries).total
        gd = per_example_grads(lambda p, b: task.train_loss(p, b, None, None), params, layers, docs)
        gq = per_example_grads(lambda p, b: task.measurement(p, b, None), params, layers, queries)
        assert rel_err(scores, gq @ gd.T) < 1e-10


def test_identity_on_the_mlp_task_equals_per_example_gradients():
    with jax.enable_x64(True):
        task = mlp_task("regression")
        key = jax.random.key(4)
        params = mlp_init(key, (5, 7, 3), jnp.float64)
        batch = {
            "x": jax.random.normal(key, (10, 1, 5), jnp.float64),
            "y": jax.random.normal(jax.random.fold_in(key, 1), (10, 1, 3), jnp.float64),
            "mask": jnp.ones((10, 1), jnp.float64),
        }
        layers = layers_of(task, params, batch)
        scores = _scores(task, layers, params, curvature.curvature("identity"), batch, batch).total
        g = per_example_grads(lambda p, b: task.train_loss(p, b, None, None), params, layers, batch)
        assert rel_err(scores, g @ g.T) < 1e-10


@pytest.fixture(scope="module")
def fitted():
    """EK-FAC, K-FAC, diagonal and identity curvature of the tiny GPT on DOCS (float64)."""
    with jax.enable_x64(True):
        task, params = tiny_lm()
        docs = doc_batch()
        layers = layers_of(task, params, docs, "all")
        curvs = {
            s: stages.fit_curvature(task, layers, params, [docs], strategy=s, key=jax.random.key(2))[0]
            for s in STRATEGIES
        }
    return task, params, docs, layers, curvs


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_self_influence_is_the_diagonal_of_pairwise(fitted, strategy):
    task, params, docs, layers, curvs = fitted
    with jax.enable_x64(True):
        pair = _scores(task, layers, params, curvs[strategy], docs, docs).total  # documents as their own queries
        self_ = stages.self_influence_batch(task, layers, params, curvs[strategy], None, docs)[0]
        assert rel_err(self_, np.diag(np.asarray(pair))) < 1e-10


def test_per_layer_and_per_token_scores_sum_to_the_total(fitted):
    task, params, docs, layers, curvs = fitted
    with jax.enable_x64(True):
        s = _scores(task, layers, params, curvs["ekfac"], docs, query_batch(), per_layer=True, per_token=True)
        per_layer = scoring.expand_layer_scores(s.per_layer, layers)
        assert len(per_layer) == 13  # 6 blocks x 2 layers + lm_head
        assert rel_err(sum(per_layer.values()), s.total) < 1e-12
        assert rel_err(s.per_token.sum(-1), s.total) < 1e-12
        pad = np.asarray(docs["mask"]) == 0
        assert np.all(np.asarray(s.per_token)[:, pad] == 0)
        plain = _scores(task, layers, params, curvs["ekfac"], docs, query_batch()).total
        assert rel_err(plain, s.total) < 1e-12


@pytest.mark.parametrize("order", ["tokens", "documents"])
@pytest.mark.parametrize("rank", [None, 2])
def test_both_contraction_orders_agree(fitted, order, rank):
    task, params, docs, layers, curvs = fitted
    with jax.enable_x64(True):
        ref = _scores(task, layers, params, curvs["ekfac"], docs, query_batch(), rank=rank).total
        forced = _scores(task, layers, params, curvs["ekfac"], docs, query_batch(), rank=rank, order=order).total
        assert rel_err(forced, ref) < 1e-12


def test_contraction_order_follows_the_shapes():
    assert scoring.contraction_order(B=8, T=512, Q=32, d_out=4096, d_in=4096, rank=32) == "tokens"
    assert scoring.contraction_order(B=8, T=512, Q=32, d_out=4096, d_in=4096, rank=None) == "documents"
    assert scoring.contraction_order(B=8, T=2048, Q=80, d_out=512, d_in=512, rank=32) == "documents"
    # fewer FLOPs per document, but B + Q parameter-sized matrices through memory: the tokens order is faster
    # (measured, see contraction_order); FLOPs alone would pick documents here
    B, T, Q, d_out, d_in, r = 8, 128, 16, 1024, 256, 32
    assert (
        2 * B * T * Q * r * (d_out + d_in)
        > 2 * B * T * d_out * d_in + 2 * B * Q * d_out * d_in + 2 * Q * r * d_out * d_in
    )
    assert scoring.contraction_order(B=B, T=T, Q=Q, d_out=d_out, d_in=d_in, rank=r) == "tokens"


def test_rank_r_queries_are_exact_at_the_matrix_rank(fitted):
    """P(G_q) truncated at its full rank scores exactly as P(G_q); smaller ranks are reported."""
    task, params, docs, layers, curvs = fitted
    with jax.enable_x64(True):
        G, qloss = stages.query_gradients(task, layers, params, query_batch())
        full = scoring.prepare_queries(G, qloss, curvs["ekfac"], None, None)
        ref = np.asarray(stages.score_batch(task, layers, params, full, docs)[0].total)

        def truncated(r):
            lr = {k: scoring.low_rank(p, r if r else min(p.shape[-2:])) for k, p in full.full.items()}
            return scoring.QueryGradients(
                full={}, left={k: v[0] for k, v in lr.items()}, right={k: v[1] for k, v in lr.items()}, loss=qloss
            )

        exact = stages.score_batch(task, layers, params, truncated(None), docs)[0].total
        assert rel_err(exact, ref) < 1e-10
        errors = []
        for r in (1, 4):
            approx = np.asarray(stages.score_batch(task, layers, params, truncated(r), docs)[0].total)
            corr = [np.corrcoef(approx[q], ref[q])[0, 1] for q in range(len(QUERIES))]
            print(f"rank {r}: per-query correlation with full rank {np.round(corr, 4)}")
            errors.append(rel_err(approx, ref))
            # each truncation is the best rank-r approximation (Eckart-Young): its error is the tail of the spectrum
            for P in full.full.values():
                left, right = scoring.low_rank(P, r, svd="full")
                s_all = np.linalg.svd(np.asarray(P), compute_uv=False)
                tail = np.sqrt((s_all[..., r:] ** 2).sum(-1))
                gap = np.linalg.norm(np.asarray(P - left @ jnp.swapaxes(right, -1, -2)), axis=(-2, -1))
                np.testing.assert_allclose(gap, tail, rtol=1e-8, atol=1e-12 * float(np.abs(s_all).max()))
        assert 0 < errors[1] < errors[0], errors  # a larger rank is closer to the full scores
        # prepare_queries applies the truncation only where it saves something (min(d_out, d_in') > r)
        qg = scoring.prepare_queries(G, qloss, curvs["ekfac"], None, 8)
        assert set(qg.left) == {k for k, s in layers.items() if min(s.d_out, s.d_in_aug) > 8}


# ----------------------------------------------------------------------------- the randomized truncation


def _matrices(rng, spectra, m=60, n=40):
    """``[len(spectra), m, n]`` float64 matrices with the given singular values (random singular vectors)."""
    out = []
    for s in spectra:
        U = np.linalg.qr(rng.normal(size=(m, len(s))))[0]
        V = np.linalg.qr(rng.normal(size=(n, len(s))))[0]
        out.append((U * s) @ V.T)
    return np.stack(out)


def _product(lr):
    return np.asarray(lr[0]) @ np.swapaxes(np.asarray(lr[1]), -1, -2)


@pytest.mark.parametrize("wide", [False, True])
def test_randomized_truncation_is_the_svd_within_its_sketch(wide):
    """Where ``rank(P) <= r + OVERSAMPLE`` the range finder spans ``P``'s columns, so the randomized truncation is
    the full SVD's: ``P`` itself at ``rank(P) <= r``, its best rank-r approximation otherwise."""
    rng = np.random.default_rng(0)
    r = 5
    with jax.enable_x64(True):
        exact = _matrices(rng, [np.arange(r, 0, -1.0)] * 3)  # rank r
        within = _matrices(rng, [np.linspace(10, 1, r + scoring.OVERSAMPLE)] * 3)  # rank r + oversample
        for P in (exact, within):
            P = np.swapaxes(P, -1, -2) if wide else P
            got = _product(scoring.low_rank(jnp.asarray(P), r, svd="randomized"))
            want = _product(scoring.low_rank(jnp.asarray(P), r, svd="full"))
            assert rel_err(got, want) < 1e-10
        assert rel_err(_product(scoring.low_rank(jnp.asarray(exact), r)), exact) < 1e-10


def test_randomized_truncation_error_is_near_the_optimum_and_fixed():
    """On a flat spectrum (the range finder's worst case) the error of the randomized rank-r fit stays within 5%
    of the optimal (the full SVD's) at every rank tried; the fixed key makes it the same on every call."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        P = jnp.asarray(_matrices(rng, [1 + 0.01 * np.arange(40.0)[::-1]] * 2, m=200, n=100))
        for r in (4, 16):
            got = scoring.low_rank(P, r)
            best = np.linalg.norm(np.asarray(P) - _product(scoring.low_rank(P, r, svd="full")), axis=(-2, -1))
            err = np.linalg.norm(np.asarray(P) - _product(got), axis=(-2, -1))
            assert np.all(err <= 1.05 * best), (r, err / best)
            again = scoring.low_rank(P, r)
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, again))


def test_randomized_truncation_scores_like_the_full_svd():
    """Rank-4 EK-FAC query gradients of an MLP with layers of 40 to 64 units (the elementwise division by
    ``Lambda + lambda`` makes the preconditioned gradient of even one example full rank): the randomized
    truncation's approximation error is within 0.1% of the full SVD's, and its scores within 1e-3."""
    with jax.enable_x64(True):
        task = mlp_task("regression")
        key = jax.random.key(5)
        params = mlp_init(key, (40, 64, 48), jnp.float64)
        docs = {
            "x": jax.random.normal(key, (96, 1, 40), jnp.float64),
            "y": jax.random.normal(jax.random.fold_in(key, 1), (96, 1, 48), jnp.float64),
            "mask": jnp.ones((96, 1), jnp.float64),
        }
        queries = {k: x[:6] for k, x in docs.items()}
        layers = layers_of(task, params, docs)
        curv = stages.fit_curvature(task, layers, params, [docs], strategy="ekfac", key=jax.random.key(2))[0]
        G, qloss = stages.query_gradients(task, layers, params, queries)
        full = scoring.prepare_queries(G, qloss, curv, None, None)
        r = 4
        truncate = jax.jit(lambda P: {m: scoring.low_rank(P, r, svd=m) for m in scoring.SVD_METHODS})
        for k, P in full.full.items():
            fits = truncate(P)
            best = np.linalg.norm(np.asarray(P) - _product(fits["full"]))
            assert np.linalg.norm(np.asarray(P) - _product(fits["randomized"])) <= 1.001 * best, k
        score = jax.jit(lambda q: stages.score_batch(task, layers, params, q, docs)[0].total)
        prepare = jax.jit(lambda c, svd: scoring.prepare_queries(G, qloss, c, None, r, svd=svd), static_argnums=1)
        randomized, exact = (np.asarray(score(prepare(curv, m))) for m in ("randomized", "full"))
        assert rel_err(randomized, exact) < 1e-3


def test_invariances_batch_size_padding_order_and_jit(fitted):
    task, params, docs, layers, curvs = fitted
    with jax.enable_x64(True):
        G, qloss = jax.jit(lambda p, b: stages.query_gradients(task, layers, p, b))(params, query_batch())
        qg = scoring.prepare_queries(G, qloss, curvs["ekfac"], None, 3)
        jitted = jax.jit(lambda b: stages.score_batch(task, layers, params, qg, b)[0].total)
        score = lambda b: np.asarray(jitted(b))
        ref = score(doc_batch())
        # padding and batch size: every document alone and unpadded equals its column of the padded batch
        alone = np.concatenate([score(tasks.lm_batch([d])) for d in DOCS[:3]], axis=1)
        assert rel_err(alone, ref[:, :3]) < 1e-10
        # batches of 4 and 2, padded to a longer length
        halves = np.concatenate([score(doc_batch(DOCS[:4], 12)), score(doc_batch(DOCS[4:], 12))], axis=1)
        assert rel_err(halves, ref) < 1e-10
        # order of documents
        perm = np.random.default_rng(0).permutation(len(DOCS))
        assert rel_err(score(doc_batch([DOCS[i] for i in perm])), ref[:, perm]) < 1e-10
        # curvature does not depend on how the documents are batched
        split, _ = stages.fit_curvature(
            task, layers, params, [doc_batch(DOCS[:2], 7), doc_batch(DOCS[2:], 9)], strategy="ekfac", fisher="empirical"
        )
        whole, _ = stages.fit_curvature(task, layers, params, [doc_batch()], strategy="ekfac", fisher="empirical")
        for k in layers:
            assert rel_err(split.Lambda[k], whole.Lambda[k]) < 1e-10


def test_jit_and_no_jit_agree():
    """The stages and scores give the same numbers traced under jit and run op by op."""
    with jax.enable_x64(True):
        task = mlp_task("classification")
        key = jax.random.key(5)
        params = mlp_init(key, (4, 6, 3), jnp.float64)
        batch = {
            "x": jax.random.normal(key, (12, 1, 4), jnp.float64),
            "y": jax.random.randint(key, (12, 1), 0, 3),
            "mask": jnp.ones((12, 1), jnp.float64),
        }
        layers = layers_of(task, params, batch)
        out = {}
        for jit in (True, False):
            curv, _ = stages.fit_curvature(task, layers, params, [batch], strategy="ekfac", key=key, jit=jit)
            G, qloss = stages.query_gradients(task, layers, params, batch)
            qg = scoring.prepare_queries(G, qloss, curv, None, 2)
            fn = lambda b: stages.score_batch(task, layers, params, qg, b)[0].total
            out[jit] = (curv, (jax.jit(fn) if jit else fn)(batch))
        for k in layers:
            assert rel_err(out[True][0].Lambda[k], out[False][0].Lambda[k]) < 1e-10
        assert rel_err(out[True][1], out[False][1]) < 1e-10


def test_per_nat_normalization_divides_by_the_completion_nll(fitted):
    task, params, docs, layers, curvs = fitted
    with jax.enable_x64(True):
        G, qloss = stages.query_gradients(task, layers, params, query_batch())
        qg = scoring.prepare_queries(G, qloss, curvs["ekfac"], None, None)
        raw = stages.score_batch(task, layers, params, qg, docs)[0].total
        per_nat = scoring.normalize(raw, qloss, "per_nat")
        assert rel_err(per_nat * np.asarray(qloss)[:, None], raw) < 1e-14
        with pytest.raises(ValueError, match="scores.normalize"):
            scoring.normalize(raw, qloss, "per_token")


def test_bad_input_names_the_query_or_document():
    task, params = tiny_lm(jnp.float32)
    with pytest.raises(CaptureError, match=r"query q2: empty completion"):
        stages.check_queries(tasks.lm_batch([[1, 2, 3], [4, 5, 6]], prompt_lengths=[1, 3]), ["q1", "q2"])
    docs = doc_batch()
    layers = layers_of(task, params, docs, "mlp")
    poisoned = {**params, "embed": params["embed"].at[9].set(jnp.nan)}  # token 9 occurs in documents 2 and 3
    with pytest.raises(CaptureError, match=r"document in batch 0 row 2: loss is not finite"):
        stages.run_stage(stages.covariance_stage(task, layers, "empirical"), (poisoned,), [docs], None)
    with pytest.raises(ValueError, match=r"factors.strategy: unknown strategy 'kfc'"):
        curvature.curvature("kfc")
    with pytest.raises(ValueError, match=r"factors.fisher: unknown Fisher"):
        stages.run_stage(stages.covariance_stage(task, layers, "true"), (params,), [docs], None)
