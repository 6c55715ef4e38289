"""What a decoder LM is made of: one frozen, hashable config for all three families.

A :class:`ModelConfig` describes a Llama, GPT-NeoX (Pythia) or Cohere (Command R)
model completely: shapes, the rotary embedding, the norms, biases, ties, and
the dtypes and layer stacking of *this* implementation. It is static (it lives
in the NNX graph definition), so two models with equal configs share compiled
programs.

:func:`config_from_hf` reads a Hugging Face ``config.json`` dictionary; every
field it needs and cannot find, or finds with a value this implementation does
not support, is a :class:`ConfigError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

FAMILIES = ("llama", "gpt_neox", "cohere")
DTYPES = ("float32", "bfloat16", "float16", "float64")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
ROPE_TYPES = ("default", "linear", "llama3")

# Hugging Face names for the activations above (config.json "hidden_act").
_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}

# config.json "architectures" / "model_type" -> family.
_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "GPTNeoXForCausalLM": "gpt_neox",
    "CohereForCausalLM": "cohere",
}
_HF_MODEL_TYPES = {"llama": "llama", "gpt_neox": "gpt_neox", "cohere": "cohere"}


class ModelError(ValueError):
    """A model config or checkpoint that cannot be used; the message is one line naming the file and field or tensor."""


class ConfigError(ModelError):
    """A model configuration that this implementation cannot build (names the file and field)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only LM of one of :data:`FAMILIES`.

    Family semantics (all pre-norm, causal, rotary):

    - ``llama``: ``h += attn(rms(h)); h += mlp(rms(h))``, gated MLP
      ``down(act(gate(x)) * up(x))``, RMSNorm, rotary on halves of each head.
    - ``gpt_neox``: LayerNorm with bias, fused ``query_key_value`` (per head
      ``[q, k, v]``), rotary on the first ``rotary_dim`` features of each head,
      MLP ``dense_4h_to_h(act(dense_h_to_4h(x)))``; ``parallel_residual``:
      ``h += attn(ln1(h)) + mlp(ln2(h))``, otherwise sequential.
    - ``cohere``: one LayerNorm without bias, ``h += attn(x) + mlp(x)`` with
      ``x = ln(h)``, gated MLP, rotary on interleaved pairs, logits scaled by
      ``logit_scale``, optional per-head LayerNorm of q and k (``qk_norm``).

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the
    parameters (default: ``dtype``); ``scan`` stacks the layers for ``lax.scan``
    (``remat`` then recomputes each layer's activations in the backward pass;
    it has no effect on unstacked layers).
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rotary_dim: int | None = None
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    activation: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    logit_scale: float = 1.0
    qk_norm: bool = False
    parallel_residual: bool = True
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str | None = None
    scan: bool = True
    remat: bool = False

    def __post_init__(self):
        fix = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass defaults)
        if self.num_kv_heads is None:
            fix("num_kv_heads", self.num_heads)
        if self.head_dim is None:
            fix("head_dim", self.hidden_size // self.num_heads if self.num_heads else 0)
        if self.rotary_dim is None:
            fix("rotary_dim", self.head_dim)
        if self.param_dtype is None:
            fix("param_dtype", self.dtype)
        problems = []
        for k in ("dtype", "param_dtype"):
            try:
                name = jnp.dtype(getattr(self, k)).name
            except TypeError:
                problems.append(f"{k} {getattr(self, k)!r} is not a dtype")
                continue
            if name in DTYPES:
                fix(k, name)
            else:
                problems.append(f"{k} {getattr(self, k)!r} is not one of {', '.join(DTYPES)}")
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.num_heads <= 0 or self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a positive multiple of num_kv_heads={self.num_kv_heads}")
        if self.family == "gpt_neox" and self.num_kv_heads != self.num_heads:
            problems.append("gpt_neox has no grouped-query attention (num_kv_heads must equal num_heads)")
        if self.family == "gpt_neox" and self.head_dim * self.num_heads != self.hidden_size:
            problems.append("gpt_neox needs head_dim * num_heads == hidden_size")
        if not (0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            problems.append(f"rotary_dim={self.rotary_dim} must be even and at most head_dim={self.head_dim}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.rope_type not in ROPE_TYPES:
            problems.append(f"rope_type {self.rope_type!r} is not one of {', '.join(ROPE_TYPES)}")
        if min(self.vocab_size, self.hidden_size, self.intermediate_size, self.num_layers) <= 0:
            problems.append("vocab_size, hidden_size, intermediate_size and num_layers must be positive")
        if problems:
            raise ConfigError("model config: " + "; ".join(problems))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def backbone(self) -> str:
        """The Hugging Face name of the module holding embeddings, layers and final norm."""
        return "gpt_neox" if self.family == "gpt_neox" else "model"

    def check_dtypes(self) -> None:
        """float64 needs ``jax.enable_x64``; without it jax would silently compute in float32."""
        for k in ("dtype", "param_dtype"):
            if getattr(self, k) == "float64" and not jax.config.jax_enable_x64:
                raise ConfigError(f"model {k} float64 needs 64-bit jax (use `with jax.enable_x64(True):`)")


# --------------------------------------------------------------------------- config.json


def _field(cfg: Mapping[str, Any], key: str, source: str, kind: str = "int", default: Any = ...) -> Any:
    """``cfg[key]`` checked to be of ``kind`` (int, float, bool, str); absent or null gives ``default``."""
    value = cfg.get(key)
    if value is None:
        if default is ...:
            raise ConfigError(f"{source}: field {key} is missing")
        return default
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer(),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise ConfigError(f"{source}: field {key} has value {value!r}, expected {kind}")
    return {"int": int, "float": float}.get(kind, lambda v: v)(value)


def family_of(cfg: Mapping[str, Any], source: str) -> str:
    """The family of a ``config.json``: from ``architectures``, else ``model_type``."""
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    for a in archs:
        if a in _HF_ARCHITECTURES:
            return _HF_ARCHITECTURES[a]
    mt = cfg.get("model_type")
    if not archs and mt in _HF_MODEL_TYPES:
        return _HF_MODEL_TYPES[mt]
    name = archs[0] if archs else mt
    supported = ", ".join(_HF_ARCHITECTURES)
    raise ConfigError(f"{source}: field architectures: unknown architecture {name!r} (supported: {supported})")


def _rope(cfg: Mapping[str, Any], source: str, default_theta: float, default_partial: float) -> dict[str, Any]:
    """Rotary fields from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``/``rotary_pct``."""
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    params = cfg.get(key) or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{source}: field {key} has value {params!r}, expected an object")
    sub = f"{source}: {key}"
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: field {key}.rope_type is {rope_type!r}, not supported "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    theta = _field(params, "rope_theta", sub, "float", None)
    if theta is None:
        theta = _field(cfg, "rope_theta", source, "float", None)
    if theta is None:
        theta = _field(cfg, "rotary_emb_base", source, "float", default_theta)
    partial = _field(params, "partial_rotary_factor", sub, "float", None)
    if partial is None:
        partial = _field(cfg, "partial_rotary_factor", source, "float", None)
    if partial is None:
        partial = _field(cfg, "rotary_pct", source, "float", default_partial)
    out: dict[str, Any] = {"rope_type": rope_type, "rope_theta": theta, "partial": partial}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = _field(params, "factor", sub, "float")
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = _field(params, "low_freq_factor", sub, "float")
        out["rope_high_freq_factor"] = _field(params, "high_freq_factor", sub, "float")
        out["rope_original_max_position"] = _field(
            params, "original_max_position_embeddings", sub, "int", _field(cfg, "max_position_embeddings", source, "int", 8192))
    return out


def config_from_hf(cfg: Mapping[str, Any], source: str = "config.json", **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` (``overrides``: dtype, scan, ...).

    Reads both the transformers 5 layout (``rope_parameters``) and the older one
    (``rope_theta``, ``rope_scaling``, ``rotary_pct``, ``rotary_emb_base``),
    with the defaults transformers applies when a field is absent.
    """
    family = family_of(cfg, source)
    f = lambda key, kind="int", default=...: _field(cfg, key, source, kind, default)  # noqa: E731
    heads = f("num_attention_heads")
    hidden = f("hidden_size")
    act = f("hidden_act", "str", "gelu" if family == "gpt_neox" else "silu")
    if act not in _HF_ACTIVATIONS:
        raise ConfigError(f"{source}: field hidden_act is {act!r}, not supported "
                          f"(supported: {', '.join(_HF_ACTIVATIONS)})")
    kw: dict[str, Any] = dict(
        family=family,
        vocab_size=f("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f("intermediate_size"),
        num_layers=f("num_hidden_layers"),
        num_heads=heads,
        max_position_embeddings=f("max_position_embeddings", "int", 2048),
        initializer_range=f("initializer_range", "float", 0.02),
        activation=_HF_ACTIVATIONS[act],
    )
    if family == "llama":
        rope = _rope(cfg, source, 10000.0, 1.0)
        kw.update(
            num_kv_heads=f("num_key_value_heads", "int", heads),
            head_dim=f("head_dim", "int", None) or hidden // heads,
            norm_eps=f("rms_norm_eps", "float", 1e-6),
            attention_bias=f("attention_bias", "bool", False),
            mlp_bias=f("mlp_bias", "bool", False),
            tie_embeddings=f("tie_word_embeddings", "bool", False),
        )
    elif family == "gpt_neox":
        rope = _rope(cfg, source, 10000.0, 0.25)
        kw.update(
            head_dim=hidden // heads,
            norm_eps=f("layer_norm_eps", "float", 1e-5),
            attention_bias=f("attention_bias", "bool", True),
            mlp_bias=True,
            tie_embeddings=f("tie_word_embeddings", "bool", False),
            parallel_residual=f("use_parallel_residual", "bool", True),
        )
    else:
        rope = _rope(cfg, source, 500000.0, 1.0)
        kw.update(
            num_kv_heads=f("num_key_value_heads", "int", heads),
            head_dim=f("head_dim", "int", None) or hidden // heads,
            norm_eps=f("layer_norm_eps", "float", 1e-5),
            attention_bias=f("attention_bias", "bool", False),
            tie_embeddings=f("tie_word_embeddings", "bool", True),
            logit_scale=f("logit_scale", "float", 0.0625),
            qk_norm=f("use_qk_norm", "bool", False),
        )
    partial = rope.pop("partial")
    if family == "cohere" and partial != 1.0:
        raise ConfigError(f"{source}: field partial_rotary_factor is {partial}, but cohere rotates whole heads")
    kw["rotary_dim"] = int(kw["head_dim"] * partial)
    kw.update(rope)
    kw.update(overrides)
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {str(e).removeprefix('model config: ')}") from None
