"""Distributed algorithms: the numerical work whose data movement over a mesh is spelled out by hand.

A layer above curvature and scoring: XLA's SPMD partitioner places every other
step from its inputs' shardings, but the eigendecomposition of a factor split
over the mesh would be gathered whole onto every device, so it is written here.

**Eigendecomposition.** :func:`distributed_eigh` gathers whole matrices of
one factor onto devices, different matrices on different devices, and each
device decomposes its own ones (``shard_map`` of :func:`jaxinf.engine.curvature.eigen.stacked_eigh`,
an unbatched ``eigh`` per matrix); one program per factor (:func:`eigendecompose`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinf.engine.curvature import Covariance, Eigen
from jaxinf.engine.curvature import eigendecompose as eigendecompose_factors
from jaxinf.engine.curvature.eigen import stacked_eigh
from jaxinf.sharding.axes import field_axes
from jaxinf.sharding.meshes import jit_on
from jaxinf.sharding.partitioning import ALL, AXES, dims_spec, mesh_shape, resolve, spec_dims, tree_shardings


def leading_path(spec: P, ndim: int) -> list[P]:
    """The layouts that take an array from ``spec`` to ``P(("data", "model"), None, ...)``, one mesh axis at a time.

    XLA's SPMD partitioner moves one mesh axis from one dimension to another
    with an all-to-all, but falls back to replicating the whole array when both
    axes move at once (e.g. rows on ``model`` and columns on ``data`` to the
    leading axis on both); stepping through these layouts keeps every move an all-to-all.
    """
    dims = spec_dims(spec, ndim)
    path = []
    for axis in AXES:
        if axis in dims[0]:
            continue
        dims = [dims[0]] + [tuple(a for a in d if a != axis) for d in dims[1:]]
        dims[0] = tuple(a for a in AXES if a in dims[0] or a == axis)
        path.append(dims_spec(dims))
    return path


def _move(x: jax.Array, mesh: Mesh, specs: list[P]) -> jax.Array:
    for spec in specs:
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return x


def distributed_eigh(M: jax.Array, which: str, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    """:func:`jaxinf.engine.curvature.eigen.stacked_eigh` of one factor ``M`` ``[*lead, n, n]`` (``which``: "A" or "S"),
    different matrices on different devices.

    The matrices are padded with zero matrices to a multiple of the device count and
    moved, by all-to-alls (:func:`leading_path`), from their stored layout to one split
    over every device along the matrix index, so each device holds whole matrices;
    each device decomposes its own (``shard_map``: an unbatched ``eigh`` per matrix,
    mapped); the eigenvectors and eigenvalues move back to the stored layout the same
    way and the padding is dropped. Call it under ``jax.jit``, one factor per program
    (:func:`eigendecompose`), so that a device holds one factor's matrices at a time.
    """
    devices = mesh.devices.size
    shape = mesh_shape(mesh)
    every = P(ALL)
    n = M.shape[-1]
    flat = M.reshape((-1, n, n))
    count = flat.shape[0]
    flat = jnp.pad(flat, ((0, (-count) % devices), (0, 0), (0, 0)))
    q_axes, e_axes = field_axes(Eigen, "Q_" + which).of_rank(3), field_axes(Eigen, "e_" + which).of_rank(2)
    stored = resolve(shape, q_axes.family, q_axes.names, flat.shape, f"Q_{which}")
    stored_e = resolve(shape, e_axes.family, e_axes.names, flat.shape[:2], f"e_{which}")
    flat = _move(flat, mesh, [stored] + leading_path(stored, 3))
    e, Q = jax.shard_map(stacked_eigh, mesh=mesh, in_specs=every, out_specs=(every, every))(flat)
    Q = _move(Q, mesh, list(reversed([stored] + leading_path(stored, 3)[:-1])))  # back, step by step
    e = _move(e, mesh, list(reversed([stored_e] + leading_path(stored_e, 2)[:-1])))
    return e[:count].reshape(M.shape[:-1]), Q[:count].reshape(M.shape)


def eigh_program(mesh: Mesh, M, which: str) -> Callable:
    """The jitted :func:`distributed_eigh` of a factor shaped like ``M`` (``which``: "A" or "S"), with its result
    laid out as the eigenvalues and eigenvectors are stored."""
    out = (
        tree_shardings(mesh, jax.ShapeDtypeStruct(M.shape[:-1], M.dtype), field_axes(Eigen, "e_" + which)),
        tree_shardings(mesh, jax.ShapeDtypeStruct(M.shape, M.dtype), field_axes(Eigen, "Q_" + which)),
    )
    return jit_on(mesh, lambda m: distributed_eigh(m, which, mesh), out_shardings=out)


def eigendecompose(cov: Covariance, mesh: Mesh | None = None) -> Eigen:
    """:func:`jaxinf.engine.curvature.eigendecompose` of ``cov``, one jitted program per factor.

    On the default device (``mesh`` None) each program is ``stacked_eigh``; on a
    mesh it is :func:`eigh_program`, different matrices on different devices, the
    result laid out as the eigenbases are stored. Factors of the same shape share a program.
    """
    if mesh is None:
        eigh = jax.jit(stacked_eigh)
        return eigendecompose_factors(cov, lambda M, which: eigh(M))
    cache: dict = {}

    def eigh_on_mesh(M, which):
        key = (which, M.shape, M.dtype)
        if key not in cache:
            cache[key] = eigh_program(mesh, M, which)
        return cache[key](M)

    return eigendecompose_factors(cov, eigh_on_mesh)
