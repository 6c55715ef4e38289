"""The EK-FAC index in ``jaxinf validate`` (:mod:`jaxinf.validate.index`): the strategy ``ekfac-index`` and the
fidelity table with its equal-byte baselines, each against an independent computation."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinf import config as cfg
from jaxinf.engine import indexing, scoring, stages
from jaxinf.validate import driver
from jaxinf.validate import index as index_mod
from jaxinf.validate.world import builtin


@pytest.fixture(scope="module")
def small():
    """A 16-document built-in world, its EK-FAC fit and the exact scores (the scoring pass) at damping 0.01."""
    world = builtin(n_documents=16)
    params, task = world.lm.params, world.lm.task()
    layers = driver.tracked_layers(world, params)
    docs = {k: jnp.asarray(x) for k, x in world.documents.items()}
    batches = [{k: x[lo : lo + 8] for k, x in docs.items()} for lo in (0, 8)]
    G, qloss = stages.query_gradients(task, layers, params, {k: jnp.asarray(x) for k, x in world.queries.items()})
    curv, pieces = stages.fit_curvature(task, layers, params, batches, strategy="ekfac")
    qg = scoring.prepare_queries(G, qloss, curv, 0.01, None)
    exact = np.concatenate(
        [np.asarray(stages.score_batch(task, layers, params, qg, b)[0].total, np.float64) for b in batches], 1
    )
    return dict(
        world=world,
        params=params,
        task=task,
        layers=layers,
        batches=batches,
        G=G,
        qloss=qloss,
        curv=curv,
        eigen=pieces["eigen"],
        qg=qg,
        exact=exact,
    )


def test_projection_layout_matches_the_document_rows(small):
    """With the identity as the 'projection' every cell is kept and the projected product is the plain gradient
    inner product, so it must equal the scoring pass: the query and document layouts agree cell by cell."""
    s = small
    identity = {
        n: {
            "Q_A": jnp.broadcast_to(jnp.eye(spec.d_in_aug), (*spec.lead, spec.d_in_aug, spec.d_in_aug)),
            "Q_S": jnp.broadcast_to(jnp.eye(spec.d_out), (*spec.lead, spec.d_out, spec.d_out)),
        }
        for n, spec in s["layers"].items()
    }
    rows, _ = index_mod.document_rows(s["task"], s["layers"], s["params"], s["batches"], identity, None)
    got = index_mod.projected_queries(s["qg"], identity, s["layers"]) @ rows.T
    np.testing.assert_allclose(got, s["exact"], rtol=1e-4, atol=1e-6 * np.abs(s["exact"]).max())


def test_a_full_index_scores_like_the_scoring_pass(small):
    s = small
    basis, selection = index_mod.eigen_basis(s["curv"], s["eigen"], None)
    rows, _ = index_mod.document_rows(s["task"], s["layers"], s["params"], s["batches"], basis, None)
    got, predicted = index_mod.index_scores(s["qg"], s["curv"], selection, s["layers"], None, rows)
    np.testing.assert_allclose(got, s["exact"], rtol=1e-4, atol=1e-6 * np.abs(s["exact"]).max())
    np.testing.assert_allclose(predicted, 1.0)


def test_random_kronecker_projection_is_unbiased():
    """``E[P^T P] = I`` for the Gaussian projection (entries of variance 1/k): the mean over draws of the projected
    inner product is the inner product."""
    from jaxinf.engine.capture import LayerSpec

    layers = {"w": LayerSpec("w", d_in=6, d_out=5, bias=False)}
    draws = [index_mod.random_basis(layers, 3, seed)["w"] for seed in range(400)]
    mean_A = np.mean([np.asarray(d["Q_A"] @ d["Q_A"].T) for d in draws], axis=0)
    mean_S = np.mean([np.asarray(d["Q_S"] @ d["Q_S"].T) for d in draws], axis=0)
    assert draws[0]["Q_A"].shape == (6, 3) and draws[0]["Q_S"].shape == (5, 3)
    np.testing.assert_allclose(mean_A, np.eye(6), atol=0.15)
    np.testing.assert_allclose(mean_S, np.eye(5), atol=0.15)


def test_fidelity_by_hand():
    exact = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [6.0, 1.0, 5.0, 2.0, 4.0, 3.0]])
    approx = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [-6.0, -1.0, -5.0, -2.0, -4.0, -3.0]])
    f = index_mod.fidelity(exact, approx, np.array([0.5, 0.25]))
    assert f["per_query"]["pearson"] == pytest.approx([1.0, -1.0])
    assert f["per_query"]["spearman"] == pytest.approx([1.0, -1.0])
    assert f["tails"] == {"10": 3, "100": 3}  # at most half of the six documents
    assert f["per_query"]["top10"] == [1.0, 0.0] and f["per_query"]["bottom10"] == [1.0, 0.0]
    assert f["mean"]["predicted"] == pytest.approx(0.375) and f["min"]["pearson"] == pytest.approx(-1.0)


def test_index_settings_are_checked(capsys):
    with pytest.raises(cfg.ConfigError, match=r"validate\.strategies: ekfac-index needs index\.k"):
        cfg.load(None, ["validate.strategies=[ekfac,ekfac-index]"])
    with pytest.raises(cfg.ConfigError, match=r"validate\.index_ks: expected a list of positive integers or full"):
        cfg.load(None, ["validate.index_ks=[0]"])
    with pytest.raises(cfg.ConfigError, match=r"validate\.index_ks"):
        cfg.load(None, ["validate.index_ks=[some]"])
    assert cfg.load(None, ["validate.index_ks=[2,full]"]).validate.index_ks == [2, "full"]


def test_validate_compares_the_index_with_exact_ekfac(tmp_path):
    """End to end: ``ekfac-index`` at ``index.k: full`` has exactly EK-FAC's scores, so the same LDS; the fidelity
    table covers every size asked, full being exact; a second run reads everything back."""
    out = tmp_path / "val"
    config = cfg.load(
        None,
        [
            "validate.builtin_documents=16",
            "validate.subsets=3",
            "validate.seeds=1",
            "validate.steps=8",
            "validate.batch_size=4",
            "validate.group=3",
            "validate.strategies=[ekfac,ekfac-index]",
            "validate.dampings=[0.01]",
            "validate.recall_k=[1]",
            "validate.bootstrap=20",
            "index.k=full",
            "validate.index_ks=[2]",
        ],
    )
    result = driver.validate(config, out)
    work = next((out / "work").iterdir())
    (score_dir,) = (work / "scores").iterdir()
    np.testing.assert_allclose(
        np.load(score_dir / "ekfac-index-kfull_0.01.npy"),
        np.load(score_dir / "ekfac_0.01.npy"),
        rtol=1e-4,
        atol=1e-6 * np.abs(np.load(score_dir / "ekfac_0.01.npy")).max(),
    )
    assert result["lds"]["ekfac-index"]["mean"] == pytest.approx(result["lds"]["ekfac"]["mean"], abs=1e-6)
    table = result["index_fidelity"]["table"]
    assert list(table) == ["2", "full"] and result["index_fidelity"]["damping"] == "0.01"
    assert table["full"]["ekfac-index"]["mean"]["pearson"] == pytest.approx(1.0, abs=1e-6)
    assert table["full"]["ekfac-index"]["rescored"] == {"10": 0.0, "100": 0.0}  # exact: nothing to certify
    assert "random-kronecker" not in table["full"]  # full: nothing to project
    two = table["2"]
    assert set(two) == {"cells", "ekfac-index", "kfac-eigenvalues", "random-kronecker"}
    assert two["cells"] == sum(
        int(np.prod(s.lead, dtype=int)) * min(2, s.d_out) * min(2, s.d_in_aug)
        for s in driver.tracked_layers(driver.load_world(config), driver.load_world(config).lm.params).values()
    )
    for method in ("ekfac-index", "kfac-eigenvalues", "random-kronecker"):
        assert -1.0 <= two[method]["mean"]["pearson"] <= 1.0
    assert 0.0 <= two["ekfac-index"]["mean"]["predicted"] <= 1.0
    assert 0.0 < two["ekfac-index"]["rescored"]["10"] <= 1.0
    page = (out / "report" / "index.html").read_text()
    assert "The EK-FAC index against exact EK-FAC" in page and "random-kronecker" in page
    again = driver.validate(config, out)
    assert json.loads(json.dumps(again["index_fidelity"])) == json.loads(json.dumps(result["index_fidelity"]))


def test_the_bound_holds_and_certification_keeps_the_exact_tails(small):
    """At k = 2 on the built-in world: every |exact - index| is within its bound, and the documents certification
    rescores include each query's exact top and bottom 3 (so the rescored tails are EK-FAC's)."""
    s = small
    basis, selection = index_mod.eigen_basis(s["curv"], s["eigen"], 2)
    rows, bands = index_mod.document_rows(s["task"], s["layers"], s["params"], s["batches"], basis, 2)
    iq = index_mod.index_queries(s["qg"], s["curv"], selection, s["layers"], 2)
    approx = indexing.index_scores(np.asarray(iq.cells, np.float64), rows)
    bounds = indexing.score_bounds(
        np.asarray(iq.rest, np.float64), indexing.residual_norms(bands, indexing.RESOLUTION["float32"])
    )
    exact = s["exact"]
    assert np.all(np.abs(exact - approx) <= bounds + 1e-6 * np.abs(exact).max())
    assert np.abs(exact - approx).max() > 1e-3 * np.abs(exact).max()  # k = 2 does leave something out
    candidates = indexing.certify_candidates(approx, bounds, 3)
    for row in exact:
        order = np.argsort(row)
        assert candidates[order[-3:]].all() and candidates[order[:3]].all()
    got, _, rescored, counts = indexing.certify(approx, bounds, 3, lambda docs: exact[:, docs])
    assert not np.any(rescored & ~candidates) and sum(counts) == rescored.sum()
    for row, certified in zip(exact, got):
        assert set(np.argsort(certified)[-3:]) == set(np.argsort(row)[-3:])
        assert set(np.argsort(certified)[:3]) == set(np.argsort(row)[:3])
    share = index_mod.rescored_share(iq, approx, bands, "float32", 3, exact)
    assert share == pytest.approx(rescored.mean())
