"""What the loss and the measurement are.

A :class:`Task` gives the engine two loss functions in the form of
:mod:`jaxinf.capture` (per-token losses ``[B, T]``, tracked layers routed through a tap):

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

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.capture import Probes, Tap
from jaxinf.partitioning import constrain

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
    C = jnp.cumsum(p.sum(-1), axis=-1)                                       # [..., chunks]
    u = jax.random.uniform(key, C.shape[:-1] + (1,), C.dtype) * C[..., -1:]
    j = jnp.minimum(jnp.sum(C <= u, axis=-1), chunks - 1)                    # [...]
    before = jnp.where(j > 0, jnp.take_along_axis(C, jnp.maximum(j - 1, 0)[..., None], axis=-1)[..., 0], 0.0)
    f = jnp.cumsum(jnp.take_along_axis(p, j[..., None, None], axis=-2)[..., 0, :], axis=-1)   # [..., width]
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


# --------------------------------------------------------------------------- a small MLP task


def mlp_init(key: Array, sizes: tuple[int, ...], dtype=jnp.float32) -> Params:
    """Parameters of an MLP with layers ``fc0, fc1, ...`` (kernel ``[d_in, d_out]`` and bias)."""
    params = {}
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, k = jax.random.split(key)
        params[f"fc{i}"] = {
            "kernel": (jax.random.normal(k, (d_in, d_out)) / math.sqrt(d_in)).astype(dtype),
            "bias": jnp.full((d_out,), 0.01 * (i + 1), dtype),
        }
    return params


def mlp_apply(params: Params, x: Array, tap: Tap) -> Array:
    """``tanh`` MLP on inputs ``[B, 1, d]`` (one "token" per example)."""
    n = len(params)
    for i in range(n):
        layer = params[f"fc{i}"]
        x = tap.linear(f"fc{i}", x, layer["kernel"], layer["bias"])
        if i < n - 1:
            x = jnp.tanh(x)
    return x


def mlp_task(kind: str = "classification") -> Task:
    """An MLP for classification (labels ``y`` ``[B, 1]`` int) or regression (targets ``y`` ``[B, 1, d]``).

    Loss per example: cross-entropy, or ``0.5 ||y - f(x)||^2`` (the NLL of a
    unit-variance Gaussian, whose sampled labels are ``f(x) + N(0, I)``). The
    measurement is the same loss on the query's own label.
    """
    if kind not in ("classification", "regression"):
        raise ValueError(f"unknown MLP task kind {kind!r}")

    def train_loss(params, batch, probes, key=None):
        tap = Tap(probes)
        out = mlp_apply(params, batch["x"], tap)
        if kind == "classification":
            y = batch["y"] if key is None else sample_labels(key, out)
            loss = token_nll(out, y)
        else:
            y = batch["y"]
            if key is not None:
                y = jax.lax.stop_gradient(out) + jax.random.normal(key, out.shape, out.dtype)
            loss = 0.5 * jnp.sum((y - out) ** 2, axis=-1)
        return loss * batch["mask"]

    def measurement(params, batch, probes):
        return train_loss(params, batch, probes, None)

    return Task(train_loss=train_loss, measurement=measurement)


# --------------------------------------------------------------------------- a tiny causal transformer


def tiny_lm_init(
    key: Array,
    *,
    vocab: int = 32,
    d_model: int = 16,
    n_layers: int = 2,
    n_heads: int = 2,
    d_ff: int = 32,
    max_len: int = 64,
    dtype=jnp.float32,
) -> Params:
    """Parameters of a pre-LayerNorm GPT whose layers are stacked for ``lax.scan``."""
    ks = iter(jax.random.split(key, 16))

    def dense(k, d_in, d_out, lead=(n_layers,)):
        return {
            "kernel": (jax.random.normal(k, lead + (d_in, d_out)) / math.sqrt(d_in)).astype(dtype),
            "bias": (0.02 * jax.random.normal(next(ks), lead + (d_out,))).astype(dtype),
        }

    def norm(lead=(n_layers,)):
        return {"scale": jnp.ones(lead + (d_model,), dtype), "bias": jnp.zeros(lead + (d_model,), dtype)}

    return {
        "embed": (0.5 * jax.random.normal(next(ks), (vocab, d_model))).astype(dtype),
        "pos": (0.1 * jax.random.normal(next(ks), (max_len, d_model))).astype(dtype),
        "layers": {
            "ln1": norm(),
            "attn": {
                "q_proj": dense(next(ks), d_model, d_model),
                "k_proj": dense(next(ks), d_model, d_model),
                "v_proj": dense(next(ks), d_model, d_model),
                "o_proj": dense(next(ks), d_model, d_model),
            },
            "ln2": norm(),
            "mlp": {"fc_in": dense(next(ks), d_model, d_ff), "fc_out": dense(next(ks), d_ff, d_model)},
        },
        "ln_f": norm(()),
        "lm_head": {"kernel": (jax.random.normal(next(ks), (d_model, vocab)) / math.sqrt(d_model)).astype(dtype)},
    }


def _layer_norm(x: Array, p: Params, eps: float = 1e-5) -> Array:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def tiny_lm_block(h: Array, p: Params, attend: Array, tap: Tap, n_heads: int) -> Array:
    """One pre-LN block: causal self-attention (``attn.{q,k,v,o}_proj``) then a GELU MLP (``mlp.fc_in/fc_out``)."""
    B, T = h.shape[:2]

    def proj(name, x):
        group, layer = name.split(".")
        return tap.linear(name, x, p[group][layer]["kernel"], p[group][layer]["bias"])

    x = _layer_norm(h, p["ln1"])
    q, k, v = (proj(f"attn.{n}_proj", x) for n in "qkv")
    d = q.shape[-1] // n_heads
    q, k, v = (z.reshape(B, T, n_heads, d) for z in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    logits = jnp.where(attend, logits, jnp.finfo(logits.dtype).min)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(B, T, -1)
    h = h + proj("attn.o_proj", o)
    x = jax.nn.gelu(proj("mlp.fc_in", _layer_norm(h, p["ln2"])))
    return h + proj("mlp.fc_out", x)


def tiny_lm_apply(params: Params, tokens: Array, mask: Array, tap: Tap, *, n_heads: int = 2,
                  unroll: bool = False) -> Array:
    """Logits ``[B, T, vocab]`` of the tiny GPT; every projection and ``lm_head`` is a tracked layer.

    Layers run under ``tap.scan("layers", ...)`` (blocks ``layers.*.mlp.fc_in``, ...), or with
    ``unroll`` one by one as separately named layers (``layers.0.mlp.fc_in``, ...).
    """
    T = tokens.shape[1]
    h = params["embed"][tokens] + params["pos"][:T]
    attend = jnp.tril(jnp.ones((T, T), bool))[None, None] & (mask[:, None, None, :] > 0)
    block = lambda h, p, t: tiny_lm_block(h, p, attend, t, n_heads)
    if unroll:
        for i in range(params["layers"]["ln1"]["scale"].shape[0]):
            h = block(h, jax.tree.map(lambda x: x[i], params["layers"]), _Prefixed(tap, f"layers.{i}."))
    else:
        h = tap.scan("layers", block, h, params["layers"])
    h = _layer_norm(h, params["ln_f"])
    return tap.linear("lm_head", h, params["lm_head"]["kernel"])


class _Prefixed:
    """A view of a tap that prefixes layer names (for the unrolled tiny GPT)."""

    def __init__(self, tap: Tap, prefix: str):
        self.tap, self.prefix = tap, prefix

    def linear(self, name, x, kernel, bias=None):
        return self.tap.linear(self.prefix + name, x, kernel, bias)


def tiny_lm_task(n_heads: int = 2, unroll: bool = False) -> Task:
    """The causal-LM task on the tiny GPT."""
    return causal_lm_task(lambda p, tokens, mask, tap: tiny_lm_apply(p, tokens, mask, tap, n_heads=n_heads,
                                                                     unroll=unroll))


def lm_batch(sequences: list[list[int]], length: int | None = None, prompt_lengths: list[int] | None = None) -> Batch:
    """A right-padded causal-LM batch from token lists.

    Without ``prompt_lengths`` every token but the first is a target (a document);
    with them only the tokens after each prompt are (a query's completion).
    """
    T = length or max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), T), np.int32)   # filled on the host: one transfer, no program per length
    mask = np.zeros((len(sequences), T), np.float32)
    weights = np.zeros((len(sequences), T), np.float32)
    for i, s in enumerate(sequences):
        if len(s) > T:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than the batch length {T}")
        start = 1 if prompt_lengths is None else prompt_lengths[i]
        tokens[i, : len(s)] = s
        mask[i, : len(s)] = 1.0
        weights[i, start : len(s)] = 1.0
    tokens, mask, weights = jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(weights)
    return {"tokens": tokens, "mask": mask, "weights": weights}
