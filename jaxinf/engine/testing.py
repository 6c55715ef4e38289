"""A tiny causal transformer for the tests, the benchmark scripts and the README's example.

A pre-LayerNorm GPT (learned positions, GELU MLP) whose layers are stacked for
``lax.scan``: small enough to fit curvature on a CPU in seconds, with every
projection a tracked layer. Nothing in the engine uses it; real models come
from :mod:`jaxinf.models`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxinf.engine.capture import Tap
from jaxinf.engine.tasks import Params, Task, causal_lm_task

Array = jax.Array


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
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``."""
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


def tiny_lm_apply(
    params: Params, tokens: Array, mask: Array, tap: Tap, *, n_heads: int = 2, unroll: bool = False
) -> Array:
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
    return causal_lm_task(
        lambda p, tokens, mask, tap: tiny_lm_apply(p, tokens, mask, tap, n_heads=n_heads, unroll=unroll)
    )
