"""The stages end to end: what ``jaxinf run CONFIG`` does.

    covariance -> eigen -> lambda -> queries -> scores -> exports -> analysis

Every stage reads what the previous ones saved in the run directory
(:mod:`jaxinf.store`) and saves its own result there, so a run killed at any
moment resumes where it stopped: the accumulating stages (covariance, Lambda,
scores) from their last checkpoint, the others from the last finished stage.
Batches are deterministic (:mod:`jaxinf.data.batching`) and the sampled labels
of batch ``i`` use ``fold_in(key, i)``, so a resumed run computes exactly what an
uninterrupted one would.

The numeric work is the engine's (:mod:`jaxinf.stages`); this module only
drives it: one jitted step per stage, called per batch through an
:class:`Executor` that places batches and, on a mesh, shards them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf import capture, curvature, failures, fingerprint, preflight, rundir, scoring, stages
from jaxinf import config as cfg
from jaxinf.progress import Progress
from jaxinf.sharding import lapack_threads
from jaxinf.atomic import save_npy, write_json
from jaxinf.lock import RunLock
from jaxinf.store import RunStore, StoreError, check_writable, fault_point

log = logging.getLogger("jaxinf")


class InputError(ValueError):
    """A missing or unusable input named by the config (file, directory, key)."""


# --------------------------------------------------------------------------- execution


class Executor:
    """Where the stages run: compiles steps, places batches, states and results, and brings results back.

    This one runs on the default device. :class:`jaxinf.sharding.MeshExecutor`
    has the same interface on a ``data x model`` mesh (possibly spanning
    several processes); :func:`make_executor` picks one from ``mesh.*``.
    """

    mesh = None
    groups = (0, 1)  # (this process's slice of the corpus, number of slices)

    def jit(self, fn: Callable, *, donate_argnums=(), out_shardings=None) -> Callable:
        return jax.jit(fn, donate_argnums=donate_argnums)

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        keys = ("tokens", "mask", "weights")
        return {k: jnp.asarray(batch[k]) for k in keys if k in batch}

    def put_replicated(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return self.put(batch)

    place_param = None  # jaxinf.models.from_hf's default placement

    def place(self, tree, field: str | None = None):
        return tree

    def shardings(self, tree, field: str | None = None):
        return None

    def rows(self, ndim: int = 1, last: bool = False):
        return None

    def init(self, stage: stages.Stage):
        return stage.init()

    def like(self, shapes, field: str | None = None):
        return shapes  # abstract shapes: Orbax restores onto the default device

    def eigendecompose(self, cov):
        """One jitted program per factor (:func:`jaxinf.curvature.eigendecompose` with ``eigh=``)."""
        eigh = jax.jit(curvature.stacked_eigh)
        return curvature.eigendecompose(cov, lambda M, which: eigh(M))

    def fetch(self, x) -> np.ndarray:
        return np.asarray(x)

    def gather_rows(self, local: np.ndarray) -> np.ndarray:
        return np.asarray(local)


def make_executor(config: cfg.Config) -> Executor:
    """The executor of ``mesh.*``: the default device for a 1 x 1 mesh in one process (whatever the host has),
    a :class:`~jaxinf.sharding.MeshExecutor` otherwise."""
    from jaxinf import sharding

    if config.mesh.data * config.mesh.model == 1 and jax.process_count() == 1:
        return Executor()
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
    log.info("%s", sharding.describe(mesh))
    executor = sharding.MeshExecutor(mesh, batch_size=config.data.batch_size)
    if config.model.checkpoint is not None:  # every layout, from the checkpoint's config.json alone
        from jaxinf import models

        lm = models.abstract(models.read_config(config.model.checkpoint, dtype=config.model.dtype,
                                                scan=config.model.scan_layers, remat=config.model.remat))
        layers = tracked_layers(lm, config.factors.track)
        executor.preflight(lm.params, _shapes(Inputs(lm, lm.task(), layers, *([None] * 7))))
    return executor


def tracked_layers(lm, track) -> dict[str, capture.LayerSpec]:
    """The layers of ``lm`` (possibly abstract) that ``factors.track`` selects."""
    task = lm.task()
    dummy = {"tokens": jnp.zeros((1, 8), jnp.int32), "mask": jnp.ones((1, 8)), "weights": jnp.ones((1, 8))}
    return capture.select_layers(
        capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), lm.params, dummy), track)


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """What a run reads once: model, task, tracked layers, tokenizer, documents, queries and their plans."""

    lm: Any
    task: Any
    layers: dict[str, capture.LayerSpec]
    encoder: Any
    documents: Any
    lengths: np.ndarray
    plan: Any
    fit_plan: Any
    fit_documents: Any
    queries: list


def check_inputs(config: cfg.Config) -> None:
    """One-line errors for missing inputs, before anything is created."""
    for key, value, kind in (("model.checkpoint", config.model.checkpoint, "dir"),
                             ("data.documents", config.data.documents, "any"),
                             ("data.queries", config.data.queries, "file")):
        if value is None:
            raise InputError(f"{key}: not set (give it in the config or as {key}=PATH)")
        p = Path(value)
        if value.startswith("tfds:"):
            continue
        if kind == "dir" and not p.is_dir():
            raise InputError(f"{key}: {value}: no such directory")
        if kind == "file" and not p.is_file():
            raise InputError(f"{key}: {value}: no such file")
        if kind == "any" and not p.exists():
            raise InputError(f"{key}: {value}: no such file or directory")
    if config.factors.from_run is not None and not (Path(config.factors.from_run) / "run.json").is_file():
        raise InputError(f"factors.from: {config.factors.from_run}: not a jaxinf run directory (no run.json)")


def document_lengths(store: RunStore, documents, encoder) -> np.ndarray:
    """Token counts of every document, counted once per run and kept in ``state/plan/`` (keyed by file and tokenizer)."""
    from jaxinf.data.batching import document_lengths as count

    key = {"documents": _file_key(getattr(documents, "name", "")), "size": len(documents),
           "tokenizer": _text_hash(encoder.tokenizer.to_str())}
    if hasattr(documents, "content_digest"):  # an edit within the same second and size changes the content
        key["content"] = documents.content_digest()
    meta, path = store.path("state", "plan", "lengths.json"), store.path("state", "plan", "lengths.npy")
    if meta.exists() and path.exists():
        try:
            if json.loads(meta.read_text()) == key:
                return np.load(path)
        except ValueError:
            pass
    t0 = time.perf_counter()
    lengths = count(documents, encoder)
    log.info("tokenized %d documents (%d tokens) in %.1fs", len(lengths), int(lengths.sum()), time.perf_counter() - t0)
    if jax.process_index() == 0:
        save_npy(path, lengths)
        write_json(meta, key)
    return lengths


def _file_key(name: str) -> list:
    p = Path(name)
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, int(st.st_mtime)]
    return [name]


def _text_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def buckets(max_length: int) -> tuple[int, ...]:
    """Padded batch lengths: multiples of ``max(16, min(64, max_length // 8))`` (see :func:`jaxinf.data.batching.bucket_lengths`).

    Short limits get fine buckets (16, 32, 48, 64 for 64 tokens), long ones at most about ten shapes.
    """
    from jaxinf.data.batching import bucket_lengths

    return bucket_lengths(max_length, smallest=max(16, min(64, max_length // 8)))


def load_inputs(config: cfg.Config, store: RunStore, executor: Executor | None = None) -> Inputs:
    """Model (each parameter placed by the executor as it is read), tokenizer, tracked layers, documents with
    their plans (one slice of the corpus per group of processes on the ``data`` axis), and queries."""
    from jaxinf import models
    from jaxinf.data.batching import make_plan
    from jaxinf.data.documents import open_documents
    from jaxinf.data.queries import read_queries
    from jaxinf.data.tokenize import TextEncoder

    t0 = time.perf_counter()
    executor = executor or Executor()
    lm, tokenizer = models.from_hf(config.model.checkpoint, dtype=config.model.dtype, scan=config.model.scan_layers,
                                   remat=config.model.remat, place=executor.place_param)
    log.info("model: %s, %s parameters (%s), loaded in %.1fs", config.model.checkpoint, f"{lm.num_params:,}",
             config.model.dtype, time.perf_counter() - t0)
    task = lm.task()
    layers = tracked_layers(lm, config.factors.track)
    n_tracked = sum(s.num_params for s in layers.values())
    log.info("tracking %d layers (%s parameters) matching factors.track=%s",
             sum(len(s.layer_names) for s in layers.values()), f"{n_tracked:,}", config.factors.track)
    preflight.log_query_rank(config.scores.query_rank, layers)
    encoder = TextEncoder(tokenizer)
    documents = open_documents(config.data.documents)
    lengths = document_lengths(store, documents, encoder)
    from jaxinf.models.tokenizer import tokenizer_file

    preflight.check_corpus(lengths, getattr(documents, "name", config.data.documents), config.factors.max_documents,
                           str(tokenizer_file(config.model.checkpoint)))
    d = config.data
    plan_args = dict(batch_size=d.batch_size, max_length=d.max_length, long_documents=d.long_documents,
                     process_count=executor.groups[1], buckets=buckets(d.max_length))
    plan = make_plan(lengths, **plan_args)
    log.info("documents: %s", plan.report.summary())
    n_fit = len(lengths) if config.factors.max_documents is None else min(config.factors.max_documents, len(lengths))
    fit_documents = documents if n_fit == len(lengths) else _Subset(documents, range(n_fit))
    fit_plan = plan if n_fit == len(lengths) else make_plan(lengths[:n_fit], **plan_args)
    queries = read_queries(config.data.queries)
    log.info("queries: %d from %s", len(queries), config.data.queries)
    return Inputs(lm, task, layers, encoder, documents, lengths, plan, fit_plan, fit_documents, queries)


# --------------------------------------------------------------------------- driving a stage


def _finite_or_raise(losses: np.ndarray, batch: dict, inputs: Inputs, what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(losses) & (batch["index"] >= 0))
    if bad.size:
        doc = inputs.documents.documents([int(batch["index"][bad[0]])])[0]
        raise stages.CaptureError(f'{getattr(inputs.documents, "name", "documents")}:{doc.line}: document '
                                  f'"{doc.id}": {what} loss is not finite ({float(losses[bad[0]])})')


def plan_key(plan) -> dict:
    """What fixes which documents batch ``i`` holds: a checkpoint numbered by batch index is only valid under it."""
    return {"processes": int(plan.process_count), "batch_size": int(plan.batch_size), "batches": int(plan.num_steps)}


def check_plan(store: RunStore, name: str, plan) -> None:
    """Refuses to resume a stage whose checkpoints were made with documents grouped into batches differently."""
    saved = store.record["stages"].get(name, {}).get("plan")
    if saved is not None and saved != plan_key(plan) and store.status(name) != "done":
        raise StoreError(f"{store.root}: stage {name} was checkpointed with {saved['processes']} process(es) x "
                         f"{saved['batch_size']} documents per batch ({saved['batches']} batches); resume it with the "
                         f"same number of processes, or use --overwrite")


def accumulate(
    store: RunStore,
    name: str,
    stage: stages.Stage,
    step_inputs: tuple,
    batches,
    key: jax.Array | None,
    save_every: int,
    executor: Executor,
    inputs: Inputs,
):
    """Drives an accumulating stage over ``batches`` with checkpoints every ``save_every`` batches; resumes.

    Returns the finalized result and the timing of this pass (seconds, seconds saving checkpoints, batches)."""
    check_plan(store, name, batches.plan)
    st = store.stage(name)
    init = executor.init(stage)
    total = len(batches)
    resumed = st.latest(init)
    start, state = (0, init) if resumed is None else resumed
    st.discard_after(start if resumed else None)
    if start:
        log.info("%s: resuming at batch %d of %d", name, start, total)
    key_info = plan_key(batches.plan)
    store.mark(name, "running", step=start, total=total, plan=key_info)
    update = executor.jit(stage.update, donate_argnums=(0,), out_shardings=(executor.shardings(init), executor.rows()))
    progress = Progress(name, total, start)
    pending = None
    save_seconds = 0.0
    for i, batch in enumerate(batches.iterate(start), start=start):
        k = None if key is None else jax.random.fold_in(key, i)
        state, losses = update(state, *step_inputs, executor.put(batch), k)
        if pending is not None:
            _finite_or_raise(executor.fetch(pending[0]), pending[1], inputs, name)
        pending = (losses, {"index": executor.gather_rows(batch["index"])})
        progress.update(int(batch["mask"].sum()))
        fault_point(name, i + 1)
        if (i + 1) % save_every == 0 or i + 1 == total:
            _finite_or_raise(executor.fetch(pending[0]), pending[1], inputs, name)
            pending = None
            t_save = time.perf_counter()
            st.save(i + 1, state)
            save_seconds += time.perf_counter() - t_save
            store.mark(name, "running", step=i + 1, total=total, plan=key_info)
    seconds = progress.close()
    log.info("%s: %d batches in %.1fs (%.1fs saving checkpoints)", name, total - start, seconds, save_seconds)
    timing = {"seconds": round(seconds, 3), "save_seconds": round(save_seconds, 3), "batches": total - start}
    return stage.finalize(state), timing


def _batches(inputs: Inputs, plan, source, executor: Executor):
    from jaxinf.data.batching import DocumentBatches

    return DocumentBatches(source, inputs.encoder, plan, process_index=executor.groups[0])


# --------------------------------------------------------------------------- the stages


def _shapes(inputs: Inputs) -> dict:
    """Abstract shapes of the covariance, eigendecomposition and Lambda of the tracked layers."""
    cov = stages.covariance_stage(inputs.task, inputs.layers)
    lam = stages.lambda_stage(inputs.task, inputs.layers)
    cov_like = jax.eval_shape(lambda: cov.finalize(cov.init()))
    return {"covariance": jax.eval_shape(cov.init), "eigen": jax.eval_shape(curvature.eigendecompose, cov_like),
            "lambda": jax.eval_shape(lambda: lam.finalize(lam.init()))}


def fit_curvature(config: cfg.Config, store: RunStore, inputs: Inputs, executor: Executor) -> curvature.Curvature:
    """Covariance, eigendecomposition and Lambda (or another run's, with ``factors.from``)."""
    strategy, fisher = config.factors.strategy, config.factors.fisher
    if config.factors.from_run is not None:
        return _curvature_from(config, inputs, executor)
    if strategy == "identity":
        for s in ("covariance", "eigen", "lambda"):
            store.mark(s, "done", skipped="identity strategy")
        return curvature.curvature("identity")
    base = jax.random.key(config.factors.seed)
    shapes = _shapes(inputs)
    fit_batches = _batches(inputs, inputs.fit_plan, inputs.fit_documents, executor)
    eigen = None
    if strategy in ("kfac", "ekfac"):
        eigen = store.load_result("eigen", executor.like(shapes["eigen"]))
        if eigen is None:
            cov_stage = stages.covariance_stage(inputs.task, inputs.layers, fisher)
            cov, timing = accumulate(store, "covariance", cov_stage, (inputs.lm.params,), fit_batches,
                                     stages.stage_key(base, "covariance"), config.factors.save_every, executor, inputs)
            store.mark("covariance", "done", timing=timing)
            t0 = time.perf_counter()
            with lapack_threads():
                eigen = jax.block_until_ready(executor.eigendecompose(cov))
            _check_finite_tree({"Q_A": eigen.Q_A, "Q_S": eigen.Q_S}, "eigendecomposition", executor.fetch)
            store.save_result("eigen", eigen, seconds=time.perf_counter() - t0)
            log.info("eigen: %d blocks decomposed in %.1fs", len(inputs.layers), time.perf_counter() - t0)
    else:
        store.mark("covariance", "done", skipped=f"{strategy} strategy")
        store.mark("eigen", "done", skipped=f"{strategy} strategy")
    if strategy == "kfac":
        Lambda = curvature.kfac_lambda(eigen)
        store.mark("lambda", "done", source="kfac eigenvalues")
    else:
        Lambda = store.load_result("lambda", executor.like(shapes["lambda"], "Lambda"))
        if Lambda is None:
            lam_stage = stages.lambda_stage(inputs.task, inputs.layers, fisher)
            Lambda, timing = accumulate(store, "lambda", lam_stage, (inputs.lm.params, eigen), fit_batches,
                                        stages.stage_key(base, "lambda"), config.factors.save_every, executor, inputs)
            _check_finite_tree(Lambda, "Lambda", executor.fetch)
            store.save_result("lambda", Lambda, timing=timing)
    return curvature.curvature(strategy, eigen, Lambda)


def _check_finite_tree(tree, what: str, fetch: Callable = np.asarray) -> None:
    for k, v in (tree.items() if isinstance(tree, dict) else []):
        if isinstance(v, dict):
            _check_finite_tree(v, f"{what} {k}", fetch)
        elif not bool(fetch(jnp.all(jnp.isfinite(v)))):
            raise stages.CaptureError(f"{what} of layer {k} is not finite")


def _curvature_from(config: cfg.Config, inputs: Inputs, executor: Executor) -> curvature.Curvature:
    """The fitted curvature of another run directory (``factors.from``), checked against this run's model and layers."""
    other = Path(config.factors.from_run)
    record = json.loads((other / "run.json").read_text())
    theirs = cfg.from_dict(record["config"], str(other / "run.json"))
    mismatched = [k for k in ("checkpoint", "dtype") if getattr(theirs.model, k) != getattr(config.model, k)]
    mismatched += [f"factors.{k}" for k in ("strategy", "fisher", "track", "max_documents", "seed")
                   if getattr(theirs.factors, k) != getattr(config.factors, k)]
    if theirs.run.precision != config.run.precision:
        mismatched.append("run.precision")
    if mismatched:
        raise StoreError(f"factors.from: {other} was fitted with other settings: {', '.join(mismatched)}")
    ostore = RunStore(other, record)
    if ostore.status("lambda") != "done":
        raise StoreError(f"factors.from: {other} has no finished curvature (stage lambda is {ostore.status('lambda')})")
    strategy = config.factors.strategy
    shapes = _shapes(inputs)
    eigen = None
    if strategy == "identity":
        return curvature.curvature("identity")
    if strategy in ("kfac", "ekfac"):
        eigen = ostore.load_result("eigen", executor.like(shapes["eigen"]))
        if eigen is None:
            raise StoreError(f"factors.from: {other}: the eigendecomposition is missing or corrupted")
    if strategy == "kfac":
        Lambda = curvature.kfac_lambda(eigen)
    else:
        Lambda = ostore.load_result("lambda", executor.like(shapes["lambda"], "Lambda"))
        if Lambda is None:
            raise StoreError(f"factors.from: {other}: Lambda is missing or corrupted")
    log.info("curvature: reusing the %s factors of %s", strategy, other)
    return curvature.curvature(strategy, eigen, Lambda)


def query_gradients(config: cfg.Config, store: RunStore, inputs: Inputs, curv, executor: Executor):
    """Preconditioned (and optionally rank-r) query gradients of every query; a saved result is reused."""
    from jaxinf.data.queries import encode_queries, query_batches

    encoded = encode_queries(inputs.queries, inputs.encoder, max_length=config.data.max_length)
    batches = query_batches(encoded, batch_size=config.data.query_batch_size, max_length=config.data.max_length)
    prep_fn = executor.jit(lambda p, b, c: stages.prepared_queries(inputs.task, inputs.layers, p, b, c,
                                                                     config.scores.damping, config.scores.query_rank))
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
    store.save_result("queries", qg, seconds=time.perf_counter() - t0)
    log.info("queries: %d query gradients in %.1fs (rank %s, damping %s)", qg.num_queries, time.perf_counter() - t0,
             config.scores.query_rank or "full", config.scores.damping if config.scores.damping is not None
             else "0.1 x mean(Lambda)")
    return qg, encoded


def _prepare_all(inputs, batches, prep_fn, curv, executor: Executor, check: bool) -> scoring.QueryGradients:
    """Preconditioned (and truncated) query gradients batch by batch (:func:`jaxinf.stages.prepared_queries`),
    joined along Q."""
    parts = []
    for batch in batches:
        if check:
            stages.check_queries(batch, [inputs.queries[i].id if i >= 0 else "padding" for i in batch["index"]])
        parts.append((prep_fn(inputs.lm.params, executor.put_replicated(batch), curv),
                      int((batch["index"] >= 0).sum())))
    return _join_queries(parts)


def _join_queries(parts) -> scoring.QueryGradients:
    def cat(trees, axis_of):
        return {k: jnp.concatenate([jax.lax.slice_in_dim(t[k], 0, n, axis=axis_of(t[k])) for t, n in trees],
                                   axis=axis_of(trees[0][0][k])) for k in trees[0][0]}

    full = cat([(p.full, n) for p, n in parts], lambda x: x.ndim - 3)
    left = cat([(p.left, n) for p, n in parts], lambda x: x.ndim - 3)
    right = cat([(p.right, n) for p, n in parts], lambda x: x.ndim - 3)
    loss = jnp.concatenate([p.loss[:n] for p, n in parts])
    return scoring.QueryGradients(full=full, left=left, right=right, loss=loss)


def score_documents(config: cfg.Config, store: RunStore, inputs: Inputs, qg, curv, executor: Executor) -> dict:
    """Scores of every document row against every query, saved in chunks of ``scores.save_every`` batches."""
    st = store.chunks("scores")
    batches = _batches(inputs, inputs.plan, inputs.documents, executor)
    check_plan(store, "scores", inputs.plan)
    key_info = plan_key(inputs.plan)
    total = len(batches)
    chunks, start = _load_chunks(st, config.scores.self_influence)
    if start:
        log.info("scores: resuming at batch %d of %d", start, total)
    store.mark("scores", "running", step=start, total=total, plan=key_info)
    want_self = config.scores.self_influence

    step = stages.score_step(inputs.task, inputs.layers, self_influence=want_self,
                             damping_value=config.scores.damping)

    outs = {"scores": executor.rows(2, last=True), "loss": executor.rows()}
    if want_self:
        outs["self"] = executor.rows()
    score_fn = executor.jit(step, out_shardings=outs if executor.mesh is not None else None)
    progress = Progress("scores", total, start)
    save_seconds = 0.0
    buffer: list[tuple[dict, np.ndarray]] = []
    chunk_start = start
    for i, batch in enumerate(batches.iterate(start), start=start):
        out = score_fn(inputs.lm.params, qg, curv, executor.put(batch))
        buffer.append((out, executor.gather_rows(batch["index"])))
        progress.update(int(batch["mask"].sum()))
        fault_point("scores", i + 1)
        if (i + 1) % config.scores.save_every == 0 or i + 1 == total:
            chunk = _flush(buffer, inputs, executor.fetch)
            chunk["start"] = np.asarray(chunk_start, np.int64)
            t_save = time.perf_counter()
            st.save(i + 1, chunk)
            save_seconds += time.perf_counter() - t_save
            chunks.append(chunk)
            chunk_start = i + 1
            buffer = []
            store.mark("scores", "running", step=i + 1, total=total, plan=key_info)
    seconds = progress.close()
    log.info("scores: %d batches in %.1fs (%.1fs saving chunks)", total - start, seconds, save_seconds)
    store.mark("scores", "done", total=total, plan=key_info, timing={
        "seconds": round(seconds, 3), "save_seconds": round(save_seconds, 3), "batches": total - start})
    return _assemble(chunks, inputs, qg.num_queries)


def _flush(buffer, inputs: Inputs, fetch: Callable = np.asarray) -> dict:
    """One chunk on the host: the batches' scores, losses and document indices, non-finite losses rejected."""
    index = np.concatenate([ix for _, ix in buffer]).astype(np.int64)
    out = {"index": index}
    for key in buffer[0][0]:
        out[key] = np.concatenate([fetch(o[key]) for o, _ in buffer], axis=-1)
    _finite_or_raise(out["loss"], {"index": index}, inputs, "document")
    return out


def _load_chunks(st, want_self: bool) -> tuple[list[dict], int]:
    """The verified chunks that continue each other from batch 0, and the batch after them; later ones are dropped."""
    chunks, end = [], 0
    for step in st.steps():
        try:
            chunk = {k: np.asarray(v) for k, v in st.restore(step).items()}
        except Exception as e:  # corrupted or unreadable: recompute from here
            log.warning("%s: score chunk %d not used (%s); recomputing from batch %d", st.root, step, e, end)
            break
        if int(chunk["start"]) != end or ("self" in chunk) != want_self:
            break
        chunks.append(chunk)
        end = step
    st.discard_after(end if chunks else None)
    return chunks, end


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


# --------------------------------------------------------------------------- exports


def export(config: cfg.Config, store: RunStore, inputs: Inputs, results: dict, qg, encoded, executor: Executor) -> None:
    """``scores.npy``, ``queries.jsonl``, ``documents.jsonl``, ``topk.jsonl``, and the per-layer and per-token
    breakdowns of each query's top documents (``layers.json``, ``layer_scores.npy``, ``topk_tokens.jsonl``)."""
    from jaxinf.exports import formats as io

    t0 = time.perf_counter()
    primary = jax.process_index() == 0  # every process computes (the breakdowns run on the mesh); process 0 writes
    qloss = executor.fetch(qg.loss).astype(np.float64)
    scores = scoring.normalize(results["scores"], qloss, config.scores.normalize)
    if primary:
        io.write_scores(store.path("scores.npy"), scores)
        if "self" in results:
            save_npy(store.path("self_influence.npy"), results["self"].astype(np.float32))
        io.write_queries(store.path("queries.jsonl"), (
            {"id": q.id, "prompt": q.prompt, "completion": q.completion, "kind": q.kind, "task": q.task,
             "answer": q.answer, "loss": float(qloss[i]), "tokens": len(encoded[i].ids),
             "completion_tokens": encoded[i].completion_length}
            for i, q in enumerate(inputs.queries)))
        io.write_documents(store.path("documents.jsonl"), _document_rows(inputs, results["loss"]))
    k = min(config.scores.topk, inputs.plan.num_documents)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    bottom = np.argsort(scores, axis=1, kind="stable")[:, :k]
    needed = sorted(set(top.ravel().tolist()) | set(bottom.ravel().tolist()))
    docs = {d.index: d for d in inputs.documents.documents(needed)}

    def entry(q, d):
        text = " ".join(docs[d].text.split())
        return {"id": docs[d].id, "source": docs[d].source, "score": float(scores[q, d]),
                "snippet": text[:300] + ("..." if len(text) > 300 else "")}

    if primary:
        io.write_topk(store.path("topk.jsonl"), (
            {"query": q.id, "top": [entry(i, int(d)) for d in top[i]], "bottom": [entry(i, int(d)) for d in bottom[i]]}
            for i, q in enumerate(inputs.queries)))
    export_breakdowns(config, store, inputs, qg, top, docs, executor)
    store.mark("exports", "done", seconds=round(time.perf_counter() - t0, 3))


def _document_rows(inputs: Inputs, losses: np.ndarray) -> Iterator[dict]:
    from jaxinf.data.documents import iter_documents

    for doc in iter_documents(inputs.documents, chunk=4096):
        yield {"id": doc.id, "source": doc.source, "tokens": int(inputs.lengths[doc.index]),
               "loss": float(losses[doc.index])}


class _Subset:
    """The documents ``indices`` of a source, as a source of their own (index i is ``indices[i]``)."""

    def __init__(self, source, indices: list[int]):
        self.source, self.indices = source, list(indices)
        self.name = getattr(source, "name", "documents")

    def __len__(self) -> int:
        return len(self.indices)

    def texts(self, idx):
        return self.source.texts([self.indices[i] for i in idx])

    def documents(self, idx):
        return self.source.documents([self.indices[i] for i in idx])


def layer_order(layers: dict[str, capture.LayerSpec]) -> list[str]:
    """Per-layer names in model order: by layer index, blocks in call order within a layer, unstacked layers last."""
    stacked, rest = [], []
    for position, spec in enumerate(layers.values()):
        for i, name in zip(spec.layer_indices or (None,), spec.layer_names):
            (stacked if i is not None else rest).append((i if i is not None else 0, position, name))
    return [n for _, _, n in sorted(stacked)] + [n for _, _, n in rest]


def export_breakdowns(config, store, inputs: Inputs, qg, top: np.ndarray, docs: dict, executor: Executor) -> None:
    """Per-layer and per-token scores of each query's top documents, from one more pass over just those documents."""
    from jaxinf.exports import formats as io
    from jaxinf.data.batching import DocumentBatches, make_plan

    t0 = time.perf_counter()
    wanted = sorted(set(top.ravel().tolist()))
    subset = _Subset(inputs.documents, wanted)
    plan = make_plan(inputs.lengths[wanted], batch_size=config.data.batch_size, max_length=config.data.max_length,
                     long_documents=config.data.long_documents, buckets=buckets(config.data.max_length),
                     process_count=executor.groups[1])
    names = layer_order(inputs.layers)
    Q = qg.num_queries
    per_layer = np.zeros((len(names), Q, len(wanted)))
    tokens: dict[int, list[tuple[int, list[int], np.ndarray]]] = {}   # subset doc -> [(chunk, ids, [Q, n])]

    def step(params, q, b):
        s, _ = stages.score_batch(inputs.task, inputs.layers, params, q, b, per_layer=True, per_token=True)
        per_layer = scoring.expand_layer_scores(s.per_layer, inputs.layers)
        return jnp.stack([per_layer[n] for n in names]), s.per_token                   # [L, Q, B], [Q, B, T]

    fn = executor.jit(step)
    for batch in DocumentBatches(subset, inputs.encoder, plan, process_index=executor.groups[0]):
        stacked, token_scores = map(executor.fetch, fn(inputs.lm.params, qg, executor.put(batch)))
        rows = {k: executor.gather_rows(batch[k]) for k in ("index", "chunk", "mask", "tokens")}  # every process's
        for j, d in enumerate(rows["index"].tolist()):
            if d < 0:
                continue
            per_layer[:, :, d] += stacked[:, :, j]
            n = int(rows["mask"][j].sum())
            tokens.setdefault(d, []).append((int(rows["chunk"][j]), rows["tokens"][j, :n].tolist(),
                                             token_scores[:, j, :n]))
    position = {d: i for i, d in enumerate(wanted)}
    layer_top = np.stack([per_layer[:, q, [position[int(d)] for d in top[q]]].T for q in range(Q)])  # [Q, K, L]
    if jax.process_index() != 0:
        return
    io.write_layer_exports(store.root, names, layer_top)
    vocab = inputs.encoder.tokenizer

    def records():
        for q, query in enumerate(inputs.queries):
            for rank, d in enumerate(top[q].tolist()):
                ids, sc = _join_chunks(tokens[position[d]], q)
                yield {"query": query.id, "document": docs[d].id, "rank": rank,
                       "tokens": [{"text": vocab.id_to_token(t) or "", "score": float(v)} for t, v in zip(ids, sc)]}

    io.write_topk_tokens(store.path("topk_tokens.jsonl"), records())
    log.info("exports: per-layer and per-token scores of %d top documents in %.1fs", len(wanted),
             time.perf_counter() - t0)


def _join_chunks(chunks: list, q: int) -> tuple[list[int], np.ndarray]:
    """A document's tokens and query ``q``'s per-token scores, its chunks joined (a shared token's scores added)."""
    chunks = sorted(chunks, key=lambda c: c[0])
    ids, scores = list(chunks[0][1]), list(chunks[0][2][q])
    for _, more_ids, more in chunks[1:]:
        scores[-1] += more[q][0]
        ids += more_ids[1:]
        scores += list(more[q][1:])
    return ids, np.asarray(scores)


def analyze(store: RunStore, inputs: Inputs) -> None:
    """The paper's statistics and the report (:func:`jaxinf.analysis.driver.analyze`) on the exports."""
    from jaxinf.analysis.driver import analyze as run_analysis

    if jax.process_index() != 0:
        return
    store.mark("analysis", "running")
    t0 = time.perf_counter()
    summary = run_analysis(store.root, text_source=_text_source(inputs.documents), log=log.info)
    for note in summary.get("notes", []):
        log.info("analysis note: %s", note)
    store.mark("analysis", "done", seconds=round(time.perf_counter() - t0, 3))
    log.info("report: %s", store.path("report", "index.html"))


def _text_source(documents) -> Callable:
    """Texts by document id, found by one streaming pass over the corpus (JSONL or TFDS alike)."""

    from jaxinf.data.documents import iter_documents

    def texts(ids):
        wanted, found = set(map(str, ids)), {}
        for doc in iter_documents(documents, chunk=4096):
            if len(found) == len(wanted):
                break
            if doc.id in wanted:
                found[doc.id] = doc.text
        return found

    return texts


# --------------------------------------------------------------------------- the run


def _open_store(config: cfg.Config, overwrite: bool) -> RunStore:
    """The run directory; with several processes, process 0 creates (or overwrites) it before the others open it."""
    if jax.process_count() == 1:
        return RunStore.open(config, overwrite=overwrite)
    from jax.experimental import multihost_utils

    store = RunStore.open(config, overwrite=overwrite) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("jaxinf: run directory opened")
    return store or RunStore.open(config, overwrite=False)


def run(config: cfg.Config, overwrite: bool = False, executor: Executor | None = None) -> Path:
    """All stages, resumable; returns the run directory.

    Holds the run directory's lock (:mod:`jaxinf.lock`) throughout. With ``overwrite`` the old run is set aside
    and deleted only once the new one has started cleanly (:mod:`jaxinf.rundir`). Inputs whose content changed
    since the run started are refused or invalidate the stages depending on them (:mod:`jaxinf.fingerprint`).
    """
    from jaxinf import sharding

    check_inputs(config)
    preflight.check_model_limits(config)
    sharding.initialize(config.mesh)                 # before anything touches a device
    sharding.check_agreement(cfg.to_dict(config))    # every process runs the same config
    if config.run.precision == "float64":
        jax.config.update("jax_enable_x64", True)
    executor = executor or make_executor(config)     # mesh and batch shape errors before the run directory is made
    check_statistics(config, executor)
    lock, aside = _claim(config, overwrite)
    try:
        return _run_locked(config, executor, aside)
    finally:
        if lock is not None:
            lock.release()


def check_statistics(config: cfg.Config, executor: Executor) -> None:
    """Before any batch: a tracked layer whose statistic alone cannot fit a device is named with the key that would
    make it fit (:func:`jaxinf.plan.check_layers_fit`). The memory is ``plan.device_memory_gib`` when set, else what
    an accelerator reports (``bytes_limit``); on a CPU with no setting nothing is checked."""
    from jaxinf import plan

    device = jax.devices()[0]
    if config.plan.device_memory_gib is not None:
        limit, source = int(config.plan.device_memory_gib * 2**30), f"plan.device_memory_gib={config.plan.device_memory_gib:g}"
    else:
        stats = device.memory_stats() if device.platform != "cpu" else None
        limit = (stats or {}).get("bytes_limit")
        source = f"the memory of {device.device_kind}"
    if limit is None:
        return
    _, layers = plan.abstract_model(config)
    rows = max(config.data.batch_size * executor.groups[1] // config.mesh.data, 1)
    plan.check_layers_fit(config, layers, rows, config.mesh.model, int(limit), source)


def _claim(config: cfg.Config, overwrite: bool) -> tuple[RunLock | None, rundir.Aside | None]:
    """Process 0: the run directory checked (never another kind of directory), locked, a killed ``--overwrite``
    finished, and with ``overwrite`` the old run set aside."""
    if jax.process_index() != 0:
        return None, None
    root = Path(config.run.out)
    check_writable(root)
    rundir.check_target(root, overwrite)
    lock = RunLock(root).acquire()
    try:
        rundir.recover_interrupted(root)
        return lock, (rundir.set_aside(root) if overwrite else None)
    except BaseException:
        lock.release()
        raise


def _run_locked(config: cfg.Config, executor: Executor, aside: rundir.Aside | None) -> Path:
    store = None
    try:
        try:
            store = _open_store(config, overwrite=False)
            log.info("run directory %s (config fingerprint %s)", store.root, store.record["fingerprint"])
            model_fp = fingerprint.check_model(store, config.model.checkpoint)
            inputs = load_inputs(config, store, executor)
            fingerprint.check_unchanged(model_fp, config.model.checkpoint)
            fingerprint.reconcile(store, model_fp,
                                  fingerprint.documents_fingerprint(inputs.documents, len(inputs.fit_documents)),
                                  fingerprint.queries_fingerprint(inputs.queries, config.data.queries))
            if jax.process_count() > 1:                  # process 0 deleted what changed inputs invalidated
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("jaxinf: inputs checked")
        except BaseException:
            if aside is not None:
                aside.restore()
            raise
        if aside is not None:                        # the new run has started cleanly: the old one can go
            fault_point("overwrite", 0)
            aside.discard()
        curv = fit_curvature(config, store, inputs, executor)
        qg, encoded = query_gradients(config, store, inputs, curv, executor)
        results = score_documents(config, store, inputs, qg, curv, executor)
        export(config, store, inputs, results, qg, encoded, executor)
        log.info("exports written to %s", store.root)
        analyze(store, inputs)
    except Exception as e:
        failure = failures.environment_failure(e, Path(config.run.out), _running_stage(store))
        if failure is None:
            raise
        raise failure from e
    return store.root


def _running_stage(store: RunStore | None) -> str:
    """The first stage not done (the one a failure interrupted), or "start" before the run directory is open."""
    if store is None:
        return "start"
    return next((s for s in cfg.STAGES if store.status(s) != "done"), "analysis")
