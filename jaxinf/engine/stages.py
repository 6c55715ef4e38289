"""The stages as steps over batches: what a loop, a sharded program or a resumable pipeline drives.

Each accumulating stage is a :class:`Stage`, in the spirit of optax's
``(init, update)`` pairs: ``init`` makes the zero state, ``update`` folds one
batch in and returns ``(state, sequence_losses)`` (the losses let the driver
name a document whose loss is not finite), and ``finalize`` turns the sums into
the result. All three are pure; a driver ``jax.jit``-s ``update`` once and
calls it per batch. Parameters and factors are arguments, never closed over,
so they are not baked into the compiled program.

The per-batch key for the true Fisher is ``fold_in(key, batch_index)``, so a
resumed run samples the same labels as an uninterrupted one.

Every constructor and step takes the statistics dtype ``dtype`` (a run passes
``run.precision``'s, :func:`jaxinf.engine.precision.statistics_dtype`); without one it is
the tracked layers' :func:`~jaxinf.engine.precision.layers_dtype`. They also take the matmul precision ``precision`` of
every statistic contraction (a run passes ``run.matmul_precision``; None: the default of
:func:`jaxinf.engine.precision.matmul_precision`); the model's own forward and backward pass keep the model's precision.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, cast

import jax
import numpy as np

from jaxinf.engine import tails as running_tails
from jaxinf.engine.capture import CaptureError, LayerSpec, joint, layer_statistics, per_sequence_gradient
from jaxinf.engine.curvature import (
    Curvature,
    Strategy,
    assemble,
    covariance_finalize,
    covariance_init,
    covariance_statistic,
    covariance_update,
    curvature_context,
    eigendecompose,
    lambda_context,
    lambda_finalize,
    lambda_init,
    lambda_statistic,
    lambda_update,
)
from jaxinf.engine.loop import Kept, Step, run_batches
from jaxinf.engine.precision import layers_dtype
from jaxinf.engine.scoring import (
    QueryGradients,
    Scores,
    block_scores,
    collect_scores,
    per_token_in_pass,
    prepare_layer,
    query_context,
    query_gradients_of,
    stacked_layer_scores,
    sum_layers,
)
from jaxinf.engine.tasks import Task
from jaxinf.sharding.partitioning import streamed

Array = jax.Array
FISHERS = ("sampled", "empirical")


class Stage(NamedTuple):
    """``init() -> state``, ``update(state, *inputs, batch, key) -> (state, losses)``, ``finalize(state) -> result``."""

    init: Callable[..., Any]
    update: Callable[..., tuple[Any, Array]]
    finalize: Callable[[Any], Any]


def train_statistics(
    task: Task, layers: Mapping[str, LayerSpec], params, batch, key: Array | None, statistic, context=None
) -> tuple[dict, Array]:
    """Per-layer ``statistic`` of a document batch under the training loss (labels sampled when ``key`` is given),
    and the documents' losses ``[B]``."""
    return layer_statistics(
        lambda p, b, pr: task.train_loss(p, b, pr, key), params, batch, layers, statistic, context, mask=batch["mask"]
    )


def measurement_statistics(
    task: Task, layers: Mapping[str, LayerSpec], params, batch, statistic, context=None
) -> tuple[dict, Array]:
    """Per-layer ``statistic`` of a query batch under the measurement, and the measurements ``[Q]``."""
    return layer_statistics(task.measurement, params, batch, layers, statistic, context, mask=batch["mask"])


def _fisher_key(fisher: str, key: Array | None) -> Array | None:
    if fisher not in FISHERS:
        raise ValueError(f"factors.fisher: unknown Fisher {fisher!r} (choose from {', '.join(FISHERS)})")
    if fisher == "empirical":
        return None
    if key is None:
        raise ValueError("the true Fisher (factors.fisher: sampled) needs a PRNG key to sample labels")
    return key


def stage_key(seed: Array, stage: str) -> Array:
    """The key of a fitting stage's sampled labels: ``fold_in(seed, 0)`` for the covariance, ``1`` for Lambda.

    Batch ``i`` then uses ``fold_in(stage_key, i)``: the library and ``jaxinf run`` sample the same labels."""
    return jax.random.fold_in(seed, {"covariance": 0, "lambda": 1}[stage])


def covariance_stage(
    task: Task, layers: Mapping[str, LayerSpec], fisher: str = "sampled", dtype=None, precision=None
) -> Stage:
    """Stage 1: ``update(state, params, batch, key)`` accumulates ``A`` and ``S`` (in ``dtype``)."""
    dtype = layers_dtype(layers) if dtype is None else dtype
    statistic = functools.partial(covariance_statistic, dtype=dtype, precision=precision)

    def update(state, params, batch, key):
        stats, losses = train_statistics(task, layers, params, batch, _fisher_key(fisher, key), statistic)
        return covariance_update(state, stats), losses

    return Stage(init=lambda: covariance_init(layers, dtype), update=update, finalize=covariance_finalize)


def lambda_stage(
    task: Task, layers: Mapping[str, LayerSpec], fisher: str = "sampled", dtype=None, precision=None
) -> Stage:
    """Stage 3: ``update(state, params, eigen, batch, key)`` accumulates ``Lambda`` (``eigen=None``: diagonal) in
    ``dtype``."""
    dtype = layers_dtype(layers) if dtype is None else dtype
    statistic = functools.partial(lambda_statistic, dtype=dtype, precision=precision)

    def update(state, params, eigen, batch, key):
        stats, losses = train_statistics(
            task, layers, params, batch, _fisher_key(fisher, key), statistic, lambda_context(streamed(eigen))
        )
        return lambda_update(state, stats), losses

    return Stage(init=lambda: lambda_init(layers, dtype), update=update, finalize=lambda_finalize)


def index_step(task: Task, layers: Mapping[str, LayerSpec], k: int | None, dtype=None, precision=None):
    """The index pass (:mod:`jaxinf.engine.indexing`): ``(params, basis, batch) -> {"cells": [B, C], "bands": [B, E],
    "loss": [B]}``, each document row's kept cells of ``Q_S^T G[n] Q_A`` (``k_S k_A`` of them, ``k`` None: all)
    under the data's labels (the gradients the scores use) and the energy of the rest in each pair of bands.
    ``basis``: per block, the eigenbases in decreasing eigenvalue and the kept cells
    (:func:`jaxinf.engine.indexing.ordered_basis`)."""
    from jaxinf.engine.indexing import basis_axes, flatten_rows, index_statistic

    dtype = layers_dtype(layers) if dtype is None else dtype
    statistic = functools.partial(index_statistic, k=k, dtype=dtype, precision=precision)

    def step(params, basis, batch):
        context = streamed(basis, basis_axes(basis))
        blocks, losses = train_statistics(task, layers, params, batch, None, statistic, context)
        return {**flatten_rows(blocks, layers), "loss": losses}

    return step


def _rotation_context(eigen, selection, layers: Mapping[str, LayerSpec]) -> dict[str, dict[str, Any]]:
    """Per block, :func:`jaxinf.engine.indexing.lambda_and_index_statistic`'s context: the eigenbases ``Q_A``,
    ``Q_S`` and the selection's ``rows``, ``cols`` and ``cells``."""
    bases = lambda_context(streamed(eigen))
    assert bases is not None  # the index needs an eigenbasis
    return {
        name: {
            **bases[name],
            "rows": selection.rows[name],
            "cols": selection.cols[name],
            "cells": selection.cells[name],
        }
        for name in layers
    }


def index_from_rotation_step(task: Task, layers: Mapping[str, LayerSpec], k: int | None, dtype=None, precision=None):
    """The index pass that forms each document's rotated gradient as the Lambda pass does: ``(params, eigen, selection,
    batch) -> {"cells", "bands", "loss"}``, the rows of :func:`lambda_and_index_step` to the last bit (the same
    :func:`jaxinf.engine.indexing.lambda_and_index_statistic`, its Lambda sums dropped). It rebuilds an index that
    pass wrote (a run whose index went missing) without a byte changed."""
    from jaxinf.engine.indexing import flatten_rows, lambda_and_index_statistic

    dtype = layers_dtype(layers) if dtype is None else dtype
    statistic = functools.partial(lambda_and_index_statistic, k=k, dtype=dtype, precision=precision)

    def step(params, eigen, selection, batch):
        context = _rotation_context(eigen, selection, layers)
        blocks, losses = train_statistics(task, layers, params, batch, None, statistic, context)
        return {**flatten_rows({name: v["index"] for name, v in blocks.items()}, layers), "loss": losses}

    return step


def lambda_and_index_step(task: Task, layers: Mapping[str, LayerSpec], k: int | None, dtype=None, precision=None):
    """The Lambda pass that also writes the EK-FAC index, under the empirical Fisher (whose gradients, under the
    data's labels, are the ones the scores and the index use): ``(state, params, eigen, selection, batch) -> (state,
    {"cells": [B, C], "bands": [B, E], "loss": [B]})``. Each layer's documents' gradients are rotated into the
    eigenbasis once, where its ``a`` and ``g`` exist, and that rotation gives both its Lambda sums and its index rows
    (:func:`jaxinf.engine.indexing.lambda_and_index_statistic`), so a run that scores from the index needs no pass
    over the corpus besides the covariance and this one, and the index costs this pass a gather and its band sums.
    ``selection``: the eigen-directions in decreasing eigenvalue (:func:`jaxinf.engine.indexing.select_cells`)."""
    from jaxinf.engine.indexing import flatten_rows, lambda_and_index_statistic

    dtype = layers_dtype(layers) if dtype is None else dtype
    statistic = functools.partial(lambda_and_index_statistic, k=k, dtype=dtype, precision=precision)

    def update(state, params, eigen, selection, batch):
        context = _rotation_context(eigen, selection, layers)
        blocks, losses = train_statistics(task, layers, params, batch, None, statistic, context)
        state = lambda_update(state, {name: v["lambda"] for name, v in blocks.items()})
        return state, {**flatten_rows({name: v["index"] for name, v in blocks.items()}, layers), "loss": losses}

    return update


def _sequence_gradient(a: Array, g: Array, mask: Array, context=None, *, precision=None) -> Array:
    return per_sequence_gradient(a, g, precision)


def query_gradients(
    task: Task, layers: Mapping[str, LayerSpec], params, batch, precision=None
) -> tuple[dict[str, Array], Array]:
    """Per-query measurement gradients ``G_q = sum_t g a^T`` (``[*lead, Q, d_out, d_in']``) and measurements ``[Q]``."""
    return measurement_statistics(
        task, layers, params, batch, functools.partial(_sequence_gradient, precision=precision)
    )


def prepared_queries(
    task: Task,
    layers: Mapping[str, LayerSpec],
    params,
    batch,
    curv: Curvature,
    damping_value: float | None,
    rank: int | None,
    dtype=None,
    svd: str = "randomized",
    precision=None,
) -> QueryGradients:
    """Stage 5: ``P(G_q)`` of a query batch (rank-r where asked), each layer's formed in the backward pass.

    The same as :func:`jaxinf.engine.scoring.prepare_queries` of :func:`query_gradients`, without ever holding
    the query gradients of all layers: each layer's ``G_q`` is preconditioned and truncated where it exists."""
    dtype = layers_dtype(layers) if dtype is None else dtype

    def statistic(a, g, mask, factors):
        return prepare_layer(
            per_sequence_gradient(a, g, precision), curv.strategy, factors, damping_value, rank, dtype, svd, precision
        )

    blocks, loss = measurement_statistics(task, layers, params, batch, statistic, curvature_context(streamed(curv)))
    return query_gradients_of(blocks, loss)


def _document_statistic(
    per_token: bool, order: str | None, strategy: Strategy | None, damping_value: float | None, dtype, precision=None
):
    """The statistic of a scoring pass: scores against the query gradients, and self-influence when ``strategy``."""
    stats = {
        "scores": lambda a, g, m, q: block_scores(
            a, g, q, per_token=per_token, order=order, dtype=dtype, precision=precision
        )
    }
    if strategy is not None:
        stats["self"] = lambda a, g, m, c: strategy.self_score(a, g, c, damping_value, dtype, precision)
    return joint(stats)


def score_batch(
    task: Task,
    layers: Mapping[str, LayerSpec],
    params,
    queries: QueryGradients,
    batch,
    *,
    per_layer: bool = False,
    per_token: bool = False,
    order: str | None = None,
    curv: Curvature | None = None,
    damping_value: float | None = None,
    dtype=None,
    precision=None,
    fsdp: bool = False,
) -> tuple[Scores, Array]:
    """Stage 6: pairwise scores of one document batch against all queries (and, given ``curv``, the documents'
    self-influence, in the same backward pass), and the documents' losses. ``fsdp``: the query gradients are
    stored over ``data`` too (``mesh.fsdp``) and gathered one layer at a time (:func:`streamed`)."""
    dtype = layers_dtype(layers) if dtype is None else dtype
    factors = None if curv is None else curvature_context(streamed(curv))
    qctx = query_context(streamed(queries, fsdp=fsdp))
    missing = [k for k in layers if k not in qctx]
    if missing:
        raise CaptureError(f"layer {missing[0]!r} has no query gradient")
    context = {
        k: {"scores": qctx[k], **({} if curv is None else {"self": None if factors is None else factors[k]})}
        for k in layers
    }
    blocks, losses = train_statistics(
        task,
        layers,
        params,
        batch,
        None,
        _document_statistic(per_token, order, None if curv is None else curv.strategy, damping_value, dtype, precision),
        context,
    )
    scores = collect_scores(
        {k: v["scores"] for k, v in blocks.items()},
        per_layer=per_layer,
        per_token=per_token,
        self_blocks=None if curv is None else {k: v["self"] for k, v in blocks.items()},
    )
    return scores, losses


def score_step(
    task: Task,
    layers: Mapping[str, LayerSpec],
    *,
    self_influence: bool,
    damping_value: float | None,
    dtype=None,
    precision=None,
    tails_of: tuple[int, int] | None = None,
    fsdp: bool = False,
):
    """The scoring step of ``jaxinf run`` and ``jaxinf plan``: ``(params, queries, curv, batch) ->
    {"scores": [Q, B], "loss": [B](, "self": [B])}``. With ``tails_of`` ``(documents, topk)``,
    ``(params, queries, curv, batch, tails)`` and the updated :class:`~jaxinf.engine.tails.Tails` as ``"tails"``:
    each query's running top rows with their per-layer scores, and their per-token scores where
    :func:`~jaxinf.engine.scoring.per_token_in_pass` finds them cheaper here than in a second pass."""
    keep_tails = tails_of is not None

    def step(params, queries, curv, batch, tails=None):
        per_token = keep_tails and per_token_in_pass(layers, queries, *batch["tokens"].shape, *tails_of)
        s, loss = score_batch(
            task,
            layers,
            params,
            queries,
            batch,
            curv=curv if self_influence else None,
            per_layer=keep_tails,
            per_token=per_token,
            damping_value=damping_value,
            dtype=dtype,
            precision=precision,
            fsdp=fsdp,
        )
        out = {"scores": s.total, "loss": loss}
        if self_influence:
            out["self"] = s.self
        if keep_tails:
            out["tails"] = running_tails.update(
                tails, s.total, stacked_layer_scores(s.per_layer, layers), s.per_token, batch
            )
        return out

    return step


def score_and_index_step(
    task: Task, layers: Mapping[str, LayerSpec], k: int | None, dtype=None, precision=None, fsdp: bool = False
):
    """The scoring pass that also writes the EK-FAC index (``index.k`` in a run with ``scores.mode: exact``):
    ``(params, queries, basis, batch) -> {"scores": [Q, B], "loss": [B], "cells": [B, C], "bands": [B, E]}``. One
    backward pass forms both statistics where each layer's ``a`` and ``g`` exist (:func:`index_step`'s rows,
    :func:`score_batch`'s scores), so the index costs its rotation and copy, not another pass."""
    from jaxinf.engine.indexing import basis_axes, flatten_rows, index_statistic

    dtype = layers_dtype(layers) if dtype is None else dtype
    statistic = joint(
        {
            "scores": lambda a, g, m, q: block_scores(a, g, q, dtype=dtype, precision=precision),
            "index": functools.partial(index_statistic, k=k, dtype=dtype, precision=precision),
        }
    )

    def step(params, queries, basis, batch):
        qctx, bctx = query_context(streamed(queries, fsdp=fsdp)), streamed(basis, basis_axes(basis))
        context = {name: {"scores": qctx[name], "index": bctx[name]} for name in layers}
        blocks, losses = train_statistics(task, layers, params, batch, None, statistic, context)
        scores = collect_scores({name: v["scores"] for name, v in blocks.items()})
        return {
            "scores": scores.total,
            "loss": losses,
            **flatten_rows({name: v["index"] for name, v in blocks.items()}, layers),
        }

    return step


def self_influence_batch(
    task: Task,
    layers: Mapping[str, LayerSpec],
    params,
    curv: Curvature,
    damping_value: float | None,
    batch,
    dtype=None,
    precision=None,
) -> tuple[Array, Array]:
    """Self-influence ``<P(G[n]), G[n]>`` of one document batch, and the documents' losses."""
    factors = curvature_context(streamed(curv))
    dtype = layers_dtype(layers) if dtype is None else dtype
    blocks, losses = train_statistics(
        task,
        layers,
        params,
        batch,
        None,
        lambda a, g, m, c: curv.strategy.self_score(a, g, c, damping_value, dtype, precision),
        factors,
    )
    return cast(Array, sum(sum_layers(v, 1) for v in blocks.values())), losses  # blocks: at least one


# --------------------------------------------------------------------------- in-memory drivers


def check_queries(batch, names: list[str] | None = None) -> None:
    """Raises naming the first query whose measurement has no token (an empty completion)."""
    counts = np.asarray(batch["weights"]).sum(-1)
    real = np.asarray(batch["mask"]).sum(-1) > 0
    for i in np.flatnonzero(real & (counts == 0)):
        label = names[i] if names is not None else f"#{int(i)}"
        raise CaptureError(f"query {label}: empty completion (no token enters the measurement)")


def stage_step(update: Callable, inputs: tuple, key: Array | None) -> Step:
    """A stage's ``update`` as the per-batch loop's step (:func:`jaxinf.engine.loop.run_batches`): batch ``i`` is folded
    into the state with the key ``fold_in(key, i)`` (no key without one); no outputs besides the losses."""

    def step(state, batch, i):
        state, losses = update(state, *inputs, batch, None if key is None else jax.random.fold_in(key, i))
        return state, None, losses

    return step


def run_stage(
    stage: Stage, inputs: tuple, batches: Iterable, key: Array | None, *, what: str = "document", jit: bool = True
):
    """Drives a stage over batches in memory: the loop that tests and examples use (:func:`jaxinf.engine.loop.run_batches`,
    nothing saved, no progress shown).

    Each batch's losses are checked while the next batch runs (one batch late, no wait on the device)."""
    update = jax.jit(stage.update) if jit else stage.update

    def non_finite(batch: int, row: int, index, value: float) -> str:
        return f"{what} in batch {batch} row {row}: loss is not finite ({value})"

    state, _ = run_batches(
        what,
        stage_step(update, inputs, key),
        lambda start: batches,
        stage.init(),
        Kept(),
        total=None,
        non_finite=non_finite,
        fields=(),
        report=False,
    )
    return stage.finalize(state)


def fit_curvature(
    task: Task,
    layers: Mapping[str, LayerSpec],
    params,
    batches: list,
    *,
    strategy: str | Strategy = "ekfac",
    fisher: str = "sampled",
    key: Array | None = None,
    jit: bool = True,
    dtype=None,
    precision=None,
) -> tuple[Curvature, dict]:
    """The stages ``strategy`` needs (covariance, eigendecomposition, Lambda) over in-memory batches, in ``dtype``;
    returns the curvature and the pieces."""
    pieces: dict = {}
    if fisher == "sampled" and key is None:
        key = jax.random.key(0)

    def eigen():
        cov = run_stage(
            covariance_stage(task, layers, fisher, dtype, precision),
            (params,),
            batches,
            None if key is None else stage_key(key, "covariance"),
            jit=jit,
        )
        pieces.update(covariance=cov, eigen=eigendecompose(cov))
        return pieces["eigen"]

    def fit_lambda(basis):
        return run_stage(
            lambda_stage(task, layers, fisher, dtype, precision),
            (params, basis),
            batches,
            None if key is None else stage_key(key, "lambda"),
            jit=jit,
        )

    curv = assemble(strategy, eigen, fit_lambda)
    if curv.Lambda is not None:
        pieces["Lambda"] = curv.Lambda
    return curv, pieces
