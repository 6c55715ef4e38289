"""The attention and MLP modules that the families' blocks are made of.

Each module takes the per-layer :class:`Context` (rotary tables and attention
mask of the layer's kind) and calls every linear layer through the tap under
its Hugging Face name relative to the block (``self_attn.q_proj``,
``mlp.up_proj``), so the engine tracks it as ``{backbone}.{layers}.{i}.<name>``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinf.engine.capture import Tap
from jaxinf.models.config import ModelConfig
from jaxinf.models.layers import COLUMN, ROUTER, ROW, Linear, activation, apply_rotary, attention

Array = jax.Array


class Context(NamedTuple):
    """What one layer of a forward pass reads besides its input: its kind's rotary tables and attention mask."""

    cos: Array
    sin: Array
    allowed: Array


def attend(q: Array, k: Array, v: Array, ctx: Context, config: ModelConfig, interleaved: bool = False) -> Array:
    """Rotary embedding of ``q`` and ``k`` (halves, or ``interleaved`` pairs), then :func:`~jaxinf.models.layers.attention`.

    The score scale is ``query_pre_attn_scalar ** -0.5`` when the config sets
    it (Gemma 2 and 3), else ``head_dim ** -0.5``; ``attn_softcap`` caps the scores.
    """
    q = apply_rotary(q, ctx.cos, ctx.sin, interleaved)
    k = apply_rotary(k, ctx.cos, ctx.sin, interleaved)
    c = config
    scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar**-0.5
    return attention(q, k, v, ctx.allowed, scale, c.attn_softcap)


def clip(x: Array, config: ModelConfig) -> Array:
    """``clamp(x, -clip_qkv, clip_qkv)`` when the config sets ``clip_qkv`` (OLMo), else ``x``."""
    return x if config.clip_qkv is None else jnp.clip(x, -config.clip_qkv, config.clip_qkv)


class SelfAttention(nnx.Module):
    """Grouped-query attention with separate ``q/k/v/o_proj`` (and q/k norms where the family has them).

    ``q = x Wq (+ bq)`` as ``[B, T, heads, head_dim]``, ``k, v`` with
    ``num_kv_heads``. ``q_norm``/``k_norm`` (modules built by the family)
    normalize q and k before the rotary embedding: per head (``flat=False``:
    Cohere, Qwen3, Gemma 3) or over the whole projection before it is split into
    heads (``flat=True``: OLMo 2, OLMoE); q, k and v are then clipped by :func:`clip`
    (OLMo, OLMoE: after the whole-projection norm, as OLMoE does).
    ``qkv_bias``/``o_bias`` default to ``config.attention_bias``.
    """

    def __init__(
        self,
        config: ModelConfig,
        rngs: nnx.Rngs,
        *,
        qkv_bias: bool | None = None,
        o_bias: bool | None = None,
        q_norm: nnx.Module | None = None,
        k_norm: nnx.Module | None = None,
        flat: bool = False,
        interleaved: bool = False,
        o_name: str = "o_proj",
    ):
        c = config
        H, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        qkv_bias = c.attention_bias if qkv_bias is None else qkv_bias
        o_bias = c.attention_bias if o_bias is None else o_bias
        self.config, self.flat, self.interleaved = c, flat, interleaved
        self.q_proj = Linear("self_attn.q_proj", H, q, bias=qkv_bias, axes=COLUMN, config=c, rngs=rngs)
        self.k_proj = Linear("self_attn.k_proj", H, kv, bias=qkv_bias, axes=COLUMN, config=c, rngs=rngs)
        self.v_proj = Linear("self_attn.v_proj", H, kv, bias=qkv_bias, axes=COLUMN, config=c, rngs=rngs)
        setattr(self, o_name, Linear(f"self_attn.{o_name}", q, H, bias=o_bias, axes=ROW, config=c, rngs=rngs))
        self.o_name = o_name
        self.q_norm, self.k_norm = q_norm, k_norm

    def __call__(self, x: Array, ctx: Context, tap: Tap, prefix: str) -> Array:
        c = self.config
        B, T, _ = x.shape
        q, k = self.q_proj(x, tap, prefix), self.k_proj(x, tap, prefix)
        if self.flat and self.q_norm is not None and self.k_norm is not None:  # both or neither
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = clip(q, c), clip(k, c), clip(self.v_proj(x, tap, prefix), c)
        q = q.reshape(B, T, c.num_heads, c.head_dim)
        k = k.reshape(B, T, c.num_kv_heads, c.head_dim)
        v = v.reshape(B, T, c.num_kv_heads, c.head_dim)
        if not self.flat and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return getattr(self, self.o_name)(attend(q, k, v, ctx, c, self.interleaved), tap, prefix)


class FusedAttention(nnx.Module):
    """Attention with one fused input projection whose output is ``[q | k | v]`` (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``).

    ``q`` is the first ``heads * head_dim`` features, ``k`` and ``v`` the next
    ``num_kv_heads * head_dim`` each; ``out`` projects the heads back. The
    fused projection is tracked as stored.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, *, names: tuple[str, str], bias: bool, prefix: str):
        c = config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.config, self.names = c, names
        setattr(
            self,
            names[0],
            Linear(f"{prefix}.{names[0]}", c.hidden_size, q + 2 * kv, bias=bias, axes=COLUMN, config=c, rngs=rngs),
        )
        setattr(
            self, names[1], Linear(f"{prefix}.{names[1]}", q, c.hidden_size, bias=bias, axes=ROW, config=c, rngs=rngs)
        )

    def __call__(self, x: Array, ctx: Context, tap: Tap, prefix: str) -> Array:
        c = self.config
        B, T, _ = x.shape
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        qkv = getattr(self, self.names[0])(x, tap, prefix)
        q = qkv[..., :q_size].reshape(B, T, c.num_heads, c.head_dim)
        k = qkv[..., q_size : q_size + kv_size].reshape(B, T, c.num_kv_heads, c.head_dim)
        v = qkv[..., q_size + kv_size :].reshape(B, T, c.num_kv_heads, c.head_dim)
        return getattr(self, self.names[1])(attend(q, k, v, ctx, c), tap, prefix)


class GatedMLP(nnx.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` (Llama and most families)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, bias: bool | None = None):
        H, I = config.hidden_size, config.intermediate_size
        b = config.mlp_bias if bias is None else bias
        self.act = config.activation
        self.gate_proj = Linear("mlp.gate_proj", H, I, bias=b, axes=COLUMN, config=config, rngs=rngs)
        self.up_proj = Linear("mlp.up_proj", H, I, bias=b, axes=COLUMN, config=config, rngs=rngs)
        self.down_proj = Linear("mlp.down_proj", I, H, bias=b, axes=ROW, config=config, rngs=rngs)

    def __call__(self, x: Array, tap: Tap, prefix: str) -> Array:
        gated = activation(self.act, self.gate_proj(x, tap, prefix)) * self.up_proj(x, tap, prefix)
        return self.down_proj(gated, tap, prefix)


class FusedGatedMLP(nnx.Module):
    """``down_proj(act(g) * u)`` with ``[g | u] = gate_up_proj(x)`` (Phi-3; the fused projection is tracked as stored)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        H, I = config.hidden_size, config.intermediate_size
        self.act = config.activation
        self.gate_up_proj = Linear("mlp.gate_up_proj", H, 2 * I, bias=False, axes=COLUMN, config=config, rngs=rngs)
        self.down_proj = Linear("mlp.down_proj", I, H, bias=False, axes=ROW, config=config, rngs=rngs)

    def __call__(self, x: Array, tap: Tap, prefix: str) -> Array:
        gate, up = jnp.split(self.gate_up_proj(x, tap, prefix), 2, axis=-1)
        return self.down_proj(activation(self.act, gate) * up, tap, prefix)


class PlainMLP(nnx.Module):
    """``names[1](act(names[0](x)))``: GPT-NeoX ``dense_h_to_4h``/``dense_4h_to_h``, GPT-2 ``c_fc``/``c_proj``."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, names: tuple[str, str], bias: bool = True):
        H, I = config.hidden_size, config.intermediate_size
        self.act, self.names = config.activation, names
        setattr(self, names[0], Linear(f"mlp.{names[0]}", H, I, bias=bias, axes=COLUMN, config=config, rngs=rngs))
        setattr(self, names[1], Linear(f"mlp.{names[1]}", I, H, bias=bias, axes=ROW, config=config, rngs=rngs))

    def __call__(self, x: Array, tap: Tap, prefix: str) -> Array:
        up, down = (getattr(self, n) for n in self.names)
        return down(activation(self.act, up(x, tap, prefix)), tap, prefix)


# --------------------------------------------------------------------------- blocks


class PreNormBlock(nnx.Module):
    """``h += attn(norm1(h)); h += mlp(norm2(h))`` under the family's attribute names.

    ``names``: (first norm, attention, second norm, MLP); Llama's are
    ``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``.
    """

    def __init__(
        self,
        norm1: nnx.Module,
        attn: nnx.Module,
        norm2: nnx.Module,
        mlp: nnx.Module,
        names: tuple[str, str, str, str] = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
    ):
        self.names = names
        for name, module in zip(names, (norm1, attn, norm2, mlp)):
            setattr(self, name, module)

    def __call__(self, h: Array, ctx: Context, tap: Tap, prefix: str) -> Array:
        norm1, attn, norm2, mlp = (getattr(self, n) for n in self.names)
        h = h + attn(norm1(h), ctx, tap, prefix)
        return h + mlp(norm2(h), tap, prefix)


class SandwichBlock(nnx.Module):
    """``h += post_attention_layernorm(attn(input_layernorm(h)))``, then
    ``h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`` (Gemma 2 and 3)."""

    def __init__(self, norm: Callable[[], nnx.Module], attn: nnx.Module, mlp: nnx.Module):
        self.input_layernorm = norm()
        self.self_attn = attn
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = mlp
        self.post_feedforward_layernorm = norm()

    def __call__(self, h: Array, ctx: Context, tap: Tap, prefix: str) -> Array:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), ctx, tap, prefix))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h), tap, prefix))


class PostNormBlock(nnx.Module):
    """``h += post_attention_layernorm(attn(h)); h += post_feedforward_layernorm(mlp(h))`` (OLMo 2 and 3)."""

    def __init__(self, norm: Callable[[], nnx.Module], attn: nnx.Module, mlp: nnx.Module):
        self.self_attn = attn
        self.post_attention_layernorm = norm()
        self.mlp = mlp
        self.post_feedforward_layernorm = norm()

    def __call__(self, h: Array, ctx: Context, tap: Tap, prefix: str) -> Array:
        h = h + self.post_attention_layernorm(self.self_attn(h, ctx, tap, prefix))
        return h + self.post_feedforward_layernorm(self.mlp(h, tap, prefix))


class ParallelBlock(nnx.Module):
    """``x = input_layernorm(h); h += attn(x) + mlp(x)`` (Cohere, Cohere2, StableLM with a parallel residual)."""

    def __init__(self, norm: nnx.Module, attn: nnx.Module, mlp: nnx.Module):
        self.input_layernorm = norm
        self.self_attn = attn
        self.mlp = mlp

    def __call__(self, h: Array, ctx: Context, tap: Tap, prefix: str) -> Array:
        x = self.input_layernorm(h)
        return h + self.self_attn(x, ctx, tap, prefix) + self.mlp(x, tap, prefix)


# --------------------------------------------------------------------------- mixture of experts


class Expert(nnx.Module):
    """One expert's gated MLP, tracked as ``mlp.experts.{index}.{gate,up,down}_proj``."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, index: int):
        H, I = config.hidden_size, config.intermediate_size
        self.act = config.activation
        name = f"mlp.experts.{index}"
        self.gate_proj = Linear(f"{name}.gate_proj", H, I, bias=False, axes=COLUMN, config=config, rngs=rngs)
        self.up_proj = Linear(f"{name}.up_proj", H, I, bias=False, axes=COLUMN, config=config, rngs=rngs)
        self.down_proj = Linear(f"{name}.down_proj", I, H, bias=False, axes=ROW, config=config, rngs=rngs)

    def __call__(self, x: Array, tap: Tap, prefix: str, tokens: Array | None = None) -> Array:
        """``tokens`` ``[B, T]``: the tokens routed to this expert, the tracked tokens of its three projections."""
        gated = activation(self.act, self.gate_proj(x, tap, prefix, tokens)) * self.up_proj(x, tap, prefix, tokens)
        return self.down_proj(gated, tap, prefix, tokens)


def route(logits: Array, k: int, renormalize: bool = True) -> tuple[Array, Array]:
    """Top-``k`` routing: ``(weights, routed)``, both ``[..., experts]``.

    ``p = softmax(logits)`` in at least float32; each token's ``k`` largest
    ``p`` (renormalized to sum to 1 when ``renormalize``: Mixtral, and Qwen3-MoE
    and OLMoE with ``norm_topk_prob``) are its weights (0 for the other experts);
    ``routed`` marks the ``k`` chosen experts.
    """
    probs = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    top, index = jax.lax.top_k(probs, k)
    if renormalize:
        top = top / top.sum(-1, keepdims=True)
    chosen = jax.nn.one_hot(index, logits.shape[-1], dtype=top.dtype)  # [..., k, experts]
    return jnp.einsum("...k,...ke->...e", top, chosen), chosen.sum(-2) > 0


class SparseMoE(nnx.Module):
    """A mixture of gated-MLP experts: ``y = sum_e w_e(x) expert_e(x)`` over each token's top-k experts.

    The router ``mlp.gate`` (a tracked layer too) gives the weights ``w`` of
    :func:`route`. Every expert is computed as a tracked layer on the whole
    batch with the tokens not routed to it zeroed at its input: with no biases
    its input ``a`` and its output gradient ``g`` are zero at those tokens, so
    the engine's sums for an expert (``A``, ``S``, ``Lambda``, per-document
    gradients) run over the tokens routed to it, and its output enters the
    residual multiplied by the router weight as in the model. The routed tokens
    are also passed to the tap as the expert's ``tokens``, so its counts are its
    own: ``A`` and ``S`` are divided by its routed-token count and ``Lambda`` by
    the number of sequences with a token routed to it. The function is
    the sparse model's exactly (each expert sees its own tokens); the cost is
    ``num_experts / experts_per_token`` times its MLP FLOPs.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        self.k, self.renormalize = c.experts_per_token, c.moe_renormalize
        self.gate = Linear("mlp.gate", c.hidden_size, c.num_experts, bias=False, axes=ROUTER, config=c, rngs=rngs)
        self.experts = nnx.List([Expert(c, rngs, e) for e in range(c.num_experts)])

    def __call__(self, x: Array, tap: Tap, prefix: str) -> Array:
        weights, routed = route(self.gate(x, tap, prefix), self.k, self.renormalize)
        out = jnp.zeros_like(x)
        for e, expert in enumerate(self.experts):
            y = expert(x * routed[..., e : e + 1].astype(x.dtype), tap, prefix, routed[..., e])
            out = out + (y * weights[..., e : e + 1]).astype(x.dtype)
        return out
