"""GPT-2 (``GPT2LMHeadModel``): learned positions, LayerNorms with bias, ``Conv1D`` layers, tied head.

``h = wte[token] + wpe[position]``; ``h += attn(ln_1(h)); h += mlp(ln_2(h))``
with ``[q | k | v] = c_attn(x)`` and MLP ``c_proj(act(c_fc(x)))``; no rotary
embedding. ``Conv1D`` stores its weight as ``[d_in, d_out]``, which is read as
the kernel without a transpose. Checkpoint names: ``transformer.{wte,wpe,ln_f}``,
``transformer.h.{i}.{ln_1,ln_2}``, ``transformer.h.{i}.attn.{c_attn,c_proj}``,
``transformer.h.{i}.mlp.{c_fc,c_proj}`` (also without ``transformer.``, as the
original ``gpt2`` checkpoint stores them); ``lm_head`` is the tied ``wte``.
"""

from __future__ import annotations

from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.families import Family
from jaxinf.models.layers import LayerNorm
from jaxinf.models.parts import FusedAttention, PlainMLP, PreNormBlock


def read_config(f) -> dict:
    hidden, heads = f("n_embd"), f("n_head")
    f.refuse("scale_attn_by_inverse_layer_idx", (None, False))
    f.refuse("add_cross_attention", (None, False))
    f("reorder_and_upcast_attn", "bool", False)  # the same function, computed in float32: nothing to do
    return dict(
        vocab_size=f("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f("n_inner", "int", None) or 4 * hidden,
        num_layers=f("n_layer"),
        num_heads=heads,
        head_dim=hidden // heads if heads > 0 else 0,  # heads <= 0: refused by ModelConfig
        rotary_dim=0,
        max_position_embeddings=f("n_positions", "int", 1024),
        activation=f.activation("activation_function", "gelu_new"),
        norm_eps=f("layer_norm_epsilon", "float", 1e-5),
        tie_embeddings=f("tie_word_embeddings", "bool", True),
        # scale_attn_weights=False: scores q k unscaled, i.e. a scale of 1 ** -0.5
        query_pre_attn_scalar=None if f("scale_attn_weights", "bool", True) else 1.0,
    )


def check(c: ModelConfig) -> list[str]:
    return (
        []
        if c.head_dim * c.num_heads == c.hidden_size and c.num_kv_heads == c.num_heads
        else ["gpt2 needs head_dim * num_heads == hidden_size and no grouped-query attention"]
    )


def layer_norm(c: ModelConfig) -> LayerNorm:
    return LayerNorm((c.hidden_size,), c.norm_eps, True, c)


def block(config: ModelConfig, rngs: nnx.Rngs) -> PreNormBlock:
    c = config
    return PreNormBlock(
        layer_norm(c),
        FusedAttention(c, rngs, names=("c_attn", "c_proj"), bias=True, prefix="attn"),
        layer_norm(c),
        PlainMLP(c, rngs, ("c_fc", "c_proj")),
        names=("ln_1", "attn", "ln_2", "mlp"),
    )


FAMILY = Family(
    name="gpt2",
    architectures=("GPT2LMHeadModel",),
    model_types=("gpt2",),
    read_config=read_config,
    block=block,
    final_norm=layer_norm,
    backbone="transformer",
    embed="wte",
    layers="h",
    norm="ln_f",
    positions="wpe",
    linear_transposed=False,
    buffers=(r"\.attn\.(bias|masked_bias)$",),
    check=check,
)
