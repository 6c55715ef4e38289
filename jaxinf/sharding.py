"""Meshes, partition rules and multi-host: where every array of a run lives.

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

**Multi-host.** :func:`initialize` calls ``jax.distributed.initialize`` when
``mesh.coordinator`` is set (``auto``: let JAX detect a TPU pod / SLURM / Open
MPI cluster), before anything touches a device. :func:`check_agreement`
compares every process's config with process 0's. Each process reads only the
documents of its own slice of the ``data`` axis (:func:`data_groups`) and
contributes them with ``jax.make_array_from_process_local_data``.

**Eigendecomposition.** :func:`distributed_eigh` gathers whole matrices of
one factor onto devices, different matrices on different devices, and each
device decomposes its own ones (``shard_map`` of :func:`jaxinf.curvature.eigen.stacked_eigh`,
an unbatched ``eigh`` per matrix); one program per factor.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("jaxinf")

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
    a mesh (:func:`jit_on`, as :class:`MeshExecutor` traces its steps); ``x`` itself otherwise.

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
        dims = _dims(spec, len(x.shape))
        local = [n // math.prod(shape.get(a, 1) for a in d) for n, d in zip(x.shape, dims)]
        total += math.prod(local) * jnp.dtype(x.dtype).itemsize
    return int(total)


def batch_spec(ndim: int) -> P:
    """Document batches and per-row outputs: the batch (first) axis over ``data``."""
    return P("data", *([None] * (ndim - 1)))


def rows_spec(ndim: int) -> P:
    """Per-row outputs with the rows on the last axis (scores ``[Q, B]``)."""
    return P(*([None] * (ndim - 1)), "data")


# --------------------------------------------------------------------------- meshes and processes


def make_mesh(data: int, model: int, devices=None) -> Mesh:
    """A ``data x model`` mesh over ``devices`` (default: all), ordered by process so each host's devices are adjacent.

    The mesh must use every device: a size mismatch is a :class:`ShardingError`.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or model < 1:
        raise ShardingError(f"mesh.data={data} x mesh.model={model}: both must be at least 1")
    if data * model != len(devices):
        raise ShardingError(f"mesh.data={data} x mesh.model={model} = {data * model} devices, but "
                            f"{len(devices)} device(s) are available ({devices[0].platform}, "
                            f"{jax.process_count()} process(es)); make mesh.data x mesh.model equal {len(devices)}")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices, dtype=object).reshape(data, model), AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * 2)


def data_groups(mesh: Mesh, process_of: Callable[[Any], int] | None = None,
                process: int | None = None) -> tuple[int, int]:
    """``(group, groups)``: which slice of the corpus this process reads, of how many.

    A *group* is a set of processes whose devices cover the same positions of
    the ``data`` axis (the processes of one data row share its documents). Each
    group reads ``data.batch_size`` documents per step, so a step holds
    ``groups x data.batch_size`` documents. ``process_of`` maps a device to its
    process (default: ``device.process_index``; the planner simulates hosts with it).
    """
    process_of = process_of or (lambda d: d.process_index)
    process = jax.process_index() if process is None else process
    rows: dict[int, set[int]] = {}
    for i in range(mesh.devices.shape[0]):
        for d in mesh.devices[i]:
            rows.setdefault(process_of(d), set()).add(i)
    sets = sorted({frozenset(r) for r in rows.values()}, key=min)
    for a in sets:
        for b in sets:
            if a is not b and a & b:
                raise ShardingError(f"mesh.data={mesh.devices.shape[0]}: the processes' devices overlap on the data "
                                    "axis unevenly; use a mesh.data that is a multiple or a divisor of the process count")
    sizes = {len(s) for s in sets}
    if len(sizes) != 1:
        raise ShardingError(f"mesh.data={mesh.devices.shape[0]}: processes cover unequal parts of the data axis")
    return sets.index(frozenset(rows[process])), len(sets)


def rows_per_group(mesh: Mesh, groups: int) -> int:
    """Positions of the ``data`` axis that each group covers."""
    return mesh.devices.shape[0] // groups


def initialize(mesh_config) -> bool:
    """``jax.distributed.initialize`` as ``mesh.coordinator`` / ``num_processes`` / ``process_id`` say; True if it ran.

    ``mesh.coordinator: auto`` lets JAX detect the cluster (TPU pods, SLURM,
    Open MPI); ``host:port`` with ``mesh.num_processes`` and ``mesh.process_id``
    starts the processes by hand (e.g. two processes on localhost). Must run
    before anything touches a device; calling it again is a no-op.
    """
    c = mesh_config
    if c.coordinator is None:
        if c.num_processes not in (None, 1) or c.process_id not in (None, 0):
            raise ShardingError("mesh.num_processes / mesh.process_id are set but mesh.coordinator is not; "
                                "give mesh.coordinator=HOST:PORT (or auto)")
        return False
    if jax.distributed.is_initialized():
        return True
    if c.coordinator == "auto":
        jax.distributed.initialize()
    else:
        if c.num_processes is None or c.process_id is None:
            raise ShardingError(f"mesh.coordinator={c.coordinator}: also give mesh.num_processes and mesh.process_id")
        if not 0 <= c.process_id < c.num_processes:
            raise ShardingError(f"mesh.process_id={c.process_id} is not in [0, mesh.num_processes={c.num_processes})")
        jax.distributed.initialize(coordinator_address=c.coordinator, num_processes=c.num_processes,
                                   process_id=c.process_id)
    log.info("process %d of %d (%d local device(s), %d in all)", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


# Keys that legitimately differ between the processes of one run.
PER_PROCESS_KEYS = (("mesh", "process_id"),)


def _flatten_config(tree: dict) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, section in tree.items() for k, v in section.items()
            if (s, k) not in PER_PROCESS_KEYS}


def check_agreement(config_dict: dict) -> None:
    """Raises :class:`ShardingError` naming the first process whose config differs from process 0's.

    Every process contributes its config (as JSON, per-process keys left out) to an
    all-gather; each then compares them, so all processes fail alike, before any work.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = _flatten_config(config_dict)
    raw = np.frombuffer(json.dumps(mine, sort_keys=True, default=str).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    configs = [json.loads(bytes(everyone[p, : lengths[p]]).decode()) for p in range(len(lengths))]
    first = configs[0]
    for p, other in enumerate(configs[1:], start=1):
        if other != first:
            keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            shown = ", ".join(f"{k} ({first.get(k)!r} on process 0, {other.get(k)!r} on process {p})" for k in keys[:3])
            raise ShardingError(f"process {p} was started with another config than process 0: {shown}; "
                                "start every process with the same config and overrides")


# --------------------------------------------------------------------------- eigendecomposition on a mesh


def _dims(spec: P, ndim: int) -> list[tuple[str, ...]]:
    """A partition spec as one tuple of mesh axes per dimension."""
    out = [() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec]
    return out + [()] * (ndim - len(out))


def _spec(dims: list[tuple[str, ...]]) -> P:
    return P(*[None if not a else a[0] if len(a) == 1 else a for a in dims])


def leading_path(spec: P, ndim: int) -> list[P]:
    """The layouts that take an array from ``spec`` to ``P(("data", "model"), None, ...)``, one mesh axis at a time.

    XLA's SPMD partitioner moves one mesh axis from one dimension to another
    with an all-to-all, but falls back to replicating the whole array when both
    axes move at once (e.g. rows on ``model`` and columns on ``data`` to the
    leading axis on both); stepping through these layouts keeps every move an all-to-all.
    """
    dims = _dims(spec, ndim)
    path = []
    for axis in AXES:
        if axis in dims[0]:
            continue
        dims = [dims[0]] + [tuple(a for a in d if a != axis) for d in dims[1:]]
        dims[0] = tuple(a for a in AXES if a in dims[0] or a == axis)
        path.append(_spec(dims))
    return path


def _move(x: jax.Array, mesh: Mesh, specs: list[P]) -> jax.Array:
    for spec in specs:
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return x


def distributed_eigh(M: jax.Array, which: str, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    """:func:`jaxinf.curvature.eigen.stacked_eigh` of one factor ``M`` ``[*lead, n, n]`` (``which``: "A" or "S"),
    different matrices on different devices.

    The matrices are padded with zero matrices to a multiple of the device count and
    moved, by all-to-alls (:func:`leading_path`), from their stored layout to one split
    over every device along the matrix index, so each device holds whole matrices;
    each device decomposes its own (``shard_map``: an unbatched ``eigh`` per matrix,
    mapped); the eigenvectors and eigenvalues move back to the stored layout the same
    way and the padding is dropped. Call it under ``jax.jit``, one factor per program
    (:func:`jaxinf.curvature.eigendecompose` with ``eigh=``), so that a device holds one
    factor's matrices at a time.
    """
    from jaxinf.curvature.eigen import stacked_eigh

    devices = mesh.devices.size
    shape = mesh_shape(mesh)
    every = P(ALL)
    n = M.shape[-1]
    flat = M.reshape((-1, n, n))
    count = flat.shape[0]
    flat = jnp.pad(flat, ((0, (-count) % devices), (0, 0), (0, 0)))
    _, axes = logical_axes("Q_" + which, 3)
    stored = resolve(shape, "factor", axes, flat.shape, f"Q_{which}")
    stored_e = resolve(shape, "eigenvalues", logical_axes("e_" + which, 2)[1], flat.shape[:2], f"e_{which}")
    flat = _move(flat, mesh, [stored] + leading_path(stored, 3))
    e, Q = jax.shard_map(stacked_eigh, mesh=mesh, in_specs=every, out_specs=(every, every))(flat)
    Q = _move(Q, mesh, list(reversed([stored] + leading_path(stored, 3)[:-1])))  # back, step by step
    e = _move(e, mesh, list(reversed([stored_e] + leading_path(stored_e, 2)[:-1])))
    return e[:count].reshape(M.shape[:-1]), Q[:count].reshape(M.shape)


# --------------------------------------------------------------------------- placing data


def placer(mesh: Mesh) -> Callable[[str, np.ndarray], jax.Array]:
    """``place(path, host_array)`` for :func:`jaxinf.models.from_hf`: puts one parameter onto its sharding.

    Each device receives only its own slice (``jax.make_array_from_callback``),
    so device memory never holds a whole parameter and host memory one
    parameter buffer at a time.
    """
    def place(path: str, x: np.ndarray) -> jax.Array:
        sharding = NamedSharding(mesh, param_spec(mesh, path, x.shape))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return place


def put_tree(tree, shardings) -> Any:
    """Host or device arrays onto their shardings (each device gets only its slice)."""
    def one(x, s):
        if isinstance(x, jax.Array):
            return jax.device_put(x, s)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


def abstract_tree(tree, shardings) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying ``shardings`` (for restoring checkpoints and lowering)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def describe(mesh: Mesh) -> str:
    shape = mesh_shape(mesh)
    return f"mesh data={shape['data']} x model={shape['model']} ({mesh.devices.size} {mesh.devices.flat[0].platform} devices)"


# --------------------------------------------------------------------------- the pipeline's executor on a mesh


def lapack_threads(threads: int = 1):
    """Caps the BLAS/LAPACK threads of the ``eigh`` and SVD calls XLA makes on the CPU (a ``with`` block).

    On the CPU, XLA runs LAPACK (jaxlib's ``eigh``, ``svd``) inside its own thread
    pool, and the BLAS library behind it starts threads of its own on top. On a
    busy host the oversubscribed threads wait on each other: on 2 shared cores the
    eigendecomposition of a 6M-parameter Llama's MLP factors took 23-33 s this way
    and 1.3 s with one BLAS thread (``scripts/bench_vs_kronfluence.py``). The
    computations must finish inside the block (block on their results).
    """
    import importlib

    importlib.import_module("scipy.linalg")  # loads the OpenBLAS that jaxlib's CPU LAPACK kernels call
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


def limit_cpu_blas(mesh: Mesh) -> None:
    """One BLAS thread per device, for the whole process, on a mesh of several CPU devices.

    Simulated devices share the host's cores and every device calls LAPACK at once
    (the eigendecompositions, the query SVDs): 64 SVDs of 768 x 256 on 8 simulated
    devices of a 2-core host took 83 s with OpenBLAS's default threads and 0.4 s with one.
    """
    if mesh.devices.size == 1 or mesh.devices.flat[0].platform != "cpu":
        return
    lapack_threads(1)   # the limit holds until it is restored, which is never here


def jit_on(mesh: Mesh, fn: Callable, *, donate_argnums=(), out_shardings=None) -> Callable:
    """``jax.jit`` of ``fn`` traced under ``mesh`` (``jax.sharding.use_abstract_mesh``), for :func:`constrain`."""
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    kw = {} if out_shardings is None else {"out_shardings": out_shardings}
    return jax.jit(traced, donate_argnums=donate_argnums, **kw)


def eigh_program(mesh: Mesh, M, which: str) -> Callable:
    """The jitted :func:`distributed_eigh` of a factor shaped like ``M`` (``which``: "A" or "S"), with its result
    laid out as the eigenvalues and eigenvectors are stored."""
    out = (tree_shardings(mesh, jax.ShapeDtypeStruct(M.shape[:-1], M.dtype), "e_" + which),
           tree_shardings(mesh, jax.ShapeDtypeStruct(M.shape, M.dtype), "Q_" + which))
    return jit_on(mesh, lambda m: distributed_eigh(m, which, mesh), out_shardings=out)


class MeshExecutor:
    """:class:`jaxinf.pipeline.Executor` on a mesh: same interface, every array placed by the rules above.

    - parameters go onto their shardings as the checkpoint is read (:meth:`place_param`);
    - document batches are split over ``data``; each process contributes the
      rows of its own slice of the corpus (:attr:`groups`), as one global batch of
      ``groups x data.batch_size`` rows (``jax.make_array_from_process_local_data``);
    - stage states and results (covariance sums, eigenbases, Lambda, query
      gradients) are created, restored and returned on their shardings
      (:meth:`init`, :meth:`like`, :meth:`shardings`), so no device ever holds all of them;
    - :meth:`fetch` and :meth:`gather_rows` bring per-document results and row
      indices to every process, in the same (global) row order.
    """

    def __init__(self, mesh: Mesh, batch_size: int | None = None):
        self.mesh = mesh
        limit_cpu_blas(mesh)
        self.groups = data_groups(mesh)
        self.per_group = rows_per_group(mesh, self.groups[1])
        if batch_size is not None and batch_size % self.per_group:
            raise ShardingError(f"data.batch_size={batch_size} does not split over the {self.per_group} position(s) of "
                                f"the data axis that each process feeds (mesh.data={mesh.devices.shape[0]}, "
                                f"{jax.process_count()} process(es)); use a multiple of {self.per_group}")
        self._process_groups = None

    def preflight(self, params, states: Mapping[str, Any]) -> None:
        """Computes the sharding of every parameter and stage state (abstract shapes), so that a dimension the
        mesh does not divide is reported before any work (raises :class:`ShardingError`)."""
        self.shardings(params, "param")
        for field, tree in states.items():
            self.shardings(tree, "Lambda" if field.lower() == "lambda" else None)

    # -------------------------------------------------------------- compiling and placing

    def jit(self, fn: Callable, *, donate_argnums=(), out_shardings=None) -> Callable:
        """``jax.jit`` of ``fn`` traced under this mesh (so the engine's :func:`constrain` marks take effect)."""
        return jit_on(self.mesh, fn, donate_argnums=donate_argnums, out_shardings=out_shardings)

    def put(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a document batch, as the global batch split over ``data``."""
        out = {}
        for k in ("tokens", "mask", "weights"):
            if k not in batch:
                continue
            x = np.asarray(batch[k])
            if x.shape[0] % self.per_group:
                raise ShardingError(f"a batch of {x.shape[0]} rows does not split over the {self.per_group} "
                                    "data-axis position(s) of this process")
            sharding = NamedSharding(self.mesh, batch_spec(x.ndim))
            shape = (x.shape[0] * self.groups[1],) + x.shape[1:]
            out[k] = jax.make_array_from_process_local_data(sharding, x, shape)
        return out

    def put_replicated(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """A batch every device needs whole (the queries); every process passes the same values."""
        replicated = NamedSharding(self.mesh, P())
        return {k: put_tree(np.asarray(batch[k]), replicated) for k in ("tokens", "mask", "weights") if k in batch}

    def place_param(self, path: str, x: np.ndarray) -> jax.Array:
        return placer(self.mesh)(path, x)

    def place(self, tree, field: str | None = None):
        """An engine pytree (or a parameter tree with ``field="param"``) moved onto its shardings."""
        return put_tree(tree, self.shardings(tree, field))

    def shardings(self, tree, field: str | None = None):
        if field == "param":
            return param_shardings(self.mesh, tree)
        return tree_shardings(self.mesh, tree, field)

    def rows(self, ndim: int = 1, last: bool = False) -> NamedSharding:
        """Sharding of per-row outputs: rows over ``data`` on the first (or ``last``) axis."""
        return NamedSharding(self.mesh, rows_spec(ndim) if last else batch_spec(ndim))

    def init(self, stage):
        """A stage's zero state, created directly on its shardings."""
        like = jax.eval_shape(stage.init)
        return jax.jit(stage.init, out_shardings=self.shardings(like))()

    def like(self, shapes, field: str | None = None):
        """Abstract arrays with shardings: what a checkpoint is restored onto."""
        return abstract_tree(shapes, self.shardings(shapes, field))

    def eigh_program(self, M, which: str):
        return eigh_program(self.mesh, M, which)

    def eigendecompose(self, cov):
        """The eigendecomposition, one factor per program, different matrices on different devices."""
        from jaxinf.curvature import eigendecompose

        cache: dict = {}

        def eigh(M, which):
            key = (which, M.shape, M.dtype)
            if key not in cache:
                cache[key] = self.eigh_program(M, which)
            return cache[key](M)

        return eigendecompose(cov, eigh)

    # -------------------------------------------------------------- bringing results to the host

    def fetch(self, x) -> np.ndarray:
        """The whole value of a (sharded) array on every process."""
        if jax.process_count() == 1:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def gather_rows(self, local: np.ndarray) -> np.ndarray:
        """Per-row host values of this process's batch (e.g. document indices), for the global batch.

        The result lines up with the columns of :meth:`fetch`-ed per-row outputs:
        group g's rows come g-th.
        """
        local = np.asarray(local)
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        every = np.asarray(multihost_utils.process_allgather(local))  # [processes, rows, ...]
        if self._process_groups is None:
            first: dict[int, int] = {}
            for p in range(jax.process_count()):
                first.setdefault(data_groups(self.mesh, process=p)[0], p)
            self._process_groups = [first[g] for g in range(self.groups[1])]
        return np.concatenate([every[p] for p in self._process_groups], axis=0)
