"""Each stage's per-batch program, defined once: what ``jaxinf run`` compiles and drives, and what ``jaxinf plan``
compiles for a mesh it does not have.

A :class:`Program` is one stage's step, a pure function of named arguments (:data:`ARGUMENTS`), with everything
both callers need to compile it the same way: the arguments it donates, the layout of its outputs, whether it runs
per document batch, the accumulating :class:`~jaxinf.engine.stages.Stage` behind it (its ``init`` and ``finalize``), and
its memory model (:func:`layer_working_set`, the settings :data:`SHRINK` that make one layer's statistic smaller).
:func:`programs` lists the programs a config's run compiles, in stage order; the run takes each stage's program from
here and the planner compiles exactly that list, so the two cannot drift (``tests/test_programs.py`` compiles both
paths and compares their StableHLO).

The eigendecomposition is not a per-batch program: the run and the planner share
:func:`jaxinf.engine.distributed.eigh_program`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxinf.engine import ahead, scoring, stages
from jaxinf.engine import precision as precisions
from jaxinf.engine import tails as running_tails
from jaxinf.engine.capture import LayerSpec
from jaxinf.engine.tasks import Task

ARGUMENTS = {
    "state": "the stage's running sums (its Stage's init, then the previous batch's state)",
    "params": "the model's parameters",
    "eigen": "the eigenbases Q_A, Q_S (None for a strategy without them)",
    "curv": "the curvature: eigenbases, Lambda or K-FAC eigenvalues, as the strategy keeps them",
    "queries": "the preconditioned query gradients P(G_q) (full or rank-r factors)",
    "basis": "per block, the eigenbases with columns in the index's order (jaxinf.engine.indexing.ordered_basis)",
    "selection": "per block, the eigen-directions in the index's order (jaxinf.engine.indexing.select_cells)",
    "batch": "a document batch: tokens, mask, weights [B, T]; index (its documents, -1 for padding), chunk [B]",
    "qbatch": "a query batch: tokens, mask, weights [q, T] (weights 1 at the completion)",
    "tails": "each query's running top rows of the scoring pass, with their breakdowns (jaxinf.engine.tails.Tails)",
    "key": "the PRNG key of the batch's sampled labels (None for the empirical Fisher)",
}
"""The names a program's arguments take, and what each is."""

SHRINK = {
    "covariance": "data.batch_size (documents per data row) or data.max_length",
    "lambda": "data.batch_size (documents per data row) or data.max_length",
    "queries": "data.query_batch_size",
    "scores": "data.batch_size (documents per data row), scores.query_rank or mesh.model",
    "breakdowns": "data.batch_size (documents per data row), scores.topk or mesh.model",
}
"""The settings that shrink each stage's per-layer working set, named when a layer does not fit."""

F32 = 4


@dataclasses.dataclass(frozen=True)
class Program:
    """One stage's step: ``fn(*arguments)`` with the named ``args`` (:data:`ARGUMENTS`).

    ``donate``: the positions whose buffers the step may reuse (an accumulating stage's state or a carried value);
    ``rows``: the outputs laid out by row over the ``data`` axis, ``{name: (ndim, rows on the last axis)}``
    ("losses": the second element of an accumulating step's result), None where XLA places them; ``whole``: the
    outputs every device holds whole (a carried value, e.g. the scoring pass's tails); ``per_document``: one call per
    document batch (its FLOPs count per document); ``stage``: the accumulating stage whose ``update`` is ``fn``."""

    name: str
    fn: Callable[..., Any]
    args: tuple[str, ...]
    donate: tuple[int, ...] = ()
    rows: Mapping[str, tuple[int, bool]] | None = None
    whole: tuple[str, ...] = ()
    per_document: bool = True
    stage: stages.Stage | None = None

    def out_shardings(self, executor):
        """The outputs' layout on ``executor`` (None on one device, or where XLA decides)."""
        if executor.mesh is None:
            return None
        if self.stage is not None:
            return executor.shardings(jax.eval_shape(self.stage.init)), executor.rows()
        if self.rows is None:
            return None
        return {
            **{k: executor.rows(ndim, last) for k, (ndim, last) in self.rows.items()},
            **{k: executor.replicated() for k in self.whole},
        }

    def jit(self, executor, batches=None) -> Callable[..., Any]:
        """The step compiled where ``executor`` keeps its arrays (the run's executor, or the planner's on simulated
        devices). ``batches``: the pass's batches (:class:`jaxinf.data.batching.DocumentBatches`), whose other shapes'
        programs then compile in the background from the first call on (:class:`jaxinf.engine.ahead.Ahead`)."""
        fn = executor.jit(self.fn, donate_argnums=self.donate, out_shardings=self.out_shardings(executor))
        if batches is None or not ahead.enabled():
            return fn
        return ahead.Ahead(fn, self.args.index("batch"), [executor.put(b) for b in batches.shapes()])


# --------------------------------------------------------------------------- the programs


def _dtype(config):
    return precisions.statistics_dtype(config.run.precision)


def covariance(config, task: Task, layers: Mapping[str, LayerSpec]) -> Program:
    """Stage 1: ``A`` and ``S`` of a document batch added to the running sums (:func:`jaxinf.engine.stages.covariance_stage`)."""
    stage = stages.covariance_stage(task, layers, config.factors.fisher, _dtype(config), config.run.matmul_precision)
    return Program("covariance", stage.update, ("state", "params", "batch", "key"), donate=(0,), stage=stage)


def lambda_(config, task: Task, layers: Mapping[str, LayerSpec]) -> Program:
    """Stage 3: the eigenvalue correction of a document batch added to the running sums
    (:func:`jaxinf.engine.stages.lambda_stage`)."""
    stage = stages.lambda_stage(task, layers, config.factors.fisher, _dtype(config), config.run.matmul_precision)
    return Program("lambda", stage.update, ("state", "params", "eigen", "batch", "key"), donate=(0,), stage=stage)


def queries(config, task: Task, layers: Mapping[str, LayerSpec]) -> Program:
    """Stage 5: ``P(G_q)`` of a query batch, rank-r by ``scores.query_svd`` where asked
    (:func:`jaxinf.engine.stages.prepared_queries`)."""
    s, dtype, mp = config.scores, _dtype(config), config.run.matmul_precision

    def prepare(params, qbatch, curv):
        return stages.prepared_queries(
            task, layers, params, qbatch, curv, s.damping, s.query_rank, dtype, s.query_svd, mp
        )

    return Program("queries", prepare, ("params", "qbatch", "curv"), per_document=False)


def scores(
    config, task: Task, layers: Mapping[str, LayerSpec], *, self_influence: bool | None = None, tails: int | None = None
) -> Program:
    """Stage 6: a document batch's scores against every query, and with ``scores.self_influence`` its
    self-influence (:func:`jaxinf.engine.stages.score_step`). ``self_influence=False``: the scores alone (the index's
    certification pass). ``tails``: the number of documents the pass scores, and that it also keeps each query's
    running top rows with their breakdowns (:mod:`jaxinf.engine.tails`), carried from batch to batch, so that the
    exports need no second pass."""
    want_self = config.scores.self_influence if self_influence is None else self_influence
    step = stages.score_step(
        task,
        layers,
        self_influence=want_self,
        damping_value=config.scores.damping if want_self else None,
        dtype=_dtype(config),
        precision=config.run.matmul_precision,
        tails_of=None if tails is None else (tails, tail_slots(config, tails)),
        fsdp=config.mesh.fsdp,
    )
    rows = {"scores": (2, True), "loss": (1, False), **({"self": (1, False)} if want_self else {})}
    if tails is not None:
        return Program(
            "scores", step, ("params", "queries", "curv", "batch", "tails"), donate=(4,), rows=rows, whole=("tails",)
        )
    return Program("scores", step, ("params", "queries", "curv", "batch"), rows=rows)


def tail_slots(config, documents: int) -> int:
    """The rows a query's running top keeps in a pass over ``documents`` documents: ``scores.topk``, or fewer when
    there are fewer documents (the exports' top holds at most every document; a larger ``scores.topk`` must not
    size the tails, whose ``[Q, K, T]`` arrays would not fit any memory)."""
    return max(1, min(config.scores.topk, documents))


def tails_init(config, layers: Mapping[str, LayerSpec], queries: int, documents: int):
    """The zero :class:`~jaxinf.engine.tails.Tails` of the scoring pass over ``documents`` documents
    (:func:`tail_slots` slots for each of ``queries`` queries), rows of ``data.max_length`` tokens, in the statistics
    dtype."""
    return running_tails.init(
        queries, tail_slots(config, documents), len(scoring.layer_order(layers)), config.data.max_length, _dtype(config)
    )


def index(config, task: Task, layers: Mapping[str, LayerSpec], as_lambda: bool = False) -> Program:
    """The index pass: each document row's kept cells of ``Q_S^T G[n] Q_A`` and its band energies
    (:func:`jaxinf.engine.stages.index_step`); ``as_lambda``: from each document's whole rotated gradient, as the
    Lambda pass that writes the index forms them (:func:`jaxinf.engine.stages.index_from_rotation_step`), for an
    index that pass would have written."""
    k = None if config.index.k == "full" else config.index.k
    dtype, mp = _dtype(config), config.run.matmul_precision
    if as_lambda:
        return Program(
            "index",
            stages.index_from_rotation_step(task, layers, k, dtype, mp),
            ("params", "eigen", "selection", "batch"),
        )
    return Program("index", stages.index_step(task, layers, k, dtype, mp), ("params", "basis", "batch"))


def scores_and_index(config, task: Task, layers: Mapping[str, LayerSpec]) -> Program:
    """The scoring pass that also writes the index, in one backward pass (:func:`jaxinf.engine.stages.score_and_index_step`)."""
    k = None if config.index.k == "full" else config.index.k
    return Program(
        "scores+index",
        stages.score_and_index_step(task, layers, k, _dtype(config), config.run.matmul_precision, config.mesh.fsdp),
        ("params", "queries", "basis", "batch"),
    )


def lambda_and_index(config, task: Task, layers: Mapping[str, LayerSpec]) -> Program:
    """The Lambda pass that also writes the index (the empirical Fisher; :func:`jaxinf.engine.stages.lambda_and_index_step`):
    the Lambda stage's state, plus each document row's index cells."""
    k = None if config.index.k == "full" else config.index.k
    dtype, mp = _dtype(config), config.run.matmul_precision
    return Program(
        "lambda+index",
        stages.lambda_and_index_step(task, layers, k, dtype, mp),
        ("state", "params", "eigen", "selection", "batch"),
        donate=(0,),
        stage=stages.lambda_stage(task, layers, config.factors.fisher, dtype, mp),
    )


def breakdowns(config, task: Task, layers: Mapping[str, LayerSpec]) -> Program:
    """The exports' pass over each query's top documents: per-layer scores ``[L, Q, B]`` (layers in
    :func:`jaxinf.engine.scoring.layer_order`) and per-token scores ``[Q, B, T]``."""
    names = scoring.layer_order(layers)
    dtype, mp = _dtype(config), config.run.matmul_precision

    def breakdown(params, q, batch):
        s, _ = stages.score_batch(
            task,
            layers,
            params,
            q,
            batch,
            per_layer=True,
            per_token=True,
            dtype=dtype,
            precision=mp,
            fsdp=config.mesh.fsdp,
        )
        per_layer = scoring.expand_layer_scores(s.per_layer, layers)
        return jnp.stack([per_layer[n] for n in names]), s.per_token

    return Program("breakdowns", breakdown, ("params", "queries", "batch"))


def programs(
    config, task: Task, layers: Mapping[str, LayerSpec], *, one_device: bool = True, documents: int | None = None
) -> dict[str, Program]:
    """The per-batch programs ``jaxinf run`` compiles for ``config``, by stage, in the order it runs them.

    The fitting stages the strategy needs (none with ``factors.from``); the queries; with ``scores.mode: exact`` the
    scoring pass, which also writes the index when ``index.k`` is set, the scores have no self-influence and the run
    is on ``one_device`` (else the index is a pass of its own after it); with ``scores.mode: index`` the index pass
    (when this run builds one) and the certifying scores; and the exports' breakdowns (a pass over the top documents
    that the scoring pass's tails do not hold: all of them after a scoring pass without tails). ``documents``: the
    number the scoring pass scores (by default ``plan.documents``, the planner's corpus)."""
    from jaxinf.engine.curvature import strategy as strategy_of

    strategy = strategy_of(config.factors.strategy)
    out: dict[str, Program] = {}
    if config.factors.from_run is None and strategy.eigen:
        out["covariance"] = covariance(config, task, layers)
    if config.factors.from_run is None and strategy.fits_lambda:
        out["lambda"] = (
            lambda_and_index(config, task, layers)
            if index_in_lambda(config, one_device)
            else lambda_(config, task, layers)
        )
    out["queries"] = queries(config, task, layers)
    build = config.index.k is not None
    if config.scores.mode == "index":
        if build and not index_in_lambda(config, one_device):
            out["index"] = index(config, task, layers)
        out["scores"] = scores(
            config, task, layers, self_influence=False, tails=config.plan.documents if documents is None else documents
        )
    elif fused_index(config, one_device) and not index_in_lambda(config, one_device):
        out["scores"] = scores_and_index(config, task, layers)
    else:
        out["scores"] = scores(config, task, layers, tails=config.plan.documents if documents is None else documents)
        if build and not index_in_lambda(config, one_device):
            out["index"] = index(config, task, layers)
    out["breakdowns"] = breakdowns(config, task, layers)
    return out


def fitted_shapes(task: Task, layers: Mapping[str, LayerSpec], dtype=None) -> dict[str, Any]:
    """Abstract results of the fitting stages of the tracked layers, in the statistics ``dtype`` (by default the
    layers' own): ``covariance`` (the running sums), ``finished`` (the covariance), ``eigen`` and ``lambda``. What
    a run restores its saved results onto and what the planner lays out."""
    from jaxinf.engine.curvature import eigendecompose

    cov = stages.covariance_stage(task, layers, dtype=dtype)
    lam = stages.lambda_stage(task, layers, dtype=dtype)
    state = jax.eval_shape(cov.init)
    finished = jax.eval_shape(cov.finalize, state)
    return {
        "covariance": state,
        "finished": finished,
        "eigen": jax.eval_shape(eigendecompose, finished),
        "lambda": jax.eval_shape(lambda: lam.finalize(lam.init())),
    }


def index_in_lambda(config, one_device: bool) -> bool:
    """Whether the Lambda pass writes the index (:func:`lambda_and_index`): ``index.k`` set, EK-FAC or diagonal
    fitted here under the empirical Fisher (whose gradients are the index's), over every document
    (``factors.max_documents`` not set), on one device."""
    from jaxinf.engine.curvature import strategy as strategy_of

    return (
        config.index.k is not None
        and config.factors.fisher == "empirical"
        and config.factors.from_run is None
        and strategy_of(config.factors.strategy).fits_lambda
        and strategy_of(config.factors.strategy).eigen
        and config.factors.max_documents is None
        and one_device
    )


def fused_index(config, one_device: bool) -> bool:
    """Whether the exact scoring pass also writes the index (:func:`scores_and_index`): ``index.k`` set, scores
    without self-influence, on one device (on a mesh the index is a pass of its own)."""
    return (
        config.scores.mode == "exact" and config.index.k is not None and not config.scores.self_influence and one_device
    )


# --------------------------------------------------------------------------- memory


def layer_working_set(
    stage: str, spec: LayerSpec, *, rows: int, tokens: int, queries: int, query_batch: int, rank: int | None, model: int
) -> int:
    """Bytes per device of one layer's statistic as the backward pass forms it (float32; an estimate).

    With ``n = d_in'``, ``o = d_out``, ``R = rows`` documents per data row, ``T`` tokens and ``m`` = ``mesh.model``:

    - covariance: ``a`` and ``g`` of the layer, ``R T (n + o)``, and the layer's sums ``(n^2 + o^2) / m``;
    - lambda: the rotated tokens, ``R T (n + o)``, and the rotated gradients ``R o n / m``;
    - queries: a query batch's ``G_q``, its ``P(G_q)`` and the SVD's copy, ``3 q o n`` (the SVD is not split);
    - scores: the contraction :func:`jaxinf.engine.scoring.contraction_order` picks: tokens, ``2 Q R T r / m``
      (``Q R T o / m`` at full rank); documents, ``(Q + R) o n / m``;
    - breakdowns: always the tokens contraction (per-token scores need it), and the per-token scores
      ``Q R T`` themselves.
    """
    n, o = spec.d_in_aug, spec.d_out
    r = rank if rank is not None and min(n, o) > rank else None
    tokens_contraction = (2 * queries * rows * tokens * r if r else queries * rows * tokens * o) / model
    if stage == "covariance":
        values = rows * tokens * (n + o) + (n * n + o * o) / model
    elif stage == "lambda":
        values = rows * tokens * (n + o) + rows * o * n / model
    elif stage == "queries":
        values = 3 * query_batch * o * n
    elif stage == "scores":
        if scoring.contraction_order(rows, tokens, queries, o, n, r) == "tokens":
            values = tokens_contraction
        else:
            values = (queries + rows) * o * n / model
    elif stage == "breakdowns":
        values = tokens_contraction + queries * rows * tokens
    else:
        raise ValueError(f"no working set for stage {stage!r}")
    return int(values * F32)
