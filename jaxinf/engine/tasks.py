"""What the loss and the measurement are.

A :class:`Task` gives the engine two loss functions in the form of
:mod:`jaxinf.engine.capture` (per-token losses ``[B, T]``, tracked layers routed through a tap):

- ``train_loss(params, batch, probes, key)``: the loss of a training document,
  summed over its tokens. With a PRNG ``key`` the labels are *sampled from the
  model's own predictive distribution* (true Fisher, the default for fitting
  curvature); with ``key=None`` the data's labels are used (empirical Fisher,
  and always for scoring documents).
- ``measurement(params, batch, probes)``: the quantity whose change influence
  measures, for a query (for the causal-LM task: the summed NLL of the
  completion tokens).

Every batch is a dict with at least ``mask`` ``[B, T]``: 1 for the tokens that
count (their inputs enter ``A``), 0 for padding.

The causal-LM batch (``tokens``, ``mask``, ``weights``) is what the data layer
produces for documents and queries alike:

- ``tokens`` ``[B, T]`` int32, right-padded;
- ``mask`` ``[B, T]``: 1 at real tokens;
- ``weights`` ``[B, T]``: 1 where token t is a *target* whose NLL counts
  (documents: every real token but the first; queries: the completion tokens).

The loss at position t predicts token t+1, so ``token_losses[n, t] =
weights[n, t+1] * -log p(tokens[n, t+1] | tokens[n, :t+1])`` and the last
position carries no loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.engine.capture import Probes, Tap
from jaxinf.sharding.partitioning import constrain

Array = jax.Array
Params = Any
Batch = dict[str, Array]


class Task(NamedTuple):
    """A task's two loss functions; see the module docstring."""

    train_loss: Callable[[Params, Batch, Probes | None, Array | None], Array]
    measurement: Callable[[Params, Batch, Probes | None], Array]


# --------------------------------------------------------------------------- losses


SAMPLING_CHUNKS = 512
"""Chunks of the vocabulary in :func:`sample_labels`: 512 divides the vocabulary splits of meshes up to 512 wide."""


def sample_labels(key: Array, logits: Array) -> Array:
    """Labels drawn from the model's predictive distribution ``softmax(logits)`` (no gradient flows).

    Inverse-CDF sampling: with ``F`` the cumulative sum of ``p = softmax(logits)``
    over the vocabulary and one ``u ~ U[0, F_V)`` per position, the label is
    ``y = #{k : F_k <= u}``, so ``P(y = k) = F_k - F_{k-1} = p_k``. One random
    number per position instead of one per vocabulary entry (Gumbel-max, as in
    ``jax.random.categorical``), which on the CPU cost more than the rest of the
    sampling pass's extra work.

    ``F`` is never formed over the whole vocabulary: the vocabulary is cut into
    :data:`SAMPLING_CHUNKS` chunks of ``W`` entries (zero-padded), the chunk
    ``j = #{c : C_c <= u}`` is found from the cumulative chunk totals ``C``, and the
    label is ``j W + #{i : f_i <= u - C_(j-1)}`` with ``f`` the cumulative sum within
    chunk ``j`` alone: the same ``y`` (up to the order of the float additions), with
    ``[.., chunks]`` and ``[.., W]`` arrays instead of a vocabulary-wide cumulative sum,
    which a mesh that splits the vocabulary would have to gather onto every device
    (3.5 GiB per device for one 2048-token document of a 256k vocabulary).
    """
    logits = jax.lax.stop_gradient(logits)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    V = logits.shape[-1]
    width = -(-V // SAMPLING_CHUNKS)
    chunks = -(-V // width)
    p = jax.nn.softmax(logits, axis=-1)
    p = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, chunks * width - V)]).reshape(p.shape[:-1] + (chunks, width))
    C = jnp.cumsum(p.sum(-1), axis=-1)  # [..., chunks]
    u = jax.random.uniform(key, C.shape[:-1] + (1,), C.dtype) * C[..., -1:]
    j = jnp.minimum(jnp.sum(C <= u, axis=-1), chunks - 1)  # [...]
    before = jnp.where(j > 0, jnp.take_along_axis(C, jnp.maximum(j - 1, 0)[..., None], axis=-1)[..., 0], 0.0)
    f = jnp.cumsum(jnp.take_along_axis(p, j[..., None, None], axis=-2)[..., 0, :], axis=-1)  # [..., width]
    y = j * width + jnp.sum(f <= (u[..., 0] - before)[..., None], axis=-1)
    return jnp.minimum(y, V - 1)


def token_nll(logits: Array, labels: Array) -> Array:
    """``-log softmax(logits)[label]`` per position, computed in float32 at least."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return logz - picked


def next_token_losses(logits: Array, batch: Batch, key: Array | None) -> Array:
    """``weights[n, t+1] * -log p(target | logits[n, t])`` with a zero last position: ``[B, T]``.

    The target is the next data token, or with ``key`` a label sampled from the model. On a mesh the
    logits stay split over the vocabulary (``model`` axis): at 2048 tokens and a 256k vocabulary one
    document's float32 logits alone are 2 GiB.
    """
    logits = constrain(logits, ("batch", "tokens", "vocab"))
    targets = batch["tokens"][:, 1:]
    pred = logits[:, :-1]
    if key is not None:
        targets = sample_labels(key, pred)
    losses = token_nll(pred, targets) * batch["weights"][:, 1:].astype(jnp.float32)
    return jnp.pad(losses, ((0, 0), (0, 1)))


def causal_lm_task(apply: Callable[[Params, Array, Array, Tap], Array]) -> Task:
    """The causal-LM task of Ruis et al. around a model ``apply(params, tokens, mask, tap) -> logits``.

    Documents: summed next-token NLL over the targets (sampled for the true
    Fisher). Queries: summed NLL of the completion tokens (``weights`` marks them).
    """

    def train_loss(params, batch, probes, key=None):
        tap = Tap(probes)
        logits = apply(params, batch["tokens"], batch["mask"], tap)
        return next_token_losses(logits, batch, key)

    def measurement(params, batch, probes):
        return train_loss(params, batch, probes, None)

    return Task(train_loss=train_loss, measurement=measurement)


def lm_batch(sequences: list[list[int]], length: int | None = None, prompt_lengths: list[int] | None = None) -> Batch:
    """A right-padded causal-LM batch from token lists.

    Without ``prompt_lengths`` every token but the first is a target (a document);
    with them only the tokens after each prompt are (a query's completion).
    """
    T = length or max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), T), np.int32)  # filled on the host: one transfer, no program per length
    mask = np.zeros((len(sequences), T), np.float32)
    weights = np.zeros((len(sequences), T), np.float32)
    for i, s in enumerate(sequences):
        if len(s) > T:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than the batch length {T}")
        start = 1 if prompt_lengths is None else prompt_lengths[i]
        tokens[i, : len(s)] = s
        mask[i, : len(s)] = 1.0
        weights[i, start : len(s)] = 1.0
    return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask), "weights": jnp.asarray(weights)}
