"""The registry of model families: one module per family, each declaring a :class:`Family`.

A family module holds everything about one Hugging Face architecture: how its
``config.json`` maps to a :class:`~jaxinf.models.config.ModelConfig`
(``read_config``), its transformer block (``block``), its final norm, and the
names of its modules (hence of its checkpoint tensors and tracked layers).
:data:`FAMILIES` maps each family name to its :class:`Family`; adding a
family is one module here plus its entry in :data:`_MODULES`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any


def _no_problems(config) -> list[str]:
    return []


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: config mapping, block, and module (= checkpoint tensor) names.

    - ``read_config(fields) -> dict``: :class:`~jaxinf.models.config.ModelConfig`
      keyword arguments from a :class:`~jaxinf.models.config_json.Fields` over ``config.json``;
    - ``block(config, rngs)``: an NNX module ``block(h, ctx, tap, prefix) -> h``;
    - ``final_norm(config)``: the norm after the last block;
    - ``backbone``/``embed``/``layers``/``norm``: attribute names of the
      backbone module and, inside it, of the token embedding, the layer list
      and the final norm (``model.embed_tokens``, ``model.layers``, ``model.norm``);
    - ``positions``: the learned absolute position embedding, if any (GPT-2 ``wpe``);
    - ``embed_scale``: token embeddings are multiplied by ``sqrt(hidden_size)`` (Gemma);
    - ``head_aliases``: other checkpoint names of ``lm_head.weight`` (GPT-NeoX ``embed_out.weight``);
    - ``linear_transposed``: checkpoints store linear weights ``[d_out, d_in]``
      (``torch.nn.Linear``); False for GPT-2's ``Conv1D`` (``[d_in, d_out]``);
    - ``buffers``: regular expressions of checkpoint tensors that are not
      parameters and that transformers recomputes and ignores on loading
      (rotary ``inv_freq``, causal-mask buffers); any other unused tensor is an error;
    - ``renames``: ``(pattern, replacement)`` regular expressions from a
      parameter's module path to its checkpoint name, where the two differ
      (Mixtral: ``mlp.experts.{e}.gate_proj`` is stored as ``block_sparse_moe.experts.{e}.w1``);
    - ``check(config) -> [problem, ...]``: what this family cannot build.
    """

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    read_config: Callable[[Any], dict[str, Any]]
    block: Callable[..., Any]
    final_norm: Callable[[Any], Any]
    backbone: str = "model"
    embed: str = "embed_tokens"
    layers: str = "layers"
    norm: str = "norm"
    positions: str | None = None
    embed_scale: bool = False
    head_aliases: tuple[str, ...] = ()
    linear_transposed: bool = True
    buffers: tuple[str, ...] = (r"\.rotary_emb\.inv_freq$",)
    renames: tuple[tuple[str, str], ...] = ()
    check: Callable[[Any], list[str]] = _no_problems


_MODULES = (
    "llama",
    "gpt_neox",
    "cohere",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "olmo",
    "olmo2",
    "olmo3",
    "gpt2",
    "phi3",
    "cohere2",
    "stablelm",
    "smollm3",
    "mixtral",
    "qwen3_moe",
    "olmoe",
    "gpt_bigcode",
)

FAMILIES: dict[str, Family] = {}
for _name in _MODULES:
    _family = importlib.import_module(f"jaxinf.models.families.{_name}").FAMILY
    FAMILIES[_family.name] = _family
