"""The EK-FAC index (jaxinf.engine.indexing): exact when full, bounded and certified when not.

The oracle is the scoring pass itself (``stages.score_batch``, tested against per-example gradients in
test_scoring.py): the index must reproduce its scores from the stored blocks alone."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_fixtures import DOCS, doc_batch, layers_of, query_batch, tiny_lm

from jaxinf.engine import indexing, stages
from jaxinf.engine.curvature import Curvature

MORE_DOCS = DOCS + [[(3 * i + j) % 15 + 1 for j in range(2 + i % 6)] for i in range(18)]


_FITS: dict = {}


def _fit(dtype, track="all", docs=MORE_DOCS):
    """The tiny LM's EK-FAC on ``docs``, fitted once per dtype (call under the matching ``jax.enable_x64``)."""
    if dtype not in _FITS:
        _FITS[dtype] = _fit_now(dtype, track, docs)
    return _FITS[dtype]


def _fit_now(dtype, track, docs):
    task, params = tiny_lm(dtype=dtype)
    batch = doc_batch(docs)
    layers = layers_of(task, params, batch, track)
    curv, pieces = stages.fit_curvature(task, layers, params, [batch], strategy="ekfac", key=jax.random.key(3))
    return task, params, layers, batch, curv, pieces["eigen"]


def _index(task, params, layers, batch, curv, eigen, k):
    selection = indexing.select_cells(eigen, k)
    basis = indexing.ordered_basis(curv.Q_A, curv.Q_S, selection)
    rows = jax.jit(stages.index_step(task, layers, k))(params, basis, batch)
    return selection, {name: np.asarray(v) for name, v in rows.items()}


def _queries(task, params, layers, curv, rank=None, damping=None):
    return jax.jit(lambda p, c: stages.prepared_queries(task, layers, p, query_batch(), c, damping, rank, svd="full"))(
        params, curv
    )


def _exact(task, params, layers, qg, batch):
    return np.asarray(jax.jit(lambda p, q, b: stages.score_batch(task, layers, p, q, b)[0].total)(params, qg, batch))


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-10), (jnp.float32, 1e-5)])
@pytest.mark.parametrize("rank", [None, 2])
def test_a_full_index_gives_the_exact_scores_and_a_zero_bound(dtype, tol, rank):
    with jax.enable_x64(dtype == jnp.float64):
        _full_index_is_exact(dtype, tol, rank)


def _full_index_is_exact(dtype, tol, rank):
    task, params, layers, batch, curv, eigen = _fit(dtype)
    selection, rows = _index(task, params, layers, batch, curv, eigen, None)
    qg = _queries(task, params, layers, curv, rank)
    iq = indexing.index_queries(qg, curv.Q_A, curv.Q_S, curv.Lambda, selection, layers, None)
    got = indexing.index_scores(np.asarray(iq.cells, np.float64), rows["cells"].astype(np.float64))
    want = _exact(task, params, layers, qg, batch)
    assert np.max(np.abs(got - want)) <= tol * np.max(np.abs(want))
    bound = indexing.score_bounds(np.asarray(iq.rest), indexing.residual_norms(rows["bands"], 1e-7))
    assert np.all(bound == 0)
    np.testing.assert_allclose(np.asarray(iq.fidelity), 1.0)
    # every cell kept: nothing is left in the bands
    assert np.all(rows["bands"] == 0)


@pytest.mark.parametrize("k", [2, None])
@jax.enable_x64(True)
def test_the_lambda_pass_forms_the_index_rows_and_its_lambda_from_one_rotation(k):
    """Under the empirical Fisher the Lambda pass writes the index from the rotated gradients it forms anyway
    (``index_from_rotated``: a gather, and each pair of bands' energy as a sum of squares): the rows of the index's
    own pass (``index_statistic``: band energies from the tokens' Gram matrices) and the Lambda sums of the plain
    Lambda pass, in float64."""
    task, params, layers, batch, curv, eigen = _fit(jnp.float64)
    selection, want = _index(task, params, layers, batch, curv, eigen, k)
    plain = stages.lambda_stage(task, layers, "empirical")
    lam_want, _ = jax.jit(plain.update)(plain.init(), params, eigen, batch, None)
    lam_got, got = jax.jit(stages.lambda_and_index_step(task, layers, k))(plain.init(), params, eigen, selection, batch)
    for name in ("cells", "bands", "loss"):
        scale = np.abs(want[name]).max()
        assert np.abs(np.asarray(got[name]) - want[name]).max() <= 1e-10 * scale, name
    for name in lam_want.Lambda:
        scale = np.abs(np.asarray(lam_want.Lambda[name])).max()
        assert np.abs(np.asarray(lam_got.Lambda[name] - lam_want.Lambda[name])).max() <= 1e-12 * scale, name
    for name in lam_want.count:
        np.testing.assert_array_equal(np.asarray(lam_got.count[name]), np.asarray(lam_want.count[name]))


@jax.enable_x64(True)
def test_the_bound_holds_and_the_certified_tails_are_exact():
    task, params, layers, batch, curv, eigen = _fit(jnp.float64)
    qg = _queries(task, params, layers, curv, damping=1e-4)
    exact = _exact(task, params, layers, qg, batch)
    for k in (1, 2, 4):
        selection, rows = _index(task, params, layers, batch, curv, eigen, k)
        iq = indexing.index_queries(qg, curv.Q_A, curv.Q_S, curv.Lambda, selection, layers, k)
        approx = indexing.index_scores(np.asarray(iq.cells), rows["cells"])
        bound = indexing.score_bounds(np.asarray(iq.rest), indexing.residual_norms(rows["bands"], 0.0))
        coarse = _one_band_bound(iq, rows, selection, layers, k)
        assert np.all(bound <= coarse * (1 + 1e-9)) and np.mean(bound) < np.mean(coarse)
        assert np.all(np.abs(exact - approx) <= bound * (1 + 1e-9) + 1e-12)
        assert np.any(np.abs(exact - approx) > 1e-8), "a truncated index that is exact tests nothing"
        for top in (1, 3, 5):
            cand = indexing.certify_candidates(approx, bound, top)
            certified = np.where(cand[None, :], exact, -np.inf)
            for q in range(exact.shape[0]):
                want = set(np.argsort(-exact[q], kind="stable")[:top].tolist())
                got = set(np.argsort(-certified[q], kind="stable")[:top].tolist())
                assert got == want
                low = np.where(cand, exact[q], np.inf)
                assert set(np.argsort(low, kind="stable")[:top].tolist()) == set(
                    np.argsort(exact[q], kind="stable")[:top].tolist()
                )


def test_certifying_in_two_rounds_keeps_the_exact_tails_and_rescores_fewer_documents():
    """Index scores within their bounds of exact scores: :func:`indexing.certify` reports every query's exact top and
    bottom k, asks for no document twice, rescores a subset of the one round of certify_candidates, and here
    (bounds wide against the gaps between scores) fewer documents."""
    rng = np.random.default_rng(0)
    Q, N = 4, 2000
    exact = rng.normal(size=(Q, N))
    bounds = rng.uniform(0.05, 0.3, size=(Q, N))
    approx = exact + bounds * rng.uniform(-1, 1, size=(Q, N))
    asked = []

    def rescore(docs):
        asked.extend(docs.tolist())
        return exact[:, docs]

    for k in (1, 5, 20):
        asked.clear()
        one_round = indexing.certify_candidates(approx, bounds, k)
        got, left, rescored, counts = indexing.certify(approx, bounds, k, rescore)
        assert len(asked) == len(set(asked)) == rescored.sum() == sum(counts)
        assert not np.any(rescored & ~one_round) and rescored.sum() < one_round.sum()
        assert np.all(left[:, rescored] == 0) and np.all(got[:, rescored] == exact[:, rescored])
        for q in range(Q):
            assert set(np.argsort(-got[q])[:k]) == set(np.argsort(-exact[q])[:k])
            assert set(np.argsort(got[q])[:k]) == set(np.argsort(exact[q])[:k])


@jax.enable_x64(True)
def test_the_index_is_independent_of_damping_and_strategy():
    """One index answers a damping sweep and K-FAC as well as EK-FAC: only the query side changes."""
    task, params, layers, batch, curv, eigen = _fit(jnp.float64)
    selection, rows = _index(task, params, layers, batch, curv, eigen, None)
    from jaxinf.engine.curvature import kfac_lambda, strategy

    kfac = Curvature(strategy("kfac"), curv.Q_A, curv.Q_S, kfac_lambda(eigen))
    for c, damping in ((curv, 1e-3), (curv, 10.0), (kfac, None)):
        qg = _queries(task, params, layers, c, damping=damping)
        iq = indexing.index_queries(qg, c.Q_A, c.Q_S, curv.Lambda, selection, layers, None)
        got = indexing.index_scores(np.asarray(iq.cells), rows["cells"])
        want = _exact(task, params, layers, qg, batch)
        assert np.max(np.abs(got - want)) <= 1e-10 * np.max(np.abs(want))


def test_predicted_correlation_is_the_kept_share_of_curvature_weighted_energy():
    P = jnp.asarray([[3.0, 0.0], [0.0, 4.0]])
    assert float(indexing.predicted_correlation(jnp.sum(P[:1] ** 2), jnp.sum(P**2))) == pytest.approx(0.6)
    assert float(indexing.predicted_correlation(jnp.asarray(0.0), jnp.asarray(0.0))) == 1.0


@jax.enable_x64(True)
def test_gradient_energy_is_the_frobenius_norm_of_the_sequence_gradient():
    rng = np.random.default_rng(0)
    a, g = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 6))
    G = np.einsum("bto,bti->boi", g, a)
    np.testing.assert_allclose(
        np.asarray(indexing.gradient_energy(jnp.asarray(a), jnp.asarray(g))), (G**2).sum((1, 2)), rtol=1e-12
    )


def _one_band_bound(iq, rows, selection, layers, k):
    """The bound with the whole rest of each layer (every cell not kept) as one band: ||Pr_q,rest|| ||R_n,rest|| per
    layer."""
    q_rest = np.asarray(iq.rest, np.float64)
    out, at = 0.0, 0
    for name in sorted(layers):
        s = layers[name]
        width = len(indexing.bands(indexing.kept_size(k, s.d_out), s.d_out)) * len(
            indexing.bands(indexing.kept_size(k, s.d_in_aug), s.d_in_aug)
        )
        for _ in range(max(len(s.layer_names), 1)):
            q = np.sqrt((q_rest[:, at : at + width] ** 2).sum(1))
            n = np.sqrt(np.maximum(rows["bands"][:, at : at + width].astype(np.float64).sum(1), 0))
            out = out + q[:, None] * n[None, :]
            at += width
    return out


def test_bands_double_past_the_kept_directions():
    assert indexing.bands(2, 11) == [(0, 2), (2, 4), (4, 8), (8, 11)]
    assert indexing.bands(5, 5) == [(0, 5)]


def test_select_cells_orders_by_decreasing_eigenvalue():
    from jaxinf.engine.curvature.eigen import Eigen

    e = {"x": jnp.asarray([0.1, 3.0, 2.0, 0.0])}
    eig = Eigen(Q_A={"x": jnp.eye(4)}, e_A=e, Q_S={"x": jnp.eye(4)}, e_S=e)
    sel = indexing.select_cells(eig, 1)
    assert np.asarray(sel.rows["x"]).tolist() == [1, 2, 0, 3]
    assert np.asarray(sel.cells["x"]).tolist() == [0]  # (3.0, 3.0), the first cell


def test_the_kept_cells_are_those_of_the_largest_kfac_eigenvalues_not_a_square_block():
    """A staircase: with ``e_S`` = (100, 1, 0.5, ...) one direction of ``S`` dominates, so the ``k^2`` = 4 cells kept
    are its row's four largest, not the square block of two directions of each factor. Brute force over every cell
    of random decreasing spectra (with lead axes: each layer its own staircase): every cell outside the kept ones has
    a smaller ``e_S e_A`` than every kept one, and a kept cell's whole upper-left corner is kept."""
    e_S = jnp.asarray([100.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.01, 0.0])
    e_A = jnp.asarray([4.0, 3.0, 2.0, 1.0, 0.9, 0.3, -1e-9, 0.0, 0.0, 0.0])
    assert np.asarray(indexing.kept_cells(e_S, e_A, 2)).tolist() == [0, 1, 2, 3]
    rng = np.random.default_rng(0)
    for _trial in range(30):
        d_out, d_in = int(rng.integers(2, 40)), int(rng.integers(2, 40))
        e_S = -np.sort(-(rng.exponential(size=(2, d_out)) ** 3), axis=-1)
        e_A = -np.sort(-(rng.exponential(size=(2, d_in)) ** 3), axis=-1)
        k = int(rng.integers(1, 6))
        n = min(k, d_out) * min(k, d_in)
        cells = np.asarray(indexing.kept_cells(jnp.asarray(e_S), jnp.asarray(e_A), k))
        assert cells.shape == (2, n)
        for layer in range(2):
            P = (e_S[layer, :, None] * e_A[layer, None, :]).ravel()
            kept = np.zeros(d_out * d_in, bool)
            kept[cells[layer]] = True
            assert kept.sum() == n and np.all(np.diff(cells[layer]) > 0)
            assert n == d_out * d_in or P[kept].min() >= P[~kept].max()
            grid = kept.reshape(d_out, d_in)
            for i, j in zip(*np.nonzero(grid)):
                assert grid[: i + 1, : j + 1].all()
    # every direction kept: every cell, in place
    assert np.asarray(indexing.kept_cells(jnp.ones(8), jnp.ones(10), None)).tolist() == list(range(80))


@jax.enable_x64(True)
def test_the_kept_cells_and_the_bands_hold_the_whole_gradient_energy():
    """``sum cells^2 + sum bands = ||G[n]||_F^2`` for every row, truncated or not: the bands hold exactly what the
    kept cells leave out (and a full index leaves nothing)."""
    task, params, layers, batch, curv, eigen = _fit(jnp.float64)
    G, _ = jax.jit(lambda p, b: stages.train_statistics(task, layers, p, b, None, stages._sequence_gradient))(
        params, batch
    )  # per block [*lead, B, d_out, d_in']: the brute-force per-sequence gradients
    energy = sum(
        np.asarray(G[name] ** 2).sum((-2, -1)).reshape(-1, np.shape(G[name])[len(s.lead)]).sum(0)
        for name, s in layers.items()
    )
    for k in (1, 2, None):
        _, rows = _index(task, params, layers, batch, curv, eigen, k)
        got = (rows["cells"] ** 2).sum(1) + rows["bands"].sum(1)
        np.testing.assert_allclose(got, energy, rtol=1e-10)


def test_plan_counts_the_index_bytes_per_document():
    from jaxinf import config as cfg
    from jaxinf.engine.capture import LayerSpec
    from jaxinf.run import index_store

    layers = {
        "layers.*.mlp.up": LayerSpec("layers.*.mlp.up", d_in=8, d_out=20, bias=True, stack=3),
        "head": LayerSpec("head", d_in=4, d_out=4, bias=False),
    }
    config = cfg.load(None, ["index.k=4", "index.dtype=float16", "plan.documents=1000"])
    got = index_store.index_size(config, layers, [8])
    # up: k_S=4 of 20 (bands [0,4) [4,8) [8,16) [16,20)), k_A=4 of 9 (bands [0,4) [4,8) [8,9)), 3 layers; head: 4x4
    assert got["cells"] == 3 * 16 + 16
    assert got["bytes_per_document"] == 2 * got["cells"] + 4 * (3 * 4 * 3 + 1) + 16
    assert got["bytes"] == 1000 * got["bytes_per_document"] and got["bytes_per_device"]["8"] == got["bytes"] // 8
    # a query of plan.queries (80) on the hosts: the rotated queries, one slice (here every row, as float32, with its
    # scores and bounds), and every document's score, bound (float64) and loss
    E = 3 * 4 * 3 + 1
    assert got["query_host_bytes"] == (
        80 * (4 * 64 + 8 * E) + 1000 * (4 * 64 + 4 * E + 16 + 16 * 80) + 1000 * (16 * 80 + 8)
    )
    assert "80 queries (plan.queries) hold 0.00 GiB of host memory per process" in index_store.format_size(got)


def test_plan_counts_the_index_rows_held_between_flushes_in_the_writing_steps_peak():
    """The rows a pass holds before it flushes them wait on the devices: ``jaxinf plan`` adds them to the peak of the
    step that writes them (the scoring pass here, an index pass of its own on a mesh), and only to that step's."""
    from jaxinf import config as cfg
    from jaxinf.run import plan, plan_report

    config = cfg.load(None, ["index.k=full", "index.save_every=50", "data.batch_size=4"])
    ix = {"k": "full", "dtype": "float32", "cells": 2**20, "bands": 64, "bytes_per_document": 4 * 2**20 + 4 * 64 + 16}
    one = plan.index_rows_held(config, ix, {"devices": 1, "hosts": 1, "global_batch": 4, "data": 1})
    assert one == {"step": "scores", "batches": 50, "bytes_per_device": 50 * 4 * ix["bytes_per_document"]}
    mesh = {"devices": 8, "hosts": 1, "global_batch": 4, "data": 4, "model": 2}
    rows = plan.index_rows_held(config, ix, mesh)
    assert rows == {"step": "index", "batches": 50, "bytes_per_device": 50 * 1 * ix["bytes_per_document"]}
    steps = [{"name": n, "peak": 2**29} for n in ("scores", "index")]
    result = {
        "meshes": [
            {
                **mesh,
                "static": {k: 0 for k in ("parameters", "factors", "Lambda", "queries")},
                "steps": steps,
                "index_rows": rows,
            }
        ]
    }
    limit = (2**29 + rows["bytes_per_device"] - 1) / 2**30  # the bare peaks fit, the index step's rows do not
    (msg,) = plan_report.check_fit(result, limit)
    assert "stage index needs" in msg and "with the index rows it holds" in msg
    assert plan_report.check_fit(result, (2**29 + rows["bytes_per_device"]) / 2**30) == []


def test_each_data_group_writes_its_own_part_of_the_index_and_a_reader_reads_every_part(tmp_path):
    """Three processes in two data groups: each group's first process writes its own rows of each batch into its
    part (the second process of group 1 writes nothing, two writers of one file on a shared disk), from its rows
    alone (an output fetched whole, the scores' loss, is cut to them); every process resumes where process 0's
    manifest says; a reader reads both parts, each part's batches checked against its own checksums; a build
    begun in two parts is not resumed in one."""
    from jaxinf.run.index_store import FORMAT, IndexError_, IndexReader, IndexWriter, read_manifest

    manifest = {
        "format": FORMAT,
        "k": 2,
        "dtype": "float32",
        "blocks": {"mlp": {"k_S": 1, "k_A": 3, "layers": 1, "bands_S": 1, "bands_A": 2}},
        "cells": 3,
        "bands": 2,
        "layers": ["mlp.0"],
        "batches": 3,
        "plan": {"processes": 3, "batch_size": 2, "batches": 3},
        "rows": "rows-key",
        "inputs": {"documents": "d", "eigen": "e"},
    }

    def batch(b, g):  # group g's two rows of batch b's four (the documents of all four, as the loop gathers them)
        out = {"cells": np.full((2, 3), 10 * b + g, np.float32), "bands": np.ones((2, 2), np.float32)}
        out["loss"] = np.arange(4.0) + 4 * b  # fetched whole
        return out, {"index": np.arange(4) + 4 * b}

    root = tmp_path / "index"
    writers = [
        (IndexWriter(root, manifest, 1, (0, 2)), 0),  # process 0, primary
        (IndexWriter(root, manifest, 1, (1, 2), primary=False), 1),
        (IndexWriter(root, manifest, 1, (1, 2), writes=False, primary=False), 1),
    ]
    for writer, _ in writers:
        writer.begin(*writer.resume(None))
    for b in range(3):
        for writer, g in writers:
            writer.save(b + 1, None, [batch(b, g)])
    assert read_manifest(root)["written"] == 3 and read_manifest(root)["parts"] == 2
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "part-0-of-2", "part-1-of-2"]
    np.testing.assert_array_equal(np.load(root / "part-1-of-2" / "documents.npy"), [2, 3, 6, 7, 10, 11])
    np.testing.assert_array_equal(np.load(root / "part-1-of-2" / "loss.npy"), [2, 3, 6, 7, 10, 11])
    np.testing.assert_array_equal(np.load(root / "part-0-of-2" / "cells.npy")[:, 0], [0, 0, 10, 10, 20, 20])
    for _, g in writers:  # a restarted run: every process resumes after the last batch written
        assert IndexWriter(root, manifest, 1, (g, 2), primary=False).resume(None)[0] == 3
    np.savez(root / "selection.npz", **{"rows/mlp": np.arange(1), "cols/mlp": np.arange(3)})
    reader = IndexReader(root)
    assert reader.rows == 12 and list(reader.slices(4)) == [(0, 4), (4, 6), (6, 10), (10, 12)]
    np.testing.assert_array_equal(reader.read(6, 12)["documents"], [2, 3, 6, 7, 10, 11])
    assert reader.where("cells", 8) == f"{root / 'part-1-of-2' / 'cells.npy'}: row 2"
    cells = np.load(root / "part-1-of-2" / "cells.npy", mmap_mode="r+")
    cells[3, 1] = 5.0  # batch 1 of part 1
    cells.flush()
    with pytest.raises(IndexError_, match=r"part-1-of-2: the rows of batch 1 \(rows 8 to 9\) do not match"):
        IndexReader(root).read(6, 12)
    np.testing.assert_array_equal(IndexReader(root).read(0, 6)["documents"], [0, 1, 4, 5, 8, 9])  # part 0 intact
    fresh = {**manifest, "batches": 4}  # another batch plan: begun afresh, and the parts of the old one removed
    IndexWriter(root, {**fresh}, 1, (0, 1))
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "selection.npz"]
    writers[0][0].manifest["written"] = 1
    (root / "manifest.json").write_text(json.dumps(writers[0][0].manifest))
    with pytest.raises(IndexError_, match=r"begun in 2 part\(s\).*this run reads it in 1"):
        IndexWriter(root, manifest, 1, (0, 1))
