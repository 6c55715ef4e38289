"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``): LayerNorms with bias, fused per-head qkv, partial rotary.

Parallel residual: ``h += attn(ln1(h)) + mlp(ln2(h))``; sequential:
``h += attn(ln1(h)); h += mlp(ln2(h))``. ``query_key_value``'s output is
``[B, T, heads, (q, k, v) x head_dim]``; rotary on the first ``rotary_dim``
features of each head (halves); MLP ``dense_4h_to_h(act(dense_h_to_4h(x)))``.
Checkpoint names: ``gpt_neox.embed_in``, ``gpt_neox.layers.{i}.{input,post_attention}_layernorm``,
``gpt_neox.layers.{i}.attention.{query_key_value,dense}``,
``gpt_neox.layers.{i}.mlp.{dense_h_to_4h,dense_4h_to_h}``, ``gpt_neox.final_layer_norm``,
``embed_out`` (read as ``lm_head``, the tracked name).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.config_json import apply_rope, read_rope
from jaxinf.models.families import Family
from jaxinf.models.layers import COLUMN, ROW, LayerNorm, Linear, apply_rotary, attention
from jaxinf.models.parts import PlainMLP


def read_config(f) -> dict:
    heads, hidden = f("num_attention_heads"), f("hidden_size")
    kw = dict(
        vocab_size=f("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f("intermediate_size"),
        num_layers=f("num_hidden_layers"),
        num_heads=heads,
        head_dim=hidden // heads if heads > 0 else 0,  # heads <= 0: refused by ModelConfig
        max_position_embeddings=f("max_position_embeddings", "int", 2048),
        activation=f.activation("hidden_act", "gelu"),
        norm_eps=f("layer_norm_eps", "float", 1e-5),
        attention_bias=f("attention_bias", "bool", True),
        mlp_bias=True,
        tie_embeddings=f("tie_word_embeddings", "bool", False),
        parallel_residual=f("use_parallel_residual", "bool", True),
    )
    return apply_rope(kw, read_rope(f, 10000.0, 0.25))


def check(c: ModelConfig) -> list[str]:
    out = []
    if c.num_kv_heads != c.num_heads:
        out.append("gpt_neox has no grouped-query attention (num_kv_heads must equal num_heads)")
    if c.head_dim * c.num_heads != c.hidden_size:
        out.append("gpt_neox needs head_dim * num_heads == hidden_size")
    return out


class NeoXAttention(nnx.Module):
    """GPT-NeoX attention: one fused ``query_key_value`` whose output is ``[B, T, heads, (q, k, v) x head_dim]``."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        H, b = c.hidden_size, c.attention_bias
        self.heads, self.head_dim = c.num_heads, c.head_dim
        self.query_key_value = Linear("attention.query_key_value", H, 3 * H, bias=b, axes=COLUMN, config=c, rngs=rngs)
        self.dense = Linear("attention.dense", H, H, bias=b, axes=ROW, config=c, rngs=rngs)

    def __call__(self, x, ctx, tap, prefix):
        B, T, _ = x.shape
        qkv = self.query_key_value(x, tap, prefix).reshape(B, T, self.heads, 3 * self.head_dim)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q = apply_rotary(q, ctx.cos, ctx.sin, False)
        k = apply_rotary(k, ctx.cos, ctx.sin, False)
        return self.dense(attention(q, k, v, ctx.allowed), tap, prefix)


class NeoXBlock(nnx.Module):
    """Parallel: ``h += attn(ln1(h)) + mlp(ln2(h))``; sequential: ``h += attn(ln1(h)); h += mlp(ln2(h))``."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        H, eps = config.hidden_size, config.norm_eps
        self.parallel = config.parallel_residual
        self.input_layernorm = LayerNorm((H,), eps, True, config)
        self.post_attention_layernorm = LayerNorm((H,), eps, True, config)
        self.attention = NeoXAttention(config, rngs)
        self.mlp = PlainMLP(config, rngs, ("dense_h_to_4h", "dense_4h_to_h"), bias=config.mlp_bias)

    def __call__(self, h, ctx, tap, prefix):
        a = self.attention(self.input_layernorm(h), ctx, tap, prefix)
        if self.parallel:
            return h + a + self.mlp(self.post_attention_layernorm(h), tap, prefix)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h), tap, prefix)


FAMILY = Family(
    name="gpt_neox",
    architectures=("GPTNeoXForCausalLM",),
    model_types=("gpt_neox",),
    read_config=read_config,
    block=NeoXBlock,
    final_norm=lambda c: LayerNorm((c.hidden_size,), c.norm_eps, True, c),
    backbone="gpt_neox",
    embed="embed_in",
    norm="final_layer_norm",
    head_aliases=("embed_out.weight",),
    buffers=(r"\.rotary_emb\.inv_freq$", r"\.attention\.(bias|masked_bias)$"),
    check=check,
)
