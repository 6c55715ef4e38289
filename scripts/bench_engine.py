"""Engine speed: each stage's step against a plain jitted forward+backward step, in one process.

Same model, same batch of documents: a plain training step (``value_and_grad``
of the summed loss w.r.t. all parameters), the covariance update, the Lambda
update and scoring against 32 queries at rank 32 (MLP layers tracked, as in
Ruis et al.). Prints a markdown table of median times and the ratios to the
forward+backward step. Also timed: the engine's pass alone (forward, and the
backward pass to every tracked layer with a trivial statistic: what every stage
pays before its own work), scoring in each contraction order
(``scoring.contraction_order`` picks one per block), and the query stage
(query gradients preconditioned and truncated layer by layer in the backward
pass, as ``jaxinf run`` does, against preconditioning given gradients).

With ``--dtype bfloat16`` the parameters (and so the activations) are bf16; with
``--peak-tflops`` (the device's peak for that dtype) each row also gets its
model-FLOPs utilisation: XLA's FLOP count of the compiled step over its time,
as a fraction of the peak.

    python scripts/bench_engine.py [--d-model 256 --layers 4 --seq 256 --batch 8] [--dtype bfloat16]
        [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxinf.engine import capture, curvature, indexing, scoring, stages, tails, testing
from jaxinf.hostenv import lapack_threads


def timed(fn, *args, repeats: int):
    """Median wall time of ``fn(*args)`` after one warm-up call (compilation excluded)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    from jaxinf.hostenv import restart_with_huge_pages

    restart_with_huge_pages()  # as the jaxinf command does (JAXINF_HOST_HEAP=default: glibc's own heap)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--track", default="mlp")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--index-k", type=int, default=32, help="index.k of the rows that write the index")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for --dtype: adds an MFU column")
    args = ap.parse_args(argv)

    d, T, B = args.d_model, args.seq, args.batch
    params = testing.tiny_lm_init(
        jax.random.key(0),
        vocab=args.vocab,
        d_model=d,
        n_layers=args.layers,
        n_heads=args.heads,
        d_ff=4 * d,
        max_len=T,
        dtype=jnp.dtype(args.dtype),
    )
    task = testing.tiny_lm_task(n_heads=args.heads)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, args.vocab)
    batch = {"tokens": tokens, "mask": jnp.ones((B, T)), "weights": jnp.ones((B, T)).at[:, 0].set(0.0)}
    layers = capture.select_layers(
        capture.find_layers(lambda p, b, pr: task.train_loss(p, b, pr, None), params, batch), args.track
    )
    key = jax.random.key(2)

    @jax.jit
    def train_step(params, batch):
        return jax.value_and_grad(lambda p: task.train_loss(p, batch, None, None).sum())(params)

    cov_stage = stages.covariance_stage(task, layers, "sampled")
    lam_stage = stages.lambda_stage(task, layers, "sampled")
    cov_step = jax.jit(cov_stage.update)
    lam_step = jax.jit(lam_stage.update)
    cov_state = cov_stage.init()
    lam_state = lam_stage.init()

    # A fitted curvature and 32 rank-32 queries (queries are documents' prefixes: only the shapes matter).
    cov_state1, _ = cov_step(cov_state, params, batch, key)
    eigen = curvature.eigendecompose(cov_stage.finalize(cov_state1))
    lam_state1, _ = lam_step(lam_state, params, eigen, batch, key)
    curv = curvature.curvature("ekfac", eigen, lam_stage.finalize(lam_state1))
    qtok = jax.random.randint(jax.random.key(3), (args.queries, 64), 0, args.vocab)
    qbatch = {
        "tokens": qtok,
        "mask": jnp.ones((args.queries, 64)),
        "weights": jnp.zeros((args.queries, 64)).at[:, 32:].set(1.0),
    }
    G, qloss = jax.jit(lambda p, b: stages.query_gradients(task, layers, p, b))(params, qbatch)
    qg = jax.jit(lambda G, l, c: scoring.prepare_queries(G, l, c, None, args.rank))(G, qloss, curv)
    score_step = jax.jit(lambda p, q, b: stages.score_batch(task, layers, p, q, b)[0].total)
    capture_step = jax.jit(
        lambda p, b: stages.train_statistics(task, layers, p, b, None, lambda a, g, m, c: jnp.sum(g, axis=(0, 1)))
    )
    streamed = jax.jit(lambda p, b, c: stages.prepared_queries(task, layers, p, b, c, None, args.rank))

    def with_tails(documents):  # the scoring program of jaxinf run: scores and each query's running top 100
        step = stages.score_step(task, layers, self_influence=False, damping_value=None, tails_of=(documents, 100))
        return jax.jit(lambda p, q, b, t: step(p, q, None, b, t)["tails"].score)

    # the EK-FAC index written by the pass that forms each document's gradient under the data's labels
    selection = {k: indexing.select_cells(eigen, k) for k in (args.index_k, None)}
    basis = {k: indexing.ordered_basis(curv.Q_A, curv.Q_S, sel) for k, sel in selection.items()}
    emp_stage = stages.lambda_stage(task, layers, "empirical")
    emp_step = jax.jit(emp_stage.update)

    def lambda_writing(k):
        return jax.jit(stages.lambda_and_index_step(task, layers, k))

    def scores_writing(k):
        return jax.jit(lambda p, q, bs, b: stages.score_and_index_step(task, layers, k)(p, q, bs, b)["scores"])

    rows_batch = {**batch, "index": jnp.arange(B, dtype=jnp.int32), "chunk": jnp.zeros(B, jnp.int32)}
    tails0 = tails.init(args.queries, 100, len(scoring.layer_order(layers)), T)
    in_pass = {n: scoring.per_token_in_pass(layers, qg, B, T, n, 100) for n in (B, 10**9)}

    def score_in(order):
        return jax.jit(lambda p, q, b: stages.score_batch(task, layers, p, q, b, order=order)[0].total)

    def prepare_by(svd):
        return jax.jit(lambda G, l, c: scoring.prepare_queries(G, l, c, None, args.rank, svd=svd))

    rows = [
        ("forward+backward (value_and_grad, all params)", train_step, (params, batch)),
        ("covariance update (A, S)", cov_step, (cov_state, params, batch, key)),
        ("Lambda update (EK-FAC)", lam_step, (lam_state, params, eigen, batch, key)),
        (f"scores ({args.queries} queries, rank {args.rank})", score_step, (params, qg, batch)),
        (
            f"scores + running top 100 of a {B}-document corpus (per-token kept: {in_pass[B]})",
            with_tails(B),
            (params, qg, rows_batch, tails0),
        ),
        (
            f"scores + running top 100 of a 10^9-document corpus (per-token kept: {in_pass[10**9]})",
            with_tails(10**9),
            (params, qg, rows_batch, tails0),
        ),
        ("Lambda update, empirical Fisher (data labels)", emp_step, (emp_stage.init(), params, eigen, batch, key)),
        (
            f"Lambda update, empirical Fisher, writing the index (index.k={args.index_k})",
            lambda_writing(args.index_k),
            (emp_stage.init(), params, eigen, selection[args.index_k], batch),
        ),
        (
            "Lambda update, empirical Fisher, writing the index (index.k=full)",
            lambda_writing(None),
            (emp_stage.init(), params, eigen, selection[None], batch),
        ),
        (
            f"scores ({args.queries} queries, rank {args.rank}), writing the index (index.k={args.index_k})",
            scores_writing(args.index_k),
            (params, qg, basis[args.index_k], batch),
        ),
        (
            f"scores ({args.queries} queries, rank {args.rank}), writing the index (index.k=full)",
            scores_writing(None),
            (params, qg, basis[None], batch),
        ),
        ("engine pass alone (forward, backward to every tracked layer)", capture_step, (params, batch)),
        ("scores, tokens order in every block", score_in("tokens"), (params, qg, batch)),
        ("scores, documents order in every block", score_in("documents"), (params, qg, batch)),
        (
            f"prepare {args.queries} given query gradients (precondition, rank-{args.rank} randomized SVDs)",
            prepare_by("randomized"),
            (G, qloss, curv),
        ),
        (
            f"prepare {args.queries} given query gradients (precondition, rank-{args.rank} full SVDs)",
            prepare_by("full"),
            (G, qloss, curv),
        ),
        (
            f"query stage: {args.queries} queries' gradients prepared layer by layer in the backward pass",
            streamed,
            (params, qbatch, curv),
        ),
    ]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tracked = sum(s.num_params for s in layers.values())
    print(
        f"# jaxinf engine benchmark on {jax.devices()[0].platform} ({jax.device_count()} device(s)), "
        f"jax {jax.__version__}"
    )
    print(
        f"model: tiny GPT d_model={d} d_ff={4 * d} layers={args.layers} vocab={args.vocab}, "
        f"{n_params / 1e6:.2f}M params ({args.dtype}), tracked ({args.track}): {tracked / 1e6:.2f}M; "
        f"batch {B} x {T} tokens\n"
    )
    print("| step | median time (ms) | ratio to fwd+bwd | tokens/s | MFU |")
    print("|---|---|---|---|---|")
    base = None
    with lapack_threads():  # as jaxinf run prepares queries (XLA's own matrix products do not use BLAS threads)
        for name, fn, fargs in rows:
            t = timed(fn, *fargs, repeats=args.repeats)
            base = base or t
            rate = "-" if "quer" in name.split("(")[0] else f"{B * T / t:,.0f}"  # queries, not the batch
            mfu = "-"
            if args.peak_tflops:
                flops = fn.lower(*fargs).compile().cost_analysis()
                flops = float((flops[0] if isinstance(flops, list) else flops).get("flops", 0.0))
                mfu = f"{flops / t / (args.peak_tflops * 1e12):.1%}"
            print(f"| {name} | {1e3 * t:.1f} | {t / base:.2f}x | {rate} | {mfu} |")
    plans = {
        k: scoring.contraction_order(
            B, T, args.queries, s.d_out, s.d_in_aug, args.rank if min(s.d_out, s.d_in_aug) > args.rank else None
        )
        for k, s in layers.items()
    }
    print(f"\ncontraction plan per block: {plans}")


if __name__ == "__main__":
    main()
