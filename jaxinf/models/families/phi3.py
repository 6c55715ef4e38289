"""Phi-3 (``Phi3ForCausalLM``): Llama's block with fused ``qkv_proj`` and ``gate_up_proj``, tracked as stored.

``[q | k | v] = qkv_proj(x)``; ``[g | u] = gate_up_proj(x)``, MLP
``down_proj(act(g) * u)``; partial rotary (``partial_rotary_factor``, halves
of the rotated part); every layer slides when ``sliding_window`` is set.
Checkpoint names: ``model.layers.{i}.self_attn.{qkv_proj,o_proj}``,
``model.layers.{i}.mlp.{gate_up_proj,down_proj}``, Llama's norms, ``lm_head``.
"""

from __future__ import annotations

from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.config_json import apply_rope, common_fields, read_rope
from jaxinf.models.families import Family
from jaxinf.models.families.llama import rms_final_norm
from jaxinf.models.layers import RMSNorm
from jaxinf.models.parts import FusedAttention, FusedGatedMLP, PreNormBlock


def read_config(f) -> dict:
    kw = common_fields(f)
    window = f("sliding_window", "int", None)
    f("original_max_position_embeddings", "int", None)  # read by the yarn and longrope scalings only
    kw.update(
        norm_eps=f("rms_norm_eps", "float", 1e-5),
        tie_embeddings=f("tie_word_embeddings", "bool", False),
        sliding_window=window,
        layer_types=None if window is None else ("sliding_attention",) * kw["num_layers"],
    )
    return apply_rope(kw, read_rope(f, 10000.0))


def block(config: ModelConfig, rngs: nnx.Rngs) -> PreNormBlock:
    c = config
    attn = FusedAttention(c, rngs, names=("qkv_proj", "o_proj"), bias=False, prefix="self_attn")
    return PreNormBlock(
        RMSNorm(c.hidden_size, c.norm_eps, c), attn, RMSNorm(c.hidden_size, c.norm_eps, c), FusedGatedMLP(c, rngs)
    )


FAMILY = Family(
    name="phi3",
    architectures=("Phi3ForCausalLM",),
    model_types=("phi3",),
    read_config=read_config,
    block=block,
    final_norm=rms_final_norm,
)
