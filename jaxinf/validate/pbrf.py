"""The proximal Bregman response function (PBRF; Grosse et al. 2023, section 2.2), by optimization.

Influence functions on a network that is not trained to convergence do not
predict leave-one-out retraining; Grosse et al. show they approximate the
PBRF instead. For trained parameters ``theta_s``, a document ``m`` and a weight
``eps``, the response is the minimizer

    theta*(eps) = argmin_theta  (1/N) sum_i D_i(theta) + eps * L_m(theta) + (lambda/2) ||theta - theta_s||^2

with

- ``D_i(theta) = sum_t w[i,t] KL( softmax(z_s[i,t]) || softmax(z[i,t]) )``: the Bregman divergence of the
  cross-entropy between the logits ``z`` of training document i under ``theta`` and ``z_s`` under
  ``theta_s``, summed over its target tokens (for softmax cross-entropy the Bregman divergence in the
  logits is exactly this KL, whatever the label), over all N training documents;
- ``L_m(theta)``: the training loss of document m (summed next-token NLL, the ``L_n`` of the scores);
- ``lambda``: the damping, each tracked layer's own (the proximal term is
  ``sum_layers (lambda_l / 2) ||theta_l - theta_s,l||^2``, with ``lambda_l`` the damping that layer's scores
  use: a given value, or the per-layer heuristic ``0.1 * mean(Lambda_l)``); the Hessian at ``theta_s`` is the
  Gauss-Newton matrix (the Fisher) of the mean per-document loss plus ``diag(lambda_l)``, the matrix that
  the influence scores invert layer by layer.

Only the tracked layers' parameters move (the rest stay at ``theta_s``), as
the influence scores consider only them. The PBRF influence of m on query q is
the finite difference

    I_pbrf(q, m) = -( f_q(theta*(eps)) - f_q(theta_s) ) / eps

with ``f_q`` the measurement (completion NLL), which to first order in eps is
``G_q^T (F + lambda)^{-1} G_m = I(q, m)``. The minimization runs L-BFGS
(optax) from ``theta_s``, ``vmap``-ed over the sampled documents, until the
gradient norm of J over the tracked parameters falls to ``tolerance`` times
its value at ``theta_s`` (or ``iterations`` are spent); the final ratio is
reported so a reader can see how converged each is.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinf.analysis.correlations import pearson
from jaxinf.atomic import load_npz, write_atomic
from jaxinf.engine.progress import Progress
from jaxinf.validate.retrain import measurements


def tracked_mask(params, layer_names) -> dict:
    """1.0 for every parameter leaf of a tracked layer (``model.layers.*.mlp.up_proj`` owns
    ``params["model"]["layers"]["mlp"]["up_proj"][...]``), else 0.0; same tree as ``params``."""
    owners = {n.replace(".*", "") for n in layer_names}

    def leaf(path, x):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        prefixes = {".".join(names[:i]) for i in range(1, len(names))}
        return jnp.ones((), x.dtype) if prefixes & owners else jnp.zeros((), x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, params)


def _at_least_f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def bregman(logits: jax.Array, ref_logprobs: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_t w[t+1] KL(p_ref[t] || softmax(logits[t]))`` per document, ``[N]`` (position t predicts t+1)."""
    logq = jax.nn.log_softmax(_at_least_f32(logits[:, :-1]), -1)
    logp = ref_logprobs[:, :-1]
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), -1)
    return jnp.sum(kl * weights[:, 1:], -1)


def damping_tree(params, layer_names, damping) -> dict:
    """Each parameter leaf's ``lambda``, same tree as ``params``: 0 outside the tracked layers; in a tracked layer
    its damping, ``damping`` when a number, else ``damping[layer name]``, an array of the layer's leading (stacked
    layer) axes broadcast over the leaf's other axes."""
    owners = {n.replace(".*", ""): n for n in layer_names}

    def leaf(path, x):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        owner = next((owners[".".join(names[:i])] for i in range(1, len(names)) if ".".join(names[:i]) in owners), None)
        if owner is None:
            return jnp.zeros((), x.dtype)
        if isinstance(damping, (int, float)):
            return jnp.asarray(damping, x.dtype)
        lam = jnp.asarray(damping[owner], x.dtype)
        return lam.reshape(lam.shape + (1,) * (x.ndim - lam.ndim))

    return jax.tree_util.tree_map_with_path(leaf, params)


def make_pbrf(lm, task, mask, *, damping, eps: float, iterations: int, tolerance: float = 0.0):
    """``response(params_s, documents, queries, doc_index) -> (measurement [Q], grad-norm ratio)`` for one
    document (``vmap`` it over documents); the objective is the module docstring's. ``damping``: a number, or a
    tree like ``params`` (:func:`damping_tree`). L-BFGS stops when the tracked parameters' gradient norm is at
    most ``tolerance`` times its initial value, or after ``iterations`` iterations."""
    opt = optax.lbfgs()
    lam_tree = damping if not isinstance(damping, (int, float)) else jax.tree.map(lambda k: k * damping, mask)

    def response(params_s, ref_logprobs, documents, queries, m):
        doc = {k: jax.lax.dynamic_slice_in_dim(v, m, 1) for k, v in documents.items()}

        def objective(delta):
            params = jax.tree.map(lambda p, d, k: p + k * d, params_s, delta, mask)
            logits = lm.apply(params, documents["tokens"], documents["mask"])
            D = bregman(logits, ref_logprobs, documents["weights"]).mean()
            Lm = task.train_loss(params, doc, None, None).sum()
            prox = sum(
                jnp.sum(lam * (k * d) ** 2)
                for d, k, lam in zip(jax.tree.leaves(delta), jax.tree.leaves(mask), jax.tree.leaves(lam_tree))
            )
            return D + eps * Lm + 0.5 * prox

        value_and_grad = optax.value_and_grad_from_state(objective)
        masked = lambda g: jax.tree.map(lambda x, k: x * k, g, mask)
        delta0 = jax.tree.map(jnp.zeros_like, params_s)
        g0 = optax.tree.norm(masked(jax.grad(objective)(delta0)))

        def keep_going(carry):
            i, _, _, ratio = carry
            return (i < iterations) & (ratio > tolerance)

        def step(carry):
            # the gradient at delta (the line search's, kept in the state) decides: converged, delta is kept (and
            # the loop ends), so the returned point is the one whose gradient met the tolerance
            i, delta, state, _ = carry
            value, grad = value_and_grad(delta, state=state)
            grad = masked(grad)
            ratio = optax.tree.norm(grad) / g0
            updates, state = opt.update(grad, state, delta, value=value, grad=grad, value_fn=objective)
            moved = optax.apply_updates(delta, updates)
            delta = jax.tree.map(lambda new, old: jnp.where(ratio > tolerance, new, old), moved, delta)
            return i + 1, delta, state, ratio

        ratio0 = jnp.asarray(jnp.inf, g0.dtype)
        _, delta, _, _ = jax.lax.while_loop(keep_going, step, (0, delta0, opt.init(delta0), ratio0))
        g = masked(jax.grad(objective)(delta))
        params = jax.tree.map(lambda p, d, k: p + k * d, params_s, delta, mask)
        return measurements(task, params, queries), optax.tree.norm(g) / g0

    return response


def pbrf_influence(
    lm,
    task,
    params_s,
    documents,
    queries,
    doc_indices,
    layer_names,
    *,
    damping,
    eps: float,
    iterations: int,
    tolerance: float = 0.0,
    units: Path | None = None,
    chunk: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """``I_pbrf`` ``[Q, len(doc_indices)]`` and each optimization's final/initial gradient norm.

    ``damping``: one number for every tracked layer, or ``{layer name: lambda [*lead]}`` (each layer's own).
    The documents are optimized ``chunk`` at a time, one ``vmap``-ed program, resumably
    (:func:`in_chunks`: with ``units``, a killed run loses at most the chunk in flight). A small chunk
    costs little: the line search runs every document of a chunk to the slowest one anyway.
    """
    mask = tracked_mask(params_s, layer_names)
    lam = damping_tree(params_s, layer_names, damping)
    ref = jax.nn.log_softmax(_at_least_f32(lm.apply(params_s, documents["tokens"], documents["mask"])), -1)
    base = np.asarray(measurements(task, params_s, queries))
    response = make_pbrf(lm, task, mask, damping=lam, eps=eps, iterations=iterations, tolerance=tolerance)
    run = jax.jit(jax.vmap(response, in_axes=(None, None, None, None, 0)))
    doc_indices = np.asarray(doc_indices, np.int64)
    tokens = int(np.asarray(documents["weights"]).sum()) * iterations
    progress = Progress("pbrf", len(doc_indices), unit="documents", interval=30.0)

    def optimize(idx):
        meas, ratio = run(params_s, ref, documents, queries, jnp.asarray(idx, jnp.int32))
        return np.asarray(meas), np.asarray(ratio)

    meas, ratio = in_chunks(
        optimize, doc_indices, chunk, units, lambda n, computed: progress.update(tokens * n if computed else 0, n)
    )
    progress.close()
    return -(meas - base[None]).T / eps, ratio


def in_chunks(fn, indices: np.ndarray, chunk: int, units: Path | None = None, done=None):
    """``fn`` over ``indices`` ``chunk`` at a time, concatenated: ``fn(idx [chunk]) -> (values [chunk, ...],
    ratio [chunk])``. The last chunk is padded by repeating its first index, so ``fn`` sees one shape (one
    compilation). With ``units``, each chunk's result is written there (``chunk_<first position>.npz``,
    atomically) as it finishes and read back instead of recomputed; a unit that is unreadable or holds other
    indices is recomputed. ``done(n, computed)`` is called after each chunk with its count and whether it was
    computed (rather than read back)."""
    indices = np.asarray(indices, np.int64)
    n = len(indices)
    chunk = max(1, min(chunk, n))
    values, ratio = [], []
    for lo in range(0, n, chunk):
        idx = indices[lo : lo + chunk]
        path = None if units is None else Path(units) / f"chunk_{lo:05d}.npz"
        got = _read_unit(path, idx)
        computed = got is None
        if got is None:
            v, r = fn(np.concatenate([idx, np.full(chunk - len(idx), idx[0])]))
            got = np.asarray(v)[: len(idx)], np.asarray(r)[: len(idx)]
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, lambda f: np.savez(f, documents=idx, values=got[0], ratio=got[1]))
        values.append(got[0])
        ratio.append(got[1])
        if done is not None:
            done(len(idx), computed)
    return np.concatenate(values), np.concatenate(ratio)


def _read_unit(path: Path | None, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """A finished chunk's (values, ratios), or None when it is missing, unreadable or of other indices."""
    if path is None or not path.exists():
        return None
    try:
        z = load_npz(path)
        if not np.array_equal(z["documents"], idx):
            return None
        return z["values"], z["ratio"]
    except (OSError, ValueError, KeyError, EOFError):
        return None


def converged_pearson(scores: np.ndarray, pbrf: np.ndarray, ratio: np.ndarray, threshold: float) -> float:
    """:func:`mean_pearson` over the documents whose optimization converged (``ratio <= threshold``, ``ratio`` the
    final/initial gradient norm of each); NaN when fewer than 3 did (a correlation needs at least 3 points)."""
    keep = np.asarray(ratio) <= threshold
    return mean_pearson(np.asarray(scores)[:, keep], np.asarray(pbrf)[:, keep]) if keep.sum() >= 3 else float("nan")


def mean_pearson(scores: np.ndarray, pbrf: np.ndarray) -> float:
    """Mean over queries of Pearson's r between a method's scores and the PBRF influence, both ``[Q, n]``
    (queries where either side is constant are left out)."""
    r = np.asarray([pearson(s, p) for s, p in zip(scores, pbrf)])
    r = r[np.isfinite(r)]
    return float(r.mean()) if r.size else float("nan")
