"""``jaxinf validate``: the full model, every strategy's scores, the retrainings, LDS, recall, PBRF and the report.

Layout of the output directory ``DIR`` (locked while a validation writes it, :mod:`jaxinf.run.lock`)::

    DIR/
      validation.json            the results (schema in docs/validation.md)
      report/index.html          LDS by strategy and damping, predicted vs actual per strategy
      work/<training key>/       everything resumable, keyed by what it depends on:
        key.json                 what the key hashes (for a reader; the key is the hash)
        full.npz                 the model trained on all documents (the one that is scored)
        units/<retraining key>/s<subset>_r<seed>.npy   the queries' measurements under one retrained model
        scores/<scores key>/<strategy>_<damping>.npy, heuristic.json, key.json
        pbrf/<pbrf key>.npz      the PBRF influence of the sampled documents
        pbrf/<pbrf key>/chunk_<first>.npz   one chunk of PBRF optimizations (a killed run resumes from them)

Nothing stale is ever reused: each key is a hash of the *content* of what the
result depends on (:func:`~jaxinf.validate.work_keys.world_fingerprint`: the documents' and queries' token
arrays, the starting parameters and the architecture, i.e. the files as read, not
their paths), of the code that computes it (:func:`~jaxinf.validate.work_keys.code_version`: the jaxinf
sources and the versions of jax, flax and optax), and of every setting that
changes it:

- training key (full model, retrainings): the world, ``validate.from``, ``steps``,
  ``learning_rate``, ``batch_size``, ``fraction``, ``seed``;
- retraining key (the retrainings' measurements): the training key and the
  protocol, ``subset_steps`` and ``subset_init``;
- scores key: the training key, the tracked layers (``factors.track``, resolved
  to layer names), ``factors.fisher``, ``factors.seed`` (strategy and damping
  name the file);
- PBRF key: the scores key (its damping is EK-FAC's per-layer heuristic), the
  damping, ``pbrf_epsilon``, ``pbrf_iterations``, ``pbrf_tolerance`` and the
  sampled documents.

Adding subsets or seeds reuses the retrainings already done (the first subsets
never change). A setting of the config that validate cannot honour is refused
in one line (:func:`check_settings`), never ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf import config as cfg
from jaxinf.atomic import load_npy, load_npz, save_npy, write_atomic, write_json
from jaxinf.engine import curvature, indexing
from jaxinf.hostenv import host_memory
from jaxinf.run import rundir
from jaxinf.run.lock import claim_output
from jaxinf.validate import index as index_mod
from jaxinf.validate import lds as lds_mod
from jaxinf.validate import pbrf as pbrf_mod
from jaxinf.validate import recall as recall_mod
from jaxinf.validate import retrain, work_keys
from jaxinf.validate.world import ValidationError, World, builtin, from_config

log = logging.getLogger("jaxinf")


def damping_label(d: float | None) -> str:
    """``"heuristic"`` for null, else the number as written (``"0.001"``)."""
    return "heuristic" if d is None else repr(float(d))


# Keys whose value changes nothing validate computes nor how it computes it (where to write a run, what a plan
# assumes, checkpoint intervals, batch sizes of jaxinf run): any value is accepted.
NO_EFFECT = {
    "run.out",
    "data.batch_size",
    "data.query_batch_size",
    "factors.save_every",
    "scores.save_every",
    "scores.topk",
    "index.save_every",
    "model.scan_layers",
    "model.remat",
    *(k for k in cfg.all_keys() if k.startswith("plan.")),
}
# Keys validate honours, by world.
HONOURED_ALWAYS = {"factors.track", "factors.fisher", "factors.seed", "model.checkpoint", "index.k", "index.dtype"}
HONOURED_USER = {"model.dtype", "data.documents", "data.queries", "data.max_length"}
WHY_NOT = {
    "factors.strategy": "it compares every strategy of validate.strategies",
    "factors.max_documents": "the curvature is fitted on every document",
    "factors.from": "the curvature is fitted on the model it trains",
    "scores.damping": "use validate.dampings",
    "scores.query_rank": "queries are not rank-truncated",
    "scores.query_svd": "queries are not rank-truncated",
    "scores.normalize": "scores are compared raw",
    "scores.mode": "add ekfac-index to validate.strategies to compare the index",
    "index.from_run": "it builds the index of the model it trains",
    "scores.self_influence": "it computes no self-influence",
    "data.long_documents": "documents are truncated to data.max_length",
    "run.precision": "it computes in model.dtype",
    "model.dtype": "the built-in world is float32; validate does not run in float64",
    "data.documents": "the built-in world has its own documents (set model.checkpoint to validate yours)",
    "data.queries": "the built-in world has its own queries (set model.checkpoint to validate yours)",
    "data.max_length": "the built-in world's documents are whole (set model.checkpoint to validate yours)",
}


def score_name(config: cfg.Config, strategy: str) -> str:
    """The file name of a strategy's scores (the index's carries its size: ``ekfac-index-k8``)."""
    if strategy != index_mod.INDEX_STRATEGY:
        return strategy
    return f"{strategy}-k{config.index.k}" + ("" if config.index.dtype == "float32" else f"-{config.index.dtype}")


def check_settings(config: cfg.Config) -> None:
    """Refuses, in one line naming the keys, every setting that differs from its default and that ``jaxinf
    validate`` cannot honour on this world (nothing is silently ignored)."""
    default = cfg.to_dict(cfg.Config())
    given = cfg.to_dict(config)
    honoured = HONOURED_ALWAYS | (HONOURED_USER if config.model.checkpoint is not None else set())
    bad = []
    for section, values in given.items():
        if section == "validate":
            continue
        for name, value in values.items():
            k = f"{section}.{name}"
            if value != default[section][name] and k not in NO_EFFECT and k not in honoured:
                bad.append(
                    f"{k}={json.dumps(value)} ({WHY_NOT.get(k, 'validate runs on one device' if section == 'mesh' else 'not used by validate')})"
                )
    if config.model.checkpoint is not None and config.model.dtype == "float64":
        bad.append('model.dtype="float64" (validate does not run in float64)')
    if bad:
        raise ValidationError("jaxinf validate cannot honour " + "; ".join(bad) + "; leave them at their defaults")


def tracked_layers(world: World, params) -> dict:
    """The world's tracked layers (``factors.track`` resolved against the model)."""
    from jaxinf.engine import capture

    task = world.lm.task()
    one = {k: np.asarray(x)[:1] for k, x in world.documents.items()}
    return capture.select_layers(
        capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), params, one), world.track
    )


def keys(config: cfg.Config, world: World | None = None) -> dict[str, str]:
    """The training, retraining and scores keys (module docstring) of a config (its world loaded when not given):
    the names of the work directories a validation of it reads and writes."""
    world = load_world(config) if world is None else world
    training = work_keys.training_settings(config, work_keys.world_fingerprint(world))
    return {
        "training": work_keys.key(training),
        "retraining": work_keys.key(work_keys.retraining_settings(config, training)),
        "scores": work_keys.key(work_keys.scores_settings(config, training, tracked_layers(world, world.lm.params))),
    }


def load_config(path: str | None, overrides: list[str]) -> cfg.Config:
    """The config of ``jaxinf validate``: :func:`jaxinf.config.load`, except that on the built-in world (no
    ``model.checkpoint``) ``factors.track`` defaults to ``all`` (the built-in world's measured setting) unless the
    config file or the command line gives it."""
    config = cfg.load(path, overrides)
    given = any(o.split("=", 1)[0].strip() == "factors.track" for o in overrides)
    if path is not None and not given:
        raw = cfg.read_yaml(path) or {}
        given = isinstance(raw.get("factors"), dict) and "track" in raw["factors"]
    if config.model.checkpoint is None and not given:
        config = dataclasses.replace(config, factors=dataclasses.replace(config.factors, track="all"))
    return config


def load_world(config: cfg.Config) -> World:
    if config.model.checkpoint is None:
        if config.validate.start == "checkpoint":
            raise ValidationError(
                "validate.from: checkpoint needs model.checkpoint (the built-in world starts from scratch)"
            )
        return dataclasses.replace(builtin(config.validate.builtin_documents), track=config.factors.track)
    world = from_config(config)
    if config.validate.start == "scratch":
        from jaxinf import models

        world = dataclasses.replace(world, lm=models.init(world.lm.config, config.validate.seed))
    return world


HEURISTIC_FROM = curvature.strategy("ekfac")  # the strategy whose Lambda gives the PBRF's heuristic damping


def layer_dampings(Lambda) -> dict[str, list]:
    """The scores' heuristic damping of each tracked layer, ``0.1 * mean(Lambda)`` of that layer's EK-FAC
    ``Lambda`` (:func:`jaxinf.engine.curvature.block_damping`), as nested lists (one per stacked layer); the PBRF's
    proximal term uses these, so it inverts the same matrix as EK-FAC's scores."""
    return {name: np.asarray(curvature.block_damping(x, None), np.float64).tolist() for name, x in Lambda.items()}


def _save_params(path: Path, params) -> None:
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    write_atomic(path, lambda f: np.savez(f, **flat))  # type: ignore[arg-type]  # keys: tree paths, never allow_pickle


def _load_params(path: Path, like):
    z = load_npz(path)
    return jax.tree_util.tree_map_with_path(lambda p, x: jnp.asarray(z[jax.tree_util.keystr(p)], x.dtype), like)


def _read_pbrf(path: Path) -> tuple[np.ndarray, np.ndarray]:
    z = load_npz(path)
    return z["influence"], z["ratio"]


def subset_too_small(config: cfg.Config, n: int) -> str:
    """The error of a subset (``validate.fraction`` of the ``n`` documents) smaller than one minibatch
    (``validate.batch_size``), led by the key the user changed from its default, of the three that decide it."""
    v, default = config.validate, cfg.Config().validate
    builtin = config.model.checkpoint is None
    names = (["builtin_documents"] if builtin else []) + ["fraction", "batch_size"]
    lead = next((k for k in names if getattr(v, k) != getattr(default, k)), "batch_size")
    corpus = (
        f"validate.builtin_documents={v.builtin_documents}" if builtin else f"data.documents {config.data.documents}"
    )
    return (
        f"validate.{lead}: a subset holds {int(round(v.fraction * n))} of the {n} documents ({corpus}, "
        f"validate.fraction={v.fraction:g}), fewer than validate.batch_size={v.batch_size}; raise "
        + ("validate.builtin_documents or " if builtin else "")
        + "validate.fraction, or lower validate.batch_size"
    )


def validate(config: cfg.Config, out: str | Path) -> dict:
    """Runs (or resumes) the whole validation; returns what it writes to ``DIR/validation.json``.

    Holds ``DIR``'s lock throughout, under the output-directory rule of ``jaxinf run`` (:func:`jaxinf.run.lock.claim_output`):
    one process at a time writes it, and nothing is written when a setting or the directory is refused."""
    with rundir.output_named("--out"):  # the messages name the command's option
        check_settings(config)
        t_start = time.perf_counter()
        v = config.validate
        out = Path(out)
        rundir.check_output(out, "validate")  # the output-directory rule of jaxinf run's (nothing written if refused)
        world = load_world(config)
        size = int(round(v.fraction * world.num_documents))
        if size < v.batch_size:
            raise ValidationError(subset_too_small(config, world.num_documents))
        retrain.check_size(v.steps, v.batch_size, v.group, v.subsets, size, host_memory())
        lock = claim_output(out, "validate")  # one process at a time, as a run directory
        try:
            return _validate(config, out, world, t_start)
        finally:
            lock.release()


def _validate(config: cfg.Config, out: Path, world: World, t_start: float) -> dict:
    from jaxinf.engine import scoring, stages

    v = config.validate
    N = world.num_documents
    training = work_keys.training_settings(config, work_keys.world_fingerprint(world))
    work = work_keys.keyed_dir(out / "work", training)
    log.info("validate: %s; work directory %s", world.name, work)
    proc = retrain.Procedure(v.steps, v.learning_rate, v.batch_size)
    task = world.lm.task()
    _, train_one = retrain.make_trainer(task, proc)
    docs = {k: jnp.asarray(x) for k, x in world.documents.items()}
    queries = {k: jnp.asarray(x) for k, x in world.queries.items()}
    params0 = world.lm.params

    # 1. the model trained on every document: the one that is scored
    full_path = work / "full.npz"
    params = work_keys.saved(full_path, lambda p: _load_params(p, params0))
    if params is None:
        t0 = time.perf_counter()
        log.info("validate: training the full model: %d steps of %d documents", v.steps, v.batch_size)
        _, losses, params = train_one(
            params0, docs, queries, jnp.asarray(retrain.schedule(np.arange(N), v.steps, v.batch_size, 0))
        )
        retrain.check_losses(np.asarray(losses)[None], ["of the full model (all documents) seed 0"])
        _save_params(full_path, params)
        log.info(
            "validate: trained the full model in %.0fs (final loss/token %.3f)",
            time.perf_counter() - t0,
            float(np.asarray(losses)[-10:].mean()),
        )
    base = np.asarray(retrain.measurements(task, params, queries), np.float64)

    # 2. every strategy's scores at every damping
    layers = tracked_layers(world, params)
    scoring_settings = work_keys.scores_settings(config, training, layers)
    score_dir = work_keys.keyed_dir(work / "scores", scoring_settings)
    batches = [{k: x[lo : lo + 64] for k, x in docs.items()} for lo in range(0, N, 64)]
    scores: dict[tuple[str, str], np.ndarray] = {}
    t0 = time.perf_counter()
    score = jax.jit(lambda p, qg, b: stages.score_batch(task, layers, p, qg, b)[0].total)

    def exact_scores(qg) -> np.ndarray:  # every document against prepared queries: [Q, N]
        return np.concatenate([np.asarray(score(params, qg, b)) for b in batches], 1).astype(np.float64)

    G = None
    fitted: dict[str, tuple] = {}
    for strategy in v.strategies:
        resolved = index_mod.fitted_strategy(strategy)
        dampings = v.dampings if resolved.needs_lambda else [None]
        paths = {
            damping_label(d): score_dir / f"{score_name(config, strategy)}_{damping_label(d)}.npy" for d in dampings
        }
        for lab, p in paths.items():
            if (got := work_keys.saved(p, load_npy)) is not None:
                scores[(strategy, lab)] = got
        missing = [d for d in dampings if (strategy, damping_label(d)) not in scores]
        if not missing and (resolved != HEURISTIC_FROM or (score_dir / "heuristic.json").exists()):
            continue
        if G is None:
            G, qloss = stages.query_gradients(task, layers, params, queries)
        if resolved.name not in fitted:
            fitted[resolved.name] = stages.fit_curvature(
                task,
                layers,
                params,
                batches,
                strategy=resolved,
                fisher=config.factors.fisher,
                key=jax.random.key(config.factors.seed),
            )
        curv, pieces = fitted[resolved.name]
        if resolved == HEURISTIC_FROM:
            write_json(score_dir / "heuristic.json", {"damping": layer_dampings(pieces["Lambda"])})
        rows = None
        if strategy == index_mod.INDEX_STRATEGY:
            k = indexing.kept_directions(config.index.k)
            basis, selection = index_mod.eigen_basis(curv, pieces["eigen"], k)
            rows, _ = index_mod.document_rows(task, layers, params, batches, basis, k, config.index.dtype)
        for d in missing:
            qg = scoring.prepare_queries(G, qloss, curv, d, None)
            if rows is None:
                s = exact_scores(qg)
            else:
                s, _ = index_mod.index_scores(
                    qg, curv, selection, layers, indexing.kept_directions(config.index.k), rows
                )
            save_npy(paths[damping_label(d)], s)
            scores[(strategy, damping_label(d))] = s
    heuristic = (
        json.loads((score_dir / "heuristic.json").read_text())["damping"]
        if (score_dir / "heuristic.json").exists()
        else None
    )
    log.info("validate: scores of %d strategies x dampings in %.0fs", len(scores), time.perf_counter() - t0)

    # 2b. the index's fidelity table against exact EK-FAC, beside equal-byte baselines
    ks = sorted(
        set(v.index_ks) | ({config.index.k} if index_mod.INDEX_STRATEGY in v.strategies else set()),
        key=lambda k: (k == "full", 0 if k == "full" else k),
    )
    fidelity = None
    if ks:
        primary_damping = v.dampings[0]
        settings = dict(
            scores=work_keys.key(scoring_settings),
            ks=ks,
            damping=damping_label(primary_damping),
            dtype=config.index.dtype,
            seed=v.seed,
        )
        path = score_dir / f"fidelity_{work_keys.key(settings)}.json"
        if path.exists():
            fidelity = json.loads(path.read_text())
        else:
            t0 = time.perf_counter()
            if G is None:
                G, qloss = stages.query_gradients(task, layers, params, queries)
            if "ekfac" not in fitted:
                fitted["ekfac"] = stages.fit_curvature(
                    task,
                    layers,
                    params,
                    batches,
                    strategy="ekfac",
                    fisher=config.factors.fisher,
                    key=jax.random.key(config.factors.seed),
                )
            curv, pieces = fitted["ekfac"]
            exact = scores.get(("ekfac", damping_label(primary_damping)))
            if exact is None:
                qg = scoring.prepare_queries(G, qloss, curv, primary_damping, None)
                exact = exact_scores(qg)
            fidelity = {
                "damping": damping_label(primary_damping),
                "exact": "ekfac",
                "dtype": config.index.dtype,
                "table": index_mod.fidelity_table(
                    task,
                    layers,
                    params,
                    batches,
                    G,
                    qloss,
                    curv,
                    pieces["eigen"],
                    primary_damping,
                    ks,
                    exact,
                    v.seed,
                    config.index.dtype,
                ),
            }
            write_json(path, _finite(fidelity))
            log.info("validate: index fidelity at k = %s in %.0fs", ", ".join(map(str, ks)), time.perf_counter() - t0)

    # 3. the retrainings, under the protocol of validate.subset_steps and validate.subset_init
    subsets = retrain.sample_subsets(N, v.subsets, v.fraction, v.seed)
    sub_proc = retrain.Procedure(
        retrain.subset_steps(v.subset_steps, v.steps, N, subsets.shape[1], v.batch_size), v.learning_rate, v.batch_size
    )
    fresh = v.subset_init == "fresh"
    train_many, _ = retrain.make_trainer(task, sub_proc, stacked_starts=fresh)
    starts = None
    if fresh:
        from jaxinf import models

        starts = lambda seed: models.init(world.lm.config, seed).params
    t0 = time.perf_counter()

    def progress(done, total):
        log.info("validate: %d of %d retrainings (%.0fs)", done, total, time.perf_counter() - t0)

    meas = retrain.retrain_all(
        train_many,
        params0,
        docs,
        queries,
        subsets,
        v.seeds,
        sub_proc,
        work_keys.keyed_dir(work / "units", work_keys.retraining_settings(config, training)),
        min(v.group, v.subsets * v.seeds),
        progress,
        starts,
    )

    # 4. LDS, recall, PBRF
    primary = damping_label(v.dampings[0])
    pick = {s: (s, primary if index_mod.fitted_strategy(s).needs_lambda else damping_label(None)) for s in v.strategies}
    lds_all = {
        s: {lab: lds_mod.lds(sc, subsets, meas, v.bootstrap, v.seed) for (s2, lab), sc in scores.items() if s2 == s}
        for s in v.strategies
    }
    result: dict = {
        "lds": {s: lds_all[s][pick[s][1]] for s in v.strategies},
        "subsets": v.subsets,
        "fraction": v.fraction,
        "seeds": v.seeds,
        "recall": {s: recall_mod.recall(scores[pick[s]], world.supports, v.recall_k) for s in v.strategies},
        "pbrf": {},
        "damping": primary,
        "lds_by_damping": lds_all,
        "world": world.name,
        "world_fingerprint": training["world"],
        "code_version": training["code"],
        "tracked_layers": sorted(layers),
        "fisher": config.factors.fisher,
        "factors_seed": config.factors.seed,
        "documents": N,
        "queries": world.query_ids,
        "query_kinds": world.query_kinds,
        "procedure": {
            "from": v.start,
            "steps": v.steps,
            "learning_rate": v.learning_rate,
            "batch_size": v.batch_size,
            "optimizer": "adamw (weight decay 0.01, clip 1.0, warm-up steps/10)",
            "subset_steps": v.subset_steps,
            "retraining_steps": sub_proc.steps,
            "subset_init": v.subset_init,
            "retraining_start": (
                "its own initialization, seed 1000 (subset + 1) + seed"
                if fresh
                else "the full model's starting parameters"
            ),
        },
        "bootstrap": {
            "resamples": v.bootstrap,
            "seed": v.seed,
            "interval": "2.5th and 97.5th percentile of the mean LDS over resamples of the subsets",
        },
        "full_model_measurements": base.tolist(),
    }
    if fidelity is not None:
        result["index_fidelity"] = fidelity
    if v.pbrf:
        eps = v.pbrf_epsilon if v.pbrf_epsilon is not None else 1.0 / N
        lam = v.dampings[0] if v.dampings[0] is not None else heuristic
        if lam is None:
            raise ValidationError(
                "validate.pbrf: the heuristic damping needs ekfac among validate.strategies "
                "(or give a number first in validate.dampings)"
            )
        rng = np.random.default_rng(v.seed + 1)
        sample = np.sort(rng.choice(N, min(v.pbrf_documents, N), replace=False))
        pbrf_settings = dict(
            scores=work_keys.key(scoring_settings),
            damping=lam,
            epsilon=eps,
            iterations=v.pbrf_iterations,
            tolerance=v.pbrf_tolerance,
            documents=sample.tolist(),
        )
        (work / "pbrf").mkdir(exist_ok=True)
        pbrf_path = work / "pbrf" / f"{work_keys.key(pbrf_settings)}.npz"
        found = work_keys.saved(pbrf_path, _read_pbrf)
        if found is not None:
            I_pbrf, ratio = found
        else:
            t0 = time.perf_counter()
            I_pbrf, ratio = pbrf_mod.pbrf_influence(
                world.lm,
                task,
                params,
                docs,
                queries,
                sample,
                list(layers),
                damping=lam,
                eps=eps,
                iterations=v.pbrf_iterations,
                tolerance=v.pbrf_tolerance,
                units=pbrf_path.with_suffix(""),
            )
            write_atomic(pbrf_path, lambda f: np.savez(f, influence=I_pbrf, ratio=ratio))
            log.info("validate: PBRF of %d documents in %.0fs", len(sample), time.perf_counter() - t0)
        converged = ratio <= v.pbrf_tolerance
        if not converged.all():
            log.warning(
                "validate: PBRF: %d of %d optimizations did not converge (final gradient norm above %g of "
                "its start: %s); they are left out of the correlation",
                int((~converged).sum()),
                len(sample),
                v.pbrf_tolerance,
                ", ".join(world.doc_ids[i] for i in sample[~converged]),
            )
        result["pbrf"] = {
            s: pbrf_mod.converged_pearson(scores[pick[s]][:, sample], I_pbrf, ratio, v.pbrf_tolerance)
            for s in v.strategies
        }
        result["pbrf_detail"] = {
            "documents": [world.doc_ids[i] for i in sample],
            "epsilon": eps,
            "damping": lam,
            "iterations": v.pbrf_iterations,
            "tolerance": v.pbrf_tolerance,
            "gradient_norm_ratio": [float(x) for x in ratio],
            "gradient_norm_ratio_max": float(np.max(ratio)),
            "converged": int(converged.sum()),
            "converged_below": v.pbrf_tolerance,
            "correlation": "mean over queries of Pearson's r across the sampled documents whose "
            "optimization converged (null: fewer than 3)",
            "all_documents": {s: pbrf_mod.mean_pearson(scores[pick[s]][:, sample], I_pbrf) for s in v.strategies},
        }
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result = _finite(result)
    write_json(out / "validation.json", result)
    from jaxinf.validate import report

    report.write(
        out / "report",
        result,
        {s: lds_mod.group_predictions(scores[pick[s]], subsets) for s in v.strategies},
        -meas.mean(1),
    )
    log.info(
        "validate: wrote %s and %s in %.0fs", out / "validation.json", out / "report" / "index.html", result["seconds"]
    )
    return result


def _finite(obj):
    """NaN and infinities as null (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(x) for k, x in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(x) for x in obj]
    return obj
