"""Cohere / Command R (``CohereForCausalLM``): one bias-free LayerNorm, parallel branches, interleaved rotary.

``x = ln(h); h += attn(x) + mlp(x)``, gated MLP, rotary on interleaved pairs
of whole heads, logits scaled by ``logit_scale``, optional per-head LayerNorm
of q and k (``use_qk_norm``, weights ``[heads, head_dim]``). Checkpoint names
as Llama's without ``post_attention_layernorm``; ``self_attn.{q,k}_norm`` when
``use_qk_norm``; ``lm_head`` tied to ``model.embed_tokens`` by default.
"""

from __future__ import annotations

from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.config_json import apply_rope, common_fields, read_rope
from jaxinf.models.families import Family
from jaxinf.models.layers import LayerNorm
from jaxinf.models.parts import GatedMLP, ParallelBlock, SelfAttention


def read_config(f) -> dict:
    kw = common_fields(f)
    kw.update(
        norm_eps=f("layer_norm_eps", "float", 1e-5),
        attention_bias=f("attention_bias", "bool", False),
        tie_embeddings=f("tie_word_embeddings", "bool", True),
        logit_scale=f("logit_scale", "float", 0.0625),
        qk_norm=f("use_qk_norm", "bool", False),
    )
    rope = read_rope(f, 500000.0)
    if rope["partial"] != 1.0:
        raise f.error("partial_rotary_factor", f"is {rope['partial']}, but cohere rotates whole heads")
    return apply_rope(kw, rope)


def head_norms(c: ModelConfig) -> dict:
    """Cohere's per-head q/k LayerNorms (weights ``[heads, head_dim]``, no bias), when ``qk_norm``."""
    if not c.qk_norm:
        return {}
    return dict(
        q_norm=LayerNorm((c.num_heads, c.head_dim), c.norm_eps, False, c),
        k_norm=LayerNorm((c.num_kv_heads, c.head_dim), c.norm_eps, False, c),
    )


def block(config: ModelConfig, rngs: nnx.Rngs) -> ParallelBlock:
    """``x = ln(h); h += attn(x) + mlp(x)`` (one LayerNorm without bias, parallel branches)."""
    c = config
    return ParallelBlock(
        LayerNorm((c.hidden_size,), c.norm_eps, False, c),
        SelfAttention(c, rngs, interleaved=True, **head_norms(c)),
        GatedMLP(c, rngs),
    )


def final_norm(c: ModelConfig) -> LayerNorm:
    return LayerNorm((c.hidden_size,), c.norm_eps, False, c)


FAMILY = Family(
    name="cohere",
    architectures=("CohereForCausalLM",),
    model_types=("cohere",),
    read_config=read_config,
    block=block,
    final_norm=final_norm,
)
