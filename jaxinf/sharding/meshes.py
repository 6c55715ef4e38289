"""Meshes and processes: the devices of a run, which process reads which documents, and arrays put onto them.

:func:`make_mesh` lays a run's devices out as the ``data x model`` mesh that
:mod:`jaxinf.sharding.partitioning`'s rules split arrays over, each host's devices
adjacent. :func:`placer`, :func:`put_tree` and :func:`abstract_tree` put host
arrays (or restored checkpoints) onto their shardings, each device receiving only
its own slice; :func:`jit_on` compiles a step traced under the mesh, so the
engine's :func:`jaxinf.sharding.partitioning.constrain` marks take effect.

**Multi-host.** :func:`initialize` calls ``jax.distributed.initialize`` when
``mesh.coordinator`` is set (``auto``: let JAX detect a TPU pod / SLURM / Open
MPI cluster), before anything touches a device. :func:`check_agreement`
compares every process's config with process 0's; :func:`exchange` gives every process
the bytes of all, :func:`barrier` waits for them all. Each process reads only the
documents of its own slice of the ``data`` axis (:func:`data_groups`) and
contributes them with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxinf.sharding.axes import Axes
from jaxinf.sharding.partitioning import AXES, ShardingError, mesh_shape, resolve, stored_family

log = logging.getLogger("jaxinf")


def make_mesh(data: int, model: int, devices=None) -> Mesh:
    """A ``data x model`` mesh over ``devices`` (default: all), ordered by process so each host's devices are adjacent.

    The mesh must use every device: a size mismatch is a :class:`ShardingError`.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or model < 1:
        raise ShardingError(f"mesh.data={data} x mesh.model={model}: both must be at least 1")
    if data * model != len(devices):
        raise ShardingError(
            f"mesh.data={data} x mesh.model={model} = {data * model} devices, but "
            f"{len(devices)} device(s) are available ({devices[0].platform}, "
            f"{jax.process_count()} process(es)); make mesh.data x mesh.model equal {len(devices)}"
        )
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(
        np.asarray(devices, dtype=object).reshape(data, model), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2
    )


def data_groups(
    mesh: Mesh, process_of: Callable[[Any], int] | None = None, process: int | None = None
) -> tuple[int, int]:
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
                raise ShardingError(
                    f"mesh.data={mesh.devices.shape[0]}: the processes' devices overlap on the data "
                    "axis unevenly; use a mesh.data that is a multiple or a divisor of the process count"
                )
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
            raise ShardingError(
                "mesh.num_processes / mesh.process_id are set but mesh.coordinator is not; "
                "give mesh.coordinator=HOST:PORT (or auto)"
            )
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
        jax.distributed.initialize(
            coordinator_address=c.coordinator, num_processes=c.num_processes, process_id=c.process_id
        )
    log.info(
        "process %d of %d (%d local device(s), %d in all)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


# Keys that legitimately differ between the processes of one run.
PER_PROCESS_KEYS = (("mesh", "process_id"),)


def _flatten_config(tree: dict) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, section in tree.items() for k, v in section.items() if (s, k) not in PER_PROCESS_KEYS}


def check_agreement(config_dict: dict) -> None:
    """Raises :class:`ShardingError` naming the first process whose config differs from process 0's.

    Every process contributes its config (as JSON, per-process keys left out) to an
    all-gather; each then compares them, so all processes fail alike, before any work.
    """
    if jax.process_count() == 1:
        return
    mine = _flatten_config(config_dict)
    configs = [json.loads(raw.decode()) for raw in exchange(json.dumps(mine, sort_keys=True, default=str).encode())]
    first = configs[0]
    for p, other in enumerate(configs[1:], start=1):
        if other != first:
            keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            shown = ", ".join(f"{k} ({first.get(k)!r} on process 0, {other.get(k)!r} on process {p})" for k in keys[:3])
            raise ShardingError(
                f"process {p} was started with another config than process 0: {shown}; "
                "start every process with the same config and overrides"
            )


# --------------------------------------------------------------------------- placing data


def exchange(payload: bytes) -> list[bytes]:
    """Every process's ``payload`` (any length), in process order, on every process: an all-gather of bytes, so that
    host values cross exactly whatever ``jax_enable_x64`` says of the devices they travel through."""
    if jax.process_count() == 1:
        return [payload]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(payload, np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(max(1, int(lengths.max())), np.uint8)
    padded[: raw.size] = raw
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [bytes(everyone[p, : lengths[p]]) for p in range(len(lengths))]


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name``: what process 0 alone wrote before it (a run
    directory opened, inputs checked, index rows), every process may read after it. Nothing with one process."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"jaxinf: {name}")


def placer(mesh: Mesh, fsdp: bool = False) -> Callable[[str, np.ndarray, Axes], jax.Array]:
    """``place(path, host_array, axes)`` for :func:`jaxinf.models.from_hf`: puts one parameter onto the sharding
    of its declared logical ``axes`` (``path`` names it in errors; ``fsdp``: split over ``data`` too).

    Each device receives only its own slice (``jax.make_array_from_callback``),
    so device memory never holds a whole parameter and host memory one
    parameter buffer at a time.
    """

    def place(path: str, x: np.ndarray, axes: Axes) -> jax.Array:
        family = stored_family(axes.family, fsdp)
        spec = resolve(mesh_shape(mesh), family, axes.names, tuple(x.shape), f"parameter {path}")
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])

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


def jit_on(mesh: Mesh, fn: Callable, *, donate_argnums=(), out_shardings=None) -> Callable:
    """``jax.jit`` of ``fn`` traced under ``mesh`` (``jax.sharding.use_abstract_mesh``), for :func:`jaxinf.sharding.partitioning.constrain`."""

    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    kw = {} if out_shardings is None else {"out_shardings": out_shardings}
    return jax.jit(traced, donate_argnums=donate_argnums, **kw)
