"""Gemma 3 text (``Gemma3ForCausalLM``): Gemma 2's block with (1 + w) RMSNorms of q and k, local and global rope.

q and k heads are normalized (weights ``[head_dim]``) before the rotary
embedding; sliding layers use the local rope base (``rope_parameters.sliding_attention``
or ``rope_local_base_freq``), full layers the global one (which may be scaled);
``layer_types`` default: every sixth layer full. Soft-caps are off unless set.
Checkpoint names as Gemma 2's plus ``self_attn.{q,k}_norm``.
"""

from __future__ import annotations

from flax import nnx

from jaxinf.models.config import ModelConfig
from jaxinf.models.config_json import apply_rope, common_fields, patterned_layers, per_type_rope
from jaxinf.models.families import Family
from jaxinf.models.families.gemma import gemma_norm
from jaxinf.models.families.gemma2 import block as gemma2_block
from jaxinf.models.families.gemma2 import gemma2_fields


def read_config(f) -> dict:
    kw = gemma2_fields(f, common_fields(f, "gelu_pytorch_tanh"))
    kw.update(
        attn_softcap=f("attn_logit_softcapping", "float", None),
        final_softcap=f("final_logit_softcapping", "float", None),
        layer_types=patterned_layers(f, kw["num_layers"], 6),
    )
    rope = per_type_rope(f, 1000000.0, "rope_local_base_freq")
    if rope.get("sliding_rope_theta") is None:
        rope["sliding_rope_theta"] = 10000.0
    return apply_rope(kw, rope)


def block(config: ModelConfig, rngs: nnx.Rngs):
    c = config
    return gemma2_block(c, rngs, q_norm=gemma_norm(c, c.head_dim), k_norm=gemma_norm(c, c.head_dim))


FAMILY = Family(
    name="gemma3",
    architectures=("Gemma3ForCausalLM",),
    model_types=("gemma3_text",),
    read_config=read_config,
    block=block,
    final_norm=gemma_norm,
    embed_scale=True,
)
