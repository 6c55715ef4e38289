"""GPT-BigCode / StarCoder (``GPTBigCodeForCausalLM``): GPT-2's block with multi-query attention and ``nn.Linear`` layers.

``[q | k | v] = c_attn(x)`` with one key/value head (``multi_query``); learned
positions, LayerNorms with bias, MLP ``c_proj(act(c_fc(x)))``, tied head.
Weights are ``nn.Linear``'s ``[d_out, d_in]`` (unlike GPT-2's ``Conv1D``).
Without ``multi_query`` (a per-head ``[q, k, v]`` layout) the model is refused.
Checkpoint and tracked names as GPT-2's.
"""

from __future__ import annotations

import dataclasses

from jaxinf.models.families.gpt2 import FAMILY as GPT2
from jaxinf.models.families.gpt2 import read_config as gpt2_config


def read_config(f) -> dict:
    f.refuse("multi_query", (None, True), "(attention with a per-head [q, k, v] layout) is not implemented by jaxinf")
    # the softmax's float32 computation and its rescaling by the layer index change rounding only
    f("attention_softmax_in_fp32", "bool", True)
    f("scale_attention_softmax_in_fp32", "bool", True)
    kv = f("num_key_value_heads", "int", 1)
    if kv != 1:
        raise f.error("num_key_value_heads", f"is {kv}, but multi_query attention has one key/value head")
    kw = gpt2_config(f)
    kw["activation"] = f.activation("activation_function", "gelu_pytorch_tanh")
    kw["num_kv_heads"] = 1
    return kw


FAMILY = dataclasses.replace(
    GPT2,
    name="gpt_bigcode",
    architectures=("GPTBigCodeForCausalLM",),
    model_types=("gpt_bigcode",),
    read_config=read_config,
    linear_transposed=True,
    check=lambda c: (
        [] if c.head_dim * c.num_heads == c.hidden_size else ["gpt_bigcode needs head_dim * num_heads == hidden_size"]
    ),
)
