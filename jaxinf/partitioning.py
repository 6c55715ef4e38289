"""Partition rules: which mesh axis splits which dimension of every array a run makes.

The ground floor of the distributed engine: it names the mesh axes, maps
*logical* axes to them and turns an array's shape into a
:class:`~jax.sharding.PartitionSpec`, with no devices needed (the planner calls
it for meshes it only simulates). It imports nothing of the engine; the engine
marks its large intermediates with :func:`constrain`. Meshes and processes are
:mod:`jaxinf.meshes`'s job, the algorithms that move data over a mesh
:mod:`jaxinf.distributed`'s, and running the stages on a mesh
:class:`jaxinf.executor.MeshExecutor`'s.

A run's devices form a :class:`jax.sharding.Mesh` with two axes:

- ``data`` (``mesh.data`` devices): documents. Every document batch is split
  along its batch axis over ``data``; sums over documents (``A``, ``S``,
  ``Lambda``) are reduced over ``data`` by XLA collectives inside the jitted
  step; score columns come out sharded over ``data``.
- ``model`` (``mesh.model`` devices): parameters, factors and query gradients.
  Every large parameter is split over ``model`` along one feature dimension
  (FSDP-style: each device stores ``1/mesh.model`` of it and XLA gathers or
  partitions the matmuls as its SPMD partitioner sees fit); every factor, its
  eigenbasis, ``Lambda`` and the preconditioned query gradients are split over
  ``model`` too (and, where a dimension allows it, over ``data``), so no device
  ever holds all of them.

**Logical axes.** Each array dimension has a *logical* name (:func:`logical_axes`):

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

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")
ALL = AXES  # a dimension split over every device (data-major)


class ShardingError(ValueError):
    """A mesh, a process layout or a tensor shape that cannot be sharded as asked (one line, names what)."""


# --------------------------------------------------------------------------- logical axes and rules

# Per family: ordered (logical axis, mesh axis) candidates. First fit wins; see the module docstring.
RULES: dict[str, tuple[tuple[str, str], ...]] = {
    # Parameters: FSDP-style on `model`, along the feature dimension; replicated over `data`.
    "param": (("ff", "model"), ("vocab", "model"), ("embed", "model"), ("out", "model"), ("in", "model")),
    # A, S, Q_A, Q_S, Lambda (and their running sums): rows on `model`, columns on `data`.
    "factor": (("rows", "model"), ("cols", "data"), ("cols", "model"), ("rows", "data"),
               ("layers", "model"), ("layers", "data")),
    # Eigenvalues: small, split like the rows of their factor where possible.
    "eigenvalues": (("rows", "model"), ("layers", "model")),
    # Preconditioned query gradients: on `model` (every data shard scores its documents against all queries).
    "query": (("rows", "model"), ("cols", "model"), ("layers", "model"), ("queries", "model"), ("rank", "model")),
    # Large intermediates the engine marks with `constrain`: documents on `data`, features on `model`.
    "activation": (("batch", "data"), ("rows", "model"), ("cols", "model"), ("layers", "model"), ("vocab", "model")),
    # Document batches and everything with one entry per document row.
    "batch": (("batch", "data"),),
    "replicated": (),
}

# Families whose tensors must be split over a mesh axis larger than 1 (else ShardingError).
REQUIRED = {"param": ("model",), "factor": ("model",), "query": ("model",), "batch": ("data",)}

_COLUMN = r"(q_proj|k_proj|v_proj|qkv_proj|query_key_value|c_attn|gate_proj|up_proj|gate_up_proj|dense_h_to_4h|c_fc|fc_in)"
_ROW = r"(o_proj|down_proj|dense|dense_4h_to_h|c_proj|fc_out)"

# Parameter path (dotted, as jaxinf.models.parameter_paths writes it) -> logical axes of the trailing dims.
PARAM_AXES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    (rf"(^|\.){_COLUMN}\.kernel$", ("embed", "ff")),
    (rf"(^|\.){_COLUMN}\.bias$", ("ff",)),
    (rf"(^|\.){_ROW}\.kernel$", ("ff", "embed")),
    (r"(^|\.)(embed_tokens|embed_in|embed_out|wte)\.(embedding|weight)$", ("vocab", "embed")),
    (r"(^|\.)wpe\.embedding$", ("positions", "embed")),
    (r"(^|\.)embed$", ("vocab", "embed")),
    (r"(^|\.)lm_head\.kernel$", ("embed", "vocab")),
    (r"\.kernel$", ("in", "out")),
    (r".*", None),  # norms, biases of row layers, position tables: replicated
)

# Field of an engine pytree (dataclass attribute) -> (family, logical axes of the trailing dims).
FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "A": ("factor", ("rows", "cols")),
    "S": ("factor", ("rows", "cols")),
    "Q_A": ("factor", ("rows", "cols")),
    "Q_S": ("factor", ("rows", "cols")),
    "Lambda": ("factor", ("rows", "cols")),
    "e_A": ("eigenvalues", ("rows",)),
    "e_S": ("eigenvalues", ("rows",)),
    "full": ("query", ("queries", "rows", "cols")),
    "left": ("query", ("queries", "rows", "rank")),
    "right": ("query", ("queries", "cols", "rank")),
    "count": ("replicated", ()),
    "loss": ("replicated", ()),
}


def param_axes(path: str, ndim: int) -> tuple[str, ...]:
    """Logical axes of a parameter from its dotted path: a rule of :data:`PARAM_AXES`, leading axes ``layers``."""
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path):
            if axes is None or len(axes) > ndim:
                return ("replicated",) * ndim
            return ("layers",) * (ndim - len(axes)) + axes
    raise AssertionError("unreachable")  # pragma: no cover


def logical_axes(field: str, ndim: int) -> tuple[str, tuple[str, ...]]:
    """``(family, axes)`` of an engine array named ``field`` with ``ndim`` dimensions (extra leading axes: ``layers``)."""
    family, axes = FIELDS.get(field, ("replicated", ()))
    if family == "replicated" or len(axes) > ndim:
        return "replicated", ("replicated",) * ndim
    return family, ("layers",) * (ndim - len(axes)) + axes


def resolve(mesh_shape: Mapping[str, int], family: str, axes: tuple[str, ...], shape: tuple[int, ...],
            what: str) -> P:
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
            raise ShardingError(f"mesh.{axis}={size} divides no dimension of {what} {list(shape)} ({dims}); "
                                f"choose a mesh.{axis} that divides one of them")
    return P(*[None if not a else (a[0] if len(a) == 1 else tuple(a)) for a in assigned])


def _large(family: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor of ``family`` must be split: parameters and factors of at least 2 dims; any batch."""
    if family == "batch":
        return True
    return len(shape) >= 2 and math.prod(shape) > 1


def constrain(x: jax.Array, axes: tuple[str, ...], family: str = "activation") -> jax.Array:
    """``x`` pinned to the layout its logical ``axes`` get under :data:`RULES` ``[family]``, when traced under
    a mesh (:func:`jaxinf.meshes.jit_on`, as :class:`jaxinf.executor.MeshExecutor` traces its steps); ``x``
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
    except ShardingError:   # one layer's share of a state split along its layers: left to XLA
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def param_spec(mesh: Mesh, path: str, shape: tuple[int, ...]) -> P:
    """The partition spec of the parameter at dotted ``path`` (see :data:`PARAM_AXES`)."""
    return param_specs(mesh_shape(mesh), {path: jax.ShapeDtypeStruct(tuple(shape), jnp.float32)})[path]


def param_specs(shape: Mapping[str, int], params) -> Any:
    """The :class:`PartitionSpec` of every parameter of a (possibly abstract) tree on a mesh of ``shape``."""
    def one(path, leaf):
        name = _dotted(path)
        axes = param_axes(name, leaf.ndim)
        family = "replicated" if axes and axes[-1] == "replicated" else "param"
        return resolve(shape, family, axes, tuple(leaf.shape), f"parameter {name}")

    return jax.tree_util.tree_map_with_path(one, params)


def param_shardings(mesh: Mesh, params) -> Any:
    """A :class:`NamedSharding` for every parameter of a (possibly abstract) parameter tree."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(mesh_shape(mesh), params),
                        is_leaf=lambda x: isinstance(x, P))


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _field(path) -> str | None:
    """The innermost dataclass attribute on a key path (``Q_A`` in ``Eigen.Q_A["layers.*.fc_in"]``)."""
    field = None
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            field = k.name
    return field


def _block(path) -> str:
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(keys[-1]) if keys else ""


def tree_shardings(mesh: Mesh, tree, field: str | None = None) -> Any:
    """A :class:`NamedSharding` for every array of an engine pytree (covariance, eigen, Lambda, curvature, queries).

    Each leaf is classified by the dataclass attribute it sits under (``A``,
    ``Q_S``, ``Lambda``, ``left``, ...) or by ``field`` for plain dicts
    (``field="Lambda"`` for the finalized Lambda). Unknown leaves are replicated.
    """
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree_specs(mesh_shape(mesh), tree, field),
                        is_leaf=lambda x: isinstance(x, P))


def tree_specs(shape: Mapping[str, int], tree, field: str | None = None) -> Any:
    """:func:`tree_shardings` as partition specs, for a mesh of ``shape`` (no devices needed)."""
    def one(path, leaf):
        name = field or _field(path) or ""
        family, axes = logical_axes(name, len(leaf.shape))
        what = f"{name} of {_block(path) or 'a layer'}"
        return resolve(shape, family, axes, tuple(leaf.shape), what)

    return jax.tree_util.tree_map_with_path(one, tree)


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

