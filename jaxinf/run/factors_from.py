"""``factors.from``: the fitted curvature of another run directory, checked against this run at start-up
(:func:`check`) and loaded in place of fitting it (:func:`load`)."""

from __future__ import annotations

import logging
from pathlib import Path

from jaxinf import config as cfg
from jaxinf.engine import curvature, precision, programs
from jaxinf.run import rundir
from jaxinf.run.executor import Executor
from jaxinf.run.inputs import Inputs
from jaxinf.run.rundir import StoreError
from jaxinf.run.store import RunStore

log = logging.getLogger("jaxinf")


def check(config: cfg.Config, model_fp: dict | None) -> RunStore | None:
    """The run directory of ``factors.from`` (None without it), checked against this run: the settings that change
    the curvature, and the *content* of the model and tokenizer (``model_fp``, :func:`jaxinf.run.fingerprint.check_model`)
    against the fingerprints that run recorded, so that weights edited under the same path are refused and the same
    weights under another path or in a copy are accepted. A run that recorded none (started by an older jaxinf, or
    with imported factors) is compared by the checkpoint's resolved path."""
    if config.factors.from_run is None:
        return None
    other = Path(config.factors.from_run)
    try:
        record = rundir.read_record(other)
        if record is None:
            raise StoreError(f"factors.from: {other}: no run.json (nor its copy state/run.json)")
        theirs = rundir.recorded_config(record, other)
    except (cfg.ConfigError, TypeError, KeyError) as e:
        raise StoreError(f"factors.from: {other / 'run.json'}: unreadable run record ({e})") from None
    recorded = record.get("inputs") or {}
    mismatched = []
    if model_fp is not None and "model" in recorded:
        changed = [
            kind
            for kind in ("model", "tokenizer")
            if {n: f["sha256"] for n, f in model_fp[kind]["files"].items()}
            != {n: f.get("sha256") for n, f in recorded.get(kind, {}).get("files", {}).items()}
        ]
        if changed and Path(theirs.model.checkpoint or "").resolve() == Path(config.model.checkpoint or "").resolve():
            what = " and ".join(changed)  # the same directory, edited in place since: no setting to leave out or change
            raise StoreError(
                f"{config.model.checkpoint}: the {what} changed since {other} read {'it' if len(changed) == 1 else 'them'}"
                f" (its curvature was fitted with the {what} as {'it was' if len(changed) == 1 else 'they were'}); "
                f"restore {'it' if len(changed) == 1 else 'them'}, or fit {other} again (jaxinf run --overwrite)"
            )
        if changed:
            mismatched.append(
                f"model.checkpoint (the {' and '.join(changed)} in {config.model.checkpoint} "
                f"{'is' if len(changed) == 1 else 'are'} not what {other} read from {theirs.model.checkpoint})"
            )
    elif Path(theirs.model.checkpoint or "").resolve() != Path(config.model.checkpoint or "").resolve():
        mismatched.append("model.checkpoint")
    mismatched += [f"model.{k}" for k in ("dtype",) if getattr(theirs.model, k) != getattr(config.model, k)]
    mismatched += [
        f"factors.{k}"
        for k in ("fisher", "track", "max_documents", "seed")
        if getattr(theirs.factors, k) != getattr(config.factors, k)
    ]
    if not holds(theirs.factors.strategy, config.factors.strategy):
        mismatched.append("factors.strategy")
    if theirs.run.precision != config.run.precision:
        mismatched.append("run.precision")
    if mismatched:
        if rundir.in_query():
            raise StoreError(
                f"{', '.join(mismatched)}: a query is scored with the model and curvature of its run {other}, "
                "fitted with other values of these; leave them out"
            )
        raise StoreError(f"factors.from: {other} was fitted with other settings: {', '.join(mismatched)}")
    ostore = RunStore(other, record)
    if ostore.status("lambda") != "done" and theirs.factors.from_run is not None:  # never fits one of its own
        raise StoreError(
            f"factors.from: {other} fitted no curvature: it reuses that of {theirs.factors.from_run} (its "
            f"factors.from); give factors.from={theirs.factors.from_run}"
        )
    if ostore.status("lambda") != "done":
        raise StoreError(f"factors.from: {other} has no finished curvature (stage lambda is {ostore.status('lambda')})")
    return ostore


def holds(fitted: str, wanted: str) -> bool:
    """Whether the curvature fitted for the strategy ``fitted`` holds all that the strategy ``wanted`` preconditions
    with: the same strategy, or K-FAC (whose Lambda is the eigenvalue products) from any fit with an eigendecomposition
    (EK-FAC's: an EK-FAC run, or its index, answers K-FAC queries too, docs/method.md)."""
    have, want = curvature.strategy(fitted), curvature.strategy(wanted)
    return have.name == want.name or (want.lambda_source == "eigenvalues" and have.eigen)


def load(config: cfg.Config, inputs: Inputs, executor: Executor) -> curvature.Curvature:
    """The fitted curvature of another run directory (``factors.from``), checked against this run's model and layers
    (:func:`check`, at start-up)."""
    assert config.factors.from_run is not None  # the caller's condition
    other = Path(config.factors.from_run)
    record = rundir.read_record(other)
    assert record is not None  # check read it at start-up
    ostore = RunStore(other, record)
    strategy = curvature.strategy(config.factors.strategy)
    if not strategy.writes:
        return curvature.curvature(strategy)
    shapes = programs.fitted_shapes(inputs.task, inputs.layers, precision.statistics_dtype(config.run.precision))

    def eigen():
        eigen = ostore.load_result("eigen", executor.like(shapes["eigen"]))
        if eigen is None:
            raise StoreError(f"factors.from: {other}: the eigendecomposition is missing or corrupted")
        return eigen

    def saved_lambda(basis):
        Lambda = ostore.load_result("lambda", executor.like(shapes["lambda"], curvature.LAMBDA_AXES))
        if Lambda is None:
            raise StoreError(f"factors.from: {other}: Lambda is missing or corrupted")
        return Lambda

    curv = curvature.assemble(strategy, eigen, saved_lambda)
    log.info("curvature: reusing the %s factors of %s", strategy.name, other)
    return curv
