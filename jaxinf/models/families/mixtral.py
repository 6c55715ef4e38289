"""Mixtral (``MixtralForCausalLM``): Mistral's attention with a sparse mixture of gated-MLP experts.

Each token goes to its ``num_experts_per_tok`` best of ``num_local_experts``
experts by a softmax router (weights renormalized over the chosen experts);
see :class:`jaxinf.models.parts.SparseMoE` for how each expert is a tracked
layer over its own tokens. Tracked names follow transformers 5's modules:
``model.layers.{i}.mlp.gate`` (router) and ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj``;
checkpoint names are Mixtral's ``model.layers.{i}.block_sparse_moe.gate`` and
``model.layers.{i}.block_sparse_moe.experts.{e}.{w1,w3,w2}``.
"""

from __future__ import annotations

from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.config_json import apply_rope, common_fields, read_rope
from jaxinf.models.families import Family
from jaxinf.models.families.llama import rms_final_norm
from jaxinf.models.layers import RMSNorm
from jaxinf.models.parts import PreNormBlock, SelfAttention, SparseMoE


def read_config(f) -> dict:
    kw = common_fields(f)
    window = f("sliding_window", "int", None)
    f("router_jitter_noise", "float", 0.0)  # training only (multiplicative noise on the router's input)
    kw.update(
        norm_eps=f("rms_norm_eps", "float", 1e-5),
        tie_embeddings=f("tie_word_embeddings", "bool", False),
        sliding_window=window,
        layer_types=None if window is None else ("sliding_attention",) * kw["num_layers"],
        num_experts=f("num_local_experts", "int", 8),
        experts_per_token=f("num_experts_per_tok", "int", 2),
    )
    return apply_rope(kw, read_rope(f, 1000000.0))


def check(c: ModelConfig) -> list[str]:
    return [] if c.num_experts > 0 else ["mixtral needs num_experts > 0"]


def block(config: ModelConfig, rngs: nnx.Rngs) -> PreNormBlock:
    c = config
    return PreNormBlock(
        RMSNorm(c.hidden_size, c.norm_eps, c),
        SelfAttention(c, rngs),
        RMSNorm(c.hidden_size, c.norm_eps, c),
        SparseMoE(c, rngs),
    )


FAMILY = Family(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    model_types=("mixtral",),
    read_config=read_config,
    block=block,
    final_norm=rms_final_norm,
    renames=(
        (r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1."),
        (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3."),
        (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2."),
        (r"\.mlp\.gate\.", ".block_sparse_moe.gate."),
    ),
    check=check,
)
