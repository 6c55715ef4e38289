"""Qwen3 (``Qwen3ForCausalLM``): Llama's block with RMSNorms of q and k over each head.

``q_norm``/``k_norm`` (weights ``[head_dim]``) normalize each head of q and k
before the rotary embedding; biases on q/k/v/o when ``attention_bias``;
sliding layers as Qwen2. Checkpoint names as Llama's, plus ``self_attn.{q,k}_norm``.
"""

from __future__ import annotations

from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.config_json import apply_rope, common_fields, read_rope
from jaxinf.models.families import Family
from jaxinf.models.families.llama import block as llama_block
from jaxinf.models.families.llama import rms_final_norm
from jaxinf.models.families.qwen2 import layer_types
from jaxinf.models.layers import RMSNorm


def read_config(f) -> dict:
    kw = common_fields(f)
    kw.update(
        norm_eps=f("rms_norm_eps", "float", 1e-6),
        attention_bias=f("attention_bias", "bool", False),
        tie_embeddings=f("tie_word_embeddings", "bool", False),
        **layer_types(f, kw["num_layers"]),
    )
    return apply_rope(kw, read_rope(f, 10000.0))


def block(config: ModelConfig, rngs: nnx.Rngs):
    c = config
    return llama_block(c, rngs, q_norm=RMSNorm(c.head_dim, c.norm_eps, c), k_norm=RMSNorm(c.head_dim, c.norm_eps, c))


FAMILY = Family(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    read_config=read_config,
    block=block,
    final_norm=rms_final_norm,
)
