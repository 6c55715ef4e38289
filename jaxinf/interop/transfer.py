"""Factor interchange: kronfluence factors into a jaxinf run directory, and a run's factors in kronfluence's layout.

**Import** (:func:`import_factors`, ``jaxinf kronfluence import KRON_DIR CONFIG``)
writes the factors of a kronfluence ``factors_*`` directory into the run
directory of a config (``run.out``) as the results of its curvature stages, through
the same :class:`jaxinf.run.store.RunStore` a run uses:

- ``state/covariance/0``: the covariance sums and ``N_tok`` per layer (a
  :class:`~jaxinf.engine.curvature.CovarianceState`, as a run checkpoints them);
- ``state/eigen/0``: ``Q_A, e_A, Q_S, e_S`` (an :class:`~jaxinf.engine.curvature.Eigen`);
  the eigenvalues are kept as kronfluence wrote them (it does not clip round-off
  negatives at 0 as jaxinf does), so jaxinf scores with exactly kronfluence's factors;
- ``state/lambda/0``: ``Lambda = lambda_matrix / num_lambda_processed``, and
  ``state/lambda_sums/0`` the sums and ``N_seq`` per layer themselves (a
  :class:`~jaxinf.engine.curvature.LambdaState`), so that an export gives back the same files.

The stages are marked done (``run.json`` names the source directory), so
``jaxinf run CONFIG`` continues with the query gradients and scores, and any
other run can use them with ``factors.from: RUN_DIR``. The strategy and the
Fisher of ``factor_arguments.json`` must be the config's; every module must be a
layer the config tracks, with its shapes; tensors are converted to the run's
precision (``run.precision``).

**Export** (:func:`export_factors`, ``jaxinf kronfluence export RUN_DIR OUT``) writes a
run's factors as a kronfluence ``factors_*`` directory (put it at
``OUTPUT_DIR/ANALYSIS_NAME/factors_NAME`` and call kronfluence's scoring with
``factors_name=NAME``): the covariance sums and counts and the eigendecomposition
as the run saved them, and Lambda as its sums and ``N_seq`` when the run has them
(imported runs), otherwise as ``Lambda`` itself with ``num_lambda_processed = 1``
(a finished jaxinf run keeps only the normalized Lambda); kronfluence divides by
that count before use, so it preconditions with exactly the run's Lambda.

Both directions are exact: kronfluence -> jaxinf -> kronfluence gives back the
same tensors, jaxinf -> kronfluence -> jaxinf the same stage results, when the
run's precision is the factors' dtype.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf import config as cfg
from jaxinf.engine import capture, precision
from jaxinf.engine.curvature import (
    CovarianceState,
    Eigen,
    LambdaState,
    Strategy,
    covariance_init,
    lambda_finalize,
    lambda_init,
    strategy,
)
from jaxinf.interop import kronfluence as kf
from jaxinf.interop.kronfluence import InteropError
from jaxinf.run import rundir
from jaxinf.run.lock import claim_run
from jaxinf.run.store import CorruptCheckpoint, RunStore

log = logging.getLogger("jaxinf")
LAMBDA_SUMS = "lambda_sums"


# --------------------------------------------------------------------------- the run side


def tracked_layers(config: cfg.Config) -> dict[str, capture.LayerSpec]:
    """The layers a run of ``config`` tracks, from the checkpoint's ``config.json`` alone (no weights read)."""
    from jaxinf import models
    from jaxinf.run import inputs

    if config.model.checkpoint is None:
        raise InteropError("model.checkpoint: not set (the tracked layers come from the model)")
    lm = models.abstract(
        models.read_config(config.model.checkpoint, dtype=config.model.dtype, scan=config.model.scan_layers)
    )
    return inputs.tracked_layers(lm, config.factors.track)


def layer_index(layers: dict[str, capture.LayerSpec]) -> dict[str, tuple[str, int | None]]:
    """Per-layer name (the Hugging Face module name) -> (block name, index along the block's layer axis or None)."""
    out: dict[str, tuple[str, int | None]] = {}
    for block, spec in layers.items():
        if spec.stacked:
            for i, name in enumerate(spec.layer_names):
                out[name] = (block, i)
        else:
            out[spec.name] = (block, None)
    return out


def per_layer(tree: dict, layers: dict[str, capture.LayerSpec]) -> dict[str, np.ndarray]:
    """Per-block arrays -> per-layer numpy arrays (a stacked block's leading axis split)."""
    return {
        name: np.asarray(tree[block] if i is None else tree[block][i])
        for name, (block, i) in layer_index(layers).items()
    }


@dataclasses.dataclass
class RunFactors:
    """What a run directory holds of the curvature, as numpy arrays keyed by block.

    ``covariance``: the sums and ``N_tok`` per block; ``eigen``; ``Lambda``
    (normalized); ``lambda_sums``: the sums and ``N_seq`` when the run keeps them
    (imported runs). ``source`` is the run directory the factors are in (another
    one when the run reused factors with ``factors.from``).
    """

    root: Path
    source: Path
    config: cfg.Config
    layers: dict[str, capture.LayerSpec]
    covariance: CovarianceState | None
    eigen: Eigen | None
    Lambda: dict[str, np.ndarray] | None
    lambda_sums: LambdaState | None

    @property
    def strategy(self) -> Strategy:
        return strategy(self.config.factors.strategy)


def read_record(run_dir: Path) -> dict:
    """The record of the run ``run_dir`` reads from: ``run.json``, or its copy ``state/run.json`` when it is damaged
    (:func:`jaxinf.run.rundir.read_record`, the one reader of both: a damaged run.json of a run that has its copy
    was refused here)."""
    root = Path(run_dir)
    rundir.refuse_inside_run(root, "the run")
    record = rundir.read_record(root, config_only=True)  # any JSON object: another tool's run.json is named below
    if record is None:
        raise InteropError(f"{run_dir}: not a jaxinf run directory ({rundir.why_not_run(root)})")
    if not rundir.is_record(record):
        raise InteropError(f"{run_dir}: not a jaxinf run directory (its run.json is not a jaxinf run record)")
    return record


def _numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _restore(store: RunStore, stage: str, step: int | None, like):
    """A saved step of a stage (the latest when ``step`` is None), verified; None when the stage has none."""
    st = store.stage(stage, keep=None)
    try:
        if step is None:
            found = st.latest(like)
            return None if found is None else found[1]
        if step not in st.steps():
            return None
        return st.restore(step, like)
    except (CorruptCheckpoint, FileNotFoundError, ValueError) as e:
        raise InteropError(f"{st.root}: cannot be read ({e})") from None


def _fitted(store: RunStore, stage: str) -> bool:
    entry = store.record.get("stages", {}).get(stage, {})
    return entry.get("status") == "done" and "skipped" not in entry


def load_run(run_dir: str | Path) -> RunFactors:
    """The curvature of a run directory (following ``factors.from``); arrays in the run's precision."""
    root = Path(run_dir)
    record = read_record(root)
    config = rundir.recorded_config(record, root)
    source, store = root, RunStore(root, record)
    seen = {root.resolve()}
    while config.factors.from_run is not None and not _fitted(store, "eigen") and not _fitted(store, "lambda"):
        source = Path(config.factors.from_run)
        if source.resolve() in seen:
            raise InteropError(f"{root}: factors.from loops back to {source}")
        seen.add(source.resolve())
        store = RunStore(source, read_record(source))
    s = strategy(config.factors.strategy)
    dtype = precision.statistics_dtype(config.run.precision)
    with precision.scoped(config.run.precision):
        layers = tracked_layers(config)
        cov = eigen = Lambda = sums = None
        if s.covariance and _fitted(store, "covariance"):
            cov = _restore(store, "covariance", None, jax.eval_shape(lambda: covariance_init(layers, dtype)))
        if s.eigen and _fitted(store, "eigen"):
            eigen = _restore(store, "eigen", 0, _eigen_like(layers, dtype))
        if s.fits_lambda and _fitted(store, "lambda"):
            Lambda = _restore(
                store,
                "lambda",
                0,
                {k: jax.ShapeDtypeStruct(spec.lead + (spec.d_out, spec.d_in_aug), dtype) for k, spec in layers.items()},
            )
            sums = _restore(store, LAMBDA_SUMS, None, jax.eval_shape(lambda: lambda_init(layers, dtype)))
        return RunFactors(root, source, config, layers, _numpy(cov), _numpy(eigen), _numpy(Lambda), _numpy(sums))


def _eigen_like(layers, dtype) -> Eigen:
    """The shapes of the eigendecomposition of ``layers`` in ``dtype`` (a restore template; nothing is allocated)."""

    def z(*shape: int) -> Any:  # an abstract leaf standing where the restored Array goes
        return jax.ShapeDtypeStruct(shape, dtype)

    return Eigen(
        Q_A={k: z(*s.lead, s.d_in_aug, s.d_in_aug) for k, s in layers.items()},
        e_A={k: z(*s.lead, s.d_in_aug) for k, s in layers.items()},
        Q_S={k: z(*s.lead, s.d_out, s.d_out) for k, s in layers.items()},
        e_S={k: z(*s.lead, s.d_out) for k, s in layers.items()},
    )


# --------------------------------------------------------------------------- checks shared with compare


def expected_shapes(spec: capture.LayerSpec) -> dict[str, tuple[int, ...]]:
    """The shape of every kronfluence factor of one layer."""
    i, o = spec.d_in_aug, spec.d_out
    return {
        "activation_covariance": (i, i),
        "gradient_covariance": (o, o),
        "num_activation_covariance_processed": (1,),
        "num_gradient_covariance_processed": (1,),
        "activation_eigenvectors": (i, i),
        "activation_eigenvalues": (i,),
        "gradient_eigenvectors": (o, o),
        "gradient_eigenvalues": (o,),
        "lambda_matrix": (o, i),
        "num_lambda_processed": (1,),
    }


def check_modules(factors: kf.Factors, layers: dict[str, capture.LayerSpec], what: str) -> None:
    """Every module of every file is a tracked layer of the same shapes, and every tracked layer is there."""
    index = layer_index(layers)
    for factor, per_module in factors.tensors.items():
        path = kf.file_of(factors.directory, factor)
        for module, tensor in per_module.items():
            if module not in index:
                raise InteropError(
                    f"{path}: module {module} maps to no layer {what} tracks (tracked: {', '.join(sorted(index))})"
                )
            block, _ = index[module]
            want = expected_shapes(layers[block])[factor]
            if tuple(tensor.shape) != want:
                raise InteropError(
                    f"{path}: tensor {module} has shape {tuple(tensor.shape)}, but layer {module} of "
                    f"{what} needs {want} (factors of another model?)"
                )
        for name in index:
            if name not in per_module:
                raise InteropError(f"{path}: layer {name} ({what} tracks it) has no tensor here")


def check_strategy(path: Path, arguments: dict, config: cfg.Config, what: str) -> None:
    strategy = str(arguments.get("strategy", "ekfac"))
    if strategy != config.factors.strategy:
        raise InteropError(
            f"{path}: kronfluence strategy {strategy}, but {what} uses factors.strategy {config.factors.strategy}"
        )


# --------------------------------------------------------------------------- import


def _block_counts(factors: kf.Factors, names: tuple[str, ...], spec: capture.LayerSpec, dtype) -> jax.Array:
    """A block's per-layer counts ``[*lead]`` from kronfluence's per-module count files ``names`` (which must agree
    for each module: jaxinf keeps one token count per layer for ``A`` and ``S``)."""
    values = []
    for module in spec.layer_names:
        counts = {factor: factors.count(factor, module) for factor in names}
        if len(set(counts.values())) != 1:
            (f0, c0), (f1, c1) = (
                next(iter(counts.items())),
                next((f, c) for f, c in counts.items() if c != next(iter(counts.values()))),
            )
            raise InteropError(
                f"{kf.file_of(factors.directory, f1)}: module {module} counts {c1}, but "
                f"{kf.file_of(factors.directory, f0).name} counts {c0}; jaxinf keeps one count "
                f"per layer"
            )
        values.append(float(counts[names[0]]))
    return jnp.asarray(np.asarray(values if spec.stacked else values[0], dtype))


def _stack(factors: kf.Factors, factor: str, spec: capture.LayerSpec, dtype) -> jax.Array:
    """A block's tensors of one factor file, stacked over its layers in the run's ``dtype``: every value finite (a NaN
    imported was blamed later on a query, 'its preconditioned gradient ... is not finite (the model overflows')."""
    arrays = [np.asarray(factors.tensors[factor][n]) for n in spec.layer_names]
    for n, a in zip(spec.layer_names, arrays):
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the error below, not a RuntimeWarning
            finite = bool(np.all(np.isfinite(a.astype(dtype))))
        if not finite:
            rounded = f" once rounded to {np.dtype(dtype).name} (run.precision)" if np.all(np.isfinite(a)) else ""
            raise InteropError(
                f"{kf.file_of(factors.directory, factor)}: tensor {n} is not finite{rounded}; nothing was imported"
            )
    x = np.stack(arrays) if spec.stacked else arrays[0]
    return jnp.asarray(x.astype(dtype))


def eigen_of(factors: kf.Factors, layers: dict[str, capture.LayerSpec], dtype) -> Eigen:
    """The eigenbases of kronfluence's ``factors`` (its eigen group) stacked into jaxinf's blocks, in ``dtype``."""
    return Eigen(
        Q_A={b: _stack(factors, "activation_eigenvectors", s, dtype) for b, s in layers.items()},
        e_A={b: _stack(factors, "activation_eigenvalues", s, dtype) for b, s in layers.items()},
        Q_S={b: _stack(factors, "gradient_eigenvectors", s, dtype) for b, s in layers.items()},
        e_S={b: _stack(factors, "gradient_eigenvalues", s, dtype) for b, s in layers.items()},
    )


def import_factors(
    source: str | Path, config: cfg.Config, *, factors_name: str | None = None, overwrite: bool = False
) -> Path:
    """kronfluence's factors into ``config.run.out`` as the results of its curvature stages (module docstring)."""
    dirs = kf.locate(source, factors=factors_name)
    if dirs.factors is None:
        raise InteropError(f"{source}: no kronfluence factors_* directory")
    factors = kf.read_factors(dirs.factors, groups=("covariance", "eigen", "lambda"))
    check_strategy(dirs.factors / kf.FACTOR_ARGUMENTS, factors.arguments, config, "the config")
    if factors.fisher != config.factors.fisher:
        raise InteropError(
            f"{dirs.factors / kf.FACTOR_ARGUMENTS}: fitted with the {factors.fisher} Fisher "
            f"(use_empirical_fisher={factors.arguments.get('use_empirical_fisher')}), but the config "
            f"has factors.fisher {config.factors.fisher}"
        )
    s = strategy(config.factors.strategy)
    kf.require(factors, s.name)
    factors.tensors = {
        k: v for k, v in factors.tensors.items() if any(k in kf.GROUPS[group] for group in s.writes)
    }  # only what this strategy fits
    root = Path(config.run.out)
    origin = f"kronfluence {dirs.factors.resolve()}"
    _check_fresh(root, overwrite, origin)  # refused before the factors are converted (and again under the lock)
    with precision.scoped(config.run.precision):
        layers = tracked_layers(config)
        check_modules(factors, layers, "the config")
        dtype = np.dtype(precision.statistics_dtype(config.run.precision).name)
        stored = {np.dtype(v.dtype) for f, t in factors.tensors.items() if not f.startswith("num_") for v in t.values()}
        if any(d.itemsize > dtype.itemsize for d in stored):
            log.warning(
                "kronfluence factors in %s are rounded to the run's %s (run.precision)",
                ", ".join(sorted(d.name for d in stored)),
                dtype.name,
            )
        groups = factors.groups
        cov = eigen = Lambda = sums = None
        if "covariance" in groups:
            cov = CovarianceState(
                A={b: _stack(factors, "activation_covariance", s, dtype) for b, s in layers.items()},
                S={b: _stack(factors, "gradient_covariance", s, dtype) for b, s in layers.items()},
                count={b: _block_counts(factors, kf.COVARIANCE[2:], s, dtype) for b, s in layers.items()},
            )
        if "eigen" in groups:
            eigen = eigen_of(factors, layers, dtype)
        if "lambda" in groups:
            sums = LambdaState(
                Lambda={b: _stack(factors, "lambda_matrix", s, dtype) for b, s in layers.items()},
                count={b: _block_counts(factors, kf.LAMBDA[1:], s, dtype) for b, s in layers.items()},
            )
            Lambda = lambda_finalize(sums)
        lock, claimed = claim_run(root, overwrite)  # jaxinf run's claim: locked, and undone if the import fails
        try:
            if not overwrite:
                _check_fresh(root, overwrite, origin)  # another process may have started the run meanwhile
            store = RunStore.open(config, overwrite=False)  # --overwrite: the old run was set aside by the claim
            # until the last stage is saved, the record says the import is unfinished: a kill (SIGKILL, OOM) leaves
            # a run that jaxinf run refuses and that the same import finishes (_check_fresh), never half of one
            store.update(imported={"from": origin, "complete": False})
            _write_imported(store, s, origin, cov, eigen, Lambda, sums)
            store.update(imported={"from": origin, "complete": True})
            if isinstance(claimed, rundir.Aside):  # the import is whole: only now can the old run go
                claimed.discard()
        except BaseException:
            if claimed is not None:
                claimed.restore()
            raise
        finally:
            lock.release()
    log.info(
        "imported the %s factors of %s (%d layers) into %s", s.name, dirs.factors, len(layer_index(layers)), store.root
    )
    return store.root


def _write_imported(store: RunStore, s: Strategy, origin: str, cov, eigen, Lambda, sums) -> None:
    """The imported curvature saved as the results of the run's curvature stages, each marked done."""
    if not s.eigen:
        for stage in ("covariance", "eigen"):
            store.mark(stage, "done", skipped=f"{s.name} strategy")
    if cov is not None:
        store.stage("covariance").save(0, cov)
        store.mark("covariance", "done", source=origin)
    elif s.covariance:
        store.mark("covariance", "done", skipped=f"not in {origin}")
    if eigen is not None:
        store.save_result("eigen", eigen)
        store.mark("eigen", "done", source=origin)
    if not s.needs_lambda:
        store.mark("lambda", "done", skipped=f"{s.name} strategy")
    elif not s.fits_lambda:
        store.mark("lambda", "done", source=f"{s.name} {s.lambda_source}")
    else:
        store.save_result("lambda", Lambda)
        store.stage(LAMBDA_SUMS, keep=1).save(0, sums)
        store.mark("lambda", "done", source=origin)


def _check_fresh(root: Path, overwrite: bool, origin: str) -> None:
    """Import writes the curvature of a run that has computed nothing yet (or is overwritten), or finishes an import
    of the same factors (``origin``) that was killed (the record's ``imported``)."""
    record = None if overwrite else rundir.read_record(root, output=True)
    if record is None:
        return
    imported = record.get("imported") or {}
    if imported.get("complete") is False:
        if imported.get("from") == origin:
            return
        raise InteropError(
            f"{root}: an import of {imported.get('from')} into it was interrupted; import those factors again to "
            "finish it, or use --overwrite"
        )
    started = [s for s, e in record.get("stages", {}).items() if e.get("status") != "pending"]
    if started:
        raise InteropError(
            f"{root}: the run already has results (stages {', '.join(started)}); import into a new "
            f"run.out or use --overwrite"
        )


# --------------------------------------------------------------------------- export


def _check_export_target(out: Path, overwrite: bool) -> None:
    """``jaxinf kronfluence export``'s OUT_DIR: absent, empty, or (with ``overwrite``) a kronfluence factors directory
    (its ``factor_arguments.json``); never a jaxinf run directory or any other non-empty directory, whose
    ``*.safetensors`` (a model's weights) ``--overwrite`` used to delete."""
    if out.is_symlink() and not out.exists():
        raise InteropError(f"{out}: is a symbolic link to {out.readlink()}, which does not resolve to a directory")
    if out.exists() and not out.is_dir():
        raise InteropError(f"{out}: exists and is not a directory")
    if rundir.enclosing_run(out) is not None:
        raise InteropError(f"{out}: is inside the jaxinf run directory {rundir.enclosing_run(out)}; export outside it")
    if not out.exists() or not any(out.iterdir()):
        return
    if rundir.is_run(out):
        raise InteropError(f"{out}: is a jaxinf run directory; export into another directory")
    if not overwrite:
        raise InteropError(f"{out}: exists and is not empty; choose another directory or use --overwrite")
    if not (out / kf.FACTOR_ARGUMENTS).is_file():
        held = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise InteropError(
            f"{out}: not a kronfluence factors directory (no {kf.FACTOR_ARGUMENTS}; it holds {held}); "
            "--overwrite replaces only factor files: choose another directory"
        )


def export_factors(run_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """A run's factors as a kronfluence ``factors_*`` directory (module docstring)."""
    out = Path(out)
    run = load_run(run_dir)
    s = run.strategy
    _check_export_target(out, overwrite)
    if s.eigen and run.eigen is None:
        raise InteropError(f"{run.source / 'state' / 'eigen'}: the run has no finished eigendecomposition")
    if s.fits_lambda and run.Lambda is None:
        raise InteropError(f"{run.source / 'state' / 'lambda'}: the run has no finished Lambda")
    layers = run.layers
    tensors: dict[str, dict[str, np.ndarray]] = {}
    dtypes: set[str] = set()
    if run.covariance is not None:
        c = run.covariance
        tensors["activation_covariance"] = per_layer(c.A, layers)
        tensors["gradient_covariance"] = per_layer(c.S, layers)
        counts = {name: np.asarray([round(float(n))], np.int64) for name, n in per_layer(c.count, layers).items()}
        tensors["num_activation_covariance_processed"] = counts
        tensors["num_gradient_covariance_processed"] = dict(counts)
    elif s.covariance:
        log.info("%s: no covariance sums in the run; kronfluence scores without them", run.source)
    if run.eigen is not None and s.eigen:
        e = run.eigen
        tensors["activation_eigenvectors"] = per_layer(e.Q_A, layers)
        tensors["activation_eigenvalues"] = per_layer(e.e_A, layers)
        tensors["gradient_eigenvectors"] = per_layer(e.Q_S, layers)
        tensors["gradient_eigenvalues"] = per_layer(e.e_S, layers)
    if s.fits_lambda:
        if run.lambda_sums is not None:
            tensors["lambda_matrix"] = per_layer(run.lambda_sums.Lambda, layers)
            n_seq = {name: round(float(n)) for name, n in per_layer(run.lambda_sums.count, layers).items()}
        else:
            assert run.Lambda is not None  # refused above
            tensors["lambda_matrix"] = per_layer(run.Lambda, layers)
            n_seq = {name: 1 for name in layer_index(layers)}
        tensors["num_lambda_processed"] = {name: np.asarray([n], np.int64) for name, n in n_seq.items()}
    for factor, per_module in tensors.items():
        if not factor.startswith("num_"):
            dtypes.update(np.dtype(v.dtype).name for v in per_module.values())
    dtype = dtypes.pop() if len(dtypes) == 1 else ("float64" if run.config.run.precision == "float64" else "float32")
    arguments = kf.factor_arguments(s.name, run.config.factors.fisher, dtype)
    # written beside OUT_DIR first, then moved in: a write that fails (a full disk) leaves OUT_DIR as it was
    # (one export into OUT_DIR at a time, under a lock beside it; what a killed one left there is removed first)
    import os

    from jaxinf.atomic import building_dir

    def busy(holder: str) -> InteropError:
        return InteropError(
            f"{out}: being written by another jaxinf kronfluence export ({holder}); wait for it to finish or stop "
            "it, or choose another OUT_DIR"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    with building_dir(f".{out.name}.export-", out.parent, busy, out) as tmp:
        kf.write_factors(tmp, arguments, tensors)
        out.mkdir(exist_ok=True)
        for factor in (f for group in kf.GROUPS.values() for f in group):  # a factors directory's own files only
            kf.file_of(out, factor).unlink(missing_ok=True)
        for p in sorted(tmp.iterdir()):
            os.replace(p, out / p.name)
    log.info("exported the %s factors of %s (%d layers) to %s", s.name, run.source, len(layer_index(layers)), out)
    return out
