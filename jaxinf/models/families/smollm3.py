"""SmolLM3 (``SmolLM3ForCausalLM``): Llama's block, with the rotary embedding left out of some layers.

``no_rope_layers[i]`` is 1 where layer ``i`` applies the rotary embedding
and 0 where it does not (every ``no_rope_layer_interval``-th layer in the
released models); sliding layers (``use_sliding_window``) where ``layer_types`` says so,
by default the layers without rotary embedding. Checkpoint names as Llama's.
"""

from __future__ import annotations

from jaxinf.models.config_json import apply_rope, common_fields, read_rope
from jaxinf.models.families import Family
from jaxinf.models.families.llama import block, rms_final_norm


def read_config(f) -> dict:
    kw = common_fields(f)
    n = kw["num_layers"]
    interval = f("no_rope_layer_interval", "int", 4)
    rope = f("no_rope_layers", "list", None)
    if rope is None:
        rope = [int((i + 1) % interval != 0) for i in range(n)]
    window = f("sliding_window", "int", None) if f("use_sliding_window", "bool", False) else None
    f.read.add("sliding_window")
    types = f("layer_types", "list", None)
    if types is None:  # transformers: the layers without rope slide, when there is a window
        types = ["sliding_attention" if window is not None and not rope[i] else "full_attention" for i in range(n)]
    if window is None or "sliding_attention" not in types:
        types = None
    kw.update(
        norm_eps=f("rms_norm_eps", "float", 1e-6),
        attention_bias=f("attention_bias", "bool", False),
        mlp_bias=f("mlp_bias", "bool", False),
        tie_embeddings=f("tie_word_embeddings", "bool", True),
        rope_layers=tuple(bool(r) for r in rope),
        layer_types=None if types is None else tuple(types),
        sliding_window=None if types is None else window,
    )
    return apply_rope(kw, read_rope(f, 2000000.0))


FAMILY = Family(
    name="smollm3",
    architectures=("SmolLM3ForCausalLM",),
    model_types=("smollm3",),
    read_config=read_config,
    block=block,
    final_norm=rms_final_norm,
)
