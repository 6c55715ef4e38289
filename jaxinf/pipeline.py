"""The stages end to end: what ``jaxinf run CONFIG`` does.

    covariance -> eigen -> lambda -> queries -> scores -> exports -> analysis

Every stage reads what the previous ones saved in the run directory
(:mod:`jaxinf.run.store`) and saves its own result there, so a run killed at any
moment resumes where it stopped: the accumulating stages (covariance, Lambda,
scores) from their last checkpoint, the others from the last finished stage.
Batches are deterministic (:mod:`jaxinf.data.batching`) and the sampled labels
of batch ``i`` use ``fold_in(key, i)``, so a resumed run computes exactly what an
uninterrupted one would.

This module is the orchestration: the run directory claimed and locked, the
inputs read (:mod:`jaxinf.run.inputs`), the curvature fitted or reused, the queries
prepared, the documents scored, the exports written (:mod:`jaxinf.run.exports.stage`)
and the analysis run. The numeric work is the engine's (:mod:`jaxinf.engine.stages`);
every per-batch pass goes through one loop (:mod:`jaxinf.engine.loop`), one jitted step
per stage called per batch through an :class:`Executor` that places batches and,
on a mesh, shards them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf import config as cfg
from jaxinf.engine import curvature, precision, programs, scoring, stages
from jaxinf.engine.distributed import eigendecompose
from jaxinf.engine.loop import run_batches
from jaxinf.errors import UserError
from jaxinf.faults import fault_point
from jaxinf.hostenv import lapack_threads, mesh_lapack_threads
from jaxinf.run import checks, factors_from, failures, fingerprint, index_run, preflight, rundir
from jaxinf.run.executor import Executor, make_executor
from jaxinf.run.exports.stage import export
from jaxinf.run.inputs import Inputs, load_inputs, non_finite_loss, text_source
from jaxinf.run.lock import RunLock, claim_run, reading
from jaxinf.run.rundir import StoreError
from jaxinf.run.saved import SavedChunks, SavedState, batch_plan_key
from jaxinf.run.store import RunStore
from jaxinf.sharding.meshes import barrier, check_agreement, initialize

log = logging.getLogger("jaxinf")


# --------------------------------------------------------------------------- the stages


def accumulate(
    store: RunStore,
    program: programs.Program,
    step_inputs: tuple,
    batches,
    key: jax.Array | None,
    save_every: int,
    executor: Executor,
    inputs: Inputs,
):
    """Drives an accumulating stage over ``batches`` through the per-batch loop (:func:`jaxinf.engine.loop.run_batches`),
    its state checkpointed every ``save_every`` batches; resumes from the newest checkpoint.

    Returns the finalized result and the timing of this pass (seconds, seconds saving checkpoints, batches)."""
    name, stage = program.name, program.stage
    assert stage is not None, f"{name}: not an accumulating stage"
    saves = SavedState(store, name, batches.plan, save_every)
    state, timing = run_batches(
        name,
        stages.stage_step(program.jit(executor, batches), step_inputs, key),
        batches.iterate,
        executor.init(stage),
        saves,
        total=len(batches),
        non_finite=non_finite_loss(inputs.documents, name),
        device=executor,
    )
    return stage.finalize(state), timing


def _batches(inputs: Inputs, plan, source, executor: Executor):
    return inputs.batches(plan, source, executor.groups[0])


def curvature_stages(config: cfg.Config, store: RunStore, inputs: Inputs, executor: Executor) -> curvature.Curvature:
    """The stages the strategy needs: covariance, eigendecomposition and Lambda (or another run's, with
    ``factors.from``)."""
    if config.factors.from_run is not None:
        return factors_from.load(config, inputs, executor)
    strategy = curvature.strategy(config.factors.strategy)
    if not strategy.writes:
        for s in ("covariance", "eigen", "lambda"):
            store.mark(s, "done", skipped=f"{strategy.name} strategy")
        return curvature.curvature(strategy)
    dtype = precision.statistics_dtype(config.run.precision)
    base = jax.random.key(config.factors.seed)
    shapes = programs.fitted_shapes(inputs.task, inputs.layers, dtype)
    fit_batches = _batches(inputs, inputs.fit_plan, inputs.fit_documents, executor)

    def eigen():
        eigen = store.load_result("eigen", executor.like(shapes["eigen"]))
        if eigen is None:
            cov, timing = accumulate(
                store,
                programs.covariance(config, inputs.task, inputs.layers),
                (inputs.lm.params,),
                fit_batches,
                stages.stage_key(base, "covariance"),
                config.factors.save_every,
                executor,
                inputs,
            )
            _check_finite_tree(
                cov,
                "covariance",
                executor.fetch,
                f": the model {config.model.checkpoint} overflows {jnp.dtype(dtype).name} on the "
                f"documents of {config.data.documents}",
            )
            store.mark("covariance", "done", timing=timing)
            t0 = time.perf_counter()
            with lapack_threads():
                eigen = jax.block_until_ready(eigendecompose(cov, executor.mesh))
            _check_finite_tree({"Q_A": eigen.Q_A, "Q_S": eigen.Q_S}, "eigendecomposition", executor.fetch)
            store.save_result("eigen", eigen, seconds=time.perf_counter() - t0)
            log.info("eigen: %d blocks decomposed in %.1fs", len(inputs.layers), time.perf_counter() - t0)
        return eigen

    def fit_lambda(basis):
        Lambda = store.load_result("lambda", executor.like(shapes["lambda"], curvature.LAMBDA_AXES))
        if Lambda is None:
            fused = None
            if programs.index_in_lambda(config, executor.mesh is None) and store.status("index") != "done":
                fused = index_run.lambda_with_index(config, store, inputs, basis, fit_batches, executor)
            if fused is not None:  # the index rode on this pass
                Lambda, timing = fused
            else:
                Lambda, timing = accumulate(
                    store,
                    programs.lambda_(config, inputs.task, inputs.layers),
                    (inputs.lm.params, basis),
                    fit_batches,
                    stages.stage_key(base, "lambda"),
                    config.factors.save_every,
                    executor,
                    inputs,
                )
            _check_finite_tree(Lambda, "Lambda", executor.fetch)
            store.save_result("lambda", Lambda, timing=timing)
        return Lambda

    if not strategy.eigen:
        store.mark("covariance", "done", skipped=f"{strategy.name} strategy")
        store.mark("eigen", "done", skipped=f"{strategy.name} strategy")
    curv = curvature.assemble(strategy, eigen, fit_lambda)
    if strategy.needs_lambda and not strategy.fits_lambda:
        store.mark("lambda", "done", source=f"{strategy.name} {strategy.lambda_source}")
    return curv


def saved_eigen(config: cfg.Config, store: RunStore, inputs: Inputs, executor: Executor) -> curvature.Eigen:
    """The eigendecomposition this run preconditions with: its own, or ``factors.from``'s."""
    source = store
    if config.factors.from_run is not None:
        other = Path(config.factors.from_run)
        record = rundir.read_record(other)  # run.json, or its copy when damaged (factors_from.check read it first)
        if record is None:
            raise StoreError(f"factors.from: {other}: no run.json (nor its copy state/run.json)")
        source = RunStore(other, record)
    shapes = programs.fitted_shapes(inputs.task, inputs.layers, precision.statistics_dtype(config.run.precision))
    eigen = source.load_result("eigen", executor.like(shapes["eigen"]))
    if eigen is None:
        raise StoreError(f"{source.root}: the eigendecomposition is missing or corrupted (stage eigen)")
    return eigen


def _check_finite_tree(tree, what: str, fetch: Callable = np.asarray, why: str = "") -> None:
    if dataclasses.is_dataclass(tree):  # a stage's result (the covariance sums): its dict fields by name
        tree = {
            f.name: getattr(tree, f.name) for f in dataclasses.fields(tree) if isinstance(getattr(tree, f.name), dict)
        }
    for k, v in tree.items() if isinstance(tree, dict) else []:
        if isinstance(v, dict):
            _check_finite_tree(v, f"{what} {k}", fetch, why)
        elif hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.inexact) and not bool(fetch(jnp.all(jnp.isfinite(v)))):
            raise stages.CaptureError(f"{what} of layer {k} is not finite{why}")


def queries_stage(config: cfg.Config, store: RunStore, inputs: Inputs, curv, executor: Executor):
    """Preconditioned (and optionally rank-r) query gradients of every query; a saved result is reused."""
    from jaxinf.data.queries import encode_queries, query_batches

    encoded = encode_queries(inputs.queries, inputs.encoder, max_length=config.data.max_length)
    batches = query_batches(encoded, batch_size=config.data.query_batch_size, max_length=config.data.max_length)
    prep_fn = programs.queries(config, inputs.task, inputs.layers).jit(executor)
    if store.status("queries") == "done":
        like = jax.eval_shape(lambda: _prepare_all(inputs, batches, prep_fn, curv, executor, check=False))
        saved = store.load_result("queries", executor.like(like))
        if saved is not None:
            return saved, encoded
    store.mark("queries", "running")
    t0 = time.perf_counter()
    with lapack_threads():
        qg = jax.block_until_ready(executor.place(_prepare_all(inputs, batches, prep_fn, curv, executor, check=True)))
    bad = np.flatnonzero(~np.isfinite(executor.fetch(qg.loss)))
    if bad.size:
        q = inputs.queries[int(bad[0])]
        raise stages.CaptureError(f'{q.origin}: query "{q.id}": completion loss is not finite')
    _check_query_gradients(qg, inputs, config, executor)
    store.save_result("queries", qg, seconds=time.perf_counter() - t0)
    log.info(
        "queries: %d query gradients in %.1fs (rank %s, damping %s)",
        qg.num_queries,
        time.perf_counter() - t0,
        config.scores.query_rank or "full",
        config.scores.damping if config.scores.damping is not None else "0.1 x mean(Lambda)",
    )
    return qg, encoded


def _check_query_gradients(qg: scoring.QueryGradients, inputs: Inputs, config: cfg.Config, executor: Executor) -> None:
    """Every query's preconditioned gradient finite, or one line naming the first query and layer whose is not (the
    model's logits or gradients overflow on it): nothing non-finite is saved or scored."""
    for part in ("full", "left", "right"):
        for k, x in getattr(qg, part).items():
            axis = x.ndim - 3
            finite = executor.fetch(jnp.all(jnp.isfinite(x), axis=tuple(a for a in range(x.ndim) if a != axis)))
            bad = np.flatnonzero(~np.asarray(finite))
            if bad.size:
                q = inputs.queries[int(bad[0])]
                raise stages.CaptureError(
                    f'{q.origin}: query "{q.id}": its preconditioned gradient of layer {k} is '
                    f"not finite (the model {config.model.checkpoint} overflows "
                    f"{jnp.dtype(x.dtype).name} on it)"
                )


def _prepare_all(inputs, batches, prep_fn, curv, executor: Executor, check: bool) -> scoring.QueryGradients:
    """Preconditioned (and truncated) query gradients batch by batch (:func:`jaxinf.engine.stages.prepared_queries`),
    joined along Q."""
    parts = []
    for batch in batches:
        if check:
            stages.check_queries(batch, [inputs.queries[i].id if i >= 0 else "padding" for i in batch["index"]])
        parts.append(
            (prep_fn(inputs.lm.params, executor.put_replicated(batch), curv), int((batch["index"] >= 0).sum()))
        )
    return _join_queries(parts)


def _join_queries(parts) -> scoring.QueryGradients:
    def cat(trees, axis_of):
        return {
            k: jnp.concatenate(
                [jax.lax.slice_in_dim(t[k], 0, n, axis=axis_of(t[k])) for t, n in trees], axis=axis_of(trees[0][0][k])
            )
            for k in trees[0][0]
        }

    full = cat([(p.full, n) for p, n in parts], lambda x: x.ndim - 3)
    left = cat([(p.left, n) for p, n in parts], lambda x: x.ndim - 3)
    right = cat([(p.right, n) for p, n in parts], lambda x: x.ndim - 3)
    loss = jnp.concatenate([p.loss[:n] for p, n in parts])
    return scoring.QueryGradients(full=full, left=left, right=right, loss=loss)


def scores_stage(config: cfg.Config, store: RunStore, inputs: Inputs, qg, curv, executor: Executor) -> dict:
    """Scores of every document row against every query, saved in chunks of ``scores.save_every`` batches
    (:class:`jaxinf.run.saved.SavedChunks`), with each query's tails (:mod:`jaxinf.engine.tails`) saved beside the
    newest chunk; a resumed pass keeps the chunks saved and starts from their tails, and a finished pass run again
    (the exports written anew) returns its tails without computing a batch."""
    batches = _batches(inputs, inputs.plan, inputs.documents, executor)
    want_self = config.scores.self_influence
    fused = (
        programs.fused_index(config, executor.mesh is None)
        and store.status("index") != "done"
        and not store.chunks("scores").steps()
    )  # the index rides on this pass from its start (jaxinf.run.index_run)
    saves: SavedChunks | index_run.WithIndex
    saves = SavedChunks(
        store,
        "scores",
        inputs.plan,
        config.scores.save_every,
        ("scores", "loss", "self") if want_self else ("scores", "loss"),
        carry=not fused,  # the tails, so that a resumed pass (or a finished one rerun) still has them
    )
    build, tails = None, None
    if fused:
        build = index_run.IndexBuild(
            config, store, inputs, curv, saved_eigen(config, store, inputs, executor), executor
        )
        saves = index_run.WithIndex(saves, build.writer, ("scores", "loss"))
        fn = programs.scores_and_index(config, inputs.task, inputs.layers).jit(executor, batches)
        score_fn = lambda p, q, c, b: fn(p, q, build.basis, b)  # noqa: E731
    else:  # each query's top rows kept with their breakdowns as the pass goes (jaxinf.engine.tails)
        program = programs.scores(config, inputs.task, inputs.layers, tails=inputs.plan.num_documents)
        tails = executor.jit(
            lambda: programs.tails_init(config, inputs.layers, qg.num_queries, inputs.plan.num_documents),
            out_shardings=executor.replicated(),
        )()
        score_fn = program.jit(executor, batches)

    def step(carry, batch, i):
        out = score_fn(inputs.lm.params, qg, curv, batch, *(() if carry is None else (carry,)))
        carry = out.pop("tails", None)
        finite = jnp.all(jnp.isfinite(out["scores"]), axis=0) & (jnp.isfinite(out["self"]) if want_self else True)
        return carry, out, jnp.where(jnp.isfinite(out["loss"]) & ~finite, -jnp.inf, out["loss"])  # -inf: a bad score

    tails, timing = run_batches(
        "scores",
        step,
        batches.iterate,
        tails,
        saves,
        total=len(batches),
        non_finite=non_finite_loss(inputs.documents, "document"),
        device=executor,
    )
    chunks = saves.saves.chunks if isinstance(saves, index_run.WithIndex) else saves.chunks
    results = _assemble(chunks, inputs, qg.num_queries)
    for key, value in results.items():  # nothing non-finite is exported (rows are checked batch by batch above)
        if not np.all(np.isfinite(value)):
            raise stages.CaptureError(
                f"scores: the {key} of {config.data.documents} assembled from the saved chunks "
                f"are not finite ({int((~np.isfinite(value)).sum())} entries)"
            )
    if timing["batches"] or store.status("scores") != "done":  # a rerun that scored nothing keeps the record
        store.mark("scores", "done", total=len(batches), plan=batch_plan_key(inputs.plan), timing=timing)
    if build is not None:
        build.done(timing)
    if tails is not None:
        results["tails"] = jax.tree.map(executor.fetch, tails)
    return results


def _assemble(chunks: list[dict], inputs: Inputs, num_queries: int) -> dict:
    """Per-document results: chunk rows summed into their document's column (split documents add up)."""
    from jaxinf.data.batching import scatter_columns

    N = inputs.plan.num_documents
    out = {"scores": np.zeros((num_queries, N), np.float64), "loss": np.zeros(N, np.float64)}
    if chunks and "self" in chunks[0]:
        out["self"] = np.zeros(N, np.float64)
    for c in chunks:
        for key in out:
            scatter_columns(out[key], c[key], c["index"])
    return out


def analysis_stage(store: RunStore, inputs: Inputs) -> None:
    """The paper's statistics and the report (:func:`jaxinf.analysis.driver.analyze`) on the exports."""
    from jaxinf.analysis.driver import analyze as run_analysis

    if jax.process_index() != 0:
        return
    store.mark("analysis", "running")
    t0 = time.perf_counter()
    summary = run_analysis(store.root, text_source=text_source(inputs.documents), log=log.info)
    for note in summary.get("notes", []):
        log.info("analysis note: %s", note)
    store.mark("analysis", "done", seconds=round(time.perf_counter() - t0, 3))
    log.info("report: %s", store.path("report", "index.html"))


# --------------------------------------------------------------------------- the run


def refuse_unfinished_import(store: RunStore) -> None:
    """A run whose ``jaxinf kronfluence import`` was killed part-way (its record's ``imported`` not complete) is
    refused: run on, it fitted the stages the import had not saved yet itself, a curvature half kronfluence's."""
    imported = store.record.get("imported") or {}
    if imported.get("complete") is False:
        raise StoreError(
            f"{store.root}: the import of {imported.get('from')} into it was interrupted; run the same jaxinf "
            "kronfluence import again to finish it (or start over with --overwrite)"
        )


def _open_store(config: cfg.Config, overwrite: bool) -> RunStore:
    """The run directory; with several processes, process 0 creates (or overwrites) it before the others open it."""
    if jax.process_count() == 1:
        return RunStore.open(config, overwrite=overwrite)
    store = RunStore.open(config, overwrite=overwrite) if jax.process_index() == 0 else None
    barrier("run directory opened")
    return store or RunStore.open(config, overwrite=False)


def run(config: cfg.Config, overwrite: bool = False, executor: Executor | None = None) -> Path:
    """All stages, resumable; returns the run directory.

    Holds the run directory's lock (:mod:`jaxinf.run.lock`) throughout. With ``overwrite`` the old run is set aside,
    deleted only once the new one has finished and put back on any failure (:mod:`jaxinf.run.rundir`). Inputs whose
    content changed since the run started are refused or invalidate the stages depending on them
    (:mod:`jaxinf.run.fingerprint`).
    """
    # the runs it reads are not rewritten meanwhile, nor read while one is (jaxinf.run.lock.reading)
    with reading((config.factors.from_run, config.index.from_run), output=config.run.out):
        return _run(config, overwrite, executor)


def _run(config: cfg.Config, overwrite: bool, executor: Executor | None) -> Path:
    model_config, queries, corpus = checks.before_devices(config)  # the start-up checks, in order: jaxinf.run.checks
    initialize(config.mesh)  # before anything touches a device
    check_agreement(cfg.to_dict(config))  # every process runs the same config
    precision.enable(config.run.precision)  # float64 arrays, before the model is loaded (jaxinf.engine.precision)
    made = executor is None
    if made:  # mesh and batch shape errors before the run directory is made
        executor = make_executor(config)
    assert executor is not None
    with mesh_lapack_threads(executor.mesh):  # the process's BLAS threads, restored when the run ends
        checks.before_the_run_directory(config, executor, model_config, layouts=made)
        lock, aside = _claim(config, overwrite)
        try:
            return _run_locked(config, executor, aside, queries, corpus)
        finally:
            if lock is not None:
                lock.release()


def _claim(config: cfg.Config, overwrite: bool) -> tuple[RunLock | None, rundir.Aside | rundir.Fresh | None]:
    """Process 0: the run directory checked (never another kind of directory), locked, a killed ``--overwrite``
    finished, and with ``overwrite`` the old run set aside; a new (or empty) directory is removed again (emptied) if
    the start fails (:class:`jaxinf.run.rundir.Fresh`)."""
    if jax.process_index() != 0:
        return None, None
    return claim_run(Path(config.run.out), overwrite)  # Fresh: undone if the start fails


def _run_locked(
    config: cfg.Config, executor: Executor, claimed: rundir.Aside | rundir.Fresh | None, queries, corpus
) -> Path:
    store = None
    aside = claimed if isinstance(claimed, rundir.Aside) else None  # --overwrite: back on any failure (BaseException)
    try:
        try:
            store = _open_store(config, overwrite=False)
            refuse_unfinished_import(store)
            log.info(
                "run directory %s (config fingerprint %s, host heap %s)",
                store.root,
                store.record["fingerprint"],
                store.record.get("heap", "default"),
            )
            assert config.model.checkpoint is not None and config.data.queries is not None  # run's check_inputs
            model_fp = fingerprint.check_model(store, config.model.checkpoint)
            inputs = load_inputs(config, store, executor, queries, corpus)
            fingerprint.check_unchanged(model_fp, config.model.checkpoint)
            reused = factors_from.check(config, model_fp)
            documents = fingerprint.documents_fingerprint(inputs.documents, len(inputs.fit_documents))
            # another run's index over these rows, before any pass and before reconcile deletes the results that
            # changed inputs invalidate: a refused query deleted the finished results of its --out
            index_run.check_borrowed(config, store, inputs, documents)
            fingerprint.reconcile(
                store,
                model_fp,
                documents,
                fingerprint.queries_fingerprint(inputs.queries, config.data.queries),
                fingerprint.curvature_fingerprint(reused),
            )
            barrier("inputs checked")  # process 0 deleted what changed inputs invalidated
        except BaseException:
            if isinstance(claimed, rundir.Fresh):  # a refused start leaves nothing; a failure later keeps its work
                claimed.restore()
            raise
        curv = curvature_stages(config, store, inputs, executor)
        preflight.check_curvature(
            curv, config.scores.damping, executor.fetch, f"the documents of {config.data.documents}"
        )
        qg, encoded = queries_stage(config, store, inputs, curv, executor)
        if config.scores.mode == "index":
            eigen = saved_eigen(config, store, inputs, executor)
            if config.index.k is not None:
                index_run.build_index(config, store, inputs, curv, eigen, executor)
            results = index_run.scores_from_index(config, store, inputs, qg, curv, eigen, executor)
        else:
            results = scores_stage(config, store, inputs, qg, curv, executor)
        exported = not _finished(store, "exports", ("scores.npy", "queries.jsonl", "documents.jsonl", "topk.jsonl"))
        if exported:
            export(config, store, inputs, results, qg, encoded, executor)
            log.info("exports written to %s", store.root)
        if exported or not _finished(store, "analysis", ("summary.json", "report/index.html")):
            analysis_stage(store, inputs)
        if config.index.k is not None and config.scores.mode == "exact":
            index_run.build_index(config, store, inputs, curv, saved_eigen(config, store, inputs, executor), executor)
        elif config.index.k is None and "note" not in store.record["stages"].get("index", {}):
            store.mark("index", "pending", note="no index requested (index.k: null)")
        if aside is not None:  # the new run has finished: only now can the old one go
            fault_point("overwrite", 0)
            aside.discard()
    except BaseException as e:
        stage, restored = _running_stage(store), aside is not None and _put_back(aside, e)
        failure = (
            failures.environment_failure(e, Path(config.run.out), stage, restored)
            or failures.lost_process(e, Path(config.run.out), stage, jax.process_count() > 1)
            if isinstance(e, Exception)
            else None
        )
        if failure is None:
            raise
        raise failure from e
    return store.root


def _put_back(aside: rundir.Aside, e: BaseException) -> bool:
    """An ``--overwrite`` that failed in any way: the new attempt removed and the old run moved back as it was."""
    try:
        restored = aside.restore()
    except OSError as err:  # the next start moves it back (rundir.recover_interrupted)
        log.warning(
            "%s: --overwrite did not finish and the previous run could not be moved back yet (%s); it is "
            "in %s and the next jaxinf run on the directory restores it",
            aside.root,
            err,
            aside.previous,
        )
        return False
    if restored and isinstance(e, UserError):  # the same command would be refused again: no "starts it over"
        log.warning(
            "%s: --overwrite stopped on the error below; the previous run is back as it was and the new attempt is "
            "removed",
            aside.root,
        )
    elif restored:
        log.warning(
            "%s: --overwrite did not finish (%s); the previous run is back as it was and the new attempt is "
            "removed (the same command starts it over)",
            aside.root,
            type(e).__name__,
        )
    return restored


def _finished(store: RunStore, stage: str, files: tuple[str, ...]) -> bool:
    """Whether ``stage`` is done and its files are in place as it wrote them: a rerun of a finished run redoes nothing
    (a stage that a changed input or setting invalidated is pending again, :mod:`jaxinf.run.fingerprint`; one whose
    files were edited since is redone from the saved results). With several processes the
    status alone decides, so that every process takes the same branch (the exports' breakdowns are collective)."""
    if store.status(stage) != "done":
        return False
    if jax.process_count() > 1:
        return True
    changed = fingerprint.written_changed(store, stage)
    if changed:
        log.warning("%s: changed since this run wrote it; written again", ", ".join(map(str, map(store.path, changed))))
        return False
    return all(rundir.is_whole(store.path(*f.split("/"))) for f in files)


def _running_stage(store: RunStore | None) -> str:
    """The first stage not done (the one a failure interrupted), or "start" before the run directory is open."""
    if store is None:
        return "start"
    fitted_elsewhere = ((store.record.get("config") or {}).get("factors") or {}).get("from") is not None
    skip = ("covariance", "eigen", "lambda") if fitted_elsewhere else ()  # factors.from, jaxinf query: never run here
    return next((s for s in cfg.STAGES if s not in skip and store.status(s) != "done"), "analysis")
