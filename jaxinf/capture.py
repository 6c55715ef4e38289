"""How the engine sees a model: probes, captured layer inputs, and their gradients.

Everything the curvature and scoring stages need from a model is, for every
tracked linear layer ``s = a @ kernel (+ bias)`` and every token t of sequence n,

- ``a[n, t]``: the layer input, with a 1 appended when the layer has a bias, and
- ``g[n, t] = dL_n / ds[n, t]``: the gradient of the sequence loss
  ``L_n = sum_t loss[n, t]`` with respect to the layer output.

Both come from a single mechanism. The model is written as a *loss function*

    loss_fn(params, batch, probes) -> (token_losses [B, T], inputs)

in which every tracked linear layer goes through :meth:`Tap.linear`. The tap
adds a zero *probe* to the layer output, ``s = a @ kernel + bias + probe``, and
records the input ``a`` into ``inputs``. Since the probe enters the output
additively, ``dL/dprobe[n, t] = dL_n/ds[n, t] = g[n, t]``: one reverse pass of
the loss with respect to the probes (cotangent 1 for every token loss) yields
every layer's per-token output gradients, without computing any weight gradient.
Sequences of a batch do not interact, so the gradient of the summed batch loss
at sequence n equals that of ``L_n`` alone.

The tap is an ordinary Python object that lives only while the loss function is
traced; the function stays pure from the outside (probes in, inputs out), so it
works under ``jit``, ``vmap``, ``grad`` and sharding. Layers stacked under
``lax.scan`` go through :meth:`Tap.scan`, which slices the probes per layer and
returns the stacked inputs as the scan's outputs: a scanned layer is one *block*
named with a ``*`` for the layer index (``layers.*.mlp.up_proj``) and yields one
entry per layer index (``layers.0.mlp.up_proj``, ``layers.1.mlp.up_proj``, ...).

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = Any
Batch = Any
Probes = Mapping[str, Array]
Inputs = dict[str, Array]
LossFn = Callable[[Params, Batch, Probes], tuple[Array, Inputs]]

STACK = "*"
"""The placeholder for the layer index in the name of a scanned (stacked) block."""


class CaptureError(ValueError):
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


class Tap:
    """The tracked-layer recorder of one application of a loss function.

    Create one from the ``probes`` argument at the top of a loss function, route
    every tracked linear layer through :meth:`linear` and scanned layer stacks
    through :meth:`scan`, and return ``tap.inputs`` beside the token losses.
    Layers whose name has no probe are computed as plain linear layers.
    """

    def __init__(self, probes: Probes | _Discovery | None = None, *, _prefix: str = "", _stack: int = 0):
        if isinstance(probes, _Discovery):
            self._discovery: _Discovery | None = probes
            self.probes: Probes = {}
        else:
            self._discovery = None
            self.probes = {} if probes is None else probes
        self._prefix = _prefix
        self._stack = _stack
        self.inputs: Inputs = {}

    def linear(self, name: str, x: Array, kernel: Array, bias: Array | None = None) -> Array:
        """``s = x @ kernel + bias (+ probe)``; records ``x`` when the layer is tracked."""
        s = jnp.matmul(x, kernel.astype(x.dtype))
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
        probe = self.probes.get(name)
        if probe is None:
            return s
        if probe.shape != s.shape:
            raise CaptureError(
                f"layer {self._prefix + name!r}: probe of shape {probe.shape} does not match its output {s.shape}"
            )
        self.inputs[name] = x
        return s + probe.astype(s.dtype)

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
        blocks ``f"{prefix}.*.mlp.up_proj"``; their probes are sliced per layer
        and their inputs stacked along a leading layer axis. ``remat`` recomputes
        each layer's activations in the backward pass (``jax.checkpoint``).
        """
        if self._stack:
            raise CaptureError(f"nested Tap.scan under {self._prefix!r} is not supported")
        length = int(jax.tree.leaves(stacked_params)[0].shape[0])
        inner_prefix = f"{prefix}.{STACK}."
        inner = {k[len(inner_prefix):]: v for k, v in self.probes.items() if k.startswith(inner_prefix)}
        discovery = self._discovery

        def step(c, xs):
            layer_params, layer_probes = xs
            tap = Tap(discovery if discovery is not None else layer_probes,
                      _prefix=self._prefix + inner_prefix, _stack=length)
            c = body(c, layer_params, tap)
            return c, tap.inputs

        if remat:
            step = jax.checkpoint(step)
        carry, stacked_inputs = jax.lax.scan(step, carry, (stacked_params, inner))
        for k, v in stacked_inputs.items():
            self.inputs[inner_prefix + k] = v
        return carry


def find_layers(loss_fn: LossFn, params: Params, batch: Batch) -> dict[str, LayerSpec]:
    """Every linear layer that ``loss_fn`` routes through a tap, with its shapes.

    Traces the function abstractly (``jax.eval_shape``: no FLOPs, no memory).
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
            i for i, n in zip(full.layer_indices, full.layer_names)
            if any(fnmatch.fnmatchcase(n, p) for p in patterns)
        )
        if idx:
            chosen[spec.name] = dataclasses.replace(spec, indices=None if len(idx) == spec.stack else idx)
    if not chosen:
        available = ", ".join(sorted(layers)) or "none"
        raise CaptureError(f"factors.track {patterns} matches no layer (layers: {available})")
    return chosen


def zero_probes(layers: Mapping[str, LayerSpec], batch_shape: tuple[int, int]) -> dict[str, Array]:
    """Zero probes of each tracked layer's output shape: ``[stack, B, T, d_out]`` or ``[B, T, d_out]``."""
    probes = {}
    for spec in layers.values():
        lead = (spec.stack,) if spec.stacked else ()
        probes[spec.name] = jnp.zeros(lead + tuple(batch_shape) + (spec.d_out,), spec.dtype)
    return probes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Captured:
    """What one batch gives the engine, per tracked block.

    ``a[name]``: ``[*lead, B, T, d_in']`` (bias 1 appended), ``g[name]``: ``[*lead, B, T, d_out]``,
    both zero at masked tokens; ``loss``: ``[B]`` sequence losses ``L_n``;
    ``mask``: ``[B, T]`` the tokens that count (1) and padding (0).
    """

    a: dict[str, Array]
    g: dict[str, Array]
    loss: Array
    mask: Array


def augment(x: Array, mask: Array, bias: bool) -> Array:
    """``a``: the layer input zeroed at masked tokens, with the mask itself appended as the bias 1."""
    m = mask.astype(x.dtype)[..., None]
    x = x * m
    if bias:
        x = jnp.concatenate([x, jnp.broadcast_to(m, x.shape[:-1] + (1,))], axis=-1)
    return x


def capture(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    layers: Mapping[str, LayerSpec],
    mask: Array,
) -> Captured:
    """Per-token inputs ``a`` and output gradients ``g`` of every tracked layer on one batch.

    ``g = dL/dprobe`` at zero probes, by one reverse pass of the token losses
    with cotangent 1 (so each sequence's ``g`` is that of its own summed loss);
    ``mask`` ``[B, T]`` zeroes padding in both ``a`` and ``g``.
    """
    if not layers:
        raise CaptureError("no tracked layer")
    shape = jax.eval_shape(lambda p, b: loss_fn(p, b, {})[0], params, batch).shape
    if shape != mask.shape:
        raise CaptureError(f"token losses of shape {shape} do not match the mask {mask.shape}")
    probes = zero_probes(layers, tuple(mask.shape))

    def losses_of(p):
        return loss_fn(params, batch, p)

    token_losses, vjp, inputs = jax.vjp(losses_of, probes, has_aux=True)
    (g,) = vjp(jnp.ones_like(token_losses))
    a_out, g_out = {}, {}
    for name, spec in layers.items():
        if name not in inputs:
            raise CaptureError(f"layer {name!r} has a probe but the loss function did not record its input")
        x, gg = inputs[name], g[name]
        if spec.stacked and spec.indices is not None:
            sel = jnp.asarray(spec.indices)
            x, gg = x[sel], gg[sel]
        a_out[name] = augment(x, mask, spec.bias)
        g_out[name] = gg * mask.astype(gg.dtype)[..., None]
    return Captured(a=a_out, g=g_out, loss=token_losses.sum(-1), mask=mask)


def per_sequence_gradient(a: Array, g: Array) -> Array:
    """``G[n] = sum_t g[n,t] a[n,t]^T``: ``[*lead, B, d_out, d_in']`` (parameter-sized per sequence)."""
    return jnp.einsum("...bto,...bti->...boi", g, a)


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
