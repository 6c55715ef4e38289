"""Every check ``jaxinf run`` makes before its run directory is touched, in the order it makes them.

Each fails in one line naming the key, file or layer, and leaves nothing behind. The model's ``config.json`` is
read once for all of them (the weights are read later, by :func:`jaxinf.run.inputs.load_inputs`).

Before any device is touched (:func:`before_devices`):

1. the inputs exist: ``model.checkpoint``, ``data.documents``, ``data.queries`` (:func:`jaxinf.run.inputs
   .check_inputs`);
2. the index a ``scores.mode: index`` run reads exists (:func:`jaxinf.run.index_run.check_available`);
3. ``data.max_length`` fits the model's positions (:func:`jaxinf.run.preflight.check_model_limits`);
4. every query is read, tokenized and checked against ``data.max_length`` and ``data.query_batch_size``
   (:func:`jaxinf.run.inputs.read_checked_queries`), so a bad query is refused before ``--overwrite`` sets the
   old run aside;
5. ``data.documents`` is opened, once (its validating scan: the format, every line or row, the ids), is not empty,
   and holds the ``supports`` ids the queries name (:func:`jaxinf.run.inputs.checked_corpus`).

With the devices, the mesh and the precision set up (:func:`before_the_run_directory`), from the model's shapes
alone (no weights):

6. every parameter and stage state fits the mesh's layouts (:func:`check_layouts`; on a mesh the run made);
7. no tracked layer's statistic alone exceeds a device's memory (:func:`check_statistics`; with
   ``plan.device_memory_gib`` or an accelerator's reported memory).

Later checks need what only the run has: the content of the inputs against the run directory
(:mod:`jaxinf.run.fingerprint`), the corpus's token counts (:func:`jaxinf.run.preflight.check_corpus`) and the
fitted curvature (:func:`jaxinf.run.preflight.check_curvature`).
"""

from __future__ import annotations

import jax

from jaxinf import config as cfg
from jaxinf.engine import curvature, precision, programs
from jaxinf.run import index_run, preflight
from jaxinf.run.executor import Executor
from jaxinf.run.inputs import check_inputs, checked_corpus, read_checked_queries, tracked_layers


def before_devices(config: cfg.Config) -> tuple:
    """Checks 1-5 of the module docstring; returns the model's config (its ``config.json``, read once), the
    checked queries and the checked corpus, or ``(None, None, None)`` without ``model.checkpoint``."""
    check_inputs(config)
    index_run.check_available(config)
    if config.model.checkpoint is None:
        return None, None, None
    from jaxinf import models

    model_config = models.read_config(
        config.model.checkpoint, dtype=config.model.dtype, scan=config.model.scan_layers, remat=config.model.remat
    )
    preflight.check_model_limits(config, model_config)
    queries = read_checked_queries(config, model_config.vocab_size)
    return model_config, queries, checked_corpus(queries, config)


def before_the_run_directory(config: cfg.Config, executor: Executor, model_config, layouts: bool) -> None:
    """Checks 6 (with ``layouts``: the run made ``executor`` from ``mesh.*``) and 7 of the module docstring, from
    the abstract model of ``model_config`` (built once, only when a check needs it)."""
    if model_config is None:
        return
    limit = memory_limit(config)
    layouts = layouts and executor.mesh is not None
    if not layouts and limit is None:
        return
    from jaxinf import models

    lm = models.abstract(model_config)
    layers = tracked_layers(lm, config.factors.track)
    if layouts:
        check_layouts(config, executor, lm, layers)
    if limit is not None:
        check_statistics(config, executor, layers, *limit)


def check_layouts(config: cfg.Config, executor: Executor, lm, layers) -> None:
    """Every parameter and stage state of the abstract model ``lm`` checked against the executor's layouts, so a
    mesh that cannot hold them is reported before the run directory is made."""
    from jaxinf import models

    shapes = programs.fitted_shapes(lm.task(), layers, precision.statistics_dtype(config.run.precision))
    executor.preflight(
        {
            "parameters": (lm.params, models.parameter_axes(lm.config)),
            "covariance": (shapes["covariance"], None),
            "eigen": (shapes["eigen"], None),
            "lambda": (shapes["lambda"], curvature.LAMBDA_AXES),
        }
    )


def memory_limit(config: cfg.Config) -> tuple[int, str] | None:
    """``(bytes, where the figure comes from)`` of one device's memory: ``plan.device_memory_gib`` when set, else
    what an accelerator reports (``bytes_limit``); None on a CPU with no setting."""
    if config.plan.device_memory_gib is not None:
        return int(config.plan.device_memory_gib * 2**30), f"plan.device_memory_gib={config.plan.device_memory_gib:g}"
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    limit = (stats or {}).get("bytes_limit")
    return None if limit is None else (int(limit), f"the memory of {device.device_kind}")


def check_statistics(config: cfg.Config, executor: Executor, layers, limit: int, source: str) -> None:
    """A tracked layer whose statistic alone cannot fit ``limit`` bytes is named with the key that would make it
    fit (:func:`jaxinf.run.plan.check_layers_fit`)."""
    from jaxinf.run import plan

    rows = max(config.data.batch_size * executor.groups[1] // config.mesh.data, 1)
    plan.check_layers_fit(config, layers, rows, config.mesh.model, limit, source)
