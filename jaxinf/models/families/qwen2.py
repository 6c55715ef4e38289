"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): Llama's block with biases on q, k and v (not on o).

Sliding-window layers where ``layer_types`` says so (transformers derives it
from ``use_sliding_window`` and ``max_window_layers``: layers from
``max_window_layers`` on). Checkpoint names as Llama's, plus
``self_attn.{q,k,v}_proj.bias``.
"""

from __future__ import annotations

import functools

from jaxinf.models.config_json import apply_rope, common_fields, read_rope
from jaxinf.models.families import Family
from jaxinf.models.families.llama import block, rms_final_norm


def layer_types(f, num_layers: int) -> dict:
    """``layer_types`` and ``sliding_window`` of a Qwen-style config, as transformers reads them.

    ``sliding_window`` counts only with ``use_sliding_window``; absent
    ``layer_types`` are sliding from layer ``max_window_layers`` on. A layer
    slides when its type is ``sliding_attention`` and there is a window.
    """
    use = f("use_sliding_window", "bool", False)
    window = f("sliding_window", "int", None) if use else None
    f.read.add("sliding_window")
    first = f("max_window_layers", "int", num_layers)
    types = f("layer_types", "list", None)
    if types is None:
        types = [
            "sliding_attention" if window is not None and i >= first else "full_attention" for i in range(num_layers)
        ]
    if window is None or "sliding_attention" not in types:
        return {"layer_types": None, "sliding_window": None}
    return {"layer_types": tuple(types), "sliding_window": window}


def read_config(f) -> dict:
    kw = common_fields(f)
    kw.update(
        norm_eps=f("rms_norm_eps", "float", 1e-6),
        tie_embeddings=f("tie_word_embeddings", "bool", False),
        **layer_types(f, kw["num_layers"]),
    )
    return apply_rope(kw, read_rope(f, 10000.0))


FAMILY = Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    read_config=read_config,
    block=functools.partial(block, qkv_bias=True, o_bias=False),
    final_norm=rms_final_norm,
)
