"""Gemma 2 (``Gemma2ForCausalLM``): Gemma with sandwich norms, soft-capping and alternating sliding layers.

``h += post_attention_layernorm(attn(input_layernorm(h)))``;
``h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``, all
(1 + w) RMSNorms. Scores ``q k / sqrt(query_pre_attn_scalar)`` capped by
``attn_logit_softcapping``; logits capped by ``final_logit_softcapping``;
``layer_types`` (default: even layers sliding, odd layers full).
Checkpoint names as Llama's plus ``pre_feedforward_layernorm`` and
``post_feedforward_layernorm``.
"""

from __future__ import annotations

import functools

from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.config_json import apply_rope, common_fields, patterned_layers, read_rope
from jaxinf.models.families import Family
from jaxinf.models.families.gemma import gemma_norm
from jaxinf.models.parts import GatedMLP, SandwichBlock, SelfAttention


def gemma2_fields(f, kw: dict) -> dict:
    """The fields Gemma 2 and 3 share beyond Llama's: norms, soft-caps, attention scale, sliding layers."""
    kw["activation"] = f.activation("hidden_activation", "gelu_pytorch_tanh")
    f.read.add("hidden_act")  # public Gemma 2/3 configs also carry hidden_act, which transformers does not read
    f.refuse("use_bidirectional_attention", (None, False))
    kw.update(
        norm_eps=f("rms_norm_eps", "float", 1e-6),
        attention_bias=f("attention_bias", "bool", False),
        tie_embeddings=f("tie_word_embeddings", "bool", True),
        query_pre_attn_scalar=f("query_pre_attn_scalar", "float", 256.0),
        sliding_window=f("sliding_window", "int", 4096),
    )
    return kw


def read_config(f) -> dict:
    kw = gemma2_fields(f, common_fields(f, "gelu_pytorch_tanh"))
    kw.update(
        attn_softcap=f("attn_logit_softcapping", "float", None),
        final_softcap=f("final_logit_softcapping", "float", None),
        layer_types=patterned_layers(f, kw["num_layers"], 2),
    )
    return apply_rope(kw, read_rope(f, 10000.0))


def block(config: ModelConfig, rngs: nnx.Rngs, **attention) -> SandwichBlock:
    c = config
    return SandwichBlock(functools.partial(gemma_norm, c), SelfAttention(c, rngs, **attention), GatedMLP(c, rngs))


FAMILY = Family(
    name="gemma2",
    architectures=("Gemma2ForCausalLM",),
    model_types=("gemma2",),
    read_config=read_config,
    block=block,
    final_norm=gemma_norm,
    embed_scale=True,
)
