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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxinf.capture import Captured, CaptureError, LayerSpec, capture, per_sequence_gradient
from jaxinf.curvature import (
    Curvature,
    Eigen,
    covariance_finalize,
    covariance_init,
    covariance_update,
    curvature,
    eigendecompose,
    kfac_lambda,
    lambda_finalize,
    lambda_init,
    lambda_update,
)
from jaxinf.scoring import QueryGradients, Scores, pairwise_scores, self_scores
from jaxinf.tasks import Task

Array = jax.Array
FISHERS = ("sampled", "empirical")


class Stage(NamedTuple):
    """``init() -> state``, ``update(state, *inputs, batch, key) -> (state, losses)``, ``finalize(state) -> result``."""

    init: Callable[..., Any]
    update: Callable[..., tuple[Any, Array]]
    finalize: Callable[[Any], Any]


def capture_train(task: Task, layers: Mapping[str, LayerSpec], params, batch, key: Array | None) -> Captured:
    """``a`` and ``g`` of a document batch under the training loss (labels sampled when ``key`` is given)."""
    return capture(lambda p, b, pr: task.train_loss(p, b, pr, key), params, batch, layers, batch["mask"])


def capture_measurement(task: Task, layers: Mapping[str, LayerSpec], params, batch) -> Captured:
    """``a`` and ``g`` of a query batch under the measurement."""
    return capture(task.measurement, params, batch, layers, batch["mask"])


def _fisher_key(fisher: str, key: Array | None) -> Array | None:
    if fisher not in FISHERS:
        raise ValueError(f"factors.fisher: unknown Fisher {fisher!r} (choose from {', '.join(FISHERS)})")
    if fisher == "empirical":
        return None
    if key is None:
        raise ValueError("the true Fisher (factors.fisher: sampled) needs a PRNG key to sample labels")
    return key


def covariance_stage(task: Task, layers: Mapping[str, LayerSpec], fisher: str = "sampled") -> Stage:
    """Stage 1: ``update(state, params, batch, key)`` accumulates ``A`` and ``S``."""

    def update(state, params, batch, key):
        captured = capture_train(task, layers, params, batch, _fisher_key(fisher, key))
        return covariance_update(state, captured), captured.loss

    return Stage(init=lambda: covariance_init(layers), update=update, finalize=covariance_finalize)


def lambda_stage(task: Task, layers: Mapping[str, LayerSpec], fisher: str = "sampled") -> Stage:
    """Stage 3: ``update(state, params, eigen, batch, key)`` accumulates ``Lambda`` (``eigen=None``: diagonal)."""

    def update(state, params, eigen, batch, key):
        captured = capture_train(task, layers, params, batch, _fisher_key(fisher, key))
        return lambda_update(state, captured, eigen), captured.loss

    return Stage(init=lambda: lambda_init(layers), update=update, finalize=lambda_finalize)


def query_gradients(task: Task, layers: Mapping[str, LayerSpec], params, batch) -> tuple[dict[str, Array], Array]:
    """Per-query measurement gradients ``G_q = sum_t g a^T`` (``[*lead, Q, d_out, d_in']``) and measurements ``[Q]``."""
    captured = capture_measurement(task, layers, params, batch)
    return {k: per_sequence_gradient(captured.a[k], captured.g[k]) for k in layers}, captured.loss


def score_batch(
    task: Task,
    layers: Mapping[str, LayerSpec],
    params,
    queries: QueryGradients,
    batch,
    *,
    per_layer: bool = False,
    per_token: bool = False,
    plan: str | None = None,
) -> tuple[Scores, Array]:
    """Pairwise scores of one document batch against all queries, and the documents' losses."""
    captured = capture_train(task, layers, params, batch, None)
    return pairwise_scores(queries, captured, per_layer=per_layer, per_token=per_token, plan=plan), captured.loss


def self_influence_batch(
    task: Task, layers: Mapping[str, LayerSpec], params, curv: Curvature, damping_value: float | None, batch
) -> tuple[Array, Array]:
    """Self-influence ``<P(G[n]), G[n]>`` of one document batch, and the documents' losses."""
    captured = capture_train(task, layers, params, batch, None)
    return self_scores(curv, damping_value, captured), captured.loss


# --------------------------------------------------------------------------- in-memory drivers


def check_finite(losses: Array, what: str, names: list[str] | None = None) -> None:
    """Raises naming the first sequence (``what`` = "document" / "query") whose loss is not finite."""
    losses = np.asarray(losses)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        i = int(bad[0])
        label = names[i] if names is not None else f"#{i}"
        raise CaptureError(f"{what} {label}: loss is not finite ({float(losses[i])})")


def check_queries(batch, names: list[str] | None = None) -> None:
    """Raises naming the first query whose measurement has no token (an empty completion)."""
    counts = np.asarray(batch["weights"]).sum(-1)
    real = np.asarray(batch["mask"]).sum(-1) > 0
    for i in np.flatnonzero(real & (counts == 0)):
        label = names[i] if names is not None else f"#{int(i)}"
        raise CaptureError(f"query {label}: empty completion (no token enters the measurement)")


def run_stage(stage: Stage, inputs: tuple, batches: Iterable, key: Array | None, *, what: str = "document",
              jit: bool = True):
    """Drives a stage over batches in memory: the loop that tests and examples use.

    Each batch's losses are checked while the next batch runs (one batch late, no wait on the device)."""
    update = jax.jit(stage.update) if jit else stage.update
    state = stage.init()

    def check(i, losses):
        check_finite(losses, what, [f"in batch {i} row {j}" for j in range(len(losses))])

    pending = None
    for i, batch in enumerate(batches):
        k = None if key is None else jax.random.fold_in(key, i)
        state, losses = update(state, *inputs, batch, k)
        if pending is not None:
            check(*pending)
        pending = (i, losses)
    if pending is not None:
        check(*pending)
    return stage.finalize(state)


def fit_curvature(
    task: Task,
    layers: Mapping[str, LayerSpec],
    params,
    batches: list,
    *,
    strategy: str = "ekfac",
    fisher: str = "sampled",
    key: Array | None = None,
    jit: bool = True,
) -> tuple[Curvature, dict]:
    """Covariance, eigendecomposition and Lambda over in-memory batches; returns the curvature and the pieces."""
    pieces: dict = {}
    if fisher == "sampled" and key is None:
        key = jax.random.key(0)
    if strategy == "identity":
        return curvature("identity"), pieces
    eigen: Eigen | None = None
    if strategy in ("kfac", "ekfac"):
        cov = run_stage(covariance_stage(task, layers, fisher), (params,), batches, key, jit=jit)
        eigen = eigendecompose(cov)
        pieces.update(covariance=cov, eigen=eigen)
    if strategy == "kfac":
        Lambda = kfac_lambda(eigen)
    else:
        lam_key = None if key is None else jax.random.fold_in(key, 1_000_003)
        Lambda = run_stage(lambda_stage(task, layers, fisher), (params, eigen), batches, lam_key, jit=jit)
    pieces["Lambda"] = Lambda
    return curvature(strategy, eigen, Lambda), pieces
