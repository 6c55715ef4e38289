"""OLMo 2 (``Olmo2ForCausalLM``): norms after each branch, RMSNorms of the whole q and k projections.

``h += post_attention_layernorm(attn(h)); h += post_feedforward_layernorm(mlp(h))``;
``q_norm`` (weights ``[heads * head_dim]``) and ``k_norm`` (``[kv_heads * head_dim]``)
normalize the projections before they are split into heads. Checkpoint names:
``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``self_attn.{q,k}_norm``,
``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``, ``post_feedforward_layernorm``.
"""

from __future__ import annotations

import functools

from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.config_json import apply_rope, common_fields, read_rope
from jaxinf.models.families import Family
from jaxinf.models.families.llama import rms_final_norm
from jaxinf.models.layers import RMSNorm
from jaxinf.models.parts import GatedMLP, PostNormBlock, SelfAttention


def olmo2_fields(f) -> dict:
    kw = common_fields(f)
    kw.update(
        norm_eps=f("rms_norm_eps", "float", 1e-5),
        attention_bias=f("attention_bias", "bool", False),
        tie_embeddings=f("tie_word_embeddings", "bool", False),
    )
    return kw


def read_config(f) -> dict:
    return apply_rope(olmo2_fields(f), read_rope(f, 10000.0))


def block(config: ModelConfig, rngs: nnx.Rngs) -> PostNormBlock:
    c = config
    attn = SelfAttention(
        c,
        rngs,
        flat=True,
        q_norm=RMSNorm(c.num_heads * c.head_dim, c.norm_eps, c),
        k_norm=RMSNorm(c.num_kv_heads * c.head_dim, c.norm_eps, c),
    )
    return PostNormBlock(functools.partial(rms_final_norm, c), attn, GatedMLP(c, rngs))


FAMILY = Family(
    name="olmo2",
    architectures=("Olmo2ForCausalLM",),
    model_types=("olmo2",),
    read_config=read_config,
    block=block,
    final_norm=rms_final_norm,
)
