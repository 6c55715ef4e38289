"""OLMoE (``OlmoeForCausalLM``): pre-norm blocks with whole-projection q/k RMSNorms, ``clip_qkv`` and a mixture of experts.

``h += attn(rms1(h)); h += moe(rms2(h))``; q and k are normalized over the
whole projection (weights ``[heads * head_dim]``, ``[kv_heads * head_dim]``) and
then clipped, with v, to ``clip_qkv``; the router's top-k probabilities
are renormalized only with ``norm_topk_prob``. Checkpoint and tracked names as
Qwen3-MoE's, with ``self_attn.{q,k}_norm``.
"""

from __future__ import annotations

from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.config_json import apply_rope, common_fields, read_rope
from jaxinf.models.families import Family
from jaxinf.models.families.llama import rms_final_norm
from jaxinf.models.families.qwen3_moe import experts
from jaxinf.models.layers import RMSNorm
from jaxinf.models.parts import PreNormBlock, SelfAttention, SparseMoE


def read_config(f) -> dict:
    kw = common_fields(f)
    kw.update(
        norm_eps=f("rms_norm_eps", "float", 1e-5),
        attention_bias=f("attention_bias", "bool", False),
        tie_embeddings=f("tie_word_embeddings", "bool", False),
        clip_qkv=f("clip_qkv", "float", None),
        **experts(f, False),
    )
    return apply_rope(kw, read_rope(f, 10000.0))


def block(config: ModelConfig, rngs: nnx.Rngs) -> PreNormBlock:
    c = config
    attn = SelfAttention(
        c,
        rngs,
        flat=True,
        q_norm=RMSNorm(c.num_heads * c.head_dim, c.norm_eps, c),
        k_norm=RMSNorm(c.num_kv_heads * c.head_dim, c.norm_eps, c),
    )
    return PreNormBlock(
        RMSNorm(c.hidden_size, c.norm_eps, c), attn, RMSNorm(c.hidden_size, c.norm_eps, c), SparseMoE(c, rngs)
    )


FAMILY = Family(
    name="olmoe",
    architectures=("OlmoeForCausalLM",),
    model_types=("olmoe",),
    read_config=read_config,
    block=block,
    final_norm=rms_final_norm,
    check=lambda c: [] if c.num_experts > 0 else ["olmoe needs num_experts > 0"],
)
