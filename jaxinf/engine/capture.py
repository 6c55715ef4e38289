"""How the engine sees a model: per-layer statistics formed inside the backward pass.

Everything the curvature and scoring stages need from a model is, for every
tracked linear layer ``s = a @ kernel (+ bias)`` and every token t of sequence n,

- ``a[n, t]``: the layer input, with a 1 appended when the layer has a bias, and
- ``g[n, t] = dL_n / ds[n, t]``: the gradient of the sequence loss
  ``L_n = sum_t loss[n, t]`` with respect to the layer output,

and every stage consumes them through one *statistic* per layer,
``f(a, g, mask, context) -> result`` (``mask`` ``[B, T]``: the layer's own
tokens): ``sum a a^T`` and ``sum g g^T`` and the token count (covariance),
``sum_n (Q_S^T G[n] Q_A)^2`` (Lambda), ``[Q, B]`` scores against the layer's
preconditioned query gradients, self-influence, or the query gradients
``G_q`` themselves. :func:`layer_statistics` evaluates ``f`` of every tracked
layer *where that layer's a and g exist*: inside the backward pass, at the
moment the backward pass reaches the layer. ``a`` and ``g`` of all layers are
never held at once; a step's memory is the parameters, the stage's state, the
residual stream that the backward pass keeps anyway (one per layer under
``remat``) and one layer's working set.

**The mechanism.** The model is written as a *loss function*

    loss_fn(params, batch, probes) -> token_losses [B, T]

in which every tracked linear layer goes through :meth:`Tap.linear`. For a
tracked layer the tap computes ``s = a @ kernel + bias`` and passes ``s``
through :func:`_observed`, an identity on ``s`` with a custom VJP that also
takes a zero *statistic probe* ``z`` (shaped like ``f``'s result) and the
layer's ``context``. Its backward rule receives the cotangent of ``s`` and
returns

- for ``s``: that cotangent unchanged, so the backward pass continues through
  the layer exactly as without the tap (the weight and input gradients are the
  matmul's, outside the custom VJP);
- for ``z``: ``f(a, g, mask, context)``, with ``a`` the layer input saved by the
  forward rule, ``g`` the cotangent of ``s`` and ``mask`` the layer's tokens.

:func:`layer_statistics` pulls back the cotangent ``1`` of every token loss
with respect to the probes ``z`` (one ``jax.vjp``). The cotangent arriving at
``s`` is then ``sum_{n', t'} d loss[n', t'] / d s[n, t]``; rows of a batch do
not interact (no operation of the model mixes sequences), so this is
``dL_n / ds[n, t] = g[n, t]``, the gradient of the sequence's own summed loss,
and the "gradient" returned for ``z`` is ``f(a, g, mask, context)`` evaluated on the
true ``a`` and ``g`` of the batch. The value is a statistic, not a derivative
(``z`` does not enter the loss): the VJP is only the vehicle that runs ``f``
at the right point of the backward pass. Padding is excluded by zeroing ``a``
and ``g`` at masked tokens before ``f`` sees them (``a``'s appended 1 is the
mask itself).

**A layer's own tokens.** A layer that sees only some tokens of the batch (an
expert of a mixture: the tokens routed to it) passes them to :meth:`Tap.linear`
as ``tokens`` ``[B, T]``; its mask is then ``probes.mask * tokens``, so its ``a``
and ``g`` are zero elsewhere and ``f`` receives that mask, from which a stage
counts the layer's own tokens and sequences (``N_tok``, ``N_seq`` per layer).

Layers stacked under ``lax.scan`` go through :meth:`Tap.scan`, which passes
each layer its own slice of the probes and contexts as scan inputs; the
transpose of the scan stacks the per-layer cotangents, so a scanned *block*
(named with ``*`` for the layer index, ``layers.*.mlp.up_proj``) yields its
statistics with a leading layer axis, one entry per layer index. Under
``remat`` (``jax.checkpoint`` of the scanned layer) each layer's forward pass,
``a`` included, is recomputed in the backward pass, and ``f`` runs right after:
only the residual stream between layers is stored across the whole depth. The
same holds under ``jit``, ``vmap`` (``f`` then sees one sequence's ``a``, ``g``)
and sharding (``f``'s collectives, e.g. a sum over documents split on the
``data`` axis, are those of its own einsums).

Kernels follow Flax's orientation (``[d_in, d_out]``, ``s = a @ kernel``); the
engine's matrices follow the paper's (``W: d_out x d_in``, per-sequence gradient
``G[n] = sum_t g[n,t] a[n,t]^T`` of shape ``[d_out, d_in']``).

Flax NNX modules use the same tap: :class:`jaxinf.models` layers take the tap as
an argument and call :meth:`Tap.linear`; a loss function built from a module is
``lambda params, batch, probes: ...nnx.merge(graphdef, params)(..., Tap(probes))``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.engine.precision import matmul_precision
from jaxinf.errors import UserError
from jaxinf.sharding.partitioning import unpadded

Array = jax.Array
Params = Any
Batch = Any

STACK = "*"
"""The placeholder for the layer index in the name of a scanned (stacked) block."""


class CaptureError(UserError):
    """A loss function, a layer selection or a batch that the engine cannot use."""


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A tracked linear layer, or a block of ``stack`` identical layers under ``lax.scan``.

    ``name`` is the block name (with ``*`` for the layer index when stacked);
    ``indices`` selects which layers of a stacked block are tracked (all when None).
    Arrays of a stacked block carry a leading axis of length ``len(layer_names)``.
    """

    name: str
    d_in: int
    d_out: int
    bias: bool
    dtype: str = "float32"
    stack: int = 0
    indices: tuple[int, ...] | None = None

    @property
    def d_in_aug(self) -> int:
        """Width of ``a`` as the engine sees it: ``d_in`` plus the appended 1 for a bias."""
        return self.d_in + int(self.bias)

    @property
    def stacked(self) -> bool:
        return self.stack > 0

    @property
    def layer_indices(self) -> tuple[int, ...]:
        if not self.stacked:
            return ()
        return self.indices if self.indices is not None else tuple(range(self.stack))

    @property
    def layer_names(self) -> tuple[str, ...]:
        """One name per tracked layer: the block name with ``*`` replaced by the index."""
        if not self.stacked:
            return (self.name,)
        return tuple(self.name.replace(STACK, str(i), 1) for i in self.layer_indices)

    @property
    def lead(self) -> tuple[int, ...]:
        """Leading shape of every per-layer array of this block: ``(n_layers,)`` or ``()``."""
        return (len(self.layer_indices),) if self.stacked else ()

    @property
    def num_params(self) -> int:
        """Parameters of the tracked layers of this block (kernel and bias)."""
        return int(np.prod(self.lead, dtype=np.int64)) * self.d_out * self.d_in_aug


class _Discovery:
    """Records every linear layer a loss function calls (see :func:`find_layers`)."""

    def __init__(self) -> None:
        self.layers: dict[str, LayerSpec] = {}

    def record(self, spec: LayerSpec) -> None:
        old = self.layers.get(spec.name)
        if old is not None and old != spec:
            raise CaptureError(
                f"layer {spec.name!r} is called twice with different shapes ({old} vs {spec}); "
                "give each tracked layer its own name"
            )
        self.layers[spec.name] = spec


Statistic = Callable[[Array, Array, Array, Any], Any]
"""``f(a, g, mask, context) -> result`` of one layer: ``a`` ``[B, T, d_in']`` and ``g`` ``[B, T, d_out]`` (zero at
masked tokens), ``mask`` ``[B, T]`` the layer's own tokens (the batch's mask times the layer's ``tokens``, see
:meth:`Tap.linear`), ``context`` the layer's slice of what the stage passes (eigenbases, query gradients, or None)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Probes:
    """What a loss function's taps need to form the statistic of every tracked block.

    ``z``: zero statistic probes per block (shaped like ``statistic``'s result, with the
    block's leading layer axis when stacked); ``context``: per block, the pytree ``statistic``
    receives (leading layer axis when stacked); ``active``: per stacked block whose tracked
    indices are a subset, ``1.0`` at tracked layers (None otherwise); ``mask``: ``[B, T]``.
    """

    statistic: Statistic = dataclasses.field(metadata=dict(static=True))
    z: dict[str, Any]
    context: dict[str, Any]
    active: dict[str, Array | None]
    mask: Array

    def layer(self, name: str) -> tuple[Any, Any, Array | None] | None:
        if name not in self.z:
            return None
        return self.z[name], self.context[name], self.active[name]


LossFn = Callable[[Params, Batch, Probes | None], Array]


def tokens_matmul(x: Array, kernel: Array) -> Array:
    """``x @ kernel`` for ``x`` ``[..., d_in]``, with every leading axis (batch, tokens) merged into one.

    The same product as ``jnp.matmul``; written as one 2-D matrix product because
    XLA's CPU backend computes the transposed product of the backward pass (the
    weight gradient ``x^T dy``) faster when it contracts one merged axis instead of the batch and token axes
    (``scripts/bench_fwd_bwd.py`` times both; docs/benchmarks.md, "Measurements behind code decisions")."""
    return jnp.matmul(x.reshape(-1, x.shape[-1]), kernel).reshape(x.shape[:-1] + kernel.shape[-1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _observed(
    statistic: Statistic, bias: bool, s: Array, x: Array, mask: Array, z: Any, context: Any, active: Array | None
) -> Array:
    """The identity on ``s``; its VJP returns ``statistic(a, g, mask, context)`` as the cotangent of ``z``."""
    return s


def _observed_fwd(statistic, bias, s, x, mask, z, context, active):
    return s, (x, mask, context, active)


def _observed_bwd(statistic, bias, residuals, g):
    x, mask, context, active = residuals

    def compute():
        with jax.named_scope("statistic"):  # names the statistic's ops in profiles and in the lowered program
            return statistic(augment(x, mask, bias), g * mask.astype(g.dtype)[..., None], mask, context)

    if active is None:
        stat = compute()
    else:  # a layer of a partially tracked stack: only the tracked ones compute
        stat = jax.lax.cond(
            active > 0, compute, lambda: jax.tree.map(lambda r: jnp.zeros(r.shape, r.dtype), jax.eval_shape(compute))
        )
    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    return g, jnp.zeros_like(x), jnp.zeros_like(mask), stat, zeros(context), zeros(active)


_observed.defvjp(_observed_fwd, _observed_bwd)


class Tap:
    """The tracked-layer recorder of one application of a loss function.

    Create one from the ``probes`` argument at the top of a loss function and
    route every tracked linear layer through :meth:`linear` and scanned layer
    stacks through :meth:`scan`. Layers without a probe (or with ``probes=None``)
    are computed as plain linear layers.
    """

    def __init__(
        self,
        probes: Probes | _Discovery | None = None,
        *,
        _prefix: str = "",
        _stack: int = 0,
        _layer: Mapping[str, tuple] | None = None,
    ):
        self._discovery = probes if isinstance(probes, _Discovery) else None
        self.probes = probes if isinstance(probes, Probes) else None
        self._prefix = _prefix
        self._stack = _stack
        self._layer = _layer  # inside a scan: this layer's (z, context, active) per inner name

    def linear(
        self, name: str, x: Array, kernel: Array, bias: Array | None = None, tokens: Array | None = None
    ) -> Array:
        """``s = x @ kernel + bias``; when the layer is tracked, its statistic is formed in the backward pass.

        ``tokens`` ``[B, T]`` (None: all) marks the tokens that belong to this layer (an expert: the tokens routed
        to it); the layer's mask is ``probes.mask * tokens``, so its statistic runs over those tokens only.
        """
        s = tokens_matmul(x, kernel.astype(x.dtype))
        if bias is not None:
            s = s + bias.astype(s.dtype)
        if self._discovery is not None:
            if x.ndim < 3:
                raise CaptureError(
                    f"layer {self._prefix + name!r}: input of shape {x.shape} has no token axis; "
                    "tracked layers take [batch, tokens, features] (use tokens=1 for non-sequence data)"
                )
            self._discovery.record(
                LayerSpec(
                    name=self._prefix + name,
                    d_in=int(x.shape[-1]),
                    d_out=int(kernel.shape[-1]),
                    bias=bias is not None,
                    dtype=jnp.dtype(s.dtype).name,
                    stack=self._stack,
                )
            )
        if self.probes is None:
            return s
        probe = self._layer.get(name) if self._layer is not None else self.probes.layer(name)
        if probe is None:
            return s
        if self.probes.mask.shape != s.shape[:-1]:
            raise CaptureError(
                f"layer {self._prefix + name!r}: output of shape {s.shape} does not match the mask "
                f"{self.probes.mask.shape}"
            )
        z, context, active = probe
        mask = self.probes.mask
        if tokens is not None:
            mask = mask * jax.lax.stop_gradient(tokens).astype(mask.dtype)
        return _observed(self.probes.statistic, bias is not None, s, x, mask, z, context, active)

    def scan(
        self,
        prefix: str,
        body: Callable[[Any, Any, Tap], Any],
        carry: Any,
        stacked_params: Any,
        *,
        remat: bool = False,
    ) -> Any:
        """``lax.scan`` of ``body(carry, layer_params, tap) -> carry`` over stacked layers.

        Layers called inside ``body`` as ``tap.linear("mlp.up_proj", ...)`` form the
        blocks ``f"{prefix}.*.mlp.up_proj"``; each layer receives its own slice of
        the block's probes and context, and the block's statistics come out with a
        leading layer axis. ``remat`` recomputes each layer's activations in the
        backward pass (``jax.checkpoint``), so only the carry is kept per layer.
        """
        if self._stack:
            raise CaptureError(f"nested Tap.scan under {self._prefix!r} is not supported")
        length = int(jax.tree.leaves(stacked_params)[0].shape[0])
        inner_prefix = f"{prefix}.{STACK}."
        per_layer: dict[str, tuple | None] = {}
        if self.probes is not None:
            per_layer = {
                k[len(inner_prefix) :]: self.probes.layer(k) for k in self.probes.z if k.startswith(inner_prefix)
            }
        discovery, probes = self._discovery, self.probes

        def step(c, xs):
            layer_params, layer_probes = xs
            layer_probes = unpadded(layer_probes)  # a context stack padded by partitioning.streamed
            tap = Tap(
                discovery if discovery is not None else probes,
                _prefix=self._prefix + inner_prefix,
                _stack=length,
                _layer=layer_probes,
            )
            return body(c, layer_params, tap), None

        if remat:
            step = jax.checkpoint(step)
        carry, _ = jax.lax.scan(step, carry, (stacked_params, per_layer))
        return carry


def find_layers(loss_fn: Callable[[Params, Batch, Any], Array], params: Params, batch: Batch) -> dict[str, LayerSpec]:
    """Every linear layer that ``loss_fn`` routes through a tap, with its shapes.

    Traces the function abstractly (``jax.eval_shape``: no FLOPs, no memory). ``loss_fn`` is a :data:`LossFn`
    called here with a discovery object in place of its probes, which it hands to :class:`Tap` as it would them.
    """
    discovery = _Discovery()
    jax.eval_shape(lambda p, b: loss_fn(p, b, discovery), params, batch)
    if not discovery.layers:
        raise CaptureError("the loss function calls no Tap.linear layer: nothing can be tracked")
    return dict(discovery.layers)


def select_layers(layers: Mapping[str, LayerSpec], track: str | Sequence[str]) -> dict[str, LayerSpec]:
    """The layers named by ``track`` (the config's ``factors.track``).

    ``"all"`` keeps every layer; ``"mlp"`` the layers with an ``mlp`` path
    component (``*mlp*``); otherwise a list of shell-style patterns matched
    against the per-layer names (``layers.3.mlp.up_proj``) and block names
    (``layers.*.mlp.up_proj``). A pattern that matches only some layers of a
    stacked block tracks those indices. No match is an error.
    """
    if isinstance(track, str):
        if track == "all":
            return dict(layers)
        patterns = ["*mlp*"] if track == "mlp" else [track]
    else:
        patterns = list(track)
    if not patterns:
        raise CaptureError("factors.track is empty: no layer to track")
    chosen: dict[str, LayerSpec] = {}
    for spec in layers.values():
        if any(fnmatch.fnmatchcase(spec.name, p) for p in patterns):
            chosen[spec.name] = spec
            continue
        full = dataclasses.replace(spec, indices=None)
        idx = tuple(
            i for i, n in zip(full.layer_indices, full.layer_names) if any(fnmatch.fnmatchcase(n, p) for p in patterns)
        )
        if idx:
            chosen[spec.name] = dataclasses.replace(spec, indices=None if len(idx) == spec.stack else idx)
    if not chosen:
        available = ", ".join(sorted(layers)) or "none"
        raise CaptureError(f"factors.track {patterns} matches no layer (layers: {available})")
    return chosen


def augment(x: Array, mask: Array, bias: bool) -> Array:
    """``a``: the layer input zeroed at masked tokens, with the mask itself appended as the bias 1."""
    m = mask.astype(x.dtype)[..., None]
    x = x * m
    if bias:
        x = jnp.concatenate([x, jnp.broadcast_to(m, x.shape[:-1] + (1,))], axis=-1)
    return x


def _result_shape(statistic: Statistic, spec: LayerSpec, batch_shape: tuple[int, ...], context: Any) -> Any:
    """Abstract result of ``statistic`` on one layer of ``spec`` (``context`` is that layer's slice)."""
    a = jax.ShapeDtypeStruct(tuple(batch_shape) + (spec.d_in_aug,), spec.dtype)
    g = jax.ShapeDtypeStruct(tuple(batch_shape) + (spec.d_out,), spec.dtype)
    mask = jax.ShapeDtypeStruct(tuple(batch_shape), jnp.float32)
    return jax.eval_shape(statistic, a, g, mask, context)


def _full_stack(x: Array, spec: LayerSpec) -> Array:
    """A per-tracked-layer array of a partially tracked stack, scattered to the whole stack (zeros elsewhere)."""
    full = jnp.zeros((spec.stack,) + x.shape[1:], x.dtype)
    return full.at[jnp.asarray(spec.indices)].set(x)


def _check_mask(loss_fn: LossFn, params: Params, batch: Batch, mask: Array, shape: tuple | None = None) -> None:
    """Raises a :class:`CaptureError` when the token losses (of ``shape``; traced abstractly when not given) and the
    mask differ in shape. :func:`layer_statistics` calls it after its backward pass, and traces the model a second
    time only when that pass failed, so that a well-formed step is traced once."""
    if shape is None:
        shape = jax.eval_shape(lambda p, b: loss_fn(p, b, None), params, batch).shape
    if tuple(shape) != tuple(mask.shape):
        raise CaptureError(f"token losses of shape {tuple(shape)} do not match the mask {mask.shape}") from None


def layer_statistics(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    layers: Mapping[str, LayerSpec],
    statistic: Statistic,
    context: Mapping[str, Any] | None = None,
    *,
    mask: Array,
) -> tuple[dict[str, Any], Array]:
    """``statistic(a, g, mask, context[name])`` of every tracked block, formed inside one backward pass; and ``L_n``.

    Returns the per-block results (with the block's leading layer axis ``[*lead, ...]``
    when stacked, one entry per tracked index) and the sequence losses ``[B]``.
    ``context[name]`` carries the block's leading layer axis too (None: no context).
    See the module docstring for why the cotangent of a statistic probe is the statistic.
    """
    if not layers:
        raise CaptureError("no tracked layer")
    mask = jnp.asarray(mask)
    context = dict(context or {})
    z, ctx, active = {}, {}, {}
    for name, spec in layers.items():
        c = context.get(name)
        for leaf in jax.tree.leaves(c):
            if spec.stacked and leaf.shape[:1] != spec.lead:
                raise CaptureError(
                    f"layer {name!r}: context of leading shape {leaf.shape[:1]} for a block of "
                    f"{spec.lead[0]} tracked layers"
                )
        one = unpadded(jax.tree.map(lambda x: x[0], c)) if spec.stacked else c
        result = _result_shape(statistic, spec, mask.shape, one)
        lead = (spec.stack,) if spec.stacked else ()
        z[name] = jax.tree.map(lambda r: jnp.zeros(lead + r.shape, r.dtype), result)
        partial = spec.stacked and spec.indices is not None
        ctx[name] = jax.tree.map(lambda x: _full_stack(x, spec), c) if partial else c
        active[name] = _full_stack(jnp.ones((len(spec.layer_indices),), mask.dtype), spec) if partial else None

    def losses_of(z):
        return loss_fn(params, batch, Probes(statistic, z, ctx, active, mask.astype(jnp.float32)))

    try:
        token_losses, vjp = jax.vjp(losses_of, z)
        (stats,) = vjp(jnp.ones_like(token_losses))
    except Exception:  # a mask of another shape than the token losses fails somewhere inside the model: name it
        _check_mask(loss_fn, params, batch, mask)
        raise
    _check_mask(loss_fn, params, batch, mask, token_losses.shape)
    for name, spec in layers.items():
        if spec.stacked and spec.indices is not None:
            stats[name] = jax.tree.map(lambda x: x[jnp.asarray(spec.indices)], stats[name])
    return stats, token_losses.sum(-1)


def joint(statistics: Mapping[str, Statistic]) -> Statistic:
    """Several statistics in one backward pass: ``f(a, g, mask, context) = {name: f_name(a, g, mask, context[name])}``."""

    def statistic(a: Array, g: Array, mask: Array, context: Any) -> dict[str, Any]:
        return {name: f(a, g, mask, None if context is None else context[name]) for name, f in statistics.items()}

    return statistic


def per_sequence_gradient(a: Array, g: Array, precision=None) -> Array:
    """``G[n] = sum_t g[n,t] a[n,t]^T``: ``[*lead, B, d_out, d_in']`` (parameter-sized per sequence), at the matmul
    precision ``precision`` (:func:`jaxinf.engine.precision.matmul_precision`)."""
    return jnp.einsum("...bto,...bti->...boi", g, a, precision=matmul_precision(precision))


def expand(tree: Mapping[str, Array], layers: Mapping[str, LayerSpec], axis: int = 0) -> dict[str, Array]:
    """Per-layer entries from per-block arrays: a stacked block's ``axis`` becomes one entry per index."""
    out = {}
    for name, spec in layers.items():
        x = tree[name]
        if not spec.stacked:
            out[name] = x
            continue
        for i, layer_name in enumerate(spec.layer_names):
            out[layer_name] = jnp.take(x, i, axis=axis)
    return out
