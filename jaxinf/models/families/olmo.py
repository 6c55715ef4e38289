"""OLMo (``OlmoForCausalLM``): Llama's block with LayerNorms that have no parameters, and ``clip_qkv``.

Every norm is ``(x - mean) / sqrt(var + 1e-5)`` (no weight, no bias, in at
least float32); q, k and v are clamped to ``[-clip_qkv, clip_qkv]`` when set.
Checkpoint names as Llama's without norm weights.
"""

from __future__ import annotations

from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.config_json import apply_rope, common_fields, read_rope
from jaxinf.models.families import Family
from jaxinf.models.layers import LayerNorm
from jaxinf.models.parts import GatedMLP, PreNormBlock, SelfAttention


def read_config(f) -> dict:
    kw = common_fields(f)
    kw.update(
        norm_eps=1e-5,
        attention_bias=f("attention_bias", "bool", False),
        tie_embeddings=f("tie_word_embeddings", "bool", False),
        clip_qkv=f("clip_qkv", "float", None),
    )
    return apply_rope(kw, read_rope(f, 10000.0))


def plain_norm(c: ModelConfig) -> LayerNorm:
    return LayerNorm((c.hidden_size,), c.norm_eps, False, c, parametric=False)


def block(config: ModelConfig, rngs: nnx.Rngs) -> PreNormBlock:
    c = config
    return PreNormBlock(plain_norm(c), SelfAttention(c, rngs), plain_norm(c), GatedMLP(c, rngs))


FAMILY = Family(
    name="olmo",
    architectures=("OlmoForCausalLM",),
    model_types=("olmo",),
    read_config=read_config,
    block=block,
    final_norm=plain_norm,
)
