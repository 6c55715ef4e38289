"""Gemma (``GemmaForCausalLM``): Llama's block with (1 + w) RMSNorms, scaled embeddings and GeGLU.

Token embeddings are multiplied by ``sqrt(hidden_size)`` (in the compute
dtype); every RMSNorm computes ``y * (1 + w)`` in at least float32 (the
checkpoint stores ``w``); the MLP is ``down(gelu_tanh(gate(x)) * up(x))``;
the output projection is tied to the embedding. Checkpoint names as Llama's.
"""

from __future__ import annotations

from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.config_json import apply_rope, common_fields, read_rope
from jaxinf.models.families import Family
from jaxinf.models.layers import RMSNorm
from jaxinf.models.parts import GatedMLP, PreNormBlock, SelfAttention


def gemma_norm(c: ModelConfig, size: int | None = None) -> RMSNorm:
    """Gemma's RMSNorm ``y * (1 + w)`` over ``size`` features (default ``hidden_size``)."""
    return RMSNorm(c.hidden_size if size is None else size, c.norm_eps, c, offset=1.0)


def read_config(f) -> dict:
    kw = common_fields(f, "gelu_pytorch_tanh")
    act = f("hidden_activation", "str", None)
    if act is not None and f.activation("hidden_activation", act) != kw["activation"]:
        raise f.error("hidden_activation", f"is {act!r} but hidden_act is {f.cfg.get('hidden_act')!r}: ambiguous")
    f.refuse("use_bidirectional_attention", (None, False))
    kw.update(
        norm_eps=f("rms_norm_eps", "float", 1e-6),
        attention_bias=f("attention_bias", "bool", False),
        tie_embeddings=f("tie_word_embeddings", "bool", True),
    )
    return apply_rope(kw, read_rope(f, 10000.0))


def block(config: ModelConfig, rngs: nnx.Rngs) -> PreNormBlock:
    c = config
    return PreNormBlock(gemma_norm(c), SelfAttention(c, rngs), gemma_norm(c), GatedMLP(c, rngs))


FAMILY = Family(
    name="gemma",
    architectures=("GemmaForCausalLM",),
    model_types=("gemma",),
    read_config=read_config,
    block=block,
    final_norm=gemma_norm,
    embed_scale=True,
)
