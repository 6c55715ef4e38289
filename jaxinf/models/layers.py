"""Building blocks shared by the model families: tracked linear layers, norms, rotary, attention.

Every linear layer is a :class:`Linear` that computes through
:meth:`jaxinf.engine.capture.Tap.linear` under its Hugging Face module name, so the
engine tracks it. Parameters follow Flax's names and orientation (``kernel``
``[d_in, d_out]``, ``bias``, ``scale``, ``embedding``); :mod:`jaxinf.models.hf`
maps them to checkpoint tensors (a kernel is the transposed ``weight``).

Each parameter declares its logical axes (:class:`jaxinf.sharding.axes.Axes`) in its
``nnx.Param`` metadata: a linear layer's by its role (:data:`COLUMN`, :data:`ROW`,
:data:`HEAD`, :data:`ROUTER`), embeddings ``vocab``/``positions`` by ``embed``, norms
replicated. :func:`jaxinf.models.parameter_axes` reads them back.

Precision follows transformers: norms and the attention softmax are computed in
at least float32 and cast back to the compute dtype; the rotary tables are
computed in float64 on the host and cast to the compute dtype (transformers
computes them in float32, so float32 tables differ from it by rounding only).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinf.engine.capture import Tap
from jaxinf.models.config import ModelConfig
from jaxinf.sharding.axes import REPLICATED, Axes, param
from jaxinf.sharding.partitioning import layer_parameter

Array = jax.Array


class LinearAxes(NamedTuple):
    """The logical axes of a linear layer's ``kernel`` ``[d_in, d_out]`` and ``bias`` ``[d_out]``."""

    kernel: Axes
    bias: Axes


COLUMN = LinearAxes(param("embed", "ff"), param("ff"))
"""From the residual stream to a wider space (q/k/v, gate/up, fused input projections): split along ``ff``."""

ROW = LinearAxes(param("ff", "embed"), REPLICATED)
"""Back to the residual stream (o_proj, down_proj): the kernel split along its input; the small bias replicated."""

HEAD = LinearAxes(param("embed", "vocab"), REPLICATED)
"""The output projection ``lm_head`` ``[hidden, vocab]``."""

ROUTER = LinearAxes(param("in", "out"), REPLICATED)
"""A mixture of experts' router ``[hidden, experts]``."""

VOCAB = param("vocab", "embed")
"""The token embedding ``[vocab, hidden]``."""

POSITIONS = param("positions", "embed")
"""A learned position embedding ``[positions, hidden]``."""


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: str) -> Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def upcast(dtype) -> jnp.dtype:
    """The dtype norms and softmax are computed in: ``dtype`` promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


class Linear(nnx.Module):
    """``s = x @ kernel (+ bias)``, a tracked layer named ``name`` (its Hugging Face module path).

    ``kernel``: ``[d_in, d_out]`` (the checkpoint's ``weight`` transposed), ``bias``: ``[d_out]``.
    """

    def __init__(
        self, name: str, d_in: int, d_out: int, *, bias: bool, axes: LinearAxes, config: ModelConfig, rngs: nnx.Rngs
    ):
        self.name = name
        self.kernel = nnx.Param(
            _normal(rngs, (d_in, d_out), config.initializer_range, config.param_dtype), axes=axes.kernel
        )
        self.bias = nnx.Param(jnp.zeros((d_out,), config.param_dtype), axes=axes.bias) if bias else None

    def __call__(self, x: Array, tap: Tap, prefix: str = "", tokens: Array | None = None) -> Array:
        """``tokens`` ``[B, T]``: the tokens that belong to this layer (an expert's routed tokens; None: all)."""
        bias = None if self.bias is None else self.bias[...]
        kernel = layer_parameter(self.kernel[...], self.kernel.get_metadata()["axes"])  # gathered over data (FSDP)
        return tap.linear(prefix + self.name, x, kernel, bias, tokens)


class Embed(nnx.Module):
    """Embedding ``embedding[id]``: ``embedding`` ``[rows, hidden]`` (``rows``: the vocabulary, or positions).

    ``axes``: :data:`VOCAB` or :data:`POSITIONS`.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, axes: Axes, rows: int | None = None):
        shape = (config.vocab_size if rows is None else rows, config.hidden_size)
        self.embedding = nnx.Param(_normal(rngs, shape, config.initializer_range, config.param_dtype), axes=axes)

    def __call__(self, tokens: Array, dtype) -> Array:
        table = layer_parameter(self.embedding[...], self.embedding.get_metadata()["axes"])
        return jnp.take(table, tokens, axis=0).astype(dtype)


class RMSNorm(nnx.Module):
    """``y = (offset + scale) * x / sqrt(mean(x^2) + eps)`` over the last axis.

    ``offset`` 0 (Llama: the product is taken in the input dtype, ``scale * y.astype(x.dtype)``)
    or 1 (Gemma: ``scale`` is stored as ``w - 1``, initialized to 0, and the
    product is taken in at least float32 before the cast back). ``scale`` may
    have leading axes that broadcast against ``x``.
    """

    def __init__(self, size: int | tuple[int, ...], eps: float, config: ModelConfig, offset: float = 0.0):
        self.eps = eps
        self.offset = offset
        shape = (size,) if isinstance(size, int) else tuple(size)
        self.scale = nnx.Param(jnp.full(shape, 1.0 - offset, config.param_dtype), axes=REPLICATED)

    def __call__(self, x: Array) -> Array:
        dt = upcast(x.dtype)
        h = x.astype(dt)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.scale[...].astype(dt))).astype(x.dtype)
        return (self.scale[...].astype(x.dtype) * h.astype(x.dtype)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """``y = scale * (x - mean(x)) / sqrt(var(x) + eps) (+ bias)`` over the last axis.

    ``scale`` may have leading axes (Cohere's per-head q/k norm: ``[heads, head_dim]``);
    ``parametric=False`` has neither scale nor bias (OLMo). Computed in at least float32 and cast back.
    """

    def __init__(self, shape: tuple[int, ...], eps: float, bias: bool, config: ModelConfig, parametric: bool = True):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones(shape, config.param_dtype), axes=REPLICATED) if parametric else None
        self.bias = nnx.Param(jnp.zeros(shape, config.param_dtype), axes=REPLICATED) if bias and parametric else None

    def __call__(self, x: Array) -> Array:
        dt = upcast(x.dtype)
        h = x.astype(dt)
        mu = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mu), axis=-1, keepdims=True)
        h = (h - mu) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            h = h * self.scale[...].astype(dt)
        if self.bias is not None:
            h = h + self.bias[...].astype(dt)
        return h.astype(x.dtype)


def activation(name: str, x: Array) -> Array:
    """``silu(x) = x sigmoid(x)``, exact ``gelu`` (erf), ``gelu_tanh`` (tanh approximation), ``relu``."""
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")


# --------------------------------------------------------------------------- rotary embedding


def inverse_frequencies(config: ModelConfig, sliding: bool = False, length: int = 0) -> np.ndarray:
    """``inv_freq[i] = theta^(-2i / R)`` for ``i < R / 2`` (``R = rotary_dim``), then the rope scaling (float64).

    - ``linear``: ``inv_freq / factor``.
    - ``llama3`` (wavelength ``w = 2 pi / inv_freq``, ``L`` the original context):
      unchanged where ``w < L / high_freq_factor``, ``inv_freq / factor`` where
      ``w > L / low_freq_factor``, and in between ``(1 - s) inv_freq / factor + s inv_freq``
      with ``s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)``.
    - ``dynamic`` (NTK): for ``length > max_position_embeddings = M``,
      ``theta' = theta (factor length / M - factor + 1)^(R / (R - 2))``; else unchanged
      (transformers' rule for a forward pass of ``length`` positions).
    - ``yarn``: ``inv_freq (1 - e) / factor + inv_freq e`` with ``e = 1 - clip((i - lo) / (hi - lo), 0, 1)``,
      ``lo, hi`` the dimensions where ``beta_fast`` and ``beta_slow`` rotations fit the
      original context ``L``: ``d(b) = R ln(L / (2 pi b)) / (2 ln theta)``, floored and
      ceiled when ``truncate``, clipped to ``[0, R - 1]``.
    - ``longrope``: ``inv_freq / long_factor`` when ``length > L``, else ``inv_freq / short_factor``.

    For a ``sliding`` layer of a config with ``sliding_rope_theta`` (Gemma 3's
    local layers): ``theta = sliding_rope_theta`` and no scaling.
    """
    c = config
    R = c.rotary_dim
    exponents = np.arange(0, R, 2, dtype=np.float64) / R
    if sliding and c.sliding_rope_theta is not None:
        return 1.0 / c.sliding_rope_theta**exponents
    inv = 1.0 / c.rope_theta**exponents
    if c.rope_type == "linear":
        inv = inv / c.rope_factor
    elif c.rope_type == "llama3":
        L = c.rope_original_max_position
        wavelength = 2 * math.pi / inv
        scaled = np.where(wavelength > L / c.rope_low_freq_factor, inv / c.rope_factor, inv)
        s = (L / wavelength - c.rope_low_freq_factor) / (c.rope_high_freq_factor - c.rope_low_freq_factor)
        smooth = (1 - s) * scaled / c.rope_factor + s * scaled
        medium = (wavelength >= L / c.rope_high_freq_factor) & (wavelength <= L / c.rope_low_freq_factor)
        inv = np.where(medium, smooth, scaled)
    elif c.rope_type == "dynamic" and length > c.max_position_embeddings:
        M, f = c.max_position_embeddings, c.rope_factor
        inv = 1.0 / (c.rope_theta * (f * length / M - (f - 1)) ** (R / (R - 2))) ** exponents
    elif c.rope_type == "yarn":
        L = c.rope_original_max_position

        def dim(rotations: float) -> float:
            return R * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(c.rope_theta))

        lo, hi = dim(c.rope_beta_fast), dim(c.rope_beta_slow)
        if c.rope_truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, R - 1)
        if lo == hi:
            hi += 0.001
        extrapolation = 1 - np.clip((np.arange(R // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
        inv = inv / c.rope_factor * (1 - extrapolation) + inv * extrapolation
    elif c.rope_type == "longrope":
        factors = c.rope_long_factor if length > c.rope_original_max_position else c.rope_short_factor
        inv = inv / np.asarray(factors, np.float64)
    return inv


def rotary_tables(config: ModelConfig, length: int, dtype) -> tuple[Array, Array]:
    """``cos`` and ``sin`` of the angles ``t * inv_freq[i]`` for positions ``t < length``, per layer kind.

    Shape ``[kinds, length, rotary_dim/2]`` over :attr:`ModelConfig.kinds`; both
    are multiplied by ``rope_attention_factor`` (yarn, longrope; 1 otherwise,
    and for sliding layers with their own ``sliding_rope_theta``); a kind
    without rotary embedding gets ``cos = 1, sin = 0`` (the identity rotation).
    """
    cos, sin = [], []
    for sliding, rotary in config.kinds:
        angles = np.arange(length, dtype=np.float64)[:, None] * inverse_frequencies(config, sliding, length)[None, :]
        scale = 1.0 if sliding and config.sliding_rope_theta is not None else config.rope_attention_factor
        cos.append(scale * np.cos(angles) if rotary else np.ones_like(angles))
        sin.append(scale * np.sin(angles) if rotary else np.zeros_like(angles))
    return jnp.asarray(np.stack(cos).astype(dtype)), jnp.asarray(np.stack(sin).astype(dtype))


def apply_rotary(x: Array, cos: Array, sin: Array, interleaved: bool) -> Array:
    """Rotates the first ``2 * cos.shape[-1]`` features of each head of ``x`` ``[B, T, heads, head_dim]``.

    Pair ``(u_i, v_i)`` becomes ``(u_i cos_ti - v_i sin_ti, v_i cos_ti + u_i sin_ti)``,
    where the pairs are ``(x[i], x[i + R/2])`` (halves: Llama, GPT-NeoX) or
    ``(x[2i], x[2i+1])`` (``interleaved``: Cohere); features past ``R`` pass through.
    """
    R = 2 * cos.shape[-1]
    if R == 0:
        return x
    rot, rest = x[..., :R], x[..., R:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    if interleaved:
        pairs = rot.reshape(rot.shape[:-1] + (R // 2, 2))
        u, v = pairs[..., 0], pairs[..., 1]
        rot = jnp.stack([u * c - v * s, v * c + u * s], axis=-1).reshape(rot.shape)
    else:
        u, v = rot[..., : R // 2], rot[..., R // 2 :]
        rot = jnp.concatenate([u * c - v * s, v * c + u * s], axis=-1)
    return jnp.concatenate([rot, rest], axis=-1) if rest.shape[-1] else rot


# --------------------------------------------------------------------------- attention


def attention_mask(mask: Array, config: ModelConfig) -> Array:
    """``allowed[k, b, t, s]``: causal attention to real tokens, per layer kind ``k``, ``[kinds, B, T, T]``.

    ``(s <= t) and mask[b, s]``, and for a sliding kind also ``t - s < sliding_window``.
    """
    T = mask.shape[-1]
    t, s = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    out = []
    for sliding, _ in config.kinds:
        allowed = s <= t
        if sliding:
            assert config.sliding_window is not None  # ModelConfig refuses sliding layers without a window
            allowed = allowed & (t - s < config.sliding_window)
        out.append(allowed[None] & (mask[:, None, :] > 0))
    return jnp.stack(out)


def attention(
    q: Array, k: Array, v: Array, allowed: Array, scale: float | None = None, softcap: float | None = None
) -> Array:
    """Grouped-query softmax attention, ``softmax(cap(scale * q k^T)) v`` per head.

    ``q`` ``[B, T, H, D]``, ``k``/``v`` ``[B, S, K, D]`` with ``H = K * G``: query
    head ``h`` reads key/value head ``h // G``. ``scale`` defaults to
    ``D ** -0.5``; ``cap(x) = softcap * tanh(x / softcap)`` when ``softcap`` is set
    (Gemma 2), computed in the compute dtype. Disallowed scores are replaced by
    the dtype's most negative value (a fully masked row stays finite). The
    softmax runs in at least float32.
    """
    B, T, H, D = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) * jnp.asarray(D**-0.5 if scale is None else scale, q.dtype)
    if softcap is not None:
        scores = jnp.tanh(scores / jnp.asarray(softcap, scores.dtype)) * jnp.asarray(softcap, scores.dtype)
    dt = upcast(scores.dtype)
    scores = jnp.where(allowed[:, None, None], scores.astype(dt), jnp.finfo(dt).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(B, T, H * D)
