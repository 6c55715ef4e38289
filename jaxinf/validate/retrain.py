"""Random subsets of the documents and many small models retrained on them at once (``vmap``), resumably.

The training procedure being explained (the one every retraining repeats):
``steps`` steps of optax AdamW (weight decay 0.01, gradient clipping at 1,
constant learning rate after a linear warm-up of ``steps // 10`` steps) on
minibatches of ``batch_size`` documents drawn without replacement, epoch after
epoch, in an order fixed by the seed; the loss of a step is the mean next-token
NLL over the batch's target tokens. ``from: scratch`` starts from the world's
initial parameters (the config's initialization), ``from: checkpoint`` from the
checkpoint's.

The retraining protocol (``validate.subset_steps``, ``validate.subset_init``):
a retraining runs the full model's ``steps`` (``fixed``) or as many passes over
its subset as the full model makes over all documents (``epochs``,
:func:`subset_steps`), with a warm-up of a tenth of its own steps; it starts
from the full model's starting point (``shared``: its seed changes only the
order of the minibatches) or from its own initialization (``fresh``:
:func:`fresh_seed` seeds both the order and the initialization).

Every subset has the same size ``round(fraction * N)``, so a group of
retrainings is one program: the parameters, optimizer states and minibatch
schedules of G models are stacked and one ``lax.scan`` over the steps is
``vmap``-ed over them. What a retraining leaves behind is small: the queries'
measurements under the retrained model, saved atomically as
``units/s{subset}_r{seed}.npy`` the moment its group finishes, so a killed
validation redoes at most one group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinf.atomic import load_npy, save_npy
from jaxinf.validate import work_keys
from jaxinf.validate.world import ValidationError


@dataclasses.dataclass(frozen=True)
class Procedure:
    """The training procedure (module docstring)."""

    steps: int
    learning_rate: float
    batch_size: int
    weight_decay: float = 0.01


MAX_SCAN = 2**31 - 1  # a retraining is one lax.scan over its steps, its minibatch indices int32


def check_size(steps: int, batch_size: int, group: int, subsets: int, size: int, memory: int | None) -> None:
    """Refuses, before anything trains, a validation whose arrays cannot exist: the subsets ``[subsets, size]``
    (int64) and one group's minibatch schedules and loss curves, ``[group, steps, batch_size]`` int32 and
    ``[group, steps]`` float32, each held whole in host memory (``memory`` bytes, None: unknown), and ``steps``
    within the scan's int32 indices."""
    if steps > MAX_SCAN:
        raise ValidationError(f"validate.steps: must be at most {MAX_SCAN:,} (one scan over int32 steps), got {steps}")
    arrays = {
        "validate.subsets": (subsets * size * 8, f"{subsets} subsets of {size} documents"),
        "validate.steps": (
            group * steps * (batch_size + 1) * 4,
            f"{group} schedules of {steps} steps x {batch_size} documents",
        ),
    }
    for name, (need, what) in arrays.items():
        if memory is not None and need > memory:
            raise ValidationError(
                f"{name}: {what} take {need / 2**30:,.1f} GiB, more than this host's memory "
                f"({memory / 2**30:,.1f} GiB); lower it"
            )


def sample_subsets(n_documents: int, count: int, fraction: float, seed: int) -> np.ndarray:
    """``count`` random subsets of ``round(fraction * n)`` document indices each (sorted rows), ``[count, size]``."""
    size = int(round(fraction * n_documents))
    if not 1 <= size < n_documents:
        raise ValidationError(
            f"validate.fraction: {fraction} of {n_documents} documents leaves a subset of {size} "
            "documents (need at least 1 and fewer than all)"
        )
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(n_documents, size, replace=False)) for _ in range(count)])


def subset_steps(protocol: str, steps: int, n_documents: int, size: int, batch_size: int) -> int:
    """Optimizer steps of a retraining on ``size`` of the ``n_documents`` documents when the full model trains
    ``steps``: ``steps`` for ``fixed``; for ``epochs`` the same number of passes over the subset as the full model
    makes over all documents, ``max(1, round(steps * floor(size / B) / floor(N / B)))`` with ``B = batch_size`` (a
    pass is ``floor(n / B)`` minibatches: :func:`schedule` drops an epoch's short remainder)."""
    if protocol == "fixed":
        return steps
    if protocol != "epochs":
        raise ValidationError(f"validate.subset_steps: expected fixed or epochs, got {protocol!r}")
    return max(1, round(steps * (size // batch_size) / (n_documents // batch_size)))


def fresh_seed(subset: int, seed: int) -> int:
    """The seed of retraining (subset m, seed s): ``1000 (m + 1) + s``, of its minibatch order and, with
    ``validate.subset_init: fresh``, of its initialization."""
    return 1000 * (subset + 1) + seed


def schedule(members: np.ndarray, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Document indices of every minibatch, ``[steps, batch_size]``: ``members`` shuffled by ``seed`` epoch after
    epoch (a batch never straddles two epochs; a final short remainder of an epoch is dropped)."""
    if batch_size > len(members):
        raise ValidationError(
            f"validate.batch_size: {batch_size} is more than the {len(members)} documents of a subset"
        )
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    while len(out) < steps:
        order = members[rng.permutation(len(members))]
        out.extend(order[lo : lo + batch_size] for lo in range(0, len(order) - batch_size + 1, batch_size))
    return np.stack(out[:steps]).astype(np.int32)


def optimizer(proc: Procedure) -> optax.GradientTransformation:
    warmup = max(1, proc.steps // 10)
    lr = optax.linear_schedule(0.0, proc.learning_rate, warmup)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=proc.weight_decay))


def mean_token_loss(task, params, batch) -> jax.Array:
    """The training loss of a minibatch: summed next-token NLL over its targets / number of targets."""
    token_losses = task.train_loss(params, batch, None, None)
    return token_losses.sum() / jnp.maximum(batch["weights"][:, 1:].sum(), 1.0)


def measurements(task, params, queries) -> jax.Array:
    """Each query's measurement (summed NLL of its completion tokens), ``[Q]``."""
    token_losses = task.measurement(params, queries, None)
    return token_losses.sum(-1)


def make_trainer(task, proc: Procedure, stacked_starts: bool = False) -> tuple[Callable, Callable]:
    """``train(params0, documents, queries, schedules [G, steps, B]) -> (measurements [G, Q], losses [G, steps])``.

    One jitted program: G models, each trained along its own schedule, from the same ``params0`` or, with
    ``stacked_starts``, model g from ``params0[g]`` (every leaf stacked on a leading axis of G).
    """
    opt = optimizer(proc)

    def one(params0, documents, queries, sched):
        def step(carry, idx):
            params, state = carry
            batch = {k: v[idx] for k, v in documents.items()}
            loss, grads = jax.value_and_grad(lambda p: mean_token_loss(task, p, batch))(params)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(step, (params0, opt.init(params0)), sched)
        return measurements(task, params, queries), losses, params

    many = jax.vmap(lambda p, d, q, s: one(p, d, q, s)[:2], in_axes=(0 if stacked_starts else None, None, None, 0))
    return jax.jit(many), jax.jit(one)


def check_losses(losses: np.ndarray, labels: list[str]) -> None:
    """Raises naming the first retraining (``labels[g]``) whose loss went non-finite, and the step."""
    bad = ~np.isfinite(losses)
    for g in range(losses.shape[0]):
        if bad[g].any():
            step = int(np.flatnonzero(bad[g])[0])
            raise ValidationError(
                f"retraining {labels[g]} diverged: loss is not finite at step {step + 1} (lower validate.learning_rate)"
            )


def unit_path(root: Path, subset: int, seed: int) -> Path:
    return Path(root) / f"s{subset:04d}_r{seed:02d}.npy"


def retrain_all(
    train_many: Callable,
    params0,
    documents,
    queries,
    subsets: np.ndarray,
    seeds: int,
    proc: Procedure,
    root: Path,
    group: int,
    progress: Callable[[int, int], None] | None = None,
    starts: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Measurements of every (subset, seed) retraining, ``[M, S, Q]``: read from ``root`` where saved, trained
    (``group`` at a time) and saved otherwise. The seed of subset m, seed s is :func:`fresh_seed`; every retraining
    starts from ``params0``, or with ``starts`` (and a ``train_many`` of ``stacked_starts``) from
    ``starts(fresh_seed(m, s))``."""
    units = [(m, s) for m in range(len(subsets)) for s in range(seeds)]
    found = {u: work_keys.saved(unit_path(root, *u), load_npy) for u in units}
    todo = [u for u in units if found[u] is None]
    done = len(units) - len(todo)
    for lo in range(0, len(todo), group):
        chunk = todo[lo : lo + group]
        sched = np.stack([schedule(subsets[m], proc.steps, proc.batch_size, fresh_seed(m, s)) for m, s in chunk])
        pad = group - len(chunk)  # one compiled shape: the last group is padded with copies
        if pad:
            sched = np.concatenate([sched, np.repeat(sched[:1], pad, 0)])
        start = params0
        if starts is not None:
            inits = [starts(fresh_seed(m, s)) for m, s in chunk]
            start = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(inits + inits[:1] * pad))
        meas, losses = train_many(start, documents, queries, jnp.asarray(sched))
        meas, losses = np.asarray(meas)[: len(chunk)], np.asarray(losses)[: len(chunk)]
        check_losses(losses, [f"of subset {m} seed {s}" for m, s in chunk])
        for (m, s), row in zip(chunk, meas):
            found[(m, s)] = row64 = row.astype(np.float64)
            save_npy(unit_path(root, m, s), row64)
        done += len(chunk)
        if progress is not None:
            progress(done, len(units))
    return np.stack([[found[(m, s)] for s in range(seeds)] for m in range(len(subsets))])
