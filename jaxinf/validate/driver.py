"""``jaxinf validate``: the full model, every strategy's scores, the retrainings, LDS, recall, PBRF and the report.

Layout of the output directory ``DIR``::

    DIR/
      validation.json            the results (schema in docs/validation.md)
      report/index.html          LDS by strategy and damping, predicted vs actual per strategy
      work/<fingerprint>/        everything resumable, keyed by the settings that change it:
        full.npz                 the model trained on all documents (the one that is scored)
        scores/<strategy>_<damping>.npy
        units/s<subset>_r<seed>.npy   the queries' measurements under one retrained model
        pbrf_<settings>.npz      the PBRF influence of the sampled documents
        pbrf_<settings>/chunk_<first>.npz   one chunk of PBRF optimizations (a killed run resumes from them)

Every file is written atomically, so a killed validation restarts from what
was saved. Settings that change the retrainings (the world, ``validate.from``,
``steps``, ``learning_rate``, ``batch_size``, ``fraction``, ``seed``) choose
the fingerprint; adding subsets or seeds reuses the retrainings already done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf import config as cfg
from jaxinf import curvature, rundir
from jaxinf.atomic import save_npy, write_atomic, write_json
from jaxinf.lock import claim_output
from jaxinf.validate import lds as lds_mod
from jaxinf.validate import pbrf as pbrf_mod
from jaxinf.validate import recall as recall_mod
from jaxinf.validate import retrain
from jaxinf.validate.world import ValidationError, World, builtin, from_config

log = logging.getLogger("jaxinf")


def damping_label(d: float | None) -> str:
    """``"heuristic"`` for null, else the number as written (``"0.001"``)."""
    return "heuristic" if d is None else repr(float(d))


def fingerprint(config: cfg.Config) -> str:
    """A hash of every setting that changes the full model or the retrainings."""
    v = config.validate
    world = ({"builtin": v.builtin_documents} if config.model.checkpoint is None else
             {"checkpoint": config.model.checkpoint, "documents": config.data.documents, "queries": config.data.queries,
              "max_length": config.data.max_length, "dtype": config.model.dtype})
    relevant = dict(world=world, start=v.start, steps=v.steps, lr=v.learning_rate, batch=v.batch_size,
                    fraction=v.fraction, seed=v.seed)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def load_world(config: cfg.Config) -> World:
    if config.model.checkpoint is None:
        if config.validate.start == "checkpoint":
            raise ValidationError("validate.from: checkpoint needs model.checkpoint (the built-in world starts from "
                                  "scratch)")
        return builtin(config.validate.builtin_documents)
    world = from_config(config)
    if config.validate.start == "scratch":
        from jaxinf import models

        world = dataclasses.replace(world, lm=models.init(world.lm.config, config.validate.seed))
    return world


HEURISTIC_FROM = curvature.strategy("ekfac")   # the strategy whose Lambda gives the PBRF's heuristic damping


def overall_heuristic(Lambda) -> float:
    """One damping for the whole model, for the PBRF: ``0.1 * mean(Lambda)`` over every entry of every tracked
    layer's EK-FAC ``Lambda`` (the per-layer heuristic of the scores, pooled)."""
    total = sum(float(jnp.sum(x)) for x in Lambda.values())
    count = sum(int(np.prod(x.shape)) for x in Lambda.values())
    return 0.1 * total / count


def _save_params(path: Path, params) -> None:
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    write_atomic(path, lambda f: np.savez(f, **flat))


def _load_params(path: Path, like):
    with np.load(path, allow_pickle=False) as z:
        return jax.tree_util.tree_map_with_path(lambda p, x: jnp.asarray(z[jax.tree_util.keystr(p)], x.dtype), like)


def validate(config: cfg.Config, out: str | Path) -> dict:
    """Runs (or resumes) the whole validation; returns what it writes to ``DIR/validation.json``."""
    t_start = time.perf_counter()
    v = config.validate
    out = Path(out)
    rundir.check_output(out, "validate")       # the output-directory rule of jaxinf run's (nothing written if refused)
    world = load_world(config)
    N = world.num_documents
    if int(round(v.fraction * N)) < v.batch_size:
        raise ValidationError(f"validate.batch_size: {v.batch_size} is more than the {int(round(v.fraction * N))} "
                              "documents of a subset")
    lock = claim_output(out, "validate")  # one process at a time, as a run directory
    try:
        return _validate(config, out, world, t_start)
    finally:
        lock.release()


def _validate(config: cfg.Config, out: Path, world: World, t_start: float) -> dict:
    from jaxinf import capture, scoring, stages

    v = config.validate
    N = world.num_documents
    work = out / "work" / fingerprint(config)
    work.mkdir(parents=True, exist_ok=True)
    log.info("validate: %s; work directory %s", world.name, work)
    proc = retrain.Procedure(v.steps, v.learning_rate, v.batch_size)
    task = world.lm.task()
    train_many, train_one = retrain.make_trainer(task, proc)
    docs = {k: jnp.asarray(x) for k, x in world.documents.items()}
    queries = {k: jnp.asarray(x) for k, x in world.queries.items()}
    params0 = world.lm.params

    # 1. the model trained on every document: the one that is scored
    full_path = work / "full.npz"
    if full_path.exists():
        params = _load_params(full_path, params0)
    else:
        t0 = time.perf_counter()
        _, losses, params = train_one(params0, docs, queries, jnp.asarray(retrain.schedule(np.arange(N), v.steps,
                                                                                             v.batch_size, 0)))
        retrain.check_losses(np.asarray(losses)[None], ["of the full model (all documents) seed 0"])
        _save_params(full_path, params)
        log.info("validate: trained the full model in %.0fs (final loss/token %.3f)", time.perf_counter() - t0,
                 float(np.asarray(losses)[-10:].mean()))
    base = np.asarray(retrain.measurements(task, params, queries), np.float64)

    # 2. every strategy's scores at every damping
    layers = capture.select_layers(capture.find_layers(
        lambda p, b, pr: task.train_loss(p, b, pr, None), params, {k: x[:1] for k, x in docs.items()}), world.track)
    batches = [{k: x[lo:lo + 64] for k, x in docs.items()} for lo in range(0, N, 64)]
    scores: dict[tuple[str, str], np.ndarray] = {}
    t0 = time.perf_counter()
    score = jax.jit(lambda p, qg, b: stages.score_batch(task, layers, p, qg, b)[0].total)
    G = None
    for strategy in v.strategies:
        resolved = curvature.strategy(strategy)
        dampings = v.dampings if resolved.needs_lambda else [None]
        paths = {damping_label(d): work / "scores" / f"{strategy}_{damping_label(d)}.npy" for d in dampings}
        if all(p.exists() for p in paths.values()) and (resolved != HEURISTIC_FROM
                                                         or (work / "heuristic.json").exists()):
            scores.update({(strategy, lab): np.load(p) for lab, p in paths.items()})
            continue
        if G is None:
            G, qloss = stages.query_gradients(task, layers, params, queries)
        curv, pieces = stages.fit_curvature(task, layers, params, batches, strategy=resolved,
                                            key=jax.random.key(config.factors.seed))
        if resolved == HEURISTIC_FROM:
            write_json(work / "heuristic.json", {"damping": overall_heuristic(pieces["Lambda"])})
        for d in dampings:
            qg = scoring.prepare_queries(G, qloss, curv, d, None)
            s = np.concatenate([np.asarray(score(params, qg, b)) for b in batches], 1).astype(np.float64)
            save_npy(paths[damping_label(d)], s)
            scores[(strategy, damping_label(d))] = s
    heuristic = (json.loads((work / "heuristic.json").read_text())["damping"]
                 if (work / "heuristic.json").exists() else None)
    log.info("validate: scores of %d strategies x dampings in %.0fs", len(scores), time.perf_counter() - t0)

    # 3. the retrainings
    subsets = retrain.sample_subsets(N, v.subsets, v.fraction, v.seed)
    t0 = time.perf_counter()

    def progress(done, total):
        log.info("validate: %d of %d retrainings (%.0fs)", done, total, time.perf_counter() - t0)

    meas = retrain.retrain_all(train_many, params0, docs, queries, subsets, v.seeds, proc, work / "units",
                               min(v.group, v.subsets * v.seeds), progress)

    # 4. LDS, recall, PBRF
    primary = damping_label(v.dampings[0])
    pick = {s: (s, primary if curvature.strategy(s).needs_lambda else damping_label(None)) for s in v.strategies}
    lds_all = {s: {lab: lds_mod.lds(sc, subsets, meas) for (s2, lab), sc in scores.items() if s2 == s}
               for s in v.strategies}
    result: dict = {
        "lds": {s: lds_all[s][pick[s][1]] for s in v.strategies},
        "subsets": v.subsets, "fraction": v.fraction, "seeds": v.seeds,
        "recall": {s: recall_mod.recall(scores[pick[s]], world.supports, v.recall_k) for s in v.strategies},
        "pbrf": {},
        "damping": primary,
        "lds_by_damping": lds_all,
        "world": world.name, "documents": N, "queries": world.query_ids, "query_kinds": world.query_kinds,
        "procedure": {"from": v.start, "steps": v.steps, "learning_rate": v.learning_rate,
                      "batch_size": v.batch_size, "optimizer": "adamw (weight decay 0.01, clip 1.0, warm-up steps/10)"},
        "full_model_measurements": base.tolist(),
    }
    if v.pbrf:
        eps = v.pbrf_epsilon if v.pbrf_epsilon is not None else 1.0 / N
        lam = v.dampings[0] if v.dampings[0] is not None else heuristic
        if lam is None:
            raise ValidationError("validate.pbrf: the heuristic damping needs ekfac among validate.strategies "
                                  "(or give a number first in validate.dampings)")
        rng = np.random.default_rng(v.seed + 1)
        sample = np.sort(rng.choice(N, min(v.pbrf_documents, N), replace=False))
        pbrf_path = work / f"pbrf_{damping_label(lam)}_{eps!r}_{v.pbrf_iterations}_{len(sample)}.npz"
        if pbrf_path.exists():
            with np.load(pbrf_path, allow_pickle=False) as z:
                I_pbrf, ratio = z["influence"], z["ratio"]
        else:
            t0 = time.perf_counter()
            I_pbrf, ratio = pbrf_mod.pbrf_influence(world.lm, task, params, docs, queries, sample, list(layers),
                                                    damping=lam, eps=eps, iterations=v.pbrf_iterations,
                                                    units=pbrf_path.with_suffix(""))
            write_atomic(pbrf_path, lambda f: np.savez(f, influence=I_pbrf, ratio=ratio))
            log.info("validate: PBRF of %d documents in %.0fs", len(sample), time.perf_counter() - t0)
        converged = ratio < pbrf_mod.CONVERGED
        if not converged.all():
            log.warning("validate: PBRF: %d of %d optimizations did not converge (final gradient norm above %g of "
                        "its start: %s); they are left out of the correlation",
                        int((~converged).sum()), len(sample), pbrf_mod.CONVERGED,
                        ", ".join(world.doc_ids[i] for i in sample[~converged]))
        result["pbrf"] = {s: pbrf_mod.converged_pearson(scores[pick[s]][:, sample], I_pbrf, ratio)
                          for s in v.strategies}
        result["pbrf_detail"] = {"documents": [world.doc_ids[i] for i in sample], "epsilon": eps, "damping": lam,
                                 "iterations": v.pbrf_iterations,
                                 "gradient_norm_ratio": [float(x) for x in ratio],
                                 "gradient_norm_ratio_max": float(np.max(ratio)),
                                 "converged": int(converged.sum()), "converged_below": pbrf_mod.CONVERGED,
                                 "correlation": "mean over queries of Pearson's r across the sampled documents whose "
                                                "optimization converged (null: fewer than 3)",
                                 "all_documents": {s: pbrf_mod.mean_pearson(scores[pick[s]][:, sample], I_pbrf)
                                                   for s in v.strategies}}
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result = _finite(result)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "validation.json", result)
    from jaxinf.validate import report

    report.write(out / "report", result, {s: lds_mod.group_predictions(scores[pick[s]], subsets) for s in v.strategies},
                 -meas.mean(1))
    log.info("validate: wrote %s and %s in %.0fs", out / "validation.json", out / "report" / "index.html",
             result["seconds"])
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
