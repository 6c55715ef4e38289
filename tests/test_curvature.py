"""Curvature stages against dense oracles built explicitly on tiny layers (float64)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_fixtures import capture_ag, layers_of, mlp_init, mlp_task, rel_err

from jaxinf.engine import capture, curvature, stages, tasks, testing
from jaxinf.engine.curvature import Covariance

TOL = 1e-10  # float64 agreement with the dense oracles


def _mlp_setup(n=24, sizes=(3, 4, 2), seed=0):
    task = mlp_task("classification")
    key = jax.random.key(seed)
    params = mlp_init(key, sizes, jnp.float64)
    x = jax.random.normal(jax.random.fold_in(key, 1), (n, 1, sizes[0]), jnp.float64)
    y = jax.random.randint(jax.random.fold_in(key, 2), (n, 1), 0, sizes[-1])
    batch = {"x": x, "y": y, "mask": jnp.ones((n, 1), jnp.float64)}
    layers = capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), params, batch)
    return task, params, batch, layers


def _dense_pieces(task, params, batch, layers, name):
    """Oracle per-example gradients vec(G[n]) (row-major [d_out, d_in']) and per-token a, g, with numpy."""
    cap = capture_ag(lambda p, b, pr: task.train_loss(p, b, pr, None), params, batch, layers)
    a = np.asarray(cap.a[name]).reshape(-1, cap.a[name].shape[-1])
    g = np.asarray(cap.g[name]).reshape(-1, cap.g[name].shape[-1])
    G = np.einsum("bto,bti->boi", np.asarray(cap.g[name]), np.asarray(cap.a[name]))
    return a, g, G.reshape(G.shape[0], -1), G.shape[1:]


def test_ekfac_lambda_is_the_fisher_diagonal_in_the_kronecker_eigenbasis():
    with jax.enable_x64(True):
        task, params, batch, layers = _mlp_setup()
        curv, pieces = stages.fit_curvature(task, layers, params, [batch], strategy="ekfac", fisher="empirical")
        for name in layers:
            a, g, vecG, shape = _dense_pieces(task, params, batch, layers, name)
            n = vecG.shape[0]
            A, S = a.T @ a / len(a), g.T @ g / len(g)
            cov = pieces["covariance"]
            assert rel_err(cov.A[name], A) < TOL and rel_err(cov.S[name], S) < TOL
            eig = pieces["eigen"]
            Q_A, Q_S = np.asarray(eig.Q_A[name]), np.asarray(eig.Q_S[name])
            assert rel_err(Q_A @ np.diag(np.asarray(eig.e_A[name])) @ Q_A.T, A) < TOL
            assert rel_err(Q_S @ np.diag(np.asarray(eig.e_S[name])) @ Q_S.T, S) < TOL
            F = vecG.T @ vecG / n  # the layer's Fisher (1/N) sum vec(G) vec(G)^T
            Q = np.kron(Q_S, Q_A)  # row-major vec: vec(Q_S^T G Q_A) = Q^T vec(G)
            oracle = np.diag(Q.T @ F @ Q).reshape(shape)
            assert rel_err(curv.Lambda[name], oracle) < TOL, name


def test_diagonal_lambda_is_the_fisher_diagonal():
    with jax.enable_x64(True):
        task, params, batch, layers = _mlp_setup()
        curv, _ = stages.fit_curvature(task, layers, params, [batch], strategy="diagonal", fisher="empirical")
        for name in layers:
            _, _, vecG, shape = _dense_pieces(task, params, batch, layers, name)
            oracle = np.diag(vecG.T @ vecG / len(vecG)).reshape(shape)
            assert rel_err(curv.Lambda[name], oracle) < TOL


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_kfac_and_ekfac_preconditioning_equal_dense_solves(damping):
    with jax.enable_x64(True):
        task, params, batch, layers = _mlp_setup()
        qbatch = jax.tree.map(lambda x: x[:3], batch)
        G, _ = stages.query_gradients(task, layers, params, qbatch)
        for strategy in ("kfac", "ekfac"):
            curv, pieces = stages.fit_curvature(task, layers, params, [batch], strategy=strategy, fisher="empirical")
            P = curvature.precondition(G, curv, curvature.damping(curv, damping))
            for name in layers:
                a, g, vecG, shape = _dense_pieces(task, params, batch, layers, name)
                d = int(np.prod(shape))
                if strategy == "kfac":
                    A, S = a.T @ a / len(a), g.T @ g / len(g)
                    M = np.kron(S, A) + damping * np.eye(d)  # (A kron S + lambda I) in row-major vec
                else:
                    eig = pieces["eigen"]
                    Q = np.kron(np.asarray(eig.Q_S[name]), np.asarray(eig.Q_A[name]))
                    M = Q @ np.diag(np.asarray(curv.Lambda[name]).ravel()) @ Q.T + damping * np.eye(d)
                q = np.asarray(G[name]).reshape(3, d)
                oracle = np.linalg.solve(M, q.T).T.reshape((3,) + shape)
                assert rel_err(P[name], oracle) < 1e-9, (strategy, name)


def test_heuristic_damping_is_a_tenth_of_the_mean_lambda_per_layer():
    with jax.enable_x64(True):
        task, params, batch, layers = _mlp_setup()
        curv, _ = stages.fit_curvature(task, layers, params, [batch], strategy="ekfac", fisher="empirical")
        damp = curvature.damping(curv, None)
        for name in layers:
            assert float(damp[name]) == pytest.approx(0.1 * float(np.mean(np.asarray(curv.Lambda[name]))), rel=1e-14)


def test_large_damping_tends_to_the_identity_score():
    """lambda * I(q, n) -> <G_q, G_n> as lambda grows (the preconditioner tends to I / lambda)."""
    with jax.enable_x64(True):
        from jaxinf.engine import scoring

        task, params, batch, layers = _mlp_setup()
        qbatch = jax.tree.map(lambda x: x[:3], batch)
        G, qloss = stages.query_gradients(task, layers, params, qbatch)
        ident = scoring.prepare_queries(G, qloss, curvature.curvature("identity"), None, None)
        reference = np.asarray(stages.score_batch(task, layers, params, ident, batch)[0].total)
        curv, _ = stages.fit_curvature(task, layers, params, [batch], strategy="ekfac", fisher="empirical")
        errors = []
        for lam in (1e-2, 1e0, 1e2, 1e4, 1e6):
            qg = scoring.prepare_queries(G, qloss, curv, lam, None)
            scores = np.asarray(stages.score_batch(task, layers, params, qg, batch)[0].total)
            errors.append(rel_err(lam * scores, reference))
        assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
        assert errors[-1] < 1e-5


def test_eigendecomposition_guards():
    with jax.enable_x64(True):
        M = jnp.array([[2.0, 1.0 + 1e-12], [1.0, 2.0]])  # slightly asymmetric: symmetrized
        e, Q = curvature.symmetric_eigh(M)
        assert rel_err(Q @ jnp.diag(e) @ Q.T, 0.5 * (M + M.T)) < 1e-14
        neg = jnp.array([[1.0, 0.0], [0.0, -1e-18]])  # round-off negative eigenvalue: clipped
        e, _ = curvature.symmetric_eigh(neg)
        assert float(e.min()) == 0.0
        cov = Covariance(A={"w": jnp.eye(3)}, S={"w": 2 * jnp.eye(2)}, count={"w": jnp.ones(())})
        eig = curvature.eigendecompose(cov)
        assert eig.Q_A["w"].dtype == jnp.float64


def test_a_layer_with_no_token_has_zero_finite_curvature_and_contributes_nothing():
    """Per-layer counts ``[*lead]``: a layer (here layer 1 of a stacked block) with count 0 finalizes to
    ``A = S = Lambda = 0``, not NaN, and ``1 / (Lambda + lambda)`` is 0 where ``Lambda + lambda = 0``."""
    spec = capture.LayerSpec("b.*.w", d_in=3, d_out=2, bias=False, stack=2)
    state = curvature.covariance_init({"b.*.w": spec})
    assert state.count["b.*.w"].shape == (2,)
    stats = {
        "b.*.w": {
            "A": jnp.stack([2 * jnp.eye(3), jnp.zeros((3, 3))]),
            "S": jnp.stack([4 * jnp.eye(2), jnp.zeros((2, 2))]),
            "count": jnp.array([2.0, 0.0]),
        }
    }
    cov = curvature.covariance_finalize(curvature.covariance_update(state, stats))
    np.testing.assert_array_equal(cov.A["b.*.w"], jnp.stack([jnp.eye(3), jnp.zeros((3, 3))]))
    np.testing.assert_array_equal(cov.S["b.*.w"], jnp.stack([2 * jnp.eye(2), jnp.zeros((2, 2))]))
    lam = curvature.lambda_init({"b.*.w": spec})
    lam = curvature.lambda_update(
        lam, {"b.*.w": {"Lambda": jnp.stack([3 * jnp.ones((2, 3)), jnp.zeros((2, 3))]), "count": jnp.array([3.0, 0.0])}}
    )
    Lambda = curvature.lambda_finalize(lam)["b.*.w"]
    np.testing.assert_array_equal(Lambda, jnp.stack([jnp.ones((2, 3)), jnp.zeros((2, 3))]))
    inv = curvature.inverse_eigenvalues(Lambda, curvature.block_damping(Lambda, None))
    np.testing.assert_allclose(inv[0], 1 / 1.1, rtol=1e-6)
    np.testing.assert_array_equal(inv[1], 0.0)


def _exact_sampled_fisher_S(apply, params, tokens, mask, weights, layers, vocab):
    """E over labels drawn from the model of sum_t g g^T / N_tok, by enumerating every label combination."""
    batch = {"tokens": tokens, "mask": mask, "weights": weights}
    logits = apply(params, tokens, mask, capture.Tap({}))
    probs = np.asarray(jax.nn.softmax(logits[0, :-1], axis=-1))  # [T-1, V]
    targets = [t for t in range(1, tokens.shape[1]) if weights[0, t] > 0]

    def loss_fn(p, b, pr):
        tap = capture.Tap(pr)
        lg = apply(p, b["tokens"], b["mask"], tap)
        nll = tasks.token_nll(lg[:, :-1], b["labels"]) * b["weights"][:, 1:]
        return jnp.pad(nll, ((0, 0), (0, 1)))

    capture_g = jax.jit(lambda b: capture_ag(loss_fn, params, b, layers).g)
    total = {k: 0.0 for k in layers}
    for combo in itertools.product(range(vocab), repeat=len(targets)):
        labels = np.zeros(tokens.shape[1] - 1, np.int32)
        prob = 1.0
        for t, y in zip(targets, combo):
            labels[t - 1] = y
            prob *= probs[t - 1, y]
        g_all = capture_g({**batch, "labels": jnp.asarray(labels)[None]})
        for k in layers:
            g = np.asarray(g_all[k]).reshape(-1, g_all[k].shape[-1])
            total[k] = total[k] + prob * (g.T @ g)
    return {k: v / float(mask.sum()) for k, v in total.items()}


def test_sampled_fisher_covariance_converges_to_the_exact_expectation():
    """Labels sampled from the model: S converges to its closed-form expectation over all labels (vocab 3)."""
    with jax.enable_x64(True):
        vocab = 3
        task = testing.tiny_lm_task()
        params = testing.tiny_lm_init(
            jax.random.key(3), vocab=vocab, d_model=4, d_ff=6, n_layers=1, max_len=8, dtype=jnp.float64
        )
        one = tasks.lm_batch([[0, 2, 1, 2]])
        layers = layers_of(task, params, one, ["layers.*.mlp.*", "lm_head"])
        apply = lambda p, t, m, tap: testing.tiny_lm_apply(p, t, m, tap)
        exact = _exact_sampled_fisher_S(apply, params, one["tokens"], one["mask"], one["weights"], layers, vocab)
        stage = stages.covariance_stage(task, layers, "sampled")

        def sampled(num_batches, reps=50):
            batch = jax.tree.map(lambda x: jnp.repeat(x, reps, axis=0), one)
            cov = stages.run_stage(stage, (params,), [batch] * num_batches, jax.random.key(7))
            return max(rel_err(cov.S[k], exact[k]) for k in layers)

        few, many = sampled(1, reps=10), sampled(40)
        print(f"sampled-Fisher S rel. error: 10 samples {few:.3f}, 2000 samples {many:.4f}")
        assert many < 0.05 and many < few / 3


def test_eigendecomposition_of_many_stacked_blocks_does_not_hang(tmp_path):
    """Regression: a jitted program with several batched LAPACK eigh calls deadlocked on 2 cores (jaxlib 0.10).

    Three fresh processes each decompose six stacked blocks under jit; each must finish within 60 s.
    """
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp\n"
        "from jaxinf.engine import curvature\n"
        "k = jax.random.split(jax.random.key(0), 6)\n"
        "def spd(k, n): x = jax.random.normal(k, (4, n, 2 * n)); return x @ jnp.swapaxes(x, -1, -2)\n"
        "cov = curvature.Covariance(A={str(i): spd(k[i], 96 + 32 * i) for i in range(3)},\n"
        "    S={str(i): spd(k[3 + i], 256 - 32 * i) for i in range(3)}, count={str(i): jnp.ones(()) for i in range(3)})\n"
        "jax.block_until_ready(jax.jit(curvature.eigendecompose)(cov)); print('ok')\n"
    )
    for _ in range(3):
        r = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(tmp_path),
            env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent.parent)},
        )
        assert r.stdout.strip() == "ok", r.stderr[-1000:]


def test_failed_eigh_falls_back_to_a_jittered_decomposition(monkeypatch):
    """When eigh returns NaN on a finite matrix, the jittered retry is used and its result is correct."""
    with jax.enable_x64(True):
        real = jnp.linalg.eigh
        calls = []

        def flaky(M):  # the first traced call (the main path) fails; the retry's call is the real eigh
            calls.append(M)
            e, Q = real(M)
            return (jnp.full_like(e, jnp.nan), Q) if len(calls) == 1 else (e, Q)

        monkeypatch.setattr(jnp.linalg, "eigh", flaky)
        x = jax.random.normal(jax.random.key(0), (5, 8), jnp.float64)
        M = x @ x.T
        e, Q = jax.jit(curvature.symmetric_eigh)(M)
        assert len(calls) == 2 and bool(jnp.all(jnp.isfinite(e)))
        assert rel_err(Q @ jnp.diag(e) @ Q.T, M) < 1e-6  # the jitter (1e-7 x mean eigenvalue) is undone
        np.testing.assert_allclose(np.asarray(e), np.linalg.eigvalsh(np.asarray(M)), rtol=1e-6, atol=1e-6)


def test_sampled_labels_follow_the_predictive_distribution_without_a_vocabulary_wide_cumsum():
    """The chunked inverse CDF draws the labels the whole-vocabulary inverse CDF draws from the same uniforms
    (all but float-rounding ties), and their frequencies match softmax(logits) within 5 binomial sigmas."""
    logits = jax.random.normal(jax.random.key(0), (2, 3, 1037)) * 3  # 1037: not a multiple of the chunks
    keys = jax.random.split(jax.random.key(1), 4000)
    ys = np.asarray(jax.vmap(lambda k: tasks.sample_labels(k, logits))(keys))

    def whole(k):
        F = jnp.cumsum(jax.nn.softmax(logits, -1), -1)
        u = jax.random.uniform(k, F.shape[:-1] + (1,), F.dtype) * F[..., -1:]
        return jnp.minimum(jnp.sum(F <= u, -1), logits.shape[-1] - 1)

    assert (ys == np.asarray(jax.vmap(whole)(keys))).mean() > 0.999
    p = np.asarray(jax.nn.softmax(logits, -1))[0, 0]
    freq = np.bincount(ys[:, 0, 0], minlength=1037) / len(keys)
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / len(keys)) + 1e-3)
    assert ys.min() >= 0 and ys.max() < 1037


def test_the_config_offers_exactly_the_registered_strategies():
    """``factors.strategy``'s choices (config.py, below the engine) are the names of the strategy objects, and a
    name outside them is refused in one line naming it and the known ones."""
    from jaxinf.config import FactorsConfig

    assert FactorsConfig.__dataclass_fields__["strategy"].metadata["choices"] == tuple(curvature.STRATEGIES)
    for name, s in curvature.STRATEGIES.items():
        assert curvature.strategy(name) is s and curvature.strategy(s) is s
    with pytest.raises(
        ValueError,
        match=r"^factors.strategy: unknown strategy 'kfc' \(choose from identity, "
        r"diagonal, kfac, ekfac\)$",
    ):
        curvature.strategy("kfc")
