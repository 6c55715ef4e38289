"""A Hugging Face ``config.json`` read into a :class:`~jaxinf.models.config.ModelConfig`.

:func:`config_from_hf` reads the dictionary through the family's reader (a :class:`Fields`); the helpers below
(:func:`common_fields`, :func:`read_rope`, :func:`apply_rope`, :func:`patterned_layers`, :func:`per_type_rope`)
are the pieces the families' readers share. Every field it needs and cannot find, finds with a value this
implementation does not support, or does not know at all (a field that might change the computation) is a
:class:`~jaxinf.models.config.ConfigError` naming the file and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from jaxinf.models.config import LAYER_TYPES, ROPE_TYPES, ConfigError, ModelConfig

# Hugging Face names for the activations above (config.json "hidden_act").
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


# config.json fields that do not change the function a checkpoint computes in
# evaluation (metadata, token ids, generation, caching, dropout, attention
# kernels, the parameters' storage dtype): read by no family, refused by none.
IGNORED = frozenset(
    {
        "_name_or_path",
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "auto_map",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_return_dict",
        "attention_dropout",
        "hidden_dropout",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "embedding_dropout",
        "classifier_dropout",
        "summary_first_dropout",
        "summary_activation",
        "summary_proj_to_labels",
        "summary_type",
        "summary_use_proj",
        "task_specific_params",
        "id2label",
        "label2id",
        "problem_type",
        "tokenizer_class",
        "is_decoder",
        "is_encoder_decoder",
        "add_cross_attention",
        "tie_encoder_decoder",
        "chunk_size_feed_forward",
        "cross_attention_hidden_size",
        "finetuning_task",
        "prefix",
        "pruned_heads",
        "torchscript",
        "tf_legacy_loss",
        "use_bfloat16",
        "_attn_implementation_autoset",
        "attn_implementation",
        "pretraining_tp",
        "router_aux_loss_coef",
        "output_router_logits",
        "use_flash_attn",
        "cache_implementation",
        "final_dropout",
        "layerdrop",
        "gradient_checkpointing",
        "init_std",
        "bad_words_ids",
        "begin_suppress_tokens",
        "diversity_penalty",
        "do_sample",
        "early_stopping",
        "encoder_no_repeat_ngram_size",
        "exponential_decay_length_penalty",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "length_penalty",
        "max_length",
        "min_length",
        "no_repeat_ngram_size",
        "num_beam_groups",
        "num_beams",
        "num_return_sequences",
        "output_scores",
        "remove_invalid_values",
        "repetition_penalty",
        "return_dict_in_generate",
        "suppress_tokens",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
    }
)


def _field(cfg: Mapping[str, Any], key: str, source: str, kind: str = "int", default: Any = ...) -> Any:
    """``cfg[key]`` checked to be of ``kind`` (int, float, bool, str); absent or null gives ``default``."""
    value = cfg.get(key)
    expected = "a finite float" if kind == "float" else kind
    if value is None:
        if default is ...:
            raise ConfigError(
                f"{source}: field {key} is null, expected {expected}"
                if key in cfg
                else f"{source}: field {key} is missing"
            )
        return default
    ok = {
        "int": isinstance(value, int)
        and not isinstance(value, bool)
        or isinstance(value, float)
        and value.is_integer(),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, list),
        "object": isinstance(value, Mapping),
    }[kind]
    if not ok:
        raise ConfigError(f"{source}: field {key} has value {value!r}, expected {expected}")
    return {"int": int, "float": float}.get(kind, lambda v: v)(value)


class Fields:
    """Typed reads of one ``config.json`` that remember which fields were read.

    ``f(key, kind, default)`` reads a field (:func:`_field`); ``f.refuse(key,
    ...)`` rejects a field whose value is not neutral; :meth:`unread` lists the
    fields that no read touched, that are not in :data:`IGNORED` and that are not
    null: :func:`config_from_hf` refuses them, since jaxinf cannot know that they
    leave the computation unchanged.
    """

    def __init__(self, cfg: Mapping[str, Any], source: str):
        self.cfg, self.source = cfg, source
        self.read: set[str] = set()

    def __call__(self, key: str, kind: str = "int", default: Any = ...) -> Any:
        self.read.add(key)
        return _field(self.cfg, key, self.source, kind, default)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: field {key} {message}")

    def refuse(self, key: str, neutral: tuple = (None,), why: str = "is not implemented by jaxinf") -> None:
        """A :class:`ConfigError` when ``key`` is present with a value other than those in ``neutral``."""
        self.read.add(key)
        value = self.cfg.get(key)
        if value not in neutral:
            raise self.error(key, f"is {value!r}: {why}")

    def activation(self, key: str, default: str) -> str:
        act = self(key, "str", default)
        if act not in HF_ACTIVATIONS:
            raise self.error(key, f"is {act!r}, not supported (supported: {', '.join(HF_ACTIVATIONS)})")
        return HF_ACTIVATIONS[act]

    def unread(self) -> list[str]:
        return sorted(k for k, v in self.cfg.items() if k not in self.read and k not in IGNORED and v is not None)


def family_of(cfg: Mapping[str, Any], source: str) -> str:
    """The family of a ``config.json``: from ``architectures``, else ``model_type``."""
    from jaxinf.models.families import FAMILIES

    by_arch = {a: name for name, fam in FAMILIES.items() for a in fam.architectures}
    by_type = {t: name for name, fam in FAMILIES.items() for t in fam.model_types}
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    mt = cfg.get("model_type")
    for a in archs:
        if a in by_arch:
            types = FAMILIES[by_arch[a]].model_types
            if mt is not None and mt not in types:  # transformers builds the model of model_type's config class
                raise ConfigError(
                    f"{source}: field model_type: {mt!r} is not the model type of architecture {a!r} "
                    f"({', '.join(map(repr, types))}); transformers would load another model: fix "
                    "config.json"
                )
            return by_arch[a]
    if not archs and mt in by_type:
        return by_type[mt]
    name = archs[0] if archs else mt
    supported = ", ".join(by_arch)
    raise ConfigError(f"{source}: field architectures: unknown architecture {name!r} (supported: {supported})")


def read_rope(
    f: Fields, default_theta: float, default_partial: float = 1.0, layer_type: str | None = None
) -> dict[str, Any]:
    """Rotary fields from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``/``rotary_pct``.

    ``layer_type``: the entry of a ``rope_parameters`` keyed by layer type
    (Gemma 3: ``{"full_attention": {...}, "sliding_attention": {...}}``).
    Returns ``rope_type``, ``rope_theta``, ``partial`` and the scaling fields
    of the type; any other rope type is a :class:`ConfigError` naming it.
    """
    cfg, source = f.cfg, f.source
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    f.read.update({"rope_parameters", "rope_scaling"})
    params = cfg.get(key) or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{source}: field {key} has value {params!r}, expected an object")
    if layer_type is not None and set(params) & set(LAYER_TYPES):
        key = f"{key}.{layer_type}"
        params = params.get(layer_type) or {}
    sub = f"{source}: {key}"
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: field {key}.rope_type is {rope_type!r}, not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    known = {"rope_type", "type", "rope_theta", "partial_rotary_factor"} | _ROPE_FIELDS[rope_type]
    extra = sorted(k for k, v in params.items() if k not in known and v is not None)
    if extra:
        raise ConfigError(f"{source}: field {key}.{extra[0]} is not implemented by jaxinf for rope type {rope_type}")
    theta = _field(params, "rope_theta", sub, "float", None)
    if theta is None:
        theta = f("rope_theta", "float", None)
    if theta is None:
        theta = f("rotary_emb_base", "float", default_theta)
    partial = _field(params, "partial_rotary_factor", sub, "float", None)
    if partial is None:
        partial = f("partial_rotary_factor", "float", None)
    if partial is None:
        partial = f("rotary_pct", "float", default_partial)
    out: dict[str, Any] = {"rope_type": rope_type, "rope_theta": theta, "partial": partial}
    max_pos = f("max_position_embeddings", "int", 2048 if rope_type == "dynamic" else 8192)
    if rope_type in ("llama3", "yarn", "longrope"):
        # transformers prefers a top-level original_max_position_embeddings (Phi-3) for yarn and longrope
        top = f("original_max_position_embeddings", "int", None) if rope_type != "llama3" else None
        original = top if top is not None else _field(params, "original_max_position_embeddings", sub, "int", max_pos)
        out["rope_original_max_position"] = original
    if rope_type in ("linear", "llama3", "dynamic"):
        out["rope_factor"] = _field(params, "factor", sub, "float")
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = _field(params, "low_freq_factor", sub, "float")
        out["rope_high_freq_factor"] = _field(params, "high_freq_factor", sub, "float")
    if rope_type in ("yarn", "longrope"):
        factor = _field(params, "factor", sub, "float", None)
        factor = max_pos / original if factor is None else factor
        attention = _field(params, "attention_factor", sub, "float", None)
        out["rope_factor"] = factor
        if rope_type == "yarn":
            mscale = _field(params, "mscale", sub, "float", None)
            mscale_all = _field(params, "mscale_all_dim", sub, "float", None)
            if attention is None:
                attention = (
                    yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
                    if mscale and mscale_all
                    else yarn_mscale(factor)
                )
            out["rope_beta_fast"] = _field(params, "beta_fast", sub, "float", None) or 32.0
            out["rope_beta_slow"] = _field(params, "beta_slow", sub, "float", None) or 1.0
            out["rope_truncate"] = _field(params, "truncate", sub, "bool", True)
        else:
            if attention is None:
                attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            for k in ("long_factor", "short_factor"):
                values = _field(params, k, sub, "list")
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                    raise ConfigError(f"{sub}.{k} must be a list of numbers")
                out[f"rope_{k}"] = tuple(float(v) for v in values)
        out["rope_attention_factor"] = float(attention)
    elif params.get("factor") not in (None, 1, 1.0) and rope_type == "default":
        raise ConfigError(f"{source}: field {key}.factor is {params['factor']!r}, unused by rope type {rope_type}")
    return out


# The rope_parameters fields each rope type reads (beyond rope_type, rope_theta, partial_rotary_factor).
_ROPE_FIELDS = {
    "default": {"factor"},
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {
        "factor",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
        "original_max_position_embeddings",
    },
    "longrope": {"factor", "attention_factor", "long_factor", "short_factor", "original_max_position_embeddings"},
}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: ``0.1 mscale ln(scale) + 1`` for ``scale > 1``, else 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def config_from_hf(cfg: Mapping[str, Any], source: str = "config.json", **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` (``overrides``: dtype, scan, ...).

    The family (from ``architectures``, else ``model_type``) reads its fields
    with the defaults transformers applies when a field is absent; both the
    transformers 5 layout (``rope_parameters``) and the older one
    (``rope_theta``, ``rope_scaling``, ``rotary_pct``, ``rotary_emb_base``) are
    read. A non-null field that the family does not read and that is not in
    :data:`IGNORED` is a :class:`ConfigError` naming it.
    """
    from jaxinf.models.families import FAMILIES

    family = family_of(cfg, source)
    f = Fields(cfg, source)
    kw = FAMILIES[family].read_config(f)
    kw.update(family=family, initializer_range=f("initializer_range", "float", 0.02))
    unread = f.unread()
    if unread:
        raise ConfigError(
            f"{source}: field {unread[0]} is not implemented by jaxinf's {family} "
            f"(it may change the computation)" + (f"; also {', '.join(unread[1:])}" if unread[1:] else "")
        )
    kw.update(overrides)
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {str(e).removeprefix('model config: ')}") from None


def common_fields(f: Fields, act_default: str = "silu") -> dict[str, Any]:
    """The fields every Llama-like ``config.json`` names alike: sizes, heads, activation, positions."""
    heads = f("num_attention_heads")
    hidden = f("hidden_size")
    return dict(
        vocab_size=f("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f("intermediate_size"),
        num_layers=f("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=f("num_key_value_heads", "int", heads),
        head_dim=f("head_dim", "int", None) or (hidden // heads if heads > 0 else 0),  # heads <= 0: refused
        max_position_embeddings=f("max_position_embeddings", "int", 2048),
        activation=f.activation("hidden_act", act_default),
    )


def apply_rope(kw: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
    """``kw`` with the rotary fields of :func:`read_rope` (``rotary_dim`` from its ``partial``)."""
    rope = dict(rope)
    kw["rotary_dim"] = int(kw["head_dim"] * rope.pop("partial"))
    kw.update(rope)
    return kw


def patterned_layers(f: Fields, num_layers: int, pattern: int) -> tuple[str, ...]:
    """``layer_types`` of a config, else every ``pattern``-th layer full and the others sliding (the older
    ``sliding_window_pattern`` field when present)."""
    types = f("layer_types", "list", None)
    f.read.update({"sliding_window_pattern", "_sliding_window_pattern"})  # what layer_types was made from
    if types is None:
        pattern = f("sliding_window_pattern", "int", pattern)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    return tuple(types)


def per_type_rope(f: Fields, default_theta: float, local_theta_field: str | None = None) -> dict[str, Any]:
    """The rotary fields of configs whose ``rope_parameters`` may be keyed by layer type (Gemma 3, OLMo 3).

    Full-attention layers take the ``full_attention`` entry (any supported
    rope type); sliding layers the ``sliding_attention`` entry, which must be
    unscaled (``default``), giving ``sliding_rope_theta``. A flat layout gives
    both the same rope, or, with ``local_theta_field`` (Gemma 3's
    ``rope_local_base_freq``), sliding layers that theta.
    """
    full = read_rope(f, default_theta, layer_type="full_attention")
    params = f.cfg.get("rope_parameters") or {}
    if isinstance(params, Mapping) and set(params) & set(LAYER_TYPES):
        sliding = read_rope(f, default_theta, layer_type="sliding_attention")
        if sliding["rope_type"] != "default" or sliding["partial"] != full["partial"]:
            raise f.error("rope_parameters.sliding_attention", "is scaled or partial: not implemented by jaxinf")
        full["sliding_rope_theta"] = sliding["rope_theta"]
    elif local_theta_field is not None:
        full["sliding_rope_theta"] = f(local_theta_field, "float", None)
    return full
