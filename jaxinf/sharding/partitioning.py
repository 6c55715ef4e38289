"""Partition rules: which mesh axis splits which dimension of every array a run makes.

The ground floor of the distributed engine: it names the mesh axes, maps
*logical* axes to them and turns an array's shape into a
:class:`~jax.sharding.PartitionSpec`, with no devices needed (the planner calls
it for meshes it only simulates). It imports nothing of the engine; the engine
marks its large intermediates with :func:`constrain`. Meshes and processes are
:mod:`jaxinf.sharding.meshes`'s job, the algorithms that move data over a mesh
:mod:`jaxinf.engine.distributed`'s, and running the stages on a mesh
:class:`jaxinf.run.executor.MeshExecutor`'s.

A run's devices form a :class:`jax.sharding.Mesh` with two axes:

- ``data`` (``mesh.data`` devices): documents. Every document batch is split
  along its batch axis over ``data``; sums over documents (``A``, ``S``,
  ``Lambda``) are reduced over ``data`` by XLA collectives inside the jitted
  step; score columns come out sharded over ``data``.
- ``model`` (``mesh.model`` devices): parameters, factors and query gradients.
  Every large parameter is split over ``model`` along one feature dimension
  (each device stores ``1/mesh.model`` of it and XLA gathers or partitions the
  matmuls as its SPMD partitioner sees fit), and with ``mesh.fsdp`` over ``data``
  too, along another (ZeRO-3 / FSDP: ``1/(mesh.data mesh.model)`` of it per device;
  the layer loop gathers one layer's parameters over ``data`` as it uses them,
  :func:`layer_parameter`); every factor, its
  eigenbasis, ``Lambda`` and the preconditioned query gradients are split over
  ``model`` too (and, where a dimension allows it, over ``data``), so no device
  ever holds all of them.

**Logical axes.** Each array dimension has a *logical* name, declared where the array is made
(:mod:`jaxinf.sharding.axes`: the engine pytrees' field metadata, the models' parameter metadata):

=================  ==========================================================
tensors            logical axes of the trailing dimensions
=================  ==========================================================
parameters         ``embed`` (hidden), ``ff`` (MLP / attention widths), ``vocab``;
                   a stacked block's leading axis is ``layers`` (never sharded:
                   ``lax.scan`` slices it)
A, S, Q_A, Q_S     ``rows``, ``cols`` (``[*layers, n, n]``)
e_A, e_S           ``rows``
Lambda             ``rows`` (d_out), ``cols`` (d_in')
query gradients    ``queries``, ``rows``, ``cols`` (full); ``queries``, ``rows``,
                   ``rank`` (left); ``queries``, ``cols``, ``rank`` (right)
documents          ``batch``, ``tokens``
=================  ==========================================================

:data:`RULES` maps logical axes to mesh axes, per family of tensors, as an
ordered list of ``(logical axis, mesh axis)`` candidates: for each array the
first candidate whose dimension the mesh axis divides wins (a dimension may take
both mesh axes). So a factor whose rows the ``model`` axis does not divide
(``d_in + 1`` with a bias) is split along its columns or its layers instead.
When a mesh axis larger than 1 divides no dimension of a tensor that must be
split over it (a large parameter, a factor, a query gradient, a batch), a
:class:`ShardingError` names the tensor and its dimensions before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinf.errors import UserError
from jaxinf.sharding.axes import LAYERS, Axes, declared_axes

AXES = ("data", "model")
FSDP = "param-fsdp"  # the family parameters are stored under with mesh.fsdp (see RULES)
QUERY_FSDP = "query-fsdp"  # the family query gradients are stored under with mesh.fsdp
ALL = AXES  # a dimension split over every device (data-major)


class ShardingError(UserError):
    """A mesh, a process layout or a tensor shape that cannot be sharded as asked (one line, names what)."""


# --------------------------------------------------------------------------- logical axes and rules

# Parameters: on `model`, along the feature dimension; replicated over `data`.
_PARAM = (("ff", "model"), ("vocab", "model"), ("embed", "model"), ("out", "model"), ("in", "model"))
# Preconditioned query gradients: on `model` (every data shard scores its documents against all queries).
_QUERY = (("rows", "model"), ("cols", "model"), ("layers", "model"), ("queries", "model"), ("rank", "model"))

# Per family: ordered (logical axis, mesh axis) candidates. First fit wins; see the module docstring.
RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "param": _PARAM,
    # Parameters with mesh.fsdp: as "param", and over `data` along another dimension (FSDP).
    FSDP: _PARAM
    + (("embed", "data"), ("ff", "data"), ("in", "data"), ("out", "data"), ("vocab", "data"), ("positions", "data")),
    # A, S, Q_A, Q_S, Lambda (and their running sums): rows on `model`, columns on `data`.
    "factor": (
        ("rows", "model"),
        ("cols", "data"),
        ("cols", "model"),
        ("rows", "data"),
        ("layers", "model"),
        ("layers", "data"),
    ),
    # Eigenvalues: small, split like the rows of their factor where possible.
    "eigenvalues": (("rows", "model"), ("layers", "model")),
    "query": _QUERY,
    # Stored query gradients with mesh.fsdp: as "query", and over `data` along another dimension (never `layers`,
    # which the layer loop slices); each layer is gathered over `data` as it is scored (see `streamed`).
    QUERY_FSDP: _QUERY + (("rows", "data"), ("cols", "data"), ("queries", "data"), ("rank", "data")),
    # Large intermediates the engine marks with `constrain`: documents on `data`, features on `model`.
    "activation": (("batch", "data"), ("rows", "model"), ("cols", "model"), ("layers", "model"), ("vocab", "model")),
    # Document batches and everything with one entry per document row.
    "batch": (("batch", "data"),),
    "replicated": (),
}

# Families whose tensors must be split over a mesh axis larger than 1 (else ShardingError).
REQUIRED = {
    "param": ("model",),
    FSDP: ("model",),
    "factor": ("model",),
    "query": ("model",),
    QUERY_FSDP: ("model",),
    "batch": ("data",),
}

STORED_FSDP = {"param": FSDP, "query": QUERY_FSDP}
"""With ``mesh.fsdp``, the families stored over ``data`` too (ZeRO-3) and gathered over it where they are used."""


def stored_family(family: str, fsdp: bool) -> str:
    """The family an array of ``family`` is stored under: parameters and query gradients under their
    :data:`STORED_FSDP` family with ``mesh.fsdp``, everything else under its own."""
    return STORED_FSDP.get(family, family) if fsdp else family


def resolve(mesh_shape: Mapping[str, int], family: str, axes: tuple[str, ...], shape: tuple[int, ...], what: str) -> P:
    """The :class:`PartitionSpec` of an array by the family's :data:`RULES` (first fit per mesh axis).

    Raises :class:`ShardingError` naming ``what`` and its dimensions when a
    required mesh axis larger than 1 divides none of them.
    """
    assigned: list[list[str]] = [[] for _ in shape]
    used: set[str] = set()
    for logical, axis in RULES[family]:
        size = mesh_shape.get(axis, 1)
        if axis in used or size == 1:
            continue
        for d, (name, n) in enumerate(zip(axes, shape)):
            if name != logical:
                continue
            split = math.prod(mesh_shape[a] for a in assigned[d]) * size
            if n % split == 0:
                assigned[d].append(axis)
                used.add(axis)
                break
    for axis in REQUIRED.get(family, ()):
        size = mesh_shape.get(axis, 1)
        if size > 1 and axis not in used and _large(family, shape):
            candidates = {logical for logical, ax in RULES[family] if ax == axis}
            dims = ", ".join(f"{a}={n}" for a, n in zip(axes, shape) if a in candidates)
            raise ShardingError(
                f"mesh.{axis}={size} divides no dimension of {what} {list(shape)} ({dims}); "
                f"choose a mesh.{axis} that divides one of them"
            )
    return P(*[None if not a else (a[0] if len(a) == 1 else tuple(a)) for a in assigned])


def _large(family: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor of ``family`` must be split: parameters and factors of at least 2 dims; any batch."""
    if family == "batch":
        return True
    return len(shape) >= 2 and math.prod(shape) > 1


def constrain(x: jax.Array, axes: tuple[str, ...], family: str = "activation") -> jax.Array:
    """``x`` pinned to the layout its logical ``axes`` get under :data:`RULES` ``[family]``, when traced under
    a mesh (:func:`jaxinf.sharding.meshes.jit_on`, as :class:`jaxinf.run.executor.MeshExecutor` traces its steps); ``x``
    itself otherwise.

    The engine marks the few large intermediates whose layout XLA's propagation
    would otherwise get wrong: the per-document rotated gradients of the Lambda
    stage stay split over ``data`` (documents) and ``model``, and each layer's
    statistic (``family="factor"`` or ``"query"``) is laid out as the stage's
    state that it is added to, so no device holds a layer's whole factor.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(AXES) <= set(mesh.axis_names):
        return x
    shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
    axes = ("layers",) * (x.ndim - len(axes)) + tuple(axes)
    try:
        spec = resolve(shape, family, axes, tuple(x.shape), family)
    except ShardingError:  # one layer's share of a state split along its layers: left to XLA
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def layer_parameter(x: jax.Array, axes: Axes) -> jax.Array:
    """One layer's parameter ``x`` as the layer computes with it: split over ``model`` only, by the ``param`` rules
    of its declared ``axes``. Parameters stored over ``data`` as well (``mesh.fsdp``) are gathered over ``data``
    here, one layer at a time inside the layer loop (the backward pass and a ``remat`` recomputation gather
    again), so a device holds one layer whole over ``data`` at a time; without ``mesh.fsdp`` this is the layout
    they are stored in, and outside a mesh ``x`` itself."""
    if axes.family != "param":
        return x
    return constrain(x, axes.names, family="param")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Padded:
    """A stack whose per-layer arrays were padded by :func:`streamed`; ``shape``: one layer's true shape."""

    array: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    layout: P | None = dataclasses.field(default=None, metadata=dict(static=True))

    def unpad(self) -> jax.Array:
        """The true array: ``array`` sliced to ``shape`` on its trailing dimensions (any leading layer axis kept);
        with a ``layout`` (one layer's), constrained to it: a stack stored over ``data`` as well (``mesh.fsdp``)
        gathered over ``data`` one layer at a time."""
        lead = self.array.ndim - len(self.shape)
        x = self.array[(slice(None),) * lead + tuple(slice(0, n) for n in self.shape)]
        if self.layout is None:
            return x
        return jax.lax.with_sharding_constraint(x, P(*(None,) * lead, *self.layout))


def unpadded(tree):
    """``tree`` with every :class:`Padded` leaf replaced by its true array."""
    return jax.tree.map(
        lambda x: x.unpad() if isinstance(x, Padded) else x, tree, is_leaf=lambda x: isinstance(x, Padded)
    )


def streamed(tree, declared=None, fsdp: bool = False):
    """``tree`` (stacked state that a layer loop slices one layer at a time: eigenbases, ``Lambda``, query
    gradients) with no mesh axis on its ``layers`` axis, inside a step traced under a mesh; ``tree`` itself
    otherwise.

    ``fsdp``: the arrays of a family stored over ``data`` too (:func:`stored_family`: the query gradients) are
    gathered over ``data`` one layer at a time, as the layer loop takes each layer (a :class:`Padded` with that
    layer's ``layout``; an array without a ``layers`` axis, one layer's, is constrained here), as
    :func:`layer_parameter` gathers the parameters.

    An array whose rules split its layers, because no mesh axis divides its other dimensions (the
    ``d_in + 1`` rows of a factor of a layer with a bias), would make XLA's partitioner gather the whole stack
    to take one layer from it ("involuntary full rematerialization"). Such an array is padded here along its
    first other dimension to a multiple of the devices that split its layers, and those devices are moved to
    that dimension: one all-to-all per step, the same bytes per device. It comes back as :class:`Padded`; the
    layer loop slices one layer and :func:`unpadded` cuts the padding off (:meth:`jaxinf.engine.capture.Tap.scan`).
    The stored state keeps its split layers. Arrays whose layers are not split are returned untouched.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(AXES) <= set(mesh.axis_names):
        return tree
    shape = dict(zip(mesh.axis_names, mesh.axis_sizes))

    def one(axes, x):
        try:
            dims = spec_dims(resolve(shape, axes.family, axes.names, tuple(x.shape), axes.family), x.ndim)
        except ShardingError:
            return x
        layer_dims = [d for d, name in enumerate(axes.names) if name == LAYERS]
        moved = tuple(a for d in layer_dims for a in dims[d])
        gathered = fsdp and stored_family(axes.family, True) != axes.family
        if gathered and not layer_dims:
            return jax.lax.with_sharding_constraint(x, dims_spec(dims))
        if gathered and not moved:
            return Padded(x, tuple(x.shape[len(layer_dims) :]), dims_spec(dims[len(layer_dims) :]))
        if not moved or len(layer_dims) == x.ndim:
            return x
        target = len(layer_dims)  # the first dimension after the layer axes
        split = math.prod(shape[a] for a in moved + dims[target])
        pad = [(0, 0)] * x.ndim
        pad[target] = (0, -x.shape[target] % split)
        new = [() if d in layer_dims else dims[d] for d in range(x.ndim)]
        new[target] = dims[target] + moved
        padded = jax.lax.with_sharding_constraint(jnp.pad(x, pad), dims_spec(new))
        return Padded(padded, tuple(x.shape[len(layer_dims) :]))

    return jax.tree.map(one, declared_axes(tree, declared), tree, is_leaf=lambda a: isinstance(a, Axes))


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def tree_specs(shape: Mapping[str, int], tree, declared=None, fsdp: bool = False) -> Any:
    """The :class:`PartitionSpec` of every array of ``tree`` (arrays or shapes) on a mesh of ``shape`` (no devices
    needed), from the logical axes the arrays declare (:func:`jaxinf.sharding.axes.declared_axes`; ``declared`` for a
    tree that carries no declarations itself: a model's :func:`~jaxinf.models.parameter_axes`, or
    :func:`~jaxinf.sharding.axes.field_axes` for a field's bare value). An array without a declared layout is an error.
    ``fsdp``: parameters split over ``data`` too (:func:`stored_family`).
    """
    resolved = declared_axes(tree, declared)

    def one(path, axes, leaf):
        what = f"{'parameter' if axes.family == 'param' else axes.family} {_dotted(path) or 'array'}"
        return resolve(shape, stored_family(axes.family, fsdp), axes.names, tuple(leaf.shape), what)

    return jax.tree_util.tree_map_with_path(one, resolved, tree, is_leaf=lambda x: isinstance(x, Axes))


def tree_shardings(mesh: Mesh, tree, declared=None, fsdp: bool = False) -> Any:
    """A :class:`NamedSharding` for every array of ``tree``: :func:`tree_specs` on ``mesh``."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        tree_specs(mesh_shape(mesh), tree, declared, fsdp),
        is_leaf=lambda x: isinstance(x, P),
    )


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shard_bytes(tree, specs, shape: Mapping[str, int]) -> int:
    """Bytes one device holds of ``tree`` (arrays or shapes) laid out by ``specs`` on a mesh of ``shape``."""
    total = 0
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for x, spec in zip(leaves, spec_leaves, strict=True):
        dims = spec_dims(spec, len(x.shape))
        local = [n // math.prod(shape.get(a, 1) for a in d) for n, d in zip(x.shape, dims)]
        total += math.prod(local) * jnp.dtype(x.dtype).itemsize
    return int(total)


def spec_dims(spec: P, ndim: int) -> list[tuple[str, ...]]:
    """A partition spec as one tuple of mesh axes per dimension (the inverse of :func:`dims_spec`)."""
    out = [() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec]
    return out + [()] * (ndim - len(out))


def dims_spec(dims: list[tuple[str, ...]]) -> P:
    """The partition spec of one tuple of mesh axes per dimension."""
    return P(*[None if not a else a[0] if len(a) == 1 else a for a in dims])


def batch_spec(ndim: int) -> P:
    """Document batches and per-row outputs: the batch (first) axis over ``data``."""
    return P("data", *([None] * (ndim - 1)))


def rows_spec(ndim: int) -> P:
    """Per-row outputs with the rows on the last axis (scores ``[Q, B]``)."""
    return P(*([None] * (ndim - 1)), "data")
