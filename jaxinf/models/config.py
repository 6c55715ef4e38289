"""What a decoder LM is made of: one frozen, hashable config for every family.

A :class:`ModelConfig` describes a model of one of the registered families
(:mod:`jaxinf.models.families`) completely: shapes, the rotary embedding,
biases, ties, attention windows and soft-caps, and the dtypes and layer
stacking of *this* implementation. It is static (it lives in the NNX graph
definition), so two models with equal configs share compiled programs. What a
family fixes in code (its norms, where they sit, which projections carry
biases) is in its module; what its ``config.json`` may vary is here.

:func:`jaxinf.models.config_json.config_from_hf` reads a Hugging Face
``config.json`` dictionary into one, naming the file and the field of anything it
cannot use (a :class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxinf.errors import UserError

DTYPES = ("float32", "bfloat16", "float16", "float64")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")


class ModelError(UserError):
    """A model config or checkpoint that cannot be used; the message is one line naming the file and field or tensor."""


class ConfigError(ModelError):
    """A model configuration that this implementation cannot build (names the file and field)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only LM of one of the registered families (:data:`jaxinf.models.families.FAMILIES`).

    Each family's module documents its block; the fields here are what the
    families' ``config.json`` files vary. All families are causal decoders;
    every layer ``i`` attends with the kind ``layer_types[i]``
    (``full_attention`` or ``sliding_attention``: keys ``s`` with
    ``t - sliding_window < s <= t``) and applies the rotary embedding when
    ``rope_layers[i]`` (both default to every layer full and rotated).
    Sliding layers use ``sliding_rope_theta`` when it is set.

    Attention scores are ``q k / sqrt(query_pre_attn_scalar or head_dim)``,
    soft-capped as ``c tanh(x / c)`` with ``c = attn_softcap`` when set;
    ``clip_qkv`` clamps q, k and v to ``[-clip, clip]``; logits are
    ``logit_scale * x`` then soft-capped by ``final_softcap``. A mixture of
    experts routes each token to ``experts_per_token`` of ``num_experts`` experts.

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
    # None in the constructor: derived by __post_init__ (num_heads, hidden_size // num_heads, head_dim), so the
    # attribute is always an int; the checker cannot follow __post_init__'s object.__setattr__, hence the ignores.
    num_kv_heads: int = None  # type: ignore[assignment]
    head_dim: int = None  # type: ignore[assignment]
    rotary_dim: int = None  # type: ignore[assignment]
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rope_attention_factor: float = 1.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    rope_long_factor: tuple[float, ...] | None = None
    rope_short_factor: tuple[float, ...] | None = None
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    activation: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    logit_scale: float = 1.0
    qk_norm: bool = False
    parallel_residual: bool = True
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_layers: tuple[bool, ...] | None = None
    sliding_rope_theta: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    clip_qkv: float | None = None
    num_experts: int = 0
    experts_per_token: int = 0
    moe_renormalize: bool = True
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = None  # type: ignore[assignment]   # None in the constructor: dtype (__post_init__)
    scan: bool = True
    remat: bool = False

    def __post_init__(self):
        from jaxinf.models.families import FAMILIES

        fix = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass defaults)
        if self.num_kv_heads is None:
            fix("num_kv_heads", self.num_heads)
        if self.head_dim is None:
            fix("head_dim", self.hidden_size // self.num_heads if self.num_heads else 0)
        if self.rotary_dim is None:
            fix("rotary_dim", self.head_dim)
        if self.param_dtype is None:
            fix("param_dtype", self.dtype)
        for k in ("layer_types", "rope_layers", "rope_long_factor", "rope_short_factor"):
            if getattr(self, k) is not None:
                fix(k, tuple(getattr(self, k)))
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
        if self.num_heads <= 0 or self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_heads={self.num_heads} is not a positive multiple of num_kv_heads={self.num_kv_heads}"
            )
        if not (0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            problems.append(f"rotary_dim={self.rotary_dim} must be even and at most head_dim={self.head_dim}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.rope_type not in ROPE_TYPES:
            problems.append(f"rope_type {self.rope_type!r} is not one of {', '.join(ROPE_TYPES)}")
        if self.rope_type == "longrope" and not (
            len(self.rope_long_factor or ()) == len(self.rope_short_factor or ()) == self.rotary_dim // 2
        ):
            problems.append(
                f"longrope needs long_factor and short_factor of rotary_dim/2 = {self.rotary_dim // 2} values each"
            )
        if not self.norm_eps >= 0:  # a negative epsilon takes the root of a negative variance: NaN from layer 0
            problems.append(f"norm_eps (rms_norm_eps or layer_norm_eps)={self.norm_eps} must be at least 0")
        for k in ("rope_theta", "sliding_rope_theta"):  # the base of theta^(-2i/d): NaN or inf frequencies otherwise
            if self.rotary_dim and getattr(self, k) is not None and not getattr(self, k) > 0:
                problems.append(f"{k}={getattr(self, k)} must be positive")
        if min(self.vocab_size, self.hidden_size, self.intermediate_size, self.num_layers) <= 0:
            problems.append("vocab_size, hidden_size, intermediate_size and num_layers must be positive")
        for k in ("layer_types", "rope_layers"):
            v = getattr(self, k)
            if v is not None and len(v) != self.num_layers:
                problems.append(f"{k} has {len(v)} entries for {self.num_layers} layers")
        if self.layer_types is not None:
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                problems.append(f"layer_types {bad} are not among {', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) > 0:
                problems.append("sliding_attention layers need a positive sliding_window")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            problems.append(f"experts_per_token={self.experts_per_token} must be in 1..num_experts={self.num_experts}")
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        elif not problems:
            problems.extend(FAMILIES[self.family].check(self))
        if problems:
            raise ConfigError("model config: " + "; ".join(problems))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def spec(self):
        """The :class:`jaxinf.models.families.Family` of this config."""
        from jaxinf.models.families import FAMILIES

        return FAMILIES[self.family]

    @property
    def backbone(self) -> str:
        """The Hugging Face name of the module holding embeddings, layers and final norm."""
        return self.spec.backbone

    def layer_kind(self, i: int) -> tuple[bool, bool]:
        """``(sliding, rotary)`` of layer ``i``."""
        sliding = self.layer_types is not None and self.layer_types[i] == "sliding_attention"
        rotary = self.rope_layers is None or bool(self.rope_layers[i])
        return sliding, rotary

    @property
    def kinds(self) -> tuple[tuple[bool, bool], ...]:
        """The distinct ``(sliding, rotary)`` kinds of the layers, in order of first appearance."""
        return tuple(dict.fromkeys(self.layer_kind(i) for i in range(self.num_layers)))

    @property
    def layer_kind_indices(self) -> tuple[int, ...]:
        """Per layer, the index of its kind in :attr:`kinds`."""
        kinds = self.kinds
        return tuple(kinds.index(self.layer_kind(i)) for i in range(self.num_layers))

    def check_dtypes(self) -> None:
        """float64 needs ``jax.enable_x64``; without it jax would silently compute in float32."""
        for k in ("dtype", "param_dtype"):
            # jax.config declares its flags as they are read, not as attributes
            if getattr(self, k) == "float64" and not jax.config.jax_enable_x64:  # type: ignore[attr-defined]
                raise ConfigError(f"model {k} float64 needs 64-bit jax (use `with jax.enable_x64(True):`)")
