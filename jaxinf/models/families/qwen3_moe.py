"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3's attention with a sparse mixture of gated-MLP experts.

A softmax router over ``num_experts`` picks ``num_experts_per_tok`` experts per
token (their probabilities renormalized when ``norm_topk_prob``); experts have
``moe_intermediate_size`` features. Every layer must be sparse
(``decoder_sparse_step`` 1, no ``mlp_only_layers``). Checkpoint and tracked
names: ``model.layers.{i}.mlp.gate``, ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj``,
with Qwen3's attention names.
"""

from __future__ import annotations

from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.config_json import apply_rope, common_fields, read_rope
from jaxinf.models.families import Family
from jaxinf.models.families.llama import rms_final_norm
from jaxinf.models.families.qwen2 import layer_types
from jaxinf.models.layers import RMSNorm
from jaxinf.models.parts import PreNormBlock, SelfAttention, SparseMoE


def experts(f, default_renormalize: bool) -> dict:
    """The mixture fields of Qwen3-MoE and OLMoE configs (``num_experts`` or ``num_local_experts``)."""
    n = f("num_experts", "int", None)
    if n is None:
        n = f("num_local_experts", "int", 8)
    f.read.add("num_local_experts")
    return dict(
        num_experts=n,
        experts_per_token=f("num_experts_per_tok", "int", 2),
        moe_renormalize=f("norm_topk_prob", "bool", default_renormalize),
    )


def read_config(f) -> dict:
    kw = common_fields(f)
    f.refuse("mlp_only_layers", (None, []), "(dense layers among sparse ones) is not implemented by jaxinf")
    f.refuse("decoder_sparse_step", (None, 1), "(dense layers among sparse ones) is not implemented by jaxinf")
    kw.update(
        intermediate_size=f("moe_intermediate_size", "int"),  # every layer is sparse: the dense size is unused
        norm_eps=f("rms_norm_eps", "float", 1e-6),
        attention_bias=f("attention_bias", "bool", False),
        tie_embeddings=f("tie_word_embeddings", "bool", False),
        **layer_types(f, kw["num_layers"]),
        **experts(f, False),
    )
    return apply_rope(kw, read_rope(f, 10000.0))


def block(config: ModelConfig, rngs: nnx.Rngs) -> PreNormBlock:
    c = config
    attn = SelfAttention(c, rngs, q_norm=RMSNorm(c.head_dim, c.norm_eps, c), k_norm=RMSNorm(c.head_dim, c.norm_eps, c))
    return PreNormBlock(
        RMSNorm(c.hidden_size, c.norm_eps, c), attn, RMSNorm(c.hidden_size, c.norm_eps, c), SparseMoE(c, rngs)
    )


FAMILY = Family(
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    model_types=("qwen3_moe",),
    read_config=read_config,
    block=block,
    final_norm=rms_final_norm,
    check=lambda c: [] if c.num_experts > 0 else ["qwen3_moe needs num_experts > 0"],
)
