"""The decoder-only LMs as Flax NNX modules: Llama, GPT-NeoX (Pythia) and Cohere (Command R).

Module attributes carry the Hugging Face names, so the parameter tree reads
like the checkpoint (``model.layers.mlp.up_proj.kernel``) and every tracked
layer calls the tap under its Hugging Face module path:

- Llama / Cohere: ``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
  ``model.layers.{i}.mlp.{gate,up,down}_proj``, ``lm_head``;
- GPT-NeoX: ``gpt_neox.layers.{i}.attention.{query_key_value,dense}``,
  ``gpt_neox.layers.{i}.mlp.{dense_h_to_4h,dense_4h_to_h}``, ``lm_head``.

With ``config.scan`` the layers are one block whose parameters carry a leading
layer axis, run by :meth:`jaxinf.capture.Tap.scan` under ``{backbone}.layers``
(tracked names ``model.layers.*.mlp.up_proj``, one entry per layer index);
otherwise an ``nnx.List`` of blocks run in a Python loop. The output projection
is tracked as ``lm_head`` also when it is tied to the token embedding (as in
transformers, where ``lm_head`` is an ``nn.Linear`` sharing the embedding's weight).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinf.capture import Tap
from jaxinf.models.config import ModelConfig
from jaxinf.models.layers import (
    Embed,
    LayerNorm,
    Linear,
    RMSNorm,
    activation,
    apply_rotary,
    attention,
    attention_mask,
    rotary_tables,
)

Array = jax.Array


class Context(NamedTuple):
    """What every layer of one forward pass shares: rotary tables and the attention mask."""

    cos: Array
    sin: Array
    allowed: Array


# --------------------------------------------------------------------------- MLPs


class GatedMLP(nnx.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` (Llama, Cohere)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        H, I, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.act = config.activation
        self.gate_proj = Linear("mlp.gate_proj", H, I, bias=b, config=config, rngs=rngs)
        self.up_proj = Linear("mlp.up_proj", H, I, bias=b, config=config, rngs=rngs)
        self.down_proj = Linear("mlp.down_proj", I, H, bias=b, config=config, rngs=rngs)

    def __call__(self, x: Array, tap: Tap, prefix: str) -> Array:
        gated = activation(self.act, self.gate_proj(x, tap, prefix)) * self.up_proj(x, tap, prefix)
        return self.down_proj(gated, tap, prefix)


class NeoXMLP(nnx.Module):
    """``dense_4h_to_h(act(dense_h_to_4h(x)))`` (GPT-NeoX)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        H, I, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.act = config.activation
        self.dense_h_to_4h = Linear("mlp.dense_h_to_4h", H, I, bias=b, config=config, rngs=rngs)
        self.dense_4h_to_h = Linear("mlp.dense_4h_to_h", I, H, bias=b, config=config, rngs=rngs)

    def __call__(self, x: Array, tap: Tap, prefix: str) -> Array:
        return self.dense_4h_to_h(activation(self.act, self.dense_h_to_4h(x, tap, prefix)), tap, prefix)


# --------------------------------------------------------------------------- attention


class SelfAttention(nnx.Module):
    """Grouped-query attention with separate ``q/k/v/o_proj`` (Llama, Cohere).

    ``q = x Wq`` as ``[B, T, heads, head_dim]``, ``k, v`` with ``num_kv_heads``;
    Cohere's optional per-head LayerNorm of q and k (``qk_norm``) comes before
    the rotary embedding, which rotates halves (Llama) or interleaved pairs (Cohere).
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        H, q, kv, b = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.attention_bias
        self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.interleaved = c.family == "cohere"
        self.q_proj = Linear("self_attn.q_proj", H, q, bias=b, config=c, rngs=rngs)
        self.k_proj = Linear("self_attn.k_proj", H, kv, bias=b, config=c, rngs=rngs)
        self.v_proj = Linear("self_attn.v_proj", H, kv, bias=b, config=c, rngs=rngs)
        self.o_proj = Linear("self_attn.o_proj", q, H, bias=b, config=c, rngs=rngs)
        if c.qk_norm:
            self.q_norm = LayerNorm((c.num_heads, c.head_dim), c.norm_eps, False, c)
            self.k_norm = LayerNorm((c.num_kv_heads, c.head_dim), c.norm_eps, False, c)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: Array, ctx: Context, tap: Tap, prefix: str) -> Array:
        B, T, _ = x.shape
        q = self.q_proj(x, tap, prefix).reshape(B, T, self.heads, self.head_dim)
        k = self.k_proj(x, tap, prefix).reshape(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x, tap, prefix).reshape(B, T, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, ctx.cos, ctx.sin, self.interleaved)
        k = apply_rotary(k, ctx.cos, ctx.sin, self.interleaved)
        return self.o_proj(attention(q, k, v, ctx.allowed), tap, prefix)


class NeoXAttention(nnx.Module):
    """GPT-NeoX attention: one fused ``query_key_value`` whose output is ``[B, T, heads, (q, k, v) x head_dim]``."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        H, b = c.hidden_size, c.attention_bias
        self.heads, self.head_dim = c.num_heads, c.head_dim
        self.query_key_value = Linear("attention.query_key_value", H, 3 * H, bias=b, config=c, rngs=rngs)
        self.dense = Linear("attention.dense", H, H, bias=b, config=c, rngs=rngs)

    def __call__(self, x: Array, ctx: Context, tap: Tap, prefix: str) -> Array:
        B, T, _ = x.shape
        qkv = self.query_key_value(x, tap, prefix).reshape(B, T, self.heads, 3 * self.head_dim)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q = apply_rotary(q, ctx.cos, ctx.sin, False)
        k = apply_rotary(k, ctx.cos, ctx.sin, False)
        return self.dense(attention(q, k, v, ctx.allowed), tap, prefix)


# --------------------------------------------------------------------------- blocks


class LlamaBlock(nnx.Module):
    """``h += attn(rms1(h)); h += mlp(rms2(h))``."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps, config)
        self.self_attn = SelfAttention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps, config)
        self.mlp = GatedMLP(config, rngs)

    def __call__(self, h: Array, ctx: Context, tap: Tap, prefix: str) -> Array:
        h = h + self.self_attn(self.input_layernorm(h), ctx, tap, prefix)
        return h + self.mlp(self.post_attention_layernorm(h), tap, prefix)


class CohereBlock(nnx.Module):
    """``x = ln(h); h += attn(x) + mlp(x)`` (one LayerNorm without bias, parallel branches)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = LayerNorm((config.hidden_size,), config.norm_eps, False, config)
        self.self_attn = SelfAttention(config, rngs)
        self.mlp = GatedMLP(config, rngs)

    def __call__(self, h: Array, ctx: Context, tap: Tap, prefix: str) -> Array:
        x = self.input_layernorm(h)
        return h + self.self_attn(x, ctx, tap, prefix) + self.mlp(x, tap, prefix)


class NeoXBlock(nnx.Module):
    """Parallel: ``h += attn(ln1(h)) + mlp(ln2(h))``; sequential: ``h += attn(ln1(h)); h += mlp(ln2(h))``."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        H, eps = config.hidden_size, config.norm_eps
        self.parallel = config.parallel_residual
        self.input_layernorm = LayerNorm((H,), eps, True, config)
        self.post_attention_layernorm = LayerNorm((H,), eps, True, config)
        self.attention = NeoXAttention(config, rngs)
        self.mlp = NeoXMLP(config, rngs)

    def __call__(self, h: Array, ctx: Context, tap: Tap, prefix: str) -> Array:
        a = self.attention(self.input_layernorm(h), ctx, tap, prefix)
        if self.parallel:
            return h + a + self.mlp(self.post_attention_layernorm(h), tap, prefix)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h), tap, prefix)


BLOCKS = {"llama": LlamaBlock, "cohere": CohereBlock, "gpt_neox": NeoXBlock}
_NAMES = {  # family -> (embedding, final norm) attribute names of the backbone
    "llama": ("embed_tokens", "norm"),
    "cohere": ("embed_tokens", "norm"),
    "gpt_neox": ("embed_in", "final_layer_norm"),
}


def _final_norm(config: ModelConfig) -> nnx.Module:
    if config.family == "llama":
        return RMSNorm(config.hidden_size, config.norm_eps, config)
    return LayerNorm((config.hidden_size,), config.norm_eps, config.family == "gpt_neox", config)


def stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """One block of the family whose parameters carry a leading axis of ``num_layers`` (independent inits)."""
    block = BLOCKS[config.family]

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return block(config, r)

    return make(rngs)


class Backbone(nnx.Module):
    """Embedding, the layers, and the final norm (the Hugging Face ``model`` / ``gpt_neox`` module)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        embed, norm = _NAMES[config.family]
        self.embed_name, self.norm_name = embed, norm
        setattr(self, embed, Embed(config, rngs))
        if config.scan:
            self.layers = stacked_blocks(config, rngs)
        else:
            self.layers = nnx.List([BLOCKS[config.family](config, rngs) for _ in range(config.num_layers)])
        setattr(self, norm, _final_norm(config))

    @property
    def embed(self) -> Embed:
        return getattr(self, self.embed_name)


class DecoderLM(nnx.Module):
    """A decoder-only LM; ``model(tokens, mask, tap) -> logits [B, T, vocab]``."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        setattr(self, config.backbone, Backbone(config, rngs))
        if config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear("lm_head", config.hidden_size, config.vocab_size, bias=False,
                                  config=config, rngs=rngs)

    def __call__(self, tokens: Array, mask: Array, tap: Tap | None = None) -> Array:
        """Logits of right-padded ``tokens`` ``[B, T]``; ``mask`` is 1 at real tokens.

        Positions are ``0..T-1`` in every row and attention is causal over real
        tokens, so right padding never changes the logits of real tokens.
        """
        c = self.config
        tap = Tap() if tap is None else tap
        backbone = getattr(self, c.backbone)
        h = backbone.embed(tokens, c.dtype)
        cos, sin = rotary_tables(c, tokens.shape[1], c.dtype)
        ctx = Context(cos, sin, attention_mask(mask))
        prefix = f"{c.backbone}.layers"
        if c.scan:
            graphdef, state = nnx.split(backbone.layers)

            def body(h, layer_state, inner_tap):
                return nnx.merge(graphdef, layer_state)(h, ctx, inner_tap, "")

            h = tap.scan(prefix, body, h, state, remat=c.remat)
        else:
            for i, block in enumerate(backbone.layers):
                h = block(h, ctx, tap, f"{prefix}.{i}.")
        h = getattr(backbone, backbone.norm_name)(h)
        if self.lm_head is None:
            logits = tap.linear("lm_head", h, backbone.embed.embedding[...].T)
        else:
            logits = self.lm_head(h, tap)
        if c.logit_scale != 1.0:
            logits = logits * jnp.asarray(c.logit_scale, logits.dtype)
        return logits
