"""OLMo 3 (``Olmo3ForCausalLM``): OLMo 2's block with sliding-window layers.

``layer_types`` (default: every fourth layer full, the others sliding within
``sliding_window``); ``rope_parameters`` may differ per layer type (the
sliding entry unscaled). Checkpoint names as OLMo 2's.
"""

from __future__ import annotations

from jaxinf.models.config_json import apply_rope, patterned_layers, per_type_rope
from jaxinf.models.families import Family
from jaxinf.models.families.llama import rms_final_norm
from jaxinf.models.families.olmo2 import block, olmo2_fields


def read_config(f) -> dict:
    kw = olmo2_fields(f)
    kw.update(sliding_window=f("sliding_window", "int", 4096), layer_types=patterned_layers(f, kw["num_layers"], 4))
    return apply_rope(kw, per_type_rope(f, 10000.0))


FAMILY = Family(
    name="olmo3",
    architectures=("Olmo3ForCausalLM",),
    model_types=("olmo3",),
    read_config=read_config,
    block=block,
    final_norm=rms_final_norm,
)
