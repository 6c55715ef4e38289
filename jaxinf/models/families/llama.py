"""Llama (``LlamaForCausalLM``): pre-norm RMSNorm blocks, grouped-query attention, gated MLP.

``h += attn(rms1(h)); h += mlp(rms2(h))`` with ``mlp = down(act(gate(x)) * up(x))``,
rotary on halves of each head (rope types default, linear, llama3).
Checkpoint names: ``model.embed_tokens``, ``model.layers.{i}.input_layernorm``,
``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``model.layers.{i}.post_attention_layernorm``,
``model.layers.{i}.mlp.{gate,up,down}_proj``, ``model.norm``, ``lm_head``.
"""

from __future__ import annotations

from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.config_json import apply_rope, common_fields, read_rope
from jaxinf.models.families import Family
from jaxinf.models.layers import RMSNorm
from jaxinf.models.parts import GatedMLP, PreNormBlock, SelfAttention


def read_config(f) -> dict:
    kw = common_fields(f)
    kw.update(
        norm_eps=f("rms_norm_eps", "float", 1e-6),
        attention_bias=f("attention_bias", "bool", False),
        mlp_bias=f("mlp_bias", "bool", False),
        tie_embeddings=f("tie_word_embeddings", "bool", False),
    )
    return apply_rope(kw, read_rope(f, 10000.0))


def block(config: ModelConfig, rngs: nnx.Rngs, **attention) -> PreNormBlock:
    """``h += attn(rms1(h)); h += mlp(rms2(h))`` (``attention``: :class:`SelfAttention` options of a variant)."""
    c = config
    return PreNormBlock(
        RMSNorm(c.hidden_size, c.norm_eps, c),
        SelfAttention(c, rngs, **attention),
        RMSNorm(c.hidden_size, c.norm_eps, c),
        GatedMLP(c, rngs),
    )


def rms_final_norm(config: ModelConfig) -> RMSNorm:
    return RMSNorm(config.hidden_size, config.norm_eps, config)


FAMILY = Family(
    name="llama",
    architectures=("LlamaForCausalLM",),
    model_types=("llama",),
    read_config=read_config,
    block=block,
    final_norm=rms_final_norm,
)
