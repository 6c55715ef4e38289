"""StableLM (``StableLmForCausalLM``): LayerNorms with bias, partial rotary, optional parallel residual.

Sequential: ``h += attn(ln1(h)); h += mlp(ln2(h))``; parallel
(``use_parallel_residual``): ``x = ln1(h); h += attn(x) + mlp(x)`` (no second
norm). Biases on q/k/v with ``use_qkv_bias``; rotary on the first
``partial_rotary_factor`` of each head (halves). Per-head q/k LayerNorms
(``qk_layernorm``) are not implemented. Checkpoint names as Llama's.
"""

from __future__ import annotations

from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.config_json import apply_rope, common_fields, read_rope
from jaxinf.models.families import Family
from jaxinf.models.layers import LayerNorm
from jaxinf.models.parts import GatedMLP, ParallelBlock, PreNormBlock, SelfAttention


def read_config(f) -> dict:
    kw = common_fields(f)
    f.refuse("qk_layernorm", (None, False))
    kw.update(
        norm_eps=f("layer_norm_eps", "float", 1e-5),
        attention_bias=f("use_qkv_bias", "bool", False),
        tie_embeddings=f("tie_word_embeddings", "bool", False),
        parallel_residual=f("use_parallel_residual", "bool", False),
    )
    return apply_rope(kw, read_rope(f, 10000.0, 0.25))


def layer_norm(c: ModelConfig) -> LayerNorm:
    return LayerNorm((c.hidden_size,), c.norm_eps, True, c)


def block(config: ModelConfig, rngs: nnx.Rngs):
    c = config
    attn = SelfAttention(c, rngs, o_bias=False)
    if c.parallel_residual:
        return ParallelBlock(layer_norm(c), attn, GatedMLP(c, rngs))
    return PreNormBlock(layer_norm(c), attn, layer_norm(c), GatedMLP(c, rngs))


FAMILY = Family(
    name="stablelm",
    architectures=("StableLmForCausalLM",),
    model_types=("stablelm",),
    read_config=read_config,
    block=block,
    final_norm=layer_norm,
)
