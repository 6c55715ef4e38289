"""Executors: where the stages run. One interface (:class:`Executor`), two implementations.

An executor compiles a stage's steps, places its batches, states and results,
and brings results back to the host; the pipeline drives the stages only
through :class:`Executor`. :class:`DeviceExecutor` runs on the default device;
:class:`MeshExecutor` on a ``data x model`` mesh (possibly spanning several
processes), every array placed by :mod:`jaxinf.sharding.partitioning`'s rules.
:func:`make_executor` picks one from ``mesh.*``.

Executors place arrays and nothing else: the numerical work that needs a mesh
(the eigendecomposition, :func:`jaxinf.engine.distributed.eigendecompose`) takes the
executor's :attr:`~Executor.mesh` from its caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxinf.engine.stages import Stage
from jaxinf.sharding.meshes import (
    abstract_tree,
    data_groups,
    describe,
    jit_on,
    make_mesh,
    placer,
    put_tree,
    rows_per_group,
)
from jaxinf.sharding.partitioning import ShardingError, batch_spec, rows_spec, tree_shardings

log = logging.getLogger("jaxinf")

BATCH_KEYS = ("tokens", "mask", "weights", "index", "chunk")
"""What a document batch brings to the devices: its tokens, mask and loss weights ``[B, T]``, and each row's document
and chunk ``[B]`` (the scoring pass's tails name the rows they keep)."""


@runtime_checkable
class Executor(Protocol):
    """Where the stages run: compiles steps, places batches, states and results, and brings results back."""

    groups: tuple[int, int]
    """(this process's slice of the corpus, number of slices)."""

    # read-only members (properties here), so that an executor's own narrower attribute or method satisfies them
    @property
    def mesh(self) -> Mesh | None:
        """The mesh the arrays live on; None on the default device."""

    @property
    def place_param(self) -> Callable[[str, np.ndarray, Any], jax.Array] | None:
        """Puts one parameter onto its sharding as the checkpoint is read (None: :func:`jaxinf.models.from_hf`'s
        default)."""

    def preflight(self, trees: Mapping[str, tuple[Any, Any]]) -> None:
        """Checks that every tree (``name -> (abstract tree, declared axes or None)``: the parameters and the
        stage states) can be placed, before any work."""

    def jit(self, fn: Callable, *, donate_argnums=(), out_shardings=None) -> Callable:
        """``fn`` compiled for where the arrays live."""

    def put(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a document batch, as the step's global batch."""

    def put_replicated(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """A batch every device needs whole (the queries); every process passes the same values."""

    def place(self, tree, declared=None):
        """An engine pytree moved onto its shardings (``declared``: the axes of a tree that declares none itself,
        as :func:`jaxinf.sharding.axes.declared_axes` takes them: a model's parameter axes, a field's bare value)."""

    def shardings(self, tree, declared=None):
        """The sharding of every array of ``tree`` (None: wherever JAX puts it)."""

    def rows(self, ndim: int = 1, last: bool = False):
        """The sharding of per-row outputs (rows on the first, or ``last``, axis)."""

    def replicated(self):
        """The sharding of an output every device holds whole."""

    def init(self, stage: Stage):
        """A stage's zero state, created where it lives."""

    def like(self, shapes, declared=None):
        """Abstract arrays (with their shardings): what a checkpoint is restored onto."""

    def fetch(self, x) -> np.ndarray:
        """The whole value of an array, on every process."""

    def gather_rows(self, local: np.ndarray) -> np.ndarray:
        """Per-row host values of this process's batch, for the global batch (lined up with :meth:`fetch`)."""

    def local_rows(self, x) -> np.ndarray:
        """The rows of a per-row output (rows on the first axis) that this process's slice of the corpus holds:
        :meth:`fetch`'s rows ``[g u, (g + 1) u)`` for data group g of ``G`` (``u`` = rows / G), read from this
        process's own devices, never gathered from the others'."""

    @property
    def writes_group(self) -> bool:
        """Whether this process is its data group's first: the one that writes what belongs to its slice of the
        corpus (its part of the index)."""


class DeviceExecutor:
    """:class:`Executor` on the default device: JAX places everything, one process reads every document."""

    mesh = None
    groups = (0, 1)  # (this process's slice of the corpus, number of slices)
    place_param = None  # jaxinf.models.from_hf's default placement

    def preflight(self, trees: Mapping[str, tuple[Any, Any]]) -> None:
        return None

    def jit(self, fn: Callable, *, donate_argnums=(), out_shardings=None) -> Callable:
        return jax.jit(fn, donate_argnums=donate_argnums)

    def put(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jnp.asarray(batch[k]) for k in BATCH_KEYS if k in batch}

    def put_replicated(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return self.put(batch)

    def place(self, tree, declared=None):
        return tree

    def shardings(self, tree, declared=None):
        return None

    def rows(self, ndim: int = 1, last: bool = False):
        return None

    def replicated(self):
        return None

    def init(self, stage: Stage):
        return stage.init()

    def like(self, shapes, declared=None):
        return abstract_tree(shapes, jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), shapes))

    def fetch(self, x) -> np.ndarray:
        return np.asarray(x)

    def gather_rows(self, local: np.ndarray) -> np.ndarray:
        return np.asarray(local)

    def local_rows(self, x) -> np.ndarray:
        return np.asarray(x)

    writes_group = True


class MeshExecutor:
    """:class:`Executor` on a mesh, every array placed by :mod:`jaxinf.sharding.partitioning`'s rules.

    - parameters go onto their shardings as the checkpoint is read (:meth:`place_param`): split over ``model``,
      and over ``data`` too with ``fsdp`` (``mesh.fsdp``; the layer loop gathers one layer at a time);
    - document batches are split over ``data``; each process contributes the
      rows of its own slice of the corpus (:attr:`groups`), as one global batch of
      ``groups x data.batch_size`` rows (``jax.make_array_from_process_local_data``);
    - stage states and results (covariance sums, eigenbases, Lambda, query
      gradients) are created, restored and returned on their shardings
      (:meth:`init`, :meth:`like`, :meth:`shardings`), so no device ever holds all of them;
    - :meth:`fetch` and :meth:`gather_rows` bring per-document results and row
      indices to every process, in the same (global) row order.

    On a mesh of several CPU devices, run its steps inside
    :func:`jaxinf.hostenv.mesh_lapack_threads` (as ``jaxinf run`` does).
    """

    def __init__(self, mesh: Mesh, batch_size: int | None = None, fsdp: bool = False):
        self.mesh, self.fsdp = mesh, fsdp
        self.groups = data_groups(mesh)
        self.per_group = rows_per_group(mesh, self.groups[1])
        if batch_size is not None and batch_size % self.per_group:
            raise ShardingError(
                f"data.batch_size={batch_size} does not split over the {self.per_group} position(s) of "
                f"the data axis that each process feeds (mesh.data={mesh.devices.shape[0]}, "
                f"{jax.process_count()} process(es)); use a multiple of {self.per_group}"
            )
        self._process_groups: list[int] | None = None

    def preflight(self, trees: Mapping[str, tuple[Any, Any]]) -> None:
        """Computes the sharding of every tree (``name -> (abstract tree, declared axes or None)``), so that a
        dimension the mesh does not divide is reported before any work (raises :class:`ShardingError`)."""
        for tree, declared in trees.values():
            self.shardings(tree, declared)

    # -------------------------------------------------------------- compiling and placing

    def jit(self, fn: Callable, *, donate_argnums=(), out_shardings=None) -> Callable:
        """``jax.jit`` of ``fn`` traced under this mesh (so the engine's :func:`~jaxinf.sharding.partitioning.constrain` marks take effect)."""
        return jit_on(self.mesh, fn, donate_argnums=donate_argnums, out_shardings=out_shardings)

    def put(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a document batch, as the global batch split over ``data``."""
        out = {}
        for k in BATCH_KEYS:
            if k not in batch:
                continue
            x = np.asarray(batch[k])
            if x.shape[0] % self.per_group:
                raise ShardingError(
                    f"a batch of {x.shape[0]} rows does not split over the {self.per_group} "
                    "data-axis position(s) of this process"
                )
            sharding = NamedSharding(self.mesh, batch_spec(x.ndim))
            shape = (x.shape[0] * self.groups[1],) + x.shape[1:]
            out[k] = jax.make_array_from_process_local_data(sharding, x, shape)
        return out

    def put_replicated(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """A batch every device needs whole (the queries); every process passes the same values."""
        replicated = NamedSharding(self.mesh, P())
        return {k: put_tree(np.asarray(batch[k]), replicated) for k in ("tokens", "mask", "weights") if k in batch}

    def place_param(self, path: str, x: np.ndarray, axes) -> jax.Array:
        """One parameter read from a checkpoint, onto the sharding of its declared :class:`~jaxinf.sharding.axes.Axes`."""
        return placer(self.mesh, self.fsdp)(path, x, axes)

    def place(self, tree, declared=None):
        """A pytree moved onto the shardings of its declared logical axes (:meth:`shardings`)."""
        return put_tree(tree, self.shardings(tree, declared))

    def shardings(self, tree, declared=None):
        """Each array's sharding under :mod:`jaxinf.sharding.partitioning`'s rules, from the logical axes it declares
        (``declared`` for a tree that carries none: see :func:`jaxinf.sharding.axes.declared_axes`); parameters over
        ``data`` too with ``mesh.fsdp``."""
        return tree_shardings(self.mesh, tree, declared, self.fsdp)

    def rows(self, ndim: int = 1, last: bool = False) -> NamedSharding:
        """Sharding of per-row outputs: rows over ``data`` on the first (or ``last``) axis."""
        return NamedSharding(self.mesh, rows_spec(ndim) if last else batch_spec(ndim))

    def replicated(self) -> NamedSharding:
        """Whole on every device."""
        return NamedSharding(self.mesh, P())

    def init(self, stage: Stage):
        """A stage's zero state, created directly on its shardings."""
        like = jax.eval_shape(stage.init)
        return jax.jit(stage.init, out_shardings=self.shardings(like))()

    def like(self, shapes, declared=None):
        """Abstract arrays with shardings: what a checkpoint is restored onto."""
        return abstract_tree(shapes, self.shardings(shapes, declared))

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
        return np.concatenate([every[p] for p in self._group_first()], axis=0)

    def _group_first(self) -> list[int]:
        """The first process of each data group, group by group."""
        if self._process_groups is None:
            first: dict[int, int] = {}
            for p in range(jax.process_count()):
                first.setdefault(data_groups(self.mesh, process=p)[0], p)
            self._process_groups = [first[g] for g in range(self.groups[1])]
        return self._process_groups

    @property
    def writes_group(self) -> bool:
        return jax.process_index() == self._group_first()[self.groups[0]]

    def local_rows(self, x) -> np.ndarray:
        """This process's data group's rows of ``x`` from the shards on its own devices; when those do not hold them
        whole (an output split across processes on another axis) they are gathered (:meth:`fetch`) and sliced. Which
        of the two is decided from the sharding alone, so every process takes the same path (a gather is collective)."""
        if jax.process_count() == 1:
            return np.asarray(x)
        g, G = self.groups
        u = x.shape[0] // G
        if not covers_rows(x.sharding, x.shape, self.mesh, G):
            return self.fetch(x)[g * u : (g + 1) * u]
        out = np.empty((u,) + x.shape[1:], x.dtype)
        done = set()
        for shard in x.addressable_shards:
            index = tuple(i.indices(n) for i, n in zip(shard.index, x.shape))
            lo, hi = max(index[0][0], g * u), min(index[0][1], (g + 1) * u)
            if hi <= lo or index in done:
                continue
            done.add(index)
            rows = slice(lo - index[0][0], hi - index[0][0])
            out[(slice(lo - g * u, hi - g * u),) + shard.index[1:]] = np.asarray(shard.data)[rows]
        return out


def covers_rows(sharding, shape: tuple[int, ...], mesh: Mesh, groups: int) -> bool:
    """Whether every process's devices hold, between them, the whole of its data group's rows of an array of
    ``shape`` placed by ``sharding`` (rows on the first axis, ``groups`` groups of ``shape[0] / groups`` rows each).
    The same answer on every process: it reads only the sharding's map of every device's slice."""
    u = shape[0] // groups
    group: dict[int, int] = {}  # process -> its data group
    held: dict[int, dict[tuple, int]] = {}  # process -> the distinct blocks of its group's rows its devices hold
    for device, index in sharding.devices_indices_map(shape).items():
        p = device.process_index
        g = group.setdefault(p, data_groups(mesh, process=p)[0])
        bounds = [i.indices(n)[:2] for i, n in zip(index, shape)]
        bounds[0] = (max(bounds[0][0], g * u), min(bounds[0][1], (g + 1) * u))
        held.setdefault(p, {})[tuple(bounds)] = int(np.prod([max(0, hi - lo) for lo, hi in bounds]))
    whole = u * int(np.prod(shape[1:]))
    return all(sum(blocks.values()) == whole for blocks in held.values())


def make_executor(config) -> Executor:
    """The executor of a :class:`jaxinf.config.Config`'s ``mesh.*``: the default device for a 1 x 1 mesh in one process (whatever the host has),
    a :class:`MeshExecutor` otherwise (a mesh or batch size that does not fit raises :class:`ShardingError`)."""
    if config.mesh.data * config.mesh.model == 1 and jax.process_count() == 1:
        return DeviceExecutor()
    mesh = make_mesh(config.mesh.data, config.mesh.model)
    log.info("%s", describe(mesh))
    return MeshExecutor(mesh, batch_size=config.data.batch_size, fsdp=config.mesh.fsdp)
