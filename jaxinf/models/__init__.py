"""Decoder-only LMs in Flax NNX (Llama, GPT-NeoX / Pythia, Cohere / Command R) and Hugging Face import.

- :class:`ModelConfig`: what a model is (family, shapes, rotary, dtypes, layer stacking);
- :class:`LM`: config + NNX graph + parameters (a nested dict of arrays), with the
  functional core ``lm.apply(params, tokens, mask, tap) -> logits`` and ``lm.task()``;
- :func:`init` (random weights), :func:`abstract` (shapes only, no memory),
  :func:`parameter_axes` (the declared logical axes of every parameter),
  :func:`from_hf` (a checkpoint directory, read tensor by tensor without torch),
  :func:`read_config`, :func:`load_tokenizer`.

Tracked layers carry their Hugging Face module names (``model.layers.3.mlp.up_proj``,
``gpt_neox.layers.3.attention.query_key_value``, ``lm_head``); see :mod:`jaxinf.models.decoder`.
"""

from jaxinf.models.config import ConfigError, ModelConfig, ModelError
from jaxinf.models.config_json import config_from_hf
from jaxinf.models.hf import CheckpointError, from_hf, load_tokenizer, read_config, save_hf
from jaxinf.models.lm import LM, abstract, init, parameter_axes, parameter_paths

__all__ = [
    "LM",
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "ModelError",
    "abstract",
    "config_from_hf",
    "from_hf",
    "init",
    "load_tokenizer",
    "parameter_axes",
    "parameter_paths",
    "read_config",
    "save_hf",
]
