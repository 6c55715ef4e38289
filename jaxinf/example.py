"""A small end-to-end influence example: the quick start's main job until the full demo lands.

Trains the tiny GPT of :mod:`jaxinf.tasks` with optax on a character-level
corpus of facts and two-step sums, fits EK-FAC on its MLP layers, and prints,
for a few queries, the documents with the largest influence on the completion.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinf import capture, scoring, stages, tasks

ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789+=.,?:"


def encode(text: str) -> list[int]:
    return [ALPHABET.index(c) + 1 for c in text]


def corpus(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """(source, text) pairs: facts about invented towns, worked sums, and filler."""
    towns = ["zorv", "quab", "miln", "terp", "dask", "hule"]
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            t = towns[rng.integers(len(towns))]
            out.append(("factual", f"the river of {t} is {t[::-1]}."))
        elif kind == 1:
            a, b, c = (int(x) for x in rng.integers(1, 9, 3))
            out.append(("procedural", f"{a}+{b}={a + b}, {a + b}+{c}={a + b + c}."))
        else:
            out.append(("filler", " ".join(rng.choice(["so", "it", "was", "then", "a", "day"], 5)) + "."))
    return out


def main(n_docs: int = 96, steps: int = 300, seed: int = 0) -> dict:
    t0 = time.time()
    rng = np.random.default_rng(seed)
    docs = corpus(rng, n_docs)
    seqs = [encode(text) for _, text in docs]
    T = max(map(len, seqs))
    batch = tasks.lm_batch(seqs, T)
    task = tasks.tiny_lm_task(n_heads=2)
    params = tasks.tiny_lm_init(jax.random.key(seed), vocab=len(ALPHABET) + 1, d_model=32, d_ff=64, max_len=T)
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    def loss(p):
        tl, _ = task.train_loss(p, batch, {}, None)
        return tl.sum() / batch["weights"].sum()

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    for i in range(steps):
        params, opt_state, value = step(params, opt_state)
        if i % 100 == 0 or i == steps - 1:
            print(f"train step {i:4d}  loss/token {float(value):.3f}", flush=True)

    layers = capture.select_layers(
        capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), params, batch), "mlp")
    batches = [jax.tree.map(lambda x: x[i : i + 32], batch) for i in range(0, n_docs, 32)]
    curv, _ = stages.fit_curvature(task, layers, params, batches, strategy="ekfac", key=jax.random.key(seed + 1))
    queries = [("the river of zorv is", " vroz."), ("3+4=7, 7+2=", "9."), ("so it was then", " a day.")]
    q = tasks.lm_batch([encode(p) + encode(c) for p, c in queries], None, [len(encode(p)) for p, _ in queries])
    G, qloss = stages.query_gradients(task, layers, params, q)
    qg = scoring.prepare_queries(G, qloss, curv, None, None)
    scores = np.concatenate([np.asarray(stages.score_batch(task, layers, params, qg, b)[0].total) for b in batches], 1)
    for (prompt, completion), row in zip(queries, scores):
        print(f"\nquery {prompt!r} -> {completion!r}: most influential documents")
        for j in np.argsort(-row)[:3]:
            print(f"  {row[j]:+10.3f}  [{docs[j][0]}] {docs[j][1]}")
    print(f"\ndone in {time.time() - t0:.1f}s")
    return {"scores": scores, "sources": [s for s, _ in docs]}
