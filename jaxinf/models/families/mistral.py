"""Mistral (``MistralForCausalLM``): Llama's block with every layer attending within a sliding window.

``sliding_window`` (null: full attention) applies to all layers: position
``t`` attends to ``t - sliding_window < s <= t``. Checkpoint names as Llama's.
"""

from __future__ import annotations

from jaxinf.models.config_json import apply_rope, common_fields, read_rope
from jaxinf.models.families import Family
from jaxinf.models.families.llama import block, rms_final_norm


def read_config(f) -> dict:
    kw = common_fields(f)
    window = f("sliding_window", "int", None)
    kw.update(
        norm_eps=f("rms_norm_eps", "float", 1e-6),
        tie_embeddings=f("tie_word_embeddings", "bool", False),
        sliding_window=window,
        layer_types=None if window is None else ("sliding_attention",) * kw["num_layers"],
    )
    return apply_rope(kw, read_rope(f, 10000.0))


FAMILY = Family(
    name="mistral",
    architectures=("MistralForCausalLM",),
    model_types=("mistral",),
    read_config=read_config,
    block=block,
    final_norm=rms_final_norm,
)
