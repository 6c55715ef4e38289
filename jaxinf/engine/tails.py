"""Each query's running top documents of a scoring pass, with the per-layer and per-token scores that explain them.

The exports explain each query's ``scores.topk`` highest-scoring documents layer by layer and token by token. The
scoring pass forms both breakdowns on its way to the total (per-layer scores are the blocks before they are summed;
in the tokens order of :func:`jaxinf.engine.scoring.contraction_order` the per-token scores are the terms before the
sum over ``t``), so it keeps them for the rows that may end in a query's top: a running top-K, an ``(init, update)``
pair in the manner of optax, carried from batch to batch on the device.

The top is over *rows*: a document split into several rows (``data.long_documents: split``) has a score that no one
row holds, and a resumed pass never saw the rows of the batches it skipped. The exports look each final top
document up here and compute the few they do not find (:func:`found`) with a pass over just those.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tails:
    """Per query (``Q``), the ``K`` rows of highest score seen so far, best first. Empty slots have score
    ``-inf`` and document ``-1``.

    ``score`` ``[Q, K]``: the row's score; ``index``, ``chunk`` ``[Q, K]``: its document and the document's chunk;
    ``layers`` ``[Q, K, L]``: its per-layer scores (layers in :func:`jaxinf.engine.scoring.layer_order`);
    ``tokens`` ``[Q, K, T]`` and ``ids`` ``[Q, K, T]``: its per-token scores and token ids (``T``: ``data.max_length``,
    zero beyond ``length`` ``[Q, K]``); ``has_tokens`` ``[Q, K]``: whether the pass formed its per-token scores."""

    score: Array
    index: Array
    chunk: Array
    length: Array
    layers: Array
    tokens: Array
    ids: Array
    has_tokens: Array


def init(queries: int, k: int, layers: int, length: int, dtype=jnp.float32) -> Tails:
    """No row kept yet: ``Q`` queries, ``K`` slots each, ``L`` per-layer names, rows of up to ``T`` tokens."""
    Q, K = queries, k
    return Tails(
        score=jnp.full((Q, K), -jnp.inf, dtype),
        index=jnp.full((Q, K), -1, jnp.int32),
        chunk=jnp.full((Q, K), -1, jnp.int32),
        length=jnp.zeros((Q, K), jnp.int32),
        layers=jnp.zeros((Q, K, layers), dtype),
        tokens=jnp.zeros((Q, K, length), dtype),
        ids=jnp.zeros((Q, K, length), jnp.int32),
        has_tokens=jnp.zeros((Q, K), bool),
    )


def update(tails: Tails, total: Array, per_layer: Array, per_token: Array | None, batch) -> Tails:
    """The ``K`` rows of highest score per query among the kept and the batch's (``lax.top_k`` over ``K + B``
    candidates; padding rows, ``batch["index"] < 0``, never enter).

    ``total`` ``[Q, B]``, ``per_layer`` ``[L, Q, B]``, ``per_token`` ``[Q, B, T']`` or None (the pass did not form
    them: ``has_tokens`` false), ``batch``: ``index``, ``chunk`` ``[B]``, ``tokens``, ``mask`` ``[B, T']``
    (``T' <= T``)."""
    Q, K = tails.score.shape
    T = tails.tokens.shape[-1]
    B, width = batch["tokens"].shape
    dtype = tails.score.dtype

    def rows(x):  # a per-row [B, ...] array as every query's candidates [Q, B, ...]
        return jnp.broadcast_to(x, (Q,) + x.shape)

    def pad(x):  # [..., T'] -> [..., T]
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, T - width)])

    valid = batch["index"] >= 0
    candidates = Tails(
        score=jnp.where(valid[None], total.astype(dtype), -jnp.inf),
        index=rows(batch["index"].astype(jnp.int32)),
        chunk=rows(batch["chunk"].astype(jnp.int32)),
        length=rows(batch["mask"].sum(-1).astype(jnp.int32)),
        layers=jnp.moveaxis(per_layer, 0, -1).astype(dtype),
        tokens=pad(jnp.zeros((Q, B, width), dtype) if per_token is None else per_token.astype(dtype)),
        ids=rows(pad(batch["tokens"].astype(jnp.int32))),
        has_tokens=jnp.full((Q, B), per_token is not None),
    )
    return merge(tails, candidates, K)


def merge(a: Tails, b: Tails, k: int) -> Tails:
    """The ``k`` rows of highest score per query among ``a``'s and ``b``'s (``lax.top_k`` over both, best first):
    a batch's rows into the running top (:func:`update`), or the tails of two passes over disjoint documents into
    one (the index's certification, :func:`jaxinf.engine.indexing.certify`)."""
    joined = jax.tree.map(lambda x, y: jnp.concatenate([jnp.asarray(x), jnp.asarray(y)], axis=1), a, b)
    _, pick = jax.lax.top_k(joined.score, k)  # [Q, k]

    def take(x):
        return jnp.take_along_axis(x, pick.reshape(pick.shape + (1,) * (x.ndim - 2)), axis=1)

    return jax.tree.map(take, joined)


def found(tails: Tails, query: int, document: int, single_row: bool) -> int | None:
    """The slot holding ``document`` whole with both breakdowns for ``query`` (host arrays), or None: not kept, kept
    without per-token scores, or split over several rows (``single_row`` false)."""
    if not single_row:
        return None
    slots = np.flatnonzero(np.asarray(tails.index[query]) == document)
    if slots.size != 1 or not bool(tails.has_tokens[query, slots[0]]):
        return None
    return int(slots[0])
