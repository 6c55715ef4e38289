"""Tiny models, documents and queries shared by the engine tests, and the brute-force oracle."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.engine import capture, tasks, testing
from jaxinf.engine.capture import Tap
from jaxinf.engine.tasks import Params, Task, sample_labels, token_nll

Array = jax.Array

DOCS = [[1, 2, 3, 4, 5, 6], [3, 4, 5], [7, 8, 9, 10, 11, 12, 13], [2, 2, 9, 1], [5, 1], [6, 7, 8, 9, 10]]
QUERIES = [([1, 2, 3], [4, 5]), ([9, 10], [11]), ([2, 2], [9, 1, 3])]


def tiny_lm(dtype=jnp.float64, seed=0, **kw):
    task = testing.tiny_lm_task()
    params = testing.tiny_lm_init(
        jax.random.key(seed), vocab=16, d_model=8, d_ff=12, n_layers=2, max_len=16, dtype=dtype, **kw
    )
    return task, params


def mlp_init(key: Array, sizes: tuple[int, ...], dtype=jnp.float32) -> Params:
    """Parameters of an MLP with layers ``fc0, fc1, ...`` (kernel ``[d_in, d_out]`` and bias)."""
    params = {}
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, k = jax.random.split(key)
        params[f"fc{i}"] = {
            "kernel": (jax.random.normal(k, (d_in, d_out)) / math.sqrt(d_in)).astype(dtype),
            "bias": jnp.full((d_out,), 0.01 * (i + 1), dtype),
        }
    return params


def mlp_apply(params: Params, x: Array, tap: Tap) -> Array:
    """``tanh`` MLP on inputs ``[B, 1, d]`` (one "token" per example)."""
    n = len(params)
    for i in range(n):
        layer = params[f"fc{i}"]
        x = tap.linear(f"fc{i}", x, layer["kernel"], layer["bias"])
        if i < n - 1:
            x = jnp.tanh(x)
    return x


def mlp_task(kind: str = "classification") -> Task:
    """An MLP for classification (labels ``y`` ``[B, 1]`` int) or regression (targets ``y`` ``[B, 1, d]``).

    Loss per example: cross-entropy, or ``0.5 ||y - f(x)||^2`` (the NLL of a
    unit-variance Gaussian, whose sampled labels are ``f(x) + N(0, I)``). The
    measurement is the same loss on the query's own label.
    """
    if kind not in ("classification", "regression"):
        raise ValueError(f"unknown MLP task kind {kind!r}")

    def train_loss(params, batch, probes, key=None):
        tap = Tap(probes)
        out = mlp_apply(params, batch["x"], tap)
        if kind == "classification":
            y = batch["y"] if key is None else sample_labels(key, out)
            loss = token_nll(out, y)
        else:
            y = batch["y"]
            if key is not None:
                y = jax.lax.stop_gradient(out) + jax.random.normal(key, out.shape, out.dtype)
            loss = 0.5 * jnp.sum((y - out) ** 2, axis=-1)
        return loss * batch["mask"]

    def measurement(params, batch, probes):
        return train_loss(params, batch, probes, None)

    return Task(train_loss=train_loss, measurement=measurement)


def doc_batch(docs=DOCS, length=None):
    return tasks.lm_batch(docs, length)


def query_batch(queries=QUERIES, length=None):
    return tasks.lm_batch([p + c for p, c in queries], length, [len(p) for p, _ in queries])


def layers_of(task, params, batch, track="all"):
    layers = capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), params, batch)
    return capture.select_layers(layers, track)


def tracked_param_subtree(params, layers):
    """The kernel (and bias) of each tracked block, keyed by block name (HF-style dotted path with '*')."""
    out = {}
    for name in layers:
        node = params
        for part in name.split("."):
            if part == capture.STACK:
                continue
            node = node[part]
        out[name] = node
    return out


def with_tracked(params, layers, sub):
    """``params`` with the tracked blocks' kernels and biases replaced by ``sub``."""
    params = jax.tree.map(lambda x: x, params)  # shallow structural copy

    def set_path(tree, parts, value):
        tree = dict(tree)
        if len(parts) == 1:
            tree[parts[0]] = value
        else:
            tree[parts[0]] = set_path(tree[parts[0]], parts[1:], value)
        return tree

    for name, value in sub.items():
        parts = [p for p in name.split(".") if p != capture.STACK]
        params = set_path(params, parts, value)
    return params


def per_example_grads(loss_of_row, params, layers, batch):
    """Oracle: ``vmap(grad)`` of each row's summed loss w.r.t. the tracked layers' parameters, flattened: ``[B, P]``."""
    sub = tracked_param_subtree(params, layers)

    def row_loss(sub, row):
        full = with_tracked(params, layers, sub)
        one = jax.tree.map(lambda x: x[None], row)
        return loss_of_row(full, one).sum()

    grads = jax.vmap(jax.grad(row_loss), in_axes=(None, 0))(sub, batch)
    leaves = jax.tree.leaves(grads)
    return jnp.concatenate([g.reshape(g.shape[0], -1) for g in leaves], axis=1)


def rel_err(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))


class Captured:
    """``a`` and ``g`` of every tracked block (``[*lead, B, T, d]``) and the sequence losses, for oracle checks."""

    def __init__(self, stats, loss):
        self.a = {k: v["a"] for k, v in stats.items()}
        self.g = {k: v["g"] for k, v in stats.items()}
        self.loss = loss


jax.tree_util.register_pytree_node(
    Captured,
    lambda c: ((c.a, c.g, c.loss), None),
    lambda _, ch: Captured({k: {"a": ch[0][k], "g": ch[1][k]} for k in ch[0]}, ch[2]),
)


def capture_ag(loss_fn, params, batch, layers, mask=None):
    """The engine's own mechanism with the identity statistic ``f(a, g) = (a, g)``: every layer's ``a`` and ``g``."""
    stats, loss = capture.layer_statistics(
        loss_fn,
        params,
        batch,
        layers,
        lambda a, g, m, c: {"a": a, "g": g},
        mask=batch["mask"] if mask is None else mask,
    )
    return Captured(stats, loss)
