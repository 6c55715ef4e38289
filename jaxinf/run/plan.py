"""``jaxinf plan CONFIG``: memory and cost of every stage on a mesh, without any weights.

The model is built from its ``config.json`` alone (:func:`jaxinf.models.abstract`:
shapes and dtypes, nothing allocated), the tracked layers are found by tracing it
abstractly, and every array of the run gets its layout from the partition rules
of :mod:`jaxinf.sharding.partitioning`. Then, per mesh:

- **static bytes per device**: parameters, factors (``A`` and ``S``; the
  eigenbases ``Q_A``, ``Q_S`` take as much again), ``Lambda`` and the
  preconditioned query gradients, counted from their shapes and layouts
  (:func:`static_bytes`; no device needed);
- **compiled peak per device** of each stage's step (covariance, eigen, Lambda,
  query gradients, preconditioning, scores): the step is lowered with abstract
  inputs carrying their shardings and compiled by XLA for the mesh on simulated
  CPU devices, and XLA's memory analysis of the partitioned program gives its
  peak (arguments + outputs + temporaries, donated buffers counted once). These
  are CPU-backend numbers: an accelerator backend fuses and lays out
  differently, so read them as estimates within tens of percent;
- **FLOPs per document** of the per-batch steps, from XLA's cost analysis of the
  partitioned programs (so work that a layout repeats on several devices
  counts). XLA counts a ``while`` loop's body once, so the stacked layers are
  unrolled for counting and the count is taken on 1 and 2 layers and extended
  linearly: ``F(L) = F(1) + (L - 1) (F(2) - F(1))``. Where the unstacked layers
  cannot be laid out on the mesh (a factor no mesh axis divides, with no
  layer axis to fall back to), they are counted on one device and divided
  evenly (``flops_from``);
- **time** of each per-document stage for ``plan.documents`` documents of
  ``plan.tokens_per_document`` tokens at ``plan.device_flops`` per device (FLOPs
  scaled linearly in tokens from ``data.max_length``).

With ``factors.from`` (factors fitted by another run, e.g. on a larger slice)
the fitting steps are left out, as the run leaves them out.

A step whose peak exceeds ``plan.device_memory_gib`` fails the plan (exit 1,
naming the stage, mesh and bytes; :mod:`jaxinf.run.plan_report`). Tracking a layer whose factor alone would be
larger than 64 Ki x 64 Ki (the ``lm_head`` of a 256k vocabulary under
``factors.track: all``) is refused up front.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from jaxinf.errors import UserError
from jaxinf.run.index_store import index_size  # no jax: the simulated devices are set up later

log = logging.getLogger("jaxinf")

GiB = 2**30
MAX_FACTOR_DIM = 65536


class PlanError(UserError):
    """A config the planner cannot plan (one line, names what)."""


@dataclasses.dataclass
class Step:
    """One compiled step on one mesh: XLA's memory analysis per device, and FLOPs per device per call."""

    name: str
    peak: int
    arguments: int
    temporaries: int
    outputs: int
    flops: float | None = None
    documents: int | None = None  # documents per call (per-document steps)
    flops_from: str | None = None  # "mesh": the partitioned program's count; "one device": divided evenly
    seconds: float = 0.0  # compile time
    bytes_accessed: float | None = None  # XLA's bytes accessed per device per call (counted as the FLOPs)
    model_flops: float | None = None  # of which the model's own pass (per-document steps; jaxinf.run.chips)


@dataclasses.dataclass
class MeshPlan:
    data: int
    model: int
    hosts: int
    groups: int
    global_batch: int
    static: dict[str, int]
    steps: list[Step] = dataclasses.field(default_factory=list)

    @property
    def devices(self) -> int:
        return self.data * self.model


# --------------------------------------------------------------------------- the model, without weights


def abstract_model(config, num_layers: int | None = None, scan: bool | None = None):
    """The abstract LM of ``model.checkpoint``'s config.json and its tracked layers."""
    from jaxinf import models
    from jaxinf.run.inputs import tracked_layers

    if config.model.checkpoint is None:
        raise PlanError("model.checkpoint: not set (a directory with the model's config.json; weights are not read)")
    mc = models.read_config(
        config.model.checkpoint,
        dtype=config.model.dtype,
        scan=config.model.scan_layers if scan is None else scan,
        remat=config.model.remat,
    )
    if num_layers is not None:  # the first layers, with their own kinds (sliding or full attention, rotary or not)
        mc = mc.replace(
            num_layers=num_layers,
            **{k: getattr(mc, k)[:num_layers] for k in ("layer_types", "rope_layers") if getattr(mc, k) is not None},
        )
    lm = models.abstract(mc)
    return lm, tracked_layers(lm, config.factors.track)


def check_layers(layers) -> None:
    """Refuses a tracked layer whose factor could never be decomposed on one device (e.g. a 256k-vocabulary lm_head)."""
    for name, spec in layers.items():
        n = max(spec.d_in_aug, spec.d_out)
        if n > MAX_FACTOR_DIM:
            gb = n * n * 4 / 1e9
            raise PlanError(
                f"factors.track tracks {name}, whose factor {'S' if spec.d_out >= spec.d_in_aug else 'A'} "
                f"would be {n} x {n} ({gb:,.0f} GB in float32, decomposed whole on one device); track "
                "mlp or a list of patterns without it"
            )


def stage_shapes(lm, layers, config) -> dict[str, Any]:
    """Abstract covariance sums, eigenbases, Lambda (:func:`jaxinf.engine.programs.fitted_shapes`) and the query gradients of
    ``plan.queries`` queries, of the tracked layers."""
    import jax
    import jax.numpy as jnp

    from jaxinf.engine import curvature, programs, scoring
    from jaxinf.engine.precision import statistics_dtype

    dtype = statistics_dtype(config.run.precision)
    fitted = programs.fitted_shapes(lm.task(), layers, dtype)
    eigen, Lambda = fitted["eigen"], fitted["lambda"]
    Q = config.plan.queries
    G = {k: jax.ShapeDtypeStruct(s.lead + (Q, s.d_out, s.d_in_aug), dtype) for k, s in layers.items()}
    loss = jax.ShapeDtypeStruct((Q,), jnp.float32)
    curv = jax.eval_shape(
        lambda e, L: curvature.assemble(config.factors.strategy, lambda: e, lambda basis: L), eigen, Lambda
    )
    queries = jax.eval_shape(
        lambda G, l, c: scoring.prepare_queries(
            G, l, c, config.scores.damping, config.scores.query_rank, dtype, config.scores.query_svd
        ),
        G,
        loss,
        curv,
    )
    return {**fitted, "queries": queries, "curvature": curv}


def static_bytes(lm, shapes: dict, data: int, model: int, fsdp: bool = False) -> dict[str, int]:
    """Bytes per device of parameters and query gradients (both over ``data`` too with ``fsdp``), factors (A, S),
    eigenbases (Q, e) and Lambda."""
    from jaxinf import models
    from jaxinf.engine import curvature
    from jaxinf.sharding.axes import field_axes
    from jaxinf.sharding.partitioning import shard_bytes, tree_specs

    mesh = {"data": data, "model": model}
    cov = shapes["finished"]
    factors = (field_axes(curvature.Covariance, "A"), field_axes(curvature.Covariance, "S"))
    out = {
        "parameters": shard_bytes(lm.params, tree_specs(mesh, lm.params, models.parameter_axes(lm.config), fsdp), mesh),
        "factors": shard_bytes((cov.A, cov.S), tree_specs(mesh, (cov.A, cov.S), factors), mesh),
        "eigenbases": shard_bytes(shapes["eigen"], tree_specs(mesh, shapes["eigen"]), mesh),
        "Lambda": shard_bytes(shapes["lambda"], tree_specs(mesh, shapes["lambda"], curvature.LAMBDA_AXES), mesh),
        "queries": shard_bytes(shapes["queries"], tree_specs(mesh, shapes["queries"], fsdp=fsdp), mesh),
    }
    return out


def simulated_groups(data: int, model: int, hosts: int) -> int:
    """Slices of the corpus read per step when ``hosts`` processes own consecutive devices of a ``data x model`` mesh
    (as :func:`jaxinf.sharding.meshes.make_mesh` orders them)."""
    import numpy as np

    from jaxinf.sharding.meshes import data_groups

    n = data * model
    if hosts < 1 or n % hosts:
        raise PlanError(f"plan.hosts={hosts} does not divide the {n} devices of mesh {data}x{model}")
    per_host = n // hosts
    layout = dataclasses.make_dataclass("Layout", ["devices"])(np.arange(n).reshape(data, model))
    return data_groups(layout, process_of=lambda i: int(i) // per_host, process=0)[1]


# --------------------------------------------------------------------------- one layer's working set


def largest_layers(config, layers, rows: int, model: int) -> dict[str, tuple[str, int]]:
    """Per stage, the tracked block whose one layer has the largest working set, and its bytes per device."""
    from jaxinf.engine.programs import SHRINK, layer_working_set

    out = {}
    for stage in SHRINK:
        sizes = {
            name: layer_working_set(
                stage,
                spec,
                rows=rows,
                tokens=config.data.max_length,
                queries=config.plan.queries,
                query_batch=min(config.data.query_batch_size, config.plan.queries),
                rank=config.scores.query_rank,
                model=model,
            )
            for name, spec in layers.items()
        }
        name = max(sizes, key=sizes.__getitem__)
        out[stage] = (name, sizes[name])
    return out


def check_layers_fit(config, layers, rows: int, model: int, memory_bytes: int | None, source: str) -> None:
    """Raises :class:`PlanError` naming the first stage whose largest layer alone exceeds ``memory_bytes``."""
    from jaxinf.engine.programs import SHRINK

    if memory_bytes is None:
        return
    for stage, (name, size) in largest_layers(config, layers, rows, model).items():
        if size > memory_bytes:
            raise PlanError(
                f"stage {stage}: one layer of {name} needs about {size / GiB:.2f} GiB per device for "
                f"its statistic, more than {source} ({memory_bytes / GiB:.2f} GiB); lower "
                f"{SHRINK[stage]}"
            )


# --------------------------------------------------------------------------- compiling the steps


def _memory(name: str, compiled, seconds: float) -> Step:
    m = compiled.memory_analysis()
    # arguments + outputs + temporaries, donated (aliased) buffers once. (The CPU backend's peak_memory_in_bytes
    # leaves the temporaries out, so it is not used.)
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return Step(
        name,
        peak,
        int(m.argument_size_in_bytes),
        int(m.temp_size_in_bytes),
        int(m.output_size_in_bytes),
        seconds=seconds,
    )


def _flops(compiled) -> float:
    return _cost(compiled)[0]


def _cost(compiled) -> tuple[float, float]:
    """XLA's cost analysis of a compiled program: ``(flops, bytes accessed)``."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def abstract_arguments(config, mesh, lm, layers, shapes: dict, global_batch: int) -> dict[str, Any]:
    """Every argument a stage's program takes (:data:`jaxinf.engine.programs.ARGUMENTS`), abstract (shapes, dtypes and the
    shardings the run gives them on ``mesh``; ``shapes``: :func:`stage_shapes`): a batch of ``global_batch`` rows of ``data.max_length`` tokens, a
    query batch of ``data.query_batch_size`` (at most ``plan.queries``), ``plan.queries`` preconditioned query gradients. ``state`` is
    per program (its stage's) and filled in by :func:`step_programs`."""
    import jax
    import jax.numpy as jnp

    from jaxinf import models
    from jaxinf.engine import curvature, indexing, programs, scoring
    from jaxinf.engine.precision import statistics_dtype
    from jaxinf.sharding.meshes import abstract_tree
    from jaxinf.sharding.partitioning import batch_spec, tree_shardings

    def absd(tree, declared=None):
        return abstract_tree(tree, tree_shardings(mesh, tree, declared, config.mesh.fsdp))

    dtype = statistics_dtype(config.run.precision)
    T = config.data.max_length
    batch_sh, rows_sh = (jax.sharding.NamedSharding(mesh, batch_spec(n)) for n in (2, 1))
    batch = {
        "tokens": jax.ShapeDtypeStruct((global_batch, T), jnp.int32, sharding=batch_sh),
        "mask": jax.ShapeDtypeStruct((global_batch, T), jnp.float32, sharding=batch_sh),
        "weights": jax.ShapeDtypeStruct((global_batch, T), jnp.float32, sharding=batch_sh),
    }
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    qbatch = {
        k: jax.ShapeDtypeStruct(
            (min(config.data.query_batch_size, config.plan.queries), T), v.dtype, sharding=replicated
        )
        for k, v in batch.items()
    }
    batch.update({k: jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=rows_sh) for k in ("index", "chunk")})
    eigen = absd(shapes["eigen"])
    Lambda = absd(shapes["lambda"], curvature.LAMBDA_AXES)
    strategy = curvature.strategy(config.factors.strategy)
    curv = curvature.curvature(strategy, eigen if strategy.eigen else None, Lambda if strategy.needs_lambda else None)
    Q = config.plan.queries
    queries = jax.eval_shape(
        lambda c: scoring.prepare_queries(
            {k: jnp.zeros(s.lead + (Q, s.d_out, s.d_in_aug), dtype) for k, s in layers.items()},
            jnp.zeros(Q, dtype),
            c,
            config.scores.damping,
            config.scores.query_rank,
            dtype,
            config.scores.query_svd,
        ),
        curv,
    )
    selection = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(lambda e: indexing.select_cells(e, indexing.kept_directions(config.index.k)), eigen),
    )
    basis = {  # columns reordered: the eigenbases' shapes
        k: {"Q_A": eigen.Q_A[k], "Q_S": eigen.Q_S[k], "cells": selection.cells[k]} for k in layers
    }
    return {
        "params": absd(lm.params, models.parameter_axes(lm.config)),
        "eigen": eigen if strategy.eigen else None,
        "curv": curv,
        "queries": absd(queries),
        "basis": basis,
        "selection": selection,
        "batch": batch,
        "qbatch": qbatch,
        "key": jax.eval_shape(lambda: jax.random.key(0)) if config.factors.fisher == "sampled" else None,
        "tails": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
            jax.eval_shape(lambda: programs.tails_init(config, layers, Q, config.plan.documents)),
        ),
    }


def step_programs(config, mesh, lm, layers, global_batch: int, with_pass: bool = False, one_device: bool | None = None):
    """Every stage's step for ``mesh``, as ``(name, jitted function, abstract args, documents per call)``: the
    programs the run compiles (:func:`jaxinf.engine.programs.programs`, compiled as :meth:`~jaxinf.engine.programs.Program.jit`
    compiles them for the run), and the eigendecomposition of the largest factor. With ``with_pass``, also ``pass``:
    the model's own pass of a document batch (forward, and backward to every tracked layer) with a statistic that
    does no arithmetic, whose FLOPs the roofline (:mod:`jaxinf.run.chips`) takes at the model's rate. ``one_device``:
    whether the run is on one device without a mesh (:func:`jaxinf.run.executor.make_executor`'s rule: a 1 x 1 mesh in
    one process), which decides whether the scoring pass writes the index (None: from ``mesh`` and ``plan.hosts``)."""
    import jax
    import jax.numpy as jnp

    from jaxinf.engine import programs, stages
    from jaxinf.engine.distributed import eigh_program
    from jaxinf.run.executor import MeshExecutor
    from jaxinf.sharding.meshes import abstract_tree, jit_on
    from jaxinf.sharding.partitioning import tree_shardings

    task = lm.task()
    executor = MeshExecutor(mesh)
    shapes = stage_shapes(lm, layers, config)
    args = abstract_arguments(config, mesh, lm, layers, shapes, global_batch)
    out = []
    if one_device is None:
        one_device = mesh.devices.size == 1 and config.plan.hosts == 1
    for name, program in programs.programs(config, task, layers, one_device=one_device).items():
        given = dict(args)
        if program.stage is not None:
            state = jax.eval_shape(program.stage.init)
            given["state"] = abstract_tree(state, tree_shardings(mesh, state))
        out.append(
            (
                name,
                program.jit(executor),
                tuple(given[a] for a in program.args),
                global_batch if program.per_document else None,
            )
        )
        if name == "covariance":
            # one program per factor (as distributed.eigendecompose): the largest factor's is the eigen step's peak
            finished = abstract_tree(shapes["finished"], tree_shardings(mesh, shapes["finished"]))
            factors = [("A", m) for m in finished.A.values()] + [("S", m) for m in finished.S.values()]
            which, M = max(factors, key=lambda f: (f[1].shape[-1], f[1].shape[:-2]))
            out.append(("eigen", eigh_program(mesh, M, which), (M,), None))
    if with_pass:

        def model_pass(p, b):
            return stages.train_statistics(task, layers, p, b, None, lambda a, g, m, c: jnp.sum(g, axis=(0, 1)))

        out.append(("pass", jit_on(mesh, model_pass), (args["params"], args["batch"]), global_batch))
    return out


def compile_steps(config, mesh, lm, layers, global_batch: int, flops: bool = True) -> list[Step]:
    """Compiles every step for ``mesh``: memory from the real (stacked) program, FLOPs from 1- and 2-layer ones."""
    out = []
    for name, fn, args, docs in step_programs(config, mesh, lm, layers, global_batch):
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        step = _memory(name, compiled, time.perf_counter() - t0)
        step.documents = docs
        out.append(step)
        log.info(
            "plan: %s on %dx%d compiled in %.1fs (peak %.2f GiB per device)",
            name,
            *mesh.devices.shape,
            step.seconds,
            step.peak / GiB,
        )
    if flops:
        import jax

        from jaxinf.sharding.meshes import make_mesh
        from jaxinf.sharding.partitioning import ShardingError

        L = lm.config.num_layers
        counts: dict[str, list[list[float]]] = {}  # per step: (FLOPs, bytes) at 1 and 2 layers
        where = "mesh"
        for n in (1, 2):
            small, small_layers = abstract_model(config, num_layers=n, scan=False)
            try:
                programs, scale = step_programs(config, mesh, small, small_layers, global_batch, True), 1.0
            except ShardingError:
                # unstacked layers have no layer axis to fall back to: count this model's FLOPs on one device
                one = make_mesh(1, 1, jax.devices()[:1])
                programs, scale, where = (
                    step_programs(config, one, small, small_layers, global_batch, True),
                    1.0 / mesh.devices.size,
                    "one device",
                )
            for name, fn, args, docs in programs:
                if docs is not None:
                    counts.setdefault(name, []).append([scale * c for c in _cost(fn.lower(*args).compile())])
        linear = lambda c1, c2: c1 + (L - 1) * (c2 - c1)  # noqa: E731
        for step in out:
            if step.name in counts:
                (f1, b1), (f2, b2) = counts[step.name]
                step.flops = linear(f1, f2)
                step.flops_from = where
                step.bytes_accessed = linear(b1, b2)
                step.model_flops = linear(counts["pass"][0][0], counts["pass"][1][0])
    return out


# --------------------------------------------------------------------------- the plan


def plan(config, meshes: Iterable[tuple[int, int]], compile: bool = True, chip=None) -> dict:
    """The plan of ``config`` for each ``(data, model)`` mesh; see the module docstring. ``chip``: a
    :class:`jaxinf.run.chips.Chip` whose roofline times each per-document step."""
    import jax

    from jaxinf.engine import precision
    from jaxinf.run import preflight
    from jaxinf.sharding.meshes import make_mesh

    precision.enable(config.run.precision)
    lm, layers = abstract_model(config)
    preflight.check_model_limits(config, lm.config)  # as jaxinf run refuses it: a plan of a run that cannot start
    check_layers(layers)
    shapes = stage_shapes(lm, layers, config)
    tracked = sum(s.num_params for s in layers.values())
    result = {
        "model": config.model.checkpoint,
        "family": lm.config.family,
        "parameters": lm.num_params,
        "parameter_dtype": lm.config.param_dtype,
        "tracked_layers": sum(len(s.layer_names) for s in layers.values()),
        "tracked_parameters": int(tracked),
        "precision": config.run.precision,
        "fsdp": config.mesh.fsdp,
        "meshes": [],
    }
    if chip is not None:
        result["chip"] = dataclasses.asdict(chip)
    for data, model in meshes:
        groups = simulated_groups(data, model, config.plan.hosts)
        per_group = data // groups
        if config.data.batch_size % per_group:
            raise PlanError(
                f"data.batch_size={config.data.batch_size} does not split over the {per_group} data-axis "
                f"position(s) each of the {groups} corpus slices feeds (mesh {data}x{model}, "
                f"plan.hosts={config.plan.hosts})"
            )
        mp = MeshPlan(
            data,
            model,
            config.plan.hosts,
            groups,
            groups * config.data.batch_size,
            static_bytes(lm, shapes, data, model, config.mesh.fsdp),
        )
        if compile:
            if jax.device_count() < data * model:
                raise PlanError(
                    f"mesh {data}x{model} needs {data * model} devices, {jax.device_count()} available "
                    "(jaxinf plan simulates them when it starts jax itself)"
                )
            mesh = make_mesh(data, model, jax.devices()[: data * model])
            mp.steps = compile_steps(config, mesh, lm, layers, mp.global_batch)
        entry = _mesh_dict(mp, config, chip)
        entry["largest_layers"] = largest_layers(config, layers, max(mp.global_batch // data, 1), model)
        result["meshes"].append(entry)
    if config.index.k is not None:
        result["index"] = index_size(config, layers, [d * m for d, m in meshes])
        for entry in result["meshes"]:
            entry["index_rows"] = index_rows_held(config, result["index"], entry)
    return result


def index_rows_held(config, ix: dict, mesh: dict) -> dict:
    """The index rows that the pass writing them holds between two flushes
    (:func:`jaxinf.run.index_run.flush_every` batches of ``data.batch_size`` rows per corpus slice), per device: they
    wait on the devices, split over ``data``, until they are saved. ``step``: the pass that writes them (the Lambda
    pass, the scoring pass, or a pass of its own, as :func:`jaxinf.engine.programs.programs` decides); :func:`jaxinf.run.plan_report.check_fit`
    adds them to its peak."""
    from jaxinf.engine import programs
    from jaxinf.run.index_run import flush_every

    one_device = mesh["devices"] == 1 and mesh["hosts"] == 1
    step = (
        "lambda"
        if programs.index_in_lambda(config, one_device)
        else "scores"
        if programs.fused_index(config, one_device)
        else "index"
    )
    every = flush_every(config.index.save_every, ix, config.data.batch_size)
    return {
        "step": step,
        "batches": every,
        "bytes_per_device": every * -(-mesh["global_batch"] // mesh["data"]) * ix["bytes_per_document"],
    }


def _mesh_dict(mp: MeshPlan, config, chip=None) -> dict:
    tokens = config.plan.tokens_per_document or config.data.max_length
    scale = tokens / config.data.max_length
    steps = []
    for s in mp.steps:
        d = dataclasses.asdict(s)
        if s.flops is not None and s.documents:
            per_doc = s.flops * mp.devices / s.documents * scale
            d["flops_per_document"] = per_doc
            n = (
                config.factors.max_documents
                if s.name in ("covariance", "lambda") and config.factors.max_documents
                else config.plan.documents
            )
            if s.name == "breakdowns":  # each query's top documents only
                n = min(n, config.plan.queries * config.scores.topk)
            d["documents_timed"] = n
            d["hours"] = n * per_doc / (mp.devices * config.plan.device_flops) / 3600
            if chip is not None and s.bytes_accessed is not None:  # per call, per device; calls for n documents
                from jaxinf.run.chips import roofline

                r = roofline(
                    chip,
                    s.flops * scale,
                    s.bytes_accessed * scale,
                    None if s.model_flops is None else s.model_flops * scale,
                    config.model.dtype,
                    config.run.precision,
                    config.run.matmul_precision,
                )
                d["roofline"] = {**r, "hours": n / s.documents * r["seconds"] / 3600}
        steps.append(d)
    return {
        "data": mp.data,
        "model": mp.model,
        "devices": mp.devices,
        "hosts": mp.hosts,
        "corpus_slices": mp.groups,
        "global_batch": mp.global_batch,
        "static": mp.static,
        "steps": steps,
    }


NO_HOISTING = "--xla_disable_hlo_passes=while-loop-invariant-code-motion,while-loop-expensive-invariant-code-motion"
"""XLA flag the planner compiles with. The CPU backend computes bf16 matrix products in float32, so a bf16 weight
used inside the layer loop gets a float32 convert, which loop-invariant code motion then hoists out of the loop as
a float32 copy of every layer's weights at once (for Command R 35B on 16 x 16, 8 GiB per device). Accelerators
multiply bf16 natively and make no such copy; with the hoisting off, the convert stays one layer's."""


def prepare_devices(meshes: list[tuple[int, int]]) -> None:
    """Simulates enough CPU devices for the largest mesh, if jax has not started yet (else leaves it as it is),
    and compiles without loop-invariant code motion (:data:`NO_HOISTING`)."""
    need = max(d * m for d, m in meshes)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags = f"{flags} --xla_force_host_platform_device_count={need}"
    if "xla_disable_hlo_passes" not in flags:
        flags = f"{flags} {NO_HOISTING}"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
