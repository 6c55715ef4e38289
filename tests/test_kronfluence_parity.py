"""Parity with kronfluence in float64: factors, pairwise and self-influence scores, every strategy.

For each family (tiny random Llama, GPT-NeoX, Cohere saved as Hugging Face
directories), the same documents and queries go through

- ``jaxinf run`` (in this process): EK-FAC, empirical Fisher, heuristic damping,
  self-influence, float64 (``run.precision`` and ``model.dtype``); its factors and
  exports are compared with kronfluence's through ``jaxinf.interop.compare`` (what
  ``jaxinf compare`` prints);
- the jaxinf engine on the same documents for the rest of the matrix, reusing the
  run's eigendecomposition and Lambda: identity, diagonal, K-FAC and EK-FAC x
  damping (the heuristic ``0.1 * mean(Lambda)`` and a given value), pairwise and
  self-influence; query batching at rank 4 for every strategy, and at rank 32 for
  EK-FAC (on GPT-NeoX this truncates ``dense_h_to_4h``, the one layer with
  ``min(d_out, d_in') > 32``, and keeps the others whole);
- kronfluence (``kronfluence_reference.CausalLMTask``, all dtypes float64,
  transformers' float32 upcasts made float64, full SVD) with the same settings.

Tolerance (fixed): relative error ``||jaxinf - kronfluence|| / ||kronfluence|| <= 1e-10``
for A, S, e_A, e_S, Lambda (per layer) and the score matrices (per configuration), every
strategy, damping and rank (measured: 1e-16 to 1e-14). The run's exports ``scores.npy`` and
``self_influence.npy`` are float32 files by contract, so they are held to float32's unit
round-off ``2^-24`` (about 6e-8; measured 2.7e-8 and 2.3e-8) instead.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import kronfluence_support as ks
import numpy as np
import pytest

TOL = 1e-10
EXPORT_TOL = 2.0**-24  # the float32 exports: rounding to float32 and nothing else
STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
DAMPINGS = (None, 0.01)  # the heuristic, and a given lambda


def _configs():
    """(strategy, damping, query rank) of every pairwise comparison; self-influence for those with full rank."""
    for strategy in STRATEGIES:
        for damping in DAMPINGS if strategy != "identity" else (None,):
            yield strategy, damping, None
    for strategy in STRATEGIES:
        yield strategy, None, 4
    yield "ekfac", None, 32


def jaxinf_matrix(w: dict, run_dir, configs=None) -> dict:
    """The engine's scores for every configuration (or those of ``configs``) on the world's documents, with the
    run's factors (float64)."""
    from jaxinf import models
    from jaxinf.data.batching import document_batches
    from jaxinf.data.queries import encode_queries, query_batches, read_queries
    from jaxinf.data.sources import open_documents
    from jaxinf.data.tokenize import TextEncoder
    from jaxinf.engine import curvature, scoring, stages
    from jaxinf.interop import transfer

    with jax.enable_x64(True):
        run = transfer.load_run(run_dir)
        layers = run.layers
        lm, tok = models.from_hf(w["model"], dtype="float64")
        task = lm.task()
        encoder = TextEncoder(tok)
        source = open_documents(str(w["docs"]))
        (batch,) = list(document_batches(source, encoder, batch_size=len(source), max_length=ks.MAX_LENGTH))
        order = np.argsort(batch["index"])
        keys = ("tokens", "mask", "weights")
        docs = {k: jnp.asarray(batch[k]) for k in keys}
        (qb,) = query_batches(encode_queries(read_queries(str(w["queries"])), encoder, max_length=ks.MAX_LENGTH))
        G, qloss = jax.jit(lambda p, b: stages.query_gradients(task, layers, p, b))(
            lm.params, {k: jnp.asarray(qb[k]) for k in keys}
        )
        eigen = jax.tree.map(jnp.asarray, run.eigen)
        diag = stages.run_stage(stages.lambda_stage(task, layers, "empirical"), (lm.params, None), [docs], None)
        curvs = {
            "identity": curvature.curvature("identity"),
            "diagonal": curvature.curvature("diagonal", None, diag),
            "kfac": curvature.curvature("kfac", eigen, curvature.kfac_lambda(eigen)),
            "ekfac": curvature.curvature("ekfac", eigen, jax.tree.map(jnp.asarray, run.Lambda)),
        }
        pairwise, self_scores = {}, {}
        score = jax.jit(lambda p, q, b: stages.score_batch(task, layers, p, q, b)[0].total)
        self_of = jax.jit(
            lambda p, c, b, damping: stages.self_influence_batch(task, layers, p, c, damping, b)[0], static_argnums=3
        )
        for strategy, damping, rank in configs or _configs():
            qg = scoring.prepare_queries(G, qloss, curvs[strategy], damping, rank, svd="full")
            pairwise[(strategy, damping, rank)] = np.asarray(score(lm.params, qg, docs))[:, order]
            if rank is None:
                self_scores[(strategy, damping)] = np.asarray(self_of(lm.params, curvs[strategy], docs, damping))[order]
        return {"pairwise": pairwise, "self": self_scores, "diagonal_lambda": transfer.per_layer(diag, layers)}


# Llama (no biases) and GPT-NeoX (biases, parallel residual) run in CI; Cohere, a third layout of the same
# blocks, only with -m heavy (it adds about 75 s to a 2-core CI run).
@pytest.fixture(
    scope="module", params=[pytest.param(f, marks=pytest.mark.heavy) if f == "cohere" else f for f in ks.FAMILIES]
)
def parity(request, tmp_path_factory):
    """Everything one family's parity tests look at: the run, its comparison report, both sides' scores."""
    from jaxinf.interop import kronfluence as kf
    from jaxinf.interop.compare import compare

    w = ks.world(tmp_path_factory, request.param)
    run_dir = ks.parity_run(w)
    kron = ks.kronfluence(tmp_path_factory, w)
    for strategy in STRATEGIES:
        kron.fit(strategy)
    kron.pairwise("ekfac", None, None, name="pairwise")
    kron.self_scores("ekfac", None, name="self")
    report = compare(kron.root, run_dir, factors="ekfac", scores=["pairwise", "self"])
    mine = jaxinf_matrix(w, run_dir)
    rows = []
    for strategy, damping, rank in _configs():
        err = ks.rel_error(mine["pairwise"][(strategy, damping, rank)], kron.pairwise(strategy, damping, rank))
        rows.append({"strategy": strategy, "damping": damping, "rank": rank, "quantity": "pairwise", "rel_error": err})
        if rank is None:
            err = ks.rel_error(mine["self"][(strategy, damping)], kron.self_scores(strategy, damping))
            rows.append({"strategy": strategy, "damping": damping, "rank": None, "quantity": "self", "rel_error": err})
    diagonal = kf.read_factors(kron.root / "factors_diagonal")
    diag_err = max(ks.rel_error(mine["diagonal_lambda"][m], diagonal.Lambda(m)) for m in diagonal.modules)
    result = {
        "family": request.param,
        "report": report,
        "rows": rows,
        "diagonal_lambda": diag_err,
        "kron": kron,
        "run": run_dir,
        "world": w,
    }
    print(f"\n{request.param}: factors and the run's exports (jaxinf compare):")
    print(json.dumps(report["max_rel_error"], indent=1))
    print(f"{request.param}: diagonal Lambda max rel. error {diag_err:.2e}")
    for r in rows:
        print(
            f"{request.param:<9} {r['strategy']:<9} damping={str(r['damping']):<5} rank={str(r['rank']):<5} "
            f"{r['quantity']:<9} {r['rel_error']:.2e}"
        )
    return result


def test_factors_match_per_layer(parity):
    """A, S, their eigenvalues and Lambda of every layer, the token counts, and the diagonal strategy's Lambda."""
    report = parity["report"]
    for stage, quantities in (("covariance", ("A", "S")), ("eigen", ("e_A", "e_S")), ("lambda", ("Lambda",))):
        rows = report["stages"][stage]
        assert len(rows) == 9 if parity["family"] != "gpt_neox" else len(rows) == 6
        for layer, values in rows.items():
            for q in quantities:
                assert values[q] <= TOL, (stage, layer, q, values[q])
            if stage == "covariance":
                assert values["tokens"][0] == values["tokens"][1]
    assert parity["diagonal_lambda"] <= TOL


def test_run_exports_match(parity):
    """The run's scores.npy and self_influence.npy (float32 exports) against kronfluence's EK-FAC scores."""
    stages = parity["report"]["stages"]
    assert stages["scores"]["rel_error"] <= EXPORT_TOL
    assert stages["self_influence"]["rel_error"] <= EXPORT_TOL
    assert all(q["topk_overlap"] == 1.0 for q in stages["scores"]["queries"])


def test_every_strategy_damping_and_rank_matches(parity):
    bad = [r for r in parity["rows"] if not r["rel_error"] <= TOL]
    assert not bad, bad
    assert len(parity["rows"]) == 2 * 7 + 4 + 1  # pairwise and self at full rank, rank 4, rank 32


def test_attention_and_mlp_layers_match(tmp_path_factory):
    """``factors.track: all`` (attention projections and MLP, as the built-in validation world tracks): every
    layer's A, S, e_A, e_S and Lambda, and the EK-FAC pairwise scores, against kronfluence tracking every
    ``nn.Linear`` of the same Llama (float64, empirical Fisher, heuristic damping), within ``TOL``."""
    from jaxinf.interop.compare import compare

    w = ks.world(tmp_path_factory, "llama")
    run_dir = ks.parity_run(w, "run-all", **{"factors.track": "all", "scores.self_influence": False})
    kron = ks.kronfluence(tmp_path_factory, w, track="all")
    kron.pairwise("ekfac", None, None, name="pairwise")
    report = compare(kron.root, run_dir, factors="ekfac", scores=["pairwise"])
    print("\nllama, factors.track=all: max rel. errors", json.dumps(report["max_rel_error"]))
    for stage, quantities in (("covariance", ("A", "S")), ("eigen", ("e_A", "e_S")), ("lambda", ("Lambda",))):
        rows = report["stages"][stage]
        assert sum("attn" in layer for layer in rows) >= 4 * 2, sorted(rows)  # q, k, v, o of every layer
        for layer, values in rows.items():
            for q in quantities:
                assert values[q] <= TOL, (stage, layer, q, values[q])
    assert report["stages"]["scores"]["rel_error"] <= EXPORT_TOL  # scores.npy is float32
    mine = jaxinf_matrix(w, run_dir, [("ekfac", None, None)])["pairwise"][("ekfac", None, None)]  # float64
    err = ks.rel_error(mine, kron.pairwise("ekfac", None, None, name="pairwise"))
    print(f"llama, factors.track=all: EK-FAC pairwise scores (float64) rel. error {err:.2e}")
    assert err <= TOL


def test_the_true_fisher_matches_with_the_labels_jaxinf_draws(tmp_path_factory):
    """``factors.fisher: sampled`` (the default), exactly: jaxinf's covariance and Lambda stages draw each
    document's labels with a fixed key (the same key in both passes, so both use the same labels, as kronfluence's
    task does), and kronfluence fits its true Fisher with those labels (``CausalLMTask`` given ``sampled_labels``).
    A, S, Lambda per layer and the EK-FAC pairwise scores within ``TOL`` (float64); with labels of their own the two
    differ by sampling noise (``test_kronfluence_precision``'s heavy convergence test)."""
    from jaxinf.data.batching import document_batches
    from jaxinf.engine import curvature, scoring, stages, tasks
    from jaxinf.interop import kronfluence as kf
    from jaxinf.interop import transfer

    w = ks.world(tmp_path_factory, "llama")
    with jax.enable_x64(True):
        x = ks.sampled_float64(w)
        layers, lm, task, source = x["layers"], x["lm"], x["task"], x["source"]
        (batch,) = list(
            document_batches(
                source, x["encoder"], batch_size=len(source), max_length=ks.MAX_LENGTH, buckets=(ks.MAX_LENGTH,)
            )
        )
        docs = {k: jnp.asarray(batch[k]) for k in ("tokens", "mask", "weights")}
        key = jax.random.key(7)
        cov_stage = stages.covariance_stage(task, layers, "sampled")
        cov = cov_stage.finalize(jax.jit(cov_stage.update)(cov_stage.init(), lm.params, docs, key)[0])
        eigen = curvature.eigendecompose(cov)
        lam_stage = stages.lambda_stage(task, layers, "sampled")
        Lambda = lam_stage.finalize(jax.jit(lam_stage.update)(lam_stage.init(), lm.params, eigen, docs, key)[0])
        drawn = np.asarray(tasks.sample_labels(key, lm.apply(lm.params, docs["tokens"], docs["mask"])[:, :-1]))
        G, qloss = stages.query_gradients(task, layers, lm.params, x["queries"])
        qg = scoring.prepare_queries(G, qloss, curvature.curvature("ekfac", eigen, Lambda), None, None, svd="full")
        order = np.argsort(batch["index"])  # rows -> documents in file order
        mine = np.asarray(stages.score_batch(task, layers, lm.params, qg, docs)[0].total)[:, order]
    kron = ks.Kronfluence(
        w, tmp_path_factory.mktemp("kf-sampled-labels"), fisher="sampled", sampled_labels=[drawn[r] for r in order]
    )
    theirs = kron.pairwise("ekfac", None, None, name="pairwise")
    factors = kf.read_factors(kron.root / "factors_ekfac")
    A, S = transfer.per_layer(cov.A, layers), transfer.per_layer(cov.S, layers)
    L = transfer.per_layer(Lambda, layers)
    errors = {
        q: max(ks.rel_error(mine_q[m], theirs_q(m)) for m in factors.modules)
        for q, mine_q, theirs_q in (("A", A, factors.A), ("S", S, factors.S), ("Lambda", L, factors.Lambda))
    }
    errors["scores"] = ks.rel_error(mine, theirs)
    print(f"\nllama, sampled labels shared: max rel. errors {json.dumps(errors)}")
    assert all(e <= TOL for e in errors.values()), errors
    own = ks.Kronfluence(w, tmp_path_factory.mktemp("kf-own-labels"), fisher="sampled")  # its own draws
    own.fit("ekfac")
    S_own = kf.read_factors(own.root / "factors_ekfac")
    assert max(ks.rel_error(S[m], S_own.S(m)) for m in S_own.modules) > 1e3 * TOL  # the labels matter: not a no-op
