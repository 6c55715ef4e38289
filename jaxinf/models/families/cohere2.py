"""Cohere2 / Command R7B (``Cohere2ForCausalLM``): Cohere's parallel block with sliding layers, rope only on them.

``layer_types`` (default: every fourth layer full); sliding layers attend
within ``sliding_window`` and apply the (interleaved) rotary embedding, full
layers apply none. ``head_dim = hidden_size / heads``; no q/k norm. Checkpoint
names as Cohere's.
"""

from __future__ import annotations

from jaxinf.models.config_json import apply_rope, common_fields, patterned_layers, read_rope
from jaxinf.models.families import Family
from jaxinf.models.families.cohere import block, final_norm


def read_config(f) -> dict:
    kw = common_fields(f)
    types = patterned_layers(f, kw["num_layers"], 4)
    kw.update(
        head_dim=kw["hidden_size"] // kw["num_heads"],
        norm_eps=f("layer_norm_eps", "float", 1e-5),
        attention_bias=f("attention_bias", "bool", False),
        tie_embeddings=f("tie_word_embeddings", "bool", True),
        logit_scale=f("logit_scale", "float", 0.0625),
        sliding_window=f("sliding_window", "int", 4096),
        layer_types=types,
        rope_layers=tuple(t == "sliding_attention" for t in types),
    )
    rope = read_rope(f, 10000.0)
    if rope["partial"] != 1.0:
        raise f.error("partial_rotary_factor", f"is {rope['partial']}, but cohere2 rotates whole heads")
    return apply_rope(kw, rope)


FAMILY = Family(
    name="cohere2",
    architectures=("Cohere2ForCausalLM",),
    model_types=("cohere2",),
    read_config=read_config,
    block=block,
    final_norm=final_norm,
)
