"""jaxinf validate: the metrics against hand-computed values, the PBRF's objective, and a tiny run end to end
(schema, resume after an interruption, bad settings)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxinf import cli
from jaxinf import config as cfg
from jaxinf.validate import lds, pbrf, recall, retrain
from jaxinf.validate.world import ValidationError

# ----------------------------------------------------------------------------- metrics, by hand


def test_spearman_by_hand():
    # ranks 1 2 3 4 vs 1 3 2 4: rho = 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15) = 0.8
    assert lds.spearman([10, 20, 30, 40], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-12)
    # ties share their mean rank: x ranks (1.5, 1.5, 3), y ranks (1, 2, 3); Pearson of those = sqrt(3)/2
    assert lds.spearman([5, 5, 9], [1, 2, 3]) == pytest.approx(np.sqrt(3) / 2, abs=1e-12)
    assert np.isnan(lds.spearman([1, 1, 1], [1, 2, 3]))


def test_lds_by_hand():
    scores = np.array([[1.0, 2.0, 4.0], [-1.0, 0.0, 1.0]])  # 2 queries, 3 documents
    subsets = np.array([[0, 1], [0, 2], [1, 2]])  # sums: q0 3, 5, 6; q1 -1, 0, 1
    np.testing.assert_allclose(lds.group_predictions(scores, subsets), [[3, -1], [5, 0], [6, 1]])
    nll = np.array([[[3.0, 1.0]], [[2.0, 3.0]], [[1.0, 2.0]]])  # [M, S=1, Q]; log-probs -3 -2 -1 and -1 -3 -2
    out = lds.lds(scores, subsets, nll)
    # q0: predicted ranks 1 2 3, actual ranks 1 2 3 -> 1; q1: predicted 1 2 3, actual 3 1 2 -> 1 - 6*6/24 = -0.5
    assert out["per_query"] == pytest.approx([1.0, -0.5], abs=1e-12)
    assert out["mean"] == pytest.approx(0.25, abs=1e-12) and out["undefined"] == 0
    flat = np.concatenate([nll, nll[:, :, :1] * 0 + 7.0], 2)  # a third query whose NLL never changes
    out3 = lds.lds(np.vstack([scores, scores[:1]]), subsets, flat)
    assert out3["per_query"][2] is None and out3["undefined"] == 1 and out3["mean"] == pytest.approx(0.25)
    # t_{0.975, 1} = 12.7062047; sd = 1.5 * sqrt(2) / sqrt(2)... sd of (1, -0.5) = 1.06066; half = t * sd / sqrt(2)
    half = 12.706204736 * np.std([1.0, -0.5], ddof=1) / np.sqrt(2)
    assert out["ci95_queries"] == pytest.approx([0.25 - half, 0.25 + half], abs=1e-6)
    ci, left_out = lds.bootstrap_ci95(lds.group_predictions(scores, subsets), -nll.mean(1), 1000, 0)
    assert out["ci95"] == pytest.approx(list(ci), abs=0) and out["bootstrap_undefined"] == left_out


def test_bootstrap_interval_by_hand():
    """4 subsets, 5 resamples with seed 0: numpy.random.default_rng(0).integers(0, 4, (5, 4)) draws the subsets
    (3 2 2 1), (1 0 0 0), (0 3 2 3), (2 2 3 2), (2 2 2 3)."""
    assert np.random.default_rng(0).integers(0, 4, (5, 4)).tolist() == [
        [3, 2, 2, 1],
        [1, 0, 0, 0],
        [0, 3, 2, 3],
        [2, 2, 3, 2],
        [2, 2, 2, 3],
    ]
    predicted = np.array([[1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [4.0, 1.0]])  # [M=4, Q=2]
    actual = np.array([[1.0, 1.0], [3.0, 2.0], [2.0, 3.0], [4.0, 4.0]])
    # query 0, resample (3 2 2 1): predicted 4 3 3 2 -> ranks 4 2.5 2.5 1, actual 4 2 2 3 -> ranks 4 1.5 1.5 3;
    # centred (1.5 0 0 -1.5) . (1.5 -1 -1 0.5) = 1.5 over sqrt(4.5 * 4.5): rho = 1/3. The other four resamples
    # order predicted and actual alike (e.g. (1 0 0 0): 2 1 1 1 and 3 1 1 1): rho = 1. Query 1 is reversed in
    # every resample (each holds two distinct subsets): rho = -1. Per resample the mean: -1/3, 0, 0, 0, 0.
    # Percentiles (linear, positions 0.025 * 4 = 0.1 and 3.9 of the sorted values): -1/3 + 0.1 / 3 = -0.3, 0.
    ci, left_out = lds.bootstrap_ci95(predicted, actual, 5, 0)
    assert ci == pytest.approx((-0.3, 0.0), abs=1e-12) and left_out == 0
    # query 0 alone: 1/3, 1, 1, 1, 1 -> 1/3 + 0.1 * 2/3 = 0.4 and 1
    assert lds.bootstrap_ci95(predicted[:, :1], actual[:, :1], 5, 0)[0] == pytest.approx((0.4, 1.0), abs=1e-12)
    # a query whose outcome never changes has no LDS in any resample: left out of the mean, nothing else moves
    flat = np.concatenate([actual, np.full((4, 1), 7.0)], 1)
    assert lds.bootstrap_ci95(np.concatenate([predicted, predicted[:, :1]], 1), flat, 5, 0)[0] == pytest.approx(
        (-0.3, 0.0), abs=1e-12
    )
    # no query defined in any resample: the interval is undefined and every resample is counted as left out
    ci, left_out = lds.bootstrap_ci95(predicted, np.full((4, 2), 7.0), 5, 0)
    assert np.isnan(ci).all() and left_out == 5
    # a resample that repeats one subset M times has no LDS: of 200 resamples of 2 subsets, those drawing the same
    # subset twice (107 with seed 0) are left out; the others give query 0's rho of 1
    two = np.random.default_rng(0).integers(0, 2, (200, 2))
    repeated = int((two[:, 0] == two[:, 1]).sum())
    assert repeated == 107
    assert lds.bootstrap_ci95(predicted[:2, :1], actual[:2, :1], 200, 0) == ((1.0, 1.0), repeated)


def test_lds_sign_follows_the_convention_end_to_end():
    """A positive score means training on the document raised the completion's log-probability. Retraining
    outcomes built from known additive effects (document n lowers query q's NLL by e[q, n]): scores equal to e
    have LDS +1, their negation -1, noise about 0; the group prediction and the actual effect are both taken
    with that sign (actual = minus the mean NLL over seeds)."""
    rng = np.random.default_rng(0)
    Q, N, M, S = 3, 20, 12, 2
    e = rng.normal(size=(Q, N))
    subsets = retrain.sample_subsets(N, M, 0.5, 0)
    nll = np.stack([[5.0 - e[:, sub].sum(1) + 1e-3 * rng.normal(size=Q) for _ in range(S)] for sub in subsets])
    assert lds.lds(e, subsets, nll)["per_query"] == pytest.approx([1.0] * Q)
    assert lds.lds(-e, subsets, nll)["per_query"] == pytest.approx([-1.0] * Q)
    assert abs(lds.lds(rng.normal(size=(Q, N)), subsets, nll)["mean"]) < 0.6


def test_pbrf_correlation_leaves_out_unconverged_optimizations():
    scores = np.array([[1.0, 2.0, 3.0, 4.0, 0.0]])
    response = np.array([[1.0, 2.0, 3.0, 4.0, 100.0]])  # the last optimization diverged
    ratio = np.array([0.01, 0.02, 0.05, 0.03, 13.0])
    assert pbrf.converged_pearson(scores, response, ratio, 0.1) == pytest.approx(1.0)
    assert pbrf.mean_pearson(scores, response) < 0
    assert np.isnan(pbrf.converged_pearson(scores, response, np.array([0.01, 0.5, 0.5, 0.02, 13.0]), 0.1))


def test_recall_by_hand():
    scores = np.array([0.5, 0.9, 0.1, 0.7])  # ranking: doc1, doc3, doc0, doc2
    np.testing.assert_array_equal(recall.ranks(scores), [3, 1, 4, 2])
    assert recall.reciprocal_rank(scores, [2, 3]) == 0.5
    assert recall.recall_at(scores, [2, 3], 1) == 0.0
    assert recall.recall_at(scores, [2, 3], 2) == 0.5
    assert recall.recall_at(scores, [2, 3], 4) == 1.0
    two = np.stack([scores, -scores])  # second query: doc2 first
    out = recall.recall(two, [[2, 3], [2], []], [1, 2])
    assert out == {"mrr": pytest.approx(0.75), "recall_at": {"1": 0.5, "2": pytest.approx(0.75)}, "queries": 2}


def test_subsets_and_schedule():
    s = retrain.sample_subsets(10, 4, 0.5, 0)
    assert s.shape == (4, 5) and all(len(set(r)) == 5 and list(r) == sorted(r) for r in s)
    np.testing.assert_array_equal(retrain.sample_subsets(10, 2, 0.5, 0), s[:2])  # more subsets extend, never change
    sched = retrain.schedule(np.array([3, 5, 7, 9]), 5, 2, 1)
    assert sched.shape == (5, 2)
    for epoch in (sched[0:2],):  # an epoch visits every member once
        assert sorted(epoch.ravel().tolist()) == [3, 5, 7, 9]
    with pytest.raises(ValidationError, match="validate.fraction"):
        retrain.sample_subsets(3, 2, 0.1, 0)


def test_subset_steps_by_hand():
    # fixed: the full model's steps whatever the subset
    assert retrain.subset_steps("fixed", 500, 128, 64, 16) == 500
    # epochs: 500 steps over 128 documents in batches of 16 are 500 / 8 = 62.5 passes; a subset of 64 has 4
    # minibatches a pass: 250 steps. A subset of 40 (2 whole minibatches a pass; the remainder is dropped) 125.
    assert retrain.subset_steps("epochs", 500, 128, 64, 16) == 250
    assert retrain.subset_steps("epochs", 500, 128, 40, 16) == 125
    # rounding and the floor of one step: 10 * 1 / 7 = 1.43 -> 1; 3 * 1 / 7 = 0.43 -> at least 1
    assert retrain.subset_steps("epochs", 10, 112, 16, 16) == 1 and retrain.subset_steps("epochs", 3, 112, 16, 16) == 1
    with pytest.raises(ValidationError, match="validate.subset_steps"):
        retrain.subset_steps("passes", 500, 128, 64, 16)


def test_diverged_retraining_names_subset_and_seed():
    losses = np.array([[1.0, 0.5, 0.4], [1.0, np.inf, np.nan]])
    with pytest.raises(ValidationError, match=r"^retraining of subset 7 seed 1 diverged: loss is not finite at step 2"):
        retrain.check_losses(losses, ["of subset 3 seed 0", "of subset 7 seed 1"])


def test_bregman_is_the_kl_and_zero_at_the_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5))
    ref = rng.normal(size=(2, 3, 5))
    logp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    weights = np.array([[0, 1, 1], [0, 1, 0]], float)
    logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    kl = (np.exp(logp) * (logp - logq)).sum(-1)  # [2, 3]; position t predicts t+1
    expect = [kl[0, 0] + kl[0, 1], kl[1, 0]]
    np.testing.assert_allclose(pbrf.bregman(logits, logp, weights), expect, rtol=1e-5)
    np.testing.assert_allclose(pbrf.bregman(ref, logp, weights), 0.0, atol=1e-6)


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "override, key",
    [
        ("validate.subsets=1", "validate.subsets"),
        ("validate.subset_steps=passes", "validate.subset_steps"),
        ("validate.subset_init=random", "validate.subset_init"),
        ("validate.bootstrap=0", "validate.bootstrap"),
        ("validate.fraction=1.0", "validate.fraction"),
        ("validate.fraction=0", "validate.fraction"),
        ("validate.strategies=[ekfac,newton]", "validate.strategies"),
    ],
)
def test_bad_settings_are_config_errors(override, key, capsys):
    with pytest.raises(cfg.ConfigError, match=key):
        cfg.load(None, [override])
    assert cli.main(["-q", "validate", "--out", "/nonexistent/never-written", override]) == 2  # overrides after --out
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxinf validate: error:") and key in err[0]


def test_fresh_initializations_need_training_from_scratch(capsys):
    with pytest.raises(cfg.ConfigError, match="validate.subset_init"):
        cfg.load(None, ["validate.subset_init=fresh", "validate.from=checkpoint"])
    assert cfg.load(None, ["validate.subset_init=fresh"]).validate.subset_init == "fresh"
    assert (
        cli.main(
            [
                "-q",
                "validate",
                "--out",
                "/nonexistent/never-written",
                "validate.subset_init=fresh",
                "validate.from=checkpoint",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "validate.subset_init" in err[0], err


def test_from_is_the_yaml_key():
    assert cfg.load(None, ["validate.from=checkpoint"]).validate.start == "checkpoint"
    with pytest.raises(cfg.ConfigError, match="validate.start"):
        cfg.load(None, ["validate.start=checkpoint"])


# ----------------------------------------------------------------------------- nothing stale, nothing ignored


def _user_world(tmp_path, n_documents=8):
    from pipeline_support import make_world

    w = make_world(tmp_path / "world", n_documents=n_documents, n_queries=2, seed=1)
    return w, [
        f"model.checkpoint={w['model']}",
        f"data.documents={w['docs']}",
        f"data.queries={w['queries']}",
        "data.max_length=48",
        "validate.batch_size=2",
    ]


def _edit_line(path, i, field, value):
    lines = path.read_text().splitlines()
    row = json.loads(lines[i])
    row[field] = value
    lines[i] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


def test_every_input_and_setting_that_changes_a_result_changes_its_key(tmp_path):
    """The work directories a validation reuses are named by hashes of the content of the inputs (not their
    paths) and of every setting that changes them: each change below gives a new key for what it changes (and
    only for that), and undoing it gives the old key back."""
    from jaxinf.validate import driver

    w, base = _user_world(tmp_path)
    keys = lambda *extra: driver.keys(driver.load_config(None, base + list(extra)))
    k0 = keys()
    assert keys() == k0 and set(k0) == {"training", "retraining", "scores"}
    for setting, changes in [
        ("factors.track=all", "scores"),
        ("factors.seed=7", "scores"),
        ("factors.fisher=empirical", "scores"),
        ("validate.steps=7", "training"),
        ("validate.seed=3", "training"),
        ("validate.fraction=0.25", "training"),
        ("validate.learning_rate=0.01", "training"),
        ("validate.batch_size=3", "training"),
        ("validate.from=checkpoint", "training"),
    ]:
        k = keys(setting)
        assert k["scores"] != k0["scores"], setting
        assert (k["training"] != k0["training"]) == (changes == "training"), setting
        assert (k["retraining"] != k0["retraining"]) == (changes == "training"), setting
    # the retraining protocol: new retrainings, the same full model and scores
    for setting in ("validate.subset_steps=epochs", "validate.subset_init=fresh"):
        k = keys(setting)
        assert k["retraining"] != k0["retraining"] and k["training"] == k0["training"], setting
        assert k["scores"] == k0["scores"], setting
    both = keys("validate.subset_steps=epochs", "validate.subset_init=fresh")["retraining"]
    assert (
        len(
            {
                both,
                keys("validate.subset_steps=epochs")["retraining"],
                keys("validate.subset_init=fresh")["retraining"],
                k0["retraining"],
            }
        )
        == 4
    )
    for setting in (
        "validate.subsets=5",
        "validate.seeds=3",
        "validate.dampings=[0.5]",
        "validate.group=2",
        "validate.bootstrap=10",
        "run.out=elsewhere",
    ):  # more subsets or seeds extend; dampings name
        assert keys(setting) == k0, setting  # their score files; the bootstrap is not kept
    # the example: these two used to share one key
    assert keys("factors.track=mlp", "factors.seed=7") != keys("factors.track=all", "factors.seed=3")

    # inputs edited in place (same paths): documents, queries, and the weights where training starts from them
    original = w["docs"].read_text()
    _edit_line(w["docs"], 3, "text", "an edited document about nothing")
    assert keys()["training"] != k0["training"]
    w["docs"].write_text(original)
    assert keys() == k0
    original = w["queries"].read_text()
    _edit_line(w["queries"], 1, "completion", "4 5 6 .")
    assert keys()["training"] != k0["training"]
    w["queries"].write_text(original)
    assert keys() == k0

    import safetensors.numpy as stn

    k_ckpt = keys("validate.from=checkpoint")
    (weights,) = w["model"].glob("*.safetensors")
    tensors = stn.load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + np.float32(1e-3)
    stn.save_file(tensors, str(weights))
    assert keys("validate.from=checkpoint")["training"] != k_ckpt["training"]
    assert keys() == k0  # from scratch the checkpoint's weights are not used (its architecture is)


def test_built_in_world_tracks_all_layers_unless_told():
    from jaxinf.validate import driver

    assert driver.load_config(None, []).factors.track == "all"
    assert driver.load_config(None, ["factors.track=mlp"]).factors.track == "mlp"
    assert driver.load_config(None, ["model.checkpoint=/x"]).factors.track == "mlp"  # a user's world: the default


def test_built_in_world_honours_a_track_file_setting(tmp_path):
    from jaxinf.validate import driver

    path = tmp_path / "v.yaml"
    path.write_text("factors: {track: mlp}\nvalidate: {subsets: 4}\n")
    assert driver.load_config(str(path), []).factors.track == "mlp"
    path.write_text("validate: {subsets: 4}\n")
    assert driver.load_config(str(path), []).factors.track == "all"


@pytest.mark.parametrize(
    "override, key",
    [
        ("factors.strategy=kfac", "factors.strategy"),
        ("scores.damping=0.1", "scores.damping"),
        ("scores.query_rank=4", "scores.query_rank"),
        ("scores.normalize=per_nat", "scores.normalize"),
        ("factors.max_documents=10", "factors.max_documents"),
        ("run.precision=float64", "run.precision"),
        ("mesh.data=2", "mesh.data"),
        ("model.dtype=bfloat16", "model.dtype"),
        ("data.documents=d.jsonl", "data.documents"),
    ],
)
def test_settings_validate_cannot_honour_are_refused(override, key, tmp_path, capsys):
    out = tmp_path / "v"
    assert cli.main(["-q", "validate", override, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("jaxinf validate: error: jaxinf validate cannot honour") and key in err[0]
    )
    assert not out.exists()  # refused before anything is written


def test_settings_that_change_nothing_are_accepted():
    from jaxinf.validate import driver

    driver.check_settings(
        cfg.load(
            None,
            [
                "run.out=x",
                "data.batch_size=3",
                "scores.topk=5",
                "plan.hosts=4",
                "factors.track=all",
                "factors.fisher=empirical",
                "factors.seed=3",
            ],
        )
    )
    with pytest.raises(ValidationError, match="model.dtype"):
        driver.check_settings(cfg.load(None, ["model.checkpoint=/x", "model.dtype=float64", "run.precision=float64"]))
    driver.check_settings(cfg.load(None, ["model.checkpoint=/x", "model.dtype=bfloat16", "data.max_length=64"]))


def test_validate_and_analyze_take_the_run_directory_lock(tmp_path, capsys):
    from jaxinf.run.lock import RunLock

    out = tmp_path / "v"
    with RunLock(out):
        assert cli.main(["-q", "validate", "--out", str(out), *TINY]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another jaxinf process" in err[0], err
        assert cli.main(["-q", "analyze", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another jaxinf process" in err[0], err
    assert not (out / "work").exists()


# ----------------------------------------------------------------------------- end to end, tiny

TINY = [
    "validate.builtin_documents=24",
    "validate.subsets=3",
    "validate.seeds=2",
    "validate.steps=12",
    "validate.batch_size=4",
    "validate.group=4",
    "validate.strategies=[identity,diagonal]",
    "validate.dampings=[0.01,null]",
    "validate.recall_k=[1,5]",
]


def test_validate_end_to_end_schema_and_resume(tmp_path, monkeypatch):
    from jaxinf.validate import driver

    out = tmp_path / "val"
    config = cfg.load(None, TINY)
    saved = []
    real_save = retrain.save_npy

    def crash_after_four(path, array):  # killed after 4 of the 6 retrainings are saved
        if len(saved) == 4:
            raise KeyboardInterrupt
        real_save(path, array)
        saved.append(path.name)

    monkeypatch.setattr(retrain, "save_npy", crash_after_four)
    schedule_before = retrain.schedule
    with pytest.raises(KeyboardInterrupt):
        driver.validate(config, out)
    assert not (out / "validation.json").exists()
    work = next((out / "work").iterdir())
    (units,) = (work / "units").iterdir()  # keyed by the retraining protocol
    assert len(list(units.glob("*.npy"))) == 4
    kept = {p.name: p.stat().st_mtime_ns for p in units.glob("*.npy")}

    trained = []
    monkeypatch.setattr(retrain, "save_npy", lambda path, array: (trained.append(path.name), real_save(path, array)))
    result = driver.validate(config, out)
    assert sorted(trained) == sorted({f"s{m:04d}_r{s:02d}.npy" for m in range(3) for s in range(2)} - set(kept))
    assert {p.name: p.stat().st_mtime_ns for p in units.glob("*.npy") if p.name in kept} == kept

    on_disk = json.loads((out / "validation.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert (on_disk["subsets"], on_disk["fraction"], on_disk["seeds"]) == (3, 0.5, 2)
    assert (
        on_disk["procedure"]["subset_steps"],
        on_disk["procedure"]["retraining_steps"],
        on_disk["procedure"]["subset_init"],
    ) == ("fixed", 12, "shared")
    assert on_disk["bootstrap"]["resamples"] == 1000
    for s in ("identity", "diagonal"):
        entry = on_disk["lds"][s]
        assert set(entry) == {"mean", "per_query", "ci95", "ci95_queries", "undefined", "bootstrap_undefined"}
        assert len(entry["per_query"]) == len(on_disk["queries"])
        assert entry["undefined"] == sum(x is None for x in entry["per_query"])
        assert len(entry["ci95"]) == 2 and len(entry["ci95_queries"]) == 2
        assert set(on_disk["recall"][s]) >= {"mrr", "recall_at"} and set(on_disk["recall"][s]["recall_at"]) == {
            "1",
            "5",
        }
        # MRR and Recall@k recomputed by hand from the saved scores and the world's supporting documents
        (scores,) = (work / "scores").glob(f"*/{s}_{'heuristic' if s == 'identity' else '0.01'}.npy")
        supports = driver.load_world(config).supports
        rr, hit1, hit5 = [], [], []
        for row, sup in zip(np.load(scores), supports):
            if sup:
                position = {int(d): i + 1 for i, d in enumerate(np.argsort(-row, kind="stable"))}
                rr.append(1 / min(position[d] for d in sup))
                hit1.append(np.mean([position[d] <= 1 for d in sup]))
                hit5.append(np.mean([position[d] <= 5 for d in sup]))
        assert on_disk["recall"][s]["queries"] == len(rr) > 0
        assert on_disk["recall"][s]["mrr"] == pytest.approx(np.mean(rr), abs=1e-12)
        assert on_disk["recall"][s]["recall_at"] == {
            "1": pytest.approx(np.mean(hit1)),
            "5": pytest.approx(np.mean(hit5)),
        }
    assert set(on_disk["lds_by_damping"]["diagonal"]) == {"heuristic", "0.01"}
    assert on_disk["pbrf"] == {}  # validate.pbrf is off by default
    html = (out / "report" / "index.html").read_text()
    assert "lds.png" in html and "scatter_1.png" in html and (out / "report" / "lds.png").stat().st_size > 0

    # a second run reads everything back: no training, the same numbers
    monkeypatch.setattr(retrain, "schedule", lambda *a, **k: pytest.fail("trained again on resume"))
    assert json.loads(json.dumps(driver.validate(config, out)))["lds"] == on_disk["lds"]

    # reruns into the same directory after a change: what it changes is recomputed, nothing else is
    written = []
    real_driver_save = driver.save_npy
    monkeypatch.setattr(driver, "save_npy", lambda path, a: (written.append(path), real_driver_save(path, a)))
    (first_scores,) = (work / "scores").iterdir()
    # (factors.seed and factors.fisher change the same key: test_every_input_and_setting_that_changes_a_result...)
    r = driver.validate(cfg.load(None, TINY + ["factors.track=all"]), out)  # no retraining: schedule fails
    assert len(written) == 3 and len({p.parent for p in written}) == 1, written  # identity, diagonal x 2
    assert written[0].parent != first_scores and len(list((work / "scores").iterdir())) == 2
    assert any("self_attn" in name for name in r["tracked_layers"])
    assert not any("self_attn" in name for name in on_disk["tracked_layers"])
    written.clear()
    r = driver.validate(cfg.load(None, TINY + ["validate.dampings=[0.1,null]"]), out)
    assert [p.name for p in written] == ["diagonal_0.1.npy"] and written[0].parent == first_scores
    assert r["damping"] == "0.1" and set(r["lds_by_damping"]["diagonal"]) == {"0.1", "heuristic"}

    real_schedule = schedule_before
    seeds = []
    monkeypatch.setattr(
        retrain, "schedule", lambda m, steps, b, seed: (seeds.append(seed), real_schedule(m, steps, b, seed))[1]
    )
    r = driver.validate(cfg.load(None, TINY + ["validate.subsets=4"]), out)  # one more subset: only it is trained
    assert sorted(seeds) == [4000, 4001] and r["subsets"] == 4 and len(r["lds"]["identity"]["per_query"]) > 0

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(retrain, "schedule", stop)
    with pytest.raises(Stop):  # other steps: the full model is trained again
        driver.validate(cfg.load(None, TINY + ["validate.steps=13"]), out)
    assert len(list((out / "work").iterdir())) == 2


def test_retraining_protocols_count_steps_and_starts(tmp_path, monkeypatch):
    """``subset_steps: epochs`` trains a retraining on half the documents for half the full model's optimizer
    steps (counted: the losses its scan returns, one per step), ``fixed`` for as many; ``subset_init: fresh``
    starts retraining (m, s) from ``models.init(config, 1000 (m + 1) + s)``, ``shared`` every one from the full
    model's start. A protocol change into the same directory retrains (new units under a new key) and reuses the
    full model and the scores."""
    import jax

    from jaxinf import models
    from jaxinf.validate import driver

    calls = []
    real = retrain.make_trainer

    def counting(task, proc, stacked_starts=False):
        many, one = real(task, proc, stacked_starts)

        def many_(p, d, q, sched):
            meas, losses = many(p, d, q, sched)
            calls.append(("many", np.asarray(losses).shape, jax.tree_util.tree_leaves(p)))
            return meas, losses

        def one_(p, d, q, sched):
            out = one(p, d, q, sched)
            calls.append(("one", np.asarray(out[1]).shape, None))
            return out

        return many_, one_

    monkeypatch.setattr(retrain, "make_trainer", counting)
    saved = []
    real_save = driver.save_npy
    monkeypatch.setattr(driver, "save_npy", lambda path, a: (saved.append(path), real_save(path, a)))
    small = TINY + ["validate.subsets=2", "validate.strategies=[identity]", "validate.dampings=[null]"]
    out = tmp_path / "v"  # 24 documents, batch 4: the full model makes 12 steps = 2 passes of 6 minibatches
    config = cfg.load(None, small)
    start = [np.asarray(x) for x in jax.tree_util.tree_leaves(driver.load_world(config).lm.params)]

    r = driver.validate(config, out)
    assert [(c[0], c[1]) for c in calls] == [("one", (12,)), ("many", (4, 12))]  # 2 subsets x 2 seeds, one group
    assert all(np.array_equal(np.asarray(x), y) for x, y in zip(calls[1][2], start))
    assert (r["procedure"]["subset_steps"], r["procedure"]["retraining_steps"], r["procedure"]["subset_init"]) == (
        "fixed",
        12,
        "shared",
    )
    assert len(saved) == 1

    calls.clear(), saved.clear()
    r = driver.validate(cfg.load(None, small + ["validate.subset_steps=epochs"]), out)
    # subsets of 12 documents: 3 minibatches a pass, 2 passes = 6 steps; full model and scores reused
    assert [(c[0], c[1]) for c in calls] == [("many", (4, 6))] and saved == []
    assert (r["procedure"]["subset_steps"], r["procedure"]["retraining_steps"]) == ("epochs", 6)
    assert all(np.array_equal(np.asarray(x), y) for x, y in zip(calls[0][2], start))

    calls.clear()
    r = driver.validate(cfg.load(None, small + ["validate.subset_steps=epochs", "validate.subset_init=fresh"]), out)
    assert [(c[0], c[1]) for c in calls] == [("many", (4, 6))] and saved == []
    lm = driver.load_world(config).lm
    for g, (m, s) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # the order retrain_all trains them in
        own = jax.tree_util.tree_leaves(models.init(lm.config, 1000 * (m + 1) + s).params)
        assert all(np.array_equal(np.asarray(x)[g], np.asarray(y)) for x, y in zip(calls[0][2], own)), (m, s)
    assert not all(np.array_equal(np.asarray(x)[0], y) for x, y in zip(calls[0][2], start))
    assert r["procedure"]["subset_init"] == "fresh"

    # three protocols, three sets of retrainings, each its own outcome
    (work,) = (out / "work").iterdir()
    units = sorted((work / "units").iterdir())
    assert len(units) == 3
    first = [np.load(u / "s0000_r00.npy") for u in units]
    assert (
        not np.array_equal(first[0], first[1])
        and not np.array_equal(first[1], first[2])
        and not np.array_equal(first[0], first[2])
    )


def test_divergence_stops_with_one_line(tmp_path, capsys):
    args = ["-q", "validate", *TINY, "validate.learning_rate=1e30", "--out", str(tmp_path / "v")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged: loss is not finite" in err[0] and "seed 0" in err[0], err


# ----------------------------------------------------------------------------- supports


def test_query_reader_keeps_supports(tmp_path):
    from jaxinf.data.errors import DataError
    from jaxinf.data.queries import read_queries

    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"id": "a", "prompt": "p", "completion": "c", "supports": ["d1", 7]}\n'
        '{"id": "b", "prompt": "p", "completion": "c"}\n'
    )
    a, b = read_queries(path)
    assert a.supports == ("d1", "7") and b.supports == () and "supports" not in a.extra
    path.write_text('{"id": "a", "prompt": "p", "completion": "c", "supports": "d1"}\n')
    with pytest.raises(DataError, match=r'q.jsonl:1: field "supports" must be a list'):
        read_queries(path)


def test_demo_supports_are_the_documents_stating_the_fact():
    from jaxinf.demo import corpus

    docs = corpus.documents(0, 300)
    factual = [q for q in corpus.queries(0) if q.kind == "factual"]
    towns = corpus.towns_and_facts(0)
    for q in factual:
        town, trait = q.fact
        ids = corpus.supports(docs, q)
        assert ids, q
        for d in docs:  # independent check: the trait's value and the town in one fact document
            states = d["source"] == "facts" and any(
                t.format(town=town, v=towns[town][trait]) in d["text"] for t in corpus.FACT_TEMPLATES[trait]
            )
            assert (d["id"] in ids) == states, (q, d)
    assert all(not corpus.supports(docs, q) for q in corpus.queries(0) if q.kind != "factual")


# ----------------------------------------------------------------------------- PBRF against a dense oracle


@pytest.mark.heavy
def test_pbrf_is_the_damped_gauss_newton_response_for_small_eps():
    """For small eps the PBRF influence is ``G_q^T (F + lambda I)^{-1} grad L_m`` with F the Gauss-Newton matrix
    of the mean document loss, built here densely (per document ``J^T (diag p - p p^T) J``) for one small layer."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxinf import models
    from jaxinf.validate import world as W

    jax.config.update("jax_enable_x64", True)
    try:
        w = W.builtin(12)
        lm = models.init(dataclasses.replace(w.lm.config, dtype="float64", param_dtype="float64"), 0)
        task = lm.task()
        params = lm.params
        docs = {k: jnp.asarray(v) for k, v in w.documents.items()}
        docs["mask"], docs["weights"] = docs["mask"].astype(jnp.float64), docs["weights"].astype(jnp.float64)
        queries = {k: jnp.asarray(v) for k, v in w.queries.items()}
        queries = {
            **queries,
            "mask": queries["mask"].astype(jnp.float64),
            "weights": queries["weights"].astype(jnp.float64),
        }
        name = "model.layers.*.self_attn.k_proj"
        path = ("model", "layers", "self_attn", "k_proj", "kernel")

        def get(p):
            for k in path:
                p = p[k]
            return p

        def put(p, x):
            p = jax.tree.map(lambda y: y, p)
            node = p
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = x
            return p

        theta = get(params)
        shape, size = theta.shape, theta.size
        logits_of = lambda flat, b: lm.apply(put(params, flat.reshape(shape)), b["tokens"], b["mask"])
        F = jnp.zeros((size, size))
        for i in range(w.num_documents):
            b = {k: v[i : i + 1] for k, v in docs.items()}
            J = jax.jacfwd(lambda f: logits_of(f, b)[0, :-1])(theta.ravel())  # [T-1, V, P]
            p = jax.nn.softmax(logits_of(theta.ravel(), b)[0, :-1], -1)  # [T-1, V]
            HJ = p[:, :, None] * J - p[:, :, None] * jnp.einsum("tv,tvp->tp", p, J)[:, None, :]
            F = F + jnp.einsum("t,tvp,tvq->pq", b["weights"][0, 1:], J, HJ)
        F = F / w.num_documents
        lam = 1e-3
        g_doc = jax.vmap(
            lambda i: jax.grad(
                lambda f: task.train_loss(
                    put(params, f.reshape(shape)),
                    {k: jax.lax.dynamic_slice_in_dim(v, i, 1) for k, v in docs.items()},
                    None,
                    None,
                ).sum()
            )(theta.ravel())
        )(jnp.arange(3))  # [3, P]
        g_q = jax.vmap(
            lambda q: jax.grad(lambda f: retrain.measurements(task, put(params, f.reshape(shape)), queries)[q])(
                theta.ravel()
            )
        )(jnp.arange(4))  # [4, P]
        expect = np.asarray(g_q @ jnp.linalg.solve(F + lam * jnp.eye(size), g_doc.T))  # [4, 3]

        got, ratio = pbrf.pbrf_influence(
            lm,
            task,
            params,
            docs,
            {k: v[:4] for k, v in queries.items()},
            np.arange(3),
            [name],
            damping=lam,
            eps=1e-4,
            iterations=200,
        )
        assert np.max(ratio) < 1e-4
        np.testing.assert_allclose(got, expect, rtol=0, atol=0.01 * np.abs(expect).max())
    finally:
        jax.config.update("jax_enable_x64", False)


def _toy_lm(V=7, D=3, H=4, T=5):
    """A two-layer causal 'LM' small enough for dense oracles (47 tracked parameters): logits =
    tanh(embed[token] @ a) @ b + b_bias; the layers ``head.a`` and ``head.b`` are tracked, the embedding is not."""
    import types

    import jax
    import jax.numpy as jnp

    k = iter(jax.random.split(jax.random.key(0), 8))
    params = {
        "embed": jax.random.normal(next(k), (V, D)),
        "head": {
            "a": {"kernel": jax.random.normal(next(k), (D, H))},
            "b": {"kernel": jax.random.normal(next(k), (H, V)), "bias": 0.1 * jax.random.normal(next(k), (V,))},
        },
    }

    def apply(p, tokens, mask):
        return (
            jnp.tanh(p["embed"][tokens] @ p["head"]["a"]["kernel"]) @ p["head"]["b"]["kernel"] + p["head"]["b"]["bias"]
        )

    def token_nll(p, b):  # position t predicts t+1, weighted by the target's weight
        logp = jax.nn.log_softmax(apply(p, b["tokens"], b["mask"])[:, :-1], -1)
        return -jnp.take_along_axis(logp, b["tokens"][:, 1:, None], -1)[..., 0] * b["weights"][:, 1:]

    lm = types.SimpleNamespace(apply=apply)
    task = types.SimpleNamespace(
        train_loss=lambda p, b, probes, key: token_nll(p, b), measurement=lambda p, b, probes: token_nll(p, b)
    )
    rng = np.random.default_rng(0)
    docs = {
        "tokens": jnp.asarray(rng.integers(0, V, (4, T))),
        "mask": jnp.ones((4, T)),
        "weights": jnp.ones((4, T)).at[:, 0].set(0.0),
    }
    queries = {
        "tokens": jnp.asarray(rng.integers(0, V, (3, T))),
        "mask": jnp.ones((3, T)),
        "weights": jnp.asarray([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 1, 1, 1, 1.0]]),
    }
    return lm, task, params, docs, queries, token_nll


def test_pbrf_matches_the_exact_response_and_its_damped_gauss_newton_limit():
    """float64, a model of 47 tracked parameters in two layers with different dampings, 4 documents, 3 queries.

    1. The L-BFGS PBRF (``pbrf_influence``, stopped at gradient norm 1e-9 of its start) equals the exact PBRF:
       the same objective, written here independently and minimized by Newton's method with its dense Hessian
       to round-off (relative error <= 1e-7 of the largest influence; measured 2.1e-9).
    2. As eps -> 0 the exact PBRF tends to ``G_q^T (F + diag(lambda_l))^{-1} grad L_m``, F the Gauss-Newton
       matrix built explicitly (per token ``J^T (diag p - p p^T) J``), each layer damped by its own lambda:
       the error is first order in eps (eps 1e-3: <= 1e-2 relative, measured 4.2e-3; at eps 1e-4 at least 5x
       smaller, measured 4.2e-4).
    3. The per-layer damping is what is solved: one pooled damping gives other numbers (measured 47% apart)."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        lm, task, params, docs, queries, token_nll = _toy_lm()
        names = ["head.a", "head.b"]
        lam = {"head.a": np.array(0.02), "head.b": np.array(0.3)}
        flat0, unflat = jax.flatten_util.ravel_pytree(params["head"])
        lam_vec = jax.flatten_util.ravel_pytree(
            {
                "a": {"kernel": jnp.full((3, 4), 0.02)},
                "b": {"kernel": jnp.full((4, 7), 0.3), "bias": jnp.full((7,), 0.3)},
            }
        )[0]
        full = lambda flat: {"embed": params["embed"], "head": unflat(flat)}
        ref = jax.nn.log_softmax(lm.apply(params, docs["tokens"], docs["mask"]), -1)

        def J(flat, m, eps, lam_vec):
            logq = jax.nn.log_softmax(lm.apply(full(flat), docs["tokens"], docs["mask"]), -1)[:, :-1]
            kl = (jnp.exp(ref[:, :-1]) * (ref[:, :-1] - logq)).sum(-1) * docs["weights"][:, 1:]
            Lm = token_nll(full(flat), {k: jax.lax.dynamic_slice_in_dim(v, m, 1) for k, v in docs.items()}).sum()
            return kl.sum(-1).mean() + eps * Lm + 0.5 * jnp.sum(lam_vec * (flat - flat0) ** 2)

        f_q = lambda flat: token_nll(full(flat), queries).sum(-1)

        @jax.jit
        def solve(m, eps, lv):  # Newton's method from theta_s, 12 steps (quadratic convergence)
            step = lambda _, f: f - jnp.linalg.solve(jax.hessian(J)(f, m, eps, lv), jax.grad(J)(f, m, eps, lv))
            f = jax.lax.fori_loop(0, 12, step, flat0)
            return -(f_q(f) - f_q(flat0)) / eps, jnp.linalg.norm(jax.grad(J)(f, m, eps, lv))

        def exact(eps, lv=lam_vec):
            out, gnorm = jax.vmap(solve, in_axes=(0, None, None))(jnp.arange(4), eps, lv)
            assert np.all(np.asarray(gnorm) < 1e-12), gnorm
            return np.asarray(out).T  # [Q, documents]

        eps = 0.05
        got, ratio = pbrf.pbrf_influence(
            lm, task, params, docs, queries, np.arange(4), names, damping=lam, eps=eps, iterations=500, tolerance=1e-9
        )
        want = exact(eps)
        assert np.all(ratio <= 1e-8), ratio
        err = np.abs(got - want).max() / np.abs(want).max()
        print(f"\nPBRF by L-BFGS vs exact (Newton): max rel. error {err:.2e}; gradient ratios {ratio}")
        assert err <= 1e-7, err

        # the damped Gauss-Newton limit, F built explicitly
        @jax.jit
        def gn(flat):
            F = 0
            for i in range(4):
                b = {k: v[i : i + 1] for k, v in docs.items()}
                Jz = jax.jacfwd(lambda f: lm.apply(full(f), b["tokens"], b["mask"])[0, :-1])(flat)  # [T-1, V, P]
                p = jax.nn.softmax(lm.apply(full(flat), b["tokens"], b["mask"])[0, :-1], -1)
                HJ = p[:, :, None] * Jz - p[:, :, None] * jnp.einsum("tv,tvp->tp", p, Jz)[:, None, :]
                F = F + jnp.einsum("t,tvp,tvq->pq", b["weights"][0, 1:], Jz, HJ)
            return F / 4

        g_doc = jax.jit(
            jax.vmap(
                lambda m: jax.grad(
                    lambda f: token_nll(
                        full(f), {k: jax.lax.dynamic_slice_in_dim(v, m, 1) for k, v in docs.items()}
                    ).sum()
                )(flat0)
            )
        )(jnp.arange(4))
        g_q = jax.jit(jax.jacrev(f_q))(flat0)  # [Q, P]
        limit = np.asarray(g_q @ jnp.linalg.solve(gn(flat0) + jnp.diag(lam_vec), g_doc.T))
        rel = lambda e: np.abs(exact(e) - limit).max() / np.abs(limit).max()
        e3, e4 = rel(1e-3), rel(1e-4)
        print(f"exact PBRF vs damped Gauss-Newton limit: eps 1e-3 {e3:.2e}, eps 1e-4 {e4:.2e}")
        assert e3 <= 1e-2 and e4 <= e3 / 5, (e3, e4)

        pooled = exact(eps, jnp.full_like(lam_vec, float(np.mean([0.02, 0.3]))))
        moved = np.abs(pooled - want).max() / np.abs(want).max()
        print(f"one pooled damping instead of each layer's: rel. difference {moved:.2e}")
        assert moved > 1e3 * max(err, 1e-9)


def test_pbrf_chunks_resume_from_the_finished_ones(tmp_path):
    """The PBRF's documents run ``chunk`` at a time (one shape, the last chunk padded), each finished chunk written
    and read back on the next call, so a killed run loses at most one chunk; an unreadable unit or one of other
    documents is recomputed."""
    calls = []

    def fn(idx):  # stands in for one vmap-ed chunk of optimizations
        calls.append(list(idx))
        return np.stack([idx * 10.0, idx * 100.0], 1), idx / 1000.0

    units = tmp_path / "pbrf"
    values, ratio = pbrf.in_chunks(fn, [1, 4, 7], 2, units)
    assert calls == [[1, 4], [7, 7]]  # one shape: the last chunk padded
    np.testing.assert_array_equal(values, [[10, 100], [40, 400], [70, 700]])
    np.testing.assert_array_equal(ratio, [0.001, 0.004, 0.007])
    assert sorted(p.name for p in units.iterdir()) == ["chunk_00000.npz", "chunk_00002.npz"]
    calls.clear()
    assert np.array_equal(pbrf.in_chunks(fn, [1, 4, 7], 2, units)[0], values) and calls == []  # all read back
    (units / "chunk_00002.npz").write_bytes(b"not a zip")  # torn by a kill: recomputed
    pbrf.in_chunks(fn, [1, 4, 7], 2, units)
    assert calls == [[7, 7]]
    calls.clear()
    values2, _ = pbrf.in_chunks(fn, [2, 4, 7], 2, units)  # other documents: not reused
    assert calls == [[2, 4]] and values2[0].tolist() == [20, 200]
    seen = []
    pbrf.in_chunks(fn, [2, 4, 7], 2, units, lambda n, computed: seen.append((n, computed)))
    assert seen == [(2, False), (1, False)]  # progress counts read-back chunks too
    seen.clear()
    pbrf.in_chunks(fn, [5], 8, None, lambda n, computed: seen.append((n, computed)))  # no units: nothing written
    assert seen == [(1, True)] and calls[-1] == [5]


@pytest.mark.heavy
def test_validate_with_pbrf(tmp_path):
    from jaxinf.validate import driver

    config = cfg.load(None, TINY + ["validate.pbrf=true", "validate.pbrf_documents=3", "validate.pbrf_iterations=5"])
    result = json.loads(json.dumps(driver.validate(config, tmp_path / "val")))
    assert len(list((tmp_path / "val").rglob("pbrf_*/chunk_00000.npz"))) == 1  # the chunk units of the optimization
    detail = result["pbrf_detail"]
    assert detail["damping"] == 0.01 and len(detail["documents"]) == 3 and len(detail["gradient_norm_ratio"]) == 3
    assert detail["converged"] == sum(r < detail["converged_below"] for r in detail["gradient_norm_ratio"])
    assert set(result["pbrf"]) == set(detail["all_documents"]) == {"identity", "diagonal"}
    assert all(isinstance(x, float) for x in detail["all_documents"].values())
    # the correlation counts converged optimizations only: with fewer than 3 there is none (null)
    assert all((x is None) == (detail["converged"] < 3) for x in result["pbrf"].values())


# ----------------------------------------------------------------------------- a user's checkpoint


def test_validate_fine_tunes_a_user_checkpoint(tmp_path, monkeypatch):
    """``validate.from: checkpoint`` on a config's world (a Hugging Face directory, a JSONL corpus, queries with
    ``supports``): the full model and every retraining start from the checkpoint's weights exactly, the results
    have the schema, and recall is measured on the query that names its supporting document. ``from: scratch``
    starts every training from the model's initialization instead, in a work directory of its own."""
    import jax
    from pipeline_support import make_world

    from jaxinf import models
    from jaxinf.validate import driver

    w = make_world(tmp_path / "world", n_documents=24, n_queries=4, seed=1)  # weights unlike validate.seed 0's
    settings = [
        f"model.checkpoint={w['model']}",
        f"data.documents={w['docs']}",
        f"data.queries={w['queries']}",
        "data.max_length=48",
        "validate.subsets=3",
        "validate.seeds=1",
        "validate.steps=8",
        "validate.batch_size=4",
        "validate.group=3",
        "validate.strategies=[identity]",
        "validate.dampings=[0.01]",
        "validate.recall_k=[1,5]",
    ]
    starts = []
    real = retrain.make_trainer

    def spy(task, proc, stacked_starts=False):  # records the parameters every training starts from
        assert not stacked_starts  # the default protocol: shared starts
        many, one = real(task, proc, stacked_starts)
        record = lambda f: lambda params0, *a: (starts.append(params0), f(params0, *a))[1]
        return record(many), record(one)

    monkeypatch.setattr(retrain, "make_trainer", spy)
    config = cfg.load(None, settings + ["validate.from=checkpoint"])
    result = driver.validate(config, tmp_path / "val")
    lm, _ = models.from_hf(str(w["model"]), dtype=config.model.dtype, scan=config.model.scan_layers)
    same = lambda p: jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda x, y: bool(np.array_equal(x, y)), p, lm.params)
    )
    assert len(starts) >= 2 and all(same(p) for p in starts)
    assert result["procedure"]["from"] == "checkpoint" and str(w["model"]) in result["world"]
    assert result["documents"] == 24 and len(result["queries"]) == 4
    assert np.isfinite(result["lds"]["identity"]["mean"]) and len(result["lds"]["identity"]["per_query"]) == 4
    assert result["recall"]["identity"]["queries"] == 1 and set(result["recall"]["identity"]["recall_at"]) == {"1", "5"}

    class Stop(Exception):
        pass

    starts.clear()
    monkeypatch.setattr(
        retrain,
        "make_trainer",
        lambda task, proc, stacked_starts=False: (
            None,
            lambda params0, *a: (starts.append(params0), (_ for _ in ()).throw(Stop())),
        ),
    )
    with pytest.raises(Stop):
        driver.validate(cfg.load(None, settings + ["validate.from=scratch"]), tmp_path / "val")
    assert len(starts) == 1 and not same(starts[0])
    assert len(list((tmp_path / "val" / "work").iterdir())) == 2

    # a rerun with nothing changed reads everything back (no training); after an input is edited in place (same
    # paths), the full model is trained again: nothing of the old work directory is read
    driver.validate(config, tmp_path / "val")
    import safetensors.numpy as stn

    (weights,) = w["model"].glob("*.safetensors")
    tensors = stn.load_file(str(weights))
    name = sorted(tensors)[0]
    edits = [
        (w["docs"], lambda: _edit_line(w["docs"], 5, "text", "an edited document")),
        (w["queries"], lambda: _edit_line(w["queries"], 2, "completion", "4 5 6 .")),
        (weights, lambda: stn.save_file({**tensors, name: tensors[name] * np.float32(1.01)}, str(weights))),
    ]
    for path, edit in edits:
        original = path.read_bytes()
        edit()
        starts.clear()
        with pytest.raises(Stop):
            driver.validate(config, tmp_path / "val")
        assert len(starts) == 1, path
        path.write_bytes(original)
    driver.validate(config, tmp_path / "val")  # restored: reused again


def test_a_damaged_file_of_the_work_directory_is_computed_again(tmp_path, caplog):
    """``jaxinf validate --out DIR`` run again after a file of DIR/work was cut short or overwritten (the full
    model's full.npz, a retraining's unit, a strategy's scores) was a numpy ValueError traceback: such a file is
    computed again, with a warning naming it, and the validation is the same."""
    import logging

    from jaxinf.validate import driver

    out = tmp_path / "val"
    config = cfg.load(None, TINY + ["validate.subsets=2", "validate.strategies=[identity]", "validate.dampings=[null]"])
    first = driver.validate(config, out)
    damaged = [
        next((out / "work").glob("*/full.npz")),
        next((out / "work").glob("*/units/*/s0000_r00.npy")),
        next((out / "work").glob("*/scores/*/identity_*.npy")),
    ]
    damaged[0].write_bytes(b"zz")
    with open(damaged[1], "r+b") as f:
        f.truncate(100)
    damaged[2].write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="jaxinf"):
        again = driver.validate(config, out)
    for path in damaged:
        assert f"{path}: unreadable (" in caplog.text
        assert path.stat().st_size > 100
    assert again["lds"] == first["lds"]
