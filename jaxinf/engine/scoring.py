"""Query gradients, their low-rank approximation, and influence scores.

The influence of document n on query q is

    I(q, n) = sum_layers <P(G_q), G[n]>_F = sum_layers sum_t g[n,t]^T P(G_q) a[n,t]

where ``G_q`` is the gradient of the query's measurement (summed NLL of its
completion tokens) and ``P`` the preconditioner of :mod:`jaxinf.engine.curvature`.
Positive means that a gradient step on document n lowers the query's loss, i.e.
raises the completion's log-probability. Scores are raw by default
(kronfluence's convention: no sign flip, no 1/N); ``per_nat`` divides each
query's row by its completion NLL, as Ruis et al. report.

Every per-layer quantity here is a *statistic* of :func:`jaxinf.engine.capture.layer_statistics`,
evaluated inside the backward pass where the layer's ``a`` and ``g`` exist:
:func:`block_scores` (``[Q, B]``, or ``[Q, B, T]`` per token) against the layer's
slice of the query gradients, self-influence against its slice of the curvature
(the strategy's :meth:`~jaxinf.engine.curvature.Strategy.self_score`), and
:func:`prepare_layer` (the query gradient ``G_q`` of a query batch,
preconditioned and truncated at once).

Documents are never turned into parameter-sized gradients per token. Per layer,
:func:`contraction_order` picks from the shapes the cheaper (in FLOPs and memory
traffic) of contracting the query factors with the tokens
(``sum_t (g_t . u_k)(v_k . a_t)``) and forming one ``[d_out, d_in']`` gradient per
document.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.engine.capture import LayerSpec, expand, per_sequence_gradient
from jaxinf.engine.curvature import Curvature, Strategy, block_damping, curvature_context
from jaxinf.engine.lapack import orthonormal_basis, thin_svd
from jaxinf.engine.precision import matmul_precision, working_dtype
from jaxinf.sharding.axes import logical

Array = jax.Array

NORMALIZATIONS = ("none", "per_nat")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QueryGradients:
    """Preconditioned query gradients per block, ready for scoring.

    A block is either in ``full`` (``[*lead, Q, d_out, d_in']``) or, once rank-r
    truncated, in ``left`` (``[*lead, Q, d_out, r]``, singular values folded in)
    and ``right`` (``[*lead, Q, d_in', r]``): ``P(G_q) ~= left @ right^T``.
    ``loss`` holds each query's measurement (its completion NLL).
    """

    full: dict[str, Array] = logical("query", "queries", "rows", "cols")
    left: dict[str, Array] = logical("query", "queries", "rows", "rank")
    right: dict[str, Array] = logical("query", "queries", "cols", "rank")
    loss: Array = logical("replicated")

    @property
    def num_queries(self) -> int:
        return int(self.loss.shape[0])


SVD_METHODS = ("randomized", "full")
"""``scores.query_svd``: how :func:`low_rank` finds the top singular vectors."""

OVERSAMPLE = 8
"""Extra columns of the randomized range finder beyond the rank (Halko, Martinsson & Tropp 2011, section 4.2)."""

POWER_ITERATIONS = 2
"""Subspace iterations ``q`` of the randomized range finder: the sketch sees the spectrum raised to the power
``2q + 1``, so singular values past the rank weigh less against the top ones (Halko et al. 2011, section 4.5)."""


def range_finder(P: Array, k: int, iterations: int = POWER_ITERATIONS, seed: int = 0, precision=None) -> Array:
    """An orthonormal ``Q`` ``[..., m, k]`` with ``P ~= Q Q^T P`` for each matrix of ``P`` ``[..., m, n]``: the randomized
    range finder with subspace iteration (Halko, Martinsson & Tropp 2011, algorithm 4.4),

        Q = orth(P W),   then ``iterations`` times   Q = orth(P orth(P^T Q)),

    with ``W`` ``[n, k]`` standard normal from a fixed key (``seed``), so the same ``P`` always gives the same
    ``Q``. Exact (``Q Q^T P = P``) when ``rank(P) <= k``. Products at the matmul precision ``precision``."""
    mm = functools.partial(jnp.matmul, precision=matmul_precision(precision))
    W = jax.random.normal(jax.random.key(seed), (P.shape[-1], k), P.dtype)
    Q = orthonormal_basis(mm(P, W))
    for _ in range(iterations):
        Z = orthonormal_basis(mm(jnp.swapaxes(P, -1, -2), Q))
        Q = orthonormal_basis(mm(P, Z))
    return Q


def low_rank(P: Array, rank: int, dtype=None, svd: str = "randomized", precision=None) -> tuple[Array, Array]:
    """Rank-r truncated SVD ``P ~= (U_r diag(s_r)) V_r^T`` per matrix of ``P`` ``[..., d_out, d_in']``, computed in
    the statistics dtype ``dtype`` (by default :func:`~jaxinf.engine.precision.working_dtype` of ``P``) and returned in
    ``P``'s; ``(left, right) = (U_r diag(s_r), V_r)``.

    ``svd="full"``: the SVD of each whole matrix (kronfluence's ``use_full_svd=True``). ``svd="randomized"``: the
    SVD of the small ``B = Q^T P`` (``[k, d_in']``, ``k = r + OVERSAMPLE``) for the :func:`range_finder` basis
    ``Q`` of ``P``, so that ``U = Q U_B``: a few matrix products and decompositions of ``k``-wide matrices instead
    of one of a ``min(d_out, d_in')``-wide matrix. It equals the full SVD's truncation where ``rank(P) <= k``;
    otherwise its error approaches the full SVD's as the singular values past ``r`` fall off (Halko et al.,
    section 10; tests/test_scoring.py measures the gap on preconditioned query gradients). Where ``k`` reaches
    ``min(d_out, d_in')`` there is nothing to save and the full SVD is used. Products at the matmul precision
    ``precision`` (``run.matmul_precision``).
    """
    if svd not in SVD_METHODS:
        raise ValueError(f"scores.query_svd: {svd!r} is not one of {', '.join(SVD_METHODS)}")
    out_dtype = P.dtype
    P = P.astype(working_dtype(P) if dtype is None else dtype)
    k = rank + OVERSAMPLE
    if svd == "randomized" and k < min(P.shape[-2:]):
        mm = functools.partial(jnp.matmul, precision=matmul_precision(precision))
        Q = range_finder(P, k, precision=precision)
        Ub, s, Vt = thin_svd(mm(jnp.swapaxes(Q, -1, -2), P))
        U = mm(Q, Ub[..., :, :rank])
    else:
        U, s, Vt = thin_svd(P)
        U = U[..., :, :rank]
    left = U * s[..., None, :rank]
    right = jnp.swapaxes(Vt[..., :rank, :], -1, -2)
    return left.astype(out_dtype), right.astype(out_dtype)


def prepare_layer(
    G: Array,
    strategy: Strategy,
    factors: Mapping[str, Array] | None,
    damping_value: float | None,
    rank: int | None,
    dtype=None,
    svd: str = "randomized",
    precision=None,
) -> dict[str, Array]:
    """``P(G_q)`` of one block's query gradients ``[*lead, Q, d_out, d_in']`` (the strategy's
    :meth:`~jaxinf.engine.curvature.Strategy.precondition`): ``{"full": P}``, or its rank-r SVD ``{"left", "right"}``
    (:func:`low_rank` in ``dtype`` by the method ``svd``) where ``min(d_out, d_in') > r``. ``factors``: the block's
    :func:`curvature_context`."""
    damp = None if factors is None else block_damping(factors["Lambda"], damping_value)
    P = strategy.precondition(G, factors, damp, precision)
    if rank is not None and min(P.shape[-2:]) > rank:
        left, right = low_rank(P, rank, dtype, svd, precision)
        return {"left": left, "right": right}
    return {"full": P}


def query_gradients_of(blocks: Mapping[str, Mapping[str, Array]], loss: Array) -> QueryGradients:
    """A :class:`QueryGradients` from per-block :func:`prepare_layer` results."""
    full = {k: v["full"] for k, v in blocks.items() if "full" in v}
    left = {k: v["left"] for k, v in blocks.items() if "left" in v}
    right = {k: v["right"] for k, v in blocks.items() if "right" in v}
    return QueryGradients(full=full, left=left, right=right, loss=loss)


def prepare_queries(
    G: Mapping[str, Array],
    loss: Array,
    curv: Curvature,
    damping_value: float | None,
    rank: int | None,
    dtype=None,
    svd: str = "randomized",
    precision=None,
) -> QueryGradients:
    """:func:`prepare_layer` of every block of given query gradients ``G`` (block -> ``[*lead, Q, d_out, d_in']``), at
    the matmul precision ``precision``."""
    context = curvature_context(curv)
    return query_gradients_of(
        {
            k: prepare_layer(
                g, curv.strategy, None if context is None else context[k], damping_value, rank, dtype, svd, precision
            )
            for k, g in G.items()
        },
        loss,
    )


def query_context(qg: QueryGradients) -> dict[str, dict[str, Array]]:
    """Per block, the slice of the query gradients that :func:`block_scores` takes: ``{"full"}`` or ``{"left", "right"}``."""
    out = {k: {"full": v} for k, v in qg.full.items()}
    out.update({k: {"left": v, "right": qg.right[k]} for k, v in qg.left.items()})
    return out


FLOPS_PER_BYTE = 16
"""The device balance assumed by :func:`contraction_order`: FLOPs a device does in the time it moves one byte of
memory (about 16 for a CPU host, more for accelerators' f32 and far more for their bf16 matrix units)."""


def contraction_costs(B: int, T: int, Q: int, d_out: int, d_in: int, rank: int | None) -> tuple[float, float]:
    """``(tokens, documents)``: the cost of scoring one ``[B, T]`` batch of one layer in each order of
    ``sum_t g^T P a``.

    The cost is ``FLOPs + FLOPS_PER_BYTE * bytes`` (a roofline: the documents order
    moves parameter-sized matrices through memory; the tokens order's intermediates
    are ``[Q, B, T, r]``, small next to its FLOPs). With 4-byte elements:

    tokens:    rank-r factors against every token, ``2 B T Q r (d_out + d_in)``;
               with a full ``P``, ``2 B T Q d_out d_in``.
    documents: one gradient per document then a dot with each ``P``,
               ``2 B T d_out d_in + 2 B Q d_out d_in`` FLOPs, ``4 (2 B + Q) d_out d_in`` bytes
               (each gradient written and read, each ``P`` read); with rank r, ``P`` is rebuilt
               first: ``2 Q r d_out d_in`` FLOPs and ``4 Q d_out d_in`` more bytes.

    Bytes count beside FLOPs because FLOPs alone choose the slower order on a CPU (docs/benchmarks.md,
    "Measurements behind code decisions").
    """
    size = d_out * d_in
    docs = 2 * B * T * size + 2 * B * Q * size + FLOPS_PER_BYTE * 4 * (2 * B + Q) * size
    if rank is None:
        tokens = 2 * B * T * Q * size
    else:
        tokens = 2 * B * T * Q * rank * (d_out + d_in)
        docs += 2 * Q * rank * size + FLOPS_PER_BYTE * 4 * Q * size
    return float(tokens), float(docs)


def contraction_order(B: int, T: int, Q: int, d_out: int, d_in: int, rank: int | None) -> str:
    """``"tokens"`` or ``"documents"``: the cheaper order of :func:`contraction_costs` for one layer."""
    tokens, docs = contraction_costs(B, T, Q, d_out, d_in, rank)
    return "tokens" if tokens <= docs else "documents"


def per_token_in_pass(
    layers: Mapping[str, LayerSpec], queries: QueryGradients, B: int, T: int, documents: int, topk: int
) -> bool:
    """Whether the scoring pass of ``documents`` documents in ``[B, T]`` batches should form per-token scores for
    the exports (all blocks in the tokens order, whose per-token scores are the terms of the sum over ``t``) rather
    than leave them to a second pass over each query's ``topk`` documents.

    Summed over blocks (times their stacked layers ``n``), with :func:`contraction_costs`' ``tokens`` and ``docs``
    for a batch:

        in the pass:  (documents / B) n max(0, tokens - docs)             (the tokens order where it is dearer)
        second pass:  min(Q topk, documents) n (6 T d_out d_in + tokens / B)

    the second pass counted at its least: each document's forward and backward matmuls of the tracked layers
    (``6 T d_out d_in``) and its tokens-order scores. The pass forms them when its cost is the smaller."""
    extra = second = 0.0
    Q = 0
    for k, s in layers.items():
        lowr = k in queries.left
        q = queries.left[k] if lowr else queries.full[k]
        Q, n = q.shape[-3], len(s.layer_names) or 1
        tokens, docs = contraction_costs(B, T, Q, s.d_out, s.d_in_aug, q.shape[-1] if lowr else None)
        extra += documents / B * n * max(0.0, tokens - docs)
        second += n * (6 * T * s.d_out * s.d_in_aug + tokens / B)
    return extra <= min(Q * topk, documents) * second


def _token_scores(a: Array, g: Array, q: Mapping[str, Array], per_token: bool, precision=None) -> Array:
    """The tokens order of :func:`block_scores`: ``g[n,t]^T P a[n,t]`` per token, then summed over t unless
    ``per_token``: ``[Q, B]`` or ``[Q, B, T]``.

    Every token of the batch is one row of a ``[B T, d]`` matrix: XLA's CPU backend multiplies the query factors
    with the merged rows much faster than with the batch and token axes of a 4-D einsum (the scores row of
    ``scripts/bench_engine.py``, before and after, in docs/benchmarks.md: 1.43x to 0.89x of a forward+backward
    step)."""
    einsum = functools.partial(jnp.einsum, precision=matmul_precision(precision))
    lead = a.shape[:-1]  # [B, T]
    a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    if "left" in q:
        gl = einsum("no,qor->nqr", g2, q["left"].astype(g.dtype))
        ar = einsum("ni,qir->nqr", a2, q["right"].astype(a.dtype))
        per_tok = jnp.sum(gl * ar, axis=-1)
    else:
        Pa = einsum("ni,qoi->nqo", a2, q["full"].astype(a.dtype))
        per_tok = einsum("nqo,no->nq", Pa, g2)
    per_tok = per_tok.reshape(lead + per_tok.shape[-1:])  # [B, T, Q]
    return jnp.moveaxis(per_tok if per_token else per_tok.sum(-2), -1, 0)


def block_scores(
    a: Array,
    g: Array,
    q: Mapping[str, Array],
    *,
    per_token: bool = False,
    order: str | None = None,
    dtype=None,
    precision=None,
) -> Array:
    """One layer's ``sum_t g[n,t]^T P(G_q) a[n,t]``: ``[Q, B]`` (``[Q, B, T]`` per token), in the statistics dtype
    ``dtype`` (by default :func:`~jaxinf.engine.precision.working_dtype` of ``a``, ``g`` and ``q``).

    ``q``: the layer's ``{"full": [Q, d_out, d_in']}`` or ``{"left": [Q, d_out, r], "right": [Q, d_in', r]}``
    (``P(G_q) ~= left @ right^T``); the contraction order is :func:`contraction_order`'s unless given. Products at
    the matmul precision ``precision`` (``run.matmul_precision``).
    """
    dtype = working_dtype(a, g, *q.values()) if dtype is None else dtype
    a, g = a.astype(dtype), g.astype(dtype)
    B, T = a.shape[-3], a.shape[-2]
    d_out, d_in = g.shape[-1], a.shape[-1]
    lowr = "left" in q
    Q = (q["left"] if lowr else q["full"]).shape[0]
    rank = q["left"].shape[-1] if lowr else None
    if per_token:
        order = "tokens"
    elif order is None:
        order = contraction_order(B, T, Q, d_out, d_in, rank)
    if order == "tokens":
        return _token_scores(a, g, q, per_token, precision)
    einsum = functools.partial(jnp.einsum, precision=matmul_precision(precision))
    P = q["full"] if not lowr else einsum("qor,qir->qoi", q["left"], q["right"])
    G = per_sequence_gradient(a, g, precision)
    return einsum("qoi,boi->qb", P.astype(G.dtype), G)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scores:
    """Scores of one document batch: ``total`` ``[Q, B]``; optionally ``per_layer`` (block -> ``[*lead, Q, B]``),
    ``per_token`` ``[Q, B, T]`` (both breakdowns sum to ``total``) and ``self`` (self-influence ``[B]``)."""

    total: Array
    per_layer: dict[str, Array] | None = None
    per_token: Array | None = None
    self: Array | None = None


def _sum(arrays: Iterable[Array]) -> Array:
    """``sum(arrays)`` of one or more blocks' arrays (there is always a tracked block; ``sum`` of none would be 0)."""
    return cast(Array, sum(arrays))


def collect_scores(
    blocks: Mapping[str, Array],
    *,
    per_layer: bool = False,
    per_token: bool = False,
    self_blocks: Mapping[str, Array] | None = None,
) -> Scores:
    """:class:`Scores` from per-block :func:`block_scores` (``[*lead, Q, B(, T)]``) and self-influence (``[*lead, B]``,
    :meth:`~jaxinf.engine.curvature.Strategy.self_score`)."""
    self_total = None if self_blocks is None else _sum(sum_layers(v, 1) for v in self_blocks.values())
    if per_token:
        tok = _sum(sum_layers(v, 3) for v in blocks.values())
        return Scores(
            total=tok.sum(-1),
            per_layer={k: v.sum(-1) for k, v in blocks.items()} if per_layer else None,
            per_token=tok,
            self=self_total,
        )
    total = _sum(sum_layers(v, 2) for v in blocks.values())
    return Scores(total=total, per_layer=dict(blocks) if per_layer else None, self=self_total)


def sum_layers(x: Array, trailing: int) -> Array:
    """Sums the layer axes of a stacked block's array, keeping the ``trailing`` axes."""
    lead = x.ndim - trailing
    return x.sum(axis=tuple(range(lead))) if lead else x


_Scores = TypeVar("_Scores", Array, np.ndarray)


def normalize(scores: _Scores, query_loss: Array | np.ndarray, how: str) -> _Scores:
    """``none``: raw scores; ``per_nat``: each query's row divided by its completion NLL."""
    if how == "none":
        return scores
    if how == "per_nat":
        return scores / query_loss[:, None]
    raise ValueError(f"scores.normalize: unknown normalization {how!r} (choose from {', '.join(NORMALIZATIONS)})")


def expand_layer_scores(per_layer: Mapping[str, Array], layers: Mapping[str, LayerSpec]) -> dict[str, Array]:
    """Per-layer score entries (``layers.3.mlp.up_proj`` -> ``[Q, B]``) from per-block arrays."""
    return expand(per_layer, layers, axis=0)


def stacked_layer_scores(per_layer: Mapping[str, Array], layers: Mapping[str, LayerSpec]) -> Array:
    """Per-layer scores ``[L, Q, B]`` from per-block arrays, layers in :func:`layer_order`."""
    expanded = expand_layer_scores(per_layer, layers)
    return jnp.stack([expanded[n] for n in layer_order(layers)])


def layer_order(layers: Mapping[str, LayerSpec]) -> list[str]:
    """Per-layer names in model order: by layer index, blocks in call order within a layer, unstacked layers last."""
    stacked: list[tuple[int, int, str]] = []  # (layer index, position, name)
    rest: list[tuple[int, int, str]] = []
    for position, spec in enumerate(layers.values()):
        for i, name in zip(spec.layer_indices or (None,), spec.layer_names):
            (stacked if i is not None else rest).append((i if i is not None else 0, position, name))
    return [n for _, _, n in sorted(stacked)] + [n for _, _, n in rest]
